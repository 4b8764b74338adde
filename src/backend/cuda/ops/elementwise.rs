//! Norms and element-wise ops (`kernels/norm.cu`, `kernels/elementwise.cu`, `kernels/conv.cu`).

use super::*;

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
    let chunks = group_norm_chunks(batch * groups, n / (batch * groups), dev.sm_count());
    if chunks > 1 {
        // Freed stream-ordered, after the two launches have read it.
        let stats = dev.alloc::<f32>(batch * groups * chunks * 2)?;
        let [a, b] = group_norm_split_launches::<T>(
            [dev.ptr(y), dev.ptr(x), dev.ptr(gamma), dev.ptr(beta)],
            dev.ptr(&stats),
            (batch, channels, hw),
            groups,
            chunks,
            eps,
            silu,
        )?;
        a.run(dev)?;
        return b.run(dev);
    }
    group_norm_launch::<T>(
        [dev.ptr(y), dev.ptr(x), dev.ptr(gamma), dev.ptr(beta)],
        (batch, channels, hw),
        groups,
        eps,
        silu,
    )?
    .run(dev)
}

/// [`group_norm`]'s launch with y, x, gamma and beta at device addresses `[y, x, gamma, beta]`
/// (pure; see [`KernelLaunch`]). `groups` divides `channels` (the op checks).
pub fn group_norm_launch<T: DeviceElem>(
    [ya, xa, ga, ba]: [u64; 4],
    (batch, channels, hw): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<KernelLaunch> {
    let op = "group_norm";
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
    let (b, c, g) = (
        to_i32(batch, op, "batch")?,
        to_i32(channels, op, "channels")?,
        to_i32(groups, op, "groups")?,
    );
    let hw = hw as i64;
    Ok(KernelLaunch {
        file: "norm.cu",
        kernel: kname,
        cfg,
        params: vec![
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
    })
}

/// How many chunks [`group_norm`] splits each (sample, group) run of `len` elements into, when
/// `runs` = batch * groups blocks would leave some of `sms` multiprocessors idle: enough for
/// about four blocks per SM, at most 64, each chunk at least 8192 elements. 1 means the
/// one-block-per-run kernel (no statistics buffer); so do more runs than a grid's y extent.
pub fn group_norm_chunks(runs: usize, len: usize, sms: usize) -> usize {
    if runs == 0 || runs >= sms || runs > 65535 {
        return 1;
    }
    (4 * sms).div_ceil(runs).min(64).min(len / 8192).max(1)
}

/// [`group_norm`]'s split pair (`group_norm_stats_*`, then `group_norm_apply[_silu]_*`,
/// kernels/norm.cu) with y, x, gamma and beta at device addresses `[y, x, gamma, beta]` and an
/// f32 buffer of `batch * groups * chunks * 2` at `stats` (pure; see [`KernelLaunch`]).
/// `groups` divides `channels` (the op checks); `chunks` >= 1.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_split_launches<T: DeviceElem>(
    [ya, xa, ga, ba]: [u64; 4],
    stats: u64,
    (batch, channels, hw): (usize, usize, usize),
    groups: usize,
    chunks: usize,
    eps: f32,
    silu: bool,
) -> Result<[KernelLaunch; 2]> {
    let op = "group_norm";
    let runs = to_i32(batch * groups, op, "batch * groups")?;
    let k = to_i32(chunks.max(1), op, "chunks")?;
    let len = to_i64(channels / groups.max(1) * hw, op, "run length")?;
    let cfg = LaunchConfig {
        grid_dim: (k as u32, runs as u32, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    let stats_launch = KernelLaunch {
        file: "norm.cu",
        kernel: name::<T>("group_norm_stats"),
        cfg,
        params: vec![stats.into(), xa.into(), len.into(), k.into()],
    };
    let apply = KernelLaunch {
        file: "norm.cu",
        kernel: name::<T>(if silu {
            "group_norm_apply_silu"
        } else {
            "group_norm_apply"
        }),
        cfg,
        params: vec![
            ya.into(),
            xa.into(),
            ga.into(),
            ba.into(),
            stats.into(),
            to_i32(channels, op, "channels")?.into(),
            to_i64(hw, op, "hw")?.into(),
            to_i32(groups, op, "groups")?.into(),
            k.into(),
            eps.into(),
        ],
    };
    Ok([stats_launch, apply])
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
    layer_norm_launch::<T>(
        [dev.ptr(y), dev.ptr(x), dev.ptr(gamma), dev.ptr(beta)],
        rows,
        dim,
        eps,
    )?
    .run(dev)
}

/// [`layer_norm`]'s launch with y, x, gamma and beta at device addresses `[y, x, gamma, beta]`
/// (pure; see [`KernelLaunch`]).
pub fn layer_norm_launch<T: DeviceElem>(
    [ya, xa, ga, ba]: [u64; 4],
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<KernelLaunch> {
    let op = "layer_norm";
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let r = rows as i64;
    let d = to_i32(dim, op, "dim")?;
    Ok(KernelLaunch {
        file: "norm.cu",
        kernel: name::<T>("layer_norm"),
        cfg,
        params: vec![
            ya.into(),
            xa.into(),
            ga.into(),
            ba.into(),
            r.into(),
            d.into(),
            eps.into(),
        ],
    })
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
    geglu_launch::<T>(dev.ptr(y), dev.ptr(x), rows, d)?.run(dev)
}

/// [`geglu`]'s launch with y and x at device addresses `y` and `x` (pure; see [`KernelLaunch`]).
pub fn geglu_launch<T: DeviceElem>(y: u64, x: u64, rows: usize, d: usize) -> Result<KernelLaunch> {
    Ok(KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>("geglu"),
        cfg: elementwise_cfg(rows * d),
        params: vec![
            y.into(),
            x.into(),
            (rows as i64).into(),
            to_i32(d, "geglu", "d")?.into(),
        ],
    })
}

/// x = x * sigmoid(x) over the first n elements.
pub fn silu_inplace<T: DeviceElem>(dev: &CudaDevice, x: &mut CudaSlice<T>, n: usize) -> Result<()> {
    need(x, 0, n, "silu", "x")?;
    silu_launch::<T>(dev.ptr(x), n).run(dev)
}

/// The launch of kernel `op` of elementwise.cu (`silu`, `gelu`, `quick_gelu`) in place over the
/// first n elements at device address `x`.
fn unary_launch<T: DeviceElem>(op: &str, x: u64, n: usize) -> KernelLaunch {
    KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>(op),
        cfg: elementwise_cfg(n),
        params: vec![x.into(), x.into(), (n as i64).into()],
    }
}

/// [`silu_inplace`]'s launch for n elements at device address `x` (pure; see [`KernelLaunch`]).
pub fn silu_launch<T: DeviceElem>(x: u64, n: usize) -> KernelLaunch {
    unary_launch::<T>("silu", x, n)
}

/// [`gelu_inplace`]'s launch for n elements at device address `x` (pure; see [`KernelLaunch`]).
pub fn gelu_launch<T: DeviceElem>(x: u64, n: usize) -> KernelLaunch {
    unary_launch::<T>("gelu", x, n)
}

/// [`quick_gelu_inplace`]'s launch for n elements at device address `x` (pure).
pub fn quick_gelu_launch<T: DeviceElem>(x: u64, n: usize) -> KernelLaunch {
    unary_launch::<T>("quick_gelu", x, n)
}

/// x = gelu(x) (exact, erf) over the first n elements.
pub fn gelu_inplace<T: DeviceElem>(dev: &CudaDevice, x: &mut CudaSlice<T>, n: usize) -> Result<()> {
    need(x, 0, n, "gelu", "x")?;
    gelu_launch::<T>(dev.ptr(x), n).run(dev)
}

/// x = x * sigmoid(1.702 x) (CLIP's quick GELU) over the first n elements.
pub fn quick_gelu_inplace<T: DeviceElem>(
    dev: &CudaDevice,
    x: &mut CudaSlice<T>,
    n: usize,
) -> Result<()> {
    need(x, 0, n, "quick_gelu", "x")?;
    quick_gelu_launch::<T>(dev.ptr(x), n).run(dev)
}

/// [`softmax_rows_from_f32`]'s launch: y (T) at device address `y`, f32 scores at `x`
/// (pure; see [`KernelLaunch`]).
pub fn softmax_rows_from_f32_launch<T: DeviceElem>(
    y: u64,
    x: u64,
    rows: usize,
    n: usize,
) -> Result<KernelLaunch> {
    let op = "softmax_rows_from_f32";
    Ok(KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>(op),
        cfg: LaunchConfig {
            grid_dim: (to_i32(rows.div_ceil(8).max(1), op, "rows")? as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        params: vec![
            y.into(),
            x.into(),
            (rows as i64).into(),
            to_i32(n, op, "n")?.into(),
        ],
    })
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

/// [`softmax_rows`]'s launch, in place at device address `x` (pure; see [`KernelLaunch`]).
pub fn softmax_rows_launch<T: DeviceElem>(x: u64, rows: usize, n: usize) -> Result<KernelLaunch> {
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok(KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>("softmax_rows"),
        cfg,
        params: vec![
            x.into(),
            x.into(),
            (rows as i64).into(),
            to_i32(n, "softmax_rows", "n")?.into(),
        ],
    })
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
    let op = "timestep_embedding";
    let (nn, dd, flip) = (
        to_i32(n, op, "n")?,
        to_i32(dim, op, "dim")?,
        flip_sin_to_cos as i32,
    );
    Ok(KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>(op),
        cfg: elementwise_cfg(n * dim),
        params: vec![
            y.into(),
            t.into(),
            nn.into(),
            dd.into(),
            flip.into(),
            shift.into(),
            max_period.into(),
        ],
    })
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
    let op = "upsample_nearest2x";
    let (hh, ww) = (to_i32(h, op, "h")?, to_i32(w, op, "w")?);
    Ok(KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>(op),
        cfg: elementwise_cfg(planes * 4 * h * w),
        params: vec![
            y.into(),
            x.into(),
            (planes as i64).into(),
            hh.into(),
            ww.into(),
        ],
    })
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
    let ya = dev.ptr(y);
    add_launch::<T>(ya, ya, dev.ptr(x), n).run(dev)
}

/// The launch of `add_*` (y = a + b over n elements) with y, a and b at device addresses `y`,
/// `a` and `b` (pure; see [`KernelLaunch`]); [`add_inplace`] passes y as `a`.
pub fn add_launch<T: DeviceElem>(y: u64, a: u64, b: u64, n: usize) -> KernelLaunch {
    KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>("add"),
        cfg: elementwise_cfg(n),
        params: vec![y.into(), a.into(), b.into(), (n as i64).into()],
    }
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
fn bias_launch<T: DeviceElem>(
    file: &'static str,
    op: &str,
    y: u64,
    v: u64,
    (batch, channels, hw): (usize, usize, usize),
) -> Result<KernelLaunch> {
    Ok(KernelLaunch {
        file,
        kernel: name::<T>(op),
        cfg: elementwise_cfg(batch * channels * hw),
        params: vec![
            y.into(),
            v.into(),
            (batch as i64).into(),
            to_i32(channels, op, "channels")?.into(),
            (hw as i64).into(),
        ],
    })
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
    Ok(KernelLaunch {
        file: "elementwise.cu",
        kernel: name::<T>("add_bias_rows"),
        cfg: elementwise_cfg(rows * n),
        params: vec![
            y.into(),
            bias.into(),
            (rows as i64).into(),
            to_i32(n, "add_bias_rows", "n")?.into(),
        ],
    })
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
/// [`KernelLaunch`]).
pub fn transpose_launch<T: DeviceElem>(
    y: u64,
    x: u64,
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<KernelLaunch> {
    let op = "transpose";
    let cfg = LaunchConfig {
        grid_dim: (
            cols.div_ceil(32) as u32,
            rows.div_ceil(32) as u32,
            batch as u32,
        ),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let (r, c) = (to_i32(rows, op, "rows")?, to_i32(cols, op, "cols")?);
    Ok(KernelLaunch {
        file: "conv.cu",
        kernel: name::<T>(op),
        cfg,
        params: vec![
            y.into(),
            x.into(),
            (batch as i64).into(),
            r.into(),
            c.into(),
        ],
    })
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
    let op = "pad_bottom_right";
    let n_out = planes * (h + 1) * (w + 1);
    let (hh, ww) = (to_i32(h, op, "h")?, to_i32(w, op, "w")?);
    Ok(KernelLaunch {
        file: "conv.cu",
        kernel: name::<T>(op),
        cfg: elementwise_cfg(n_out),
        params: vec![
            y.into(),
            x.into(),
            (planes as i64).into(),
            hh.into(),
            ww.into(),
        ],
    })
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
