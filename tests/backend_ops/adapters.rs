//! The adapter kernels against f64 references of the math in their headers: LiDB compose and
//! merge (`lidb.cu`), multi-identity LoRA (`lora.cu`).

use hdb::backend::cuda::ops::BgmvShape;

use crate::harness::{Gen, OpCase, OpError, Tol, Tols, F32_ONLY};
use crate::target::{Bgmv, MergeSpec};

fn compose(
    layers: Vec<(usize, usize)>,
    (r, a, b): (usize, usize, usize),
    alpha: f32,
    bounded: bool,
) -> OpCase {
    let mut c = OpCase::new(format!(
        "lidb_compose layers {layers:?} r {r} a {a} b {b} alpha {alpha}"
    ))
    .dtypes(F32_ONLY);
    let mut work = 0;
    for &(din, dout) in &layers {
        let g = |n, s: f32| {
            if bounded {
                Gen::uniform(n, -1.0, 1.0).f32()
            } else {
                Gen::normal(n, s).f32()
            }
        };
        c = c
            .input(g(r * a, 0.1))
            .input(g(b * r, 0.1))
            .input(g(a * din, 1.0))
            .input(g(dout * b, 1.0));
        work += r * a * din + dout * b * r;
    }
    // Sums of a (or b) f32 products: |result| ~ sqrt(a), f32 accumulation error a few ulps of
    // the partial sums. With bounded inputs that is an absolute bound: an output of a single
    // element (the (77, 1) layer's up factor at r 1) can cancel to near zero, where any
    // relative bound fails by chance (seen: 1.99e-7 off a result of 8.6e-3, rel 2.3e-5).
    let tol = if bounded {
        Tol::both(f64::INFINITY, 1e-5)
    } else {
        Tol::rel(1e-5)
    };
    c.tol(Tols::per(tol, tol, tol))
        .work(work)
        .run_outputs(move |t, i| t.lidb_compose(i, &layers, (r, a, b), alpha))
}

fn merge(name: String, specs: Vec<MergeSpec>, bounded: bool) -> OpCase {
    let mut c = OpCase::new(name);
    let mut tols = Vec::new();
    let mut work = 0;
    for s in &specs {
        c = c.input(if bounded {
            Gen::uniform(s.dout * s.din, -1.0, 1.0)
        } else {
            Gen::normal(s.dout * s.din, 0.05)
        });
        for &(rank, _) in &s.factors {
            let g = |n| {
                if bounded {
                    Gen::uniform(n, -0.5, 0.5).f32()
                } else {
                    Gen::normal(n, 0.1).f32()
                }
            };
            c = c.input(g(rank * s.din)).input(g(s.dout * rank));
        }
        work += s.dout * s.din * s.rank().max(1);
        // No factors, or more than MERGE_MAX_RANK (256) ranks in all: W_base copied bit for
        // bit. Else f32 accumulation of the products, then one rounding of |W| < 4.
        tols.push(if s.rank() == 0 || s.rank() > 256 {
            Tols::EXACT
        } else if bounded {
            Tols::rounding(1e-6, 4.0)
        } else {
            Tols::one_rounding(1e-6)
        });
    }
    c.tols(tols)
        .work(work)
        .run_outputs(move |t, i| t.lidb_merge(i, &specs))
}

