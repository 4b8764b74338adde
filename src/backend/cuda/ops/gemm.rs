//! GEMMs through cuBLAS (no kernel file): the typed GEMMs of [`BlasElem`], PyTorch's Linear, and
//! the strided-batched GEMM with f32 scalars the materialised attention uses. Each call makes
//! the device's context current on the calling thread first: cuBLAS, unlike cudarc's own
//! calls, does not, and an op must not depend on what its caller did before.

use super::*;

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
        dev.bind_to_thread()?;
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
        dev.bind_to_thread()?;
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

/// An output address for cuBLAS (see `raw_view_mut`).
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

/// y `[m, n]` = x `[m, k]` . w `[n, k]`^T (+ bias `[n]`): PyTorch's Linear, row-major, through one
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

/// dx [m, k] = dy [m, n] . w [n, k]: [`linear`]'s input gradient (w frozen), row-major, one
/// cuBLAS call (column-major: dx^T [k, m] = w^T [k, n] . dy^T [n, m], w seen column-major as
/// [k, n] with ld k).
pub fn linear_backward<T: BlasElem>(
    dev: &CudaDevice,
    dx: At<'_, T>,
    dy: At<'_, T>,
    w: &CudaSlice<T>,
    (m, k, n): (usize, usize, usize),
) -> Result<()> {
    let op = "linear_backward";
    if m * k == 0 {
        return Ok(());
    }
    if n == 0 {
        return Err(Error::Internal(format!("{op}: dout is 0")));
    }
    need(dy.buf, dy.off, m * n, op, "dy")?;
    need(w, 0, n * k, op, "w")?;
    need(dx.buf, dx.off, m * k, op, "dx")?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: to_i32(k, op, "din")?,
        n: to_i32(m, op, "rows")?,
        k: to_i32(n, op, "dout")?,
        alpha: 1.0,
        lda: to_i32(k, op, "din")?,
        ldb: to_i32(n, op, "dout")?,
        beta: 0.0,
        ldc: to_i32(k, op, "din")?,
    };
    // SAFETY: extents checked above.
    unsafe { T::gemm_at(dev, cfg, At::new(w, 0), dy, addr(dev, dx.buf, dx.off)) }
}

/// The output type of [`gemm_batched_f32_scalars`]: the inputs' storage type, or f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ctype {
    T,
    F32,
}

/// One `cublasGemmStridedBatchedEx` on raw device addresses with f32 alpha and beta and f32
/// compute, for any storage type: [`BlasElem::gemm_batched_at`] goes through cudarc's typed
/// `Gemm<T>`, which takes alpha in T, and 1 / sqrt(d) rounded to bf16 would be off by up to
/// 2^-9 (a softmax temperature error of that size on every score).
///
/// # Safety
/// Every batch's extents implied by `cfg` must lie inside live allocations of this device.
pub(super) unsafe fn gemm_batched_f32_scalars<T: DeviceElem>(
    dev: &CudaDevice,
    cfg: StridedBatchedConfig<f32>,
    a: u64,
    b: u64,
    c: u64,
    ctype: Ctype,
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
    // A and B in T with an f32 C and f32 compute is one of cuBLAS's supported GemmEx
    // combinations for every T here (16F/16BF inputs, 32F output).
    let c_dtype = match ctype {
        Ctype::T => dtype,
        Ctype::F32 => cudaDataType_t::CUDA_R_32F,
    };
    let g = cfg.gemm;
    let (alpha, beta) = (g.alpha, g.beta);
    dev.bind_to_thread()?;
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
                c_dtype,
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

/// c `[m, n]` (f32, row-major) = a^T b summed over `rows`, for a `[rows, m]` and b `[rows, n]`
/// in T: one GemmEx with f32 output and compute (an adapter factor's gradient).
#[allow(clippy::too_many_arguments)]
pub fn outer_f32<T: DeviceElem>(
    dev: &CudaDevice,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    c: &mut CudaSlice<f32>,
    rows: usize,
    m: usize,
    n: usize,
) -> Result<()> {
    let op = "outer_f32";
    need(a, 0, rows * m, op, "a")?;
    need(b, 0, rows * n, op, "b")?;
    need(c, 0, m * n, op, "c")?;
    // Row-major c [m, n] is column-major c^T [n, m] = b' a'^T, where b' = b read column-major
    // ([n, rows], ld n) and a' = a read column-major ([m, rows], ld m).
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_T,
            m: to_i32(n, op, "n")?,
            n: to_i32(m, op, "m")?,
            k: to_i32(rows, op, "rows")?,
            alpha: 1.0,
            lda: to_i32(n.max(1), op, "n")?,
            ldb: to_i32(m.max(1), op, "m")?,
            beta: 0.0,
            ldc: to_i32(n.max(1), op, "n")?,
        },
        batch_size: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
    };
    // SAFETY: the extents were checked above, on live allocations of this device.
    unsafe {
        gemm_batched_f32_scalars::<T>(
            dev,
            cfg,
            addr(dev, b, 0),
            addr(dev, a, 0),
            addr(dev, c, 0),
            Ctype::F32,
        )
    }
}
