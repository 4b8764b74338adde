//! Norms, elementwise, layout

use super::*;

fn norms_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    // SD 1.5's UNet at 32x32 (64 runs of 10 x 1024), then the VAE decoder's shape at 128 x 128
    // with batch 1 (32 runs of 4 x 16384: the split pair, ops::group_norm_chunks).
    for (b, c, hw) in [(2usize, 320usize, 1024usize), (1, 128, 16384)] {
        group_norm_shape::<T>(dev, rng, (b, c, hw));
    }
    layer_norm_shape::<T>(dev, rng);
}

fn group_norm_shape<T: DeviceElem>(
    dev: &CudaDevice,
    rng: &mut SplitMix64,
    (b, c, hw): (usize, usize, usize),
) {
    let groups = 32;
    let x = rounded::<T>(
        &randn(rng, b * c * hw, 2.0)
            .iter()
            .map(|v| v + 0.5)
            .collect::<Vec<_>>(),
    );
    let g = rounded::<T>(&randn(rng, c, 1.0));
    let be = rounded::<T>(&randn(rng, c, 1.0));
    let (xd, gd, bd) = (
        dev.upload_f32::<T>(&x).unwrap(),
        dev.upload_f32::<T>(&g).unwrap(),
        dev.upload_f32::<T>(&be).unwrap(),
    );
    for silu in [false, true] {
        let mut want = vec![0.0; x.len()];
        cpu::group_norm(&mut want, &x, &g, &be, b, c, hw, groups, 1e-5, silu);
        let y = poisoned::<T>(dev, x.len());
        ops::group_norm(dev, &y, &xd, &gd, &bd, (b, c, hw), groups, 1e-5, silu).unwrap();
        let got = dev.download_f32(&y, x.len()).unwrap();
        let name = if silu {
            "group_norm_silu"
        } else {
            "group_norm"
        };
        check(
            &format!("{name}_{} {b}x{c}x{hw}", T::SUFFIX),
            &got,
            &want,
            tol::<T>(1e-5),
        );
    }
    // In place (y = x), as the UNet uses it.
    let mut want = vec![0.0; x.len()];
    cpu::group_norm(&mut want, &x, &g, &be, b, c, hw, groups, 1e-5, true);
    ops::group_norm(dev, &xd, &xd, &gd, &bd, (b, c, hw), groups, 1e-5, true).unwrap();
    let got = dev.download_f32(&xd, x.len()).unwrap();
    check(
        &format!("group_norm_silu_{} {b}x{c}x{hw} in place", T::SUFFIX),
        &got,
        &want,
        tol::<T>(1e-5),
    );
}

fn layer_norm_shape<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let (rows, dim) = (777usize, 320usize);
    let x = rounded::<T>(&randn(rng, rows * dim, 3.0));
    let g = rounded::<T>(&randn(rng, dim, 1.0));
    let be = rounded::<T>(&randn(rng, dim, 1.0));
    let mut want = vec![0.0; x.len()];
    cpu::layer_norm(&mut want, &x, &g, &be, rows, dim, 1e-5);
    let (xd, gd, bd) = (
        dev.upload_f32::<T>(&x).unwrap(),
        dev.upload_f32::<T>(&g).unwrap(),
        dev.upload_f32::<T>(&be).unwrap(),
    );
    let y = poisoned::<T>(dev, x.len());
    ops::layer_norm(dev, &y, &xd, &gd, &bd, rows, dim, 1e-5).unwrap();
    let got = dev.download_f32(&y, x.len()).unwrap();
    check(
        &format!("layer_norm_{} 777x320", T::SUFFIX),
        &got,
        &want,
        tol::<T>(1e-5),
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn norms_match_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("norms");
    norms_case::<f32>(&dev, &mut rng);
    norms_case::<f16>(&dev, &mut rng);
    norms_case::<bf16>(&dev, &mut rng);
}

