//! LiDB and multi-identity LoRA kernels (kernels/lidb.cu, kernels/lora.cu) against f64
//! references.

use half::{bf16, f16};
use hdb::backend::cuda::ops;

use crate::harness::{check, rand_vec, tol_for, Elem, Job, Tol};

// ---------------------------------------------------------------------------------------------
// Multi-identity LoRA (lora_bgmv_*): ran on an H100; here for kernel edits without a GPU.
// ---------------------------------------------------------------------------------------------

impl Job {
    /// Marks the u64 at byte `off` of the buffer at `buf` as a device address stored in memory.
    fn relocate(&mut self, buf: u64, off: usize) {
        self.script += &format!("relocate {} {off}\n", (buf >> 40) - 1);
    }
}

fn lora_case<T: Elem>(din: usize, ld_x: usize, dout: usize, ld_y: usize) {
    // Three adapters (ranks 1, 4 and 17), four samples of 7 rows (the last one 5 rows long);
    // sample 1 has no adapter.
    let ranks = [1usize, 4, 17];
    let sample_adapter: [i32; 4] = [2, -1, 0, 1];
    let (rps, rows) = (7, 26);
    let what = format!(
        "lora_bgmv_{} din {din} (ld {ld_x}) dout {dout} (ld {ld_y})",
        T::SUFFIX
    );
    let x = T::round(&rand_vec(rows * ld_x, din as u64, -1.0, 1.0));
    let y0 = T::round(&rand_vec(rows * ld_y, dout as u64 + 1, -1.0, 1.0));
    let downs: Vec<Vec<f32>> = ranks
        .iter()
        .enumerate()
        .map(|(a, &r)| rand_vec(r * din, 10 + a as u64, -0.5, 0.5))
        .collect();
    let ups: Vec<Vec<f32>> = ranks
        .iter()
        .enumerate()
        .map(|(a, &r)| rand_vec(dout * r, 20 + a as u64, -0.5, 0.5))
        .collect();
    let scales = [0.75f32, -1.25, 2.0];
    // f64 reference: y_i + scale * up (down x_i), rounded once.
    let mut want = y0.clone();
    for i in 0..rows {
        let a = sample_adapter[i / rps];
        if a < 0 {
            continue;
        }
        let a = a as usize;
        let r = ranks[a];
        let t: Vec<f64> = (0..r)
            .map(|j| {
                (0..din)
                    .map(|c| downs[a][j * din + c] as f64 * x[i * ld_x + c] as f64)
                    .sum::<f64>()
                    * scales[a] as f64
            })
            .collect();
        for o in 0..dout {
            let u: f64 = (0..r).map(|j| ups[a][o * r + j] as f64 * t[j]).sum();
            want[i * ld_y + o] = (want[i * ld_y + o] as f64 + u) as f32;
        }
    }

    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ya = job.input(&T::bytes(&y0));
    let sa = job.input(
        &sample_adapter
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let mut table = Vec::new();
    for a in 0..ranks.len() {
        let da = job.input(&f32::bytes(&downs[a]));
        let ua = job.input(&f32::bytes(&ups[a]));
        // hdb_lora_factor: down, up (device addresses), rank, scale: 24 bytes.
        table.extend(da.to_le_bytes());
        table.extend(ua.to_le_bytes());
        table.extend((ranks[a] as i32).to_le_bytes());
        table.extend(scales[a].to_le_bytes());
    }
    assert_eq!(
        table.len(),
        ranks.len() * std::mem::size_of::<ops::Factor>()
    );
    let fa = job.input(&table);
    for a in 0..ranks.len() {
        job.relocate(fa, 24 * a);
        job.relocate(fa, 24 * a + 8);
    }
    let s = ops::BgmvShape {
        rows,
        rows_per_sample: rps,
        din,
        dout,
        ld_x,
        ld_y,
    };
    job.launch(
        &ops::lora_bgmv_launch::<T>(&s, ranks.len(), [ya, xa, sa, fa]).expect("launch plan"),
    );
    let got = T::values(&job.run(&what, &[ya])[0]);
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-6,
            max_abs: 1e-5,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 8e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 4e-2,
        },
    );
    check(&what, &got, &want, tol);
}

#[test]
fn lora_bgmv_matches_reference() {
    // 16-byte rows (the vector path) and odd ones (element by element), strided rows.
    for (din, ld_x, dout, ld_y) in [(40, 40, 24, 24), (37, 45, 19, 21), (64, 72, 40, 48)] {
        lora_case::<f32>(din, ld_x, dout, ld_y);
        lora_case::<f16>(din, ld_x, dout, ld_y);
        lora_case::<bf16>(din, ld_x, dout, ld_y);
    }
}

