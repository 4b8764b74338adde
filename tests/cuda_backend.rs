//! The [`Backend`] trait on CUDA against the CPU backend: every op of `Cuda<f32>`,
//! `Cuda<f16>` and `Cuda<bf16>` against `hdb::backend::Cpu` on fresh random inputs (the seed is
//! printed; `HDB_TEST_SEED=<n>` replays one), through the trait only (upload, op, download).
//! Half-precision cases feed the CPU the same rounded inputs and weights, so the error
//! measured is the device's own (accumulation order, one output rounding, and for the
//! tensor-core and materialised attention the rounding of P).
//!
//! Tolerances on the relative L2 error (those of tests/cuda_parity/): one-rounding ops
//! f32 1e-7..1e-5 by op, f16 1e-3, bf16 8e-3; flash and materialised attention (P rounded to
//! T) f16 2e-3, bf16 1.5e-2; layout ops exact.
//! Each case prints `cuda-backend <op> <dtype> ... rel_l2=... max_abs=...` and fails with the
//! worst element. Outputs cannot be poisoned through the trait, so before each op the harness
//! uploads and frees a NaN buffer of the output's size: a stream-ordered pool is likely to hand
//! that memory to the op's output, so an element the op fails to write shows as NaN (best
//! effort).
//!
//! Also: shape errors reported as errors, not panics. The adapter hooks are in
//! tests/cuda_adapters.rs.
//!
//! The tests are `#[ignore]`d, so a plain `cargo test` counts them as skipped; on a GPU
//! machine run them with `--include-ignored`. Without a usable GPU they print
//! `SKIPPED (no CUDA device): <reason>` and return.
//!
//!     cargo test --release --features cuda --test cuda_backend -- --include-ignored \
//!         --test-threads=1 --nocapture
#![cfg(feature = "cuda")]

mod common;
use common::cuda::{check, randn, sfx, tol, too_big_for_the_emulated_gpu};

use hdb::backend::cuda::ops::BlasElem;
use hdb::backend::cuda::{Cuda, DeviceElem};
use hdb::backend::Conv2d;
use hdb::backend::{Activation, AttnDims, Backend, Cpu, NormDims};
use hdb::io::F32Weight;
use hdb::rng::SplitMix64;
use hdb::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The flash kernels round P to T: tests/cuda_parity/'s figures.
fn flash_tol<T: DeviceElem>() -> f64 {
    match T::SUFFIX {
        "f32" => 1e-5,
        "f16" => 2e-3,
        _ => 1.5e-2,
    }
}

/// A weight from host values.
fn wt<B: Backend>(be: &B, v: &[f32]) -> Result<B::Weight> {
    be.weight(F32Weight::Owned(v.to_vec()))
}

/// Leaves `n` NaNs in memory the allocator is likely to hand out next (see the module doc).
fn poison<B: Backend>(be: &B, n: usize) -> Result<()> {
    let p = be.upload(&vec![f32::NAN; n.max(1)])?;
    drop(p);
    Ok(())
}

/// The buffer's values, checking `len` agrees with them.
fn down<B: Backend>(be: &B, y: &B::Buf) -> Result<Vec<f32>> {
    let v = be.download(y)?;
    assert_eq!(
        be.len(y),
        v.len(),
        "{}: len disagrees with download",
        be.describe()
    );
    Ok(v)
}

/// Runs `f(backend, args...)` on the CPU and on `$be`, and compares.
macro_rules! parity {
    ($be:expr, $case:expr, $tol:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        let case: String = $case;
        let want = $f(&Cpu, $($arg),*).unwrap_or_else(|e| panic!("{case} on the CPU: {e}"));
        let got = $f($be, $($arg),*).unwrap_or_else(|e| panic!("{case} on CUDA: {e}"));
        check(&case, &got, &want, $tol);
    }};
}

// ---------------------------------------------------------------------------------------------
// Op wrappers, generic over the backend: upload, op, download
// ---------------------------------------------------------------------------------------------

fn copy_op<B: Backend>(be: &B, x: &[f32]) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    let y = be.copy(&xd)?;
    drop(xd); // the copy owns its values
    down(be, &y)
}

