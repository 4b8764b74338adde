//! Attention's backward pass, flash style: `flash_attn_bwd_*` of
//! `kernels/attention_backward.cu` (launch contract and napkin math there). The scores stay on
//! chip: a query-parallel kernel recomputes S and dP to get each row's log-sum-exp L and
//! D = rowsum(P dP), then dQ; a key-parallel kernel recomputes P from L and gives dK and dV.
//! f16 and bf16 at head dims 40, 64, 80 and 160 ([`FLASH_HEAD_DIMS`]), dense rows; every other
//! call takes the materialised path ([`attention_backward_with`]).

use super::*;

/// Query rows a block of `flash_attn_bwd_dq_*` takes (4 warps x 16).
const DQ_ROWS: usize = 64;
/// Keys a block of `flash_attn_bwd_dkv_*` takes (4 warps x 16).
const DKV_KEYS: usize = 64;

/// The instantiations' other tile: the dq kernel's key tile and the dkv kernel's query tile,
/// 64 (32 at d = 160, for registers and shared memory).
fn inner_tile(d: usize) -> usize {
    if d > 80 {
        32
    } else {
        64
    }
}

/// Shared-memory row stride in elements: d rounded up to 16 (the k-steps), plus 8.
fn row_stride(d: usize) -> usize {
    d.div_ceil(16) * 16 + 8
}

/// Which path [`attention_backward`] takes where both apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttnBackwardKernel {
    /// The flash kernels where they apply ([`flash_backward_applies`]), else materialised.
    #[default]
    Auto,
    /// Always the materialised path (cuBLAS scores in chunks): for comparisons and benches.
    Materialized,
}

/// Whether the flash kernels take shape `s` in storage type `T`: f16 or bf16, a head dim of
/// [`FLASH_HEAD_DIMS`], dense rows.
pub fn flash_backward_applies<T: DeviceElem>(s: &AttnShape) -> bool {
    let hd = s.heads * s.head_dim;
    T::SUFFIX != "f32"
        && FLASH_HEAD_DIMS.contains(&s.head_dim)
        && [s.ld_q, s.ld_k, s.ld_v, s.ld_o].iter().all(|&ld| ld == hd)
}

/// How many splits of the query tiles the dkv kernel takes for shape `s` on `sms`
/// multiprocessors: 1 where its grid (key tiles x heads x batch) already gives two blocks an
/// SM; else enough to, at most one a query tile. SD 1.5's cross-attention (77 keys: two key
/// tiles) at 64 x 64 latents, batch 2, 8 heads has 32 blocks, so 8 splits of 8 query tiles each
/// (on 132 SMs) where one block would otherwise sweep all 64.
pub fn flash_backward_splits(s: &AttnShape, sms: usize) -> usize {
    let bm = inner_tile(s.head_dim);
    let qtiles = s.lq.div_ceil(bm).max(1);
    let base = (s.lk.div_ceil(DKV_KEYS) * s.heads * s.batch).max(1);
    let want = (2 * sms.max(1)).div_ceil(base).clamp(1, qtiles);
    // As few splits as give each the same count of tiles (none empty unless causal).
    qtiles.div_ceil(qtiles.div_ceil(want))
}

/// Elements of the flash path's f32 scratch for shape `s` and `splits`: the row statistics
/// (L and D, `2 * batch * heads * lq`) and the dkv kernel's partial sums (`splits * 2 *
/// batch * lk * heads * d` when `splits > 1`, else 0).
pub fn flash_backward_scratch(s: &AttnShape, splits: usize) -> (usize, usize) {
    let stats = 2 * s.batch * s.heads * s.lq;
    let part = if splits > 1 {
        splits * 2 * s.batch * s.lk * s.heads * s.head_dim
    } else {
        0
    };
    (stats, part)
}

/// Device addresses of [`attention_backward_flash_launches`]'s buffers: q, k, v, dout and the
/// gradients dense `[batch, len, heads * d]` in T; `stats` and `part` f32 of
/// [`flash_backward_scratch`]'s sizes (`part` unused, may be 0, with one split).
#[derive(Clone, Copy, Debug)]
pub struct FlashBackwardAddrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub dout: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub stats: u64,
    pub part: u64,
}

