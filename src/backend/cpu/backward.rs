//! The backward passes of the ops the UNet and the text encoder run, for training adapters:
//! input gradients only (weights are frozen; an adapter's own factors get their gradients in
//! `crate::adapter`'s hooks), f32, statistics and reductions in f64 where they sum many terms.
//! Each function's forward is its namesake in this module's siblings; the formulas are
//! torch autograd's, checked against it in the tests (f64 references from
//! tools/make_grad_fixtures.py) and against finite differences.

use super::linear::{gemm_raw, par_for, Mat};
use super::SendPtr;
use crate::backend::api::{Activation, Conv2d};
use gemm::Parallelism;
use rayon::prelude::*;

/// dx [rows, din] = dy [rows, dout] · w [dout, din]: the input gradient of `y = x w^T + b`.
pub fn linear_backward(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    rows: usize,
    din: usize,
    dout: usize,
) {
    assert_eq!(dx.len(), rows * din, "linear_backward: dx");
    assert_eq!(dy.len(), rows * dout, "linear_backward: dy");
    assert_eq!(w.len(), dout * din, "linear_backward: w");
    // SAFETY: lengths checked; dx is a distinct &mut.
    unsafe {
        gemm_raw(
            dx.as_mut_ptr(),
            din,
            Mat::new(dy, dout, 1),
            Mat::new(w, din, 1),
            rows,
            dout,
            din,
            false,
            1.0,
            par_for(rows * dout * din),
        )
    }
}

/// The input gradient of [`super::conv2d`]: dy [batch, c_out, oh, ow] -> dx [batch, c_in, h, w]
/// (torch's `conv_transpose2d(dy, w, stride, padding)` cropped to h x w).
///
/// For a 3x3, stride 1, padding 1 convolution that is the same convolution of dy with the
/// filters transposed (c_in <-> c_out) and flipped; from 32x32 planes up it runs as Winograd
/// F(2x2, 3x3), which transposes and flips while transforming the filters (measured on 2 Zen 5
/// cores, batch 1: 2.7-3.1x col2im at 64x64, 1.3-1.7x at 32x32, AVX-512 and AVX2). Otherwise,
/// per image, the column gradient `w^T · dy` [c_in k k, oh ow] is scattered back onto the input
/// (col2im).
pub fn conv2d_backward(dx: &mut [f32], dy: &[f32], w: &[f32], p: &Conv2d) {
    let (oh, ow) = p.out_hw();
    assert_eq!(
        dx.len(),
        p.batch * p.c_in * p.h * p.w,
        "conv2d_backward: dx"
    );
    assert_eq!(dy.len(), p.batch * p.c_out * oh * ow, "conv2d_backward: dy");
    assert_eq!(
        w.len(),
        p.c_out * p.c_in * p.kernel * p.kernel,
        "conv2d_backward: w"
    );
    if dx.is_empty() {
        return;
    }
    if super::winograd::applies(p) {
        super::winograd::conv3x3_input_grad(dx, dy, w, p);
    } else {
        conv2d_backward_col2im(dx, dy, w, p);
    }
}