fn weight_op<B: Backend>(be: &B, w: &[f32]) -> Result<Vec<f32>> {
    // A weight of one backend is an activation of the same storage on both backends here
    // (Cpu: F32Weight vs Vec<f32>): read it back through a linear with the identity.
    let n = w.len();
    let mut eye = vec![0.0; n * n];
    for i in 0..n {
        eye[i * n + i] = 1.0;
    }
    let x = be.upload(&eye)?;
    let wd = wt(be, w)?;
    // x [n, n] . w^T with w [1, n]: y [n, 1] = w.
    let y = be.linear(&x, &wd, None, (n, n, 1))?;
    down(be, &y)
}

fn linear_op<B: Backend>(
    be: &B,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    dims: (usize, usize, usize),
) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    let wd = wt(be, w)?;
    let bd = b.map(|b| wt(be, b)).transpose()?;
    poison(be, dims.0 * dims.2)?;
    let y = be.linear(&xd, &wd, bd.as_ref(), dims)?;
    down(be, &y)
}

fn conv_op<B: Backend>(
    be: &B,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    p: &Conv2d,
) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    let wd = wt(be, w)?;
    let bd = b.map(|b| wt(be, b)).transpose()?;
    let (oh, ow) = p.out_hw();
    poison(be, p.batch * p.c_out * oh * ow)?;
    let y = be.conv2d(&xd, &wd, bd.as_ref(), p)?;
    down(be, &y)
}

fn group_norm_op<B: Backend>(
    be: &B,
    x: &[f32],
    g: &[f32],
    b: &[f32],
    d: NormDims,
    silu: bool,
) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    let (gd, bd) = (wt(be, g)?, wt(be, b)?);
    poison(be, x.len())?;
    let y = be.group_norm(&xd, &gd, &bd, d, silu)?;
    down(be, &y)
}

fn layer_norm_op<B: Backend>(
    be: &B,
    x: &[f32],
    g: &[f32],
    b: &[f32],
    rows_dim: (usize, usize),
    eps: f32,
) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    let (gd, bd) = (wt(be, g)?, wt(be, b)?);
    poison(be, x.len())?;
    let y = be.layer_norm(&xd, &gd, &bd, rows_dim, eps)?;
    down(be, &y)
}

fn attention_op<B: Backend>(
    be: &B,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
) -> Result<Vec<f32>> {
    let (qd, kd, vd) = (be.upload(q)?, be.upload(k)?, be.upload(v)?);
    poison(be, q.len())?;
    let y = be.attention(&qd, &kd, &vd, d)?;
    down(be, &y)
}

fn activate_op<B: Backend>(be: &B, x: &[f32], act: Activation) -> Result<Vec<f32>> {
    let mut xd = be.upload(x)?;
    be.activate(&mut xd, act)?;
    down(be, &xd)
}

fn geglu_op<B: Backend>(be: &B, x: &[f32], rows_d: (usize, usize)) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    poison(be, rows_d.0 * rows_d.1)?;
    let y = be.geglu(&xd, rows_d)?;
    down(be, &y)
}

fn add_op<B: Backend>(be: &B, y: &[f32], x: &[f32]) -> Result<Vec<f32>> {
    let (mut yd, xd) = (be.upload(y)?, be.upload(x)?);
    be.add_inplace(&mut yd, &xd)?;
    down(be, &yd)
}

fn add_channel_bias_op<B: Backend>(
    be: &B,
    y: &[f32],
    v: &[f32],
    dims: (usize, usize, usize),
) -> Result<Vec<f32>> {
    let (mut yd, vd) = (be.upload(y)?, be.upload(v)?);
    be.add_channel_bias(&mut yd, &vd, dims)?;
    down(be, &yd)
}

fn timestep_op<B: Backend>(
    be: &B,
    t: &[f32],
    dim: usize,
    flip: bool,
    shift: f32,
) -> Result<Vec<f32>> {
    poison(be, t.len() * dim)?;
    let y = be.timestep_embedding(t, dim, flip, shift)?;
    down(be, &y)
}

fn transpose_op<B: Backend>(
    be: &B,
    x: &[f32],
    dims: (usize, usize, usize),
    to_tokens: bool,
) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    poison(be, x.len())?;
    let y = be.transpose(&xd, dims, to_tokens)?;
    down(be, &y)
}

/// There and back: the identity.
fn transpose_round_trip_op<B: Backend>(
    be: &B,
    x: &[f32],
    dims: (usize, usize, usize),
) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    let t = be.transpose(&xd, dims, true)?;
    let y = be.transpose(&t, dims, false)?;
    down(be, &y)
}

