//! conv2d as im2col + cuBLAS and its input gradient (cuBLAS + col2im), and the layout kernels
//! beside them: `kernels/conv.cu` (im2col, col2im, the NCHW <-> NHWC transpose, the
//! per-channel bias, bottom-right padding); the channel concatenation and split (copies).

use super::*;

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
            stride_a: to_i64(p.c_in * hw_in, op, "c_in*h*w")?,
            stride_b: 0,
            stride_c: to_i64(p.c_out * hw_out, op, "c_out*oh*ow")?,
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

/// The launch of `im2col_*` that [`conv2d`] makes for each sample of shape `p`: one sample
/// x [c_in, h, w] at device address `x` into cols [c_in * k * k, oh * ow] at `cols` (pure; see
/// [`KernelLaunch`]).
pub fn im2col_launch<T: DeviceElem>(cols: u64, x: u64, p: &Conv2d) -> Result<KernelLaunch> {
    let (oh, ow) = p.out_hw();
    Launch::of::<T>("conv.cu", "im2col")
        .elementwise(p.c_in * p.kernel * p.kernel * oh * ow)
        .ptr(cols)
        .ptr(x)
        .int("c_in", p.c_in)
        .int("h", p.h)
        .int("w", p.w)
        .int("kernel", p.kernel)
        .int("stride", p.stride)
        .int("padding", p.padding)
        .int("oh", oh)
        .int("ow", ow)
        .build()
}

/// y `[batch, channels, hw]` += bias `[channels]`.
pub fn add_bias_channels<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    bias: &CudaSlice<T>,
    (batch, channels, hw): (usize, usize, usize),
) -> Result<()> {
    let op = "add_bias_channels";
    need(y, 0, batch * channels * hw, op, "y")?;
    need(bias, 0, channels, op, "bias")?;
    add_bias_channels_launch::<T>(dev.ptr(y), dev.ptr(bias), (batch, channels, hw))?.run(dev)
}