/// [`conv2d_backward`] by col2im, for any stride and padding (lengths checked by the caller).
fn conv2d_backward_col2im(dx: &mut [f32], dy: &[f32], w: &[f32], p: &Conv2d) {
    let (oh, ow) = p.out_hw();
    let (k, ohw, hw) = (p.kernel, oh * ow, p.h * p.w);
    let ckk = p.c_in * k * k;
    let direct = k == 1 && p.stride == 1 && p.padding == 0;
    let mut col = if direct {
        Vec::new()
    } else {
        vec![0f32; ckk * ohw]
    };
    for b in 0..p.batch {
        let dyb = &dy[b * p.c_out * ohw..][..p.c_out * ohw];
        let dxb = &mut dx[b * p.c_in * hw..][..p.c_in * hw];
        // w^T [ckk, c_out] · dy_b [c_out, ohw]
        let wt = Mat::new(w, 1, ckk);
        let out: &mut [f32] = if direct { dxb } else { &mut col };
        // SAFETY: out is ckk x ohw (direct: c_in x hw, the same), operands in bounds.
        unsafe {
            gemm_raw(
                out.as_mut_ptr(),
                ohw,
                wt,
                Mat::new(dyb, ohw, 1),
                ckk,
                p.c_out,
                ohw,
                false,
                1.0,
                par_for(ckk * p.c_out * ohw),
            )
        };
        if direct {
            continue;
        }
        // col2im: every input plane collects its k*k rows of the column gradient.
        let col = &col;
        dxb.par_chunks_mut(hw).enumerate().for_each(|(c, plane)| {
            plane.fill(0.0);
            for ki in 0..k {
                for kj in 0..k {
                    let row = &col[((c * k + ki) * k + kj) * ohw..][..ohw];
                    for oy in 0..oh {
                        let iy = (oy * p.stride + ki) as isize - p.padding as isize;
                        if iy < 0 || iy >= p.h as isize {
                            continue;
                        }
                        let prow = &mut plane[iy as usize * p.w..][..p.w];
                        for ox in 0..ow {
                            let ix = (ox * p.stride + kj) as isize - p.padding as isize;
                            if ix >= 0 && ix < p.w as isize {
                                prow[ix as usize] += row[oy * ow + ox];
                            }
                        }
                    }
                }
            }
        });
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// d/dx of SiLU at x.
fn silu_grad(x: f64) -> f64 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// d/dx of exact GELU at x: Phi(x) + x phi(x).
fn gelu_grad(x: f64) -> f64 {
    let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    cdf + x * pdf
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// d/dx of quick GELU, x sigmoid(1.702 x).
fn quick_gelu_grad(x: f64) -> f64 {
    let s = sigmoid(1.702 * x);
    s + 1.702 * x * s * (1.0 - s)
}

/// dx = dy * act'(x), x being the activation's input.
pub fn activation_backward(dx: &mut [f32], x: &[f32], dy: &[f32], act: Activation) {
    assert_eq!(x.len(), dx.len(), "activation_backward: x");
    assert_eq!(dy.len(), dx.len(), "activation_backward: dy");
    let grad: fn(f64) -> f64 = match act {
        Activation::Silu => silu_grad,
        Activation::Gelu => gelu_grad,
        Activation::QuickGelu => quick_gelu_grad,
    };
    dx.par_iter_mut()
        .zip(x.par_iter().zip(dy.par_iter()))
        .with_min_len(4096)
        .for_each(|(d, (&x, &g))| *d = (g as f64 * grad(x as f64)) as f32);
}

/// The input gradient of [`super::geglu`]: x [rows, 2d] = [a, g] its input, dy [rows, d] ->
/// dx [rows, 2d] = [dy gelu(g), dy a gelu'(g)].
pub fn geglu_backward(dx: &mut [f32], x: &[f32], dy: &[f32], rows: usize, d: usize) {
    assert_eq!(x.len(), rows * 2 * d, "geglu_backward: x");
    assert_eq!(dx.len(), x.len(), "geglu_backward: dx");
    assert_eq!(dy.len(), rows * d, "geglu_backward: dy");
    if d == 0 {
        return;
    }
    dx.par_chunks_mut(2 * d)
        .zip(x.par_chunks(2 * d).zip(dy.par_chunks(d)))
        .with_min_len((4096 / d).max(1))
        .for_each(|(dxr, (xr, dyr))| {
            let (da, dg) = dxr.split_at_mut(d);
            let (a, g) = xr.split_at(d);
            for i in 0..d {
                let (gy, gv) = (dyr[i] as f64, g[i] as f64);
                da[i] = (gy * gelu(gv)) as f32;
                dg[i] = (gy * a[i] as f64 * gelu_grad(gv)) as f32;
            }
        });
}

/// `dx = rstd (dxh - mean(dxh) - xh mean(dxh xh))` over one normalised run, where `xh` is the
/// normalised input and `dxh` the gradient at it; `xh` and `dxh` are given as functions of the
/// element index so group and layer norms share this.
fn norm_run_backward(
    dx: &mut [f32],
    n: usize,
    rstd: f64,
    xh: impl Fn(usize) -> f64,
    dxh: impl Fn(usize) -> f64,
) {
    let (mut s1, mut s2) = (0f64, 0f64);
    for i in 0..n {
        let g = dxh(i);
        s1 += g;
        s2 += g * xh(i);
    }
    let (m1, m2) = (s1 / n as f64, s2 / n as f64);
    for (i, d) in dx.iter_mut().enumerate().take(n) {
        *d = (rstd * (dxh(i) - m1 - xh(i) * m2)) as f32;
    }
}

/// (mean, 1/sqrt(var + eps)) in f64, biased variance, two-pass as the forward.
fn stats(x: &[f32], eps: f32) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// The input gradient of [`super::group_norm`] (with SiLU after it when `silu`), x [batch,
/// channels, hw] its input; statistics are recomputed.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    dx: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    (batch, channels, hw, groups): (usize, usize, usize, usize),
    eps: f32,
    silu: bool,
) {
    assert_eq!(x.len(), batch * channels * hw, "group_norm_backward: x");
    assert_eq!(dx.len(), x.len(), "group_norm_backward: dx");
    assert_eq!(dy.len(), x.len(), "group_norm_backward: dy");
    assert_eq!(gamma.len(), channels, "group_norm_backward: gamma");
    assert_eq!(beta.len(), channels, "group_norm_backward: beta");
    assert!(
        groups > 0 && channels % groups == 0,
        "group_norm_backward: groups"
    );
    let cg = channels / groups;
    let len = cg * hw;
    if len == 0 {
        return;
    }
    dx.par_chunks_mut(len)
        .zip(x.par_chunks(len).zip(dy.par_chunks(len)))
        .enumerate()
        .for_each(|(gi, (dx, (x, dy)))| {
            let (mean, rstd) = stats(x, eps);
            let c0 = (gi % groups) * cg;
            let xh = |i: usize| (x[i] as f64 - mean) * rstd;
            let dxh = |i: usize| {
                let c = c0 + i / hw;
                let g = gamma[c] as f64;
                let mut d = dy[i] as f64;
                if silu {
                    d *= silu_grad(xh(i) * g + beta[c] as f64);
                }
                d * g
            };
            norm_run_backward(dx, len, rstd, xh, dxh);
        });
}

/// The input gradient of [`super::layer_norm`] over the last dim of x [rows, dim].
pub fn layer_norm_backward(
    dx: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    dy: &[f32],
    rows: usize,
    dim: usize,
    eps: f32,
) {
    assert_eq!(x.len(), rows * dim, "layer_norm_backward: x");
    assert_eq!(dx.len(), x.len(), "layer_norm_backward: dx");
    assert_eq!(dy.len(), x.len(), "layer_norm_backward: dy");
    assert_eq!(gamma.len(), dim, "layer_norm_backward: gamma");
    if dim == 0 {
        return;
    }
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(dy.par_chunks(dim)))
        .with_min_len((4096 / dim).max(1))
        .for_each(|(dx, (x, dy))| {
            let (mean, rstd) = stats(x, eps);
            norm_run_backward(
                dx,
                dim,
                rstd,
                |i| (x[i] as f64 - mean) * rstd,
                |i| dy[i] as f64 * gamma[i] as f64,
            );
        });
}

/// dx [planes, h, w]: the sum of each 2x2 block of dy [planes, 2h, 2w] (nearest upsampling's
/// input gradient).
pub fn upsample_nearest2x_backward(dx: &mut [f32], dy: &[f32], planes: usize, h: usize, w: usize) {
    assert_eq!(dx.len(), planes * h * w, "upsample_backward: dx");
    assert_eq!(dy.len(), 4 * dx.len(), "upsample_backward: dy");
    if dx.is_empty() {
        return;
    }
    dx.par_chunks_mut(w)
        .enumerate()
        .with_min_len((4096 / w).max(1))
        .for_each(|(r, row)| {
            let (p, y) = (r / h, r % h);
            let top = &dy[(p * 2 * h + 2 * y) * 2 * w..][..2 * w];
            let bottom = &dy[(p * 2 * h + 2 * y + 1) * 2 * w..][..2 * w];
            for (x, d) in row.iter_mut().enumerate() {
                *d = top[2 * x] + top[2 * x + 1] + bottom[2 * x] + bottom[2 * x + 1];
            }
        });
}

/// Query rows per tile of [`attention_backward`].
const BWD_TQ: usize = 128;

/// The input gradients of attention (`out = softmax(q k^T / sqrt(d) [+ causal mask]) v`, the
/// layouts of [`super::attention()`]): (dq, dk, dv) from dout. The probabilities are recomputed
/// one query tile at a time, so memory is a [tile, lk] score block per worker, never lq x lk.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    (batch, lq, lk, heads, d): (usize, usize, usize, usize, usize),
    causal: bool,
) {
    let hd = heads * d;
    assert_eq!(q.len(), batch * lq * hd, "attention_backward: q");
    assert_eq!(dout.len(), q.len(), "attention_backward: dout");
    assert_eq!(dq.len(), q.len(), "attention_backward: dq");
    assert_eq!(k.len(), batch * lk * hd, "attention_backward: k");
    assert_eq!(v.len(), k.len(), "attention_backward: v");
    assert_eq!(dk.len(), k.len(), "attention_backward: dk");
    assert_eq!(dv.len(), k.len(), "attention_backward: dv");
    assert!(
        !causal || lq == lk,
        "attention_backward: causal needs lq == lk"
    );
    if q.is_empty() || lk == 0 {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let tq = BWD_TQ.min(lq);
    let (dqp, dkp, dvp) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    // One task per (batch, head): it owns that head's columns of dq, dk and dv.
    (0..batch * heads).into_par_iter().for_each_init(
        || (vec![0f32; tq * lk], vec![0f32; tq * lk]),
        |(p, dp), bh| {
            let (b, h) = (bh / heads, bh % heads);
            let col = h * d;
            let kv0 = b * lk * hd + col;
            let km = Mat::new(&k[kv0..], hd, 1);
            let vm = Mat::new(&v[kv0..], hd, 1);
            let mut first = true;
            for q0 in (0..lq).step_by(tq) {
                let mq = tq.min(lq - q0);
                let q_at = (b * lq + q0) * hd + col;
                let qm = Mat::new(&q[q_at..], hd, 1);
                let dom = Mat::new(&dout[q_at..], hd, 1);
                let (p, dp) = (&mut p[..mq * lk], &mut dp[..mq * lk]);
                // SAFETY (all gemms): the tiles are mq x lk, rows of this head's columns stay
                // inside q/k/v/dout/dq/dk/dv (lengths checked), and only this task writes the
                // head's columns of dq, dk and dv.
                unsafe {
                    // S = scale Q K^T, then P = softmax(S) (masked above the diagonal).
                    gemm_raw(
                        p.as_mut_ptr(),
                        lk,
                        qm,
                        km.t(),
                        mq,
                        d,
                        lk,
                        false,
                        scale,
                        Parallelism::None,
                    );
                    // dP = dO V^T
                    gemm_raw(
                        dp.as_mut_ptr(),
                        lk,
                        dom,
                        vm.t(),
                        mq,
                        d,
                        lk,
                        false,
                        1.0,
                        Parallelism::None,
                    );
                }
                for i in 0..mq {
                    let row = &mut p[i * lk..][..lk];
                    let visible = if causal { q0 + i + 1 } else { lk };
                    let mx = row[..visible]
                        .iter()
                        .cloned()
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f64;
                    for x in &mut row[..visible] {
                        *x = (*x - mx).exp();
                        sum += *x as f64;
                    }
                    let inv = (1.0 / sum) as f32;
                    row[..visible].iter_mut().for_each(|x| *x *= inv);
                    row[visible..].fill(0.0);
                    // dS = P (dP - sum_j P dP), written over dP
                    let dprow = &mut dp[i * lk..][..lk];
                    let dot: f64 = row
                        .iter()
                        .zip(dprow.iter())
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    for (g, &pv) in dprow.iter_mut().zip(row.iter()) {
                        *g = pv * (*g - dot as f32);
                    }
                }
                let (pm, dsm) = (Mat::new(p, lk, 1), Mat::new(dp, lk, 1));
                unsafe {
                    // dQ = scale dS K
                    gemm_raw(
                        dqp.get().add(q_at),
                        hd,
                        dsm,
                        km,
                        mq,
                        lk,
                        d,
                        false,
                        scale,
                        Parallelism::None,
                    );
                    // dK += scale dS^T Q
                    gemm_raw(
                        dkp.get().add(kv0),
                        hd,
                        dsm.t(),
                        qm,
                        lk,
                        mq,
                        d,
                        !first,
                        scale,
                        Parallelism::None,
                    );
                    // dV += P^T dO
                    gemm_raw(
                        dvp.get().add(kv0),
                        hd,
                        pm.t(),
                        dom,
                        lk,
                        mq,
                        d,
                        !first,
                        1.0,
                        Parallelism::None,
                    );
                }
                first = false;
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, rand_vec};

    /// The Winograd input gradient (3x3 convolutions of 32x32 planes and up) equals col2im's
    /// on 1 and 3 threads, for odd and even sizes; tolerance 1e-5 x max|col2im|. col2im itself
    /// is checked against torch (tests/grad_ops.rs).
    #[test]
    fn same_size_conv_gradient_equals_col2im() {
        for (batch, c_in, h, w, c_out, kernel) in [
            (2, 8, 33, 35, 9, 3),
            (1, 10, 32, 40, 8, 3),
            (1, 9, 45, 31, 17, 3),
        ] {
            let p = Conv2d {
                batch,
                c_in,
                h,
                w,
                c_out,
                kernel,
                stride: 1,
                padding: 1,
            };
            let dy = rand_vec(batch * c_out * h * w, 40);
            let wt = rand_vec(c_out * c_in * kernel * kernel, 41);
            assert!(crate::backend::cpu::winograd::applies(&p), "{p:?}");
            let mut want = vec![f32::NAN; batch * c_in * h * w];
            conv2d_backward_col2im(&mut want, &dy, &wt, &p);
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                let pool = pool.unwrap_or_else(|e| panic!("thread pool: {e}"));
                let mut dx = vec![f32::NAN; want.len()];
                pool.install(|| conv2d_backward(&mut dx, &dy, &wt, &p));
                assert_close(&format!("{p:?}, {threads} threads"), &dx, &want, 1e-5);
            }
        }
    }
}
