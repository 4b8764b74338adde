//! Attention: the backend's choice (causal, fused, materialised), each kernel variant of
//! `attention.cu` asked for by name with its layouts, and the materialised path's chunks.

use hdb::backend::cuda::ops::AttnKernel;
use hdb::backend::AttnDims;

use crate::harness::{Gen, OpCase, Tol, Tols, ALL, BF16_ONLY, F16_ONLY, F32_ONLY, HALF};
use crate::target::{Op, QkvLayout};

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

fn name(op: &str, d: &AttnDims) -> String {
    format!(
        "{op} b{} h{} lq{} lk{} d{}",
        d.batch, d.heads, d.lq, d.lk, d.head_dim
    )
}

/// q, k, v: normal (scores of a few units), or uniform in [-1.5, 1.5] (v in [-1, 1]).
fn qkv(c: OpCase, d: &AttnDims, uniform: bool) -> OpCase {
    let hd = d.heads * d.head_dim;
    let (nq, nk) = (d.batch * d.lq * hd, d.batch * d.lk * hd);
    let work = 2 * d.batch * d.heads * d.lq * d.lk * d.head_dim;
    if uniform {
        c.input(Gen::uniform(nq, -1.5, 1.5))
            .input(Gen::uniform(nk, -1.5, 1.5))
            .input(Gen::uniform(nk, -1.0, 1.0))
            .work(work)
    } else {
        c.input(Gen::normal(nq, 1.0))
            .input(Gen::normal(nk, 1.0))
            .input(Gen::normal(nk, 1.0))
            .work(work)
    }
}

/// The scalar kernels: f32 throughout, one rounding of the output (|out| <= 1) to T.
const SCALAR: Tols = Tols::per(
    Tol::both(1e-5, 1e-5),
    Tol::both(1e-3, 2e-3),
    Tol::both(8e-3, 1.6e-2),
);

/// The tensor-core kernels on bounded inputs: P rounded to T before P v.
const FLASH_BOUNDED: Tols = Tols::per(Tol::EXACT, Tol::both(2e-3, 4e-3), Tol::both(1.2e-2, 3e-2));

