//! [`Emu`]: the cases' kernels run on the host, without a GPU (tests/emu/driver.cpp includes
//! the kernel sources under tests/emu/cuda_emu.h). Each op makes the launches the CUDA op
//! makes, from the same pure `*_launch` functions, on buffers the driver guards; every job runs
//! under two thread schedules that must agree bit for bit (a race fails), and outputs start as
//! NaN bytes. cuBLAS is not emulated here: the GEMMs of conv2d's im2col path are computed on
//! the host in f64, and linear and the materialised attention are not run (the emulated GPU
//! runs them).

use std::marker::PhantomData;

use hdb::backend::cuda::ops::{self, AttnKernel, AttnShape, BgmvShape, KernelLaunch};
use hdb::backend::Conv2d;
use hdb::backend::{Activation, AttnDims, NormDims};

use crate::emu_harness::{Elem, Job};
use crate::harness::{Dtype, OpError, OpResult, Out};
use crate::target::{matmul64, Bgmv, MergeSpec, Op, QkvLayout, Target};

/// The multiprocessors the split heuristics assume here: an H100's 132, which the emulated GPU
/// also reports, so the emulation picks what a GPU picks.
pub const SMS: usize = 132;

/// The kernel emulation in storage type `T`.
pub struct Emu<T: Elem>(PhantomData<T>);

impl<T: Elem> Emu<T> {
    pub fn new() -> Self {
        Emu(PhantomData)
    }
}

fn plan(r: hdb::Result<KernelLaunch>) -> OpResult<KernelLaunch> {
    Ok(r?)
}

fn tsz<T>() -> usize {
    std::mem::size_of::<T>()
}

/// Runs one job whose only output is the buffer at `out`, as T values.
fn run1<T: Elem>(job: Job, what: &str, out: u64) -> Vec<f32> {
    T::values(&job.run(what, &[out])[0])
}

impl Job {
    /// Marks the u64 at byte `off` of the buffer at `buf` as a device address stored in memory
    /// (the driver translates it).
    fn relocate(&mut self, buf: u64, off: usize) {
        self.script += &format!("relocate {} {off}\n", (buf >> 40) - 1);
    }
}

/// In-place element-wise launches over `x`.
fn in_place<T: Elem>(
    x: &[f32],
    what: &str,
    l: impl Fn(u64) -> hdb::Result<KernelLaunch>,
) -> OpResult<Vec<f32>> {
    let mut job = Job::new();
    let xa = job.input(&T::bytes(x));
    job.launch(&plan(l(xa))?);
    Ok(run1::<T>(job, what, xa))
}

/// One output of `n` elements written by the launches `l(y)`, after `ins` as inputs.
fn one_out<T: Elem>(
    ins: &[&[f32]],
    n: usize,
    what: &str,
    l: impl Fn(u64, &[u64]) -> hdb::Result<Vec<KernelLaunch>>,
) -> OpResult<Vec<f32>> {
    let mut job = Job::new();
    let addrs: Vec<u64> = ins.iter().map(|x| job.input(&T::bytes(x))).collect();
    let ya = job.output(n * tsz::<T>());
    for launch in l(ya, &addrs)? {
        job.launch(&launch);
    }
    Ok(run1::<T>(job, what, ya))
}

impl<T: Elem> Emu<T> {
    /// conv2d as im2col launches, then W . cols + bias on the host in f64, rounded to T
    /// (cuBLAS is not emulated).
    fn im2col_gemm(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
    ) -> OpResult<Vec<f32>> {
        if ops::conv2d_scratch(p) == 0 {
            return Err(OpError::NotHere(
                "a 1x1 convolution is one cuBLAS GEMM".into(),
            ));
        }
        let (oh, ow) = p.out_hw();
        let macs = p.batch * p.c_out * oh * ow * p.c_in * p.kernel * p.kernel;
        if macs as f64 > crate::EMU_MAX_WORK {
            return Err(OpError::NotHere(
                "a GEMM too large for the host's f64 loop".into(),
            ));
        }
        let cols = self.im2col(x, p)?;
        let (kk, hw) = (p.c_in * p.kernel * p.kernel, oh * ow);
        let d = self.dtype();
        let mut y = Vec::with_capacity(p.batch * p.c_out * hw);
        for c in &cols {
            let prod = matmul64(w, c, p.c_out, kk, hw);
            for o in 0..p.c_out {
                let bias = b.map_or(0.0, |b| b[o] as f64);
                // The GEMM rounds to T, then the bias kernel adds in f32 and rounds again.
                y.extend(
                    prod[o * hw..(o + 1) * hw]
                        .iter()
                        .map(|&v| d.round(d.round(v as f32) + bias as f32)),
                );
            }
        }
        Ok(y)
    }

