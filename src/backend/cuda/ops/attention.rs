//! Attention: the fused kernels of `kernels/attention.cu` (tensor-core flash kernels, the
//! scalar kernel, causal), and the materialised path (cuBLAS scores, `softmax_rows_from_f32`
//! of elementwise.cu, cuBLAS values) for head dims the fused kernels do not take.

use super::*;

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
/// apply to a call falls back to `Auto`'s choice. The CUDA backend passes its own choice
/// (`Cuda::with_attention_kernel`, `Auto` by default), so `hdb bench cuda` can time a whole
/// model under each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttnKernel {
    /// The fastest measured on an H100 (docs/perf.md): `flash3_attn_*` for head dim 40,
    /// `flash2_attn_*` for the others; else `flash_attn_*` (unaligned rows), else the scalar
    /// kernel.
    #[default]
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

/// The scalar kernels' launch (`attention_scalar[_causal]_*`): 4 query rows (warps) a block,
/// with the head dim as an argument.
fn scalar_attention_launch<T: DeviceElem>(
    op: &str,
    s: &AttnShape,
    [o_a, q_a, k_a, v_a]: [u64; 4],
) -> Result<KernelLaunch> {
    attention_args(
        Launch::of::<T>("attention.cu", op)
            .grid((s.lq.div_ceil(4), s.heads, s.batch))
            .block(128),
        s,
        [o_a, q_a, k_a, v_a],
        true,
    )
}

/// Every attention kernel's arguments: out, q, k, v, lq, lk, (head dim: the scalar kernels
/// only), the four row strides, the softmax scale.
fn attention_args(
    l: Launch,
    s: &AttnShape,
    [o_a, q_a, k_a, v_a]: [u64; 4],
    with_head_dim: bool,
) -> Result<KernelLaunch> {
    let mut l = l
        .ptr(o_a)
        .ptr(q_a)
        .ptr(k_a)
        .ptr(v_a)
        .int("lq", s.lq)
        .int("lk", s.lk);
    if with_head_dim {
        l = l.int("head_dim", s.head_dim);
    }
    l.long("ld_q", s.ld_q)
        .long("ld_k", s.ld_k)
        .long("ld_v", s.ld_v)
        .long("ld_o", s.ld_o)
        .float(1.0 / (s.head_dim as f32).sqrt())
        .build()
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
    let l = attention_launch::<T>(
        &s,
        kernel,
        [
            addr(dev, out.buf, out.off),
            addr(dev, q.buf, q.off),
            addr(dev, k.buf, k.off),
            addr(dev, v.buf, v.off),
        ],
    )?;
    l.run(dev)?;
    Ok(l.kernel)
}

