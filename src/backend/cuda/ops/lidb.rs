//! LiDB compose and merge, and multi-identity LoRA (`kernels/lidb.cu`, `kernels/lora.cu`).

use super::*;

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
    lidb_compose_launch(dev.ptr(layers), n_layers, max_out, rab, alpha)?.run(dev)
}

/// [`lidb_compose`]'s launch with the layer table at device address `layers` (pure; see
/// [`KernelLaunch`]).
pub fn lidb_compose_launch(
    layers: u64,
    n_layers: usize,
    max_out: usize,
    rab: (usize, usize, usize),
    alpha: f32,
) -> Result<KernelLaunch> {
    let op = "lidb_compose";
    let cfg = LaunchConfig {
        grid_dim: (
            max_out.div_ceil(256).clamp(1, 4096) as u32,
            n_layers as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = to_i32(n_layers, op, "n_layers")?;
    let (r, a, b) = (
        to_i32(rab.0, op, "r")?,
        to_i32(rab.1, op, "a")?,
        to_i32(rab.2, op, "b")?,
    );
    Ok(KernelLaunch {
        file: "lidb.cu",
        kernel: "lidb_compose_f32".into(),
        cfg,
        params: vec![
            layers.into(),
            n.into(),
            r.into(),
            a.into(),
            b.into(),
            alpha.into(),
        ],
    })
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
    lidb_merge_launch::<T>(dev.ptr(layers), n_layers, max_dout, dev.ptr(factors))?.run(dev)
}

/// [`lidb_merge`]'s launch with the layer table and the factor table at device addresses
/// `layers` and `factors` (pure; see [`KernelLaunch`]).
pub fn lidb_merge_launch<T: DeviceElem>(
    layers: u64,
    n_layers: usize,
    max_dout: usize,
    factors: u64,
) -> Result<KernelLaunch> {
    let op = "lidb_merge";
    // One block per MERGE_ROWS (32, kernels/lidb.cu) output rows of the tallest layer.
    const MERGE_ROWS: usize = 32;
    let cfg = LaunchConfig {
        grid_dim: (
            to_i32(max_dout.div_ceil(MERGE_ROWS).max(1), op, "max_dout")? as u32,
            to_i32(n_layers, op, "n_layers")? as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = to_i32(n_layers, op, "n_layers")?;
    Ok(KernelLaunch {
        file: "lidb.cu",
        kernel: name::<T>("lidb_merge"),
        cfg,
        params: vec![layers.into(), n.into(), factors.into()],
    })
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
    lora_bgmv_launch::<T>(
        &s,
        n_adapters,
        [
            addr(dev, y.buf, y.off),
            addr(dev, x.buf, x.off),
            dev.ptr(sample_adapter),
            dev.ptr(adapters),
        ],
    )?
    .run(dev)
}

/// [`lora_bgmv`]'s launch for shape `s` (rows > 0) and `n_adapters` factors, with y, x, the
/// per-sample adapter indices and the factor table at device addresses
/// `[y, x, sample_adapter, adapters]` (pure: no device, see [`KernelLaunch`]).
pub fn lora_bgmv_launch<T: DeviceElem>(
    s: &BgmvShape,
    n_adapters: usize,
    [ya, xa, sa, fa]: [u64; 4],
) -> Result<KernelLaunch> {
    let op = "lora_bgmv";
    let cfg = LaunchConfig {
        grid_dim: (s.rows.div_ceil(16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows, rps) = (s.rows as i64, s.rows_per_sample as i64);
    let na = to_i32(n_adapters, op, "n_adapters")?;
    let din = to_i32(s.din, op, "din")?;
    let dout = to_i32(s.dout, op, "dout")?;
    let (ldx, ldy) = (s.ld_x as i64, s.ld_y as i64);
    Ok(KernelLaunch {
        file: "lora.cu",
        kernel: name::<T>("lora_bgmv"),
        cfg,
        params: vec![
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
    })
}
