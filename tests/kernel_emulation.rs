//! The CUDA kernels run on the host, without a GPU: tests/emu/driver.cpp includes the kernel
//! sources under a small emulation of CUDA's execution model (tests/emu/cuda_emu.h: blocks one
//! at a time, a block's threads as cooperative fibers, warp shuffles, mma.sync, ldmatrix and
//! cp.async with the PTX ISA's layouts), and each case here compares a kernel's output with the
//! CPU backend, which is itself checked against PyTorch.
//!
//! Every launch (kernel name, grid, block, shared memory, arguments) comes from the same pure
//! `*_launch` function of `backend::cuda::ops` the real op calls, so a wrong launch fails here
//! too; the driver checks each argument's kind against the kernel's C signature and the CUDA
//! launch limits, and guards every buffer against out-of-bounds writes. Output buffers start as
//! NaN bytes, so an element the kernel never writes fails the comparison.
//!
//! Needs a C++20 compiler (`c++`, or `$CXX`); without one the test fails (CI installs g++).
//! No GPU and no CUDA toolkit are needed, but the launch plans live behind the `cuda` feature:
//!
//!     cargo test --features cuda --test kernel_emulation
//!
//! What the emulation cannot see (timing, races the sequential schedule hides, the GPU's own
//! rounding of tensor-core sums and approximate exponentials) is scripts/gpu-check.sh's job.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use hdb::backend::cpu::Conv2d;
use hdb::backend::cuda::ops::{self, AttnKernel, AttnShape};
use hdb::backend::{Activation, AttnDims, Backend, Cpu};
use hdb::model::weights::F32Weight;

#[path = "emu/harness.rs"]
mod harness;
use harness::{check, rand_vec, tol_for, Elem, Job, Tol};

// ---------------------------------------------------------------------------------------------
// Softmax of f32 scores into T (softmax_rows_from_f32_*): never run on a GPU
// ---------------------------------------------------------------------------------------------

fn softmax_case<T: Elem>(rows: usize, n: usize, scale: f32) {
    let what = format!(
        "softmax_rows_from_f32_{} {rows} x {n} (scores x {scale})",
        T::SUFFIX
    );
    // f32 scores, as the materialised attention's first GEMM writes them: not rounded to T.
    let x = rand_vec(rows * n, (rows * 7 + n) as u64, -scale, scale);
    let mut want = x.clone();
    hdb::backend::cpu::softmax_rows(&mut want, rows, n);
    let mut job = Job::new();
    let xa = job.input(&<f32 as Elem>::bytes(&x));
    let ya = job.output(rows * n * std::mem::size_of::<T>());
    job.launch(&ops::softmax_rows_from_f32_launch::<T>(ya, xa, rows, n).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    // One rounding of each probability to T.
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-6,
            max_abs: 1e-6,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 1e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 8e-3,
        },
    );
    check(&what, &got, &want, tol);
}

#[test]
fn softmax_of_f32_scores_matches_cpu() {
    // Rows shorter than a warp, not a multiple of 32, more rows than a block's 8 warps, and
    // large scores (where rounding them to T first would show).
    for (rows, n, scale) in [(3, 5, 1.0), (17, 77, 4.0), (9, 300, 40.0), (1, 1, 1.0)] {
        softmax_case::<f32>(rows, n, scale);
        softmax_case::<f16>(rows, n, scale);
        softmax_case::<bf16>(rows, n, scale);
    }
}

// ---------------------------------------------------------------------------------------------
// a. Causal attention (attention_scalar_causal_*): never run on a GPU
// ---------------------------------------------------------------------------------------------

fn causal_attention_case<T: Elem>(batch: usize, heads: usize, len: usize, d: usize) {
    let what = format!(
        "attention_scalar_causal_{} batch {batch} heads {heads} len {len} d {d}",
        T::SUFFIX
    );
    let n = batch * len * heads * d;
    let seed = (len * 1000 + d) as u64;
    // Scores of a few units: the softmax is neither flat nor one-hot.
    let q = T::round(&rand_vec(n, seed, -1.5, 1.5));
    let k = T::round(&rand_vec(n, seed + 1, -1.5, 1.5));
    let v = T::round(&rand_vec(n, seed + 2, -1.0, 1.0));
    let dims = AttnDims {
        batch,
        lq: len,
        lk: len,
        heads,
        head_dim: d,
        causal: true,
    };
    let want = Cpu
        .attention(&q, &k, &v, dims)
        .expect("CPU causal attention");

    let tsz = std::mem::size_of::<T>();
    let mut job = Job::new();
    let qa = job.input(&T::bytes(&q));
    let ka = job.input(&T::bytes(&k));
    let va = job.input(&T::bytes(&v));
    let oa = job.output(n * tsz);
    let s = AttnShape::dense(batch, heads, len, len, d);
    job.launch(&ops::attention_causal_launch::<T>(&s, [oa, qa, ka, va]).expect("launch plan"));
    let got = T::values(&job.run(&what, &[oa])[0]);
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-5,
            max_abs: 1e-5,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 2e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 1.6e-2,
        },
    );
    check(&what, &got, &want, tol);
}