    fn implicit(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
        splits: usize,
    ) -> OpResult<Vec<f32>> {
        if T::SUFFIX == "f32" {
            return Err(OpError::Hdb(hdb::Error::Unsupported(
                "conv2d_implicit in f32".into(),
            )));
        }
        let pl = ops::conv2d_implicit_plan(p, splits)?;
        let (oh, ow) = p.out_hw();
        let mut job = Job::new();
        let xa = job.input(&T::bytes(x));
        let wa = job.input(&T::bytes(w));
        let ba = match b {
            Some(b) => job.input(&T::bytes(b)),
            None => 0,
        };
        let ya = job.output(p.batch * p.c_out * oh * ow * tsz::<T>());
        let pa = if pl.partial_len > 0 {
            job.output(pl.partial_len * 4)
        } else {
            0
        };
        for l in ops::conv2d_implicit_launches::<T>(p, &pl, [ya, pa, xa, wa, ba])? {
            job.launch(&l);
        }
        Ok(run1::<T>(
            job,
            &format!("conv2d_igemm_{} {p:?}", T::SUFFIX),
            ya,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn group_norm_chunks(
        &self,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        d: NormDims,
        silu: bool,
        chunks: usize,
        in_place: bool,
    ) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let xa = job.input(&T::bytes(x));
        let ga = job.input(&T::bytes(g));
        let ba = job.input(&T::bytes(b));
        let ya = if in_place {
            xa
        } else {
            job.output(x.len() * tsz::<T>())
        };
        let shape = (d.batch, d.channels, d.hw);
        let addrs = [ya, xa, ga, ba];
        if chunks > 1 {
            let stats = job.output(d.batch * d.groups * chunks * 2 * 4);
            for l in ops::group_norm_split_launches::<T>(
                addrs, stats, shape, d.groups, chunks, d.eps, silu,
            )? {
                job.launch(&l);
            }
        } else {
            job.launch(&ops::group_norm_launch::<T>(
                addrs, shape, d.groups, d.eps, silu,
            )?);
        }
        Ok(run1::<T>(
            job,
            &format!("group_norm_{} {d:?}", T::SUFFIX),
            ya,
        ))
    }
}

/// The backward ops' launches, as `Cuda<T>` makes them.
impl<T: Elem> Emu<T> {
    /// conv2d's input gradient as `ops::conv2d_backward_with` makes it: per sample and chunk
    /// of input channels, the column gradient W_c^T dy_b on the host in f64 (cuBLAS's f32
    /// output: rounded to f32), then the `col2im_*` launch onto the chunk's planes.
    fn conv2d_backward_cols(
        &self,
        dy: &[f32],
        w: &[f32],
        p: &Conv2d,
        scratch_bytes: usize,
    ) -> OpResult<Vec<f32>> {
        if ops::conv2d_scratch(p) == 0 {
            return Err(OpError::NotHere(
                "a 1x1 convolution's input gradient is one cuBLAS GEMM".into(),
            ));
        }
        let (oh, ow) = p.out_hw();
        let (kk, ohw, hw) = (p.kernel * p.kernel, oh * ow, p.h * p.w);
        let ckk = p.c_in * kk;
        if (p.batch * p.c_out * ohw * ckk) as f64 > crate::EMU_MAX_WORK {
            return Err(OpError::NotHere(
                "a GEMM too large for the host's f64 loop".into(),
            ));
        }
        let chunk = ops::conv2d_backward_channels(p, scratch_bytes);
        let mut job = Job::new();
        let dxa = job.output(p.batch * p.c_in * hw * tsz::<T>());
        for b in 0..p.batch {
            let dyb = &dy[b * p.c_out * ohw..][..p.c_out * ohw];
            for c0 in (0..p.c_in).step_by(chunk) {
                let cc = chunk.min(p.c_in - c0);
                let mut cols = vec![0f64; cc * kk * ohw];
                for o in 0..p.c_out {
                    for r in 0..cc * kk {
                        let wv = w[o * ckk + c0 * kk + r] as f64;
                        let row = &mut cols[r * ohw..][..ohw];
                        for (c, &g) in row.iter_mut().zip(&dyb[o * ohw..][..ohw]) {
                            *c += wv * g as f64;
                        }
                    }
                }
                let cols: Vec<f32> = cols.iter().map(|&v| v as f32).collect();
                let ca = job.input(&f32::bytes(&cols));
                let at = dxa + (((b * p.c_in + c0) * hw) * tsz::<T>()) as u64;
                job.launch(&ops::col2im_launch::<T>(at, ca, p, cc)?);
            }
        }
        Ok(run1::<T>(job, &format!("col2im_{} {p:?}", T::SUFFIX), dxa))
    }

    fn group_norm_backward_chunks(
        &self,
        i: &[Vec<f32>],
        d: NormDims,
        silu: bool,
        chunks: usize,
    ) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let [xa, ga, ba, dya] = [0, 1, 2, 3].map(|k| job.input(&T::bytes(&i[k])));
        let dxa = job.output(i[0].len() * tsz::<T>());
        let shape = (d.batch, d.channels, d.hw);
        let addrs = [dxa, xa, ga, ba, dya];
        if chunks > 1 {
            let n = d.batch * d.groups * chunks * 2 * 4;
            let bufs = [job.output(n), job.output(n)];
            for l in ops::group_norm_backward_split_launches::<T>(
                addrs, bufs, shape, d.groups, chunks, d.eps, silu,
            )? {
                job.launch(&l);
            }
        } else {
            job.launch(&ops::group_norm_backward_launch::<T>(
                addrs, shape, d.groups, d.eps, silu,
            )?);
        }
        Ok(run1::<T>(
            job,
            &format!("group_norm_backward_{} {d:?} chunks {chunks}", T::SUFFIX),
            dxa,
        ))
    }

    fn backward_op(&self, op: &Op, i: &[Vec<f32>]) -> OpResult<Vec<f32>> {
        match *op {
            Op::Conv2dBackward { p } => {
                self.conv2d_backward_cols(&i[0], &i[1], &p, ops::CONV_BACKWARD_SCRATCH_BYTES)
            }
            Op::GroupNormBackward { d, silu } => self.group_norm_backward_with(i, d, silu, None),
            Op::LayerNormBackward {
                rows_dim: (rows, dim),
                eps,
            } => one_out::<T>(
                &[&i[0], &i[1], &i[2]],
                i[0].len(),
                "layer_norm_backward",
                |y, a| {
                    Ok(vec![ops::layer_norm_backward_launch::<T>(
                        [y, a[0], a[1], a[2]],
                        rows,
                        dim,
                        eps,
                    )?])
                },
            ),
            Op::ActivateBackward(act) => {
                let n = i[0].len();
                one_out::<T>(&[&i[0], &i[1]], n, &format!("{act:?} backward"), |y, a| {
                    Ok(vec![ops::activate_backward_launch::<T>(
                        act,
                        [y, a[0], a[1]],
                        n,
                    )?])
                })
            }
            Op::GegluBackward { rows_d: (rows, d) } => {
                one_out::<T>(&[&i[0], &i[1]], i[0].len(), "geglu_backward", |y, a| {
                    Ok(vec![ops::geglu_backward_launch::<T>(
                        [y, a[0], a[1]],
                        rows,
                        d,
                    )?])
                })
            }
            Op::UpsampleNearest2xBackward { dims: (p, h, w) } => one_out::<T>(
                &[&i[0]],
                p * h * w,
                "upsample_nearest2x_backward",
                |y, a| {
                    Ok(vec![ops::upsample_nearest2x_backward_launch::<T>(
                        y, a[0], p, h, w,
                    )?])
                },
            ),
            // Cuda::attention_backward's flash path (the materialised one is cuBLAS).
            Op::AttentionBackward(d) => self.flash_backward(i, d, None),
            // cuBLAS GEMMs (the materialised attention backward's are checked by the emulated
            // GPU and, as a plan, by the library's host test) and device copies.
            _ => Err(OpError::NotHere(format!(
                "{op:?} runs cuBLAS or device copies"
            ))),
        }
    }
}

/// The Backend trait's ops that launch kernels, as `Cuda<T>` launches them.
#[allow(clippy::too_many_arguments)]
impl<T: Elem> Emu<T> {
    fn conv2d(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, p: &Conv2d) -> OpResult<Vec<f32>> {
        // Cuda::conv2d's choice: the implicit GEMM in f16/bf16 where it measured faster or
        // where im2col's scratch would pass 256 MB; else im2col + GEMM.
        let scratch = ops::conv2d_scratch(p) * tsz::<T>();
        if T::SUFFIX != "f32" && (ops::conv2d_prefers_implicit(p) || scratch > 256 << 20) {
            self.implicit(x, w, b, p, ops::conv2d_implicit_splits(p, SMS))
        } else {
            self.im2col_gemm(x, w, b, p)
        }
    }
    fn group_norm(
        &self,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        d: NormDims,
        silu: bool,
    ) -> OpResult<Vec<f32>> {
        self.group_norm_with(x, g, b, d, silu, None, false)
    }
    fn layer_norm(
        &self,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> OpResult<Vec<f32>> {
        one_out::<T>(&[x, g, b], x.len(), "layer_norm", |y, a| {
            Ok(vec![ops::layer_norm_launch::<T>(
                [y, a[0], a[1], a[2]],
                rows,
                dim,
                eps,
            )?])
        })
    }
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], d: AttnDims) -> OpResult<Vec<f32>> {
        // Cuda::attention's choice, where it launches kernels only.
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        if d.causal {
            return one_out::<T>(&[q, k, v], q.len(), "attention_causal", |o, a| {
                Ok(vec![ops::attention_causal_launch::<T>(
                    &s,
                    [o, a[0], a[1], a[2]],
                )?])
            });
        }
        if d.head_dim <= 256 && T::SUFFIX != "f32" {
            return self.attention_kernel(q, k, v, d, QkvLayout::Dense, AttnKernel::Auto, None);
        }
        Err(OpError::NotHere(
            "the materialised attention (cuBLAS)".into(),
        ))
    }
    fn activate(&self, x: &[f32], act: Activation) -> OpResult<Vec<f32>> {
        let n = x.len();
        in_place::<T>(x, &format!("{act:?}"), |xa| match act {
            Activation::Silu => ops::silu_launch::<T>(xa, n),
            Activation::Gelu => ops::gelu_launch::<T>(xa, n),
            Activation::QuickGelu => ops::quick_gelu_launch::<T>(xa, n),
        })
    }
    fn geglu(&self, x: &[f32], (rows, d): (usize, usize)) -> OpResult<Vec<f32>> {
        one_out::<T>(&[x], rows * d, "geglu", |y, a| {
            Ok(vec![ops::geglu_launch::<T>(y, a[0], rows, d)?])
        })
    }
    fn add(&self, y: &[f32], x: &[f32]) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let ya = job.input(&T::bytes(y));
        let xa = job.input(&T::bytes(x));
        job.launch(&ops::add_launch::<T>(ya, ya, xa, y.len())?);
        Ok(run1::<T>(job, "add", ya))
    }
    fn add_channel_bias(
        &self,
        y: &[f32],
        v: &[f32],
        dims: (usize, usize, usize),
    ) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let ya = job.input(&T::bytes(y));
        let va = job.input(&T::bytes(v));
        job.launch(&ops::add_channel_bias_launch::<T>(ya, va, dims)?);
        Ok(run1::<T>(job, "add_channel_bias", ya))
    }
    fn timestep_embedding(
        &self,
        t: &[f32],
        dim: usize,
        flip: bool,
        shift: f32,
    ) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let ta = job.input(&f32::bytes(t));
        let ya = job.output(t.len() * dim * tsz::<T>());
        job.launch(&ops::timestep_embedding_launch::<T>(
            ya,
            ta,
            t.len(),
            dim,
            (flip, shift, 10000.0),
        )?);
        Ok(run1::<T>(job, "timestep_embedding", ya))
    }
    fn transpose(
        &self,
        x: &[f32],
        (b, c, hw): (usize, usize, usize),
        to_tokens: bool,
    ) -> OpResult<Vec<f32>> {
        let (rows, cols) = if to_tokens { (c, hw) } else { (hw, c) };
        one_out::<T>(&[x], x.len(), "transpose", |y, a| {
            Ok(vec![ops::transpose_launch::<T>(y, a[0], b, rows, cols)?])
        })
    }
    fn upsample_nearest2x(
        &self,
        x: &[f32],
        (p, h, w): (usize, usize, usize),
    ) -> OpResult<Vec<f32>> {
        one_out::<T>(&[x], 4 * x.len(), "upsample_nearest2x", |y, a| {
            Ok(vec![ops::upsample_nearest2x_launch::<T>(y, a[0], p, h, w)?])
        })
    }
    fn pad_bottom_right(&self, x: &[f32], (p, h, w): (usize, usize, usize)) -> OpResult<Vec<f32>> {
        one_out::<T>(&[x], p * (h + 1) * (w + 1), "pad_bottom_right", |y, a| {
            Ok(vec![ops::pad_bottom_right_launch::<T>(y, a[0], p, h, w)?])
        })
    }
}

