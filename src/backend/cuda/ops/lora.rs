//! Multi-identity LoRA, one adapter per sample of a batch: `kernels/lora.cu`.

use super::*;

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
    // 16 rows a block.
    Launch::of::<T>("lora.cu", "lora_bgmv")
        .grid((s.rows.div_ceil(16), 1, 1))
        .block(256)
        .ptr(ya)
        .ptr(xa)
        .long("rows", s.rows)
        .long("rows_per_sample", s.rows_per_sample)
        .ptr(sa)
        .ptr(fa)
        .int("n_adapters", n_adapters)
        .int("din", s.din)
        .int("dout", s.dout)
        .long("ld_x", s.ld_x)
        .long("ld_y", s.ld_y)
        .build()
}