#[test]
fn causal_attention_matches_cpu() {
    for (len, d) in [(7, 16), (77, 16), (7, 64), (77, 64)] {
        causal_attention_case::<f32>(2, 2, len, d);
        causal_attention_case::<f16>(2, 2, len, d);
        causal_attention_case::<bf16>(2, 2, len, d);
    }
    // Odd head dims and more than 32 keys a row beyond the first chunk.
    causal_attention_case::<f32>(1, 3, 40, 24);
}

// ---------------------------------------------------------------------------------------------
// b. GELU and quick GELU (gelu_*, quick_gelu_*): never run on a GPU
// ---------------------------------------------------------------------------------------------

fn activation_case<T: Elem>(act: Activation) {
    let what = format!("{act:?} {}", T::SUFFIX);
    // The usual range, then the large negative tail (where 1 + erf cancels) and large values.
    let mut x = rand_vec(3000, 7, -6.0, 6.0);
    x.extend(rand_vec(500, 8, -40.0, -5.0));
    x.extend([
        -1e4, -300.0, -88.0, -20.0, -10.0, -5.5, 0.0, -0.0, 1e-3, 5.5, 20.0, 300.0, 1e4,
    ]);
    x.extend(rand_vec(1000, 9, 5.0, 40.0));
    let x = T::round(&x);
    let n = x.len();
    let mut want = x.clone();
    Cpu.activate(&mut want, act).expect("CPU activation");

    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let l = match act {
        Activation::Gelu => ops::gelu_launch::<T>(xa, n),
        Activation::QuickGelu => ops::quick_gelu_launch::<T>(xa, n),
        Activation::Silu => unreachable!("not a case"),
    };
    job.launch(&l);
    let got = T::values(&job.run(&what, &[xa])[0]);
    // One rounding of the output: half an ulp of the type, relative (plus the f32 erf/exp
    // differences, a few f32 ulps).
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-6,
            max_abs: 1e-5,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 1e4 * 1e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 1e4 * 8e-3,
        },
    );
    check(&what, &got, &want, tol);
    // Element by element too: a relative error per element (the tail values are tiny).
    let ulp = match T::SUFFIX {
        "f32" => 1e-5,
        "f16" => 1e-3,
        _ => 8e-3,
    };
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let err = (g - w).abs();
        // f16 flushes results below its subnormal range; allow its smallest step there.
        let floor = if T::SUFFIX == "f16" { 6e-8 } else { 1e-37 };
        assert!(
            err <= ulp * w.abs() + floor && !g.is_nan(),
            "{what}: element {i} (x = {}): got {g}, want {w}",
            x[i]
        );
    }
}

#[test]
fn gelu_and_quick_gelu_match_cpu() {
    for act in [Activation::Gelu, Activation::QuickGelu] {
        activation_case::<f32>(act);
        activation_case::<f16>(act);
        activation_case::<bf16>(act);
    }
}

// ---------------------------------------------------------------------------------------------
// c. Bottom-right zero padding (pad_bottom_right_*): never run on a GPU
// ---------------------------------------------------------------------------------------------

