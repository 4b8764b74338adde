//! Attention

use super::*;

/// Random q, k, v (dense rows, rounded to T) and the CPU's attention of them.
fn inputs<T: DeviceElem>(
    rng: &mut SplitMix64,
    s: &AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = s.heads * s.head_dim;
    let q = rounded::<T>(&randn(rng, s.batch * s.lq * hd, 1.0));
    let k = rounded::<T>(&randn(rng, s.batch * s.lk * hd, 1.0));
    let v = rounded::<T>(&randn(rng, s.batch * s.lk * hd, 1.0));
    let mut want = vec![0.0; s.batch * s.lq * hd];
    cpu::attention(
        &mut want, &q, &k, &v, s.batch, s.lq, s.lk, s.heads, s.head_dim,
    );
    (q, k, v, want)
}

#[allow(clippy::too_many_arguments)]
fn attention_case<T: DeviceElem>(
    dev: &CudaDevice,
    rng: &mut SplitMix64,
    s: AttnShape,
    fused_qkv: bool,
    kernel: AttnKernel,
    tol: f64,
) {
    let hd = s.heads * s.head_dim;
    let (q, k, v, want) = inputs::<T>(rng, &s);
    let out = poisoned::<T>(dev, want.len());
    let name = if fused_qkv {
        // One [rows, 3 * hd] buffer holding q | k | v per row (self-attention only).
        assert_eq!(s.lq, s.lk);
        let rows = s.batch * s.lq;
        let mut qkv = vec![0.0; rows * 3 * hd];
        for r in 0..rows {
            qkv[r * 3 * hd..r * 3 * hd + hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
            qkv[r * 3 * hd + hd..r * 3 * hd + 2 * hd].copy_from_slice(&k[r * hd..(r + 1) * hd]);
            qkv[r * 3 * hd + 2 * hd..(r + 1) * 3 * hd].copy_from_slice(&v[r * hd..(r + 1) * hd]);
        }
        let b = dev.upload_f32::<T>(&qkv).unwrap();
        let st = AttnShape {
            ld_q: 3 * hd,
            ld_k: 3 * hd,
            ld_v: 3 * hd,
            ..s
        };
        ops::attention(
            dev,
            At::from(&out),
            At::new(&b, 0),
            At::new(&b, hd),
            At::new(&b, 2 * hd),
            st,
            kernel,
        )
        .unwrap()
    } else {
        // q rows at stride ld_q; the padding is NaN, so reading it would show.
        let rows = s.batch * s.lq;
        let mut qp = vec![f32::NAN; (rows - 1) * s.ld_q + hd];
        for r in 0..rows {
            qp[r * s.ld_q..r * s.ld_q + hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
        }
        assert_eq!(
            (s.ld_k, s.ld_v, s.ld_o),
            (hd, hd, hd),
            "only q may be strided here"
        );
        let (qd, kd, vd) = (
            dev.upload_f32::<T>(&qp).unwrap(),
            dev.upload_f32::<T>(&k).unwrap(),
            dev.upload_f32::<T>(&v).unwrap(),
        );
        ops::attention(
            dev,
            At::from(&out),
            At::from(&qd),
            At::from(&kd),
            At::from(&vd),
            s,
            kernel,
        )
        .unwrap()
    };
    let got = dev.download_f32(&out, want.len()).unwrap();
    let case = format!(
        "{name} b{} h{} lq{} lk{}{}",
        s.batch,
        s.heads,
        s.lq,
        s.lk,
        if fused_qkv { " qkv" } else { "" }
    );
    check(&case, &got, &want, tol);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn attention_scalar_matches_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("attention_scalar");
    for &(b, h, lq, lk, d) in &[
        (2, 8, 256, 256, 40),
        (2, 8, 250, 77, 40),
        (1, 5, 64, 64, 64),
        (2, 8, 64, 77, 160),
        (1, 3, 33, 17, 24),
    ] {
        let s = AttnShape::dense(b, h, lq, lk, d);
        attention_case::<f32>(&dev, &mut rng, s, false, AttnKernel::Scalar, 1e-5);
        attention_case::<f16>(&dev, &mut rng, s, false, AttnKernel::Scalar, 1e-3);
        attention_case::<bf16>(&dev, &mut rng, s, false, AttnKernel::Scalar, 8e-3);
    }
    attention_case::<f32>(
        &dev,
        &mut rng,
        AttnShape::dense(2, 8, 128, 128, 40),
        true,
        AttnKernel::Scalar,
        1e-5,
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn flash_attention_matches_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("flash_attention");
    // SD 1.5's head dims (40, 80, 160) and 64; self-attention, cross-attention with 77 keys,
    // lengths that are not multiples of the tiles, and a fused qkv buffer.
    for &(b, h, lq, lk, d) in &[
        (2, 8, 1024, 1024, 40),
        (2, 8, 1024, 77, 40),
        (2, 8, 256, 256, 80),
        (2, 8, 256, 77, 80),
        (2, 8, 64, 64, 160),
        (2, 8, 64, 77, 160),
        (1, 4, 200, 130, 64),
        (1, 2, 5, 3, 40),
    ] {
        let s = AttnShape::dense(b, h, lq, lk, d);
        let work = 2.0 * (b * h * lq * lk * d) as f64;
        if too_big_for_the_emulated_gpu(&format!("flash attention {b}x{h} {lq}x{lk} d{d}"), work) {
            continue;
        }
        // P is rounded to the input type before P.V: ~1e-3 (f16) / ~1e-2 (bf16) relative.
        // Auto is flash3_attn_* (d 40) or flash2_attn_* here (dense rows are 16-byte aligned).
        for kernel in [
            AttnKernel::Auto,
            AttnKernel::Flash1,
            AttnKernel::Flash2,
            AttnKernel::Flash3,
        ] {
            attention_case::<f16>(&dev, &mut rng, s, false, kernel, 2e-3);
            attention_case::<bf16>(&dev, &mut rng, s, false, kernel, 1.5e-2);
        }
    }
    for d in [40, 80] {
        for kernel in [AttnKernel::Auto, AttnKernel::Flash3] {
            attention_case::<f16>(
                &dev,
                &mut rng,
                AttnShape::dense(2, 8, 320, 320, d),
                true,
                kernel,
                2e-3,
            );
        }
    }
    // A row stride that is not a multiple of 8 elements: Auto falls back to flash_attn_*.
    attention_case::<bf16>(
        &dev,
        &mut rng,
        AttnShape {
            ld_q: 8 * 40 + 4,
            ..AttnShape::dense(1, 8, 100, 100, 40)
        },
        false,
        AttnKernel::Auto,
        1.5e-2,
    );
}

/// `ops::attention_materialized_with` in chunks of `chunk_rows` query rows against the CPU.
fn materialized_case<T: BlasElem>(
    dev: &CudaDevice,
    rng: &mut SplitMix64,
    s: AttnShape,
    chunk_rows: usize,
    tol: f64,
) {
    let (q, k, v, want) = inputs::<T>(rng, &s);
    let out = poisoned::<T>(dev, want.len());
    let (qd, kd, vd) = (
        dev.upload_f32::<T>(&q).unwrap(),
        dev.upload_f32::<T>(&k).unwrap(),
        dev.upload_f32::<T>(&v).unwrap(),
    );
    let budget = 4 * s.heads * s.lk * chunk_rows;
    let (rows, _) = ops::attention_materialized_chunk(&s, budget).expect("chunk");
    assert_eq!(rows, chunk_rows.min(s.lq));
    ops::attention_materialized_with(
        dev,
        At::from(&out),
        At::from(&qd),
        At::from(&kd),
        At::from(&vd),
        s,
        budget,
    )
    .unwrap();
    let got = dev.download_f32(&out, want.len()).unwrap();
    let case = format!(
        "materialised {} b{} h{} lq{} lk{} d{} chunk{rows}",
        T::SUFFIX,
        s.batch,
        s.heads,
        s.lq,
        s.lk,
        s.head_dim
    );
    check(&case, &got, &want, tol);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn materialized_attention_in_chunks_matches_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("materialized_attention_chunks");
    // Head dims above the fused kernels' 256 (the VAE's 512), several heads, lq != lk, and
    // chunks of one row, of rows that do not divide lq, and one chunk for every row.
    for &(b, h, lq, lk, d) in &[(2, 2, 37, 29, 264), (1, 1, 100, 64, 512)] {
        let s = AttnShape::dense(b, h, lq, lk, d);
        for chunk in [1, 7, lq] {
            materialized_case::<f32>(&dev, &mut rng, s, chunk, 1e-5);
            materialized_case::<f16>(&dev, &mut rng, s, chunk, 2e-3);
            materialized_case::<bf16>(&dev, &mut rng, s, chunk, 1.5e-2);
        }
    }
}
