//! Attention's backward pass: through the backend (f32 and other head dims: the materialised
//! path, cuBLAS around `attention_backward_rows_*`; f16/bf16 at head dims 40, 64, 80, 160: the
//! flash kernels `flash_attn_bwd_*`), the materialised path with the query chunks forced small,
//! the flash kernels with the key kernel's query tiles split as asked, and the row kernel
//! alone. The kernel emulation runs the flash rows and the row kernel's (the materialised GEMM
//! plan is checked on the host by the library's `attention_backward` tests and, with the
//! kernels, by the emulated GPU).
//!
//! Tolerances: in f32 every step is f32 with f32 accumulation (the CPU's dot products in
//! f64): 1e-5 relative L2 (the emulated GPU measured at most 8.5e-7). In f16 and bf16, P and
//! dS are rounded to T before the products that read them (dV = P^T dO, dQ = scale dS K,
//! dK = scale dS^T Q), as the forward rounds P before P V, and dq, dk, dv once more at the
//! end, on both paths (the flash kernels' S, dP and accumulators are f32 too): 1.5e-3 (f16) and
//! 1.2e-2 (bf16) on the relative L2 error of each gradient (the emulated GPU and the kernel
//! emulation measured up to 4.9e-4 and 3.4e-3 over a few seeds on either path, the largest on
//! the smallest rows, one query over 5 keys: a real GPU's products round more than its double
//! sums).

use hdb::backend::AttnDims;

use crate::harness::{Gen, OpCase, Out, Tol, Tols, ALL, HALF};
use crate::target::Op;

const BACKWARD: Tols = Tols::per(Tol::rel(1e-5), Tol::rel(1.5e-3), Tol::rel(1.2e-2));

fn dims(batch: usize, heads: usize, lq: usize, lk: usize, head_dim: usize) -> AttnDims {
    AttnDims {
        batch,
        lq,
        lk,
        heads,
        head_dim,
        causal: false,
    }
}

fn causal(batch: usize, heads: usize, len: usize, head_dim: usize) -> AttnDims {
    AttnDims {
        causal: true,
        ..dims(batch, heads, len, len, head_dim)
    }
}

fn name(op: &str, d: &AttnDims) -> String {
    format!(
        "{op}{} b{} h{} lq{} lk{} d{}",
        if d.causal { " causal" } else { "" },
        d.batch,
        d.heads,
        d.lq,
        d.lk,
        d.head_dim
    )
}

/// q, k, v, dout normal; the work is the five GEMMs' multiply-adds.
fn inputs(c: OpCase, d: &AttnDims) -> OpCase {
    let hd = d.heads * d.head_dim;
    let (nq, nk) = (d.batch * d.lq * hd, d.batch * d.lk * hd);
    c.input(Gen::normal(nq, 1.0))
        .input(Gen::normal(nk, 1.0))
        .input(Gen::normal(nk, 1.0))
        .input(Gen::normal(nq, 1.0))
        .work(5 * d.batch * d.heads * d.lq * d.lk * d.head_dim)
}