/// [`add_bias_channels`]'s launch with y and bias at device addresses `y` and `bias` (pure; see
/// [`KernelLaunch`]).
pub fn add_bias_channels_launch<T: DeviceElem>(
    y: u64,
    bias: u64,
    (batch, channels, hw): (usize, usize, usize),
) -> Result<KernelLaunch> {
    bias_launch::<T>(
        "conv.cu",
        "add_bias_channels",
        y,
        bias,
        (batch, channels, hw),
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
    transpose_launch::<T>(dev.ptr(y), dev.ptr(x), batch, rows, cols)?.run(dev)
}

/// [`transpose`]'s launch with y and x at device addresses `y` and `x` (pure; see
/// [`KernelLaunch`]): 32 x 32 tiles, one batch element per grid z.
pub fn transpose_launch<T: DeviceElem>(
    y: u64,
    x: u64,
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<KernelLaunch> {
    Launch::of::<T>("conv.cu", "transpose")
        .grid((cols.div_ceil(32), rows.div_ceil(32), batch))
        .block3((32, 8, 1))
        .ptr(y)
        .ptr(x)
        .long("batch", batch)
        .int("rows", rows)
        .int("cols", cols)
        .build()
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
    need(x, 0, planes * h * w, op, "x")?;
    need(y, 0, planes * (h + 1) * (w + 1), op, "y")?;
    pad_bottom_right_launch::<T>(dev.ptr(y), dev.ptr(x), planes, h, w)?.run(dev)
}

/// [`pad_bottom_right`]'s launch with y and x at device addresses `y` and `x` (pure; see
/// [`KernelLaunch`]).
pub fn pad_bottom_right_launch<T: DeviceElem>(
    y: u64,
    x: u64,
    planes: usize,
    h: usize,
    w: usize,
) -> Result<KernelLaunch> {
    Launch::of::<T>("conv.cu", "pad_bottom_right")
        .elementwise(planes * (h + 1) * (w + 1))
        .ptr(y)
        .ptr(x)
        .long("planes", planes)
        .int("h", h)
        .int("w", w)
        .build()
}

/// y [batch, ca + cb, hw] = the channel concatenation of a [batch, ca, hw] and b [batch, cb,
/// hw] (diffusers' torch.cat of the UNet's up path), as 2 * batch device copies: no kernel.
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

/// (a [batch, ca, hw], b [batch, cb, hw]) = x [batch, ca + cb, hw] split along the channels:
/// [`concat_channels`]'s input gradients, as 2 * batch device copies (no kernel).
pub fn split_channels<T: DeviceElem>(
    dev: &CudaDevice,
    a: &mut CudaSlice<T>,
    b: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    (batch, ca, cb, hw): (usize, usize, usize, usize),
) -> Result<()> {
    let op = "split_channels";
    let (la, lb) = (ca * hw, cb * hw);
    need(x, 0, batch * (la + lb), op, "x")?;
    need(a, 0, batch * la, op, "a")?;
    need(b, 0, batch * lb, op, "b")?;
    for i in 0..batch {
        let base = i * (la + lb);
        copy(dev, a, i * la, x, base, la)?;
        copy(dev, b, i * lb, x, base + la, lb)?;
    }
    Ok(())
}

// --- conv2d's input gradient -----------------------------------------------------------------

/// The f32 column gradient [`conv2d_backward`] holds at once (128 MiB): SD 1.5's UNet needs
/// at most 47 MB (a 3x3 convolution of 320 channels at 64 x 64), so it runs in one chunk of
/// channels there; larger images and the VAE's full-resolution convolutions (1.2 GB of
/// columns at 512 x 512) run in chunks of input channels.
pub const CONV_BACKWARD_SCRATCH_BYTES: usize = 128 << 20;

/// Input channels per chunk of [`conv2d_backward_with`]: as many as keep the f32 columns
/// (channels * k * k * oh * ow) within `scratch_bytes`, at least one, at most `c_in`.
pub fn conv2d_backward_channels(p: &Conv2d, scratch_bytes: usize) -> usize {
    let (oh, ow) = p.out_hw();
    let per_channel = (p.kernel * p.kernel)
        .saturating_mul(oh * ow)
        .saturating_mul(4);
    (scratch_bytes / per_channel.max(1)).clamp(1, p.c_in.max(1))
}

/// conv2d's input gradient: dx [batch, c_in, h, w] from dy [batch, c_out, oh, ow] and the
/// frozen weight [c_out, c_in, k, k]. 1x1 stride-1 unpadded convolutions are one batched
/// cuBLAS GEMM (dx_b = W^T dy_b, in T); the rest, per sample and chunk of input channels
/// ([`conv2d_backward_channels`] under [`CONV_BACKWARD_SCRATCH_BYTES`]), the column gradient
/// W_c^T dy_b by cuBLAS into f32 (so the k * k terms of a pixel are summed before the one
/// rounding to T), then `col2im_*` onto those channels of dx.
pub fn conv2d_backward<T: BlasElem>(
    dev: &CudaDevice,
    dx: &mut CudaSlice<T>,
    dy: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    p: &Conv2d,
) -> Result<()> {
    conv2d_backward_with(dev, dx, dy, weight, p, CONV_BACKWARD_SCRATCH_BYTES)
}

/// [`conv2d_backward`] with at most `scratch_bytes` of f32 columns (at least one channel's):
/// the tests force many, uneven chunks through it.
pub fn conv2d_backward_with<T: BlasElem>(
    dev: &CudaDevice,
    dx: &mut CudaSlice<T>,
    dy: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    p: &Conv2d,
    scratch_bytes: usize,
) -> Result<()> {
    let op = "conv2d_backward";
    let (oh, ow) = p.out_hw();
    let (hw_in, hw_out) = (p.h * p.w, oh * ow);
    let kk = p.kernel * p.kernel;
    let ckk = p.c_in * kk;
    if p.batch * p.c_in * hw_in == 0 {
        return Ok(());
    }
    if p.c_out * hw_out == 0 {
        return Err(Error::Internal(format!(
            "{op}: no output gradient in {p:?}"
        )));
    }
    need(dy, 0, p.batch * p.c_out * hw_out, op, "dy")?;
    need(dx, 0, p.batch * p.c_in * hw_in, op, "dx")?;
    need(weight, 0, p.c_out * ckk, op, "weight")?;
    if conv2d_scratch(p) == 0 {
        // Row-major dx_b [c_in, hw] = W^T [c_in, c_out] . dy_b [c_out, hw]; column-major
        // dx_b^T [hw, c_in] = dy_b^T [hw, c_out] . W [c_out, c_in], W seen column-major as
        // [c_in, c_out] (ld c_in) and transposed: m = hw, n = c_in, k = c_out.
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_T,
                m: to_i32(hw_in, op, "h*w")?,
                n: to_i32(p.c_in, op, "c_in")?,
                k: to_i32(p.c_out, op, "c_out")?,
                alpha: 1.0,
                lda: to_i32(hw_in, op, "h*w")?,
                ldb: to_i32(p.c_in, op, "c_in")?,
                beta: 0.0,
                ldc: to_i32(hw_in, op, "h*w")?,
            },
            batch_size: to_i32(p.batch, op, "batch")?,
            stride_a: to_i64(p.c_out * hw_in, op, "c_out*h*w")?,
            stride_b: 0,
            stride_c: to_i64(p.c_in * hw_in, op, "c_in*h*w")?,
        };
        // SAFETY: extents checked above.
        return unsafe {
            T::gemm_batched_at(dev, cfg, At::new(dy, 0), At::new(weight, 0), dev.ptr(dx))
        };
    }
    let chunk = conv2d_backward_channels(p, scratch_bytes);
    // Freed stream-ordered, after the launches that read it.
    let cols = dev.alloc::<f32>(chunk * kk * hw_out)?;
    let tsz = std::mem::size_of::<T>() as u64;
    let (dy_addr, w_addr, dx_addr, cols_addr) =
        (dev.ptr(dy), dev.ptr(weight), dev.ptr(dx), dev.ptr(&cols));
    for b in 0..p.batch {
        for c0 in (0..p.c_in).step_by(chunk) {
            let cc = chunk.min(p.c_in - c0);
            // Row-major cols [cc k k, P] = W_c^T [cc k k, c_out] . dy_b [c_out, P] (W_c: the
            // chunk's columns of W [c_out, c_in k k]); column-major cols^T [P, cc k k] =
            // dy_b^T [P, c_out] . W_c [c_out, cc k k], W_c seen column-major as [c_in k k,
            // c_out] (ld c_in k k) from its first column and transposed: m = P, n = cc k k,
            // k = c_out.
            let cfg = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_N,
                    transb: cublasOperation_t::CUBLAS_OP_T,
                    m: to_i32(hw_out, op, "oh*ow")?,
                    n: to_i32(cc * kk, op, "channels*k*k")?,
                    k: to_i32(p.c_out, op, "c_out")?,
                    alpha: 1.0,
                    lda: to_i32(hw_out, op, "oh*ow")?,
                    ldb: to_i32(ckk, op, "c_in*k*k")?,
                    beta: 0.0,
                    ldc: to_i32(hw_out, op, "oh*ow")?,
                },
                batch_size: 1,
                stride_a: 0,
                stride_b: 0,
                stride_c: 0,
            };
            let dy_b = dy_addr + (b * p.c_out * hw_out) as u64 * tsz;
            let w_c = w_addr + (c0 * kk) as u64 * tsz;
            // SAFETY: dy's sample, W's columns and the chunk's columns are inside the buffers
            // (extents checked above; cols holds chunk * k * k * P >= cc * k * k * P).
            unsafe { gemm_batched_f32_scalars::<T>(dev, cfg, dy_b, w_c, cols_addr, Ctype::F32)? };
            let dx_c = dx_addr + ((b * p.c_in + c0) * hw_in) as u64 * tsz;
            col2im_launch::<T>(dx_c, cols_addr, p, cc)?.run(dev)?;
        }
    }
    drop(cols);
    Ok(())
}

/// The launch of `col2im_*` that [`conv2d_backward`] makes for each sample and chunk of
/// `channels` input channels of shape `p`: f32 columns [channels * k * k, oh * ow] at `cols`
/// onto those channels' planes at `x` (pure; see [`KernelLaunch`]).
pub fn col2im_launch<T: DeviceElem>(
    x: u64,
    cols: u64,
    p: &Conv2d,
    channels: usize,
) -> Result<KernelLaunch> {
    let (oh, ow) = p.out_hw();
    Launch::of::<T>("conv.cu", "col2im")
        .elementwise(channels * p.h * p.w)
        .ptr(x)
        .ptr(cols)
        .int("channels", channels)
        .int("h", p.h)
        .int("w", p.w)
        .int("kernel", p.kernel)
        .int("stride", p.stride)
        .int("padding", p.padding)
        .int("oh", oh)
        .int("ow", ow)
        .build()
}