// ---------------------------------------------------------------------------------------------
// LiDB compose (lidb_compose_f32) and merge (lidb_merge_*): ran on an H100 (tests/cuda_parity/);
// here they guard kernel edits made without a GPU, against f64 references of the math in
// lidb.cu's header.
// ---------------------------------------------------------------------------------------------

/// f64 a [m, k] . b [k, n], row-major.
fn matmul64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                .sum();
        }
    }
    y
}

fn compose_case(layers: &[(usize, usize)], (r, a, b): (usize, usize, usize), alpha: f32) {
    let what = format!("lidb_compose_f32 layers {layers:?} r {r} a {a} b {b}");
    assert_eq!(std::mem::size_of::<ops::ComposeLayer>(), 64);
    let mut job = Job::new();
    let mut table = Vec::new();
    let mut outs = Vec::new();
    let mut wants = Vec::new();
    for (l, &(din, dout)) in layers.iter().enumerate() {
        let seed = 100 * l as u64 + din as u64;
        let d_train = rand_vec(r * a, seed, -1.0, 1.0);
        let u_train = rand_vec(b * r, seed + 1, -1.0, 1.0);
        let d_aux = rand_vec(a * din, seed + 2, -1.0, 1.0);
        let u_aux = rand_vec(dout * b, seed + 3, -1.0, 1.0);
        // down [r, din] = D_train [r, a] . D_aux [a, din]; up = alpha U_aux [dout, b] . U_train.
        let down: Vec<f32> = matmul64(&d_train, &d_aux, r, a, din)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let up: Vec<f32> = matmul64(&u_aux, &u_train, dout, b, r)
            .iter()
            .map(|&v| (alpha as f64 * v) as f32)
            .collect();
        let addrs = [
            job.input(&f32::bytes(&d_train)),
            job.input(&f32::bytes(&u_train)),
            job.input(&f32::bytes(&d_aux)),
            job.input(&f32::bytes(&u_aux)),
            job.output(r * din * 4),
            job.output(dout * r * 4),
        ];
        for a in addrs {
            table.extend(a.to_le_bytes());
        }
        table.extend((din as i64).to_le_bytes());
        table.extend((dout as i64).to_le_bytes());
        outs.extend([addrs[4], addrs[5]]);
        wants.extend([down, up]);
    }
    let ta = job.input(&table);
    for l in 0..layers.len() {
        for f in 0..6 {
            job.relocate(ta, 64 * l + 8 * f);
        }
    }
    let max_out = layers
        .iter()
        .map(|&(din, dout)| r * din + dout * r)
        .max()
        .unwrap_or(0);
    job.launch(
        &ops::lidb_compose_launch(ta, layers.len(), max_out, (r, a, b), alpha).expect("launch"),
    );
    let got = job.run(&what, &outs);
    for (i, (g, w)) in got.iter().zip(&wants).enumerate() {
        let name = if i % 2 == 0 { "down" } else { "up" };
        // Sums of a (or b) f32 products of values in [-1, 1]: |result| ~ sqrt(a), f32
        // accumulation error a few ulps of the partial sums.
        let tol = Tol {
            rel_l2: 1e-6,
            max_abs: 1e-5,
        };
        check(
            &format!("{what}: layer {} {name}", i / 2),
            &f32::values(g),
            w,
            tol,
        );
    }
}

#[test]
fn lidb_compose_matches_reference() {
    // (din, dout) per layer: a layer with fewer outputs than the grid's blocks, a wide one
    // (320 x 320, several blocks), tiny ones; HyperDreamBooth's r 1, a 100, b 50, and r 3.
    let layers = [(40, 24), (320, 320), (5, 3), (77, 1)];
    compose_case(&layers, (1, 100, 50), 0.8);
    compose_case(&layers, (3, 7, 5), -1.5);
}

/// One layer of a merge case: its shape, its factors (rank, scale), and the element offset of
/// W_base and W in their buffers (an offset of 1 breaks the 16-byte alignment of the 8-wide
/// path).
struct MergeSpec {
    dout: usize,
    din: usize,
    factors: Vec<(usize, f32)>,
    offset: usize,
}

