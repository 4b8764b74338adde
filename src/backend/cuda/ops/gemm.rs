//! GEMMs through cuBLAS, and conv2d (im2col + cuBLAS, or implicit GEMM: `kernels/conv_igemm.cu`).

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

/// A 2-D convolution's shape (the CPU backend's `Conv2d`).
pub use crate::backend::api::Conv2d;

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
        let tsz = std::mem::size_of::<T>() as u64;
        for b in 0..p.batch {
            let xb = x_addr + (b * p.c_in * hw_in) as u64 * tsz;
            im2col_launch::<T>(s_addr, xb, p)?.run(dev)?;
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

/// The launch of `im2col_*` (conv.cu) that [`conv2d`] makes for each sample of shape `p`: one
/// sample x [c_in, h, w] at device address `x` into cols [c_in * k * k, oh * ow] at `cols`
/// (pure; see [`KernelLaunch`]).
pub fn im2col_launch<T: DeviceElem>(cols: u64, x: u64, p: &Conv2d) -> Result<KernelLaunch> {
    let (oh, ow) = p.out_hw();
    let mut params: Vec<Param> = vec![cols.into(), x.into()];
    for v in [p.c_in, p.h, p.w, p.kernel, p.stride, p.padding, oh, ow] {
        params.push(to_i32(v, "conv2d", "shape")?.into());
    }
    Ok(KernelLaunch {
        file: "conv.cu",
        kernel: name::<T>("im2col"),
        cfg: elementwise_cfg(p.c_in * p.kernel * p.kernel * oh * ow),
        params,
    })
}

/// Whether [`conv2d_implicit`] beats im2col + cuBLAS ([`conv2d`]) at shape `p`, in fp16 on an
/// H100 (`hdb bench cuda`, docs/perf.md, 2026-11-26 session 6): at up to 512 output channels
/// it did at every SD 1.5 UNet and VAE decoder shape measured (0.25x to 0.89x the time: im2col
/// writes and reads back c_in * k * k values per output pixel, a cost that the GEMM's c_out
/// columns amortise less the fewer there are), and at 640 and 1280 it lost (1.4x to 2.3x).
/// 1x1 stride-1 unpadded convolutions are a plain GEMM either way: cuBLAS.
pub fn conv2d_prefers_implicit(p: &Conv2d) -> bool {
    let pointwise = p.kernel == 1 && p.stride == 1 && p.padding == 0;
    !pointwise && p.c_out <= 512
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
    let wanted = match splits {
        Some(s) => s,
        None => conv2d_implicit_splits(p, dev.sm_count()),
    };
    let plan = conv2d_implicit_plan(p, wanted)?;
    let partial = if plan.partial_len > 0 {
        Some(dev.alloc::<f32>(plan.partial_len)?)
    } else {
        None
    };
    let launches = conv2d_implicit_launches::<T>(
        p,
        &plan,
        [
            dev.ptr(y),
            partial.as_ref().map_or(0, |b| dev.ptr(b)),
            dev.ptr(x),
            dev.ptr(weight),
            bias.map_or(0, |b| dev.ptr(b)),
        ],
    )?;
    for l in &launches {
        l.run(dev)?;
    }
    // `partial` is freed in stream order (or after a synchronisation), after the reduce.
    drop(partial);
    Ok(plan.splits)
}

/// How [`conv2d_implicit_with`] splits a convolution of shape `p` (non-empty output) when
/// `wanted` slices are asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImplicitConvPlan {
    /// Slices of the reduction (1: no split).
    pub splits: usize,
    /// k-tiles (of 32) a slice reduces.
    pub tiles_per_split: usize,
    /// f32 elements of the partial-sum buffer (0 without a split).
    pub partial_len: usize,
}