/// The launches of the flash backward for the dense shape `s` (pure; see [`KernelLaunch`]):
/// `flash_attn_bwd_dq_*` (L, D and dq), `flash_attn_bwd_dkv_*` over `splits` splits of the
/// query tiles (dk and dv, or their partial sums), and with more than one split
/// `flash_attn_bwd_reduce_*`.
pub fn attention_backward_flash_launches<T: DeviceElem>(
    at: FlashBackwardAddrs,
    s: &AttnShape,
    causal: bool,
    splits: usize,
) -> Result<Vec<KernelLaunch>> {
    let op = "attention_backward_flash";
    if !flash_backward_applies::<T>(s) {
        return Err(Error::Internal(format!(
            "{op}: takes f16/bf16, head dims {FLASH_HEAD_DIMS:?} and dense rows, got {} {s:?}",
            T::SUFFIX
        )));
    }
    if causal && s.lq != s.lk {
        return Err(Error::Internal(format!(
            "{op}: causal attention needs lq == lk, got {} and {}",
            s.lq, s.lk
        )));
    }
    let d = s.head_dim;
    let (tile, sk) = (inner_tile(d), row_stride(d));
    let qtiles = s.lq.div_ceil(tile);
    if splits == 0 || splits > qtiles.max(1) {
        return Err(Error::Internal(format!(
            "{op}: {splits} splits of {qtiles} query tiles"
        )));
    }
    let per_split = qtiles.div_ceil(splits);
    let ld = s.heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let sfx = T::SUFFIX;
    let dq = Launch::new(
        "attention_backward.cu",
        format!("flash_attn_bwd_dq_d{d}_{sfx}"),
    )
    .grid((s.lq.div_ceil(DQ_ROWS), s.heads, s.batch))
    .block(128)
    .smem((2 * DQ_ROWS + 4 * tile) * sk * 2)
    .ptr(at.dq)
    .ptr(at.stats)
    .ptr(at.q)
    .ptr(at.k)
    .ptr(at.v)
    .ptr(at.dout)
    .int("lq", s.lq)
    .int("lk", s.lk)
    .long("ld", ld)
    .float(scale)
    .flag(causal)
    .build()?;
    let dkv = Launch::new(
        "attention_backward.cu",
        format!("flash_attn_bwd_dkv_d{d}_{sfx}"),
    )
    .grid((s.lk.div_ceil(DKV_KEYS) * splits, s.heads, s.batch))
    .block(128)
    .smem((2 * DKV_KEYS + 4 * tile) * sk * 2 + 2 * 2 * tile * 4)
    .ptr(at.dk)
    .ptr(at.dv)
    .ptr(at.part)
    .ptr(at.q)
    .ptr(at.k)
    .ptr(at.v)
    .ptr(at.dout)
    .ptr(at.stats)
    .int("lq", s.lq)
    .int("lk", s.lk)
    .long("ld", ld)
    .float(scale)
    .flag(causal)
    .int("splits", splits)
    .int("tiles_per_split", per_split)
    .build()?;
    let mut launches = vec![dq, dkv];
    if splits > 1 {
        let n = s.batch * s.lk * ld;
        launches.push(
            Launch::of::<T>("attention_backward.cu", "flash_attn_bwd_reduce")
                .elementwise(n)
                .ptr(at.dk)
                .ptr(at.dv)
                .ptr(at.part)
                .long("n", n)
                .int("splits", splits)
                .build()?,
        );
    }
    Ok(launches)
}

/// Attention's input gradients by the flash kernels ([`flash_backward_applies`] must hold),
/// for the dense shape `s` and mask, with `splits` splits of the dkv kernel's query tiles
/// (None: [`flash_backward_splits`] for this device). Returns the splits it ran. The scratch
/// (row statistics, partial sums) is allocated per call, stream-ordered.
pub fn attention_backward_flash<T: DeviceElem>(
    dev: &CudaDevice,
    [dq, dk, dv]: [&CudaSlice<T>; 3],
    [q, k, v, dout]: [&CudaSlice<T>; 4],
    s: AttnShape,
    causal: bool,
    splits: Option<usize>,
) -> Result<usize> {
    let op = "attention_backward_flash";
    let hd = s.heads * s.head_dim;
    if s.batch * s.lq == 0 {
        return Ok(0);
    }
    if hd == 0 || s.lk == 0 {
        return Err(Error::Internal(format!("{op}: empty shape {s:?}")));
    }
    let (nq, nk) = (s.batch * s.lq * hd, s.batch * s.lk * hd);
    need(q, 0, nq, op, "q")?;
    need(dout, 0, nq, op, "dout")?;
    need(dq, 0, nq, op, "dq")?;
    need(k, 0, nk, op, "k")?;
    need(v, 0, nk, op, "v")?;
    need(dk, 0, nk, op, "dk")?;
    need(dv, 0, nk, op, "dv")?;
    let splits = splits.unwrap_or_else(|| flash_backward_splits(&s, dev.sm_count()));
    let (n_stats, n_part) = flash_backward_scratch(&s, splits);
    let stats = dev.alloc::<f32>(n_stats)?;
    let part = if n_part > 0 {
        Some(dev.alloc::<f32>(n_part)?)
    } else {
        None
    };
    let at = FlashBackwardAddrs {
        q: dev.ptr(q),
        k: dev.ptr(k),
        v: dev.ptr(v),
        dout: dev.ptr(dout),
        dq: dev.ptr(dq),
        dk: dev.ptr(dk),
        dv: dev.ptr(dv),
        stats: dev.ptr(&stats),
        part: part.as_ref().map_or(0, |p| dev.ptr(p)),
    };
    // cp.async copies 16 bytes: rows of heads * d (d % 8 == 0) halves keep that alignment
    // from 16-byte-aligned bases (the allocator's are 256-byte aligned).
    if [at.q, at.k, at.v, at.dout].iter().any(|a| a % 16 != 0) {
        return Err(Error::Internal(format!(
            "{op}: q, k, v and dout must be 16-byte aligned"
        )));
    }
    for l in attention_backward_flash_launches::<T>(at, &s, causal, splits)? {
        l.run(dev)?;
    }
    // The scratch is freed stream-ordered, after the launches that read it.
    drop((stats, part));
    Ok(splits)
}

