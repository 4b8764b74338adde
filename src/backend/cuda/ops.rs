//! The CUDA ops: typed launches of the kernels in `kernels/*.cu` (each op's launch contract is
//! in its file's top comment), cuBLAS GEMMs, and conv2d as im2col + GEMM or (f16/bf16,
//! [`conv2d_implicit`]) as an implicit GEMM on the tensor cores.
//!
//! Tensors are `CudaSlice<T>` with explicit shapes, like the CPU backend's `&[f32]`; an op
//! checks that every buffer is large enough before it launches, so a shape error is an
//! [`Error::Internal`] naming the op and argument, never an out-of-bounds device access.
//! Kernels receive raw device addresses (a buffer may be both input and output where the
//! contract allows it).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::device::{driver_err, guard, CudaDevice, DeviceElem};
use crate::error::{Error, Result};

/// A position in a device buffer: `buf` from element `off` on.
#[derive(Clone, Copy)]
pub struct At<'a, T> {
    pub buf: &'a CudaSlice<T>,
    pub off: usize,
}

impl<'a, T> At<'a, T> {
    pub fn new(buf: &'a CudaSlice<T>, off: usize) -> Self {
        At { buf, off }
    }
}

impl<'a, T> From<&'a CudaSlice<T>> for At<'a, T> {
    fn from(buf: &'a CudaSlice<T>) -> Self {
        At { buf, off: 0 }
    }
}

fn need<T>(buf: &CudaSlice<T>, off: usize, n: usize, op: &str, arg: &str) -> Result<()> {
    if off.checked_add(n).is_none_or(|end| end > buf.len()) {
        return Err(Error::Internal(format!(
            "{op}: '{arg}' needs elements {off}..{} but the buffer holds {}",
            off.saturating_add(n),
            buf.len()
        )));
    }
    Ok(())
}

fn addr<T>(dev: &CudaDevice, buf: &CudaSlice<T>, off: usize) -> u64 {
    dev.ptr(buf) + (off * std::mem::size_of::<T>()) as u64
}

fn to_i32(v: usize, op: &str, arg: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Internal(format!("{op}: '{arg}' = {v} exceeds i32")))
}

/// The elementwise contract: 256 threads, grid = min(ceil(n / 256), 65536), grid-stride.
fn elementwise_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65536) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One kernel argument: a device address, an integer or a float, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum Param {
    U64(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

impl From<u64> for Param {
    fn from(v: u64) -> Self {
        Param::U64(v)
    }
}
impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::I64(v)
    }
}
impl From<i32> for Param {
    fn from(v: i32) -> Self {
        Param::I32(v)
    }
}
impl From<f32> for Param {
    fn from(v: f32) -> Self {
        Param::F32(v)
    }
}

/// Launches `kernel` of `file` with `params`, in the kernel's order and types.
fn launch(
    dev: &CudaDevice,
    file: &'static str,
    kernel: &str,
    cfg: LaunchConfig,
    params: &[Param],
) -> Result<()> {
    let f = dev.function_dyn_smem(file, kernel, cfg.shared_mem_bytes)?;
    guard(kernel, || {
        let mut b = dev.stream().launch_builder(&f);
        for p in params {
            match p {
                Param::U64(v) => b.arg(v),
                Param::I64(v) => b.arg(v),
                Param::I32(v) => b.arg(v),
                Param::F32(v) => b.arg(v),
            };
        }
        // SAFETY: each op wrapper checks every buffer's extent against the kernel's contract
        // before calling launch, and passes the arguments in the kernel's order and types.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(driver_err(&format!("launching {kernel}")))
    })
}

fn name<T: DeviceElem>(op: &str) -> String {
    format!("{op}_{}", T::SUFFIX)
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Shape of one attention call (the CPU backend's layout, with row strides).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub head_dim: usize,
    /// Row strides in elements (>= heads * head_dim).
    pub ld_q: usize,
    pub ld_k: usize,
    pub ld_v: usize,
    pub ld_o: usize,
}

impl AttnShape {
    /// Dense rows: every stride is heads * head_dim.
    pub fn dense(batch: usize, heads: usize, lq: usize, lk: usize, head_dim: usize) -> Self {
        let hd = heads * head_dim;
        AttnShape {
            batch,
            heads,
            lq,
            lk,
            head_dim,
            ld_q: hd,
            ld_k: hd,
            ld_v: hd,
            ld_o: hd,
        }
    }
}

/// Which attention kernel runs. The tensor-core kernels need f16/bf16 and head dims 40, 64,
/// 80 or 160; the `flash2*`/`flash3*` ones also 16-byte aligned rows. A variant that does not
/// apply to a call falls back to `Auto`'s choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// The policy's choice ([`set_auto_policy`]; by default the fastest measured on an H100:
    /// `flash3_attn_*` for head dim 40, `flash2_attn_*` for the others), else `flash_attn_*`
    /// (unaligned rows), else the scalar kernel.
    Auto,
    /// `flash_attn_*` (tensor cores, 16-bit shared loads, one k/v stage).
    Flash1,
    /// `flash2_attn_*` (cp.async double buffering, ldmatrix operands).
    Flash2,
    /// `flash3_attn_*` (two m-tiles per warp, unpadded k; head dim 40).
    Flash3,
    /// The plain-FMA kernel (any dtype, head dims up to 256).
    Scalar,
}

/// The tensor-core variant `AttnKernel::Auto` takes for aligned f16/bf16 rows where it applies
/// (else `flash2_attn_*`). Process-wide, so `hdb bench cuda` can time the whole UNet under each;
/// the default is the one that measured fastest on an H100 (docs/perf.md).
static AUTO_POLICY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

const POLICIES: [AttnKernel; 3] = [AttnKernel::Auto, AttnKernel::Flash2, AttnKernel::Flash3];

/// Sets the variant `AttnKernel::Auto` prefers (`Flash2` or `Flash3`); `Auto` (or anything
/// else) restores the measured default. Returns the previous one.
pub fn set_auto_policy(k: AttnKernel) -> AttnKernel {
    let i = POLICIES.iter().position(|&p| p == k).unwrap_or(0) as u8;
    let prev = AUTO_POLICY.swap(i, std::sync::atomic::Ordering::Relaxed);
    POLICIES[prev as usize % POLICIES.len()]
}

/// Shared-memory row stride (elements) of `flash3*`: the first of d, d+8, d+16 whose stride in
/// 4-byte words is an odd multiple of 4 modulo 32 (the kernel's `conflict_free_stride`).
fn conflict_free_stride(d: usize) -> usize {
    [d, d + 8, d + 16]
        .into_iter()
        .find(|&sk| (sk / 2) % 8 == 4)
        .unwrap_or(d + 24)
}

/// Head dims `flash_attn_d*` is instantiated for.
pub const FLASH_HEAD_DIMS: &[usize] = &[40, 64, 80, 160];

/// The extent checks every attention op makes: a non-empty head shape, row strides of at least
/// heads * d, and every buffer large enough for its rows. `Ok(false)`: no query rows, nothing
/// to do.
fn check_attention<T>(
    op: &str,
    out: At<'_, T>,
    q: At<'_, T>,
    k: At<'_, T>,
    v: At<'_, T>,
    s: &AttnShape,
) -> Result<bool> {
    let hd = s.heads * s.head_dim;
    if s.lk == 0 || s.head_dim == 0 || s.heads == 0 {
        return Err(Error::Internal(format!("{op}: empty shape {s:?}")));
    }
    if s.ld_q < hd || s.ld_k < hd || s.ld_v < hd || s.ld_o < hd {
        return Err(Error::Internal(format!(
            "{op}: a row stride is below heads * d: {s:?}"
        )));
    }
    let span = |rows: usize, ld: usize| (s.batch * rows - 1) * ld + hd;
    if s.batch * s.lq == 0 {
        return Ok(false);
    }
    need(q.buf, q.off, span(s.lq, s.ld_q), op, "q")?;
    need(k.buf, k.off, span(s.lk, s.ld_k), op, "k")?;
    need(v.buf, v.off, span(s.lk, s.ld_v), op, "v")?;
    need(out.buf, out.off, span(s.lq, s.ld_o), op, "out")?;
    Ok(true)
}