fn concat_op<B: Backend>(
    be: &B,
    a: &[f32],
    b: &[f32],
    dims: (usize, usize, usize, usize),
) -> Result<Vec<f32>> {
    let (ad, bd) = (be.upload(a)?, be.upload(b)?);
    poison(be, a.len() + b.len())?;
    let y = be.concat_channels(&ad, &bd, dims)?;
    down(be, &y)
}

fn upsample_op<B: Backend>(be: &B, x: &[f32], dims: (usize, usize, usize)) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    poison(be, 4 * x.len())?;
    let y = be.upsample_nearest2x(&xd, dims)?;
    down(be, &y)
}

fn pad_op<B: Backend>(be: &B, x: &[f32], (p, h, w): (usize, usize, usize)) -> Result<Vec<f32>> {
    let xd = be.upload(x)?;
    poison(be, p * (h + 1) * (w + 1))?;
    let y = be.pad_bottom_right(&xd, (p, h, w))?;
    down(be, &y)
}

// ---------------------------------------------------------------------------------------------
// Cases, one generic function per op group
// ---------------------------------------------------------------------------------------------

fn memory_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    let s = sfx(be);
    let d = be.describe();
    assert!(
        d.starts_with("cuda:") && d.ends_with(s),
        "describe() = {d:?}, expected cuda:<ordinal> {s}"
    );
    let x = randn::<T>(rng, 1001, 3.0);
    // Upload then download returns what the device holds: the rounded values, exactly.
    let xd = be.upload(&x).unwrap();
    assert_eq!(be.len(&xd), x.len());
    assert_eq!(be.download(&xd).unwrap(), x, "upload/download {s}");
    parity!(be, format!("copy {s} n1001"), 0.0, copy_op(&x));
    let w = randn::<T>(rng, 37, 1.0);
    parity!(be, format!("weight {s} n37"), tol::<T>(1e-7), weight_op(&w));
}

fn linear_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    let s = sfx(be);
    // CLIP's q projection at batch 2 with bias; odd sizes without.
    for &(rows, din, dout, bias) in &[
        (154, 768, 768, true),
        (5, 33, 17, false),
        (4096, 320, 40, true),
    ] {
        let x = randn::<T>(rng, rows * din, 1.0);
        let w = randn::<T>(rng, dout * din, 1.0 / (din as f32).sqrt());
        let b = randn::<T>(rng, dout, 0.5);
        parity!(
            be,
            format!("linear {s} [{rows}, {din}] -> {dout} bias {bias}"),
            // cuBLAS may run f32 GEMMs in TF32 on some setups; 1e-5 would catch that.
            tol::<T>(1e-5),
            linear_op(&x, &w, bias.then_some(&b[..]), (rows, din, dout))
        );
    }
}

fn conv_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    let s = sfx(be);
    let shapes = [
        // 3x3 stride 1 (resnets), padding 1
        (2, 16, 24, 20, 32, 3, 1, 1, true),
        // 3x3 stride 2 (UNet downsampler, odd sizes), padding 1
        (2, 8, 17, 15, 12, 3, 2, 1, true),
        // 3x3 stride 2 unpadded (the VAE encoder's downsampler after pad_bottom_right)
        (1, 8, 17, 17, 8, 3, 2, 0, true),
        // 1x1 (shortcuts, proj_in/out), with and without bias
        (2, 32, 10, 12, 16, 1, 1, 0, true),
        (3, 5, 7, 9, 4, 1, 1, 0, false),
        // An im2col scratch above the backend's 256 MB cap in f16/bf16 (256 x 9 x 256 x 256
        // x 2 bytes = 302 MB): the implicit GEMM runs there, as in the VAE at 512 x 512.
        (1, 256, 256, 256, 8, 3, 1, 1, true),
    ];
    for &(batch, c_in, h, w, c_out, kernel, stride, padding, bias) in &shapes {
        let p = Conv2d {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel,
            stride,
            padding,
        };
        let (oh, ow) = (
            (h + 2 * padding - kernel) / stride + 1,
            (w + 2 * padding - kernel) / stride + 1,
        );
        let work = (batch * c_out * oh * ow * c_in * kernel * kernel) as f64;
        if too_big_for_the_emulated_gpu(
            &format!("conv2d {s} b{batch} {c_in}->{c_out} {h}x{w}"),
            work,
        ) {
            continue;
        }
        let x = randn::<T>(rng, batch * c_in * h * w, 1.0);
        let fan_in = (c_in * kernel * kernel) as f32;
        let wv = randn::<T>(rng, c_out * c_in * kernel * kernel, 1.0 / fan_in.sqrt());
        let b = randn::<T>(rng, c_out, 0.5);
        parity!(
            be,
            format!(
                "conv2d {s} b{batch} {c_in}->{c_out} {h}x{w} k{kernel} s{stride} p{padding} \
                 bias {bias}"
            ),
            tol::<T>(1e-5),
            conv_op(&x, &wv, bias.then_some(&b[..]), &p)
        );
    }
}