/// dq | dk | dv as three outputs.
fn split(all: Vec<f32>, d: &AttnDims) -> Out {
    let hd = d.heads * d.head_dim;
    let (nq, nk) = (d.batch * d.lq * hd, d.batch * d.lk * hd);
    vec![
        all[..nq].to_vec(),
        all[nq..nq + nk].to_vec(),
        all[nq + nk..].to_vec(),
    ]
}

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    // Through the backend. SD 1.5's kinds: self-attention (8 heads at d 40, 80, 160: the
    // 320, 640 and 1280 channel blocks) at 16 x 16 and 8 x 8 latents, cross-attention over
    // 77 text tokens, a long self-attention at 64 x 64 (4096 tokens, 16 chunks of 256 rows: a
    // real GPU's) and a long cross one at 32 x 32; CLIP's causal self-attention (12 heads of
    // 64 over 77 tokens, batch 2), odd head dims and lengths, d 64 and the VAE's 512.
    let shapes = [
        dims(2, 2, 33, 33, 40),
        dims(1, 8, 256, 256, 40),
        dims(1, 8, 64, 64, 80),
        dims(1, 8, 64, 64, 160),
        dims(1, 8, 256, 77, 40),
        dims(1, 8, 64, 77, 80),
        dims(1, 8, 64, 77, 160),
        dims(1, 8, 1024, 77, 80),
        dims(1, 8, 4096, 4096, 40),
        dims(1, 1, 1024, 1024, 40),
        dims(2, 5, 40, 24, 64),
        dims(1, 3, 17, 9, 24),
        dims(1, 1, 64, 64, 512),
        causal(2, 12, 77, 64),
        causal(1, 2, 40, 33),
        causal(1, 3, 5, 24),
        causal(1, 1, 1, 8),
    ];
    for d in shapes {
        v.push(
            inputs(OpCase::new(name("attention_backward", &d)), &d)
                .tol(BACKWARD)
                .run_outputs(move |t, i| Ok(split(t.op(&Op::AttentionBackward(d), i)?, &d))),
        );
    }
    // Chunks of query rows (ops::attention_backward_with): one row a chunk, chunks that do
    // not divide lq (the accumulation of dk and dv over chunks), causal in chunks (the mask's
    // offset), SD 1.5's cross-attention in chunks of 100.
    for (d, rows) in [
        (dims(2, 3, 11, 7, 5), 1),
        (dims(2, 3, 11, 7, 5), 4),
        (causal(1, 2, 77, 64), 10),
        (dims(1, 8, 256, 77, 40), 100),
    ] {
        v.push(
            inputs(
                OpCase::new(format!(
                    "{} chunks of {rows}",
                    name("attention_backward_with", &d)
                )),
                &d,
            )
            .tol(BACKWARD)
            .run_outputs(move |t, i| Ok(split(t.attention_backward_with(i, d, rows)?, &d))),
        );
    }
    // The flash kernels (f16, bf16: `flash_attn_bwd_*`) at shapes the kernel emulation runs:
    // lq and lk off the 64- (d 160: 32-) row tiles, SD's 77 text tokens, one query row, causal,
    // every head dim, several heads and batch elements (the head's columns, the statistics'
    // rows), and the key kernel's query tiles in one split, several, and the heuristic's; then
    // SD-sized ones for a real GPU (cross-attention at 64 x 64 latents, where the heuristic
    // splits; the other SD shapes above take the flash path through the backend in f16 and
    // bf16).
    for (d, splits) in [
        (dims(1, 1, 70, 77, 40), Some(1)),
        (dims(1, 1, 70, 77, 40), Some(2)),
        (dims(1, 1, 64, 64, 64), None),
        (dims(2, 1, 33, 20, 80), None),
        (dims(1, 1, 40, 45, 160), Some(2)),
        (dims(1, 1, 130, 9, 64), Some(3)),
        (dims(1, 1, 1, 5, 40), None),
        (causal(1, 1, 77, 64), Some(1)),
        (causal(1, 1, 77, 64), None),
        (causal(1, 1, 70, 40), Some(2)),
        (causal(1, 1, 45, 160), None),
        (dims(2, 2, 70, 20, 40), Some(2)),
        (causal(2, 2, 33, 64), None),
        (dims(2, 8, 4096, 77, 40), None),
        (dims(1, 8, 1024, 77, 80), Some(1)),
    ] {
        v.push(
            inputs(
                OpCase::new(format!(
                    "{} splits {}",
                    name("attention_backward_flash", &d),
                    splits.map_or("auto".to_string(), |n| n.to_string())
                )),
                &d,
            )
            .dtypes(HALF)
            .tol(BACKWARD)
            .run_outputs(move |t, i| Ok(split(t.attention_backward_flash(i, d, splits)?, &d))),
        );
    }
    // The row kernel alone (f32 scores and dP of a few units): rows not a multiple of the
    // block's 8 warps, rows of one key, of fewer and more keys than a warp's 32 lanes, a
    // long row; causal with the chunk starting at query q0 (each head's rows are queries q0,
    // q0 + 1, ...). P in [0, 1] and dS rounded once to T.
    for (heads, rows, lk, q0, causal) in [
        (2, 5, 77, 0, false),
        (3, 3, 1, 0, false),
        (1, 9, 20, 0, false),
        (1, 2, 4096, 0, false),
        (2, 4, 9, 3, true),
        (3, 11, 77, 66, true),
        (1, 40, 40, 0, true),
    ] {
        let n = heads * rows * lk;
        v.push(
            OpCase::new(format!(
                "attention_backward_rows heads {heads} rows {rows} lk {lk} q0 {q0}{}",
                if causal { " causal" } else { "" }
            ))
            .dtypes(ALL)
            .input(Gen::normal(n, 2.0).f32())
            .input(Gen::normal(n, 1.0).f32())
            .tol(Tols::one_rounding(1e-5))
            .work(4 * n)
            .run_outputs(move |t, i| t.attention_backward_rows(&i[0], &i[1], lk, rows, q0, causal)),
        );
    }
    v
}
