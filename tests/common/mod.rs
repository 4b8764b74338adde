//! What several test files share: the fixture folder, the UNet parity inputs
//! (`tests/fixtures/unet/<case>.in.safetensors`, written by tools/make_unet_fixtures.py) and
//! the one comparison of float outputs with their references (`compare.rs`).
#![allow(dead_code)] // each test crate uses its own part

mod compare;
#[cfg(feature = "cuda")]
pub mod cuda;

#[allow(unused_imports)] // each test crate uses its own part
pub use compare::{assert_close, check, compare, Diff, Tol};

use std::path::{Path, PathBuf};

use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::model::unet::UnetInput;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One UNet evaluation's inputs, as stored in a fixture.
pub struct Input {
    pub sample: Vec<f32>,
    pub t: Vec<f32>,
    pub ctx: Vec<f32>,
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub l: usize,
}

impl Input {
    pub fn args(&self) -> UnetInput<'_> {
        UnetInput {
            sample: &self.sample,
            timesteps: &self.t,
            context: &self.ctx,
            batch: self.b,
            height: self.h,
            width: self.w,
            context_len: self.l,
        }
    }
}

/// The inputs of fixture `case`.
pub fn read_input(case: &str) -> Input {
    let f = SafetensorsFile::open(&fixtures().join(format!("unet/{case}.in.safetensors")))
        .expect("input fixture");
    let (s, sample) = read_as_f32(&f, "sample").expect("sample");
    let (_, t) = read_as_f32(&f, "timestep").expect("timestep");
    let (c, ctx) = read_as_f32(&f, "encoder_hidden_states").expect("context");
    Input {
        sample,
        t,
        ctx,
        b: s[0],
        h: s[2],
        w: s[3],
        l: c[1],
    }
}

/// Judges one GPU output against the CPU's: prints `cuda-parity <what> <dtype> rel_l2=...`
/// and returns a failure message naming the worst element when the relative L2 error is above
/// `tol` (or the output is an error or has the wrong length).
pub fn judge(
    what: &str,
    dtype: &str,
    got: hdb::Result<Vec<f32>>,
    want: &[f32],
    tol: f64,
) -> Option<String> {
    let got = match got {
        Ok(g) => g,
        Err(e) => {
            println!("cuda-parity {what} {dtype} ERROR {e}");
            return Some(format!("{what} {dtype}: {e}"));
        }
    };
    let tol = Tol::RelL2(tol);
    if got.len() != want.len() {
        return Some(format!(
            "{what} {dtype}: {} outputs, the CPU gave {}",
            got.len(),
            want.len()
        ));
    }
    let d = compare(&got, want);
    println!("cuda-parity {what} {dtype} {}", d.figures(tol));
    if d.within(tol) {
        return None;
    }
    let msg = d.failure(&format!("{what} {dtype}"), tol);
    println!("  {msg}");
    Some(msg)
}

/// The generation the CUDA pipeline tests compare with the CPU: tiny-sd's 64x64, batch 2,
/// 4 DDIM steps with guidance 7.5, from the fixed latents of tests/fixtures/pipeline.
pub fn gpu_pipeline_params() -> hdb::pipeline::GenerateParams {
    let latents = SafetensorsFile::open(&fixtures().join("pipeline/latents.safetensors"))
        .expect("latents")
        .to_f32("latents")
        .expect("f32");
    hdb::pipeline::GenerateParams {
        prompt: "a photo of sks person".into(),
        negative_prompt: "blurry, low quality".into(),
        steps: 4,
        guidance: 7.5,
        sampler: hdb::model::scheduler::SamplerKind::Ddim,
        seed: 0,
        width: 64,
        height: 64,
        batch: 2,
        latents: Some(latents),
    }
}

/// Random LoRA factors of `rank` (down ~ U(+-1/sqrt(din)), up ~ U(+-0.5/sqrt(rank)), from a
/// SplitMix64 seeded with `seed`) on the layers of `table` (a component's adaptable layers, in
/// key order) whose index `keep` accepts: sets can then mix adapters that touch a projection
/// with ones that do not. Linear layers only: the GPU tests that use it check the linear
/// kernels (`lidb_merge`, `lora_bgmv`); the LoCon fixtures cover convolutions.
pub fn random_lora(
    table: std::collections::BTreeMap<String, hdb::adapter::LayerShape>,
    seed: u64,
    rank: usize,
    keep: impl Fn(usize) -> bool,
) -> hdb::adapter::Adapter {
    let mut rng = hdb::rng::SplitMix64(seed);
    let mut u = |n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| (2.0 * rng.next_f32() - 1.0) * s).collect()
    };
    let layers = table
        .into_iter()
        .filter(|(_, s)| s.kind == hdb::model::LayerKind::Linear)
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, (k, s))| {
            let down = u(rank * s.din, 1.0 / (s.din as f32).sqrt());
            let up = u(s.dout * rank, 0.5 / (rank as f32).sqrt());
            (
                k,
                hdb::adapter::LoraLayer {
                    rank,
                    down,
                    up,
                    conv_kernel: None,
                },
            )
        })
        .collect();
    hdb::adapter::Adapter {
        layers,
        source: hdb::adapter::AdapterSource::Lora,
    }
}

/// Writes `src`'s tensors (as f32) to `out`, without those named in `drop`, then `add`:
/// (name, shape, every value) tensors appended, replacing any of the same name. For tests that
/// feed a fixture with one part broken.
pub fn rewrite_safetensors(src: &Path, out: &Path, drop: &[&str], add: &[(&str, Vec<usize>, f32)]) {
    let f = SafetensorsFile::open(src).expect("open");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f
        .tensors()
        .filter(|e| !drop.contains(&e.name.as_str()) && add.iter().all(|a| a.0 != e.name))
        .map(|e| {
            let v = f.to_f32(&e.name).expect("f32");
            (e.name.clone(), e.shape.dims().to_vec(), v)
        })
        .collect();
    for (n, shape, value) in add {
        tensors.push((
            n.to_string(),
            shape.clone(),
            vec![*value; shape.iter().product()],
        ));
    }
    let refs: Vec<(&str, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice()))
        .collect();
    hdb::io::safetensors::write_f32(out, &refs).expect("write");
}
