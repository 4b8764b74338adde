//! [`Cpu`]: the CPU ops of this module behind the [`Backend`] trait. Activations are
//! `Vec<f32>`; weights are [`F32Weight`]s, borrowed from the mapped file where it stores f32.
//! Lengths are checked here, so a shape mistake in model code is an `Error::Internal` naming
//! the op, not a panic in the op's own assertions.

use super::backward as bwd;
use super::{
    add_channel_bias, add_inplace, attention, concat_channels, conv2d, geglu, gelu_inplace,
    group_norm, layer_norm, linear, nchw_to_nhwc, nhwc_to_nchw, silu_inplace, timestep_embedding,
    upsample_nearest2x,
};
use crate::backend::api::Conv2d;
use crate::backend::api::{check_len, shapes, volume, Activation, AttnDims, Backend, NormDims};
use crate::error::Result;
use crate::io::F32Weight;

/// The CPU backend: f32 compute on the runtime's thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Weight = F32Weight;

    fn describe(&self) -> String {
        "cpu f32".into()
    }

    fn weight(&self, w: F32Weight) -> Result<F32Weight> {
        Ok(w)
    }

    fn host_f32(w: &F32Weight) -> Option<&[f32]> {
        Some(w)
    }

    fn upload(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn download(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }

    fn copy(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        let mut y = super::zeroed(x.len());
        y.copy_from_slice(x);
        Ok(y)
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &F32Weight,
        b: Option<&F32Weight>,
        (rows, din, dout): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let n = shapes::linear(x.len(), w.len(), b.map(|b| b.len()), (rows, din, dout))?;
        let mut y = super::zeroed(n);
        linear(&mut y, x, w, b.map(|b| &b[..]), rows, din, dout);
        Ok(y)
    }

    fn conv2d(
        &self,
        x: &Vec<f32>,
        w: &F32Weight,
        b: Option<&F32Weight>,
        p: &Conv2d,
    ) -> Result<Vec<f32>> {
        let n = shapes::conv2d(x.len(), w.len(), b.map(|b| b.len()), p)?;
        let mut y = super::zeroed(n);
        conv2d(&mut y, x, w, b.map(|b| &b[..]), p);
        Ok(y)
    }

    fn group_norm(
        &self,
        x: &Vec<f32>,
        gamma: &F32Weight,
        beta: &F32Weight,
        d: NormDims,
        silu: bool,
    ) -> Result<Vec<f32>> {
        shapes::group_norm(x.len(), gamma.len(), beta.len(), &d)?;
        let mut y = super::zeroed(x.len());
        group_norm(
            &mut y, x, gamma, beta, d.batch, d.channels, d.hw, d.groups, d.eps, silu,
        );
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &Vec<f32>,
        gamma: &F32Weight,
        beta: &F32Weight,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<Vec<f32>> {
        shapes::layer_norm(x.len(), gamma.len(), beta.len(), (rows, dim))?;
        let mut y = super::zeroed(x.len());
        layer_norm(&mut y, x, gamma, beta, rows, dim, eps);
        Ok(y)
    }

    fn attention(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, d: AttnDims) -> Result<Vec<f32>> {
        shapes::attention(q.len(), k.len(), v.len(), &d)?;
        let mut out = super::zeroed(q.len());
        if d.causal {
            causal_attention(&mut out, q, k, v, d);
        } else {
            attention(&mut out, q, k, v, d.batch, d.lq, d.lk, d.heads, d.head_dim);
        }
        Ok(out)
    }

    fn activate(&self, x: &mut Vec<f32>, act: Activation) -> Result<()> {
        match act {
            Activation::Silu => silu_inplace(x),
            Activation::Gelu => gelu_inplace(x),
            Activation::QuickGelu => super::par_each(x, super::PAR_CHUNK, |s| {
                s.iter_mut()
                    .for_each(|v| *v *= 1.0 / (1.0 + (-1.702 * *v).exp()))
            }),
        }
        Ok(())
    }

    fn geglu(&self, x: &Vec<f32>, (rows, d): (usize, usize)) -> Result<Vec<f32>> {
        let mut y = super::zeroed(shapes::geglu(x.len(), (rows, d))?);
        geglu(&mut y, x, rows, d);
        Ok(y)
    }

    fn add_inplace(&self, y: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        check_len("add", "x", x.len(), y.len())?;
        add_inplace(y, x);
        Ok(())
    }

    fn add_channel_bias(
        &self,
        y: &mut Vec<f32>,
        v: &Vec<f32>,
        (batch, channels, hw): (usize, usize, usize),
    ) -> Result<()> {
        shapes::add_channel_bias(y.len(), v.len(), (batch, channels, hw))?;
        add_channel_bias(y, v, batch, channels, hw);
        Ok(())
    }

    fn timestep_embedding(
        &self,
        t: &[f32],
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f32,
    ) -> Result<Vec<f32>> {
        let mut y = super::zeroed(volume("timestep_embedding", &[t.len(), dim])?);
        timestep_embedding(&mut y, t, dim, flip_sin_to_cos, shift, 10000.0);
        Ok(y)
    }

    fn transpose(
        &self,
        x: &Vec<f32>,
        (batch, c, hw): (usize, usize, usize),
        to_tokens: bool,
    ) -> Result<Vec<f32>> {
        shapes::transpose(x.len(), (batch, c, hw))?;
        let mut y = super::zeroed(x.len());
        if to_tokens {
            nchw_to_nhwc(&mut y, x, batch, c, hw);
        } else {
            nhwc_to_nchw(&mut y, x, batch, c, hw);
        }
        Ok(y)
    }

    fn concat_channels(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        (batch, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut y = super::zeroed(shapes::concat_channels(
            a.len(),
            b.len(),
            (batch, ca, cb, hw),
        )?);
        concat_channels(&mut y, a, b, batch, ca, cb, hw);
        Ok(y)
    }

    fn upsample_nearest2x(
        &self,
        x: &Vec<f32>,
        (planes, h, w): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut y = super::zeroed(shapes::upsample_nearest2x(x.len(), (planes, h, w))?);
        upsample_nearest2x(&mut y, x, planes, h, w);
        Ok(y)
    }

    fn pad_bottom_right(
        &self,
        x: &Vec<f32>,
        (planes, h, w): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut y = super::zeroed(shapes::pad_bottom_right(x.len(), (planes, h, w))?);
        let (ph, pw) = (h + 1, w + 1);
        if w > 0 {
            for (yp, xp) in y.chunks_exact_mut(ph * pw).zip(x.chunks_exact(h * w)) {
                for (yr, xr) in yp.chunks_exact_mut(pw).zip(xp.chunks_exact(w)) {
                    yr[..w].copy_from_slice(xr);
                }
            }
        }
        Ok(y)
    }

    fn linear_backward(
        &self,
        dy: &Vec<f32>,
        w: &F32Weight,
        (rows, din, dout): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let op = "linear_backward";
        check_len(op, "dy", dy.len(), volume(op, &[rows, dout])?)?;
        check_len(op, "weight", w.len(), volume(op, &[dout, din])?)?;
        let mut dx = super::zeroed(volume(op, &[rows, din])?);
        bwd::linear_backward(&mut dx, dy, w, rows, din, dout);
        Ok(dx)
    }

    fn conv2d_backward(&self, dy: &Vec<f32>, w: &F32Weight, p: &Conv2d) -> Result<Vec<f32>> {
        let op = "conv2d_backward";
        let out = shapes::conv2d(volume(op, &[p.batch, p.c_in, p.h, p.w])?, w.len(), None, p)?;
        check_len(op, "dy", dy.len(), out)?;
        let mut dx = super::zeroed(volume(op, &[p.batch, p.c_in, p.h, p.w])?);
        bwd::conv2d_backward(&mut dx, dy, w, p);
        Ok(dx)
    }

    fn group_norm_backward(
        &self,
        x: &Vec<f32>,
        gamma: &F32Weight,
        beta: &F32Weight,
        dy: &Vec<f32>,
        d: NormDims,
        silu: bool,
    ) -> Result<Vec<f32>> {
        shapes::group_norm(x.len(), gamma.len(), beta.len(), &d)?;
        check_len("group_norm_backward", "dy", dy.len(), x.len())?;
        let mut dx = super::zeroed(x.len());
        let dims = (d.batch, d.channels, d.hw, d.groups);
        bwd::group_norm_backward(&mut dx, x, gamma, beta, dy, dims, d.eps, silu);
        Ok(dx)
    }

    fn layer_norm_backward(
        &self,
        x: &Vec<f32>,
        gamma: &F32Weight,
        dy: &Vec<f32>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<Vec<f32>> {
        shapes::layer_norm(x.len(), gamma.len(), gamma.len(), (rows, dim))?;
        check_len("layer_norm_backward", "dy", dy.len(), x.len())?;
        let mut dx = super::zeroed(x.len());
        bwd::layer_norm_backward(&mut dx, x, gamma, dy, rows, dim, eps);
        Ok(dx)
    }

    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        dout: &Vec<f32>,
        d: AttnDims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        shapes::attention(q.len(), k.len(), v.len(), &d)?;
        check_len("attention_backward", "dout", dout.len(), q.len())?;
        let (mut dq, mut dk, mut dv) = (
            super::zeroed(q.len()),
            super::zeroed(k.len()),
            super::zeroed(v.len()),
        );
        let dims = (d.batch, d.lq, d.lk, d.heads, d.head_dim);
        bwd::attention_backward(&mut dq, &mut dk, &mut dv, q, k, v, dout, dims, d.causal);
        Ok((dq, dk, dv))
    }

    fn activate_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, act: Activation) -> Result<Vec<f32>> {
        check_len("activate_backward", "dy", dy.len(), x.len())?;
        let mut dx = super::zeroed(x.len());
        bwd::activation_backward(&mut dx, x, dy, act);
        Ok(dx)
    }

    fn geglu_backward(
        &self,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        (rows, d): (usize, usize),
    ) -> Result<Vec<f32>> {
        let n = shapes::geglu(x.len(), (rows, d))?;
        check_len("geglu_backward", "dy", dy.len(), n)?;
        let mut dx = super::zeroed(x.len());
        bwd::geglu_backward(&mut dx, x, dy, rows, d);
        Ok(dx)
    }

    fn upsample_nearest2x_backward(
        &self,
        dy: &Vec<f32>,
        (planes, h, w): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let op = "upsample_nearest2x_backward";
        let n = volume(op, &[planes, h, w])?;
        check_len(op, "dy", dy.len(), volume(op, &[4, n])?)?;
        let mut dx = super::zeroed(n);
        bwd::upsample_nearest2x_backward(&mut dx, dy, planes, h, w);
        Ok(dx)
    }

    fn outer_f32(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        (rows, m, n): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let op = "outer_f32";
        check_len(op, "a", a.len(), volume(op, &[rows, m])?)?;
        check_len(op, "b", b.len(), volume(op, &[rows, n])?)?;
        let mut c = super::zeroed(volume(op, &[m, n])?);
        super::matmul_at(&mut c, a, b, m, rows, n, false);
        Ok(c)
    }

    fn split_channels(
        &self,
        x: &Vec<f32>,
        (batch, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        shapes::split_channels(x.len(), (batch, ca, cb, hw))?;
        let (mut a, mut b) = (
            Vec::with_capacity(batch * ca * hw),
            Vec::with_capacity(batch * cb * hw),
        );
        for img in x.chunks_exact(((ca + cb) * hw).max(1)) {
            let (xa, xb) = img.split_at(ca * hw);
            a.extend_from_slice(xa);
            b.extend_from_slice(xb);
        }
        Ok((a, b))
    }
}

/// softmax(q k^T / sqrt(d) + causal mask) v per batch and head. Text sequences are at most 77
/// tokens, so the scores of one query row are small; (batch, head) pairs run in parallel.
fn causal_attention(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims) {
    use rayon::prelude::*;
    let (len, heads, hd) = (d.lq, d.heads, d.head_dim);
    let w = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let o = super::SendPtr(out.as_mut_ptr());
    let one = |bh: usize, scores: &mut Vec<f32>| {
        let (b, h) = (bh / heads, bh % heads);
        scores.resize(len, 0.0);
        for i in 0..len {
            let qi = &q[(b * len + i) * w + h * hd..][..hd];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate().take(i + 1) {
                let kj = &k[(b * len + j) * w + h * hd..][..hd];
                *s = dot(qi, kj) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut().take(i + 1) {
                *s = (*s - max).exp();
                sum += *s;
            }
            // SAFETY: (b, h, i) owns columns h*hd..(h+1)*hd of row b*len + i, which no other
            // task writes, and `out` outlives the parallel loop.
            let oi = unsafe {
                std::slice::from_raw_parts_mut(o.get().add((b * len + i) * w + h * hd), hd)
            };
            oi.fill(0.0);
            for (j, s) in scores.iter().enumerate().take(i + 1) {
                let vj = &v[(b * len + j) * w + h * hd..][..hd];
                let p = s / sum;
                oi.iter_mut().zip(vj).for_each(|(x, y)| *x += p * y);
            }
        }
    };
    let tasks = d.batch * heads;
    if rayon::current_num_threads() == 1 || tasks < 2 {
        let mut scores = Vec::new();
        (0..tasks).for_each(|bh| one(bh, &mut scores));
    } else {
        (0..tasks)
            .into_par_iter()
            .for_each_init(Vec::new, |scores, bh| one(bh, scores));
    }
}

/// Dot product with eight independent accumulators (vectorisable; the order of the sum
/// differs from a left-to-right loop only in rounding).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn w(v: Vec<f32>) -> F32Weight {
        F32Weight::Owned(v)
    }

    #[test]
    fn shape_mistakes_are_errors_naming_the_op_not_panics() {
        let be = Cpu;
        let msg = |r: Result<Vec<f32>>| match r {
            Err(Error::Internal(m)) => m,
            other => panic!("expected an internal error, got {other:?}"),
        };
        let m = msg(be.linear(&vec![0.0; 5], &w(vec![0.0; 6]), None, (2, 3, 2)));
        assert!(m.starts_with("linear: x has 5 values, expected 6"), "{m}");
        let m = msg(be.layer_norm(
            &vec![0.0; 8],
            &w(vec![1.0; 3]),
            &w(vec![0.0; 4]),
            (2, 4),
            1e-5,
        ));
        assert!(m.starts_with("layer_norm: gamma"), "{m}");
        let d = NormDims {
            batch: 1,
            channels: 6,
            hw: 2,
            groups: 4,
            eps: 1e-5,
        };
        let m = msg(be.group_norm(&vec![0.0; 12], &w(vec![1.0; 6]), &w(vec![0.0; 6]), d, true));
        assert!(m.contains("4 groups do not divide 6 channels"), "{m}");
        let a = AttnDims {
            batch: 1,
            lq: 3,
            lk: 4,
            heads: 1,
            head_dim: 2,
            causal: true,
        };
        let m = msg(be.attention(&vec![0.0; 6], &vec![0.0; 8], &vec![0.0; 8], a));
        assert!(m.contains("causal attention needs lq == lk"), "{m}");
        let m = msg(be.linear(&vec![], &w(vec![]), None, (usize::MAX, 2, 1)));
        assert!(m.contains("overflows"), "{m}");
        let mut y = vec![0.0; 3];
        assert!(be.add_inplace(&mut y, &vec![0.0; 4]).is_err());
        // A kernel wider than the padded width (the height fits).
        let p = Conv2d {
            batch: 1,
            c_in: 1,
            h: 5,
            w: 1,
            c_out: 1,
            kernel: 3,
            stride: 1,
            padding: 0,
        };
        let m = msg(be.conv2d(&vec![0.0; 5], &w(vec![0.0; 9]), None, &p));
        assert!(m.starts_with("conv2d: bad shape"), "{m}");
    }

    #[test]
    fn causal_attention_is_full_attention_over_the_prefix() {
        // Row i of causal attention equals non-causal attention of query i over keys 0..=i.
        let (len, heads, d) = (5, 2, 3);
        let n = len * heads * d;
        let q: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let k: Vec<f32> = (0..n).map(|i| ((i * 5 % 13) as f32 - 6.0) / 5.0).collect();
        let v: Vec<f32> = (0..n).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
        let dims = AttnDims {
            batch: 1,
            lq: len,
            lk: len,
            heads,
            head_dim: d,
            causal: true,
        };
        let got = Cpu.attention(&q, &k, &v, dims).expect("causal");
        let row = heads * d;
        for i in 0..len {
            let keys = (i + 1) * row;
            let one = AttnDims {
                lq: 1,
                lk: i + 1,
                causal: false,
                ..dims
            };
            let want = Cpu
                .attention(
                    &q[i * row..(i + 1) * row].to_vec(),
                    &k[..keys].to_vec(),
                    &v[..keys].to_vec(),
                    one,
                )
                .expect("prefix");
            for (j, (g, w)) in got[i * row..(i + 1) * row].iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-6, "row {i} col {j}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn pad_bottom_right_adds_one_zero_row_and_column() {
        let x: Vec<f32> = (1..=12).map(|i| i as f32).collect(); // [2, 2, 3]
        let y = Cpu.pad_bottom_right(&x, (2, 2, 3)).expect("pad");
        #[rustfmt::skip]
        let want = [
            1.0, 2.0, 3.0, 0.0,   4.0, 5.0, 6.0, 0.0,    0.0, 0.0, 0.0, 0.0,
            7.0, 8.0, 9.0, 0.0,   10.0, 11.0, 12.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(y, want);
    }
}
