//! Element-wise ops, softmax, the timestep embedding and nearest upsampling, and the backward
//! passes of the activations, GEGLU and the upsampling: `kernels/elementwise.cu`. Most follow
//! its element-wise contract ([`Launch::elementwise`]): 256 threads, grid-stride, so any grid
//! is right.

use super::*;
use crate::backend::api::Activation;

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
    geglu_launch::<T>(dev.ptr(y), dev.ptr(x), rows, d)?.run(dev)
}

/// [`geglu`]'s launch with y and x at device addresses `y` and `x` (pure; see [`KernelLaunch`]).
pub fn geglu_launch<T: DeviceElem>(y: u64, x: u64, rows: usize, d: usize) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "geglu")
        .elementwise(rows * d)
        .ptr(y)
        .ptr(x)
        .long("rows", rows)
        .int("d", d)
        .build()
}

/// The launch of kernel `op` of elementwise.cu (`silu`, `gelu`, `quick_gelu`) in place over the
/// first n elements at device address `x`.
fn unary_launch<T: DeviceElem>(op: &str, x: u64, n: usize) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", op)
        .elementwise(n)
        .ptr(x)
        .ptr(x)
        .long("n", n)
        .build()
}

/// x = x * sigmoid(x) over the first n elements.
pub fn silu_inplace<T: DeviceElem>(dev: &CudaDevice, x: &mut CudaSlice<T>, n: usize) -> Result<()> {
    need(x, 0, n, "silu", "x")?;
    silu_launch::<T>(dev.ptr(x), n)?.run(dev)
}

/// x = gelu(x) (exact, erf) over the first n elements.
pub fn gelu_inplace<T: DeviceElem>(dev: &CudaDevice, x: &mut CudaSlice<T>, n: usize) -> Result<()> {
    need(x, 0, n, "gelu", "x")?;
    gelu_launch::<T>(dev.ptr(x), n)?.run(dev)
}

/// x = x * sigmoid(1.702 x) (CLIP's quick GELU) over the first n elements.
pub fn quick_gelu_inplace<T: DeviceElem>(
    dev: &CudaDevice,
    x: &mut CudaSlice<T>,
    n: usize,
) -> Result<()> {
    need(x, 0, n, "quick_gelu", "x")?;
    quick_gelu_launch::<T>(dev.ptr(x), n)?.run(dev)
}

/// [`silu_inplace`]'s launch for n elements at device address `x` (pure; see [`KernelLaunch`]).
pub fn silu_launch<T: DeviceElem>(x: u64, n: usize) -> Result<KernelLaunch> {
    unary_launch::<T>("silu", x, n)
}

/// [`gelu_inplace`]'s launch for n elements at device address `x` (pure; see [`KernelLaunch`]).
pub fn gelu_launch<T: DeviceElem>(x: u64, n: usize) -> Result<KernelLaunch> {
    unary_launch::<T>("gelu", x, n)
}

/// [`quick_gelu_inplace`]'s launch for n elements at device address `x` (pure).
pub fn quick_gelu_launch<T: DeviceElem>(x: u64, n: usize) -> Result<KernelLaunch> {
    unary_launch::<T>("quick_gelu", x, n)
}

/// Softmax over the last dim of x [rows, n], in place.
pub fn softmax_rows<T: DeviceElem>(
    dev: &CudaDevice,
    x: &mut CudaSlice<T>,
    rows: usize,
    n: usize,
) -> Result<()> {
    need(x, 0, rows * n, "softmax_rows", "x")?;
    softmax_rows_launch::<T>(dev.ptr(x), rows, n)?.run(dev)
}

/// [`softmax_rows`]'s launch, in place at device address `x` (pure; see [`KernelLaunch`]): 8
/// rows (warps) a block.
pub fn softmax_rows_launch<T: DeviceElem>(x: u64, rows: usize, n: usize) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "softmax_rows")
        .grid((rows.div_ceil(8), 1, 1))
        .block(256)
        .ptr(x)
        .ptr(x)
        .long("rows", rows)
        .int("n", n)
        .build()
}

/// Softmax over the last dim of f32 scores x [rows, n], written to y as T.
pub fn softmax_rows_from_f32<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<f32>,
    rows: usize,
    n: usize,
) -> Result<()> {
    let op = "softmax_rows_from_f32";
    let len = rows
        .checked_mul(n)
        .ok_or_else(|| Error::Internal(format!("{op}: {rows} x {n} overflows")))?;
    need(x, 0, len, op, "x")?;
    need(y, 0, len, op, "y")?;
    softmax_rows_from_f32_launch::<T>(dev.ptr(y), dev.ptr(x), rows, n)?.run(dev)
}

/// [`softmax_rows_from_f32`]'s launch: y (T) at device address `y`, f32 scores at `x`
/// (pure; see [`KernelLaunch`]).
pub fn softmax_rows_from_f32_launch<T: DeviceElem>(
    y: u64,
    x: u64,
    rows: usize,
    n: usize,
) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "softmax_rows_from_f32")
        .grid((rows.div_ceil(8), 1, 1))
        .block(256)
        .ptr(y)
        .ptr(x)
        .long("rows", rows)
        .int("n", n)
        .build()
}

