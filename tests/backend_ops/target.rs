//! What a case runs on: [`Target`], every op on host f32 values. [`Reference`] is the CPU
//! backend (`hdb::backend::Cpu`) and, for the CUDA-only ops, the same math on the host (f64
//! where the kernels' headers define it so); [`Device`] is `Cuda<T>` and its `ops`, on a real
//! GPU or the emulated one; `Emu` (emu.rs) launches the kernels under the host emulation.
//!
//! Ops come in two layers. The [`Backend`] trait's (what the models call) are values, [`Op`],
//! run on the reference and the device through the trait itself ([`on_backend`]); the CUDA
//! ops' own choices the trait does not expose (a kernel variant, a split count, a memory
//! layout, the adapter kernels) are methods, for which the reference computes the op's math.
//! A target that cannot run an op (cuBLAS under the kernel emulation, a launch-only kernel on
//! the device) says so with [`OpError::NotHere`] and the case is counted as not run there,
//! never as passed.
//!
//! A backward op (the training issue) is one more [`Op`] (a `Backend` method: one match arm in
//! [`on_backend`]) or method here with its reference, plus rows.

use hdb::backend::cpu;
use hdb::backend::cuda::ops::{AttnKernel, BgmvShape};
use hdb::backend::Conv2d;
use hdb::backend::{Activation, AttnDims, Backend, Cpu, NormDims};
use hdb::io::F32Weight;

use crate::harness::{Dtype, OpError, OpResult, Out};

/// One multi-identity LoRA call (`lora_bgmv`): the shape, and per adapter its rank and scale;
/// `index[s]` is sample s's adapter (-1: none). Inputs: x `[rows, ld_x]`, y `[rows, ld_y]`,
/// then per adapter `down [rank, din]` and `up [dout, rank]` (f32).
#[derive(Clone, Debug)]
pub struct Bgmv {
    pub shape: BgmvShape,
    pub ranks: Vec<usize>,
    pub scales: Vec<f32>,
    pub index: Vec<i32>,
}

/// One layer of a `lidb_merge` call: W `[dout, din]` = W_base + the sum over `factors`
/// (rank, scale) of scale * up . down, with W_base and W at element `offset` of their buffers
/// (1 breaks the 16-byte alignment of the kernel's 8-wide path). Inputs per layer: W_base,
/// then per factor `down [rank, din]` and `up [dout, rank]` (f32).
#[derive(Clone, Debug)]
pub struct MergeSpec {
    pub dout: usize,
    pub din: usize,
    pub factors: Vec<(usize, f32)>,
    pub offset: usize,
}

impl MergeSpec {
    /// Total rank: the kernel merges up to 256 (MERGE_MAX_RANK) and copies W_base beyond.
    pub fn rank(&self) -> usize {
        self.factors.iter().map(|f| f.0).sum()
    }
}

/// How q, k and v lie in memory for [`Target::attention_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvLayout {
    /// Three dense buffers.
    Dense,
    /// One `[rows, 3 * heads * d]` buffer holding q | k | v per row (self-attention).
    Fused,
    /// q rows at stride `ld_q` (> heads * d; the gaps are NaN, so reading them shows), k and
    /// v dense.
    StridedQ(usize),
}

fn not_here<T>(target: &dyn Target, op: &str) -> OpResult<T> {
    Err(OpError::NotHere(format!("{op} on {}", target.name())))
}

/// Every op a case may call, on host f32 values in and out (inputs already rounded to the
/// target's dtype by the case's generators). Each method's default is "not on this target".
#[allow(unused_variables, clippy::too_many_arguments)]
pub trait Target {
    fn name(&self) -> String;
    fn dtype(&self) -> Dtype;

    /// An op of the Backend trait on the case's inputs (in the trait method's order).
    fn op(&self, op: &Op, i: &[Vec<f32>]) -> OpResult<Vec<f32>> {
        not_here(self.this(), &format!("{op:?}"))
    }