#[allow(clippy::too_many_arguments)]
impl<T: Elem> Target for Emu<T> {
    fn name(&self) -> String {
        format!("kernel emulation {}", T::SUFFIX)
    }
    fn dtype(&self) -> Dtype {
        match T::SUFFIX {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            _ => Dtype::Bf16,
        }
    }
    fn this(&self) -> &dyn Target {
        self
    }

    fn op(&self, op: &Op, i: &[Vec<f32>]) -> OpResult<Vec<f32>> {
        let bias = |on: bool| on.then_some(&i[2][..]);
        match *op {
            Op::Conv2d { p, bias: b } => self.conv2d(&i[0], &i[1], bias(b), &p),
            Op::GroupNorm { d, silu } => self.group_norm(&i[0], &i[1], &i[2], d, silu),
            Op::LayerNorm { rows_dim, eps } => self.layer_norm(&i[0], &i[1], &i[2], rows_dim, eps),
            Op::Attention(d) => self.attention(&i[0], &i[1], &i[2], d),
            Op::Activate(act) => self.activate(&i[0], act),
            Op::Geglu { rows_d } => self.geglu(&i[0], rows_d),
            Op::Add => self.add(&i[0], &i[1]),
            Op::AddChannelBias { dims } => self.add_channel_bias(&i[0], &i[1], dims),
            Op::TimestepEmbedding { dim, flip, shift } => {
                self.timestep_embedding(&i[0], dim, flip, shift)
            }
            Op::Transpose { dims, to_tokens } => self.transpose(&i[0], dims, to_tokens),
            Op::UpsampleNearest2x { dims } => self.upsample_nearest2x(&i[0], dims),
            Op::PadBottomRight { dims } => self.pad_bottom_right(&i[0], dims),
            Op::LinearBackward { .. }
            | Op::Conv2dBackward { .. }
            | Op::GroupNormBackward { .. }
            | Op::LayerNormBackward { .. }
            | Op::AttentionBackward(_)
            | Op::ActivateBackward(_)
            | Op::GegluBackward { .. }
            | Op::UpsampleNearest2xBackward { .. }
            | Op::SplitChannels { .. } => self.backward_op(op, i),
            // No kernel: memory copies, and linear's GEMM is cuBLAS.
            Op::RoundTrip
            | Op::Copy
            | Op::Weight
            | Op::Linear { .. }
            | Op::ConcatChannels { .. } => Err(OpError::NotHere(format!(
                "{op:?} launches no kernel of its own"
            ))),
        }
    }