/// A case of `ops::attention` with `kernel` asked for, `layout`, expecting a kernel whose
/// name starts with `expect`.
fn kernel_case(
    d: AttnDims,
    kernel: AttnKernel,
    layout: QkvLayout,
    expect: Option<String>,
    uniform: bool,
) -> OpCase {
    let op = match layout {
        QkvLayout::Dense => format!("attention {kernel:?}"),
        QkvLayout::Fused => format!("attention {kernel:?} qkv"),
        QkvLayout::StridedQ(ld) => format!("attention {kernel:?} ld_q {ld}"),
    };
    qkv(OpCase::new(name(&op, &d)), &d, uniform).run(move |t, i| {
        t.attention_kernel(&i[0], &i[1], &i[2], d, layout, kernel, expect.as_deref())
    })
}

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    let backend = |d: AttnDims, what: &str, uniform: bool| {
        qkv(
            OpCase::new(name(&format!("attention {what}"), &d)),
            &d,
            uniform,
        )
        .run(move |t, i| t.op(&Op::Attention(d), i))
    };

    // Through the backend: causal (the scalar kernel with a mask; P stays f32, only the output
    // is rounded): CLIP ViT-L/14's text encoder at batch 2, a row's keys past one chunk of 32,
    // head dims that are not multiples of 32, one token.
    for (b, len, h, d) in [(2, 77, 12, 64), (1, 40, 2, 33), (1, 5, 3, 24), (1, 1, 1, 8)] {
        let d = AttnDims {
            causal: true,
            ..dims(b, h, len, len, d)
        };
        v.push(backend(d, "causal", false).tol(Tols::one_rounding(1e-5)));
    }
    // ... short and long rows at head dims 16 and 64, and odd head dims with more than 32
    // keys a row beyond the first chunk.
    for (len, d) in [(7, 16), (77, 16), (7, 64), (77, 64)] {
        let d = AttnDims {
            causal: true,
            ..dims(2, 2, len, len, d)
        };
        v.push(backend(d, "causal", true).tol(SCALAR));
    }
    let d = AttnDims {
        causal: true,
        ..dims(1, 3, 40, 40, 24)
    };
    v.push(backend(d, "causal", true).tol(SCALAR).dtypes(F32_ONLY));
    // Non-causal, head dim <= 256: the tensor-core kernels for f16/bf16 at 40/64/80/160, the
    // scalar kernel for other head dims; f32 through the materialised path.
    for (b, lq, lk, h, d) in [
        (2, 256, 256, 8, 40),
        (2, 256, 77, 8, 80),
        (1, 64, 77, 4, 160),
        (2, 128, 128, 5, 64),
        (1, 33, 17, 3, 24),
        (1, 20, 9, 1, 256),
    ] {
        v.push(backend(dims(b, h, lq, lk, d), "", false).tol(Tols::FLASH));
    }
    // Head dim > 256: the materialised path (f32 scores; only P rounded to T). The VAE's
    // mid-block attention (1 head, d 512) at 16 x 16 latents, then several heads (interleaved
    // column blocks in one output row), batch 2, lq != lk.
    for (b, lq, lk, h, d) in [
        (1, 256, 256, 1, 512),
        (2, 100, 70, 2, 320),
        (1, 3, 1, 1, 264),
    ] {
        v.push(backend(dims(b, h, lq, lk, d), "", false).tol(Tols::FLASH));
    }

    // The scalar kernel asked for: any type, any head dim up to 256, lq != lk.
    let scalar = |d: AttnDims, layout, uniform| {
        kernel_case(
            d,
            AttnKernel::Scalar,
            layout,
            Some("attention_scalar_".into()),
            uniform,
        )
    };
    for (b, h, lq, lk, d) in [
        (2, 8, 256, 256, 40),
        (2, 8, 250, 77, 40),
        (1, 5, 64, 64, 64),
        (2, 8, 64, 77, 160),
        (1, 3, 33, 17, 24),
    ] {
        v.push(
            scalar(dims(b, h, lq, lk, d), QkvLayout::Dense, false).tol(Tols::one_rounding(1e-5)),
        );
    }
    v.push(
        scalar(dims(2, 8, 128, 128, 40), QkvLayout::Fused, false)
            .tol(Tols::one_rounding(1e-5))
            .dtypes(F32_ONLY),
    );
    // Query rows not a multiple of the block's 4 warps, more than 32 keys and a partial
    // chunk, fewer keys than a warp.
    for d in [24, 40, 64, 160] {
        v.push(scalar(dims(2, 2, 7, 77, d), QkvLayout::Dense, true).tol(SCALAR));
    }
    v.push(
        scalar(dims(1, 3, 45, 5, 40), QkvLayout::Dense, true)
            .tol(SCALAR)
            .dtypes(F32_ONLY),
    );
    v.push(
        scalar(dims(1, 1, 1, 40, 24), QkvLayout::Dense, true)
            .tol(SCALAR)
            .dtypes(F16_ONLY),
    );

    // Each tensor-core variant by name, on partial query and key tiles (lq 70 of 64-row
    // tiles, lk 77 of 64- or 32-key tiles), every head dim of flash_attn_* (d160: 32-key
    // tiles), more than two key tiles (the double buffer wraps) and a single short one. These
    // also cross-check the kernel emulation's mma.sync, ldmatrix and cp.async.
    for (kernel, stem, lq, lk, d) in [
        (AttnKernel::Flash1, "flash_attn", 70, 77, 40),
        (AttnKernel::Flash1, "flash_attn", 20, 77, 64),
        (AttnKernel::Flash1, "flash_attn", 20, 77, 80),
        (AttnKernel::Flash1, "flash_attn", 20, 77, 160),
        (AttnKernel::Flash2, "flash2_attn", 70, 77, 40),
        (AttnKernel::Flash2, "flash2_attn", 70, 77, 80),
        (AttnKernel::Flash2, "flash2_attn", 33, 77, 160),
        (AttnKernel::Flash3, "flash3_attn", 150, 77, 40),
        (AttnKernel::Flash2, "flash2_attn", 20, 200, 64),
        (AttnKernel::Flash3, "flash3_attn", 20, 150, 40),
        (AttnKernel::Flash3, "flash3_attn", 5, 3, 40),
    ] {
        let expect = Some(format!("{stem}_d{d}_"));
        v.push(
            kernel_case(
                dims(1, 2, lq, lk, d),
                kernel,
                QkvLayout::Dense,
                expect,
                true,
            )
            .dtypes(HALF)
            .tol(FLASH_BOUNDED),
        );
    }
    // Every variant at SD 1.5's head dims (40, 80, 160) and 64: self-attention,
    // cross-attention with 77 keys, lengths that are not multiples of the tiles. Auto is
    // flash3_attn_* (d 40) or flash2_attn_* here (dense rows are 16-byte aligned).
    for (b, h, lq, lk, d) in [
        (2, 8, 1024, 1024, 40),
        (2, 8, 1024, 77, 40),
        (2, 8, 256, 256, 80),
        (2, 8, 256, 77, 80),
        (2, 8, 64, 64, 160),
        (2, 8, 64, 77, 160),
        (1, 4, 200, 130, 64),
        (1, 2, 5, 3, 40),
    ] {
        for kernel in [
            AttnKernel::Auto,
            AttnKernel::Flash1,
            AttnKernel::Flash2,
            AttnKernel::Flash3,
        ] {
            v.push(
                kernel_case(dims(b, h, lq, lk, d), kernel, QkvLayout::Dense, None, false)
                    .dtypes(HALF)
                    .tol(Tols::FLASH),
            );
        }
    }
    // A fused qkv buffer (each of q, k, v at an offset of a row of 3 heads * d).
    for d in [40, 80] {
        for kernel in [AttnKernel::Auto, AttnKernel::Flash3] {
            v.push(
                kernel_case(
                    dims(2, 8, 320, 320, d),
                    kernel,
                    QkvLayout::Fused,
                    None,
                    false,
                )
                .dtypes(F16_ONLY)
                .tol(Tols::FLASH),
            );
        }
    }
    // A row stride that is not a multiple of 8 elements: Auto falls back to flash_attn_*.
    v.push(
        kernel_case(
            dims(1, 8, 100, 100, 40),
            AttnKernel::Auto,
            QkvLayout::StridedQ(8 * 40 + 4),
            Some("flash_attn_d40_".into()),
            false,
        )
        .dtypes(BF16_ONLY)
        .tol(Tols::FLASH),
    );

    // The materialised path in chunks: head dims above the fused kernels' 256 (the VAE's
    // 512), several heads, lq != lk, and chunks of one row, of rows that do not divide lq,
    // and one chunk for every row.
    for (b, h, lq, lk, d) in [(2, 2, 37, 29, 264), (1, 1, 100, 64, 512)] {
        for chunk in [1, 7, lq] {
            let dd = dims(b, h, lq, lk, d);
            v.push(
                qkv(
                    OpCase::new(format!(
                        "{} chunk {chunk}",
                        name("attention materialised", &dd)
                    )),
                    &dd,
                    false,
                )
                .dtypes(ALL)
                .tol(Tols::FLASH)
                .run(move |t, i| t.attention_materialized(&i[0], &i[1], &i[2], dd, chunk)),
            );
        }
    }
    v
}
