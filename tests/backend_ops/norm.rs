//! Group norm (+ SiLU) and layer norm: `norm.cu`, through the backend and with the split
//! pair's chunk count chosen.

use hdb::backend::NormDims;

use crate::harness::{Gen, OpCase, Tols, F32_ONLY};
use crate::target::Op;

fn nd(batch: usize, channels: usize, hw: usize, groups: usize, eps: f32) -> NormDims {
    NormDims {
        batch,
        channels,
        hw,
        groups,
        eps,
    }
}

fn gn_name(op: &str, d: &NormDims, silu: bool) -> String {
    format!(
        "{op}{} b{} c{} hw{} g{} eps {:e}",
        if silu { "_silu" } else { "" },
        d.batch,
        d.channels,
        d.hw,
        d.groups,
        d.eps
    )
}

/// x with a mean away from 0 (so the centring matters), gamma and beta: normal (x 2 sigma +
/// 0.5, gamma 1, beta `beta`) or bounded (x in [-1, 3], gamma in [0.5, 1.5], beta in
/// [-0.5, 0.5]).
fn gn_inputs(c: OpCase, n: usize, channels: usize, bounded: bool, beta: f32) -> OpCase {
    let c = if bounded {
        c.input(Gen::uniform(n, -1.0, 3.0))
            .input(Gen::uniform(channels, 0.5, 1.5))
            .input(Gen::uniform(channels, -0.5, 0.5))
    } else {
        c.input(Gen::Normal {
            n,
            scale: 2.0,
            offset: 0.5,
        })
        .input(Gen::normal(channels, 1.0))
        .input(Gen::normal(channels, beta))
    };
    c.work(2 * n)
}

/// Bounded inputs: |x_hat| < 2.5, gamma < 1.5, so |y| < 4.5; f32 statistics against the
/// CPU's f64 ones: a few f32 ulps.
fn bounded_tol() -> Tols {
    Tols::rounding(4e-6, 4.5)
}

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    // Through the backend (the heuristic's split): 32 groups of 2 channels, and 3 groups of 4
    // channels over an odd hw with a smaller eps.
    for d in [nd(2, 64, 100, 32, 1e-5), nd(1, 12, 33, 3, 1e-6)] {
        for silu in [false, true] {
            let n = d.batch * d.channels * d.hw;
            v.push(
                gn_inputs(
                    OpCase::new(gn_name("group_norm", &d, silu)),
                    n,
                    d.channels,
                    false,
                    0.5,
                )
                .tol(Tols::one_rounding(1e-5))
                .run(move |t, i| t.op(&Op::GroupNorm { d, silu }, i)),
            );
        }
    }
    // ops::group_norm at SD 1.5's UNet shape at 32x32 (64 runs of 10 x 1024), then the VAE
    // decoder's at 128 x 128 with batch 1 (32 runs of 4 x 16384: the split pair,
    // ops::group_norm_chunks); and in place (y = x), as the UNet uses it.
    for d in [nd(2, 320, 1024, 32, 1e-5), nd(1, 128, 16384, 32, 1e-5)] {
        let n = d.batch * d.channels * d.hw;
        for (silu, in_place) in [(false, false), (true, false), (true, true)] {
            let name = format!(
                "{}{}",
                gn_name("group_norm_with", &d, silu),
                if in_place { " in place" } else { "" }
            );
            v.push(
                gn_inputs(OpCase::new(name), n, d.channels, false, 1.0)
                    .tol(Tols::one_rounding(1e-5))
                    .run(move |t, i| {
                        t.group_norm_with(&i[0], &i[1], &i[2], d, silu, None, in_place)
                    }),
            );
        }
    }
    // One block a run (chunks 1): groups of several channels; a run under the 512-thread
    // block (4 x 77), over it and not a multiple (16 x 45 = 720, 4 x 1000), one channel a
    // group, and hw 1. Then the split pair: chunks that divide the run (4 x 1000 in 4), that
    // do not (720 in 7), chunks past the end (5 elements in 3 chunks: some are empty; 2 in 7),
    // and 4 x 2 in 2. (Not one element a run: its variance is 0, rstd = 1/sqrt(eps), and the
    // CPU's scale-and-shift form then rounds differently from x - mean = 0 by ~1e-4.)
    let one_block = [
        (2, 32, 77, 8),
        (1, 64, 45, 4),
        (2, 12, 1000, 3),
        (1, 6, 5, 6),
        (3, 8, 1, 2),
    ];
    let split = [
        ((2, 12, 1000, 3), 4),
        ((1, 64, 45, 4), 7),
        ((1, 6, 5, 6), 3),
        ((2, 10, 1, 2), 7),
        ((3, 8, 2, 4), 2),
    ];
    for ((b, c, hw, g), chunks) in one_block.iter().map(|&s| (s, 1)).chain(split) {
        let d = nd(b, c, hw, g, 1e-5);
        for silu in [false, true] {
            let name = format!("{} chunks {chunks}", gn_name("group_norm_with", &d, silu));
            v.push(
                gn_inputs(OpCase::new(name), b * c * hw, c, true, 0.0)
                    .tol(bounded_tol())
                    .run(move |t, i| {
                        t.group_norm_with(&i[0], &i[1], &i[2], d, silu, Some(chunks), false)
                    }),
            );
        }
    }

    // Layer norm: CLIP's width at batch 2 (154 rows), odd sizes, a long one.
    for (rows, dim, scale) in [(154, 768, 2.0), (7, 33, 2.0), (777, 320, 3.0)] {
        v.push(
            OpCase::new(format!("layer_norm [{rows}, {dim}]"))
                .input(Gen::normal(rows * dim, scale))
                .input(Gen::normal(dim, 1.0))
                .input(Gen::normal(dim, 0.5))
                .tol(Tols::one_rounding(1e-5))
                .work(2 * rows * dim)
                .run(move |t, i| {
                    t.op(
                        &Op::LayerNorm {
                            rows_dim: (rows, dim),
                            eps: 1e-5,
                        },
                        i,
                    )
                }),
        );
    }
    // SD 1.5's transformer widths, CLIP's 768 and an odd one; 9 rows: a block of 8 warps and
    // a second block with one. And one row of 5.
    for (rows, dim) in [(9, 320), (9, 768), (9, 1280), (9, 77), (1, 5)] {
        let c = OpCase::new(format!("layer_norm [{rows}, {dim}] bounded"))
            .input(Gen::uniform(rows * dim, -1.0, 3.0))
            .input(Gen::uniform(dim, 0.5, 1.5))
            .input(Gen::uniform(dim, -0.5, 0.5))
            .tol(bounded_tol())
            .work(2 * rows * dim)
            .run(move |t, i| {
                t.op(
                    &Op::LayerNorm {
                        rows_dim: (rows, dim),
                        eps: 1e-5,
                    },
                    i,
                )
            });
        v.push(if rows == 1 { c.dtypes(F32_ONLY) } else { c });
    }
    v
}