/// The scalar kernels' launch: 4 query rows (warps) a block.
fn scalar_attention_cfg(s: &AttnShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.lq.div_ceil(4) as u32, s.heads as u32, s.batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out = softmax(q k^T / sqrt(d)) v per (batch, head). Returns the kernel it launched.
pub fn attention<T: DeviceElem>(
    dev: &CudaDevice,
    out: At<'_, T>,
    q: At<'_, T>,
    k: At<'_, T>,
    v: At<'_, T>,
    s: AttnShape,
    kernel: AttnKernel,
) -> Result<String> {
    let op = "attention";
    if !check_attention(op, out, q, k, v, &s)? {
        return Ok(String::new());
    }
    let half = T::SUFFIX != "f32";
    let flash = kernel != AttnKernel::Scalar && half && FLASH_HEAD_DIMS.contains(&s.head_dim);
    let tsz = std::mem::size_of::<T>();
    let aligned = [s.ld_q, s.ld_k, s.ld_v, s.ld_o]
        .iter()
        .all(|ld| ld % 8 == 0)
        && [
            (q.buf, q.off),
            (k.buf, k.off),
            (v.buf, v.off),
            (out.buf, out.off),
        ]
        .iter()
        .all(|&(b, o)| addr(dev, b, o) % 16 == 0)
        && tsz == 2;
    // The tensor-core variant: the one asked for, or Auto's policy, where it applies.
    let wanted = match kernel {
        AttnKernel::Auto => {
            POLICIES
                [AUTO_POLICY.load(std::sync::atomic::Ordering::Relaxed) as usize % POLICIES.len()]
        }
        k => k,
    };
    let d = s.head_dim;
    let variant = if !flash || !aligned || matches!(kernel, AttnKernel::Flash1 | AttnKernel::Scalar)
    {
        None
    } else {
        Some(match wanted {
            // H100, hdb bench cuda (docs/perf.md, run 4): flash3 beat flash2 at head dim 40
            // (0.204 vs 0.245 ms at 4096 tokens) and lost at 80 (0.0375 vs 0.0355 ms).
            AttnKernel::Auto | AttnKernel::Flash3 if d == 40 => AttnKernel::Flash3,
            _ => AttnKernel::Flash2,
        })
    };
    if !flash && s.head_dim > 256 {
        return Err(Error::Unsupported(format!(
            "attention with head dim {} (the scalar kernel takes up to 256)",
            s.head_dim
        )));
    }
    let (kname, cfg) = if let Some(var) = variant {
        // (kernel stem, query rows a block, threads, key tile, shared-memory row stride)
        let dp8 = d.div_ceil(16) * 16 + 8;
        let (stem, bm, threads, bn, sk) = match var {
            AttnKernel::Flash3 => ("flash3_attn", 128, 128, 64, conflict_free_stride(d)),
            _ => ("flash2_attn", 64, 128, if d > 80 { 32 } else { 64 }, dp8),
        };
        (
            format!("{stem}_d{d}_{}", T::SUFFIX),
            LaunchConfig {
                grid_dim: (s.lq.div_ceil(bm) as u32, s.heads as u32, s.batch as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: ((bm + 4 * bn) * sk * 2) as u32,
            },
        )
    } else if flash {
        (
            format!("flash_attn_d{}_{}", s.head_dim, T::SUFFIX),
            LaunchConfig {
                grid_dim: (s.lq.div_ceil(64) as u32, s.heads as u32, s.batch as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    } else {
        (name::<T>("attention_scalar"), scalar_attention_cfg(&s))
    };
    let (o_a, q_a, k_a, v_a) = (
        addr(dev, out.buf, out.off),
        addr(dev, q.buf, q.off),
        addr(dev, k.buf, k.off),
        addr(dev, v.buf, v.off),
    );
    let lq = to_i32(s.lq, op, "lq")?;
    let lk = to_i32(s.lk, op, "lk")?;
    let d = to_i32(s.head_dim, op, "head_dim")?;
    let (ldq, ldk, ldv, ldo) = (s.ld_q as i64, s.ld_k as i64, s.ld_v as i64, s.ld_o as i64);
    let scale = 1.0f32 / (s.head_dim as f32).sqrt();
    let mut params: Vec<Param> = vec![
        o_a.into(),
        q_a.into(),
        k_a.into(),
        v_a.into(),
        lq.into(),
        lk.into(),
    ];
    if !flash {
        params.push(d.into());
    }
    params.extend::<[Param; 5]>([ldq.into(), ldk.into(), ldv.into(), ldo.into(), scale.into()]);
    launch(dev, "attention.cu", &kname, cfg, &params)?;
    Ok(kname)
}

/// Causal attention (CLIP's text encoder): query row i of each (batch, head) sees keys 0..=i
/// only; needs lq == lk and head dim <= 256. One `attention_scalar_causal_*` launch (the
/// scalar kernel's contract, attention.cu).
pub fn attention_causal<T: DeviceElem>(
    dev: &CudaDevice,
    out: At<'_, T>,
    q: At<'_, T>,
    k: At<'_, T>,
    v: At<'_, T>,
    s: AttnShape,
) -> Result<()> {
    let op = "attention_causal";
    if s.lq != s.lk {
        return Err(Error::Internal(format!(
            "{op}: causal attention needs lq == lk, got {} and {}",
            s.lq, s.lk
        )));
    }
    if !check_attention(op, out, q, k, v, &s)? {
        return Ok(());
    }
    if s.head_dim > 256 {
        return Err(Error::Unsupported(format!(
            "causal attention with head dim {} (the scalar kernel takes up to 256)",
            s.head_dim
        )));
    }
    let lq = to_i32(s.lq, op, "lq")?;
    let lk = to_i32(s.lk, op, "lk")?;
    let d = to_i32(s.head_dim, op, "head_dim")?;
    let (ldq, ldk, ldv, ldo) = (s.ld_q as i64, s.ld_k as i64, s.ld_v as i64, s.ld_o as i64);
    let scale = 1.0f32 / (s.head_dim as f32).sqrt();
    launch(
        dev,
        "attention.cu",
        &name::<T>("attention_scalar_causal"),
        scalar_attention_cfg(&s),
        &[
            addr(dev, out.buf, out.off).into(),
            addr(dev, q.buf, q.off).into(),
            addr(dev, k.buf, k.off).into(),
            addr(dev, v.buf, v.off).into(),
            lq.into(),
            lk.into(),
            d.into(),
            ldq.into(),
            ldk.into(),
            ldv.into(),
            ldo.into(),
            scale.into(),
        ],
    )
}

/// Scratch (elements of T) [`attention_materialized`] needs: one batch element's scores,
/// heads * lq * lk (None on overflow). The VAE's mid-block attention (1 head, d = 512) at a
/// 64 x 64 latent (512 x 512 image) has lq = lk = 4096: 16.8 M scores = 32 MiB in f16, 64 MiB
/// in f32; at 128 x 128 (1024 x 1024) 16384 tokens: 512 MiB in f16, 1 GiB in f32.
pub fn attention_materialized_scratch(s: &AttnShape) -> Option<usize> {
    s.heads.checked_mul(s.lq)?.checked_mul(s.lk)
}

/// out = softmax(q k^T / sqrt(d)) v with the scores materialised, for head dims the fused
/// kernels do not take (> 256: the VAE's single-head attention, d = 512). Per batch element:
/// S = scale q k^T for every head in one strided-batched cuBLAS GEMM into `scratch` [heads,
/// lq, lk] (head h reads columns h*d.. of the rows; f32 accumulation, the scale applied in f32
/// before the one rounding to T), the row softmax in place (`softmax_rows`), then O = P v
/// (one more strided-batched GEMM, head h writing its d columns of out's rows). P is rounded
/// to T before P v, as in the flash kernels. `scratch` holds at least
/// [`attention_materialized_scratch`] elements and is reused for every batch element.
pub fn attention_materialized<T: BlasElem>(
    dev: &CudaDevice,
    out: At<'_, T>,
    q: At<'_, T>,
    k: At<'_, T>,
    v: At<'_, T>,
    s: AttnShape,
    scratch: &mut CudaSlice<T>,
) -> Result<()> {
    let op = "attention_materialized";
    if !check_attention(op, out, q, k, v, &s)? {
        return Ok(());
    }
    let per_batch = attention_materialized_scratch(&s)
        .ok_or_else(|| Error::Internal(format!("{op}: scores of {s:?} overflow")))?;
    need(scratch, 0, per_batch, op, "scratch")?;
    let d = s.head_dim;
    let (lq, lk) = (to_i32(s.lq, op, "lq")?, to_i32(s.lk, op, "lk")?);
    let di = to_i32(d, op, "head_dim")?;
    let heads = to_i32(s.heads, op, "heads")?;
    let scale = 1.0f32 / (d as f32).sqrt();
    let tsz = std::mem::size_of::<T>() as u64;
    let s_addr = dev.ptr(scratch);
    // Row-major S_h [lq, lk] = Q_h [lq, d] . K_h [lk, d]^T is column-major C [lk, lq] (ld lk)
    // = op(A) . B with A = K_h seen column-major as [d, lk] (ld ld_k), transposed, and
    // B = Q_h seen column-major as [d, lq] (ld ld_q): m = lk, n = lq, k = d.
    let scores = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: lk,
            n: lq,
            k: di,
            alpha: scale,
            lda: to_i32(s.ld_k, op, "ld_k")?,
            ldb: to_i32(s.ld_q, op, "ld_q")?,
            beta: 0.0,
            ldc: lk,
        },
        batch_size: heads,
        stride_a: d as i64,
        stride_b: d as i64,
        stride_c: (s.lq * s.lk) as i64,
    };
    // Row-major O_h [lq, d] = P_h [lq, lk] . V_h [lk, d]; column-major O_h^T [d, lq] =
    // V_h^T [d, lk] . P_h^T [lk, lq]: A = V_h (column-major [d, lk], ld ld_v), B = P_h
    // (column-major [lk, lq], ld lk), C = O_h (column-major [d, lq], ld ld_o): m = d, n = lq,
    // k = lk. The heads' outputs interleave by column blocks of d; no element is shared.
    let values = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: di,
            n: lq,
            k: lk,
            alpha: 1.0,
            lda: to_i32(s.ld_v, op, "ld_v")?,
            ldb: lk,
            beta: 0.0,
            ldc: to_i32(s.ld_o, op, "ld_o")?,
        },
        batch_size: heads,
        stride_a: d as i64,
        stride_b: (s.lq * s.lk) as i64,
        stride_c: d as i64,
    };
    for b in 0..s.batch {
        let (qa, ka, va, oa) = (
            addr(dev, q.buf, q.off) + (b * s.lq * s.ld_q) as u64 * tsz,
            addr(dev, k.buf, k.off) + (b * s.lk * s.ld_k) as u64 * tsz,
            addr(dev, v.buf, v.off) + (b * s.lk * s.ld_v) as u64 * tsz,
            addr(dev, out.buf, out.off) + (b * s.lq * s.ld_o) as u64 * tsz,
        );
        // SAFETY: check_attention checked q, k, v and out for every batch's rows (each head's
        // d columns lie inside heads * d <= ld), `need` the scratch for heads * lq * lk.
        unsafe { gemm_batched_f32_scalars::<T>(dev, scores, ka, qa, s_addr)? };
        softmax_rows(dev, scratch, s.heads * s.lq, s.lk)?;
        // SAFETY: as above.
        unsafe { gemm_batched_f32_scalars::<T>(dev, values, va, s_addr, oa)? };
    }
    Ok(())
}

/// One `cublasGemmStridedBatchedEx` on raw device addresses with f32 alpha and beta and f32
/// compute, for any storage type: [`BlasElem::gemm_batched_at`] goes through cudarc's typed
/// `Gemm<T>`, which takes alpha in T, and 1 / sqrt(d) rounded to bf16 would be off by up to
/// 2^-9 (a softmax temperature error of that size on every score).
///
/// # Safety
/// Every batch's extents implied by `cfg` must lie inside live allocations of this device.
unsafe fn gemm_batched_f32_scalars<T: DeviceElem>(
    dev: &CudaDevice,
    cfg: StridedBatchedConfig<f32>,
    a: u64,
    b: u64,
    c: u64,
) -> Result<()> {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
    let dtype = match T::SUFFIX {
        "f32" => cudaDataType_t::CUDA_R_32F,
        "f16" => cudaDataType_t::CUDA_R_16F,
        "bf16" => cudaDataType_t::CUDA_R_16BF,
        other => {
            return Err(Error::Internal(format!(
                "cuBLAS batched gemm: no cuBLAS type for {other}"
            )))
        }
    };
    let g = cfg.gemm;
    let (alpha, beta) = (g.alpha, g.beta);
    guard("cuBLAS batched gemm", || {
        // SAFETY: the caller checked the extents; alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F requires, and outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *dev.blas().handle(),
                g.transa,
                g.transb,
                g.m,
                g.n,
                g.k,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                dtype,
                g.lda,
                cfg.stride_a,
                b as *const _,
                dtype,
                g.ldb,
                cfg.stride_b,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                dtype,
                g.ldc,
                cfg.stride_c,
                cfg.batch_size,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Device(format!("cuBLAS batched gemm: {e:?}")))
    })
}

