//! The adapter hooks of the generic models on CUDA against the CPU's `AdapterCtx`:
//! [`CudaKeyAdapters`] (merged weights, or runtime LoRA through cuBLAS) in merge and runtime
//! mode with per-sample indices, on an `Applied` built by `Applied::new` from random adapters
//! over a test `Adaptable`, in f32, f16 and bf16 (harness: tests/common/cuda.rs). `#[ignore]`d
//! without a GPU (counted as skipped); scripts/gpu-check.sh runs it with `--include-ignored`.
#![cfg(feature = "cuda")]

mod common;
use common::cuda::{check, randn, sfx, tol};

use std::collections::BTreeMap;

use hdb::adapter::apply::{Adaptable, AdapterCtx, Applied, ApplyMode};
use hdb::adapter::{Adapter, AdapterSource, LoraLayer};
use hdb::backend::cuda::ops::BlasElem;
use hdb::backend::cuda::{Cuda, CudaKeyAdapters, DeviceElem};
use hdb::backend::{AdapterHook, Backend, Cpu};
use hdb::io::F32Weight;
use hdb::rng::SplitMix64;

// ---------------------------------------------------------------------------------------------
// CudaKeyAdapters against the CPU's AdapterCtx
// ---------------------------------------------------------------------------------------------

/// A model with two adaptable projections, for `Applied::new`.
struct TwoProjections {
    /// key -> (base weight [dout, din], dout, din)
    proj: BTreeMap<String, (Vec<f32>, usize, usize)>,
}

impl Adaptable for TwoProjections {
    fn key_prefix(&self) -> &'static str {
        "unet."
    }

    fn projection_dims(&self, key: &str) -> Option<(usize, usize)> {
        self.proj.get(key).map(|(_, o, i)| (*o, *i))
    }

    fn host_weight(&self, key: &str) -> Option<&[f32]> {
        self.proj.get(key).map(|(w, _, _)| &w[..])
    }
}

const KEY_Q: &str = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q";
const KEY_K: &str = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k";

/// Three random adapters over `model`: #0 (rank 4) and #2 (rank 2) on KEY_Q, #1 (rank 8) on
/// both keys, factors rounded to T.
fn random_adapters<T: DeviceElem>(rng: &mut SplitMix64, model: &TwoProjections) -> Vec<Adapter> {
    let mut adapter = |keys: &[&str], rank: usize| {
        let layers = keys
            .iter()
            .map(|&k| {
                let (_, dout, din) = model.proj[k];
                let down = randn::<T>(rng, rank * din, 1.0 / (din as f32).sqrt());
                let up = randn::<T>(rng, dout * rank, 0.5 / (rank as f32).sqrt());
                (k.to_string(), LoraLayer { rank, down, up })
            })
            .collect();
        Adapter {
            layers,
            source: AdapterSource::Lora,
        }
    };
    vec![
        adapter(&[KEY_Q], 4),
        adapter(&[KEY_Q, KEY_K], 8),
        adapter(&[KEY_Q], 2),
    ]
}