fn elementwise_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64) {
    let sfx = T::SUFFIX;
    // GEGLU
    let (rows, d) = (333usize, 1280usize);
    let x = rounded::<T>(&randn(rng, rows * 2 * d, 2.0));
    let mut want = vec![0.0; rows * d];
    cpu::geglu(&mut want, &x, rows, d);
    let xd = dev.upload_f32::<T>(&x).unwrap();
    let mut y = poisoned::<T>(dev, rows * d);
    ops::geglu(dev, &mut y, &xd, rows, d).unwrap();
    check(
        &format!("geglu_{sfx} 333x1280"),
        &dev.download_f32(&y, want.len()).unwrap(),
        &want,
        tol::<T>(1e-6),
    );
    // SiLU
    let x = rounded::<T>(&randn(rng, 100_003, 4.0));
    let mut want = x.clone();
    cpu::silu_inplace(&mut want);
    let mut xd = dev.upload_f32::<T>(&x).unwrap();
    ops::silu_inplace(dev, &mut xd, x.len()).unwrap();
    check(
        &format!("silu_{sfx} 100003"),
        &dev.download_f32(&xd, x.len()).unwrap(),
        &want,
        tol::<T>(1e-6),
    );
    // Softmax rows
    let (rows, n) = (1000usize, 77usize);
    let x = rounded::<T>(&randn(rng, rows * n, 5.0));
    let mut want = x.clone();
    cpu::softmax_rows(&mut want, rows, n);
    let mut xd = dev.upload_f32::<T>(&x).unwrap();
    ops::softmax_rows(dev, &mut xd, rows, n).unwrap();
    check(
        &format!("softmax_rows_{sfx} 1000x77"),
        &dev.download_f32(&xd, x.len()).unwrap(),
        &want,
        tol::<T>(1e-6),
    );
    // Timestep embedding (SD 1.5: flip, shift 0), timesteps up to 999.
    let t: Vec<f32> = vec![999.0, 0.0, 500.5, 1.0];
    let dim = 320;
    let mut want = vec![0.0; t.len() * dim];
    cpu::timestep_embedding(&mut want, &t, dim, true, 0.0, 10000.0);
    let td = dev.upload(&t).unwrap();
    let mut y = poisoned::<T>(dev, want.len());
    ops::timestep_embedding(dev, &mut y, &td, t.len(), dim, (true, 0.0, 10000.0)).unwrap();
    check(
        &format!("timestep_embedding_{sfx} 4x320"),
        &dev.download_f32(&y, want.len()).unwrap(),
        &rounded::<T>(&want),
        tol::<T>(1e-6),
    );
    // Upsample
    let (planes, h, w) = (2 * 64usize, 16usize, 24usize);
    let x = rounded::<T>(&randn(rng, planes * h * w, 1.0));
    let mut want = vec![0.0; x.len() * 4];
    cpu::upsample_nearest2x(&mut want, &x, planes, h, w);
    let xd = dev.upload_f32::<T>(&x).unwrap();
    let mut y = poisoned::<T>(dev, want.len());
    ops::upsample_nearest2x(dev, &mut y, &xd, planes, h, w).unwrap();
    check(
        &format!("upsample_nearest2x_{sfx}"),
        &dev.download_f32(&y, want.len()).unwrap(),
        &want,
        0.0,
    );
    // Add, channel bias (time embedding), row bias, channel bias (conv)
    let (b, c, hw) = (2usize, 320usize, 333usize);
    let a = rounded::<T>(&randn(rng, b * c * hw, 1.0));
    let x = rounded::<T>(&randn(rng, b * c * hw, 1.0));
    let v = rounded::<T>(&randn(rng, b * c, 1.0));
    let bias = rounded::<T>(&randn(rng, c, 1.0));
    let mut want = a.clone();
    cpu::add_inplace(&mut want, &x);
    let mut ad = dev.upload_f32::<T>(&a).unwrap();
    let xd = dev.upload_f32::<T>(&x).unwrap();
    ops::add_inplace(dev, &mut ad, &xd, a.len()).unwrap();
    check(
        &format!("add_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want,
        tol::<T>(1e-7),
    );
    cpu::add_channel_bias(&mut want, &v, b, c, hw);
    let vd = dev.upload_f32::<T>(&v).unwrap();
    ops::add_channel_bias(dev, &mut ad, &vd, (b, c, hw)).unwrap();
    check(
        &format!("add_channel_bias_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want,
        tol::<T>(1e-7),
    );
    let mut want2 = want.clone();
    for (i, w) in want2.iter_mut().enumerate() {
        *w += bias[(i / hw) % c];
    }
    let bd = dev.upload_f32::<T>(&bias).unwrap();
    ops::add_bias_channels(dev, &mut ad, &bd, (b, c, hw)).unwrap();
    check(
        &format!("add_bias_channels_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want2,
        tol::<T>(1e-7),
    );
    let rows = b * hw;
    for (i, w) in want2.iter_mut().enumerate() {
        *w += bias[i % c];
    }
    ops::add_bias_rows(dev, At::from(&ad), &bd, rows, c).unwrap();
    check(
        &format!("add_bias_rows_{sfx}"),
        &dev.download_f32(&ad, a.len()).unwrap(),
        &want2,
        tol::<T>(1e-7),
    );
    // Transpose NCHW -> NHWC and back.
    let mut want = vec![0.0; a.len()];
    cpu::nchw_to_nhwc(&mut want, &a, b, c, hw);
    let ad = dev.upload_f32::<T>(&a).unwrap();
    let mut t1 = poisoned::<T>(dev, a.len());
    ops::transpose(dev, &mut t1, &ad, b, c, hw).unwrap();
    check(
        &format!("transpose_{sfx} nchw->nhwc"),
        &dev.download_f32(&t1, a.len()).unwrap(),
        &want,
        0.0,
    );
    let mut t2 = poisoned::<T>(dev, a.len());
    ops::transpose(dev, &mut t2, &t1, b, hw, c).unwrap();
    check(
        &format!("transpose_{sfx} nhwc->nchw"),
        &dev.download_f32(&t2, a.len()).unwrap(),
        &a,
        0.0,
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn elementwise_ops_match_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("elementwise");
    elementwise_case::<f32>(&dev, &mut rng);
    elementwise_case::<f16>(&dev, &mut rng);
    elementwise_case::<bf16>(&dev, &mut rng);
}