    fn conv2d_im2col(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
    ) -> OpResult<Vec<f32>> {
        self.im2col_gemm(x, w, b, p)
    }
    fn conv2d_implicit(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
        splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        self.implicit(
            x,
            w,
            b,
            p,
            splits.unwrap_or_else(|| ops::conv2d_implicit_splits(p, SMS)),
        )
    }
    fn im2col(&self, x: &[f32], p: &Conv2d) -> OpResult<Out> {
        let (oh, ow) = p.out_hw();
        let (plane, kk) = (p.c_in * p.h * p.w, p.c_in * p.kernel * p.kernel);
        let mut job = Job::new();
        let xa = job.input(&T::bytes(x));
        // conv2d's per-sample launches (each sample's x at its offset), into a buffer each.
        let mut outs = Vec::new();
        for b in 0..p.batch {
            let ca = job.output(kk * oh * ow * tsz::<T>());
            let xb = xa + (b * plane * tsz::<T>()) as u64;
            job.launch(&ops::im2col_launch::<T>(ca, xb, p)?);
            outs.push(ca);
        }
        let got = job.run(&format!("im2col_{} {p:?}", T::SUFFIX), &outs);
        Ok(got.iter().map(|c| T::values(c)).collect())
    }

    fn group_norm_with(
        &self,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        d: NormDims,
        silu: bool,
        chunks: Option<usize>,
        in_place: bool,
    ) -> OpResult<Vec<f32>> {
        let runs = d.batch * d.groups;
        let chunks =
            chunks.unwrap_or_else(|| ops::group_norm_chunks(runs, x.len() / runs.max(1), SMS));
        self.group_norm_chunks(x, g, b, d, silu, chunks, in_place)
    }