/// Attention's input gradients (dq, dk, dv), dense `[batch, len, heads * d]` like q, k, v and
/// dout, for the shape `s` (dense) and mask: the flash kernels where they apply and `kernel`
/// allows ([`attention_backward_flash`]), else the materialised path in chunks of at most
/// [`BACKWARD_SCORES_BYTES`] of f32 scores ([`attention_backward_with`]). The probabilities
/// are recomputed from q and k (the forward saves nothing). Returns the path it took,
/// `"flash"` or `"materialized"`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: BlasElem>(
    dev: &CudaDevice,
    grads: [&CudaSlice<T>; 3],
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    dout: &CudaSlice<T>,
    s: AttnShape,
    causal: bool,
    kernel: AttnBackwardKernel,
) -> Result<&'static str> {
    if kernel == AttnBackwardKernel::Auto && flash_backward_applies::<T>(&s) {
        if causal && s.lq != s.lk {
            return Err(Error::Internal(format!(
                "attention_backward: causal attention needs lq == lk, got {} and {}",
                s.lq, s.lk
            )));
        }
        attention_backward_flash(dev, grads, [q, k, v, dout], s, causal, None)?;
        return Ok("flash");
    }
    attention_backward_with(
        dev,
        grads,
        [q, k, v, dout],
        s,
        causal,
        BACKWARD_SCORES_BYTES,
    )?;
    Ok("materialized")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_without_empty_splits() {
        // SD 1.5 self-attention at 64 x 64: 64 key tiles x 8 heads x 2 = 1024 blocks.
        assert_eq!(
            flash_backward_splits(&AttnShape::dense(2, 8, 4096, 4096, 40), 132),
            1
        );
        // Cross-attention over 77 tokens: 2 key tiles x 8 x 2 = 32 blocks -> 8 splits of 8.
        let cross = AttnShape::dense(2, 8, 4096, 77, 40);
        assert_eq!(flash_backward_splits(&cross, 132), 8);
        for (s, sms) in [
            (cross, 132),
            (AttnShape::dense(1, 1, 70, 77, 40), 132),
            (AttnShape::dense(1, 12, 77, 77, 64), 132),
            (AttnShape::dense(1, 1, 1, 5, 160), 132),
        ] {
            let n = flash_backward_splits(&s, sms);
            let qtiles = s.lq.div_ceil(inner_tile(s.head_dim));
            let per = qtiles.div_ceil(n);
            assert!(n >= 1 && n <= qtiles, "{s:?}: {n} splits of {qtiles}");
            assert!((n - 1) * per < qtiles, "{s:?}: an empty split");
        }
    }

    #[test]
    fn launches_check_their_shape() {
        let at = FlashBackwardAddrs {
            q: 0,
            k: 0,
            v: 0,
            dout: 0,
            dq: 0,
            dk: 0,
            dv: 0,
            stats: 0,
            part: 0,
        };
        let s = AttnShape::dense(1, 2, 70, 77, 40);
        let l = attention_backward_flash_launches::<half::f16>(at, &s, false, 2).expect("plan");
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].kernel, "flash_attn_bwd_dq_d40_f16");
        assert_eq!(l[1].cfg.grid_dim, (4, 2, 1));
        for (bad, causal, splits) in [
            (AttnShape::dense(1, 2, 70, 77, 48), false, 1),
            (s, true, 1),
            (s, false, 0),
            (s, false, 3),
        ] {
            assert!(
                attention_backward_flash_launches::<half::f16>(at, &bad, causal, splits).is_err(),
                "{bad:?} causal {causal} splits {splits}"
            );
        }
        assert!(attention_backward_flash_launches::<f32>(at, &s, false, 1).is_err());
    }
}