fn norm_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    let s = sfx(be);
    for &(batch, channels, hw, groups, eps) in &[(2, 64, 100, 32, 1e-5f32), (1, 12, 33, 3, 1e-6)] {
        let d = NormDims {
            batch,
            channels,
            hw,
            groups,
            eps,
        };
        // An offset, so the mean matters.
        let x: Vec<f32> = randn::<T>(rng, batch * channels * hw, 2.0)
            .into_iter()
            .map(|v| T::from_f32(v + 0.5).to_f32())
            .collect();
        let g = randn::<T>(rng, channels, 1.0);
        let b = randn::<T>(rng, channels, 0.5);
        for silu in [false, true] {
            parity!(
                be,
                format!("group_norm {s} b{batch} c{channels} hw{hw} g{groups} silu {silu}"),
                tol::<T>(1e-5),
                group_norm_op(&x, &g, &b, d, silu)
            );
        }
    }
    for &(rows, dim) in &[(154, 768), (7, 33)] {
        let x = randn::<T>(rng, rows * dim, 2.0);
        let g = randn::<T>(rng, dim, 1.0);
        let b = randn::<T>(rng, dim, 0.5);
        parity!(
            be,
            format!("layer_norm {s} [{rows}, {dim}]"),
            tol::<T>(1e-5),
            layer_norm_op(&x, &g, &b, (rows, dim), 1e-5)
        );
    }
}

fn attention_dims_case<T: BlasElem>(
    be: &Cuda<T>,
    rng: &mut SplitMix64,
    d: AttnDims,
    what: &str,
    tol: f64,
) {
    let hd = d.heads * d.head_dim;
    let q = randn::<T>(rng, d.batch * d.lq * hd, 1.0);
    let k = randn::<T>(rng, d.batch * d.lk * hd, 1.0);
    let v = randn::<T>(rng, d.batch * d.lk * hd, 1.0);
    parity!(
        be,
        format!(
            "attention {what} {} b{} lq{} lk{} h{} d{}",
            sfx(be),
            d.batch,
            d.lq,
            d.lk,
            d.heads,
            d.head_dim
        ),
        tol,
        attention_op(&q, &k, &v, d)
    );
}

fn dims(batch: usize, lq: usize, lk: usize, heads: usize, head_dim: usize) -> AttnDims {
    AttnDims {
        batch,
        lq,
        lk,
        heads,
        head_dim,
        causal: false,
    }
}

fn causal_attention_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    // CLIP ViT-L/14's text encoder at batch 2, then odd sizes (a row's keys past one chunk of
    // 32, head dims that are not multiples of 32).
    for &(b, len, heads, d) in &[(2, 77, 12, 64), (1, 40, 2, 33), (1, 5, 3, 24), (1, 1, 1, 8)] {
        let dd = AttnDims {
            causal: true,
            ..dims(b, len, len, heads, d)
        };
        // The scalar kernel keeps P in f32: only the output is rounded.
        attention_dims_case(be, rng, dd, "causal", tol::<T>(1e-5));
    }
}

fn flash_attention_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    // Non-causal, head dim <= 256: the tensor-core kernels for f16/bf16 at 40/64/80/160, the
    // scalar kernel for f32 and other head dims.
    for &(b, lq, lk, h, d) in &[
        (2, 256, 256, 8, 40),
        (2, 256, 77, 8, 80),
        (1, 64, 77, 4, 160),
        (2, 128, 128, 5, 64),
        (1, 33, 17, 3, 24),
        (1, 20, 9, 1, 256),
    ] {
        attention_dims_case(be, rng, dims(b, lq, lk, h, d), "flash", flash_tol::<T>());
    }
}

