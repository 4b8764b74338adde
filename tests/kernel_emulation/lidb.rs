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
