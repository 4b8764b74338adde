//! Attention's backward pass, materialised: cuBLAS GEMMs around the row kernel of
//! `kernels/attention_backward.cu`, per batch element and chunk of query rows with every head
//! in one strided-batched GEMM (the forward's materialised path, `attention.rs`, is the model).
//! f32 and head dims the flash kernels do not take run here; [`attention_backward`]
//! (`flash_backward.rs`) chooses.

use super::*;

/// The f32 scores one chunk of [`attention_backward`] may hold (32 MiB); dP beside them takes
/// as much, P and dS half of it each in f16: 96 MiB of scratch in f16, 128 MiB in f32. SD 1.5's
/// self-attention at 64 x 64 (8 heads, 4096 keys) runs in chunks of 256 query rows.
pub const BACKWARD_SCORES_BYTES: usize = 32 << 20;

/// Device addresses of [`attention_backward_plan`]'s buffers. q, k, v, dout and the outputs
/// dq, dk, dv are dense (`[batch, len, heads * d]`) in T. `dk_acc` and `dv_acc` are f32
/// accumulators of dk and dv over the chunks (`batch * lk * heads * d`): dk and dv themselves
/// when T is f32, else the plan ends by rounding them into dk and dv. `scores` and `dp` (f32),
/// `probs` and `ds` (T) each hold a chunk's `heads * rows * lk`.
#[derive(Clone, Copy, Debug)]
pub struct BackwardAddrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub dout: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub dk_acc: u64,
    pub dv_acc: u64,
    pub scores: u64,
    pub dp: u64,
    pub probs: u64,
    pub ds: u64,
}

/// A column-major GEMM's configuration: `(transa, transb)`, `(m, n, k)`, `(lda, ldb, ldc)`,
/// `(alpha, beta)`.
fn gemm_cfg(
    (ta, tb): (bool, bool),
    (m, n, k): (i32, i32, i32),
    (lda, ldb, ldc): (i32, i32, i32),
    (alpha, beta): (f32, f32),
) -> GemmConfig<f32> {
    let t = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    GemmConfig {
        transa: t(ta),
        transb: t(tb),
        m,
        n,
        k,
        alpha,
        lda,
        ldb,
        beta,
        ldc,
    }
}