fn materialized_attention_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    // Head dim > 256: the VAE's mid-block attention (1 head, d 512) at 16 x 16 latents, then
    // several heads (interleaved column blocks in one output row), batch 2, lq != lk.
    for &(b, lq, lk, h, d) in &[
        (1, 256, 256, 1, 512),
        (2, 100, 70, 2, 320),
        (1, 3, 1, 1, 264),
    ] {
        attention_dims_case(
            be,
            rng,
            dims(b, lq, lk, h, d),
            "materialised",
            // f32 scores; only P is rounded to T, as in the flash kernels.
            flash_tol::<T>(),
        );
    }
}

fn elementwise_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    let s = sfx(be);
    let x = randn::<T>(rng, 10007, 3.0);
    for act in [Activation::Silu, Activation::Gelu, Activation::QuickGelu] {
        parity!(
            be,
            format!("activate {act:?} {s} n10007"),
            tol::<T>(1e-6),
            activate_op(&x, act)
        );
    }
    let (rows, d) = (100, 320);
    let g = randn::<T>(rng, rows * 2 * d, 2.0);
    parity!(
        be,
        format!("geglu {s} [{rows}, 2 x {d}]"),
        tol::<T>(1e-6),
        geglu_op(&g, (rows, d))
    );
    let (y, a) = (randn::<T>(rng, 5003, 1.0), randn::<T>(rng, 5003, 1.0));
    parity!(be, format!("add {s} n5003"), tol::<T>(1e-7), add_op(&y, &a));
    let (batch, c, hw) = (2, 64, 50);
    let y = randn::<T>(rng, batch * c * hw, 1.0);
    let v = randn::<T>(rng, batch * c, 1.0);
    parity!(
        be,
        format!("add_channel_bias {s} b{batch} c{c} hw{hw}"),
        tol::<T>(1e-7),
        add_channel_bias_op(&y, &v, (batch, c, hw))
    );
    let t = [999.0f32, 1.0, 500.5, 0.0];
    for &(dim, flip, shift) in &[(320, true, 0.0f32), (33, false, 1.0)] {
        parity!(
            be,
            format!("timestep_embedding {s} n4 dim{dim} flip {flip} shift {shift}"),
            tol::<T>(1e-6),
            timestep_op(&t, dim, flip, shift)
        );
    }
}

fn layout_case<T: BlasElem>(be: &Cuda<T>, rng: &mut SplitMix64) {
    let s = sfx(be);
    // Layout ops move values: exact.
    for &(b, c, hw) in &[(2, 48, 35), (1, 320, 64), (3, 1, 7)] {
        let x = randn::<T>(rng, b * c * hw, 1.0);
        for to_tokens in [true, false] {
            parity!(
                be,
                format!("transpose {s} b{b} c{c} hw{hw} to_tokens {to_tokens}"),
                0.0,
                transpose_op(&x, (b, c, hw), to_tokens)
            );
        }
        let back = transpose_round_trip_op(be, &x, (b, c, hw)).expect("round trip");
        assert_eq!(back, x, "transpose {s} b{b} c{c} hw{hw}: there and back");
    }
    for &(b, ca, cb, hw) in &[(2, 5, 7, 30), (1, 640, 320, 64)] {
        let a = randn::<T>(rng, b * ca * hw, 1.0);
        let bb = randn::<T>(rng, b * cb * hw, 1.0);
        parity!(
            be,
            format!("concat_channels {s} b{b} {ca}+{cb} hw{hw}"),
            0.0,
            concat_op(&a, &bb, (b, ca, cb, hw))
        );
    }
    for &(p, h, w) in &[(6, 9, 11), (2, 1, 1), (256, 16, 16)] {
        let x = randn::<T>(rng, p * h * w, 1.0);
        parity!(
            be,
            format!("upsample_nearest2x {s} [{p}, {h}, {w}]"),
            0.0,
            upsample_op(&x, (p, h, w))
        );
        parity!(
            be,
            format!("pad_bottom_right {s} [{p}, {h}, {w}]"),
            0.0,
            pad_op(&x, (p, h, w))
        );
    }
}