/// [`conv2d_implicit_with`]'s split of shape `p` for `wanted` slices (clamped to what the shape
/// allows), after its shape checks. Pure: no device.
pub fn conv2d_implicit_plan(p: &Conv2d, wanted: usize) -> Result<ImplicitConvPlan> {
    let op = "conv2d_implicit";
    let (oh, ow) = p.out_hw();
    let (hw_in, hw_out) = (p.h * p.w, oh * ow);
    let kk = p.c_in * p.kernel * p.kernel;
    if kk == 0 {
        return Err(Error::Unsupported(format!("{op}: an empty kernel ({p:?})")));
    }
    // The kernel's in-sample offsets are int.
    to_i32(p.c_in * hw_in, op, "c_in*h*w")?;
    to_i32(p.c_out * hw_out, op, "c_out*oh*ow")?;
    to_i32(kk, op, "c_in*k*k")?;
    let (bm, _, bk) = IGEMM_TILE;
    let m_tiles = p.c_out.div_ceil(bm);
    if p.batch > 65535 || m_tiles > 65535 {
        return Err(Error::Unsupported(format!(
            "{op}: batch {} or c_out {} beyond the grid's limits",
            p.batch, p.c_out
        )));
    }
    let tiles = kk.div_ceil(bk);
    let wanted = wanted.clamp(1, tiles).min(65535 / p.batch.max(1));
    // Every slice owns at least one k-tile.
    let per_split = tiles.div_ceil(wanted);
    let splits = tiles.div_ceil(per_split);
    let n = p.batch * p.c_out * hw_out;
    Ok(ImplicitConvPlan {
        splits,
        tiles_per_split: per_split,
        partial_len: if splits > 1 { splits * n } else { 0 },
    })
}

/// The launches of [`conv2d_implicit_with`] for shape `p` split as `plan`, with y, the partial
/// sums (0 without a split), x, the weight and the bias (0 for none) at device addresses
/// `[y, partial, x, weight, bias]`: `conv2d_igemm_*`, then `conv2d_igemm_reduce_*` when split.
/// Pure: no device (see [`KernelLaunch`]).
pub fn conv2d_implicit_launches<T: DeviceElem>(
    p: &Conv2d,
    plan: &ImplicitConvPlan,
    [y_a, part_a, x_a, w_a, b_a]: [u64; 5],
) -> Result<Vec<KernelLaunch>> {
    let op = "conv2d_implicit";
    let (oh, ow) = p.out_hw();
    let hw_out = oh * ow;
    let (bm, bn, _) = IGEMM_TILE;
    let (splits, per_split) = (plan.splits, plan.tiles_per_split);
    let n = p.batch * p.c_out * hw_out;
    let args = [
        p.batch, p.c_in, p.h, p.w, p.c_out, p.kernel, p.stride, p.padding, oh, ow, per_split,
    ]
    .iter()
    .map(|&v| to_i32(v, op, "shape"))
    .collect::<Result<Vec<i32>>>()?;
    let mut launches = vec![KernelLaunch {
        file: "conv_igemm.cu",
        kernel: name::<T>("conv2d_igemm"),
        cfg: LaunchConfig {
            grid_dim: (
                hw_out.div_ceil(bn) as u32,
                p.c_out.div_ceil(bm) as u32,
                (p.batch * splits) as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        },
        params: [
            y_a.into(),
            part_a.into(),
            x_a.into(),
            w_a.into(),
            b_a.into(),
        ]
        .into_iter()
        .chain(args.iter().map(|&a| Param::from(a)))
        .collect(),
    }];
    if splits > 1 {
        launches.push(KernelLaunch {
            file: "conv_igemm.cu",
            kernel: name::<T>("conv2d_igemm_reduce"),
            cfg: elementwise_cfg(n),
            params: vec![
                y_a.into(),
                part_a.into(),
                b_a.into(),
                (splits as i32).into(),
                (n as i64).into(),
                to_i32(p.c_out, op, "c_out")?.into(),
                (hw_out as i64).into(),
            ],
        });
    }
    Ok(launches)
}
