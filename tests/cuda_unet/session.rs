//! The library's normal paths on a CUDA runtime: sessions through the C API's functions, and
//! the pipeline, against the same calls on a CPU runtime.

use super::adapters::{bits, fixture_adapter, random_adapter};
use super::*;
use hdb::adapter::apply::ApplyMode;

use std::ffi::{CStr, CString};

use hdb::ffi::adapter::{hdb_adapter, hdb_adapter_free, hdb_adapter_load};
use hdb::ffi::boundary::hdb_last_error_message;
use hdb::ffi::hdb_status;
use hdb::ffi::model::{hdb_model, hdb_model_free, hdb_model_load};
use hdb::ffi::runtime::{
    hdb_runtime, hdb_runtime_free, hdb_runtime_get_info, hdb_runtime_info, hdb_runtime_new,
    hdb_runtime_params_default, HDB_DEVICE_CPU, HDB_DEVICE_CUDA,
};
use hdb::ffi::session::{
    hdb_session, hdb_session_free, hdb_session_new, hdb_session_set_adapters,
    hdb_session_set_sample_adapters, hdb_session_unet, HDB_APPLY_MERGE, HDB_APPLY_RUNTIME,
};

pub(crate) fn last_error() -> String {
    // SAFETY: a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(hdb_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn cpath(p: &std::path::Path) -> CString {
    CString::new(p.to_str().expect("utf-8 path")).expect("no NUL")
}

/// A runtime, the tiny SD model, a session on it and loaded adapters, freed on drop.
pub(crate) struct Host {
    rt: *mut hdb_runtime,
    model: *mut hdb_model,
    pub(crate) session: *mut hdb_session,
    adapters: Vec<*mut hdb_adapter>,
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: every handle was created by the matching hdb call and is freed once.
        unsafe {
            hdb_session_free(self.session);
            for a in self.adapters.drain(..) {
                hdb_adapter_free(a);
            }
            hdb_model_free(self.model);
            hdb_runtime_free(self.rt);
        }
    }
}

impl Host {
    /// Opens `device`; the status of hdb_runtime_new when it fails.
    pub(crate) fn open(device: &str) -> Result<Host, (hdb_status, String)> {
        let dev = CString::new(device).expect("device");
        let mut p = hdb_runtime_params_default();
        p.device = dev.as_ptr();
        p.num_threads = 2;
        let mut rt = std::ptr::null_mut();
        // SAFETY: valid params and out-pointers.
        let st = unsafe { hdb_runtime_new(&p, &mut rt) };
        if st != hdb_status::HDB_STATUS_OK {
            return Err((st, last_error()));
        }
        let mut h = Host {
            rt,
            model: std::ptr::null_mut(),
            session: std::ptr::null_mut(),
            adapters: Vec::new(),
        };
        let dir = cpath(&fixtures().join("tiny-sd"));
        // SAFETY: live runtime, valid path and out-pointers.
        let st = unsafe { hdb_model_load(h.rt, dir.as_ptr(), std::ptr::null(), &mut h.model) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "model: {}", last_error());
        // SAFETY: live model.
        let st = unsafe { hdb_session_new(h.model, std::ptr::null(), &mut h.session) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "session: {}", last_error());
        Ok(h)
    }