    // --- the CUDA ops' own choices -------------------------------------------------------

    /// conv2d as im2col + GEMM (`ops::conv2d`), whatever the backend would pick.
    fn conv2d_im2col(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "conv2d_im2col")
    }
    /// conv2d as the implicit GEMM (`ops::conv2d_implicit_with`), split `splits` ways (None:
    /// the heuristic's choice).
    fn conv2d_implicit(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
        splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "conv2d_implicit")
    }
    /// `im2col_*` per sample: cols `[c_in * k * k, oh * ow]`, zero outside the image.
    fn im2col(&self, x: &[f32], p: &Conv2d) -> OpResult<Out> {
        not_here(self.this(), "im2col")
    }
    /// Non-causal attention with `kernel` asked for, q/k/v laid out as `layout`; a target that
    /// knows which kernel ran fails unless its name starts with `expect`.
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
        not_here(self.this(), "attention_kernel")
    }
    /// The materialised attention in chunks of `chunk_rows` query rows.
    fn attention_materialized(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
        chunk_rows: usize,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "attention_materialized")
    }
    /// Group norm through `ops::group_norm_with`: `chunks` per run (None: the heuristic's),
    /// writing x in place when `in_place`.
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
        not_here(self.this(), "group_norm_with")
    }
    /// Softmax of each row of x `[rows, n]`, in place.
    fn softmax_rows(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        not_here(self.this(), "softmax_rows")
    }
    /// Softmax of f32 scores (not rounded to T) into T.
    fn softmax_rows_from_f32(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        not_here(self.this(), "softmax_rows_from_f32")
    }
    /// y `[rows, n]` += bias `[n]`, y at element `offset` of its buffer (the rest untouched).
    fn add_bias_rows(
        &self,
        y: &[f32],
        bias: &[f32],
        n: usize,
        offset: usize,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "add_bias_rows")
    }
    /// y `[batch, channels, hw]` += bias `[channels]`.
    fn add_bias_channels(
        &self,
        y: &[f32],
        bias: &[f32],
        dims: (usize, usize, usize),
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "add_bias_channels")
    }
    /// `lidb_compose_f32` over `layers` (din, dout); inputs per layer D_train `[r, a]`,
    /// U_train `[b, r]`, D_aux `[a, din]`, U_aux `[dout, b]`; outputs per layer down, up.
    fn lidb_compose(
        &self,
        inputs: &[Vec<f32>],
        layers: &[(usize, usize)],
        rab: (usize, usize, usize),
        alpha: f32,
    ) -> OpResult<Out> {
        not_here(self.this(), "lidb_compose")
    }
    /// `lidb_merge_*` over `specs`; one output (W) per layer.
    fn lidb_merge(&self, inputs: &[Vec<f32>], specs: &[MergeSpec]) -> OpResult<Out> {
        not_here(self.this(), "lidb_merge")
    }
    /// `lora_bgmv_*`: y with the adapters' updates added.
    fn lora_bgmv(&self, inputs: &[Vec<f32>], c: &Bgmv) -> OpResult<Vec<f32>> {
        not_here(self.this(), "lora_bgmv")
    }

    // --- backward: the CUDA ops' own choices ----------------------------------------------

    /// conv2d's input gradient with at most `scratch_bytes` of f32 columns
    /// (`ops::conv2d_backward_with`: chunks of input channels).
    fn conv2d_backward_with(
        &self,
        dy: &[f32],
        w: &[f32],
        p: &Conv2d,
        scratch_bytes: usize,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "conv2d_backward_with")
    }
    /// Group norm's input gradient through `ops::group_norm_backward_with`: `chunks` per run
    /// (None: the heuristic's).
    fn group_norm_backward_with(
        &self,
        i: &[Vec<f32>],
        d: NormDims,
        silu: bool,
        chunks: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "group_norm_backward_with")
    }
    /// Attention's input gradients (dq | dk | dv) in chunks of `chunk_rows` query rows.
    fn attention_backward_with(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        chunk_rows: usize,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "attention_backward_with")
    }
    /// Attention's input gradients (dq | dk | dv) by the flash kernels
    /// (`ops::attention_backward_flash`) with `splits` splits of the key kernel's query tiles
    /// (None: the heuristic's).
    fn attention_backward_flash(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        not_here(self.this(), "attention_backward_flash")
    }
    /// `attention_backward_rows_*` on f32 scores s and dp `[rows, lk]`: (P, dS).
    fn attention_backward_rows(
        &self,
        s: &[f32],
        dp: &[f32],
        lk: usize,
        rows_per_head: usize,
        q0: usize,
        causal: bool,
    ) -> OpResult<Out> {
        not_here(self.this(), "attention_backward_rows")
    }
    /// `cast_from_f32_*`: f32 values rounded to T.
    fn cast_from_f32(&self, x: &[f32]) -> OpResult<Vec<f32>> {
        not_here(self.this(), "cast_from_f32")
    }

    /// Self as a trait object (for the defaults' messages).
    fn this(&self) -> &dyn Target;
}