fn pad_case<T: Elem>(planes: usize, h: usize, w: usize) {
    let what = format!("pad_bottom_right_{} {planes} x {h} x {w}", T::SUFFIX);
    let x = T::round(&rand_vec(planes * h * w, (h * 31 + w) as u64, -2.0, 2.0));
    let want = Cpu
        .pad_bottom_right(&x, (planes, h, w))
        .expect("CPU pad_bottom_right");
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ya = job.output(want.len() * std::mem::size_of::<T>());
    job.launch(&ops::pad_bottom_right_launch::<T>(ya, xa, planes, h, w).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    // A copy: exact.
    check(
        &what,
        &got,
        &want,
        Tol {
            rel_l2: 0.0,
            max_abs: 0.0,
        },
    );
}

#[test]
fn pad_bottom_right_matches_cpu() {
    for (planes, h, w) in [(3, 7, 5), (2, 1, 1), (5, 17, 33), (1, 64, 63)] {
        pad_case::<f32>(planes, h, w);
        pad_case::<f16>(planes, h, w);
        pad_case::<bf16>(planes, h, w);
    }
}

// ---------------------------------------------------------------------------------------------
// d. Implicit-GEMM convolution (conv2d_igemm_*, conv2d_igemm_reduce_*): never run on a GPU
// ---------------------------------------------------------------------------------------------

/// Runs `conv2d_implicit_with(.., splits)`'s launches; returns the split count used.
fn conv_case<T: Elem>(p: Conv2d, bias: bool, splits: Option<usize>) -> usize {
    let (oh, ow) = p.out_hw();
    let kk = p.c_in * p.kernel * p.kernel;
    let seed = (p.c_in * 7 + p.c_out * 13 + p.h * 3 + p.kernel) as u64;
    let x = T::round(&rand_vec(p.batch * p.c_in * p.h * p.w, seed, -1.0, 1.0));
    let wscale = 1.0 / (kk as f32).sqrt();
    let w = T::round(&rand_vec(p.c_out * kk, seed + 1, -wscale, wscale));
    let b = T::round(&rand_vec(p.c_out, seed + 2, -0.5, 0.5));
    let want = {
        let wt = Cpu.weight(F32Weight::Owned(w.clone())).expect("weight");
        let bt = Cpu.weight(F32Weight::Owned(b.clone())).expect("bias");
        Cpu.conv2d(&x, &wt, bias.then_some(&bt), &p)
            .expect("CPU conv2d")
    };
    // What conv2d_implicit_with does with no SM count to read: the heuristic for an H100's 132.
    let wanted = splits.unwrap_or_else(|| ops::conv2d_implicit_splits(&p, 132));
    let plan = ops::conv2d_implicit_plan(&p, wanted).expect("conv plan");
    let what = format!(
        "conv2d_igemm_{} {p:?} bias {bias} splits {} (asked {wanted})",
        T::SUFFIX,
        plan.splits
    );
    let tsz = std::mem::size_of::<T>();
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let wa = job.input(&T::bytes(&w));
    let ba = if bias { job.input(&T::bytes(&b)) } else { 0 };
    let ya = job.output(p.batch * p.c_out * oh * ow * tsz);
    let pa = if plan.partial_len > 0 {
        job.output(plan.partial_len * 4)
    } else {
        0
    };
    for l in ops::conv2d_implicit_launches::<T>(&p, &plan, [ya, pa, xa, wa, ba]).expect("launches")
    {
        job.launch(&l);
    }
    let got = T::values(&job.run(&what, &[ya])[0]);
    // Operands are exact in T, the sum in f32: the output's one rounding dominates.
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-5,
            max_abs: 1e-5,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 4e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 3e-2,
        },
    );
    check(&what, &got, &want, tol);
    plan.splits
}

fn conv(batch: usize, c_in: usize, hw: (usize, usize), c_out: usize, k: usize, s: usize) -> Conv2d {
    Conv2d {
        batch,
        c_in,
        h: hw.0,
        w: hw.1,
        c_out,
        kernel: k,
        stride: s,
        padding: k / 2,
    }
}

fn conv_cases<T: Elem>() {
    // 3x3 pad 1 stride 1: c_in * 9 = 45 (two k-tiles, the second partial, scalar weight loads),
    // 9 x 11 = 99 pixels (a partial pixel tile), c_out 20 (a partial channel tile).
    conv_case::<T>(conv(2, 5, (9, 11), 20, 3, 1), true, None);
    conv_case::<T>(conv(1, 5, (9, 11), 20, 3, 1), false, None);
    // c_in * 9 = 144 (16-byte weight rows), c_out over one 128-row tile, 2 pixel tiles.
    conv_case::<T>(conv(1, 16, (10, 12), 136, 3, 1), true, None);
    // Stride 2 (the downsamplers), odd input.
    conv_case::<T>(conv(2, 8, (13, 9), 24, 3, 2), true, None);
    // 1x1 (no padding), c_in not a multiple of 8, odd pixel count.
    conv_case::<T>(conv(2, 37, (7, 5), 40, 1, 1), true, None);
    // 5x5 (k * k = 25 <= 32 taps in the mask) and 7x7 (the range-compare path).
    conv_case::<T>(conv(1, 3, (8, 8), 8, 5, 1), true, None);
    conv_case::<T>(conv(1, 3, (9, 7), 8, 7, 2), false, None);
    // Split-K: 32 * 9 = 288 -> 9 k-tiles in 3 slices of 3; 4 slices of 3, 3, 3, 0 -> 3 slices;
    // with and without bias (the reduce adds it).
    assert_eq!(
        conv_case::<T>(conv(1, 32, (6, 6), 16, 3, 1), true, Some(3)),
        3
    );
    assert_eq!(
        conv_case::<T>(conv(2, 32, (6, 5), 16, 3, 1), false, Some(4)),
        3
    );
    // 70 * 9 = 630 -> 20 k-tiles, 7 slices of 3 (the last one 2).
    assert_eq!(
        conv_case::<T>(conv(1, 70, (5, 5), 12, 3, 1), true, Some(7)),
        7
    );
    // What the heuristic picks for a small grid: 256 * 9 = 72 k-tiles at 4x4 splits.
    assert!(conv_case::<T>(conv(1, 256, (4, 4), 8, 3, 1), true, None) > 1);
}