    fn device_kind(&self) -> u32 {
        let mut info = hdb_runtime_info {
            struct_size: std::mem::size_of::<hdb_runtime_info>() as u32,
            device_kind: u32::MAX,
            device_index: 0,
            num_threads: 0,
        };
        // SAFETY: live runtime, sized struct.
        let st = unsafe { hdb_runtime_get_info(self.rt, &mut info) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
        info.device_kind
    }

    fn load_adapter(&mut self, path: &std::path::Path) -> *mut hdb_adapter {
        let p = cpath(path);
        let mut a = std::ptr::null_mut();
        // SAFETY: live model, valid path and out-pointer.
        let st = unsafe { hdb_adapter_load(self.model, p.as_ptr(), &mut a) };
        assert_eq!(
            st,
            hdb_status::HDB_STATUS_OK,
            "{}: {}",
            path.display(),
            last_error()
        );
        self.adapters.push(a);
        a
    }

    fn set_adapters(
        &mut self,
        set: &[*mut hdb_adapter],
        scales: Option<&[f32]>,
        mode: u32,
    ) -> hdb_status {
        let ptrs: Vec<*const hdb_adapter> = set.iter().map(|&a| a as *const _).collect();
        // SAFETY: live session and adapters; scales NULL or one per adapter.
        unsafe {
            hdb_session_set_adapters(
                self.session,
                ptrs.as_ptr(),
                scales.map_or(std::ptr::null(), |s| s.as_ptr()),
                ptrs.len(),
                mode,
            )
        }
    }

    fn set_sample_adapters(&mut self, idx: &[i32]) {
        // SAFETY: live session, idx valid for its length.
        let st = unsafe { hdb_session_set_sample_adapters(self.session, idx.as_ptr(), idx.len()) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
    }

    fn unet(&mut self, inp: &Input) -> Vec<f32> {
        self.try_unet(inp)
            .unwrap_or_else(|(st, msg)| panic!("hdb_session_unet: {st:?}: {msg}"))
    }

    /// `hdb_session_unet`, or its status and message.
    pub(crate) fn try_unet(&mut self, inp: &Input) -> Result<Vec<f32>, (hdb_status, String)> {
        let mut out = vec![0f32; inp.sample.len()];
        // SAFETY: live session; every buffer valid for its length.
        let st = unsafe {
            hdb_session_unet(
                self.session,
                inp.sample.as_ptr(),
                inp.sample.len(),
                inp.t.as_ptr(),
                inp.t.len(),
                inp.ctx.as_ptr(),
                inp.ctx.len(),
                inp.b as u32,
                inp.h as u32,
                inp.w as u32,
                inp.l as u32,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        if st != hdb_status::HDB_STATUS_OK {
            return Err((st, last_error()));
        }
        Ok(out)
    }
}

/// The same session calls on a runtime: (case, output) after each.
fn session_run(h: &mut Host, inp: &Input) -> Vec<(&'static str, Vec<f32>)> {
    let id1 = h.load_adapter(&fixtures().join("adapter/id1.lidb.safetensors"));
    let id2 = h.load_adapter(&fixtures().join("adapter/id2.lidb.safetensors"));
    let mut outs = vec![("none", h.unet(inp))];
    let ok = hdb_status::HDB_STATUS_OK;
    assert_eq!(
        h.set_adapters(&[id1, id2], Some(&[0.7, 0.5]), HDB_APPLY_MERGE),
        ok,
        "{}",
        last_error()
    );
    outs.push(("merge", h.unet(inp)));
    assert_eq!(
        h.set_adapters(&[id1, id2], None, HDB_APPLY_RUNTIME),
        ok,
        "{}",
        last_error()
    );
    outs.push(("runtime", h.unet(inp)));
    h.set_sample_adapters(&[1, -1]);
    outs.push(("per-sample", h.unet(inp)));
    outs
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn session_unet_on_a_cuda_runtime_matches_the_cpu_runtime() {
    let mut gpu = match Host::open("cuda") {
        Ok(h) => h,
        Err((st, msg)) => {
            println!("SKIPPED (no CUDA device): {st:?}: {msg}");
            return;
        }
    };
    assert_eq!(gpu.device_kind(), HDB_DEVICE_CUDA);
    let mut cpu = Host::open("cpu").expect("cpu runtime");
    assert_eq!(cpu.device_kind(), HDB_DEVICE_CPU);
    let inp = read_input("tiny-sd");
    let want = session_run(&mut cpu, &inp);
    let got = session_run(&mut gpu, &inp);
    let mut failures = Vec::new();
    for ((case, g), (_, w)) in got.iter().zip(&want) {
        let tol = Tol::RelL2(1e-2);
        let d = compare(g, w);
        println!("cuda-parity session-unet/{case} f16 {}", d.figures(tol));
        if !d.within(tol) {
            failures.push(d.failure(&format!("session-unet/{case}"), tol));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let before = bits(&got[3].1);

    // A set the device cannot apply (rank 129 in runtime mode) fails naming the layer and
    // leaves the previous set (and its per-sample indices) in place.
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let big = random_adapter(&Unet::from_model(&m).expect("unet"), 9, 129, 40, 5);
    let key = big.layers.keys().next().expect("a layer").clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rank129.safetensors");
    hdb::adapter::lora::export(&big, hdb::adapter::lora::LoraFormat::Peft, &path).expect("export");
    let big = gpu.load_adapter(&path);
    let st = gpu.set_adapters(&[big], None, HDB_APPLY_RUNTIME);
    let msg = last_error();
    assert_eq!(st, hdb_status::HDB_STATUS_UNSUPPORTED, "{msg}");
    assert!(
        msg.contains(key.trim_start_matches("unet.")) && msg.contains("129"),
        "{msg}"
    );
    let after = bits(&gpu.unet(&inp));
    println!(
        "cuda-parity session-unet/failed-set-keeps-previous f16 bit-exact={}",
        after == before
    );
    assert_eq!(
        after, before,
        "a failed set must leave the previous one active"
    );

    // n = 0 removes every adapter: the no-adapter output, bit for bit.
    assert_eq!(
        gpu.set_adapters(&[], None, HDB_APPLY_MERGE),
        hdb_status::HDB_STATUS_OK
    );
    let cleared = bits(&gpu.unet(&inp));
    println!(
        "cuda-parity session-unet/cleared f16 bit-exact={}",
        cleared == bits(&got[0].1)
    );
    assert_eq!(
        cleared,
        bits(&got[0].1),
        "clearing restores the base output"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn pipeline_on_a_cuda_runtime_matches_the_cpu_pipeline() {
    use hdb::{Engine, Session};
    let rt = match hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cuda(0),
        threads: 2,
    }) {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            println!("SKIPPED (no CUDA device): {e}");
            return;
        }
    };
    let cpu_rt = Arc::new(
        hdb::Runtime::new(hdb::RuntimeOptions {
            device: hdb::runtime::DeviceRequest::Cpu,
            threads: 2,
        })
        .expect("cpu runtime"),
    );
    let load = || Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let m = load();
    let mut gpu = Session::new(Arc::new(Engine::new(rt, load())));
    let mut cpu = Session::new(Arc::new(Engine::new(cpu_rt, load())));
    println!("pipeline on {}", gpu.engine().describe());
    match gpu.engine().placement() {
        hdb::session::Placement::Cuda(_) => {}
        other => panic!("a CUDA runtime places the model on its GPU, got {other:?}"),
    }
    let params = common::gpu_pipeline_params();
    let id1 = fixture_adapter(&m, "id1.lidb.safetensors");
    // An identity on the UNet and the text encoder: each set built once on the device (fused
    // kernels), in both modes.
    let mut both = fixture_adapter(&m, "id1.lidb.safetensors");
    let te_file = fixtures().join("text_encoder/te-id.lidb.safetensors");
    let te_id = hdb::adapter::load(
        &SafetensorsFile::open(&te_file).expect("te adapter"),
        &m.adaptable_layers(),
    )
    .expect("te adapter");
    both.layers.extend(te_id.layers);
    let per_image = vec![-1, 0];
    type Case<'a> = (
        &'a str,
        Vec<(&'a hdb::adapter::Adapter, f32)>,
        ApplyMode,
        Option<Vec<i32>>,
    );
    let cases: Vec<Case<'_>> = vec![
        ("none", vec![], ApplyMode::Merge, None),
        (
            "per-image",
            vec![(&id1, 1.0)],
            ApplyMode::Runtime,
            Some(per_image.clone()),
        ),
        ("unet+te-Merge", vec![(&both, 1.0)], ApplyMode::Merge, None),
        (
            "unet+te-Runtime",
            vec![(&both, 1.0)],
            ApplyMode::Runtime,
            None,
        ),
        (
            "unet+te-per-image",
            vec![(&both, 1.0)],
            ApplyMode::Runtime,
            Some(per_image.clone()),
        ),
    ];
    let mut failures = Vec::new();
    for (case, set, mode, idx) in cases {
        for s in [&mut cpu, &mut gpu] {
            s.set_adapters(&set, mode).expect("set adapters");
            s.set_sample_adapters(idx.clone()).expect("indices");
        }
        let want = cpu.generate(&params, None).expect("cpu generate");
        let mut steps = 0;
        let mut progress = |done: usize, total: usize| {
            steps += 1;
            assert_eq!((done, total), (steps, 4));
            true
        };
        let got = gpu
            .generate(&params, Some(&mut progress))
            .expect("cuda generate");
        assert_eq!(steps, 4, "one progress call per step");
        // The pixels come from the VAE on the GPU too (fp16): the latents' error, decoded.
        // Guidance 7.5 amplifies the UNet's error about 10x in the latents (on the CPU, a
        // perturbation of 1.9e-3 rel_l2 per UNet call gives 2.0e-2 after these 4 DDIM steps),
        // and the f16 UNet is within ~2e-3 per call.
        let tol = Tol::RelL2(5e-2);
        let lat = compare(&got.latents, &want.latents);
        let px = compare(&got.pixels, &want.pixels);
        println!(
            "cuda-parity pipeline/{case} f16 latents {} pixels {}",
            lat.figures(tol),
            px.figures(tol)
        );
        if !px.within(tol) {
            failures.push(px.failure(&format!("pipeline/{case}: pixels"), tol));
        }
        if !lat.within(tol) {
            failures.push(lat.failure(&format!("pipeline/{case}: latents"), tol));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Cancelling stops within one step, as on the CPU.
    gpu.set_adapters(&[], ApplyMode::Merge).expect("clear");
    let mut calls = 0;
    let mut cancel = |done: usize, _total: usize| {
        calls += 1;
        done < 2
    };
    let e = gpu
        .generate(&params, Some(&mut cancel))
        .expect_err("cancelled");
    assert!(matches!(e, hdb::Error::Cancelled), "{e}");
    assert_eq!(calls, 2, "cancelled at the second step");
}