/// An op of the [`Backend`] trait with its parameters. Its inputs are the case's, in the
/// trait method's order (a bias is always there; `bias` says whether the op gets it).
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Upload, then download.
    RoundTrip,
    Copy,
    /// A weight read back (through a linear with the identity).
    Weight,
    Linear {
        dims: (usize, usize, usize),
        bias: bool,
    },
    Conv2d {
        p: Conv2d,
        bias: bool,
    },
    GroupNorm {
        d: NormDims,
        silu: bool,
    },
    LayerNorm {
        rows_dim: (usize, usize),
        eps: f32,
    },
    Attention(AttnDims),
    Activate(Activation),
    Geglu {
        rows_d: (usize, usize),
    },
    Add,
    AddChannelBias {
        dims: (usize, usize, usize),
    },
    TimestepEmbedding {
        dim: usize,
        flip: bool,
        shift: f32,
    },
    Transpose {
        dims: (usize, usize, usize),
        to_tokens: bool,
    },
    ConcatChannels {
        dims: (usize, usize, usize, usize),
    },
    UpsampleNearest2x {
        dims: (usize, usize, usize),
    },
    PadBottomRight {
        dims: (usize, usize, usize),
    },
    // --- backward (inputs: the trait method's, in order; several outputs are concatenated) --
    /// dy, w -> dx.
    LinearBackward {
        dims: (usize, usize, usize),
    },
    /// dy, w -> dx.
    Conv2dBackward {
        p: Conv2d,
    },
    /// x, gamma, beta, dy -> dx.
    GroupNormBackward {
        d: NormDims,
        silu: bool,
    },
    /// x, gamma, dy -> dx.
    LayerNormBackward {
        rows_dim: (usize, usize),
        eps: f32,
    },
    /// q, k, v, dout -> dq | dk | dv.
    AttentionBackward(AttnDims),
    /// x, dy -> dx.
    ActivateBackward(Activation),
    /// x, dy -> dx.
    GegluBackward {
        rows_d: (usize, usize),
    },
    /// dy -> dx.
    UpsampleNearest2xBackward {
        dims: (usize, usize, usize),
    },
    /// x -> a | b.
    SplitChannels {
        dims: (usize, usize, usize, usize),
    },
}

impl Op {
    /// Elements of its output, for poisoning.
    fn out_len(&self, i: &[Vec<f32>]) -> usize {
        match *self {
            Op::Linear { dims, .. } => dims.0 * dims.2,
            Op::Conv2d { p, .. } => {
                let (oh, ow) = p.out_hw();
                p.batch * p.c_out * oh * ow
            }
            Op::Geglu { rows_d } => rows_d.0 * rows_d.1,
            Op::TimestepEmbedding { dim, .. } => i[0].len() * dim,
            Op::ConcatChannels { .. } => i[0].len() + i[1].len(),
            Op::UpsampleNearest2x { .. } => 4 * i[0].len(),
            Op::PadBottomRight { dims: (p, h, w) } => p * (h + 1) * (w + 1),
            Op::LinearBackward { dims } => dims.0 * dims.1,
            Op::Conv2dBackward { p } => p.batch * p.c_in * p.h * p.w,
            Op::GegluBackward { .. } => i[0].len(),
            Op::UpsampleNearest2xBackward { .. } => i[0].len() / 4,
            _ => i.first().map_or(0, Vec::len),
        }
    }
}

