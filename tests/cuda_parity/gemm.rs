//! GEMMs and convolutions

use super::*;

/// cuBLAS may run f32 GEMMs in TF32 on some setups; 1e-5 would catch that.
fn gemm_tol<T: DeviceElem>() -> f64 {
    match T::SUFFIX {
        "f32" => 1e-5,
        "f16" => 1e-3,
        _ => 8e-3,
    }
}

fn gemm_case<T: BlasElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let sfx = T::SUFFIX;
    for &(m, k, n, with_bias) in &[
        (8192usize, 320usize, 320usize, false),
        (154, 768, 640, true),
        (7, 13, 5, true),
    ] {
        let x = rounded::<T>(&randn(rng, m * k, 1.0));
        let w = rounded::<T>(&randn(rng, n * k, 0.05));
        let bias = rounded::<T>(&randn(rng, n, 1.0));
        let mut want = vec![0.0; m * n];
        cpu::linear(&mut want, &x, &w, with_bias.then_some(&bias[..]), m, k, n);
        let (xd, wd, bd) = (
            dev.upload_f32::<T>(&x).unwrap(),
            dev.upload_f32::<T>(&w).unwrap(),
            dev.upload_f32::<T>(&bias).unwrap(),
        );
        let y = poisoned::<T>(dev, m * n);
        ops::linear(
            dev,
            At::from(&y),
            n,
            At::from(&xd),
            &wd,
            with_bias.then_some(&bd),
            (m, k, n),
        )
        .unwrap();
        check(
            &format!(
                "linear_{sfx} {m}x{k}x{n}{}",
                if with_bias { " +bias" } else { "" }
            ),
            &dev.download_f32(&y, m * n).unwrap(),
            &want,
            gemm_tol::<T>(),
        );
    }
    for &(c_in, c_out, hw, kernel, stride, padding) in &[
        (320usize, 320usize, 32usize, 3usize, 1usize, 1usize),
        (64, 128, 16, 3, 2, 1),
        (640, 320, 16, 1, 1, 0),
        (4, 32, 9, 3, 1, 1),
    ] {
        let p = Conv2d {
            batch: 2,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kernel,
            stride,
            padding,
        };
        let (oh, ow) = p.out_hw();
        let x = rounded::<T>(&randn(rng, 2 * c_in * hw * hw, 1.0));
        let w = rounded::<T>(&randn(rng, c_out * c_in * kernel * kernel, 0.05));
        let bias = rounded::<T>(&randn(rng, c_out, 1.0));
        let mut want = vec![0.0; 2 * c_out * oh * ow];
        cpu::conv2d(&mut want, &x, &w, Some(&bias), &p);
        let (xd, wd, bd) = (
            dev.upload_f32::<T>(&x).unwrap(),
            dev.upload_f32::<T>(&w).unwrap(),
            dev.upload_f32::<T>(&bias).unwrap(),
        );
        let mut y = poisoned::<T>(dev, want.len());
        let mut scratch = dev.zeros::<T>(ops::conv2d_scratch(&p).max(1)).unwrap();
        ops::conv2d(dev, &mut y, &xd, &wd, Some(&bd), &p, &mut scratch).unwrap();
        check(
            &format!("conv2d_{sfx} {c_in}->{c_out} {hw}x{hw} k{kernel} s{stride}"),
            &dev.download_f32(&y, want.len()).unwrap(),
            &want,
            gemm_tol::<T>(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn gemm_and_conv_match_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("gemm_conv");
    gemm_case::<f32>(&dev, &mut rng);
    gemm_case::<f16>(&dev, &mut rng);
    gemm_case::<bf16>(&dev, &mut rng);
}

/// `ops::conv2d_implicit` (kernels/conv_igemm.cu) against the CPU backend: the conv2d test's
/// shapes, then the edges: conv_in / conv_out channel counts (c_in 4, c_out 4), c_in 3 (rows
/// of 27, not a multiple of 8: the 2-byte weight path), odd spatial sizes, batch 3, 1x1 and
/// stride 2 with c_out past one 128-row tile, k = 7 (the range-compare gather), no bias, and a
/// small grid that the heuristic splits along K. Each shape runs with the heuristic's split
/// count; the first and the last also with no split and with 3 slices.
fn conv_implicit_case<T: BlasElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let sfx = T::SUFFIX;
    #[allow(clippy::too_many_arguments)]
    fn conv(
        batch: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Conv2d {
        Conv2d {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel,
            stride,
            padding,
        }
    }
    // (shape: batch, c_in, c_out, h, w, kernel, stride, padding; with bias)
    let shapes = [
        (conv(2, 320, 320, 32, 32, 3, 1, 1), true),
        (conv(2, 64, 128, 16, 16, 3, 2, 1), true),
        (conv(2, 640, 320, 16, 16, 1, 1, 0), true),
        (conv(2, 4, 32, 9, 9, 3, 1, 1), true),
        (conv(2, 4, 320, 16, 16, 3, 1, 1), true),
        (conv(2, 320, 4, 16, 16, 3, 1, 1), true),
        (conv(3, 3, 8, 11, 9, 3, 1, 1), true),
        (conv(3, 24, 20, 7, 5, 3, 1, 1), true),
        (conv(2, 48, 33, 7, 5, 1, 1, 0), false),
        (conv(3, 40, 136, 9, 7, 3, 2, 1), true),
        (conv(1, 16, 8, 9, 9, 7, 1, 3), true),
        (conv(2, 640, 256, 8, 8, 3, 1, 1), true),
    ];
    for (i, &(p, with_bias)) in shapes.iter().enumerate() {
        let Conv2d {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel,
            stride,
            ..
        } = p;
        let (oh, ow) = p.out_hw();
        let work = (batch * c_out * oh * ow * c_in * kernel * kernel) as f64;
        let case = format!(
            "conv2d_implicit_{} b{batch} {c_in}->{c_out} {h}x{w}",
            T::SUFFIX
        );
        if too_big_for_the_emulated_gpu(&case, work) {
            continue;
        }
        let x = rounded::<T>(&randn(rng, batch * c_in * h * w, 1.0));
        let wt = rounded::<T>(&randn(rng, c_out * c_in * kernel * kernel, 0.05));
        let bias = rounded::<T>(&randn(rng, c_out, 1.0));
        let bias_cpu = with_bias.then_some(&bias[..]);
        let mut want = vec![0.0; batch * c_out * oh * ow];
        cpu::conv2d(&mut want, &x, &wt, bias_cpu, &p);
        let (xd, wd, bd) = (
            dev.upload_f32::<T>(&x).unwrap(),
            dev.upload_f32::<T>(&wt).unwrap(),
            dev.upload_f32::<T>(&bias).unwrap(),
        );
        let forced: &[Option<usize>] = if i == 0 || i == shapes.len() - 1 {
            &[None, Some(1), Some(3)]
        } else {
            &[None]
        };
        for &splits in forced {
            let mut y = poisoned::<T>(dev, want.len());
            let used = ops::conv2d_implicit_with(
                dev,
                &mut y,
                &xd,
                &wd,
                with_bias.then_some(&bd),
                &p,
                splits,
            )
            .unwrap();
            check(
                &format!(
                    "conv2d_implicit_{sfx} b{batch} {c_in}->{c_out} {h}x{w} k{kernel} s{stride}{} \
                     split{used}",
                    if with_bias { "" } else { " nobias" }
                ),
                &dev.download_f32(&y, want.len()).unwrap(),
                &want,
                gemm_tol::<T>(),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn conv2d_implicit_matches_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("conv_implicit");
    conv_implicit_case::<f16>(&dev, &mut rng);
    conv_implicit_case::<bf16>(&dev, &mut rng);
    // f32 has no tensor-core path: Unsupported, for the caller to fall back to conv2d.
    let p = Conv2d {
        batch: 1,
        c_in: 4,
        h: 4,
        w: 4,
        c_out: 4,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let x = dev.zeros::<f32>(64).unwrap();
    let wt = dev.zeros::<f32>(144).unwrap();
    let mut y = dev.zeros::<f32>(64).unwrap();
    let e = ops::conv2d_implicit(&dev, &mut y, &x, &wt, None, &p).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    println!("cuda-parity conv2d_implicit_f32 -> Unsupported: {e}");
}
