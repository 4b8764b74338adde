//! LiDB compose and merge: `kernels/lidb.cu`.

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
    (r, a, b): (usize, usize, usize),
    alpha: f32,
) -> Result<KernelLaunch> {
    Launch::new("lidb.cu", "lidb_compose_f32")
        .grid((max_out.div_ceil(256).clamp(1, 4096), n_layers, 1))
        .block(256)
        .ptr(layers)
        .int("n_layers", n_layers)
        .int("r", r)
        .int("a", a)
        .int("b", b)
        .float(alpha)
        .build()
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
    // One block per MERGE_ROWS (32, kernels/lidb.cu) output rows of the tallest layer.
    const MERGE_ROWS: usize = 32;
    Launch::of::<T>("lidb.cu", "lidb_merge")
        .grid((max_dout.div_ceil(MERGE_ROWS), n_layers, 1))
        .block(256)
        .ptr(layers)
        .int("n_layers", n_layers)
        .ptr(factors)
        .build()
}