/// Leaves `n` NaNs in memory the allocator is likely to hand out next: a stream-ordered pool
/// tends to give the op's output that memory, so an element the op fails to write shows as
/// NaN. Best effort (outputs cannot be poisoned through the trait); the kernel-level ops poison
/// theirs for certain.
fn poison<B: Backend>(be: &B, n: usize) -> hdb::Result<()> {
    drop(be.upload(&vec![f32::NAN; n.max(1)])?);
    Ok(())
}

/// The buffer's values, checking `len` agrees with them.
fn down<B: Backend>(be: &B, y: &B::Buf) -> OpResult<Vec<f32>> {
    let v = be.download(y)?;
    if be.len(y) != v.len() {
        return Err(OpError::Check(format!(
            "{}: len() {} disagrees with the download's {}",
            be.describe(),
            be.len(y),
            v.len()
        )));
    }
    Ok(v)
}

/// `op` on any backend through the trait: upload the inputs (weights as weights), poison the
/// output's memory, run, download.
pub fn on_backend<B: Backend>(be: &B, op: &Op, i: &[Vec<f32>]) -> OpResult<Vec<f32>> {
    let up = |k: usize| be.upload(&i[k]);
    let wt = |k: usize| be.weight(F32Weight::Owned(i[k].clone()));
    let bias = |on: bool, k: usize| on.then(|| wt(k)).transpose();
    if !matches!(op, Op::RoundTrip | Op::Copy | Op::Weight) {
        poison(be, op.out_len(i))?;
    }
    let y = match *op {
        Op::RoundTrip => up(0)?,
        Op::Copy => {
            let x = up(0)?;
            let y = be.copy(&x)?;
            drop(x); // the copy owns its values
            y
        }
        Op::Weight => {
            // x = I [n, n] times w^T with w [1, n]: y [n, 1] = w.
            let n = i[0].len();
            let mut eye = vec![0.0; n * n];
            for k in 0..n {
                eye[k * n + k] = 1.0;
            }
            be.linear(&be.upload(&eye)?, &wt(0)?, None, (n, n, 1))?
        }
        Op::Linear { dims, bias: b } => be.linear(&up(0)?, &wt(1)?, bias(b, 2)?.as_ref(), dims)?,
        Op::Conv2d { p, bias: b } => be.conv2d(&up(0)?, &wt(1)?, bias(b, 2)?.as_ref(), &p)?,
        Op::GroupNorm { d, silu } => be.group_norm(&up(0)?, &wt(1)?, &wt(2)?, d, silu)?,
        Op::LayerNorm { rows_dim, eps } => {
            be.layer_norm(&up(0)?, &wt(1)?, &wt(2)?, rows_dim, eps)?
        }
        Op::Attention(d) => be.attention(&up(0)?, &up(1)?, &up(2)?, d)?,
        Op::Activate(act) => {
            let mut x = up(0)?;
            be.activate(&mut x, act)?;
            x
        }
        Op::Geglu { rows_d } => be.geglu(&up(0)?, rows_d)?,
        Op::Add => {
            let mut y = up(0)?;
            be.add_inplace(&mut y, &up(1)?)?;
            y
        }
        Op::AddChannelBias { dims } => {
            let mut y = up(0)?;
            be.add_channel_bias(&mut y, &up(1)?, dims)?;
            y
        }
        Op::TimestepEmbedding { dim, flip, shift } => {
            be.timestep_embedding(&i[0], dim, flip, shift)?
        }
        Op::Transpose { dims, to_tokens } => be.transpose(&up(0)?, dims, to_tokens)?,
        Op::ConcatChannels { dims } => be.concat_channels(&up(0)?, &up(1)?, dims)?,
        Op::UpsampleNearest2x { dims } => be.upsample_nearest2x(&up(0)?, dims)?,
        Op::PadBottomRight { dims } => be.pad_bottom_right(&up(0)?, dims)?,
        Op::LinearBackward { dims } => be.linear_backward(&up(0)?, &wt(1)?, dims)?,
        Op::Conv2dBackward { p } => be.conv2d_backward(&up(0)?, &wt(1)?, &p)?,
        Op::GroupNormBackward { d, silu } => {
            be.group_norm_backward(&up(0)?, &wt(1)?, &wt(2)?, &up(3)?, d, silu)?
        }
        Op::LayerNormBackward { rows_dim, eps } => {
            be.layer_norm_backward(&up(0)?, &wt(1)?, &up(2)?, rows_dim, eps)?
        }
        Op::AttentionBackward(d) => {
            let (dq, dk, dv) = be.attention_backward(&up(0)?, &up(1)?, &up(2)?, &up(3)?, d)?;
            return Ok([down(be, &dq)?, down(be, &dk)?, down(be, &dv)?].concat());
        }
        Op::ActivateBackward(act) => be.activate_backward(&up(0)?, &up(1)?, act)?,
        Op::GegluBackward { rows_d } => be.geglu_backward(&up(0)?, &up(1)?, rows_d)?,
        Op::UpsampleNearest2xBackward { dims } => be.upsample_nearest2x_backward(&up(0)?, dims)?,
        Op::SplitChannels { dims } => {
            let (a, b) = be.split_channels(&up(0)?, dims)?;
            return Ok([down(be, &a)?, down(be, &b)?].concat());
        }
    };
    down(be, &y)
}