// ---------------------------------------------------------------------------------------------
// LiDB compose and merge, multi-identity LoRA
// ---------------------------------------------------------------------------------------------

/// Host mirror of `LidbComposeLayer` (lidb.cu): six device addresses, then din, dout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ComposeLayer {
    pub d_train: u64,
    pub u_train: u64,
    pub d_aux: u64,
    pub u_aux: u64,
    pub down: u64,
    pub up: u64,
    pub din: i64,
    pub dout: i64,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for ComposeLayer {}

/// Host mirror of `MergeLayer` (lidb.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeLayer {
    pub w_base: u64,
    pub w: u64,
    pub dout: i64,
    pub din: i64,
    pub first_factor: i32,
    pub n_factors: i32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for MergeLayer {}

/// Host mirror of `hdb_lora_factor` (common.cuh): f32 factors `down` [rank, din] and `up`
/// [dout, rank] in device memory, and the user scale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Factor {
    pub down: u64,
    pub up: u64,
    pub rank: i32,
    pub scale: f32,
}
// SAFETY: plain old data with the kernel's layout.
unsafe impl DeviceRepr for Factor {}

/// Composes every layer's factors in one launch. `layers` is a device table (see
/// [`ComposeLayer`]; the caller sized each address's buffer); `max_out` is the largest
/// r * din + dout * r over the layers.
pub fn lidb_compose(
    dev: &CudaDevice,
    layers: &CudaSlice<ComposeLayer>,
    n_layers: usize,
    max_out: usize,
    rab: (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    let op = "lidb_compose";
    if n_layers == 0 {
        return Ok(());
    }
    need(layers, 0, n_layers, op, "layers")?;
    let cfg = LaunchConfig {
        grid_dim: (
            max_out.div_ceil(256).clamp(1, 4096) as u32,
            n_layers as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let t = dev.ptr(layers);
    let n = to_i32(n_layers, op, "n_layers")?;
    let (r, a, b) = (
        to_i32(rab.0, op, "r")?,
        to_i32(rab.1, op, "a")?,
        to_i32(rab.2, op, "b")?,
    );
    launch(
        dev,
        "lidb.cu",
        "lidb_compose_f32",
        cfg,
        &[
            t.into(),
            n.into(),
            r.into(),
            a.into(),
            b.into(),
            alpha.into(),
        ],
    )
}

/// W = W_base + sum scale * up . down for every layer of the device table `layers`, in one
/// launch; `max_dout` is the largest dout. The caller checked each layer's total rank
/// against the kernel's MERGE_MAX_RANK (256); over it, the layer is copied unchanged.
pub fn lidb_merge<T: DeviceElem>(
    dev: &CudaDevice,
    layers: &CudaSlice<MergeLayer>,
    n_layers: usize,
    max_dout: usize,
    factors: &CudaSlice<Factor>,
) -> Result<()> {
    let op = "lidb_merge";
    if n_layers == 0 {
        return Ok(());
    }
    need(layers, 0, n_layers, op, "layers")?;
    let cfg = LaunchConfig {
        grid_dim: (max_dout.div_ceil(8).max(1) as u32, n_layers as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (t, f) = (dev.ptr(layers), dev.ptr(factors));
    let n = to_i32(n_layers, op, "n_layers")?;
    launch(
        dev,
        "lidb.cu",
        &name::<T>("lidb_merge"),
        cfg,
        &[t.into(), n.into(), f.into()],
    )
}

/// Shape of one multi-identity LoRA update.
#[derive(Clone, Copy, Debug)]
pub struct BgmvShape {
    pub rows: usize,
    pub rows_per_sample: usize,
    pub din: usize,
    pub dout: usize,
    pub ld_x: usize,
    pub ld_y: usize,
}

/// y_i += scale_a * up_a (down_a x_i) with a = sample_adapter[i / rows_per_sample] (-1: none).
pub fn lora_bgmv<T: DeviceElem>(
    dev: &CudaDevice,
    y: At<'_, T>,
    x: At<'_, T>,
    sample_adapter: &CudaSlice<i32>,
    adapters: &CudaSlice<Factor>,
    n_adapters: usize,
    s: BgmvShape,
) -> Result<()> {
    let op = "lora_bgmv";
    if s.rows == 0 {
        return Ok(());
    }
    if s.rows_per_sample == 0 || s.ld_x < s.din || s.ld_y < s.dout {
        return Err(Error::Internal(format!("{op}: bad shape {s:?}")));
    }
    need(x.buf, x.off, (s.rows - 1) * s.ld_x + s.din, op, "x")?;
    need(y.buf, y.off, (s.rows - 1) * s.ld_y + s.dout, op, "y")?;
    need(
        sample_adapter,
        0,
        s.rows.div_ceil(s.rows_per_sample),
        op,
        "sample_adapter",
    )?;
    need(adapters, 0, n_adapters, op, "adapters")?;
    let cfg = LaunchConfig {
        grid_dim: (s.rows.div_ceil(16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ya, xa) = (addr(dev, y.buf, y.off), addr(dev, x.buf, x.off));
    let (sa, fa) = (dev.ptr(sample_adapter), dev.ptr(adapters));
    let (rows, rps) = (s.rows as i64, s.rows_per_sample as i64);
    let na = to_i32(n_adapters, op, "n_adapters")?;
    let din = to_i32(s.din, op, "din")?;
    let dout = to_i32(s.dout, op, "dout")?;
    let (ldx, ldy) = (s.ld_x as i64, s.ld_y as i64);
    launch(
        dev,
        "lora.cu",
        &name::<T>("lora_bgmv"),
        cfg,
        &[
            ya.into(),
            xa.into(),
            rows.into(),
            rps.into(),
            sa.into(),
            fa.into(),
            na.into(),
            din.into(),
            dout.into(),
            ldx.into(),
            ldy.into(),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Norms and elementwise ops
// ---------------------------------------------------------------------------------------------

/// GroupNorm over x [batch, channels, hw] (+ SiLU); y may be x (pass the same buffer).
#[allow(clippy::too_many_arguments)]
pub fn group_norm<T: DeviceElem>(
    dev: &CudaDevice,
    y: &CudaSlice<T>,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<T>,
    beta: &CudaSlice<T>,
    (batch, channels, hw): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<()> {
    let op = "group_norm";
    if groups == 0 || channels % groups != 0 {
        return Err(Error::Internal(format!(
            "{op}: {channels} channels do not split into {groups} groups"
        )));
    }
    let n = batch * channels * hw;
    if n == 0 {
        return Ok(());
    }
    need(x, 0, n, op, "x")?;
    need(y, 0, n, op, "y")?;
    need(gamma, 0, channels, op, "gamma")?;
    need(beta, 0, channels, op, "beta")?;
    let cfg = LaunchConfig {
        grid_dim: ((batch * groups) as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    let kname = name::<T>(if silu {
        "group_norm_silu"
    } else {
        "group_norm"
    });
    let (ya, xa, ga, ba) = (dev.ptr(y), dev.ptr(x), dev.ptr(gamma), dev.ptr(beta));
    let (b, c, g) = (
        to_i32(batch, op, "batch")?,
        to_i32(channels, op, "channels")?,
        to_i32(groups, op, "groups")?,
    );
    let hw = hw as i64;
    launch(
        dev,
        "norm.cu",
        &kname,
        cfg,
        &[
            ya.into(),
            xa.into(),
            ga.into(),
            ba.into(),
            b.into(),
            c.into(),
            hw.into(),
            g.into(),
            eps.into(),
        ],
    )
}

/// LayerNorm over the last dim of x [rows, dim]; y may be x.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm<T: DeviceElem>(
    dev: &CudaDevice,
    y: &CudaSlice<T>,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<T>,
    beta: &CudaSlice<T>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let op = "layer_norm";
    if rows * dim == 0 {
        return Ok(());
    }
    need(x, 0, rows * dim, op, "x")?;
    need(y, 0, rows * dim, op, "y")?;
    need(gamma, 0, dim, op, "gamma")?;
    need(beta, 0, dim, op, "beta")?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ya, xa, ga, ba) = (dev.ptr(y), dev.ptr(x), dev.ptr(gamma), dev.ptr(beta));
    let r = rows as i64;
    let d = to_i32(dim, op, "dim")?;
    launch(
        dev,
        "norm.cu",
        &name::<T>("layer_norm"),
        cfg,
        &[
            ya.into(),
            xa.into(),
            ga.into(),
            ba.into(),
            r.into(),
            d.into(),
            eps.into(),
        ],
    )
}

/// y [rows, d] = x[:, :d] * gelu(x[:, d:]) for x [rows, 2d].
pub fn geglu<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    rows: usize,
    d: usize,
) -> Result<()> {
    need(x, 0, rows * 2 * d, "geglu", "x")?;
    need(y, 0, rows * d, "geglu", "y")?;
    let (ya, xa, r, dd) = (
        dev.ptr(y),
        dev.ptr(x),
        rows as i64,
        to_i32(d, "geglu", "d")?,
    );
    launch(
        dev,
        "elementwise.cu",
        &name::<T>("geglu"),
        elementwise_cfg(rows * d),
        &[ya.into(), xa.into(), r.into(), dd.into()],
    )
}

/// x = x * sigmoid(x) over the first n elements.
pub fn silu_inplace<T: DeviceElem>(dev: &CudaDevice, x: &mut CudaSlice<T>, n: usize) -> Result<()> {
    need(x, 0, n, "silu", "x")?;
    let (a, nn) = (dev.ptr(x), n as i64);
    launch(
        dev,
        "elementwise.cu",
        &name::<T>("silu"),
        elementwise_cfg(n),
        &[a.into(), a.into(), nn.into()],
    )
}

/// x = kernel `op` of elementwise.cu (`silu`, `gelu`, `quick_gelu`) over the first n elements.
fn unary_inplace<T: DeviceElem>(
    dev: &CudaDevice,
    x: &mut CudaSlice<T>,
    n: usize,
    op: &str,
) -> Result<()> {
    need(x, 0, n, op, "x")?;
    let (a, nn) = (dev.ptr(x), n as i64);
    launch(
        dev,
        "elementwise.cu",
        &name::<T>(op),
        elementwise_cfg(n),
        &[a.into(), a.into(), nn.into()],
    )
}

/// x = gelu(x) (exact, erf) over the first n elements.
pub fn gelu_inplace<T: DeviceElem>(dev: &CudaDevice, x: &mut CudaSlice<T>, n: usize) -> Result<()> {
    unary_inplace(dev, x, n, "gelu")
}

/// x = x * sigmoid(1.702 x) (CLIP's quick GELU) over the first n elements.
pub fn quick_gelu_inplace<T: DeviceElem>(
    dev: &CudaDevice,
    x: &mut CudaSlice<T>,
    n: usize,
) -> Result<()> {
    unary_inplace(dev, x, n, "quick_gelu")
}

/// Softmax over the last dim of x [rows, n], in place.
pub fn softmax_rows<T: DeviceElem>(
    dev: &CudaDevice,
    x: &mut CudaSlice<T>,
    rows: usize,
    n: usize,
) -> Result<()> {
    need(x, 0, rows * n, "softmax_rows", "x")?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (a, r, nn) = (dev.ptr(x), rows as i64, to_i32(n, "softmax_rows", "n")?);
    launch(
        dev,
        "elementwise.cu",
        &name::<T>("softmax_rows"),
        cfg,
        &[a.into(), a.into(), r.into(), nn.into()],
    )
}

/// diffusers' timestep embedding: y [n, dim] for t [n] (f32).
pub fn timestep_embedding<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    t: &CudaSlice<f32>,
    n: usize,
    dim: usize,
    (flip_sin_to_cos, shift, max_period): (bool, f32, f32),
) -> Result<()> {
    let op = "timestep_embedding";
    need(t, 0, n, op, "t")?;
    need(y, 0, n * dim, op, "y")?;
    let (ya, ta) = (dev.ptr(y), dev.ptr(t));
    let (nn, dd, flip) = (
        to_i32(n, op, "n")?,
        to_i32(dim, op, "dim")?,
        flip_sin_to_cos as i32,
    );
    launch(
        dev,
        "elementwise.cu",
        &name::<T>(op),
        elementwise_cfg(n * dim),
        &[
            ya.into(),
            ta.into(),
            nn.into(),
            dd.into(),
            flip.into(),
            shift.into(),
            max_period.into(),
        ],
    )
}

/// y [planes, 2h, 2w] = nearest 2x upsampling of x [planes, h, w].
pub fn upsample_nearest2x<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    planes: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    let op = "upsample_nearest2x";
    need(x, 0, planes * h * w, op, "x")?;
    need(y, 0, planes * 4 * h * w, op, "y")?;
    let (ya, xa, p) = (dev.ptr(y), dev.ptr(x), planes as i64);
    let (hh, ww) = (to_i32(h, op, "h")?, to_i32(w, op, "w")?);
    launch(
        dev,
        "elementwise.cu",
        &name::<T>(op),
        elementwise_cfg(planes * 4 * h * w),
        &[ya.into(), xa.into(), p.into(), hh.into(), ww.into()],
    )
}

/// y += x over the first n elements (residual connections).
pub fn add_inplace<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    n: usize,
) -> Result<()> {
    need(x, 0, n, "add", "x")?;
    need(y, 0, n, "add", "y")?;
    let (ya, xa, nn) = (dev.ptr(y), dev.ptr(x), n as i64);
    launch(
        dev,
        "elementwise.cu",
        &name::<T>("add"),
        elementwise_cfg(n),
        &[ya.into(), ya.into(), xa.into(), nn.into()],
    )
}

/// y [batch, channels, hw] += v [batch, channels] (the resnet's time embedding).
pub fn add_channel_bias<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    v: &CudaSlice<T>,
    (batch, channels, hw): (usize, usize, usize),
) -> Result<()> {
    let op = "add_channel_bias";
    need(y, 0, batch * channels * hw, op, "y")?;
    need(v, 0, batch * channels, op, "v")?;
    let (ya, va, b, c, h) = (
        dev.ptr(y),
        dev.ptr(v),
        batch as i64,
        to_i32(channels, op, "channels")?,
        hw as i64,
    );
    launch(
        dev,
        "elementwise.cu",
        &name::<T>(op),
        elementwise_cfg(batch * channels * hw),
        &[ya.into(), va.into(), b.into(), c.into(), h.into()],
    )
}

/// y [rows, n] += bias [n].
pub fn add_bias_rows<T: DeviceElem>(
    dev: &CudaDevice,
    y: At<'_, T>,
    bias: &CudaSlice<T>,
    rows: usize,
    n: usize,
) -> Result<()> {
    let op = "add_bias_rows";
    need(y.buf, y.off, rows * n, op, "y")?;
    need(bias, 0, n, op, "bias")?;
    let (ya, ba, r, nn) = (
        addr(dev, y.buf, y.off),
        dev.ptr(bias),
        rows as i64,
        to_i32(n, op, "n")?,
    );
    launch(
        dev,
        "elementwise.cu",
        &name::<T>(op),
        elementwise_cfg(rows * n),
        &[ya.into(), ba.into(), r.into(), nn.into()],
    )
}

/// y [batch, channels, hw] += bias [channels].
pub fn add_bias_channels<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    bias: &CudaSlice<T>,
    (batch, channels, hw): (usize, usize, usize),
) -> Result<()> {
    let op = "add_bias_channels";
    need(y, 0, batch * channels * hw, op, "y")?;
    need(bias, 0, channels, op, "bias")?;
    let (ya, ba, b, c, h) = (
        dev.ptr(y),
        dev.ptr(bias),
        batch as i64,
        to_i32(channels, op, "channels")?,
        hw as i64,
    );
    launch(
        dev,
        "conv.cu",
        &name::<T>(op),
        elementwise_cfg(batch * channels * hw),
        &[ya.into(), ba.into(), b.into(), c.into(), h.into()],
    )
}

/// y [batch, cols, rows] = x [batch, rows, cols] transposed per batch (NCHW <-> NHWC).
pub fn transpose<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let op = "transpose";
    let n = batch * rows * cols;
    if n == 0 {
        return Ok(());
    }
    need(x, 0, n, op, "x")?;
    need(y, 0, n, op, "y")?;
    let cfg = LaunchConfig {
        grid_dim: (
            cols.div_ceil(32) as u32,
            rows.div_ceil(32) as u32,
            batch as u32,
        ),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let (ya, xa, b) = (dev.ptr(y), dev.ptr(x), batch as i64);
    let (r, c) = (to_i32(rows, op, "rows")?, to_i32(cols, op, "cols")?);
    launch(
        dev,
        "conv.cu",
        &name::<T>(op),
        cfg,
        &[ya.into(), xa.into(), b.into(), r.into(), c.into()],
    )
}

/// y [planes, h + 1, w + 1] = x [planes, h, w] with a zero row at the bottom and a zero column
/// at the right of each plane (the VAE encoder's downsampler).
pub fn pad_bottom_right<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    planes: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    let op = "pad_bottom_right";
    let n_out = planes * (h + 1) * (w + 1);
    need(x, 0, planes * h * w, op, "x")?;
    need(y, 0, n_out, op, "y")?;
    let (ya, xa, p) = (dev.ptr(y), dev.ptr(x), planes as i64);
    let (hh, ww) = (to_i32(h, op, "h")?, to_i32(w, op, "w")?);
    launch(
        dev,
        "conv.cu",
        &name::<T>(op),
        elementwise_cfg(n_out),
        &[ya.into(), xa.into(), p.into(), hh.into(), ww.into()],
    )
}

/// y [batch, ca + cb, hw] = the channel concatenation of a [batch, ca, hw] and b [batch, cb,
/// hw] (diffusers' torch.cat of the UNet's up path), as 2 * batch device copies.
pub fn concat_channels<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    (batch, ca, cb, hw): (usize, usize, usize, usize),
) -> Result<()> {
    let op = "concat_channels";
    let (la, lb) = (ca * hw, cb * hw);
    need(a, 0, batch * la, op, "a")?;
    need(b, 0, batch * lb, op, "b")?;
    need(y, 0, batch * (la + lb), op, "y")?;
    for i in 0..batch {
        let base = i * (la + lb);
        copy(dev, y, base, a, i * la, la)?;
        copy(dev, y, base + la, b, i * lb, lb)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GEMMs (cuBLAS) and convolution
// ---------------------------------------------------------------------------------------------

/// cuBLAS GEMM for the three storage types (f32 accumulation; f32 uses cuBLAS's default
/// math, which may use TF32 only where the handle's math mode allows it: it does not here).
pub trait BlasElem: DeviceElem {
    /// C (col-major m x n) = alpha op(A) op(B) + beta C.
    ///
    /// # Safety
    /// The extents implied by the config must lie inside the buffers.
    unsafe fn gemm_at(
        dev: &CudaDevice,
        cfg: GemmConfig<f32>,
        a: At<'_, Self>,
        b: At<'_, Self>,
        c: u64,
    ) -> Result<()>;

    /// Strided batched form of [`BlasElem::gemm_at`].
    ///
    /// # Safety
    /// As `gemm_at`, for every batch.
    unsafe fn gemm_batched_at(
        dev: &CudaDevice,
        cfg: StridedBatchedConfig<f32>,
        a: At<'_, Self>,
        b: At<'_, Self>,
        c: u64,
    ) -> Result<()>;
}

/// `cfg` with alpha and beta in the storage type, as cudarc's `Gemm<T>` takes them.
fn typed<T: DeviceElem>(cfg: GemmConfig<f32>) -> GemmConfig<T> {
    GemmConfig {
        transa: cfg.transa,
        transb: cfg.transb,
        m: cfg.m,
        n: cfg.n,
        k: cfg.k,
        alpha: T::from_f32(cfg.alpha),
        lda: cfg.lda,
        ldb: cfg.ldb,
        beta: T::from_f32(cfg.beta),
        ldc: cfg.ldc,
    }
}

impl<T: DeviceElem> BlasElem for T
where
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    unsafe fn gemm_at(
        dev: &CudaDevice,
        cfg: GemmConfig<f32>,
        a: At<'_, T>,
        b: At<'_, T>,
        c: u64,
    ) -> Result<()> {
        let av = a.buf.slice(a.off..);
        let bv = b.buf.slice(b.off..);
        // SAFETY: c is a device address the caller sized; wrap it as a view.
        let mut cv = unsafe { raw_view_mut::<T>(dev, c) };
        guard("cuBLAS gemm", || {
            // SAFETY: the caller checked the extents.
            unsafe { dev.blas().gemm(typed::<T>(cfg), &av, &bv, &mut cv) }
                .map_err(|e| Error::Device(format!("cuBLAS gemm: {e:?}")))
        })
    }

    unsafe fn gemm_batched_at(
        dev: &CudaDevice,
        cfg: StridedBatchedConfig<f32>,
        a: At<'_, T>,
        b: At<'_, T>,
        c: u64,
    ) -> Result<()> {
        let cfg = StridedBatchedConfig {
            gemm: typed::<T>(cfg.gemm),
            batch_size: cfg.batch_size,
            stride_a: cfg.stride_a,
            stride_b: cfg.stride_b,
            stride_c: cfg.stride_c,
        };
        let av = a.buf.slice(a.off..);
        let bv = b.buf.slice(b.off..);
        // SAFETY: as in gemm_at.
        let mut cv = unsafe { raw_view_mut::<T>(dev, c) };
        guard("cuBLAS gemm", || {
            // SAFETY: the caller checked the extents.
            unsafe { dev.blas().gemm_strided_batched(cfg, &av, &bv, &mut cv) }
                .map_err(|e| Error::Device(format!("cuBLAS batched gemm: {e:?}")))
        })
    }
}

/// A device address as a mutable cuBLAS output. cuBLAS takes the address only; the view's
/// length is not used by the GEMM calls.
///
/// # Safety
/// `addr` must be a live device allocation of this device, large enough for the GEMM.
unsafe fn raw_view_mut<T>(dev: &CudaDevice, addr: u64) -> RawOut<T> {
    RawOut {
        addr,
        stream: dev.stream().clone(),
        _t: std::marker::PhantomData,
    }
}

/// An output address for cuBLAS (see [`raw_view_mut`]).
pub struct RawOut<T> {
    addr: u64,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    _t: std::marker::PhantomData<T>,
}

impl<T> cudarc::driver::DeviceSlice<T> for RawOut<T> {
    fn len(&self) -> usize {
        usize::MAX / std::mem::size_of::<T>().max(1)
    }
    fn stream(&self) -> &std::sync::Arc<cudarc::driver::CudaStream> {
        &self.stream
    }
}

impl<T> cudarc::driver::DevicePtrMut<T> for RawOut<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        stream: &'a cudarc::driver::CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        let _ = stream;
        // Nothing to wait for or record: hdb runs on one stream.
        (self.addr, cudarc::driver::SyncOnDrop::Record(None))
    }
}

/// y [m, n] = x [m, k] . w [n, k]^T (+ bias [n]): PyTorch's Linear, row-major, through one
/// cuBLAS call (column-major: y^T = w . x^T). `ld_y` is y's row stride (>= n).
#[allow(clippy::too_many_arguments)]
pub fn linear<T: BlasElem>(
    dev: &CudaDevice,
    y: At<'_, T>,
    ld_y: usize,
    x: At<'_, T>,
    w: &CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    (m, k, n): (usize, usize, usize),
) -> Result<()> {
    let op = "linear";
    if m * n == 0 {
        return Ok(());
    }
    linear_gemm(dev, op, y, ld_y, x, w, (m, k, n), 0.0)?;
    if let Some(b) = bias {
        if ld_y != n {
            return Err(Error::Internal(format!("{op}: bias with a strided output")));
        }
        add_bias_rows(dev, y, b, m, n)?;
    }
    Ok(())
}

/// y [m, n] += x [m, k] . w [n, k]^T: [`linear`] accumulating into y (cuBLAS beta = 1), no
/// bias; `ld_y` is y's row stride (>= n). The low-rank adapter updates use it.
pub fn linear_acc<T: BlasElem>(
    dev: &CudaDevice,
    y: At<'_, T>,
    ld_y: usize,
    x: At<'_, T>,
    w: &CudaSlice<T>,
    (m, k, n): (usize, usize, usize),
) -> Result<()> {
    if m * n == 0 {
        return Ok(());
    }
    linear_gemm(dev, "linear_acc", y, ld_y, x, w, (m, k, n), 1.0)
}

/// y = x . w^T + beta y (row-major; m * n > 0): [`linear`]'s GEMM, extents checked.
#[allow(clippy::too_many_arguments)]
fn linear_gemm<T: BlasElem>(
    dev: &CudaDevice,
    op: &str,
    y: At<'_, T>,
    ld_y: usize,
    x: At<'_, T>,
    w: &CudaSlice<T>,
    (m, k, n): (usize, usize, usize),
    beta: f32,
) -> Result<()> {
    if ld_y < n {
        return Err(Error::Internal(format!("{op}: ld_y {ld_y} < n {n}")));
    }
    need(x.buf, x.off, m * k, op, "x")?;
    need(w, 0, n * k, op, "w")?;
    need(y.buf, y.off, (m - 1) * ld_y + n, op, "y")?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: to_i32(n, op, "n")?,
        n: to_i32(m, op, "m")?,
        k: to_i32(k, op, "k")?,
        alpha: 1.0,
        lda: to_i32(k, op, "k")?,
        ldb: to_i32(k, op, "k")?,
        beta,
        ldc: to_i32(ld_y, op, "ld_y")?,
    };
    // SAFETY: extents checked above.
    unsafe { T::gemm_at(dev, cfg, At::new(w, 0), x, addr(dev, y.buf, y.off)) }
}

/// A 2-D convolution's shape (the CPU backend's `Conv2d`).
pub use crate::backend::cpu::Conv2d;

/// Scratch a [`conv2d`] of shape `p` needs (elements), 0 for 1x1 stride-1 unpadded convs.
pub fn conv2d_scratch(p: &Conv2d) -> usize {
    let (oh, ow) = p.out_hw();
    if p.kernel == 1 && p.stride == 1 && p.padding == 0 {
        0
    } else {
        p.c_in * p.kernel * p.kernel * oh * ow
    }
}

/// y [batch, c_out, oh, ow] = conv2d(x [batch, c_in, h, w], weight [c_out, c_in, k, k]) +
/// bias: im2col into `scratch` (one sample at a time, [`conv2d_scratch`] elements), then one
/// cuBLAS GEMM per sample; 1x1 convolutions skip im2col and run as one batched GEMM.
#[allow(clippy::too_many_arguments)]
pub fn conv2d<T: BlasElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    p: &Conv2d,
    scratch: &mut CudaSlice<T>,
) -> Result<()> {
    let op = "conv2d";
    let (oh, ow) = p.out_hw();
    let (hw_in, hw_out) = (p.h * p.w, oh * ow);
    let kk = p.c_in * p.kernel * p.kernel;
    if p.batch * p.c_out * hw_out == 0 {
        return Ok(());
    }
    need(x, 0, p.batch * p.c_in * hw_in, op, "x")?;
    need(y, 0, p.batch * p.c_out * hw_out, op, "y")?;
    need(weight, 0, p.c_out * kk, op, "weight")?;
    let pointwise = conv2d_scratch(p) == 0;
    if !pointwise {
        need(scratch, 0, kk * hw_out, op, "scratch")?;
    }
    // Row-major Y [c_out, P] = W [c_out, K] . cols [K, P]; column-major that is
    // Y^T [P, c_out] = cols^T [P, K] . W^T [K, c_out]: m = P, n = c_out, k = K, no transposes.
    let gemm = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: to_i32(hw_out, op, "oh*ow")?,
        n: to_i32(p.c_out, op, "c_out")?,
        k: to_i32(kk, op, "c_in*k*k")?,
        alpha: 1.0,
        lda: to_i32(hw_out, op, "oh*ow")?,
        ldb: to_i32(kk, op, "c_in*k*k")?,
        beta: 0.0,
        ldc: to_i32(hw_out, op, "oh*ow")?,
    };
    let y_addr = dev.ptr(y);
    if pointwise {
        let cfg = StridedBatchedConfig {
            gemm,
            batch_size: to_i32(p.batch, op, "batch")?,
            stride_a: (p.c_in * hw_in) as i64,
            stride_b: 0,
            stride_c: (p.c_out * hw_out) as i64,
        };
        // SAFETY: extents checked above.
        unsafe { T::gemm_batched_at(dev, cfg, At::new(x, 0), At::new(weight, 0), y_addr)? };
    } else {
        let (s_addr, x_addr) = (dev.ptr(scratch), dev.ptr(x));
        let args = [p.c_in, p.h, p.w, p.kernel, p.stride, p.padding, oh, ow]
            .iter()
            .map(|&v| to_i32(v, op, "shape"))
            .collect::<Result<Vec<i32>>>()?;
        let tsz = std::mem::size_of::<T>() as u64;
        for b in 0..p.batch {
            let xb = x_addr + (b * p.c_in * hw_in) as u64 * tsz;
            launch(
                dev,
                "conv.cu",
                &name::<T>("im2col"),
                elementwise_cfg(kk * hw_out),
                &[s_addr.into(), xb.into()]
                    .into_iter()
                    .chain(args.iter().map(|&a| Param::from(a)))
                    .collect::<Vec<_>>(),
            )?;
            let yb = y_addr + (b * p.c_out * hw_out) as u64 * tsz;
            // SAFETY: extents checked above.
            unsafe { T::gemm_at(dev, gemm, At::new(scratch, 0), At::new(weight, 0), yb)? };
        }
    }
    if let Some(bias) = bias {
        add_bias_channels(dev, y, bias, (p.batch, p.c_out, hw_out))?;
    }
    Ok(())
}

