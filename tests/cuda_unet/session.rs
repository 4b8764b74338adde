//! The library's normal paths on a CUDA runtime: sessions through the C API's functions, and
//! the pipeline, against the same calls on a CPU runtime.

use super::adapters::{bits, fixture_adapter, random_adapter};
use super::*;
use hdb::adapter::adaptable_layers;
use hdb::adapter::apply::{Applied, ApplyMode};

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
    let big = random_adapter(&m.unet().expect("unet"), 9, 129, 40, 5);
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
    use hdb::pipeline::{GenerateAdapters, Pipeline};
    let rt = match hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cuda(0),
        threads: 2,
    }) {
        Ok(rt) => rt,
        Err(e) => {
            println!("SKIPPED (no CUDA device): {e}");
            return;
        }
    };
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let gpu = Pipeline::from_model_on(&m, &rt).expect("cuda pipeline");
    let d = gpu.device_unet.as_ref().expect("the UNet on the device");
    println!("pipeline UNet on {}", d.describe());
    let cpu = Pipeline::from_model(&m).expect("cpu pipeline");
    let cpu_unet = cpu.unet.as_deref().expect("a CPU pipeline has its UNet");
    let params = common::gpu_pipeline_params();
    assert!(
        gpu.unet.is_none() && gpu.text_encoder.is_none() && gpu.vae.is_none(),
        "a CUDA pipeline keeps no host copies of its UNet, text encoder and VAE"
    );
    let id1 = fixture_adapter(&m, "id1.lidb.safetensors");
    let set = [(&id1, 1.0)];
    let host_set = Applied::new(&set, ApplyMode::Runtime, cpu_unet).expect("cpu set");
    let dev_set = d.adapters(&set, ApplyMode::Runtime).expect("device set");
    // An identity on the UNet and the text encoder: the text encoder's set built once on the
    // device (fused kernels), in both modes, and a host set uploaded per call (compatibility).
    let mut both = fixture_adapter(&m, "id1.lidb.safetensors");
    let te_file = fixtures().join("text_encoder/te-id.lidb.safetensors");
    let te_id = hdb::adapter::load(
        &SafetensorsFile::open(&te_file).expect("te adapter"),
        &adaptable_layers(&m),
    )
    .expect("te adapter");
    both.layers.extend(te_id.layers);
    let both_set = [(&both, 1.0)];
    let mut sets = Vec::new();
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let cpu_set = Applied::new(&both_set, mode, cpu_unet).expect("cpu unet set");
        let (cpu_te, none) = cpu.text_adapters(&both_set, mode).expect("cpu te set");
        assert!(none.is_none());
        let gpu_unet = d.adapters(&both_set, mode).expect("device unet set");
        let (host_te, gpu_te) = gpu.text_adapters(&both_set, mode).expect("device te set");
        assert!(
            host_te.is_none(),
            "a CUDA pipeline builds its text encoder set on the device"
        );
        sets.push((mode, cpu_set, cpu_te, gpu_unet, gpu_te));
    }
    // A set of the other kind is an error naming `adapters`, never a crash or a silent no-op:
    // device sets on the CPU pipeline, a host UNet set on the device one, and one device
    // model's set handed to the other.
    {
        let (_, cpu_set, _, gpu_unet, gpu_te) = &sets[0];
        let wrong = [
            (
                "device text-encoder set on the CPU pipeline",
                &cpu,
                GenerateAdapters {
                    device_text_encoder: gpu_te.as_ref(),
                    ..Default::default()
                },
            ),
            (
                "device UNet set on the CPU pipeline",
                &cpu,
                GenerateAdapters {
                    device_unet: Some(gpu_unet),
                    ..Default::default()
                },
            ),
            (
                "host UNet set on the device pipeline",
                &gpu,
                GenerateAdapters {
                    unet: Some(cpu_set),
                    ..Default::default()
                },
            ),
            (
                "device UNet set as the text encoder's",
                &gpu,
                GenerateAdapters {
                    device_text_encoder: Some(gpu_unet),
                    ..Default::default()
                },
            ),
            (
                "device text-encoder set as the UNet's",
                &gpu,
                GenerateAdapters {
                    device_unet: gpu_te.as_ref(),
                    ..Default::default()
                },
            ),
        ];
        for (what, pipe, ad) in wrong {
            match rt.install(|| pipe.generate(&params, ad, None)) {
                Err(
                    e @ hdb::Error::InvalidArgument {
                        name: "adapters", ..
                    },
                ) => {
                    println!("cuda-parity pipeline/wrong-kind {what}: {e}")
                }
                Err(e) => panic!("{what}: expected an `adapters` argument error, got {e}"),
                Ok(_) => panic!("{what}: generated instead of refusing the set"),
            }
        }
    }
    let per_image: &[i32] = &[-1, 0];
    let mut cases = vec![
        (
            "none".to_string(),
            GenerateAdapters::default(),
            GenerateAdapters::default(),
        ),
        (
            "per-image".to_string(),
            GenerateAdapters {
                unet: Some(&host_set),
                per_image: Some(per_image),
                ..Default::default()
            },
            GenerateAdapters {
                device_unet: Some(&dev_set),
                per_image: Some(per_image),
                ..Default::default()
            },
        ),
    ];
    for (mode, cpu_set, cpu_te, gpu_unet, gpu_te) in &sets {
        let cpu_ad = GenerateAdapters {
            unet: Some(cpu_set),
            text_encoder: cpu_te.as_ref(),
            ..Default::default()
        };
        let gpu_ad = GenerateAdapters {
            device_unet: Some(gpu_unet),
            device_text_encoder: gpu_te.as_ref(),
            ..Default::default()
        };
        cases.push((format!("unet+te-{mode:?}"), cpu_ad, gpu_ad));
        if *mode == ApplyMode::Runtime {
            fn per<'a>(ad: GenerateAdapters<'a>, idx: &'a [i32]) -> GenerateAdapters<'a> {
                GenerateAdapters {
                    per_image: Some(idx),
                    ..ad
                }
            }
            let p = per_image;
            cases.push(("unet+te-per-image".into(), per(cpu_ad, p), per(gpu_ad, p)));
            // A host set on the device text encoder: uploaded for the call.
            let host_te = GenerateAdapters {
                device_text_encoder: None,
                text_encoder: cpu_te.as_ref(),
                ..gpu_ad
            };
            cases.push((
                "unet+host-te-per-image".into(),
                per(cpu_ad, p),
                per(host_te, p),
            ));
        }
    }
    let mut failures = Vec::new();
    for (case, cpu_ad, gpu_ad) in cases {
        let want = rt
            .install(|| cpu.generate(&params, cpu_ad, None))
            .expect("cpu generate");
        let mut steps = 0;
        let mut progress = |done: usize, total: usize| {
            steps += 1;
            assert_eq!((done, total), (steps, 4));
            true
        };
        let got = rt
            .install(|| gpu.generate(&params, gpu_ad, Some(&mut progress)))
            .expect("cuda generate");
        assert_eq!(steps, 4, "one progress call per step");
        // The pixels come from the VAE on the GPU too (fp16, since the text encoder and VAE
        // moved there): the latents' error, decoded.
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
    let mut calls = 0;
    let mut cancel = |done: usize, _total: usize| {
        calls += 1;
        done < 2
    };
    let e = rt
        .install(|| gpu.generate(&params, GenerateAdapters::default(), Some(&mut cancel)))
        .expect_err("cancelled");
    assert!(matches!(e, hdb::Error::Cancelled), "{e}");
    assert_eq!(calls, 2, "cancelled at the second step");

    // A set built for the CPU UNet is refused by the device pipeline, and the other way round.
    let e = gpu
        .generate(
            &params,
            GenerateAdapters {
                unet: Some(&host_set),
                ..Default::default()
            },
            None,
        )
        .expect_err("cpu set on the device");
    assert!(e.to_string().contains("'adapters'"), "{e}");
    let e = cpu
        .generate(
            &params,
            GenerateAdapters {
                device_unet: Some(&dev_set),
                ..Default::default()
            },
            None,
        )
        .expect_err("device set on the cpu");
    assert!(e.to_string().contains("'adapters'"), "{e}");
}