/// The reference: the CPU backend, and the CUDA ops' math on the host.
pub struct Reference {
    cpu: Cpu,
}

impl Reference {
    pub fn new() -> Self {
        Reference { cpu: Cpu }
    }
}

/// f64 a `[m, k]` . b `[k, n]`, row-major.
pub fn matmul64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for t in 0..k {
            let av = a[i * k + t] as f64;
            for j in 0..n {
                y[i * n + j] += av * b[t * n + j] as f64;
            }
        }
    }
    y
}

/// im2col of one sample x `[c, h, w]` as conv.cu's header documents it: cols
/// `[c * k * k, oh * ow]`, row (ci, ky, kx), column (oy, ox), zero outside the image.
pub fn im2col_ref(x: &[f32], p: &Conv2d) -> Vec<f32> {
    let (oh, ow) = p.out_hw();
    let k = p.kernel;
    let mut cols = vec![0.0; p.c_in * k * k * oh * ow];
    for ci in 0..p.c_in {
        for ky in 0..k {
            for kx in 0..k {
                let row = (ci * k + ky) * k + kx;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                        let ix = (ox * p.stride + kx) as isize - p.padding as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < p.h && (ix as usize) < p.w {
                            cols[row * oh * ow + oy * ow + ox] =
                                x[(ci * p.h + iy as usize) * p.w + ix as usize];
                        }
                    }
                }
            }
        }
    }
    cols
}