/// The launch [`attention`] makes for shape `s` and choice `kernel`, with out, q, k and v at
/// device addresses `[out, q, k, v]` (pure: no device, see [`KernelLaunch`]; the tensor-core
/// variants need every address 16-byte aligned, as in [`attention`]). `s` has query rows.
pub fn attention_launch<T: DeviceElem>(
    s: &AttnShape,
    kernel: AttnKernel,
    addrs: [u64; 4],
) -> Result<KernelLaunch> {
    let half = T::SUFFIX != "f32";
    let flash = kernel != AttnKernel::Scalar && half && FLASH_HEAD_DIMS.contains(&s.head_dim);
    let tsz = std::mem::size_of::<T>();
    let aligned = [s.ld_q, s.ld_k, s.ld_v, s.ld_o]
        .iter()
        .all(|ld| ld % 8 == 0)
        && addrs.iter().all(|a| a % 16 == 0)
        && tsz == 2;
    let d = s.head_dim;
    // The tensor-core variant: the one asked for where it applies, else the measured default.
    let variant = if !flash || !aligned || matches!(kernel, AttnKernel::Flash1 | AttnKernel::Scalar)
    {
        None
    } else {
        Some(match kernel {
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
    if let Some(var) = variant {
        // (kernel stem, query rows a block, threads, key tile, shared-memory row stride)
        let dp8 = d.div_ceil(16) * 16 + 8;
        let (stem, bm, threads, bn, sk) = match var {
            AttnKernel::Flash3 => ("flash3_attn", 128, 128, 64, conflict_free_stride(d)),
            _ => ("flash2_attn", 64, 128, if d > 80 { 32 } else { 64 }, dp8),
        };
        let l = Launch::new("attention.cu", format!("{stem}_d{d}_{}", T::SUFFIX))
            .grid((s.lq.div_ceil(bm), s.heads, s.batch))
            .block(threads)
            .smem((bm + 4 * bn) * sk * 2);
        attention_args(l, s, addrs, false)
    } else if flash {
        let l = Launch::new("attention.cu", format!("flash_attn_d{d}_{}", T::SUFFIX))
            .grid((s.lq.div_ceil(64), s.heads, s.batch))
            .block(128);
        attention_args(l, s, addrs, false)
    } else {
        scalar_attention_launch::<T>("attention_scalar", s, addrs)
    }
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
    attention_causal_launch::<T>(
        &s,
        [
            addr(dev, out.buf, out.off),
            addr(dev, q.buf, q.off),
            addr(dev, k.buf, k.off),
            addr(dev, v.buf, v.off),
        ],
    )?
    .run(dev)
}

/// The launch [`attention_causal`] makes for shape `s` with out, q, k and v at device addresses
/// `[out, q, k, v]` (pure: no device, see [`KernelLaunch`]).
pub fn attention_causal_launch<T: DeviceElem>(
    s: &AttnShape,
    addrs: [u64; 4],
) -> Result<KernelLaunch> {
    scalar_attention_launch::<T>("attention_scalar_causal", s, addrs)
}

/// The f32 scores one chunk of [`attention_materialized`] may hold (64 MiB; the probabilities
/// beside them take half that in f16).
pub const MATERIALIZED_SCORES_BYTES: usize = 64 << 20;

/// Query rows per chunk of [`attention_materialized`] and the scores a chunk holds
/// (heads * rows * lk; None on overflow or an empty shape): as many rows as fit
/// [`MATERIALIZED_SCORES_BYTES`] of f32, at least one. The VAE's mid-block attention (1 head,
/// d = 512) at a 64 x 64 latent (512 x 512 image) has lq = lk = 4096: one chunk of 16.8 M
/// scores (64 MiB); at 128 x 128 (1024 x 1024) 16384 tokens: 16 chunks of 1024 rows, where
/// one chunk for all rows would take 1 GiB.
/// `scores_bytes` is the budget ([`MATERIALIZED_SCORES_BYTES`] in [`attention_materialized`]).
pub fn attention_materialized_chunk(s: &AttnShape, scores_bytes: usize) -> Option<(usize, usize)> {
    let per_row = s.heads.checked_mul(s.lk)?;
    if per_row == 0 || s.lq == 0 {
        return None;
    }
    let rows = (scores_bytes / 4 / per_row).clamp(1, s.lq);
    Some((rows, per_row.checked_mul(rows)?))
}

/// out = softmax(q k^T / sqrt(d)) v with the scores materialised, for head dims the fused
/// kernels do not take (> 256: the VAE's single-head attention, d = 512), in chunks of query
/// rows ([`attention_materialized_chunk`]) so the scratch stays bounded at any resolution. Per
/// batch element and chunk: S = scale q k^T for every head in one strided-batched cuBLAS GEMM
/// into f32 scores [heads, rows, lk] (head h reads columns h*d.. of the rows; f32
/// accumulation, the scale applied in f32; the scores are never rounded to T, as in the
/// fused kernels and PyTorch's SDPA), the row softmax into probabilities P in T
/// (`softmax_rows_from_f32`), then O = P v (one more strided-batched GEMM, head h writing its
/// d columns of out's rows). P is rounded to T before P v, as in the flash kernels. The
/// scratch is allocated per call (stream-ordered) and reused for every chunk.
pub fn attention_materialized<T: BlasElem>(
    dev: &CudaDevice,
    out: At<'_, T>,
    q: At<'_, T>,
    k: At<'_, T>,
    v: At<'_, T>,
    s: AttnShape,
) -> Result<()> {
    attention_materialized_with(dev, out, q, k, v, s, MATERIALIZED_SCORES_BYTES)
}

/// [`attention_materialized`] with chunks of at most `scores_bytes` of f32 scores (at least
/// one query row each): the tests force many, uneven chunks through it.
pub fn attention_materialized_with<T: BlasElem>(
    dev: &CudaDevice,
    out: At<'_, T>,
    q: At<'_, T>,
    k: At<'_, T>,
    v: At<'_, T>,
    s: AttnShape,
    scores_bytes: usize,
) -> Result<()> {
    let op = "attention_materialized";
    if !check_attention(op, out, q, k, v, &s)? {
        return Ok(());
    }
    let (chunk, per_chunk) = attention_materialized_chunk(&s, scores_bytes)
        .ok_or_else(|| Error::Internal(format!("{op}: scores of {s:?} overflow")))?;
    let scores = dev.alloc::<f32>(per_chunk)?;
    let probs = dev.alloc::<T>(per_chunk)?;
    let addrs = MaterializedAddrs {
        out: addr(dev, out.buf, out.off),
        q: addr(dev, q.buf, q.off),
        k: addr(dev, k.buf, k.off),
        v: addr(dev, v.buf, v.off),
        scores: dev.ptr(&scores),
        probs: dev.ptr(&probs),
    };
    for step in attention_materialized_plan::<T>(addrs, &s, chunk)? {
        match step {
            // SAFETY: check_attention checked q, k, v and out for every batch's rows (each
            // head's d columns lie inside heads * d <= ld; a chunk's rows lie inside lq); the
            // scores and probabilities hold heads * chunk * lk elements, what a chunk uses.
            MaterializedStep::Gemm {
                cfg,
                a,
                b,
                c,
                c_f32,
            } => unsafe {
                let ctype = if c_f32 { Ctype::F32 } else { Ctype::T };
                gemm_batched_f32_scalars::<T>(dev, cfg, a, b, c, ctype)?
            },
            MaterializedStep::Launch(l) => l.run(dev)?,
        }
    }
    // The buffers are freed stream-ordered, after the launches that read them.
    drop((scores, probs));
    Ok(())
}

/// Device addresses of [`attention_materialized_plan`]'s buffers: q, k, v and out at their
/// first element; `scores` (f32) and `probs` (T), each holding a chunk's heads * rows * lk.
#[derive(Clone, Copy, Debug)]
pub struct MaterializedAddrs {
    pub out: u64,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub scores: u64,
    pub probs: u64,
}

/// One step of the materialised attention.
#[derive(Clone, Debug)]
pub enum MaterializedStep {
    /// `cublasGemmStridedBatchedEx` on device addresses (column-major, cuBLAS's semantics):
    /// A and B in T, C in T or (`c_f32`) f32, f32 alpha, beta and compute.
    Gemm {
        cfg: StridedBatchedConfig<f32>,
        a: u64,
        b: u64,
        c: u64,
        c_f32: bool,
    },
    /// A kernel launch (the softmax).
    Launch(KernelLaunch),
}

/// Every step of [`attention_materialized_with`] for shape `s` in chunks of `chunk` query
/// rows, on buffers at `at` (pure): per batch element and chunk, the scores GEMM into f32,
/// the softmax into T, the values GEMM into out. A test runs the plan on host memory under
/// cuBLAS's column-major semantics against the CPU's attention.
pub fn attention_materialized_plan<T: DeviceElem>(
    at: MaterializedAddrs,
    s: &AttnShape,
    chunk: usize,
) -> Result<Vec<MaterializedStep>> {
    let op = "attention_materialized";
    if chunk == 0 {
        return Err(Error::Internal(format!("{op}: chunks of 0 rows")));
    }
    let d = s.head_dim;
    let lk = to_i32(s.lk, op, "lk")?;
    let di = to_i32(d, op, "head_dim")?;
    let heads = to_i32(s.heads, op, "heads")?;
    let scale = 1.0f32 / (d as f32).sqrt();
    let tsz = std::mem::size_of::<T>() as u64;
    let mut steps = Vec::new();
    for b in 0..s.batch {
        for r0 in (0..s.lq).step_by(chunk) {
            let rows = chunk.min(s.lq - r0);
            let n = to_i32(rows, op, "rows")?;
            // Row-major S_h [rows, lk] = Q_h [rows, d] . K_h [lk, d]^T is column-major
            // C [lk, rows] (ld lk) = op(A) . B with A = K_h seen column-major as [d, lk]
            // (ld ld_k), transposed, and B = Q_h seen column-major as [d, rows] (ld ld_q):
            // m = lk, n = rows, k = d.
            let scores = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: lk,
                    n,
                    k: di,
                    alpha: scale,
                    lda: to_i32(s.ld_k, op, "ld_k")?,
                    ldb: to_i32(s.ld_q, op, "ld_q")?,
                    beta: 0.0,
                    ldc: lk,
                },
                batch_size: heads,
                stride_a: to_i64(d, op, "head_dim")?,
                stride_b: to_i64(d, op, "head_dim")?,
                stride_c: to_i64(rows * s.lk, op, "rows*lk")?,
            };
            // Row-major O_h [rows, d] = P_h [rows, lk] . V_h [lk, d]; column-major O_h^T
            // [d, rows] = V_h^T [d, lk] . P_h^T [lk, rows]: A = V_h (column-major [d, lk], ld
            // ld_v), B = P_h (column-major [lk, rows], ld lk), C = O_h (column-major
            // [d, rows], ld ld_o): m = d, n = rows, k = lk. The heads' outputs interleave by
            // column blocks of d; no element is shared.
            let values = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_N,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: di,
                    n,
                    k: lk,
                    alpha: 1.0,
                    lda: to_i32(s.ld_v, op, "ld_v")?,
                    ldb: lk,
                    beta: 0.0,
                    ldc: to_i32(s.ld_o, op, "ld_o")?,
                },
                batch_size: heads,
                stride_a: to_i64(d, op, "head_dim")?,
                stride_b: to_i64(rows * s.lk, op, "rows*lk")?,
                stride_c: to_i64(d, op, "head_dim")?,
            };
            let (qa, ka, va, oa) = (
                at.q + ((b * s.lq + r0) * s.ld_q) as u64 * tsz,
                at.k + (b * s.lk * s.ld_k) as u64 * tsz,
                at.v + (b * s.lk * s.ld_v) as u64 * tsz,
                at.out + ((b * s.lq + r0) * s.ld_o) as u64 * tsz,
            );
            steps.push(MaterializedStep::Gemm {
                cfg: scores,
                a: ka,
                b: qa,
                c: at.scores,
                c_f32: true,
            });
            steps.push(MaterializedStep::Launch(softmax_rows_from_f32_launch::<T>(
                at.probs,
                at.scores,
                s.heads * rows,
                s.lk,
            )?));
            steps.push(MaterializedStep::Gemm {
                cfg: values,
                a: va,
                b: at.probs,
                c: oa,
                c_f32: false,
            });
        }
    }
    Ok(steps)
}

#[cfg(test)]
#[path = "attention_tests.rs"]
pub(super) mod tests;
