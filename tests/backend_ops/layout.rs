//! Layout ops move values, so they are exact: the NCHW <-> tokens transpose (`conv.cu`), the
//! channel concatenation (device copies), nearest 2x upsampling (`elementwise.cu`) and
//! bottom-right padding (`conv.cu`).

use crate::harness::{Gen, OpCase, Tols};
use crate::target::Op;

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    let normal = |n| Gen::normal(n, 1.0);
    let bounded = |n| Gen::uniform(n, -2.0, 2.0);
    // SD-like shapes, then partial 32 x 32 tiles on both sides, several tiles, a single
    // column, and a whole tile.
    let shapes = [
        ((2, 48, 35), true),
        ((1, 320, 64), true),
        ((3, 1, 7), true),
        ((2, 320, 333), true),
        ((2, 5, 7), false),
        ((3, 33, 70), false),
        ((2, 40, 1), false),
        ((1, 32, 64), false),
    ];
    for ((b, c, hw), both_ways) in shapes {
        let n = b * c * hw;
        let g = if both_ways { normal(n) } else { bounded(n) };
        let ways: &[bool] = if both_ways { &[true, false] } else { &[true] };
        for &to_tokens in ways {
            v.push(
                OpCase::new(format!("transpose b{b} c{c} hw{hw} to_tokens {to_tokens}"))
                    .input(g.clone())
                    .tol(Tols::EXACT)
                    .work(n)
                    .run(move |t, i| {
                        t.op(
                            &Op::Transpose {
                                dims: (b, c, hw),
                                to_tokens,
                            },
                            i,
                        )
                    }),
            );
        }
        if both_ways {
            // There and back: the identity.
            v.push(
                OpCase::new(format!("transpose b{b} c{c} hw{hw} there and back"))
                    .input(g)
                    .tol(Tols::EXACT)
                    .work(2 * n)
                    .run(move |t, i| {
                        let dims = (b, c, hw);
                        let y = t.op(
                            &Op::Transpose {
                                dims,
                                to_tokens: true,
                            },
                            i,
                        )?;
                        t.op(
                            &Op::Transpose {
                                dims,
                                to_tokens: false,
                            },
                            &[y],
                        )
                    }),
            );
        }
    }
    for (b, ca, cb, hw) in [(2, 5, 7, 30), (1, 640, 320, 64)] {
        v.push(
            OpCase::new(format!("concat_channels b{b} {ca}+{cb} hw{hw}"))
                .input(normal(b * ca * hw))
                .input(normal(b * cb * hw))
                .tol(Tols::EXACT)
                .work(b * (ca + cb) * hw)
                .run(move |t, i| {
                    t.op(
                        &Op::ConcatChannels {
                            dims: (b, ca, cb, hw),
                        },
                        i,
                    )
                }),
        );
    }
    let up_shapes = [
        (6, 9, 11),
        (2, 1, 1),
        (256, 16, 16),
        (128, 16, 24),
        (3, 5, 7),
        (5, 16, 9),
    ];
    for (p, h, w) in up_shapes {
        v.push(
            OpCase::new(format!("upsample_nearest2x [{p}, {h}, {w}]"))
                .input(Gen::uniform(p * h * w, -3.0, 3.0))
                .tol(Tols::EXACT)
                .work(4 * p * h * w)
                .run(move |t, i| t.op(&Op::UpsampleNearest2x { dims: (p, h, w) }, i)),
        );
    }
    let pad_shapes = [
        (6, 9, 11),
        (2, 1, 1),
        (256, 16, 16),
        (3, 7, 5),
        (5, 17, 33),
        (1, 64, 63),
    ];
    for (p, h, w) in pad_shapes {
        v.push(
            OpCase::new(format!("pad_bottom_right [{p}, {h}, {w}]"))
                .input(bounded(p * h * w))
                .tol(Tols::EXACT)
                .work(p * (h + 1) * (w + 1))
                .run(move |t, i| t.op(&Op::PadBottomRight { dims: (p, h, w) }, i)),
        );
    }
    v
}