/// diffusers' timestep embedding: y `[n, dim]` for t `[n]` (f32).
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
    timestep_embedding_launch::<T>(
        dev.ptr(y),
        dev.ptr(t),
        n,
        dim,
        (flip_sin_to_cos, shift, max_period),
    )?
    .run(dev)
}

/// [`timestep_embedding`]'s launch with y (T) and t (f32) at device addresses `y` and `t`
/// (pure; see [`KernelLaunch`]).
pub fn timestep_embedding_launch<T: DeviceElem>(
    y: u64,
    t: u64,
    n: usize,
    dim: usize,
    (flip_sin_to_cos, shift, max_period): (bool, f32, f32),
) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "timestep_embedding")
        .elementwise(n * dim)
        .ptr(y)
        .ptr(t)
        .int("n", n)
        .int("dim", dim)
        .flag(flip_sin_to_cos)
        .float(shift)
        .float(max_period)
        .build()
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
    upsample_nearest2x_launch::<T>(dev.ptr(y), dev.ptr(x), planes, h, w)?.run(dev)
}

/// [`upsample_nearest2x`]'s launch with y and x at device addresses `y` and `x` (pure; see
/// [`KernelLaunch`]).
pub fn upsample_nearest2x_launch<T: DeviceElem>(
    y: u64,
    x: u64,
    planes: usize,
    h: usize,
    w: usize,
) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "upsample_nearest2x")
        .elementwise(planes * 4 * h * w)
        .ptr(y)
        .ptr(x)
        .long("planes", planes)
        .int("h", h)
        .int("w", w)
        .build()
}

/// y += x over the first n elements (residual connections).
pub fn add_inplace<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    n: usize,
) -> Result<()> {
    add_inplace_at(dev, y, 0, x, 0, n)
}

/// y[y_off..] += x[x_off..] over n elements: some samples of one batch added into others of
/// another (per-sample adapters). No launch for n = 0.
pub fn add_inplace_at<T: DeviceElem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    y_off: usize,
    x: &CudaSlice<T>,
    x_off: usize,
    n: usize,
) -> Result<()> {
    need(x, x_off, n, "add", "x")?;
    need(y, y_off, n, "add", "y")?;
    if n == 0 {
        return Ok(());
    }
    let ya = addr(dev, y, y_off);
    add_launch::<T>(ya, ya, addr(dev, x, x_off), n)?.run(dev)
}

/// The launch of `add_*` (y = a + b over n elements) with y, a and b at device addresses `y`,
/// `a` and `b` (pure; see [`KernelLaunch`]); [`add_inplace`] passes y as `a`.
pub fn add_launch<T: DeviceElem>(y: u64, a: u64, b: u64, n: usize) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "add")
        .elementwise(n)
        .ptr(y)
        .ptr(a)
        .ptr(b)
        .long("n", n)
        .build()
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
    add_channel_bias_launch::<T>(dev.ptr(y), dev.ptr(v), (batch, channels, hw))?.run(dev)
}

/// [`add_channel_bias`]'s launch with y and v at device addresses `y` and `v` (pure; see
/// [`KernelLaunch`]).
pub fn add_channel_bias_launch<T: DeviceElem>(
    y: u64,
    v: u64,
    (batch, channels, hw): (usize, usize, usize),
) -> Result<KernelLaunch> {
    bias_launch::<T>(
        "elementwise.cu",
        "add_channel_bias",
        y,
        v,
        (batch, channels, hw),
    )
}

/// The launch of `add_channel_bias_*` (elementwise.cu) or `add_bias_channels_*` (conv.cu): the
/// same parameters, y [batch, channels, hw] and a bias broadcast over hw.
pub(super) fn bias_launch<T: DeviceElem>(
    file: &'static str,
    op: &str,
    y: u64,
    v: u64,
    (batch, channels, hw): (usize, usize, usize),
) -> Result<KernelLaunch> {
    Launch::of::<T>(file, op)
        .elementwise(batch * channels * hw)
        .ptr(y)
        .ptr(v)
        .long("batch", batch)
        .int("channels", channels)
        .long("hw", hw)
        .build()
}

/// y `[rows, n]` += bias `[n]`.
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
    add_bias_rows_launch::<T>(addr(dev, y.buf, y.off), dev.ptr(bias), rows, n)?.run(dev)
}

/// [`add_bias_rows`]'s launch with y and bias at device addresses `y` and `bias` (pure; see
/// [`KernelLaunch`]).
pub fn add_bias_rows_launch<T: DeviceElem>(
    y: u64,
    bias: u64,
    rows: usize,
    n: usize,
) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "add_bias_rows")
        .elementwise(rows * n)
        .ptr(y)
        .ptr(bias)
        .long("rows", rows)
        .int("n", n)
        .build()
}

