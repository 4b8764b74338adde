//! Every CUDA op against the CPU backend, on fresh random inputs (the seed is printed), for
//! f32, f16 and bf16. Half-precision cases feed the CPU the same rounded inputs, so the error
//! measured is the kernel's own (accumulation order, one output rounding, and for flash
//! attention the rounding of P).
//!
//! Each case prints `cuda-parity <op> <dtype> ... rel_l2=... max_abs=...` and fails with the
//! worst element. Outputs are poisoned with NaN before each launch, so an unwritten element
//! fails. The tests are `#[ignore]`d, so a plain `cargo test` counts them as skipped; on a GPU
//! machine run them with `--include-ignored` (scripts/gpu-check.sh does, one process per
//! test). Without a usable GPU they print `SKIPPED (no CUDA device): <reason>` and return;
//! gpu-check.sh counts those lines as failures.
//!
//!     cargo test --release --features cuda --test cuda_parity -- --include-ignored \
//!         --test-threads=1 --nocapture
#![cfg(feature = "cuda")]

use std::sync::{Mutex, MutexGuard, OnceLock};

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use hdb::backend::cpu;
use hdb::backend::cuda::ops::{
    self, At, AttnKernel, AttnShape, BgmvShape, BlasElem, ComposeLayer, Conv2d, Factor, MergeLayer,
};
use hdb::backend::cuda::{CudaDevice, DeviceElem};
use hdb::model::random::SplitMix64;
use hdb::Error;

/// One device for the whole binary (kernels compile once), used by one test at a time.
fn device() -> Option<MutexGuard<'static, CudaDevice>> {
    static DEV: OnceLock<Result<Mutex<CudaDevice>, String>> = OnceLock::new();
    match DEV.get_or_init(|| {
        CudaDevice::open(0)
            .map(Mutex::new)
            .map_err(|e| e.to_string())
    }) {
        Ok(d) => Some(d.lock().unwrap_or_else(|p| p.into_inner())),
        Err(e) => {
            println!("SKIPPED (no CUDA device): {e}");
            None
        }
    }
}

fn seed(test: &str) -> SplitMix64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let s = t ^ hdb::model::random::fnv1a64(test);
    println!("{test}: seed {s:#x}");
    SplitMix64(s)
}

fn randn(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    hdb::model::random::normals(rng, n)
        .into_iter()
        .map(|v| v as f32 * scale)
        .collect()
}

/// `x` rounded to T and back: what the device holds.
fn rounded<T: DeviceElem>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

fn poisoned<T: DeviceElem>(dev: &CudaDevice, n: usize) -> CudaSlice<T> {
    dev.upload(&vec![T::from_f32(f32::NAN); n]).expect("alloc")
}

/// ||gpu - cpu|| / ||cpu|| <= tol, every element finite; prints the figures.
fn check(case: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{case}: lengths");
    let (mut num, mut den, mut worst, mut wi) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let d = (g as f64 - c as f64).abs();
        if !g.is_finite() || d > worst || d.is_nan() {
            if !g.is_finite() {
                panic!("{case}: element {i} is {g} (cpu {c}): unwritten or overflowed");
            }
            worst = d;
            wi = i;
        }
        num += d * d;
        den += (c as f64) * (c as f64);
    }
    let rel = (num / den.max(1e-300)).sqrt();
    println!("cuda-parity {case:<44} rel_l2={rel:.2e} max_abs={worst:.2e} (tol {tol:.0e})",);
    assert!(
        rel <= tol,
        "{case}: rel_l2 {rel:.3e} > {tol:.0e}; worst element {wi}: gpu {} cpu {}",
        gpu[wi],
        cpu[wi]
    );
}

