//! Group norm (+ SiLU) and layer norm, and their backward passes: `kernels/norm.cu`.

use super::*;

/// GroupNorm over x [batch, channels, hw] (+ SiLU); y may be x (pass the same buffer). Runs
/// the one-block-per-run kernel, or the split pair where [`group_norm_chunks`] says the runs
/// alone would leave the GPU idle.
#[allow(clippy::too_many_arguments)]
pub fn group_norm<T: DeviceElem>(
    dev: &CudaDevice,
    y: &CudaSlice<T>,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<T>,
    beta: &CudaSlice<T>,
    shape: (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<()> {
    group_norm_with(dev, y, x, gamma, beta, shape, groups, eps, silu, None).map(|_| ())
}

/// [`group_norm`] with the chunks per (sample, group) run chosen by the caller (`Some(k)`;
/// `Some(1)`: the one-block-per-run kernel) or by [`group_norm_chunks`] (`None`). Returns the
/// count it used (1 for an empty input).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with<T: DeviceElem>(
    dev: &CudaDevice,
    y: &CudaSlice<T>,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<T>,
    beta: &CudaSlice<T>,
    (batch, channels, hw): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
    chunks: Option<usize>,
) -> Result<usize> {
    let op = "group_norm";
    if groups == 0 || channels % groups != 0 {
        return Err(Error::Internal(format!(
            "{op}: {channels} channels do not split into {groups} groups"
        )));
    }
    let n = batch * channels * hw;
    if n == 0 {
        return Ok(1);
    }
    need(x, 0, n, op, "x")?;
    need(y, 0, n, op, "y")?;
    need(gamma, 0, channels, op, "gamma")?;
    need(beta, 0, channels, op, "beta")?;
    let addrs = [dev.ptr(y), dev.ptr(x), dev.ptr(gamma), dev.ptr(beta)];
    let chunks = chunks
        .unwrap_or_else(|| group_norm_chunks(batch * groups, n / (batch * groups), dev.sm_count()));
    if chunks > 1 {
        // Freed stream-ordered, after the two launches have read it.
        let stats = dev.alloc::<f32>(batch * groups * chunks * 2)?;
        let [a, b] = group_norm_split_launches::<T>(
            addrs,
            dev.ptr(&stats),
            (batch, channels, hw),
            groups,
            chunks,
            eps,
            silu,
        )?;
        a.run(dev)?;
        b.run(dev)?;
        return Ok(chunks);
    }
    group_norm_launch::<T>(addrs, (batch, channels, hw), groups, eps, silu)?.run(dev)?;
    Ok(1)
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
    let op = if silu {
        "group_norm_silu"
    } else {
        "group_norm"
    };
    Launch::of::<T>("norm.cu", op)
        .grid((batch * groups, 1, 1))
        .block(512)
        .ptr(ya)
        .ptr(xa)
        .ptr(ga)
        .ptr(ba)
        .int("batch", batch)
        .int("channels", channels)
        .long("hw", hw)
        .int("groups", groups)
        .float(eps)
        .build()
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
    let runs = batch * groups;
    let k = chunks.max(1);
    let len = channels / groups.max(1) * hw;
    let stats_launch = Launch::of::<T>("norm.cu", "group_norm_stats")
        .grid((k, runs, 1))
        .block(512)
        .ptr(stats)
        .ptr(xa)
        .long("run length", len)
        .int("chunks", k)
        .build()?;
    let apply = Launch::of::<T>(
        "norm.cu",
        if silu {
            "group_norm_apply_silu"
        } else {
            "group_norm_apply"
        },
    )
    .grid((k, runs, 1))
    .block(512)
    .ptr(ya)
    .ptr(xa)
    .ptr(ga)
    .ptr(ba)
    .ptr(stats)
    .int("channels", channels)
    .long("hw", hw)
    .int("groups", groups)
    .int("chunks", k)
    .float(eps)
    .build()?;
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
/// (pure; see [`KernelLaunch`]): 8 rows (warps) a block.
pub fn layer_norm_launch<T: DeviceElem>(
    [ya, xa, ga, ba]: [u64; 4],
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<KernelLaunch> {
    Launch::of::<T>("norm.cu", "layer_norm")
        .grid((rows.div_ceil(8), 1, 1))
        .block(256)
        .ptr(ya)
        .ptr(xa)
        .ptr(ga)
        .ptr(ba)
        .long("rows", rows)
        .int("dim", dim)
        .float(eps)
        .build()
}

/// Group norm's (+ SiLU's) input gradient: dx [batch, channels, hw] from dy and the forward's
/// input x (statistics recomputed). dx may not overlap x or dy. Runs the one-block-per-run
/// kernel, or the split trio where [`group_norm_chunks`] splits the forward.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward<T: DeviceElem>(
    dev: &CudaDevice,
    dx: &CudaSlice<T>,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<T>,
    beta: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    shape: (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<()> {
    let bufs = [dx, x, gamma, beta, dy];
    group_norm_backward_with(dev, bufs, shape, groups, eps, silu, None).map(|_| ())
}

/// [`group_norm_backward`] on `[dx, x, gamma, beta, dy]` with the chunks per run chosen by
/// the caller (`Some(1)`: the one-block-per-run kernel) or by [`group_norm_chunks`] (`None`).
/// Returns the count it used (1 for an empty input).
pub fn group_norm_backward_with<T: DeviceElem>(
    dev: &CudaDevice,
    [dx, x, gamma, beta, dy]: [&CudaSlice<T>; 5],
    (batch, channels, hw): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
    chunks: Option<usize>,
) -> Result<usize> {
    let op = "group_norm_backward";
    if groups == 0 || channels % groups != 0 {
        return Err(Error::Internal(format!(
            "{op}: {channels} channels do not split into {groups} groups"
        )));
    }
    let n = batch * channels * hw;
    if n == 0 {
        return Ok(1);
    }
    need(x, 0, n, op, "x")?;
    need(dy, 0, n, op, "dy")?;
    need(dx, 0, n, op, "dx")?;
    need(gamma, 0, channels, op, "gamma")?;
    need(beta, 0, channels, op, "beta")?;
    let addrs = [dx, x, gamma, beta, dy].map(|b| dev.ptr(b));
    let runs = batch * groups;
    let chunks = chunks.unwrap_or_else(|| group_norm_chunks(runs, n / runs, dev.sm_count()));
    if chunks > 1 {
        // Freed stream-ordered, after the launches have read them.
        let stats = dev.alloc::<f32>(runs * chunks * 2)?;
        let sums = dev.alloc::<f32>(runs * chunks * 2)?;
        let at = [dev.ptr(&stats), dev.ptr(&sums)];
        let shape = (batch, channels, hw);
        for l in
            group_norm_backward_split_launches::<T>(addrs, at, shape, groups, chunks, eps, silu)?
        {
            l.run(dev)?;
        }
        return Ok(chunks);
    }
    group_norm_backward_launch::<T>(addrs, (batch, channels, hw), groups, eps, silu)?.run(dev)?;
    Ok(1)
}

/// [`group_norm_backward`]'s one-block-per-run launch with dx, x, gamma, beta and dy at device
/// addresses `[dx, x, gamma, beta, dy]` (pure; see [`KernelLaunch`]). `groups` divides
/// `channels` (the op checks).
pub fn group_norm_backward_launch<T: DeviceElem>(
    [dxa, xa, ga, ba, dya]: [u64; 5],
    (batch, channels, hw): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<KernelLaunch> {
    Launch::of::<T>("norm.cu", "group_norm_backward")
        .grid((batch * groups, 1, 1))
        .block(512)
        .ptr(dxa)
        .ptr(xa)
        .ptr(ga)
        .ptr(ba)
        .ptr(dya)
        .int("batch", batch)
        .int("channels", channels)
        .long("hw", hw)
        .int("groups", groups)
        .float(eps)
        .flag(silu)
        .build()
}

/// [`group_norm_backward`]'s split trio (`group_norm_stats_*`, `group_norm_backward_sums_*`,
/// `group_norm_backward_apply_*`, kernels/norm.cu) with dx, x, gamma, beta and dy at device
/// addresses `[dx, x, gamma, beta, dy]` and two f32 buffers of `batch * groups * chunks * 2`
/// at `[stats, sums]` (pure; see [`KernelLaunch`]). `groups` divides `channels` (the op
/// checks); `chunks` >= 1.
pub fn group_norm_backward_split_launches<T: DeviceElem>(
    [dxa, xa, ga, ba, dya]: [u64; 5],
    [stats, sums]: [u64; 2],
    (batch, channels, hw): (usize, usize, usize),
    groups: usize,
    chunks: usize,
    eps: f32,
    silu: bool,
) -> Result<[KernelLaunch; 3]> {
    let runs = batch * groups;
    let k = chunks.max(1);
    let len = channels / groups.max(1) * hw;
    let stats_launch = Launch::of::<T>("norm.cu", "group_norm_stats")
        .grid((k, runs, 1))
        .block(512)
        .ptr(stats)
        .ptr(xa)
        .long("run length", len)
        .int("chunks", k)
        .build()?;
    let sums_launch = Launch::of::<T>("norm.cu", "group_norm_backward_sums")
        .grid((k, runs, 1))
        .block(512)
        .ptr(sums)
        .ptr(xa)
        .ptr(ga)
        .ptr(ba)
        .ptr(dya)
        .ptr(stats)
        .int("channels", channels)
        .long("hw", hw)
        .int("groups", groups)
        .int("chunks", k)
        .float(eps)
        .flag(silu)
        .build()?;
    let apply = Launch::of::<T>("norm.cu", "group_norm_backward_apply")
        .grid((k, runs, 1))
        .block(512)
        .ptr(dxa)
        .ptr(xa)
        .ptr(ga)
        .ptr(ba)
        .ptr(dya)
        .ptr(stats)
        .ptr(sums)
        .int("channels", channels)
        .long("hw", hw)
        .int("groups", groups)
        .int("chunks", k)
        .float(eps)
        .flag(silu)
        .build()?;
    Ok([stats_launch, sums_launch, apply])
}

/// Layer norm's input gradient over the last dim of x [rows, dim] (the forward's input), from
/// dy; dx may not overlap x or dy.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<T: DeviceElem>(
    dev: &CudaDevice,
    dx: &CudaSlice<T>,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let op = "layer_norm_backward";
    if rows * dim == 0 {
        return Ok(());
    }
    need(x, 0, rows * dim, op, "x")?;
    need(dy, 0, rows * dim, op, "dy")?;
    need(dx, 0, rows * dim, op, "dx")?;
    need(gamma, 0, dim, op, "gamma")?;
    let addrs = [dev.ptr(dx), dev.ptr(x), dev.ptr(gamma), dev.ptr(dy)];
    layer_norm_backward_launch::<T>(addrs, rows, dim, eps)?.run(dev)
}

/// [`layer_norm_backward`]'s launch with dx, x, gamma and dy at device addresses
/// `[dx, x, gamma, dy]` (pure; see [`KernelLaunch`]): 8 rows (warps) a block.
pub fn layer_norm_backward_launch<T: DeviceElem>(
    [dxa, xa, ga, dya]: [u64; 4],
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<KernelLaunch> {
    Launch::of::<T>("norm.cu", "layer_norm_backward")
        .grid((rows.div_ceil(8), 1, 1))
        .block(256)
        .ptr(dxa)
        .ptr(xa)
        .ptr(ga)
        .ptr(dya)
        .long("rows", rows)
        .int("dim", dim)
        .float(eps)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_splits_only_where_the_gpu_would_idle() {
        // An H100's 132 SMs. SD 1.5's UNet at batch 2 and 64x64: 64 runs of 10 x 4096.
        assert_eq!(group_norm_chunks(64, 40960, 132), 5);
        // The VAE decoder at 512x512, batch 1: 32 runs of 4 x 262144.
        assert_eq!(group_norm_chunks(32, 1 << 20, 132), 17);
        // Enough runs already, runs too short to split, no runs, more runs than a grid's y.
        assert_eq!(group_norm_chunks(256, 1 << 20, 132), 1);
        assert_eq!(group_norm_chunks(32, 8191, 132), 1);
        assert_eq!(group_norm_chunks(0, 1 << 20, 132), 1);
        assert_eq!(group_norm_chunks(70000, 1 << 20, 1 << 20), 1);
        // At most 64 chunks.
        assert_eq!(group_norm_chunks(1, 1 << 30, 132), 64);
    }
}