/// Every step of [`attention_backward_with`] for the dense shape `s` in chunks of `chunk`
/// query rows, on buffers at `at` (pure). Per batch element and chunk, for every head:
///
/// 1. S = scale Q K^T and dP = dO V^T, f32 outputs;
/// 2. `attention_backward_rows_*`: P = softmax(S) (causal: masked above the diagonal) and
///    dS = P (dP - rowsum(P dP)), both in T;
/// 3. dV += P^T dO and dK += scale dS^T Q into the f32 accumulators (the first chunk of a
///    batch element overwrites), dQ = scale dS K into the chunk's rows of dq (T);
///
/// then, when T is not f32, dk and dv rounded from their accumulators (`cast_from_f32_*`).
/// A test runs the plan on host memory under cuBLAS's column-major semantics against the
/// CPU's attention backward.
pub fn attention_backward_plan<T: DeviceElem>(
    at: BackwardAddrs,
    s: &AttnShape,
    causal: bool,
    chunk: usize,
) -> Result<Vec<MaterializedStep>> {
    let op = "attention_backward";
    let hd = s.heads * s.head_dim;
    if [s.ld_q, s.ld_k, s.ld_v, s.ld_o].iter().any(|&ld| ld != hd) {
        return Err(Error::Internal(format!(
            "{op}: rows must be dense, got {s:?}"
        )));
    }
    if chunk == 0 {
        return Err(Error::Internal(format!("{op}: chunks of 0 rows")));
    }
    let d = s.head_dim;
    let lk = to_i32(s.lk, op, "lk")?;
    let di = to_i32(d, op, "head_dim")?;
    let ld = to_i32(hd, op, "heads*head_dim")?;
    let heads = to_i32(s.heads, op, "heads")?;
    let dstride = to_i64(d, op, "head_dim")?;
    let scale = 1.0f32 / (d as f32).sqrt();
    let tsz = std::mem::size_of::<T>() as u64;
    let mut steps = Vec::new();
    for b in 0..s.batch {
        let (kb, vb) = (
            at.k + (b * s.lk * hd) as u64 * tsz,
            at.v + (b * s.lk * hd) as u64 * tsz,
        );
        let (dk_b, dv_b) = (
            at.dk_acc + (b * s.lk * hd) as u64 * 4,
            at.dv_acc + (b * s.lk * hd) as u64 * 4,
        );
        for r0 in (0..s.lq).step_by(chunk) {
            let rows = chunk.min(s.lq - r0);
            let n = to_i32(rows, op, "rows")?;
            let per_head = to_i64(rows * s.lk, op, "rows*lk")?;
            let row0 = ((b * s.lq + r0) * hd) as u64 * tsz;
            let (qr, dor, dqr) = (at.q + row0, at.dout + row0, at.dq + row0);
            // Row-major S_h [rows, lk] = Q_h [rows, d] . K_h [lk, d]^T is column-major
            // C [lk, rows] (ld lk) = K_h^T . Q_h with K_h and Q_h seen column-major as [d, lk]
            // and [d, rows] (ld heads * d): m = lk, n = rows, k = d, A transposed. dP_h the
            // same with V_h and dO_h.
            let scores = |alpha| StridedBatchedConfig {
                gemm: gemm_cfg((true, false), (lk, n, di), (ld, ld, lk), (alpha, 0.0)),
                batch_size: heads,
                stride_a: dstride,
                stride_b: dstride,
                stride_c: per_head,
            };
            steps.push(MaterializedStep::Gemm {
                cfg: scores(scale),
                a: kb,
                b: qr,
                c: at.scores,
                c_f32: true,
            });
            steps.push(MaterializedStep::Gemm {
                cfg: scores(1.0),
                a: vb,
                b: dor,
                c: at.dp,
                c_f32: true,
            });
            steps.push(MaterializedStep::Launch(
                attention_backward_rows_launch::<T>(
                    [at.probs, at.ds, at.scores, at.dp],
                    s.heads * rows,
                    s.lk,
                    rows,
                    r0,
                    causal,
                )?,
            ));
            // Row-major dV_h [lk, d] = P_h^T [lk, rows] . dO_h [rows, d]; column-major
            // dV_h^T [d, lk] = dO_h^T [d, rows] . P_h [rows, lk], P_h seen column-major as
            // [lk, rows] (ld lk) and transposed: m = d, n = lk, k = rows. dK_h the same with
            // Q_h and dS_h, times scale. Chunks after the first add to the accumulators.
            let beta = if r0 == 0 { 0.0 } else { 1.0 };
            let keys = |alpha| StridedBatchedConfig {
                gemm: gemm_cfg((false, true), (di, lk, n), (ld, lk, ld), (alpha, beta)),
                batch_size: heads,
                stride_a: dstride,
                stride_b: per_head,
                stride_c: dstride,
            };
            steps.push(MaterializedStep::Gemm {
                cfg: keys(1.0),
                a: dor,
                b: at.probs,
                c: dv_b,
                c_f32: true,
            });
            steps.push(MaterializedStep::Gemm {
                cfg: keys(scale),
                a: qr,
                b: at.ds,
                c: dk_b,
                c_f32: true,
            });
            // Row-major dQ_h [rows, d] = dS_h [rows, lk] . K_h [lk, d]; column-major
            // dQ_h^T [d, rows] = K_h^T [d, lk] . dS_h^T [lk, rows], neither transposed:
            // m = d, n = rows, k = lk.
            steps.push(MaterializedStep::Gemm {
                cfg: StridedBatchedConfig {
                    gemm: gemm_cfg((false, false), (di, n, lk), (ld, lk, ld), (scale, 0.0)),
                    batch_size: heads,
                    stride_a: dstride,
                    stride_b: per_head,
                    stride_c: dstride,
                },
                a: kb,
                b: at.ds,
                c: dqr,
                c_f32: false,
            });
        }
    }
    if T::SUFFIX != "f32" {
        let n = s.batch * s.lk * hd;
        steps.push(MaterializedStep::Launch(cast_from_f32_launch::<T>(
            at.dk, at.dk_acc, n,
        )?));
        steps.push(MaterializedStep::Launch(cast_from_f32_launch::<T>(
            at.dv, at.dv_acc, n,
        )?));
    }
    Ok(steps)
}

/// P and dS (T) of `[rows, lk]` f32 scores s and dp, the chunk's rows starting at query `q0`
/// with `rows_per_head` rows a head: [`attention_backward_with`]'s row step on its own.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_rows<T: DeviceElem>(
    dev: &CudaDevice,
    p: &CudaSlice<T>,
    ds: &CudaSlice<T>,
    s: &CudaSlice<f32>,
    dp: &CudaSlice<f32>,
    (rows, lk): (usize, usize),
    rows_per_head: usize,
    q0: usize,
    causal: bool,
) -> Result<()> {
    let op = "attention_backward_rows";
    let n = rows
        .checked_mul(lk)
        .ok_or_else(|| Error::Internal(format!("{op}: {rows} x {lk} overflows")))?;
    need(s, 0, n, op, "s")?;
    need(dp, 0, n, op, "dp")?;
    need(p, 0, n, op, "p")?;
    need(ds, 0, n, op, "ds")?;
    let at = [dev.ptr(p), dev.ptr(ds), dev.ptr(s), dev.ptr(dp)];
    attention_backward_rows_launch::<T>(at, rows, lk, rows_per_head, q0, causal)?.run(dev)
}