/// Tolerance on rel_l2 for an op that rounds its output once to T.
fn tol<T: DeviceElem>(f32_tol: f64) -> f64 {
    match T::SUFFIX {
        "f32" => f32_tol,
        "f16" => 1e-3,
        _ => 8e-3,
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn attention_case<T: DeviceElem>(
    dev: &CudaDevice,
    rng: &mut SplitMix64,
    s: AttnShape,
    fused_qkv: bool,
    kernel: AttnKernel,
    tol: f64,
) {
    let hd = s.heads * s.head_dim;
    let (q, k, v) = (
        rounded::<T>(&randn(rng, s.batch * s.lq * hd, 1.0)),
        rounded::<T>(&randn(rng, s.batch * s.lk * hd, 1.0)),
        rounded::<T>(&randn(rng, s.batch * s.lk * hd, 1.0)),
    );
    let mut want = vec![0.0; s.batch * s.lq * hd];
    cpu::attention(
        &mut want, &q, &k, &v, s.batch, s.lq, s.lk, s.heads, s.head_dim,
    );
    let out = poisoned::<T>(dev, want.len());
    let name = if fused_qkv {
        // One [rows, 3 * hd] buffer holding q | k | v per row (self-attention only).
        assert_eq!(s.lq, s.lk);
        let rows = s.batch * s.lq;
        let mut qkv = vec![0.0; rows * 3 * hd];
        for r in 0..rows {
            qkv[r * 3 * hd..r * 3 * hd + hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
            qkv[r * 3 * hd + hd..r * 3 * hd + 2 * hd].copy_from_slice(&k[r * hd..(r + 1) * hd]);
            qkv[r * 3 * hd + 2 * hd..(r + 1) * 3 * hd].copy_from_slice(&v[r * hd..(r + 1) * hd]);
        }
        let b = dev.upload_f32::<T>(&qkv).unwrap();
        let st = AttnShape {
            ld_q: 3 * hd,
            ld_k: 3 * hd,
            ld_v: 3 * hd,
            ..s
        };
        ops::attention(
            dev,
            At::from(&out),
            At::new(&b, 0),
            At::new(&b, hd),
            At::new(&b, 2 * hd),
            st,
            kernel,
        )
        .unwrap()
    } else {
        // q rows at stride ld_q; the padding is NaN, so reading it would show.
        let rows = s.batch * s.lq;
        let mut qp = vec![f32::NAN; (rows - 1) * s.ld_q + hd];
        for r in 0..rows {
            qp[r * s.ld_q..r * s.ld_q + hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
        }
        assert_eq!(
            (s.ld_k, s.ld_v, s.ld_o),
            (hd, hd, hd),
            "only q may be strided here"
        );
        let (qd, kd, vd) = (
            dev.upload_f32::<T>(&qp).unwrap(),
            dev.upload_f32::<T>(&k).unwrap(),
            dev.upload_f32::<T>(&v).unwrap(),
        );
        ops::attention(
            dev,
            At::from(&out),
            At::from(&qd),
            At::from(&kd),
            At::from(&vd),
            s,
            kernel,
        )
        .unwrap()
    };
    let got = dev.download_f32(&out, want.len()).unwrap();
    let case = format!(
        "{name} b{} h{} lq{} lk{}{}",
        s.batch,
        s.heads,
        s.lq,
        s.lk,
        if fused_qkv { " qkv" } else { "" }
    );
    check(&case, &got, &want, tol);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn attention_scalar_matches_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("attention_scalar");
    for &(b, h, lq, lk, d) in &[
        (2, 8, 256, 256, 40),
        (2, 8, 250, 77, 40),
        (1, 5, 64, 64, 64),
        (2, 8, 64, 77, 160),
        (1, 3, 33, 17, 24),
    ] {
        let s = AttnShape::dense(b, h, lq, lk, d);
        attention_case::<f32>(&dev, &mut rng, s, false, AttnKernel::Scalar, 1e-5);
        attention_case::<f16>(&dev, &mut rng, s, false, AttnKernel::Scalar, 1e-3);
        attention_case::<bf16>(&dev, &mut rng, s, false, AttnKernel::Scalar, 8e-3);
    }
    attention_case::<f32>(
        &dev,
        &mut rng,
        AttnShape::dense(2, 8, 128, 128, 40),
        true,
        AttnKernel::Scalar,
        1e-5,
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn flash_attention_matches_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("flash_attention");
    // SD 1.5's head dims (40, 80, 160) and 64; self-attention, cross-attention with 77 keys,
    // lengths that are not multiples of the tiles, and a fused qkv buffer.
    for &(b, h, lq, lk, d) in &[
        (2, 8, 1024, 1024, 40),
        (2, 8, 1024, 77, 40),
        (2, 8, 256, 256, 80),
        (2, 8, 256, 77, 80),
        (2, 8, 64, 64, 160),
        (2, 8, 64, 77, 160),
        (1, 4, 200, 130, 64),
        (1, 2, 5, 3, 40),
    ] {
        let s = AttnShape::dense(b, h, lq, lk, d);
        // P is rounded to the input type before P.V: ~1e-3 (f16) / ~1e-2 (bf16) relative.
        // Auto is flash3_attn_* (d 40) or flash2_attn_* here (dense rows are 16-byte aligned).
        for kernel in [
            AttnKernel::Auto,
            AttnKernel::Flash1,
            AttnKernel::Flash2,
            AttnKernel::Flash3,
        ] {
            attention_case::<f16>(&dev, &mut rng, s, false, kernel, 2e-3);
            attention_case::<bf16>(&dev, &mut rng, s, false, kernel, 1.5e-2);
        }
    }
    for d in [40, 80] {
        for kernel in [AttnKernel::Auto, AttnKernel::Flash3] {
            attention_case::<f16>(
                &dev,
                &mut rng,
                AttnShape::dense(2, 8, 320, 320, d),
                true,
                kernel,
                2e-3,
            );
        }
    }
    // A row stride that is not a multiple of 8 elements: Auto falls back to flash_attn_*.
    attention_case::<bf16>(
        &dev,
        &mut rng,
        AttnShape {
            ld_q: 8 * 40 + 4,
            ..AttnShape::dense(1, 8, 100, 100, 40)
        },
        false,
        AttnKernel::Auto,
        1.5e-2,
    );
}

// ---------------------------------------------------------------------------------------------
// LiDB compose and merge, multi-identity LoRA
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lidb_compose_matches_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("lidb_compose");
    let (r, a, b, alpha) = (2usize, 100usize, 50usize, 1.5f32);
    let shapes = [(320usize, 320usize), (768, 320), (1280, 640), (40, 24)];
    let mut keep = Vec::new();
    let mut table = Vec::new();
    let mut want = Vec::new();
    let mut max_out = 0;
    for &(din, dout) in &shapes {
        let dt = randn(&mut rng, r * a, 0.1);
        let ut = randn(&mut rng, b * r, 0.1);
        let da = randn(&mut rng, a * din, 1.0);
        let ua = randn(&mut rng, dout * b, 1.0);
        let mut down = vec![0.0f32; r * din];
        for i in 0..r {
            for c in 0..din {
                let s: f64 = (0..a)
                    .map(|j| dt[i * a + j] as f64 * da[j * din + c] as f64)
                    .sum();
                down[i * din + c] = s as f32;
            }
        }
        let mut up = vec![0.0f32; dout * r];
        for o in 0..dout {
            for i in 0..r {
                let s: f64 = (0..b)
                    .map(|j| ua[o * b + j] as f64 * ut[j * r + i] as f64)
                    .sum();
                up[o * r + i] = alpha * s as f32;
            }
        }
        let bufs = [
            dev.upload(&dt).unwrap(),
            dev.upload(&ut).unwrap(),
            dev.upload(&da).unwrap(),
            dev.upload(&ua).unwrap(),
            poisoned::<f32>(&dev, r * din),
            poisoned::<f32>(&dev, dout * r),
        ];
        table.push(ComposeLayer {
            d_train: dev.ptr(&bufs[0]),
            u_train: dev.ptr(&bufs[1]),
            d_aux: dev.ptr(&bufs[2]),
            u_aux: dev.ptr(&bufs[3]),
            down: dev.ptr(&bufs[4]),
            up: dev.ptr(&bufs[5]),
            din: din as i64,
            dout: dout as i64,
        });
        max_out = max_out.max(r * din + dout * r);
        want.push((down, up));
        keep.push(bufs);
    }
    let t = dev.upload(&table).unwrap();
    ops::lidb_compose(&dev, &t, table.len(), max_out, (r, a, b), alpha).unwrap();
    for (i, ((down, up), bufs)) in want.iter().zip(&keep).enumerate() {
        let gd = dev.download(&bufs[4], down.len()).unwrap();
        let gu = dev.download(&bufs[5], up.len()).unwrap();
        check(&format!("lidb_compose_f32 layer {i} down"), &gd, down, 1e-5);
        check(&format!("lidb_compose_f32 layer {i} up"), &gu, up, 1e-5);
    }
}

/// One merge case: layers of several shapes, each with `n_factors` factors of mixed ranks.
fn merge_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64, n_factors: usize) {
    let shapes = [(320usize, 320usize), (768, 640), (1280, 1280), (37, 13)];
    let mut layers = Vec::new();
    let mut factors = Vec::new();
    let mut keep_f = Vec::new();
    let mut bases = Vec::new();
    let mut outs = Vec::new();
    let mut wants = Vec::new();
    let mut max_dout = 0;
    for &(din, dout) in &shapes {
        let base = rounded::<T>(&randn(rng, dout * din, 0.05));
        let mut want: Vec<f64> = base.iter().map(|&v| v as f64).collect();
        let first = factors.len();
        for f in 0..n_factors {
            let rank = [1usize, 4, 16][f % 3];
            let scale = 0.5 + f as f32 * 0.25;
            let down = randn(rng, rank * din, 0.1);
            let up = randn(rng, dout * rank, 0.1);
            for o in 0..dout {
                for c in 0..din {
                    let s: f64 = (0..rank)
                        .map(|q| up[o * rank + q] as f64 * down[q * din + c] as f64)
                        .sum();
                    want[o * din + c] += scale as f64 * s;
                }
            }
            let (dd, ud) = (dev.upload(&down).unwrap(), dev.upload(&up).unwrap());
            factors.push(Factor {
                down: dev.ptr(&dd),
                up: dev.ptr(&ud),
                rank: rank as i32,
                scale,
            });
            keep_f.push((dd, ud));
        }
        let bd = dev.upload_f32::<T>(&base).unwrap();
        let od = poisoned::<T>(dev, dout * din);
        layers.push(MergeLayer {
            w_base: dev.ptr(&bd),
            w: dev.ptr(&od),
            dout: dout as i64,
            din: din as i64,
            first_factor: first as i32,
            n_factors: n_factors as i32,
        });
        max_dout = max_dout.max(dout);
        bases.push((bd, base));
        outs.push(od);
        wants.push(want);
    }
    let lt = dev.upload(&layers).unwrap();
    let ft = if factors.is_empty() {
        dev.upload(&[Factor::default()]).unwrap()
    } else {
        dev.upload(&factors).unwrap()
    };
    ops::lidb_merge::<T>(dev, &lt, layers.len(), max_dout, &ft).unwrap();
    for (i, ((od, want), (bd, _))) in outs.iter().zip(&wants).zip(&bases).enumerate() {
        let n = want.len();
        if n_factors == 0 {
            // The pristine base, bit for bit.
            let got: Vec<T> = dev.download(od, n).unwrap();
            let base: Vec<T> = dev.download(bd, n).unwrap();
            let same = got
                .iter()
                .zip(&base)
                .all(|(a, b)| bytemuck_bits(a) == bytemuck_bits(b));
            println!(
                "cuda-parity lidb_merge_{} layer {i} empty set: bit-exact={same}",
                T::SUFFIX
            );
            assert!(
                same,
                "lidb_merge_{}: empty set changed layer {i}",
                T::SUFFIX
            );
        } else {
            let got = dev.download_f32(od, n).unwrap();
            let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            check(
                &format!("lidb_merge_{} layer {i} {n_factors} factors", T::SUFFIX),
                &got,
                &want32,
                tol::<T>(1e-6),
            );
        }
    }
}

fn bytemuck_bits<T: DeviceElem>(v: &T) -> u32 {
    // f32 and the 16-bit types compared by their bit patterns.
    match std::mem::size_of::<T>() {
        4 => T::to_f32(*v).to_bits(),
        _ => {
            let x = T::to_f32(*v);
            if T::SUFFIX == "f16" {
                f16::from_f32(x).to_bits() as u32
            } else {
                bf16::from_f32(x).to_bits() as u32
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lidb_merge_matches_cpu_and_restores_the_base() {
    let Some(dev) = device() else { return };
    let mut rng = seed("lidb_merge");
    for n in [0, 1, 3] {
        merge_case::<f32>(&dev, &mut rng, n);
        merge_case::<f16>(&dev, &mut rng, n);
        merge_case::<bf16>(&dev, &mut rng, n);
    }
}

fn bgmv_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64, din: usize, dout: usize) {
    let (batch, rows_per_sample) = (4usize, 77usize);
    let rows = batch * rows_per_sample;
    let ranks = [1usize, 4, 128];
    let mut facs = Vec::new();
    let mut keep = Vec::new();
    let mut host = Vec::new();
    for (i, &rank) in ranks.iter().enumerate() {
        let down = randn(rng, rank * din, 0.1);
        let up = randn(rng, dout * rank, 0.1);
        let (dd, ud) = (dev.upload(&down).unwrap(), dev.upload(&up).unwrap());
        let scale = 1.0 - 0.3 * i as f32;
        facs.push(Factor {
            down: dev.ptr(&dd),
            up: dev.ptr(&ud),
            rank: rank as i32,
            scale,
        });
        keep.push((dd, ud));
        host.push((down, up, rank, scale));
    }
    let index = [2i32, -1, 0, 1];
    let x = rounded::<T>(&randn(rng, rows * din, 1.0));
    let y0 = rounded::<T>(&randn(rng, rows * dout, 1.0));
    let mut want = y0.clone();
    for r in 0..rows {
        let a = index[r / rows_per_sample];
        if a < 0 {
            continue;
        }
        let (down, up, rank, scale) = &host[a as usize];
        let t: Vec<f64> = (0..*rank)
            .map(|q| {
                *scale as f64
                    * (0..din)
                        .map(|c| x[r * din + c] as f64 * down[q * din + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        for o in 0..dout {
            let s: f64 = (0..*rank).map(|q| t[q] * up[o * rank + q] as f64).sum();
            want[r * dout + o] = (want[r * dout + o] as f64 + s) as f32;
        }
    }
    let (xd, yd) = (
        dev.upload_f32::<T>(&x).unwrap(),
        dev.upload_f32::<T>(&y0).unwrap(),
    );
    let (id, fd) = (dev.upload(&index).unwrap(), dev.upload(&facs).unwrap());
    let s = BgmvShape {
        rows,
        rows_per_sample,
        din,
        dout,
        ld_x: din,
        ld_y: dout,
    };
    ops::lora_bgmv::<T>(dev, At::from(&yd), At::from(&xd), &id, &fd, facs.len(), s).unwrap();
    let got = dev.download_f32(&yd, want.len()).unwrap();
    check(
        &format!(
            "lora_bgmv_{} {din}->{dout} 4 samples, ranks 1/4/128",
            T::SUFFIX
        ),
        &got,
        &want,
        tol::<T>(1e-6),
    );
    // The sample with index -1 is untouched, bit for bit.
    let r0 = rows_per_sample;
    assert!(
        got[r0 * dout..2 * r0 * dout]
            .iter()
            .zip(&y0[r0 * dout..2 * r0 * dout])
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "lora_bgmv_{}: the sample without an adapter changed",
        T::SUFFIX
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lora_bgmv_matches_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("lora_bgmv");
    // 8-wide path (SD shapes) and the element path (din, dout not multiples of 8).
    for (din, dout) in [(320, 640), (37, 13)] {
        bgmv_case::<f32>(&dev, &mut rng, din, dout);
        bgmv_case::<f16>(&dev, &mut rng, din, dout);
        bgmv_case::<bf16>(&dev, &mut rng, din, dout);
    }
}

// ---------------------------------------------------------------------------------------------
// Norms, elementwise, layout
// ---------------------------------------------------------------------------------------------

fn norms_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let (b, c, hw, groups) = (2usize, 320usize, 1024usize, 32usize);
    let x = rounded::<T>(
        &randn(rng, b * c * hw, 2.0)
            .iter()
            .map(|v| v + 0.5)
            .collect::<Vec<_>>(),
    );
    let g = rounded::<T>(&randn(rng, c, 1.0));
    let be = rounded::<T>(&randn(rng, c, 1.0));
    let (xd, gd, bd) = (
        dev.upload_f32::<T>(&x).unwrap(),
        dev.upload_f32::<T>(&g).unwrap(),
        dev.upload_f32::<T>(&be).unwrap(),
    );
    for silu in [false, true] {
        let mut want = vec![0.0; x.len()];
        cpu::group_norm(&mut want, &x, &g, &be, b, c, hw, groups, 1e-5, silu);
        let y = poisoned::<T>(dev, x.len());
        ops::group_norm(dev, &y, &xd, &gd, &bd, (b, c, hw), groups, 1e-5, silu).unwrap();
        let got = dev.download_f32(&y, x.len()).unwrap();
        let name = if silu {
            "group_norm_silu"
        } else {
            "group_norm"
        };
        check(
            &format!("{name}_{} 2x320x1024", T::SUFFIX),
            &got,
            &want,
            tol::<T>(1e-5),
        );
    }
    // In place (y = x), as the UNet uses it.
    let mut want = vec![0.0; x.len()];
    cpu::group_norm(&mut want, &x, &g, &be, b, c, hw, groups, 1e-5, true);
    ops::group_norm(dev, &xd, &xd, &gd, &bd, (b, c, hw), groups, 1e-5, true).unwrap();
    let got = dev.download_f32(&xd, x.len()).unwrap();
    check(
        &format!("group_norm_silu_{} in place", T::SUFFIX),
        &got,
        &want,
        tol::<T>(1e-5),
    );

    let (rows, dim) = (777usize, 320usize);
    let x = rounded::<T>(&randn(rng, rows * dim, 3.0));
    let g = rounded::<T>(&randn(rng, dim, 1.0));
    let be = rounded::<T>(&randn(rng, dim, 1.0));
    let mut want = vec![0.0; x.len()];
    cpu::layer_norm(&mut want, &x, &g, &be, rows, dim, 1e-5);
    let (xd, gd, bd) = (
        dev.upload_f32::<T>(&x).unwrap(),
        dev.upload_f32::<T>(&g).unwrap(),
        dev.upload_f32::<T>(&be).unwrap(),
    );
    let y = poisoned::<T>(dev, x.len());
    ops::layer_norm(dev, &y, &xd, &gd, &bd, rows, dim, 1e-5).unwrap();
    let got = dev.download_f32(&y, x.len()).unwrap();
    check(
        &format!("layer_norm_{} 777x320", T::SUFFIX),
        &got,
        &want,
        tol::<T>(1e-5),
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn norms_match_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("norms");
    norms_case::<f32>(&dev, &mut rng);
    norms_case::<f16>(&dev, &mut rng);
    norms_case::<bf16>(&dev, &mut rng);
}

fn elementwise_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let sfx = T::SUFFIX;
    // GEGLU
    let (rows, d) = (333usize, 1280usize);
    let x = rounded::<T>(&randn(rng, rows * 2 * d, 2.0));
    let mut want = vec![0.0; rows * d];
    cpu::geglu(&mut want, &x, rows, d);
    let xd = dev.upload_f32::<T>(&x).unwrap();
    let mut y = poisoned::<T>(dev, rows * d);
    ops::geglu(dev, &mut y, &xd, rows, d).unwrap();
    check(
        &format!("geglu_{sfx} 333x1280"),
        &dev.download_f32(&y, want.len()).unwrap(),
        &want,
        tol::<T>(1e-6),
    );
    // SiLU
    let x = rounded::<T>(&randn(rng, 100_003, 4.0));
    let mut want = x.clone();
    cpu::silu_inplace(&mut want);
    let mut xd = dev.upload_f32::<T>(&x).unwrap();
    ops::silu_inplace(dev, &mut xd, x.len()).unwrap();
    check(
        &format!("silu_{sfx} 100003"),
        &dev.download_f32(&xd, x.len()).unwrap(),
        &want,
        tol::<T>(1e-6),
    );
    // Softmax rows
    let (rows, n) = (1000usize, 77usize);
    let x = rounded::<T>(&randn(rng, rows * n, 5.0));
    let mut want = x.clone();
    cpu::softmax_rows(&mut want, rows, n);
    let mut xd = dev.upload_f32::<T>(&x).unwrap();
    ops::softmax_rows(dev, &mut xd, rows, n).unwrap();
    check(
        &format!("softmax_rows_{sfx} 1000x77"),
        &dev.download_f32(&xd, x.len()).unwrap(),
        &want,
        tol::<T>(1e-6),
    );
    // Timestep embedding (SD 1.5: flip, shift 0), timesteps up to 999.
    let t: Vec<f32> = vec![999.0, 0.0, 500.5, 1.0];
    let dim = 320;
    let mut want = vec![0.0; t.len() * dim];
    cpu::timestep_embedding(&mut want, &t, dim, true, 0.0, 10000.0);
    let td = dev.upload(&t).unwrap();
    let mut y = poisoned::<T>(dev, want.len());
    ops::timestep_embedding(dev, &mut y, &td, t.len(), dim, (true, 0.0, 10000.0)).unwrap();
    check(
        &format!("timestep_embedding_{sfx} 4x320"),
        &dev.download_f32(&y, want.len()).unwrap(),
        &rounded::<T>(&want),
        tol::<T>(1e-6),
    );
    // Upsample
    let (planes, h, w) = (2 * 64usize, 16usize, 24usize);
    let x = rounded::<T>(&randn(rng, planes * h * w, 1.0));
    let mut want = vec![0.0; x.len() * 4];
    cpu::upsample_nearest2x(&mut want, &x, planes, h, w);
    let xd = dev.upload_f32::<T>(&x).unwrap();
    let mut y = poisoned::<T>(dev, want.len());
    ops::upsample_nearest2x(dev, &mut y, &xd, planes, h, w).unwrap();
    check(
        &format!("upsample_nearest2x_{sfx}"),
        &dev.download_f32(&y, want.len()).unwrap(),
        &want,
        0.0,
    );
    // Add, channel bias (time embedding), row bias, channel bias (conv)
    let (b, c, hw) = (2usize, 320usize, 333usize);
    let a = rounded::<T>(&randn(rng, b * c * hw, 1.0));
    let x = rounded::<T>(&randn(rng, b * c * hw, 1.0));
    let v = rounded::<T>(&randn(rng, b * c, 1.0));
    let bias = rounded::<T>(&randn(rng, c, 1.0));
    let mut want = a.clone();
    cpu::add_inplace(&mut want, &x);
    let mut ad = dev.upload_f32::<T>(&a).unwrap();
    let xd = dev.upload_f32::<T>(&x).unwrap();
    ops::add_inplace(dev, &mut ad, &xd, a.len()).unwrap();
    check(
        &format!("add_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want,
        tol::<T>(1e-7),
    );
    cpu::add_channel_bias(&mut want, &v, b, c, hw);
    let vd = dev.upload_f32::<T>(&v).unwrap();
    ops::add_channel_bias(dev, &mut ad, &vd, (b, c, hw)).unwrap();
    check(
        &format!("add_channel_bias_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want,
        tol::<T>(1e-7),
    );
    let mut want2 = want.clone();
    for (i, w) in want2.iter_mut().enumerate() {
        *w += bias[(i / hw) % c];
    }
    let bd = dev.upload_f32::<T>(&bias).unwrap();
    ops::add_bias_channels(dev, &mut ad, &bd, (b, c, hw)).unwrap();
    check(
        &format!("add_bias_channels_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want2,
        tol::<T>(1e-7),
    );
    let rows = b * hw;
    for (i, w) in want2.iter_mut().enumerate() {
        *w += bias[i % c];
    }
    ops::add_bias_rows(dev, At::from(&ad), &bd, rows, c).unwrap();
    check(
        &format!("add_bias_rows_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want2,
        tol::<T>(1e-7),
    );
    // Transpose NCHW -> NHWC and back.
    let mut want = vec![0.0; a.len()];
    cpu::nchw_to_nhwc(&mut want, &a, b, c, hw);
    let ad = dev.upload_f32::<T>(&a).unwrap();
    let mut t1 = poisoned::<T>(dev, a.len());
    ops::transpose(dev, &mut t1, &ad, b, c, hw).unwrap();
    check(
        &format!("transpose_{sfx} nchw->nhwc"),
        &dev.download_f32(&t1, a.len()).unwrap(),
        &want,
        0.0,
    );
    let mut t2 = poisoned::<T>(dev, a.len());
    ops::transpose(dev, &mut t2, &t1, b, hw, c).unwrap();
    check(
        &format!("transpose_{sfx} nhwc->nchw"),
        &dev.download_f32(&t2, a.len()).unwrap(),
        &a,
        0.0,
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn elementwise_ops_match_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("elementwise");
    elementwise_case::<f32>(&dev, &mut rng);
    elementwise_case::<f16>(&dev, &mut rng);
    elementwise_case::<bf16>(&dev, &mut rng);
}

// ---------------------------------------------------------------------------------------------
// GEMMs and convolutions
// ---------------------------------------------------------------------------------------------

/// cuBLAS may run f32 GEMMs in TF32 on some setups; 1e-5 would catch that.
fn gemm_tol<T: DeviceElem>() -> f64 {
    match T::SUFFIX {
        "f32" => 1e-5,
        "f16" => 1e-3,
        _ => 8e-3,
    }
}

fn gemm_case<T: BlasElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let sfx = T::SUFFIX;
    for &(m, k, n, with_bias) in &[
        (8192usize, 320usize, 320usize, false),
        (154, 768, 640, true),
        (7, 13, 5, true),
    ] {
        let x = rounded::<T>(&randn(rng, m * k, 1.0));
        let w = rounded::<T>(&randn(rng, n * k, 0.05));
        let bias = rounded::<T>(&randn(rng, n, 1.0));
        let mut want = vec![0.0; m * n];
        cpu::linear(&mut want, &x, &w, with_bias.then_some(&bias[..]), m, k, n);
        let (xd, wd, bd) = (
            dev.upload_f32::<T>(&x).unwrap(),
            dev.upload_f32::<T>(&w).unwrap(),
            dev.upload_f32::<T>(&bias).unwrap(),
        );
        let y = poisoned::<T>(dev, m * n);
        ops::linear(
            dev,
            At::from(&y),
            n,
            At::from(&xd),
            &wd,
            with_bias.then_some(&bd),
            (m, k, n),
        )
        .unwrap();
        check(
            &format!(
                "linear_{sfx} {m}x{k}x{n}{}",
                if with_bias { " +bias" } else { "" }
            ),
            &dev.download_f32(&y, m * n).unwrap(),
            &want,
            gemm_tol::<T>(),
        );
    }
    for &(c_in, c_out, hw, kernel, stride, padding) in &[
        (320usize, 320usize, 32usize, 3usize, 1usize, 1usize),
        (64, 128, 16, 3, 2, 1),
        (640, 320, 16, 1, 1, 0),
        (4, 32, 9, 3, 1, 1),
    ] {
        let p = Conv2d {
            batch: 2,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kernel,
            stride,
            padding,
        };
        let (oh, ow) = p.out_hw();
        let x = rounded::<T>(&randn(rng, 2 * c_in * hw * hw, 1.0));
        let w = rounded::<T>(&randn(rng, c_out * c_in * kernel * kernel, 0.05));
        let bias = rounded::<T>(&randn(rng, c_out, 1.0));
        let mut want = vec![0.0; 2 * c_out * oh * ow];
        cpu::conv2d(&mut want, &x, &w, Some(&bias), &p);
        let (xd, wd, bd) = (
            dev.upload_f32::<T>(&x).unwrap(),
            dev.upload_f32::<T>(&w).unwrap(),
            dev.upload_f32::<T>(&bias).unwrap(),
        );
        let mut y = poisoned::<T>(dev, want.len());
        let mut scratch = dev.zeros::<T>(ops::conv2d_scratch(&p).max(1)).unwrap();
        ops::conv2d(dev, &mut y, &xd, &wd, Some(&bd), &p, &mut scratch).unwrap();
        check(
            &format!("conv2d_{sfx} {c_in}->{c_out} {hw}x{hw} k{kernel} s{stride}"),
            &dev.download_f32(&y, want.len()).unwrap(),
            &want,
            gemm_tol::<T>(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn gemm_and_conv_match_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("gemm_conv");
    gemm_case::<f32>(&dev, &mut rng);
    gemm_case::<f16>(&dev, &mut rng);
    gemm_case::<bf16>(&dev, &mut rng);
}

/// `ops::conv2d_implicit` (kernels/conv_igemm.cu) against the CPU backend: the conv2d test's
/// shapes, then the edges: conv_in / conv_out channel counts (c_in 4, c_out 4), c_in 3 (rows
/// of 27, not a multiple of 8: the 2-byte weight path), odd spatial sizes, batch 3, 1x1 and
/// stride 2 with c_out past one 128-row tile, k = 7 (the range-compare gather), no bias, and a
/// small grid that the heuristic splits along K. Each shape runs with the heuristic's split
/// count; the first and the last also with no split and with 3 slices.
fn conv_implicit_case<T: BlasElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let sfx = T::SUFFIX;
    #[allow(clippy::too_many_arguments)]
    fn conv(
        batch: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Conv2d {
        Conv2d {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel,
            stride,
            padding,
        }
    }
    // (shape: batch, c_in, c_out, h, w, kernel, stride, padding; with bias)
    let shapes = [
        (conv(2, 320, 320, 32, 32, 3, 1, 1), true),
        (conv(2, 64, 128, 16, 16, 3, 2, 1), true),
        (conv(2, 640, 320, 16, 16, 1, 1, 0), true),
        (conv(2, 4, 32, 9, 9, 3, 1, 1), true),
        (conv(2, 4, 320, 16, 16, 3, 1, 1), true),
        (conv(2, 320, 4, 16, 16, 3, 1, 1), true),
        (conv(3, 3, 8, 11, 9, 3, 1, 1), true),
        (conv(3, 24, 20, 7, 5, 3, 1, 1), true),
        (conv(2, 48, 33, 7, 5, 1, 1, 0), false),
        (conv(3, 40, 136, 9, 7, 3, 2, 1), true),
        (conv(1, 16, 8, 9, 9, 7, 1, 3), true),
        (conv(2, 640, 256, 8, 8, 3, 1, 1), true),
    ];
    for (i, &(p, with_bias)) in shapes.iter().enumerate() {
        let Conv2d {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel,
            stride,
            ..
        } = p;
        let (oh, ow) = p.out_hw();
        let x = rounded::<T>(&randn(rng, batch * c_in * h * w, 1.0));
        let wt = rounded::<T>(&randn(rng, c_out * c_in * kernel * kernel, 0.05));
        let bias = rounded::<T>(&randn(rng, c_out, 1.0));
        let bias_cpu = with_bias.then_some(&bias[..]);
        let mut want = vec![0.0; batch * c_out * oh * ow];
        cpu::conv2d(&mut want, &x, &wt, bias_cpu, &p);
        let (xd, wd, bd) = (
            dev.upload_f32::<T>(&x).unwrap(),
            dev.upload_f32::<T>(&wt).unwrap(),
            dev.upload_f32::<T>(&bias).unwrap(),
        );
        let forced: &[Option<usize>] = if i == 0 || i == shapes.len() - 1 {
            &[None, Some(1), Some(3)]
        } else {
            &[None]
        };
        for &splits in forced {
            let mut y = poisoned::<T>(dev, want.len());
            let used = ops::conv2d_implicit_with(
                dev,
                &mut y,
                &xd,
                &wd,
                with_bias.then_some(&bd),
                &p,
                splits,
            )
            .unwrap();
            check(
                &format!(
                    "conv2d_implicit_{sfx} b{batch} {c_in}->{c_out} {h}x{w} k{kernel} s{stride}{} \
                     split{used}",
                    if with_bias { "" } else { " nobias" }
                ),
                &dev.download_f32(&y, want.len()).unwrap(),
                &want,
                gemm_tol::<T>(),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn conv2d_implicit_matches_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = seed("conv_implicit");
    conv_implicit_case::<f16>(&dev, &mut rng);
    conv_implicit_case::<bf16>(&dev, &mut rng);
    // f32 has no tensor-core path: Unsupported, for the caller to fall back to conv2d.
    let p = Conv2d {
        batch: 1,
        c_in: 4,
        h: 4,
        w: 4,
        c_out: 4,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let x = dev.zeros::<f32>(64).unwrap();
    let wt = dev.zeros::<f32>(144).unwrap();
    let mut y = dev.zeros::<f32>(64).unwrap();
    let e = ops::conv2d_implicit(&dev, &mut y, &x, &wt, None, &p).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    println!("cuda-parity conv2d_implicit_f32 -> Unsupported: {e}");
}

// ---------------------------------------------------------------------------------------------
// Faults: clear errors, and the device stays usable
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn faults_are_errors_and_the_device_stays_usable() {
    let Some(dev) = device() else { return };
    // More memory than any GPU has.
    match dev.zeros::<f32>(1 << 42) {
        Err(Error::OutOfMemory(msg)) => println!("cuda-fault out of memory -> OutOfMemory: {msg}"),
        other => panic!("a 16 TiB allocation gave {other:?}"),
    }
    // A buffer too small for the op: refused before launch.
    let x = dev.zeros::<f32>(10).unwrap();
    let mut y = dev.zeros::<f32>(10).unwrap();
    let e = ops::geglu(&dev, &mut y, &x, 10, 10).unwrap_err();
    println!("cuda-fault short buffer -> {e}");
    assert!(e.to_string().contains("'x'"), "{e}");
    // A head dim the kernels do not take.
    let big = dev.zeros::<f32>(2 * 300).unwrap();
    let e = ops::attention(
        &dev,
        At::from(&big),
        At::from(&big),
        At::from(&big),
        At::from(&big),
        AttnShape::dense(1, 1, 2, 2, 300),
        AttnKernel::Auto,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    // Still usable.
    let v = dev.upload(&[1.0f32, -2.0]).unwrap();
    let mut w = dev.upload(&[0.5f32, 0.25]).unwrap();
    ops::add_inplace(&dev, &mut w, &v, 2).unwrap();
    assert_eq!(dev.download(&w, 2).unwrap(), vec![1.5, -1.75]);
    println!("cuda-fault device usable after the faults: yes");
}