/// [`conv2d_implicit`]'s block tile: output channels, output pixels, reduction (conv_igemm.cu).
const IGEMM_TILE: (usize, usize, usize) = (128, 64, 32);

/// Fewest k-tiles (of 32) a split-K slice of [`conv2d_implicit`] reduces.
const IGEMM_MIN_TILES_PER_SPLIT: usize = 8;

/// How many ways [`conv2d_implicit`] splits the reduction (c_in * k * k) of a convolution of
/// shape `p` on a device with `sms` multiprocessors: 1 when the grid of 128 x 64 output tiles
/// already has a block for every SM; else the count (up to 16, each slice at least 8 k-tiles)
/// that minimises the busiest SM's share of the work, ceil(blocks * s / sms) / s, plus 5 % a
/// split for the f32 partial sums and the extra pass. A heuristic, to be tuned from
/// `hdb bench cuda`'s conv rows (with an H100's 132 SMs: 1280 channels at 16x16 in 3 slices).
pub fn conv2d_implicit_splits(p: &Conv2d, sms: usize) -> usize {
    let (oh, ow) = p.out_hw();
    let (bm, bn, bk) = IGEMM_TILE;
    let blocks = (oh * ow).div_ceil(bn) * p.c_out.div_ceil(bm) * p.batch;
    let tiles = (p.c_in * p.kernel * p.kernel).div_ceil(bk);
    let sms = sms.max(1);
    if blocks == 0 || blocks >= sms || tiles < 2 * IGEMM_MIN_TILES_PER_SPLIT {
        return 1;
    }
    let max_s = (tiles / IGEMM_MIN_TILES_PER_SPLIT).min(16);
    let cost = |s: usize| (blocks * s).div_ceil(sms) as f64 / s as f64 + 0.05 * (s - 1) as f64;
    (1..=max_s)
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(1)
}