// --- backward --------------------------------------------------------------------------------

/// dx = dy * act'(x) over n elements (x the activation's input); dx may equal dy, not x.
pub fn activate_backward<T: DeviceElem>(
    dev: &CudaDevice,
    dx: &CudaSlice<T>,
    x: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    n: usize,
    act: Activation,
) -> Result<()> {
    let op = "activate_backward";
    need(x, 0, n, op, "x")?;
    need(dy, 0, n, op, "dy")?;
    need(dx, 0, n, op, "dx")?;
    activate_backward_launch::<T>(act, [dev.ptr(dx), dev.ptr(x), dev.ptr(dy)], n)?.run(dev)
}

/// [`activate_backward`]'s launch (`silu_backward_*`, `gelu_backward_*` or
/// `quick_gelu_backward_*`) with dx, x and dy at device addresses `[dx, x, dy]` (pure; see
/// [`KernelLaunch`]).
pub fn activate_backward_launch<T: DeviceElem>(
    act: Activation,
    [dxa, xa, dya]: [u64; 3],
    n: usize,
) -> Result<KernelLaunch> {
    let kernel = match act {
        Activation::Silu => "silu_backward",
        Activation::Gelu => "gelu_backward",
        Activation::QuickGelu => "quick_gelu_backward",
    };
    Launch::of::<T>("elementwise.cu", kernel)
        .elementwise(n)
        .ptr(dxa)
        .ptr(xa)
        .ptr(dya)
        .long("n", n)
        .build()
}

/// GEGLU's input gradient: dx [rows, 2d] from x [rows, 2d] (its input) and dy [rows, d].
pub fn geglu_backward<T: DeviceElem>(
    dev: &CudaDevice,
    dx: &CudaSlice<T>,
    x: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    rows: usize,
    d: usize,
) -> Result<()> {
    let op = "geglu_backward";
    need(x, 0, rows * 2 * d, op, "x")?;
    need(dx, 0, rows * 2 * d, op, "dx")?;
    need(dy, 0, rows * d, op, "dy")?;
    geglu_backward_launch::<T>([dev.ptr(dx), dev.ptr(x), dev.ptr(dy)], rows, d)?.run(dev)
}

/// [`geglu_backward`]'s launch with dx, x and dy at device addresses `[dx, x, dy]` (pure; see
/// [`KernelLaunch`]): the element-wise contract over rows * d (each thread writes two).
pub fn geglu_backward_launch<T: DeviceElem>(
    [dxa, xa, dya]: [u64; 3],
    rows: usize,
    d: usize,
) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "geglu_backward")
        .elementwise(rows * d)
        .ptr(dxa)
        .ptr(xa)
        .ptr(dya)
        .long("rows", rows)
        .int("d", d)
        .build()
}

/// dx [planes, h, w] = the sums of dy [planes, 2h, 2w]'s 2x2 blocks (nearest upsampling's
/// input gradient).
pub fn upsample_nearest2x_backward<T: DeviceElem>(
    dev: &CudaDevice,
    dx: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    planes: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    let op = "upsample_nearest2x_backward";
    need(dx, 0, planes * h * w, op, "dx")?;
    need(dy, 0, planes * 4 * h * w, op, "dy")?;
    upsample_nearest2x_backward_launch::<T>(dev.ptr(dx), dev.ptr(dy), planes, h, w)?.run(dev)
}

/// [`upsample_nearest2x_backward`]'s launch with dx and dy at device addresses `dx` and `dy`
/// (pure; see [`KernelLaunch`]).
pub fn upsample_nearest2x_backward_launch<T: DeviceElem>(
    dx: u64,
    dy: u64,
    planes: usize,
    h: usize,
    w: usize,
) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "upsample_nearest2x_backward")
        .elementwise(planes * h * w)
        .ptr(dx)
        .ptr(dy)
        .long("planes", planes)
        .int("h", h)
        .int("w", w)
        .build()
}

/// y = x (f32) rounded to T over n elements.
pub fn cast_from_f32<T: DeviceElem>(
    dev: &CudaDevice,
    y: &CudaSlice<T>,
    x: &CudaSlice<f32>,
    n: usize,
) -> Result<()> {
    need(x, 0, n, "cast_from_f32", "x")?;
    need(y, 0, n, "cast_from_f32", "y")?;
    cast_from_f32_launch::<T>(dev.ptr(y), dev.ptr(x), n)?.run(dev)
}

/// [`cast_from_f32`]'s launch with y (T) and x (f32) at device addresses `y` and `x` (pure;
/// see [`KernelLaunch`]).
pub fn cast_from_f32_launch<T: DeviceElem>(y: u64, x: u64, n: usize) -> Result<KernelLaunch> {
    Launch::of::<T>("elementwise.cu", "cast_from_f32")
        .elementwise(n)
        .ptr(y)
        .ptr(x)
        .long("n", n)
        .build()
}
