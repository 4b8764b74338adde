//! `hdb bench cuda`'s attention-backward rows (training): per SD 1.5 attention shape and the
//! CLIP text encoder's causal one, in f16 and bf16,
//!
//! - the backward alone by the flash kernels and by the materialised path (cuBLAS scores in
//!   chunks), against PyTorch's SDPA backward alone (`torch.autograd.grad` of a retained
//!   graph: its forward saved the log-sum-exp, so it does not recompute the statistics as
//!   hdb's backward does: hdb's forward saves nothing);
//! - forward then backward (hdb's fused forward, then the flash backward), against SDPA's
//!   forward and backward with `requires_grad` on q, k and v: what one attention of a training
//!   step costs on each side.
//!
//! q, k, v and dO are `[B, L, H * D]` for hdb and `[B, H, L, D]` contiguous for PyTorch (each
//! side's own layout, as the forward rows). FLOPs are counted as FlashAttention-2 counts them,
//! without its recomputation: the forward 4 B H lq lk d, the backward 2.5 times that, halved
//! where causal; the flash backward's extra sweeps are not counted as work.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use hdb::backend::cuda::ops::{self, At, AttnBackwardKernel, AttnKernel, AttnShape, BlasElem};
use hdb::backend::cuda::CudaDevice;
use hdb::rng::SplitMix64;
use hdb::Result;

use crate::bench_cuda::{gpu_ms, random, Row, Rows};

/// An attention-backward shape: batch, heads, lq, lk, head dim, causal.
pub(crate) type BackwardShape = (usize, usize, usize, usize, usize, bool);

/// The peer's arguments for `shapes`: `--attn-backward b,h,lq,lk,d,causal` each.
pub(crate) fn peer_args(shapes: &[BackwardShape]) -> Vec<String> {
    shapes
        .iter()
        .flat_map(|&(b, h, lq, lk, d, c)| {
            [
                "--attn-backward".to_string(),
                format!("{b},{h},{lq},{lk},{d},{}", c as u8),
            ]
        })
        .collect()
}

/// The rows in f16 and bf16; returns a summary line per type for the notes after the table.
pub(crate) fn rows(
    dev: &CudaDevice,
    shapes: &[BackwardShape],
    runs: usize,
    peer: &serde_json::Value,
    rows: &mut Rows,
) -> Result<Vec<String>> {
    Ok(vec![
        rows_of::<f16>(dev, shapes, runs, peer, rows)?,
        rows_of::<bf16>(dev, shapes, runs, peer, rows)?,
    ])
}

fn rows_of<T: BlasElem>(
    dev: &CudaDevice,
    shapes: &[BackwardShape],
    runs: usize,
    peer: &serde_json::Value,
    rows: &mut Rows,
) -> Result<String> {
    let mut rng = SplitMix64(23);
    // Sums over the shapes: the backend's choice, the materialised path, PyTorch's backward
    // (None once a shape lacks the peer's figure).
    let (mut auto, mut mat, mut torch) = (0.0, 0.0, Some(0.0));
    for &(b, h, lq, lk, d, causal) in shapes {
        let hd = h * d;
        let (nq, nk) = (b * lq * hd, b * lk * hd);
        let q = random::<T>(dev, &mut rng, nq, 1.0)?;
        let k = random::<T>(dev, &mut rng, nk, 1.0)?;
        let v = random::<T>(dev, &mut rng, nk, 1.0)?;
        let dout = random::<T>(dev, &mut rng, nq, 1.0)?;
        let o: CudaSlice<T> = dev.zeros(nq)?;
        let (dq, dk, dv): (CudaSlice<T>, CudaSlice<T>, CudaSlice<T>) =
            (dev.zeros(nq)?, dev.zeros(nk)?, dev.zeros(nk)?);
        let s = AttnShape::dense(b, h, lq, lk, d);
        let half = if causal { 0.5 } else { 1.0 };
        let fwd_flops = 4.0 * (b * h * lq * lk * d) as f64 * half;
        let peer_entry = peer["attention_backward"].as_array().and_then(|a| {
            a.iter().find(|e| {
                e["b"] == b
                    && e["h"] == h
                    && e["lq"] == lq
                    && e["lk"] == lk
                    && e["d"] == d
                    && e["causal"] == causal
                    && e["dtype"] == T::SUFFIX
            })
        });
        let peer_ms = |key: &str| peer_entry.and_then(|e| e[key].as_f64());
        let label = format!(
            "{} b{b} h{h} lq{lq} lk{lk} d{d}{}",
            T::SUFFIX,
            if causal { " causal" } else { "" }
        );
        let backward = |kernel| -> Result<&'static str> {
            ops::attention_backward(dev, [&dq, &dk, &dv], &q, &k, &v, &dout, s, causal, kernel)
        };
        for kernel in [AttnBackwardKernel::Auto, AttnBackwardKernel::Materialized] {
            let mut path = "";
            let ms = gpu_ms(dev, 3, runs, || {
                path = backward(kernel)?;
                Ok(())
            })?;
            if kernel == AttnBackwardKernel::Auto {
                auto += ms;
                torch = torch.zip(peer_ms("bwd_ms")).map(|(a, b)| a + b);
            } else {
                mat += ms;
            }
            rows.push(Row {
                what: format!("attention backward {label} ({path})"),
                ours_ms: ms,
                rate: format!("{:.1} TFLOP/s", 2.5 * fwd_flops / ms / 1e9),
                peer_ms: peer_ms("bwd_ms"),
            });
        }
        let mut names = (String::new(), "");
        let ms = gpu_ms(dev, 3, runs, || {
            let (out, q_, k_, v_) = (At::from(&o), At::from(&q), At::from(&k), At::from(&v));
            names.0 = if causal {
                ops::attention_causal(dev, out, q_, k_, v_, s)?;
                "scalar causal".into()
            } else {
                ops::attention(dev, out, q_, k_, v_, s, AttnKernel::Auto)?
            };
            names.1 = backward(AttnBackwardKernel::Auto)?;
            Ok(())
        })?;
        rows.push(Row {
            what: format!("attention fwd+bwd {label} ({} + {})", names.0, names.1),
            ours_ms: ms,
            rate: format!("{:.1} TFLOP/s", 3.5 * fwd_flops / ms / 1e9),
            peer_ms: peer_ms("fwd_bwd_ms"),
        });
    }
    let vs_torch = torch.map_or(String::new(), |t| {
        format!(", PyTorch SDPA backward {t:.3} ms ({:.2}x)", t / auto)
    });
    Ok(format!(
        "attention backward {}, all {} shapes: the backend's choice (flash where it applies) \
         {auto:.3} ms, materialised {mat:.3} ms ({:.2}x){vs_torch}",
        T::SUFFIX,
        shapes.len(),
        mat / auto
    ))
}