    fn attention_kernel(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
        layout: QkvLayout,
        kernel: AttnKernel,
        expect: Option<&str>,
    ) -> OpResult<Vec<f32>> {
        let hd = d.heads * d.head_dim;
        let rows = d.batch * d.lq;
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        let mut job = Job::new();
        let (st, [qa, ka, va]) = match layout {
            QkvLayout::Fused => {
                let mut qkv = vec![0.0; rows * 3 * hd];
                for r in 0..rows {
                    let row = &mut qkv[r * 3 * hd..(r + 1) * 3 * hd];
                    row[..hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
                    row[hd..2 * hd].copy_from_slice(&k[r * hd..(r + 1) * hd]);
                    row[2 * hd..].copy_from_slice(&v[r * hd..(r + 1) * hd]);
                }
                let b = job.input(&T::bytes(&qkv));
                let e = (hd * tsz::<T>()) as u64;
                let st = AttnShape {
                    ld_q: 3 * hd,
                    ld_k: 3 * hd,
                    ld_v: 3 * hd,
                    ..s
                };
                (st, [b, b + e, b + 2 * e])
            }
            QkvLayout::Dense | QkvLayout::StridedQ(_) => {
                let ld_q = match layout {
                    QkvLayout::StridedQ(ld) => ld,
                    _ => hd,
                };
                let mut qp = vec![f32::NAN; (rows - 1) * ld_q + hd];
                for r in 0..rows {
                    qp[r * ld_q..r * ld_q + hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
                }
                let addrs = [
                    job.input(&T::bytes(&qp)),
                    job.input(&T::bytes(k)),
                    job.input(&T::bytes(v)),
                ];
                (AttnShape { ld_q, ..s }, addrs)
            }
        };
        let oa = job.output(q.len() * tsz::<T>());
        let l = ops::attention_launch::<T>(&st, kernel, [oa, qa, ka, va])?;
        if let Some(stem) = expect {
            if !l.kernel.starts_with(stem) {
                return Err(OpError::Check(format!(
                    "{kernel:?} picks {}, expected {stem}_*",
                    l.kernel
                )));
            }
        }
        let what = format!("{} {d:?}", l.kernel);
        job.launch(&l);
        Ok(run1::<T>(job, &what, oa))
    }

    fn add_bias_channels(
        &self,
        y: &[f32],
        bias: &[f32],
        dims: (usize, usize, usize),
    ) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let ya = job.input(&T::bytes(y));
        let ba = job.input(&T::bytes(bias));
        job.launch(&ops::add_bias_channels_launch::<T>(ya, ba, dims)?);
        Ok(run1::<T>(job, "add_bias_channels", ya))
    }
    fn add_bias_rows(
        &self,
        y: &[f32],
        bias: &[f32],
        n: usize,
        offset: usize,
    ) -> OpResult<Vec<f32>> {
        let mut buf = vec![0.0; offset];
        buf.extend_from_slice(y);
        let mut job = Job::new();
        let ya = job.input(&T::bytes(&buf));
        let ba = job.input(&T::bytes(bias));
        let y_at = ya + (offset * tsz::<T>()) as u64;
        job.launch(&ops::add_bias_rows_launch::<T>(y_at, ba, y.len() / n, n)?);
        let got = run1::<T>(job, "add_bias_rows", ya);
        if let Some(i) = got[..offset].iter().position(|&v| v != 0.0) {
            return Err(OpError::Check(format!(
                "add_bias_rows wrote element {i} before y"
            )));
        }
        Ok(got[offset..].to_vec())
    }
    fn softmax_rows(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        in_place::<T>(x, "softmax_rows", |xa| {
            ops::softmax_rows_launch::<T>(xa, rows, n)
        })
    }
    fn softmax_rows_from_f32(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let xa = job.input(&f32::bytes(x));
        let ya = job.output(x.len() * tsz::<T>());
        job.launch(&ops::softmax_rows_from_f32_launch::<T>(ya, xa, rows, n)?);
        Ok(run1::<T>(job, "softmax_rows_from_f32", ya))
    }

    fn lidb_compose(
        &self,
        inputs: &[Vec<f32>],
        layers: &[(usize, usize)],
        (r, a, b): (usize, usize, usize),
        alpha: f32,
    ) -> OpResult<Out> {
        if T::SUFFIX != "f32" {
            return Err(OpError::NotHere("lidb_compose is f32 only".into()));
        }
        let mut job = Job::new();
        let (mut table, mut outs) = (Vec::new(), Vec::new());
        for (l, &(din, dout)) in layers.iter().enumerate() {
            let i = &inputs[4 * l..4 * l + 4];
            let addrs = [
                job.input(&f32::bytes(&i[0])),
                job.input(&f32::bytes(&i[1])),
                job.input(&f32::bytes(&i[2])),
                job.input(&f32::bytes(&i[3])),
                job.output(r * din * 4),
                job.output(dout * r * 4),
            ];
            // LidbComposeLayer: six device addresses, then din, dout (64 bytes).
            for a in addrs {
                table.extend(a.to_le_bytes());
            }
            table.extend((din as i64).to_le_bytes());
            table.extend((dout as i64).to_le_bytes());
            outs.extend([addrs[4], addrs[5]]);
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
        job.launch(&ops::lidb_compose_launch(
            ta,
            layers.len(),
            max_out,
            (r, a, b),
            alpha,
        )?);
        let got = job.run("lidb_compose_f32", &outs);
        Ok(got.iter().map(|g| f32::values(g)).collect())
    }

    fn lidb_merge(&self, inputs: &[Vec<f32>], specs: &[MergeSpec]) -> OpResult<Out> {
        let t = tsz::<T>();
        let mut job = Job::new();
        let mut it = inputs.iter();
        let (mut layers, mut factors, mut outs) = (Vec::new(), Vec::new(), Vec::new());
        let mut n_factors = 0usize;
        for s in specs {
            let base = it.next().expect("W_base");
            for &(rank, scale) in &s.factors {
                // hdb_lora_factor: down, up (device addresses), rank, scale: 24 bytes.
                factors.extend(
                    job.input(&f32::bytes(it.next().expect("down")))
                        .to_le_bytes(),
                );
                factors.extend(job.input(&f32::bytes(it.next().expect("up"))).to_le_bytes());
                factors.extend((rank as i32).to_le_bytes());
                factors.extend(scale.to_le_bytes());
            }
            let mut base_buf = vec![0.0; s.offset];
            base_buf.extend_from_slice(base);
            let ba = job.input(&T::bytes(&base_buf)) + (s.offset * t) as u64;
            let wa = job.output((s.offset + s.dout * s.din) * t);
            // MergeLayer: w_base, w, dout, din, first_factor, n_factors (40 bytes).
            layers.extend(ba.to_le_bytes());
            layers.extend((wa + (s.offset * t) as u64).to_le_bytes());
            layers.extend((s.dout as i64).to_le_bytes());
            layers.extend((s.din as i64).to_le_bytes());
            layers.extend((n_factors as i32).to_le_bytes());
            layers.extend((s.factors.len() as i32).to_le_bytes());
            n_factors += s.factors.len();
            outs.push(wa);
        }
        let la = job.input(&layers);
        let fa = job.input(if factors.is_empty() {
            &[0u8; 24][..]
        } else {
            &factors
        });
        for l in 0..specs.len() {
            job.relocate(la, 40 * l);
            job.relocate(la, 40 * l + 8);
        }
        for f in 0..n_factors {
            job.relocate(fa, 24 * f);
            job.relocate(fa, 24 * f + 8);
        }
        let max_dout = specs.iter().map(|s| s.dout).max().unwrap_or(0);
        job.launch(&ops::lidb_merge_launch::<T>(la, specs.len(), max_dout, fa)?);
        let got = job.run(&format!("lidb_merge_{}", T::SUFFIX), &outs);
        let mut out = Vec::new();
        for (s, g) in specs.iter().zip(&got) {
            if let Some(i) = g[..s.offset * t].iter().position(|&b| b != 0xff) {
                return Err(OpError::Check(format!(
                    "lidb_merge wrote byte {i} before W"
                )));
            }
            out.push(T::values(&g[s.offset * t..]));
        }
        Ok(out)
    }

    fn conv2d_backward_with(
        &self,
        dy: &[f32],
        w: &[f32],
        p: &Conv2d,
        scratch_bytes: usize,
    ) -> OpResult<Vec<f32>> {
        self.conv2d_backward_cols(dy, w, p, scratch_bytes)
    }
    fn group_norm_backward_with(
        &self,
        i: &[Vec<f32>],
        d: NormDims,
        silu: bool,
        chunks: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        let runs = d.batch * d.groups;
        let chunks =
            chunks.unwrap_or_else(|| ops::group_norm_chunks(runs, i[0].len() / runs.max(1), SMS));
        self.group_norm_backward_chunks(i, d, silu, chunks)
    }
    fn attention_backward_flash(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        self.flash_backward(i, d, splits)
    }
    fn attention_backward_rows(
        &self,
        s: &[f32],
        dp: &[f32],
        lk: usize,
        rows_per_head: usize,
        q0: usize,
        causal: bool,
    ) -> OpResult<Out> {
        let mut job = Job::new();
        let (sa, dpa) = (job.input(&f32::bytes(s)), job.input(&f32::bytes(dp)));
        let (pa, dsa) = (
            job.output(s.len() * tsz::<T>()),
            job.output(s.len() * tsz::<T>()),
        );
        let l = ops::attention_backward_rows_launch::<T>(
            [pa, dsa, sa, dpa],
            s.len() / lk,
            lk,
            rows_per_head,
            q0,
            causal,
        )?;
        let what = format!("{} lk {lk} q0 {q0} causal {causal}", l.kernel);
        job.launch(&l);
        let got = job.run(&what, &[pa, dsa]);
        Ok(got.iter().map(|b| T::values(b)).collect())
    }
    fn cast_from_f32(&self, x: &[f32]) -> OpResult<Vec<f32>> {
        let mut job = Job::new();
        let xa = job.input(&f32::bytes(x));
        let ya = job.output(x.len() * tsz::<T>());
        job.launch(&ops::cast_from_f32_launch::<T>(ya, xa, x.len())?);
        Ok(run1::<T>(job, "cast_from_f32", ya))
    }

    fn lora_bgmv(&self, inputs: &[Vec<f32>], c: &Bgmv) -> OpResult<Vec<f32>> {
        let s: BgmvShape = c.shape;
        let mut job = Job::new();
        let xa = job.input(&T::bytes(&inputs[0]));
        let ya = job.input(&T::bytes(&inputs[1]));
        let sa = job.input(
            &c.index
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let mut table = Vec::new();
        for (a, (&rank, &scale)) in c.ranks.iter().zip(&c.scales).enumerate() {
            table.extend(job.input(&f32::bytes(&inputs[2 + 2 * a])).to_le_bytes());
            table.extend(job.input(&f32::bytes(&inputs[3 + 2 * a])).to_le_bytes());
            table.extend((rank as i32).to_le_bytes());
            table.extend(scale.to_le_bytes());
        }
        let fa = job.input(&table);
        for a in 0..c.ranks.len() {
            job.relocate(fa, 24 * a);
            job.relocate(fa, 24 * a + 8);
        }
        job.launch(&ops::lora_bgmv_launch::<T>(
            &s,
            c.ranks.len(),
            [ya, xa, sa, fa],
        )?);
        Ok(run1::<T>(job, &format!("lora_bgmv_{}", T::SUFFIX), ya))
    }
}