/// attention_backward.cu's row step in f64: per row (query q0 + r % rows_per_head; causal:
/// keys after it masked), P = softmax(s) and dS = P (dp - rowsum(P dp)); 0 where masked.
pub fn attention_backward_rows_ref(
    s: &[f32],
    dp: &[f32],
    lk: usize,
    rows_per_head: usize,
    q0: usize,
    causal: bool,
) -> Out {
    let rows = s.len() / lk;
    let (mut p, mut ds) = (vec![0f32; s.len()], vec![0f32; s.len()]);
    for r in 0..rows {
        let qi = q0 + r % rows_per_head;
        let visible = if causal { lk.min(qi + 1) } else { lk };
        let (sr, dpr) = (&s[r * lk..][..visible], &dp[r * lk..][..visible]);
        let m = sr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let e: Vec<f64> = sr.iter().map(|&v| (v as f64 - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let dot: f64 = e.iter().zip(dpr).map(|(e, &g)| e / sum * g as f64).sum();
        for j in 0..visible {
            let pv = e[j] / sum;
            p[r * lk + j] = pv as f32;
            ds[r * lk + j] = (pv * (dpr[j] as f64 - dot)) as f32;
        }
    }
    vec![p, ds]
}

/// The CPU's convolution.
fn conv_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, p: &Conv2d) -> OpResult<Vec<f32>> {
    let (oh, ow) = p.out_hw();
    let mut y = vec![0.0; p.batch * p.c_out * oh * ow];
    cpu::conv2d(&mut y, x, w, b, p);
    Ok(y)
}

/// Dense q rows of a fused or strided layout: what every layout means.
fn dense_attention(cpu: &Cpu, q: &[f32], k: &[f32], v: &[f32], d: AttnDims) -> OpResult<Vec<f32>> {
    Ok(cpu.attention(&q.to_vec(), &k.to_vec(), &v.to_vec(), d)?)
}

impl Target for Reference {
    fn name(&self) -> String {
        "cpu (reference)".into()
    }
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn this(&self) -> &dyn Target {
        self
    }
    fn op(&self, op: &Op, i: &[Vec<f32>]) -> OpResult<Vec<f32>> {
        on_backend(&self.cpu, op, i)
    }

    fn conv2d_im2col(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
    ) -> OpResult<Vec<f32>> {
        conv_ref(x, w, b, p)
    }
    fn conv2d_implicit(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
        _splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        conv_ref(x, w, b, p)
    }
    fn im2col(&self, x: &[f32], p: &Conv2d) -> OpResult<Out> {
        let plane = p.c_in * p.h * p.w;
        Ok((0..p.batch)
            .map(|s| im2col_ref(&x[s * plane..(s + 1) * plane], p))
            .collect())
    }
    fn attention_kernel(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
        _layout: QkvLayout,
        _kernel: AttnKernel,
        _expect: Option<&str>,
    ) -> OpResult<Vec<f32>> {
        dense_attention(&self.cpu, q, k, v, d)
    }
    fn attention_materialized(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
        _chunk_rows: usize,
    ) -> OpResult<Vec<f32>> {
        dense_attention(&self.cpu, q, k, v, d)
    }
    fn group_norm_with(
        &self,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        d: NormDims,
        silu: bool,
        _chunks: Option<usize>,
        _in_place: bool,
    ) -> OpResult<Vec<f32>> {
        let mut y = vec![0.0; x.len()];
        cpu::group_norm(
            &mut y, x, g, b, d.batch, d.channels, d.hw, d.groups, d.eps, silu,
        );
        Ok(y)
    }
    fn softmax_rows(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        let mut y = x.to_vec();
        cpu::softmax_rows(&mut y, rows, n);
        Ok(y)
    }
    fn softmax_rows_from_f32(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        self.softmax_rows(x, rows, n)
    }
    fn add_bias_rows(&self, y: &[f32], bias: &[f32], n: usize, _o: usize) -> OpResult<Vec<f32>> {
        Ok(y.iter()
            .enumerate()
            .map(|(i, &v)| v + bias[i % n])
            .collect())
    }
    fn add_bias_channels(
        &self,
        y: &[f32],
        bias: &[f32],
        (_, c, hw): (usize, usize, usize),
    ) -> OpResult<Vec<f32>> {
        Ok(y.iter()
            .enumerate()
            .map(|(i, &v)| v + bias[(i / hw) % c])
            .collect())
    }
    fn lidb_compose(
        &self,
        inputs: &[Vec<f32>],
        layers: &[(usize, usize)],
        (r, a, b): (usize, usize, usize),
        alpha: f32,
    ) -> OpResult<Out> {
        // down [r, din] = D_train [r, a] . D_aux [a, din]; up = alpha U_aux [dout, b] . U_train.
        let mut out = Vec::new();
        for (l, &(din, dout)) in layers.iter().enumerate() {
            let i = &inputs[4 * l..4 * l + 4];
            let down = matmul64(&i[0], &i[2], r, a, din);
            let up = matmul64(&i[3], &i[1], dout, b, r);
            out.push(down.iter().map(|&v| v as f32).collect());
            out.push(up.iter().map(|&v| (alpha as f64 * v) as f32).collect());
        }
        Ok(out)
    }
    fn lidb_merge(&self, inputs: &[Vec<f32>], specs: &[MergeSpec]) -> OpResult<Out> {
        let mut it = inputs.iter();
        let mut out = Vec::new();
        for s in specs {
            let base = it.next().expect("W_base");
            let mut w: Vec<f64> = base.iter().map(|&v| v as f64).collect();
            for &(rank, scale) in &s.factors {
                let (down, up) = (it.next().expect("down"), it.next().expect("up"));
                // Over MERGE_MAX_RANK (256) in all, the kernel copies W_base unchanged.
                if s.rank() <= 256 {
                    let delta = matmul64(up, down, s.dout, rank, s.din);
                    for (w, d) in w.iter_mut().zip(delta) {
                        *w += scale as f64 * d;
                    }
                }
            }
            out.push(w.iter().map(|&v| v as f32).collect());
        }
        Ok(out)
    }
    fn conv2d_backward_with(
        &self,
        dy: &[f32],
        w: &[f32],
        p: &Conv2d,
        _scratch_bytes: usize,
    ) -> OpResult<Vec<f32>> {
        let op = Op::Conv2dBackward { p: *p };
        on_backend(&self.cpu, &op, &[dy.to_vec(), w.to_vec()])
    }
    fn group_norm_backward_with(
        &self,
        i: &[Vec<f32>],
        d: NormDims,
        silu: bool,
        _chunks: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        on_backend(&self.cpu, &Op::GroupNormBackward { d, silu }, i)
    }
    fn attention_backward_with(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        _chunk_rows: usize,
    ) -> OpResult<Vec<f32>> {
        on_backend(&self.cpu, &Op::AttentionBackward(d), i)
    }
    fn attention_backward_flash(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        _splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        on_backend(&self.cpu, &Op::AttentionBackward(d), i)
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
        Ok(attention_backward_rows_ref(
            s,
            dp,
            lk,
            rows_per_head,
            q0,
            causal,
        ))
    }
    fn cast_from_f32(&self, x: &[f32]) -> OpResult<Vec<f32>> {
        Ok(x.to_vec())
    }
    fn lora_bgmv(&self, inputs: &[Vec<f32>], c: &Bgmv) -> OpResult<Vec<f32>> {
        // y_i + scale * up (down x_i) in f64, rounded once.
        let s = &c.shape;
        let (x, mut y) = (&inputs[0], inputs[1].clone());
        for i in 0..s.rows {
            let Ok(a) = usize::try_from(c.index[i / s.rows_per_sample]) else {
                continue;
            };
            let (down, up, r) = (&inputs[2 + 2 * a], &inputs[3 + 2 * a], c.ranks[a]);
            let t: Vec<f64> = (0..r)
                .map(|j| {
                    c.scales[a] as f64
                        * (0..s.din)
                            .map(|k| down[j * s.din + k] as f64 * x[i * s.ld_x + k] as f64)
                            .sum::<f64>()
                })
                .collect();
            for o in 0..s.dout {
                let u: f64 = (0..r).map(|j| up[o * r + j] as f64 * t[j]).sum();
                y[i * s.ld_y + o] = (y[i * s.ld_y + o] as f64 + u) as f32;
            }
        }
        Ok(y)
    }
}