#[test]
fn implicit_conv_f16_matches_cpu() {
    conv_cases::<f16>();
}

#[test]
fn implicit_conv_bf16_matches_cpu() {
    conv_cases::<bf16>();
}

// ---------------------------------------------------------------------------------------------
// e. The tensor-core attention kernels (flash_attn_*, flash2_attn_*, flash3_attn_*): these ran
//    on an H100; here they guard kernel edits and cross-check the emulated mma.sync, ldmatrix
//    and cp.async against kernels known to be right.
// ---------------------------------------------------------------------------------------------

fn flash_case<T: Elem>(kernel: AttnKernel, stem: &str, lq: usize, lk: usize, d: usize) {
    let (batch, heads) = (1, 2);
    let hd = heads * d;
    let seed = (lq * 100 + lk * 7 + d) as u64;
    let q = T::round(&rand_vec(batch * lq * hd, seed, -1.5, 1.5));
    let k = T::round(&rand_vec(batch * lk * hd, seed + 1, -1.5, 1.5));
    let v = T::round(&rand_vec(batch * lk * hd, seed + 2, -1.0, 1.0));
    let dims = AttnDims {
        batch,
        lq,
        lk,
        heads,
        head_dim: d,
        causal: false,
    };
    let want = Cpu.attention(&q, &k, &v, dims).expect("CPU attention");
    let tsz = std::mem::size_of::<T>();
    let mut job = Job::new();
    let qa = job.input(&T::bytes(&q));
    let ka = job.input(&T::bytes(&k));
    let va = job.input(&T::bytes(&v));
    let oa = job.output(batch * lq * hd * tsz);
    let s = AttnShape::dense(batch, heads, lq, lk, d);
    let l = ops::attention_launch::<T>(&s, kernel, [oa, qa, ka, va]).expect("launch plan");
    let expected = format!("{stem}_d{d}_{}", T::SUFFIX);
    assert_eq!(l.kernel, expected, "{kernel:?} at d = {d} picks");
    let what = format!("{} lq {lq} lk {lk}", l.kernel);
    job.launch(&l);
    let got = T::values(&job.run(&what, &[oa])[0]);
    // P is rounded to T before P v (FlashAttention-2's precision): ~1e-3 (f16), ~8e-3 (bf16).
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 0.0,
            max_abs: 0.0,
        },
        Tol {
            rel_l2: 2e-3,
            max_abs: 4e-3,
        },
        Tol {
            rel_l2: 1.2e-2,
            max_abs: 3e-2,
        },
    );
    check(&what, &got, &want, tol);
}

fn flash_cases<T: Elem>() {
    // Partial query and key tiles (lq 70 of 64-row tiles, lk 77 of 64- or 32-key tiles).
    flash_case::<T>(AttnKernel::Flash1, "flash_attn", 70, 77, 40);
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 70, 77, 40);
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 70, 77, 80);
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 33, 77, 160);
    flash_case::<T>(AttnKernel::Flash3, "flash3_attn", 150, 77, 40);
    // More than two key tiles (the double buffer wraps) and a single short one.
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 20, 200, 64);
    flash_case::<T>(AttnKernel::Flash3, "flash3_attn", 20, 150, 40);
    flash_case::<T>(AttnKernel::Flash3, "flash3_attn", 5, 3, 40);
}

#[test]
fn flash_attention_f16_matches_cpu() {
    flash_cases::<f16>();
}

#[test]
fn flash_attention_bf16_matches_cpu() {
    flash_cases::<bf16>();
}

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