fn merge_case<T: Elem>(specs: &[MergeSpec]) {
    let what = format!("lidb_merge_{}", T::SUFFIX);
    assert_eq!(std::mem::size_of::<ops::MergeLayer>(), 40);
    assert_eq!(std::mem::size_of::<ops::Factor>(), 24);
    let tsz = std::mem::size_of::<T>();
    let mut job = Job::new();
    let (mut layers, mut factors) = (Vec::new(), Vec::new());
    let (mut outs, mut wants) = (Vec::new(), Vec::new());
    let mut n_factors = 0usize;
    for (l, s) in specs.iter().enumerate() {
        let seed = 1000 * l as u64 + (s.dout * 3 + s.din) as u64;
        let base = T::round(&rand_vec(s.dout * s.din, seed, -1.0, 1.0));
        // W = W_base + sum_f scale_f up_f . down_f, in f64; a layer with no factors, or more
        // than MERGE_MAX_RANK (256) ranks in all, is W_base exactly.
        let total: usize = s.factors.iter().map(|f| f.0).sum();
        let mut want: Vec<f64> = base.iter().map(|&v| v as f64).collect();
        for (f, &(rank, scale)) in s.factors.iter().enumerate() {
            let fs = seed + 10 * (f as u64 + 1);
            let down = rand_vec(rank * s.din, fs, -0.5, 0.5);
            let up = rand_vec(s.dout * rank, fs + 1, -0.5, 0.5);
            if total <= 256 {
                let delta = matmul64(&up, &down, s.dout, rank, s.din);
                for (w, d) in want.iter_mut().zip(delta) {
                    *w += scale as f64 * d;
                }
            }
            factors.extend(job.input(&f32::bytes(&down)).to_le_bytes());
            factors.extend(job.input(&f32::bytes(&up)).to_le_bytes());
            factors.extend((rank as i32).to_le_bytes());
            factors.extend(scale.to_le_bytes());
        }
        let mut base_buf = vec![0.0; s.offset];
        base_buf.extend(&base);
        let ba = job.input(&T::bytes(&base_buf)) + (s.offset * tsz) as u64;
        let wa = job.output((s.offset + s.dout * s.din) * tsz);
        layers.extend(ba.to_le_bytes());
        layers.extend((wa + (s.offset * tsz) as u64).to_le_bytes());
        layers.extend((s.dout as i64).to_le_bytes());
        layers.extend((s.din as i64).to_le_bytes());
        layers.extend((n_factors as i32).to_le_bytes());
        layers.extend((s.factors.len() as i32).to_le_bytes());
        n_factors += s.factors.len();
        outs.push(wa);
        wants.push((want.iter().map(|&v| v as f32).collect::<Vec<f32>>(), total));
    }
    let la = job.input(&layers);
    let fa = job.input(&factors);
    for l in 0..specs.len() {
        job.relocate(la, 40 * l);
        job.relocate(la, 40 * l + 8);
    }
    for f in 0..n_factors {
        job.relocate(fa, 24 * f);
        job.relocate(fa, 24 * f + 8);
    }
    let max_dout = specs.iter().map(|s| s.dout).max().unwrap_or(0);
    job.launch(&ops::lidb_merge_launch::<T>(la, specs.len(), max_dout, fa).expect("launch plan"));
    let got = job.run(&what, &outs);
    for (l, (s, (g, (want, total)))) in specs.iter().zip(got.iter().zip(&wants)).enumerate() {
        let what = format!(
            "{what} layer {l}: {} x {}, factors {:?}, offset {}",
            s.dout, s.din, s.factors, s.offset
        );
        assert!(
            g[..s.offset * tsz].iter().all(|&b| b == 0xff),
            "{what}: wrote before W"
        );
        let g = T::values(&g[s.offset * tsz..]);
        if *total == 0 || *total > 256 {
            // Copied bit for bit.
            check(&what, &g, want, crate::EXACT);
        } else {
            // f32 accumulation of up to 17 products of values under 0.5 * 0.5 * scale, then
            // one rounding of |W| < 4.
            check(&what, &g, want, crate::rounding_tol::<T>(1e-6, 4.0));
        }
    }
}

fn merge_specs() -> Vec<MergeSpec> {
    let spec = |dout, din, factors: &[(usize, f32)], offset| MergeSpec {
        dout,
        din,
        factors: factors.to_vec(),
        offset,
    };
    vec![
        // The 8-wide path, two factors (their ranks concatenated in the coefficients).
        spec(40, 24, &[(3, 0.75), (5, -1.5)], 0),
        // The scalar path (din odd); 70 rows: three 32-row blocks, the last one partial.
        spec(70, 37, &[(4, 1.0)], 0),
        // No factors: a copy.
        spec(9, 16, &[], 0),
        // din % 8 == 0 but W_base and W misaligned: the scalar path; rank 17.
        spec(33, 40, &[(17, 0.5)], 1),
        // Over MERGE_MAX_RANK in all (the host refuses it): copied unchanged.
        spec(5, 8, &[(200, 1.0), (60, 1.0)], 0),
    ]
}

#[test]
fn lidb_merge_matches_reference() {
    let specs = merge_specs();
    merge_case::<f32>(&specs);
    merge_case::<f16>(&specs);
    merge_case::<bf16>(&specs);
}