fn key_adapters_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    let s = sfx(be);
    let (din, dout, din_k) = (64, 48, 40);
    let model = TwoProjections {
        proj: [
            (
                KEY_Q.to_string(),
                (randn::<T>(rng, dout * din, 0.125), dout, din),
            ),
            (
                KEY_K.to_string(),
                (randn::<T>(rng, dout * din_k, 0.15), dout, din_k),
            ),
        ]
        .into_iter()
        .collect(),
    };
    let adapters = random_adapters::<T>(rng, &model);
    // Scales fold into up (rounded again on the device: T's rounding of up * scale).
    let set: Vec<(&Adapter, f32)> = adapters.iter().zip([1.0, 0.75, -0.5]).collect();

    // Runtime mode, per-sample: samples of 7 rows each, runs of one adapter and of none.
    let runtime = Applied::new(&set, ApplyMode::Runtime, &model).expect("runtime set");
    let per_sample: [i32; 6] = [1, -1, 0, 0, 2, 1];
    let (batch, per) = (per_sample.len(), 7);
    let rows = batch * per;
    for (key, kin) in [(KEY_Q, din), (KEY_K, din_k)] {
        let x = randn::<T>(rng, rows * kin, 1.0);
        let y0 = randn::<T>(rng, rows * dout, 1.0);
        for idx in [Some(&per_sample[..]), None] {
            let ctx = AdapterCtx {
                applied: &runtime,
                per_sample: idx,
            };
            let mut want = y0.clone();
            AdapterHook::<Cpu>::add(&ctx, &Cpu, key, &mut want, &x, batch, kin, dout)
                .expect("cpu add");
            let hook = CudaKeyAdapters::new(be, &runtime, idx).expect("cuda adapters");
            hook.validate(batch).expect("validate");
            let xd = be.upload(&x).unwrap();
            let mut yd = be.upload(&y0).unwrap();
            hook.add(be, key, &mut yd, &xd, batch, kin, dout)
                .expect("cuda add");
            let got = be.download(&yd).unwrap();
            // Only the update differs from y0: measure it against the CPU's update.
            let upd = |v: &[f32]| v.iter().zip(&y0).map(|(a, b)| a - b).collect::<Vec<_>>();
            let case = format!(
                "key_adapters runtime {s} {} per_sample {}",
                key.rsplit('.').next().unwrap_or(key),
                idx.is_some()
            );
            // t = x down^T is rounded to T on the device (f32 on the CPU), and y0 + update
            // once more: a few roundings of T.
            let t = match s {
                "f32" => 1e-5,
                "f16" => 4e-3,
                _ => 3e-2,
            };
            check(&case, &upd(&got), &upd(&want), t);
            check(&format!("{case} y"), &got, &want, tol::<T>(1e-6));
            assert!(
                hook.weight(key).is_none(),
                "runtime mode has no merged weight"
            );
        }
    }
    // No adapter on a key: nothing changes.
    let hook = CudaKeyAdapters::new(be, &runtime, None).unwrap();
    let x = be.upload(&[1.0; 12]).unwrap();
    let mut y = be.upload(&[2.0; 6]).unwrap();
    hook.add(be, "unet.not.adapted", &mut y, &x, 1, 4, 2)
        .unwrap();
    assert_eq!(be.download(&y).unwrap(), vec![2.0; 6]);
    // The CPU's validation errors, the same way.
    let bad: [&[i32]; 3] = [&[0, 1], &[0, 3, 1, 1, 1, 1], &[-2, 0, 0, 0, 0, 0]];
    for idx in bad {
        let ctx = AdapterCtx {
            applied: &runtime,
            per_sample: Some(idx),
        };
        let cpu_err = AdapterHook::<Cpu>::validate(&ctx, batch).is_err();
        let cuda_err = CudaKeyAdapters::new(be, &runtime, Some(idx))
            .and_then(|h| h.validate(batch))
            .is_err();
        assert!(
            cpu_err && cuda_err,
            "indices {idx:?}: cpu err {cpu_err}, cuda err {cuda_err}"
        );
    }

    // Merge mode: the merged weights, and a projection through them.
    let merged = Applied::new(&set, ApplyMode::Merge, &model).expect("merge set");
    let ctx = AdapterCtx {
        applied: &merged,
        per_sample: None,
    };
    let hook = CudaKeyAdapters::new(be, &merged, None).expect("cuda adapters");
    hook.validate(3).expect("validate");
    assert!(
        CudaKeyAdapters::new(be, &merged, Some(&[0, 1])).is_err(),
        "per-sample indices in merge mode"
    );
    for (key, kin) in [(KEY_Q, din), (KEY_K, din_k)] {
        let w_cpu = AdapterHook::<Cpu>::weight(&ctx, key).expect("cpu merged weight");
        let w_dev = hook.weight(key).expect("cuda merged weight");
        let w_got = be.download(w_dev).unwrap();
        let w_want: Vec<f32> = w_cpu.iter().map(|&v| T::from_f32(v).to_f32()).collect();
        assert_eq!(
            w_got, w_want,
            "merged {key} {s}: the CPU's weight, rounded to {s}"
        );
        let x = randn::<T>(rng, rows * kin, 1.0);
        let xd = be.upload(&x).unwrap();
        let yd = be.linear(&xd, w_dev, None, (rows, kin, dout)).unwrap();
        let w_rounded = F32Weight::Owned(w_want);
        let want = Cpu.linear(&x, &w_rounded, None, (rows, kin, dout)).unwrap();
        check(
            &format!(
                "key_adapters merge {s} linear {}",
                key.rsplit('.').next().unwrap_or(key)
            ),
            &be.download(&yd).unwrap(),
            &want,
            tol::<T>(1e-5),
        );
        // Merge mode adds nothing at run time.
        let mut y = be.upload(&vec![1.0; rows * dout]).unwrap();
        hook.add(be, key, &mut y, &xd, 3, kin, dout).unwrap();
        assert_eq!(be.download(&y).unwrap(), vec![1.0; rows * dout]);
    }
    assert!(hook.weight("unet.not.adapted").is_none());
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn key_adapters_match_cpu() {
    every_dtype!("key_adapters", key_adapters_case);
}