/// y [batch, c_out, oh, ow] = conv2d(x [batch, c_in, h, w], weight [c_out, c_in, k, k]) + bias
/// as one implicit GEMM on the tensor cores (`conv2d_igemm_*`, kernels/conv_igemm.cu): the
/// input patches are gathered tile by tile into shared memory, no im2col buffer, the bias added
/// before the one rounding to T. f16 and bf16 only: f32 is [`Error::Unsupported`] (the caller
/// falls back to [`conv2d`]), as are shapes whose grid would not fit (batch > 65535). The same
/// extent checks as [`conv2d`]; where the grid is too small for the GPU the reduction is split
/// ([`conv2d_implicit_splits`]) through a temporary f32 buffer and `conv2d_igemm_reduce_*`.
pub fn conv2d_implicit<T: BlasElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    p: &Conv2d,
) -> Result<()> {
    conv2d_implicit_with(dev, y, x, weight, bias, p, None).map(|_| ())
}

/// [`conv2d_implicit`] with the split-K count chosen by the caller (`Some(s)`, clamped to what
/// the shape allows; `Some(1)`: no split) or by [`conv2d_implicit_splits`] (`None`). Returns the
/// count it used (1 for an empty output).
pub fn conv2d_implicit_with<T: BlasElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    p: &Conv2d,
    splits: Option<usize>,
) -> Result<usize> {
    let op = "conv2d_implicit";
    if T::SUFFIX == "f32" {
        return Err(Error::Unsupported(
            "conv2d_implicit in f32 (tensor cores take f16 or bf16; use conv2d)".into(),
        ));
    }
    let (oh, ow) = p.out_hw();
    let (hw_in, hw_out) = (p.h * p.w, oh * ow);
    let kk = p.c_in * p.kernel * p.kernel;
    if p.batch * p.c_out * hw_out == 0 {
        return Ok(1);
    }
    need(x, 0, p.batch * p.c_in * hw_in, op, "x")?;
    need(y, 0, p.batch * p.c_out * hw_out, op, "y")?;
    need(weight, 0, p.c_out * kk, op, "weight")?;
    if let Some(b) = bias {
        need(b, 0, p.c_out, op, "bias")?;
    }
    if kk == 0 {
        return Err(Error::Unsupported(format!("{op}: an empty kernel ({p:?})")));
    }
    // The kernel's in-sample offsets are int.
    to_i32(p.c_in * hw_in, op, "c_in*h*w")?;
    to_i32(p.c_out * hw_out, op, "c_out*oh*ow")?;
    to_i32(kk, op, "c_in*k*k")?;
    let (bm, bn, bk) = IGEMM_TILE;
    let m_tiles = p.c_out.div_ceil(bm);
    if p.batch > 65535 || m_tiles > 65535 {
        return Err(Error::Unsupported(format!(
            "{op}: batch {} or c_out {} beyond the grid's limits",
            p.batch, p.c_out
        )));
    }
    let tiles = kk.div_ceil(bk);
    let wanted = match splits {
        Some(s) => s,
        None => {
            use cudarc::driver::sys::CUdevice_attribute as Attr;
            let sms = dev
                .context()
                .attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(driver_err("reading the multiprocessor count"))?;
            conv2d_implicit_splits(p, sms.max(1) as usize)
        }
    };
    let wanted = wanted.clamp(1, tiles).min(65535 / p.batch);
    // Every slice owns at least one k-tile.
    let per_split = tiles.div_ceil(wanted);
    let splits = tiles.div_ceil(per_split);
    let n = p.batch * p.c_out * hw_out;
    let partial = if splits > 1 {
        Some(dev.alloc::<f32>(splits * n)?)
    } else {
        None
    };
    let args = [
        p.batch, p.c_in, p.h, p.w, p.c_out, p.kernel, p.stride, p.padding, oh, ow, per_split,
    ]
    .iter()
    .map(|&v| to_i32(v, op, "shape"))
    .collect::<Result<Vec<i32>>>()?;
    let (y_a, x_a, w_a) = (dev.ptr(y), dev.ptr(x), dev.ptr(weight));
    let b_a = bias.map_or(0, |b| dev.ptr(b));
    let part_a = partial.as_ref().map_or(0, |b| dev.ptr(b));
    let cfg = LaunchConfig {
        grid_dim: (
            hw_out.div_ceil(bn) as u32,
            m_tiles as u32,
            (p.batch * splits) as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    launch(
        dev,
        "conv_igemm.cu",
        &name::<T>("conv2d_igemm"),
        cfg,
        &[
            y_a.into(),
            part_a.into(),
            x_a.into(),
            w_a.into(),
            b_a.into(),
        ]
        .into_iter()
        .chain(args.iter().map(|&a| Param::from(a)))
        .collect::<Vec<_>>(),
    )?;
    if splits > 1 {
        launch(
            dev,
            "conv_igemm.cu",
            &name::<T>("conv2d_igemm_reduce"),
            elementwise_cfg(n),
            &[
                y_a.into(),
                part_a.into(),
                b_a.into(),
                (splits as i32).into(),
                (n as i64).into(),
                to_i32(p.c_out, op, "c_out")?.into(),
                (hw_out as i64).into(),
            ],
        )?;
    }
    // `partial` is freed in stream order (or after a synchronisation), after the reduce.
    drop(partial);
    Ok(splits)
}

/// Copies `n` elements from `src[src_off..]` to `dst[dst_off..]` on the stream.
pub fn copy<T: DeviceRepr>(
    dev: &CudaDevice,
    dst: &mut CudaSlice<T>,
    dst_off: usize,
    src: &CudaSlice<T>,
    src_off: usize,
    n: usize,
) -> Result<()> {
    need(src, src_off, n, "copy", "src")?;
    need(dst, dst_off, n, "copy", "dst")?;
    if n == 0 {
        return Ok(());
    }
    guard("device copy", || {
        let s = src.slice(src_off..src_off + n);
        let mut d = dst.slice_mut(dst_off..dst_off + n);
        dev.stream()
            .memcpy_dtod(&s, &mut d)
            .map_err(driver_err("device-to-device copy"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(c_in: usize, c_out: usize, hw: usize, kernel: usize, stride: usize) -> Conv2d {
        Conv2d {
            batch: 2,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kernel,
            stride,
            padding: kernel / 2,
        }
    }

    /// The split-K heuristic at SD 1.5's UNet shapes (64x64 latents, batch 2) on an H100's
    /// 132 SMs: no split where the grid fills the GPU, a few slices at 16x16 and 8x8.
    #[test]
    fn implicit_conv_splits_only_small_grids() {
        let sms = 132;
        assert_eq!(conv2d_implicit_splits(&conv(4, 320, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(320, 320, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(640, 640, 32, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(320, 4, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(640, 1280, 16, 1, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(1280, 1280, 16, 3, 1), sms), 3);
        assert_eq!(conv2d_implicit_splits(&conv(320, 320, 64, 3, 2), sms), 4);
        let s = conv2d_implicit_splits(&conv(1280, 1280, 8, 3, 1), sms);
        assert!((4..=5).contains(&s), "{s}");
        // Never more than 16 slices, each of at least 8 k-tiles; nothing to split is 1.
        for (c_in, hw) in [(64, 4), (2048, 4), (9, 2)] {
            let p = conv(c_in, 8, hw, 3, 1);
            let s = conv2d_implicit_splits(&p, sms);
            let tiles = (c_in * 9).div_ceil(32);
            assert!(s == 1 || (s <= 16 && tiles / s >= 8), "{c_in} {hw}: {s}");
        }
        assert_eq!(conv2d_implicit_splits(&conv(0, 8, 4, 3, 1), sms), 1);
    }
}