/// Shape mistakes are `Error::Internal` (or `Unsupported`), not panics or device faults.
fn errors_case<T: BlasElem>(be: &Cuda<T>, _: &mut SplitMix64) {
    let s = sfx(be);
    let x = be.upload(&[1.0; 12]).unwrap();
    let w = wt(be, &[1.0; 8]).unwrap();
    let internal = |what: &str, r: Result<()>| match r {
        Err(Error::Internal(m)) => println!("cuda-backend errors {s} {what}: {m}"),
        other => panic!("{what} ({s}): expected Error::Internal, got {other:?}"),
    };
    internal("linear x", be.linear(&x, &w, None, (5, 2, 4)).map(|_| ()));
    internal(
        "linear weight",
        be.linear(&x, &w, None, (3, 4, 3)).map(|_| ()),
    );
    let p = Conv2d {
        batch: 1,
        c_in: 3,
        h: 2,
        w: 2,
        c_out: 1,
        kernel: 3,
        stride: 1,
        padding: 0,
    };
    let w27 = wt(be, &[1.0; 27]).unwrap();
    internal(
        "conv2d kernel larger than the image",
        be.conv2d(&x, &w27, None, &p).map(|_| ()),
    );
    let causal = AttnDims {
        batch: 1,
        lq: 3,
        lk: 2,
        heads: 1,
        head_dim: 2,
        causal: true,
    };
    let q = be.upload(&[0.5; 6]).unwrap();
    let kv = be.upload(&[0.5; 4]).unwrap();
    internal(
        "causal lq != lk",
        be.attention(&q, &kv, &kv, causal).map(|_| ()),
    );
    let g = wt(be, &[1.0; 4]).unwrap();
    let nd = NormDims {
        batch: 1,
        channels: 4,
        hw: 3,
        groups: 3,
        eps: 1e-5,
    };
    internal(
        "group_norm groups",
        be.group_norm(&x, &g, &g, nd, false).map(|_| ()),
    );
    let mut y = be.upload(&[0.0; 11]).unwrap();
    internal("add lengths", be.add_inplace(&mut y, &x));
    internal(
        "transpose dims",
        be.transpose(&x, (2, 3, 3), true).map(|_| ()),
    );
    internal(
        "pad_bottom_right dims",
        be.pad_bottom_right(&x, (1, 3, 5)).map(|_| ()),
    );
    internal(
        "timestep_embedding of no timesteps",
        be.timestep_embedding(&[], 8, true, 0.0).map(|_| ()),
    );
    // The device still works.
    be.dev()
        .synchronize()
        .expect("device usable after the errors");
}

// ---------------------------------------------------------------------------------------------
// Tests: every op on f32, f16 and bf16
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn memory_ops_match_cpu() {
    every_dtype!("memory_ops", memory_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn linear_matches_cpu() {
    every_dtype!("linear", linear_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn conv2d_matches_cpu() {
    every_dtype!("conv2d", conv_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn norms_match_cpu() {
    every_dtype!("norms", norm_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn causal_attention_matches_cpu() {
    every_dtype!("causal_attention", causal_attention_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn flash_attention_matches_cpu() {
    every_dtype!("flash_attention", flash_attention_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn materialized_attention_matches_cpu() {
    every_dtype!("materialized_attention", materialized_attention_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn elementwise_ops_match_cpu() {
    every_dtype!("elementwise", elementwise_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn layout_ops_match_cpu() {
    every_dtype!("layout", layout_case);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn shape_errors_are_errors() {
    every_dtype!("errors", errors_case);
}

/// `hdb bench cuda --smoke` times nothing worth comparing, so it refuses a peer, naming the
/// flag, before opening any device (no GPU needed).
#[test]
fn bench_smoke_refuses_a_peer() {
    // scripts/gpu-check.sh names the binary it carried to the GPU machine (the build's path
    // is not there).
    let hdb =
        std::env::var_os("HDB_TEST_HDB_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_hdb").into());
    let out = std::process::Command::new(hdb)
        .args(["bench", "cuda", "--smoke", "--peer-python", "python3"])
        .output()
        .expect("running hdb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "hdb accepted --smoke with a peer");
    assert!(
        err.contains("--peer-python") && err.contains("--smoke"),
        "the error should name --peer-python and --smoke: {err}"
    );
}