/// The launch of `attention_backward_rows_*` with P and dS (T) and S and dP (f32) at device
/// addresses `[p, ds, s, dp]`: `rows` = heads * rows_per_head rows of `lk`, the chunk's rows
/// starting at query `q0` (pure; see [`KernelLaunch`]). 8 rows (warps) a block.
pub fn attention_backward_rows_launch<T: DeviceElem>(
    [p, ds, s, dp]: [u64; 4],
    rows: usize,
    lk: usize,
    rows_per_head: usize,
    q0: usize,
    causal: bool,
) -> Result<KernelLaunch> {
    Launch::of::<T>("attention_backward.cu", "attention_backward_rows")
        .grid((rows.div_ceil(8), 1, 1))
        .block(256)
        .ptr(p)
        .ptr(ds)
        .ptr(s)
        .ptr(dp)
        .long("rows", rows)
        .int("lk", lk)
        .int("rows_per_head", rows_per_head)
        .int("q0", q0)
        .flag(causal)
        .build()
}

/// Attention's input gradients (dq, dk, dv) by the materialised path: dense
/// `[batch, len, heads * d]` like q, k, v and dout, for the shape `s` (dense) and mask, through
/// [`attention_backward_plan`] in chunks of at most `scores_bytes` of f32 scores (at least one
/// query row each; [`attention_backward`] passes [`BACKWARD_SCORES_BYTES`], the tests force
/// many, uneven chunks). The probabilities are recomputed from q and k. Scratch is allocated
/// per call (stream-ordered).
pub fn attention_backward_with<T: BlasElem>(
    dev: &CudaDevice,
    [dq, dk, dv]: [&CudaSlice<T>; 3],
    [q, k, v, dout]: [&CudaSlice<T>; 4],
    s: AttnShape,
    causal: bool,
    scores_bytes: usize,
) -> Result<()> {
    let op = "attention_backward";
    let hd = s.heads * s.head_dim;
    if s.batch * s.lq == 0 {
        return Ok(());
    }
    if hd == 0 || s.lk == 0 {
        return Err(Error::Internal(format!("{op}: empty shape {s:?}")));
    }
    if causal && s.lq != s.lk {
        return Err(Error::Internal(format!(
            "{op}: causal attention needs lq == lk, got {} and {}",
            s.lq, s.lk
        )));
    }
    let (nq, nk) = (s.batch * s.lq * hd, s.batch * s.lk * hd);
    need(q, 0, nq, op, "q")?;
    need(dout, 0, nq, op, "dout")?;
    need(dq, 0, nq, op, "dq")?;
    need(k, 0, nk, op, "k")?;
    need(v, 0, nk, op, "v")?;
    need(dk, 0, nk, op, "dk")?;
    need(dv, 0, nk, op, "dv")?;
    let (chunk, per_chunk) = attention_materialized_chunk(&s, scores_bytes)
        .ok_or_else(|| Error::Internal(format!("{op}: scores of {s:?} overflow")))?;
    let scores = dev.alloc::<f32>(per_chunk)?;
    let dp = dev.alloc::<f32>(per_chunk)?;
    let probs = dev.alloc::<T>(per_chunk)?;
    let ds = dev.alloc::<T>(per_chunk)?;
    // f32 accumulators of dk and dv over the chunks, unless T is f32 (then dk and dv).
    let acc = if T::SUFFIX == "f32" {
        None
    } else {
        Some((dev.alloc::<f32>(nk)?, dev.alloc::<f32>(nk)?))
    };
    let (dk_acc, dv_acc) = match &acc {
        Some((a, b)) => (dev.ptr(a), dev.ptr(b)),
        None => (dev.ptr(dk), dev.ptr(dv)),
    };
    let at = BackwardAddrs {
        q: dev.ptr(q),
        k: dev.ptr(k),
        v: dev.ptr(v),
        dout: dev.ptr(dout),
        dq: dev.ptr(dq),
        dk: dev.ptr(dk),
        dv: dev.ptr(dv),
        dk_acc,
        dv_acc,
        scores: dev.ptr(&scores),
        dp: dev.ptr(&dp),
        probs: dev.ptr(&probs),
        ds: dev.ptr(&ds),
    };
    for step in attention_backward_plan::<T>(at, &s, causal, chunk)? {
        match step {
            // SAFETY: every buffer's extent was checked above for the dense shape (each head's
            // d columns lie inside heads * d; a chunk's rows inside lq); the scratch holds
            // heads * chunk * lk elements, what a chunk uses; the accumulators batch * lk * hd.
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
    // The scratch is freed stream-ordered, after the launches that read it.
    drop((scores, dp, probs, ds, acc));
    Ok(())
}

#[cfg(test)]
#[path = "attention_backward_tests.rs"]
mod tests;