fn bgmv(c: Bgmv, bounded: bool) -> OpCase {
    let s = c.shape;
    let mut case = OpCase::new(format!(
        "lora_bgmv {}->{} (ld {}, {}) {} rows of {} a sample, ranks {:?}",
        s.din, s.dout, s.ld_x, s.ld_y, s.rows, s.rows_per_sample, c.ranks
    ));
    let g = |n, lo: f32| {
        if bounded {
            Gen::uniform(n, -lo, lo)
        } else {
            Gen::normal(n, lo)
        }
    };
    case = case
        .input(g(s.rows * s.ld_x, 1.0))
        .input(g(s.rows * s.ld_y, 1.0));
    let mut work = 0;
    for &r in &c.ranks {
        let f = if bounded { 0.5 } else { 0.1 };
        case = case
            .input(g(r * s.din, f).f32())
            .input(g(s.dout * r, f).f32());
        work += s.rows_per_sample * (s.din + s.dout) * r;
    }
    let tol = if bounded {
        Tols::per(
            Tol::both(1e-6, 1e-5),
            Tol::both(1e-3, 8e-3),
            Tol::both(8e-3, 4e-2),
        )
    } else {
        Tols::one_rounding(1e-6)
    };
    case.tol(tol).work(work).run(move |t, i| {
        let y = t.lora_bgmv(i, &c)?;
        // Samples without an adapter, and the columns past dout, are untouched bit for bit.
        let y0 = &i[1];
        for (k, (a, b)) in y.iter().zip(y0).enumerate() {
            let (row, col) = (k / s.ld_y, k % s.ld_y);
            let updated = col < s.dout && c.index[row / s.rows_per_sample] >= 0;
            if !updated && a.to_bits() != b.to_bits() {
                return Err(OpError::Check(format!(
                    "lora_bgmv changed element {k} (row {row}, column {col}) it must not touch: \
                     {a} (was {b})"
                )));
            }
        }
        Ok(y)
    })
}

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    // Compose: HyperDreamBooth's a 100, b 50 at rank 2 on SD's projection shapes; a layer
    // with fewer outputs than the grid's blocks, a wide one (320 x 320, several blocks), tiny
    // ones, at r 1, and r 3 with small a and b.
    v.push(compose(
        vec![(320, 320), (768, 320), (1280, 640), (40, 24)],
        (2, 100, 50),
        1.5,
        false,
    ));
    let layers = vec![(40, 24), (320, 320), (5, 3), (77, 1)];
    v.push(compose(layers.clone(), (1, 100, 50), 0.8, true));
    v.push(compose(layers, (3, 7, 5), -1.5, true));

    // Merge: SD's shapes and an odd one, with no factors (the pristine base, bit for bit),
    // one, and three of mixed ranks (1, 4, 16).
    for n in [0usize, 1, 3] {
        let specs = [(320, 320), (768, 640), (1280, 1280), (37, 13)]
            .iter()
            .map(|&(din, dout)| MergeSpec {
                dout,
                din,
                factors: (0..n)
                    .map(|f| ([1, 4, 16][f % 3], 0.5 + f as f32 * 0.25))
                    .collect(),
                offset: 0,
            })
            .collect();
        v.push(merge(
            format!("lidb_merge SD shapes, {n} factors"),
            specs,
            false,
        ));
    }
    // The 8-wide path with two factors (their ranks concatenated); the scalar path (din odd)
    // over 70 rows (three 32-row blocks, the last one partial); no factors (a copy); din % 8
    // == 0 but W_base and W misaligned (the scalar path) at rank 17; over MERGE_MAX_RANK in
    // all (the host refuses it): copied unchanged.
    let spec = |dout, din, factors: &[(usize, f32)], offset| MergeSpec {
        dout,
        din,
        factors: factors.to_vec(),
        offset,
    };
    v.push(merge(
        "lidb_merge paths".into(),
        vec![
            spec(40, 24, &[(3, 0.75), (5, -1.5)], 0),
            spec(70, 37, &[(4, 1.0)], 0),
            spec(9, 16, &[], 0),
            spec(33, 40, &[(17, 0.5)], 1),
            spec(5, 8, &[(200, 1.0), (60, 1.0)], 0),
        ],
        true,
    ));

    // Multi-identity LoRA: four samples of 77 rows, one without an adapter, ranks up to 128,
    // on the 8-wide path (SD shapes) and the element path (din, dout not multiples of 8).
    for (din, dout) in [(320, 640), (37, 13)] {
        v.push(bgmv(
            Bgmv {
                shape: BgmvShape {
                    rows: 4 * 77,
                    rows_per_sample: 77,
                    din,
                    dout,
                    ld_x: din,
                    ld_y: dout,
                },
                ranks: vec![1, 4, 128],
                scales: vec![1.0, 0.7, 0.4],
                index: vec![2, -1, 0, 1],
            },
            false,
        ));
    }
    // ... and strided rows: 16-byte rows (the vector path), odd ones (element by element);
    // four samples of 7 rows, the last one 5 rows long.
    for (din, ld_x, dout, ld_y) in [(40, 40, 24, 24), (37, 45, 19, 21), (64, 72, 40, 48)] {
        v.push(bgmv(
            Bgmv {
                shape: BgmvShape {
                    rows: 26,
                    rows_per_sample: 7,
                    din,
                    dout,
                    ld_x,
                    ld_y,
                },
                ranks: vec![1, 4, 17],
                scales: vec![0.75, -1.25, 2.0],
                index: vec![2, -1, 0, 1],
            },
            true,
        ));
    }
    v
}
