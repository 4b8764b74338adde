//! `elementwise.cu`: activations, GEGLU, additions and biases, softmax, the timestep
//! embedding; and conv.cu's per-channel bias.

use hdb::backend::Activation;

use crate::harness::{Gen, OpCase, Tol, Tols};
use crate::target::Op;

/// Exact GELU's and quick GELU's inputs: the usual range, then the large negative tail (where
/// 1 + erf cancels) and large values.
fn activation_tails() -> Gen {
    Gen::Cat(vec![
        Gen::uniform(3000, -6.0, 6.0),
        Gen::uniform(500, -40.0, -5.0),
        Gen::Values(vec![
            -1e4, -300.0, -88.0, -20.0, -10.0, -5.5, 0.0, -0.0, 1e-3, 5.5, 20.0, 300.0, 1e4,
        ]),
        Gen::uniform(1000, 5.0, 40.0),
    ])
}

/// One rounding of the output: half an ulp of the type, relative (plus the f32 erf/exp
/// differences, a few f32 ulps); element by element too, since the tail values are tiny
/// (f16 flushes results below its subnormal range: its smallest step is allowed there). In
/// f32's negative tail the rounding of erfc's argument z = -x/sqrt(2) alone moves the result
/// by 2 z^2 ulps relative (1.0e-5 at x = -13, where GELU reaches f32's subnormals), on each
/// side: 4e-5 per element (1e-5 failed by chance at x = -11.6, off by 1.0e-5).
const TAILS: Tols = Tols::per(
    Tol {
        rel_l2: 1e-6,
        max_abs: 1e-5,
        elem: Some((4e-5, 1e-37)),
    },
    Tol {
        rel_l2: 1e-3,
        max_abs: 1e4 * 1e-3,
        elem: Some((1e-3, 6e-8)),
    },
    Tol {
        rel_l2: 8e-3,
        max_abs: 1e4 * 8e-3,
        elem: Some((8e-3, 1e-37)),
    },
);

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    let act = |act: Activation, name: String, x: Gen, n: usize, tol: Tols| {
        OpCase::new(format!("activate {act:?} {name}"))
            .input(x)
            .tol(tol)
            .work(n)
            .run(move |t, i| t.op(&Op::Activate(act), i))
    };
    for a in [Activation::Silu, Activation::Gelu, Activation::QuickGelu] {
        v.push(act(
            a,
            "n10007".into(),
            Gen::normal(10007, 3.0),
            10007,
            Tols::one_rounding(1e-6),
        ));
    }
    v.push(act(
        Activation::Silu,
        "n100003".into(),
        Gen::normal(100_003, 4.0),
        100_003,
        Tols::one_rounding(1e-6),
    ));
    for a in [Activation::Gelu, Activation::QuickGelu] {
        v.push(act(a, "tails".into(), activation_tails(), 4513, TAILS));
    }
    for n in [1, 1000] {
        let x = Gen::Cat(vec![
            Gen::uniform(n, -8.0, 8.0),
            Gen::Values(vec![-100.0, -20.0, -0.0, 0.0, 20.0, 100.0]),
        ]);
        v.push(act(
            Activation::Silu,
            format!("n{n} and extremes"),
            x,
            n + 6,
            Tols::rounding(2e-6, 100.0),
        ));
    }

    // GEGLU: the UNet's feed-forward widths; outputs not a multiple of the 256-thread block,
    // d odd, SD's 1280 with one row.
    for (rows, d, bounded) in [
        (100, 320, false),
        (333, 1280, false),
        (3, 5, true),
        (17, 77, true),
        (1, 1280, true),
    ] {
        let n = rows * 2 * d;
        let c = OpCase::new(format!(
            "geglu [{rows}, 2 x {d}]{}",
            if bounded { " bounded" } else { "" }
        ))
        .work(n)
        .run(move |t, i| t.op(&Op::Geglu { rows_d: (rows, d) }, i));
        // |x| <= 4, so |y| <= 16; erf in f32 on both sides, a few ulps apart.
        v.push(if bounded {
            c.input(Gen::uniform(n, -4.0, 4.0))
                .tol(Tols::rounding(2e-6, 16.0))
        } else {
            c.input(Gen::normal(n, 2.0)).tol(Tols::one_rounding(1e-6))
        });
    }

    // Additions: one f32 addition on both sides (exact in f32), then one rounding.
    let bounded_add = Tols::rounding(0.0, 8.0);
    for (n, bounded) in [
        (5003, false),
        (2 * 320 * 333, false),
        (1, true),
        (777, true),
    ] {
        let g = |n| {
            if bounded {
                Gen::uniform(n, -4.0, 4.0)
            } else {
                Gen::normal(n, 1.0)
            }
        };
        v.push(
            OpCase::new(format!("add n{n}"))
                .input(g(n))
                .input(g(n))
                .tol(if bounded {
                    bounded_add
                } else {
                    Tols::one_rounding(1e-7)
                })
                .work(n)
                .run(|t, i| t.op(&Op::Add, i)),
        );
    }
    for (b, c, hw, bounded) in [
        (2, 64, 50, false),
        (2, 320, 333, false),
        (2, 3, 5, true),
        (2, 7, 77, true),
        (1, 40, 1, true),
    ] {
        let g = |n| {
            if bounded {
                Gen::uniform(n, -4.0, 4.0)
            } else {
                Gen::normal(n, 1.0)
            }
        };
        let tol = if bounded {
            bounded_add
        } else {
            Tols::one_rounding(1e-7)
        };
        let what = format!("b{b} c{c} hw{hw}");
        v.push(
            OpCase::new(format!("add_channel_bias {what}"))
                .input(g(b * c * hw))
                .input(g(b * c))
                .tol(tol)
                .work(b * c * hw)
                .run(move |t, i| t.op(&Op::AddChannelBias { dims: (b, c, hw) }, i)),
        );
        // conv.cu's bias per channel, broadcast over the batch (conv2d's bias).
        v.push(
            OpCase::new(format!("add_bias_channels {what}"))
                .input(g(b * c * hw))
                .input(g(c))
                .tol(tol)
                .work(b * c * hw)
                .run(move |t, i| t.add_bias_channels(&i[0], &i[1], (b, c, hw))),
        );
    }
    // A bias per row's column (linear's bias), at an offset into y's buffer as the op's `At`
    // passes it (the elements before it must stay).
    for (rows, n, offset, bounded) in [
        (666, 320, 0, false),
        (1, 1, 3, true),
        (5, 77, 3, true),
        (3, 320, 3, true),
    ] {
        let g = |n| {
            if bounded {
                Gen::uniform(n, -4.0, 4.0)
            } else {
                Gen::normal(n, 1.0)
            }
        };
        v.push(
            OpCase::new(format!("add_bias_rows [{rows}, {n}] at {offset}"))
                .input(g(rows * n))
                .input(g(n))
                .tol(if bounded {
                    bounded_add
                } else {
                    Tols::one_rounding(1e-7)
                })
                .work(rows * n)
                .run(move |t, i| t.add_bias_rows(&i[0], &i[1], n, offset)),
        );
    }

    // Softmax of each row, in place: rows shorter than a warp, over a block's 8 warps (a
    // partial second block), long rows; probabilities <= 1, the CPU's exp its own (SIMD) one.
    for (rows, n, scale, bounded) in [
        (1000, 77, 5.0, false),
        (3, 5, 1.0, true),
        (17, 77, 4.0, true),
        (9, 300, 20.0, true),
        (1, 1, 1.0, true),
    ] {
        let c = OpCase::new(format!("softmax_rows [{rows}, {n}] x {scale}"))
            .work(rows * n)
            .run(move |t, i| t.softmax_rows(&i[0], rows, n));
        v.push(if bounded {
            c.input(Gen::uniform(rows * n, -scale, scale))
                .tol(Tols::rounding(2e-6, 1.0))
        } else {
            c.input(Gen::normal(rows * n, scale))
                .tol(Tols::one_rounding(1e-6))
        });
    }
    // Softmax of f32 scores into T (the materialised attention's), the scores not rounded to
    // T: large scores are where rounding them first would show.
    for (rows, n, scale) in [(3, 5, 1.0), (17, 77, 4.0), (9, 300, 40.0), (1, 1, 1.0)] {
        v.push(
            OpCase::new(format!("softmax_rows_from_f32 [{rows}, {n}] x {scale}"))
                .input(Gen::uniform(rows * n, -scale, scale).f32())
                .tol(Tols::per(
                    Tol::both(1e-6, 1e-6),
                    Tol::both(1e-3, 1e-3),
                    Tol::both(8e-3, 8e-3),
                ))
                .work(rows * n)
                .run(move |t, i| t.softmax_rows_from_f32(&i[0], rows, n)),
        );
    }

    // The timestep embedding of host f32 timesteps: SD 1.5's (flip, shift 0), diffusers'
    // default (no flip, shift 1), an odd dim (a zero last column) and one under a warp; SD's
    // range of timesteps, fractional ones (DPM-style schedules) and 0.
    let sd = vec![999.0, 1.0, 500.5, 0.0];
    let more = vec![0.0, 1.0, 17.5, 261.0, 500.25, 999.0, 3.0];
    for (t, dim, flip, shift, tol) in [
        (&sd, 320, true, 0.0, Tols::one_rounding(1e-6)),
        (&sd, 33, false, 1.0, Tols::one_rounding(1e-6)),
        (&more, 320, true, 0.0, Tols::rounding(1e-7, 1.0)),
        (&more, 320, false, 1.0, Tols::rounding(1e-7, 1.0)),
        (&more, 33, true, 0.0, Tols::rounding(1e-7, 1.0)),
        (&more, 33, false, 1.0, Tols::rounding(1e-7, 1.0)),
        (&more, 7, false, 0.0, Tols::rounding(1e-7, 1.0)),
    ] {
        v.push(
            OpCase::new(format!(
                "timestep_embedding n{} dim {dim} flip {flip} shift {shift}",
                t.len()
            ))
            .input(Gen::Values(t.clone()).f32())
            .tol(tol)
            .work(t.len() * dim)
            .run(move |tg, i| tg.op(&Op::TimestepEmbedding { dim, flip, shift }, i)),
        );
    }
    v
}
