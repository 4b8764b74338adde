//! conv2d as one implicit GEMM on the tensor cores (f16/bf16): `kernels/conv_igemm.cu`, with
//! its split-K heuristic and plan.

use super::*;

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
    let (oh, ow) = p.out_hw();
    let hw_out = oh * ow;
    let (bm, bn, _) = IGEMM_TILE;
    let (splits, per_split) = (plan.splits, plan.tiles_per_split);
    let n = p.batch * p.c_out * hw_out;
    let mut launches = vec![Launch::of::<T>("conv_igemm.cu", "conv2d_igemm")
        .grid((hw_out.div_ceil(bn), p.c_out.div_ceil(bm), p.batch * splits))
        .block(128)
        .ptr(y_a)
        .ptr(part_a)
        .ptr(x_a)
        .ptr(w_a)
        .ptr(b_a)
        .int("batch", p.batch)
        .int("c_in", p.c_in)
        .int("h", p.h)
        .int("w", p.w)
        .int("c_out", p.c_out)
        .int("kernel", p.kernel)
        .int("stride", p.stride)
        .int("padding", p.padding)
        .int("oh", oh)
        .int("ow", ow)
        .int("tiles per split", per_split)
        .build()?];
    if splits > 1 {
        launches.push(
            Launch::of::<T>("conv_igemm.cu", "conv2d_igemm_reduce")
                .elementwise(n)
                .ptr(y_a)
                .ptr(part_a)
                .ptr(b_a)
                .int("splits", splits)
                .long("n", n)
                .int("c_out", p.c_out)
                .long("oh*ow", hw_out)
                .build()?,
        );
    }
    Ok(launches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(c_in: usize, c_out: usize, hw: usize, kernel: usize, stride: usize) -> Conv2d {
        Conv2d {
            batch: 2,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kernel,
            stride,
            padding: kernel / 2,
        }
    }

    /// The generic backend's conv path at the shapes `hdb bench cuda` measured: the implicit
    /// GEMM up to 512 output channels (3x3), im2col + cuBLAS at 640 and 1280 and for 1x1.
    #[test]
    fn implicit_conv_where_it_measured_faster() {
        for (c_in, c_out, hw, k, s) in [
            (4, 320, 64, 3, 1),
            (320, 320, 64, 3, 1),
            (320, 320, 64, 3, 2),
            (320, 4, 64, 3, 1),
            (512, 512, 128, 3, 1),
            (256, 256, 512, 3, 1),
            (128, 3, 512, 3, 1),
        ] {
            assert!(
                conv2d_prefers_implicit(&conv(c_in, c_out, hw, k, s)),
                "{c_in}->{c_out} {hw}"
            );
        }
        for (c_in, c_out, hw, k, s) in [
            (640, 640, 32, 3, 1),
            (1280, 1280, 16, 3, 1),
            (1280, 1280, 8, 3, 1),
            (640, 1280, 16, 1, 1),
            (320, 320, 64, 1, 1),
        ] {
            assert!(
                !conv2d_prefers_implicit(&conv(c_in, c_out, hw, k, s)),
                "{c_in}->{c_out} {hw}"
            );
        }
    }

    /// The split-K heuristic at SD 1.5's UNet shapes (64x64 latents, batch 2) on an H100's
    /// 132 SMs: no split where the grid fills the GPU, a few slices at 16x16 and 8x8.
    #[test]
    fn implicit_conv_splits_only_small_grids() {
        let sms = 132;
        assert_eq!(conv2d_implicit_splits(&conv(4, 320, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(320, 320, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(640, 640, 32, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(320, 4, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(640, 1280, 16, 1, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(1280, 1280, 16, 3, 1), sms), 3);
        assert_eq!(conv2d_implicit_splits(&conv(320, 320, 64, 3, 2), sms), 4);
        let s = conv2d_implicit_splits(&conv(1280, 1280, 8, 3, 1), sms);
        assert!((4..=5).contains(&s), "{s}");
        // Never more than 16 slices, each of at least 8 k-tiles; nothing to split is 1.
        for (c_in, hw) in [(64, 4), (2048, 4), (9, 2)] {
            let p = conv(c_in, 8, hw, 3, 1);
            let s = conv2d_implicit_splits(&p, sms);
            let tiles = (c_in * 9).div_ceil(32);
            assert!(s == 1 || (s <= 16 && tiles / s >= 8), "{c_in} {hw}: {s}");
        }
        assert_eq!(conv2d_implicit_splits(&conv(0, 8, 4, 3, 1), sms), 1);
    }
}
