//! LiDB compose and merge, multi-identity LoRA

use super::*;

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lidb_compose_matches_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("lidb_compose");
    let (r, a, b, alpha) = (2usize, 100usize, 50usize, 1.5f32);
    let shapes = [(320usize, 320usize), (768, 320), (1280, 640), (40, 24)];
    let mut keep = Vec::new();
    let mut table = Vec::new();
    let mut want = Vec::new();
    let mut max_out = 0;
    for &(din, dout) in &shapes {
        let dt = randn(&mut rng, r * a, 0.1);
        let ut = randn(&mut rng, b * r, 0.1);
        let da = randn(&mut rng, a * din, 1.0);
        let ua = randn(&mut rng, dout * b, 1.0);
        let mut down = vec![0.0f32; r * din];
        for i in 0..r {
            for c in 0..din {
                let s: f64 = (0..a)
                    .map(|j| dt[i * a + j] as f64 * da[j * din + c] as f64)
                    .sum();
                down[i * din + c] = s as f32;
            }
        }
        let mut up = vec![0.0f32; dout * r];
        for o in 0..dout {
            for i in 0..r {
                let s: f64 = (0..b)
                    .map(|j| ua[o * b + j] as f64 * ut[j * r + i] as f64)
                    .sum();
                up[o * r + i] = alpha * s as f32;
            }
        }
        let bufs = [
            dev.upload(&dt).unwrap(),
            dev.upload(&ut).unwrap(),
            dev.upload(&da).unwrap(),
            dev.upload(&ua).unwrap(),
            poisoned::<f32>(&dev, r * din),
            poisoned::<f32>(&dev, dout * r),
        ];
        table.push(ComposeLayer {
            d_train: dev.ptr(&bufs[0]),
            u_train: dev.ptr(&bufs[1]),
            d_aux: dev.ptr(&bufs[2]),
            u_aux: dev.ptr(&bufs[3]),
            down: dev.ptr(&bufs[4]),
            up: dev.ptr(&bufs[5]),
            din: din as i64,
            dout: dout as i64,
        });
        max_out = max_out.max(r * din + dout * r);
        want.push((down, up));
        keep.push(bufs);
    }
    let t = dev.upload(&table).unwrap();
    ops::lidb_compose(&dev, &t, table.len(), max_out, (r, a, b), alpha).unwrap();
    for (i, ((down, up), bufs)) in want.iter().zip(&keep).enumerate() {
        let gd = dev.download(&bufs[4], down.len()).unwrap();
        let gu = dev.download(&bufs[5], up.len()).unwrap();
        check(&format!("lidb_compose_f32 layer {i} down"), &gd, down, 1e-5);
        check(&format!("lidb_compose_f32 layer {i} up"), &gu, up, 1e-5);
    }
}

/// One merge case: layers of several shapes, each with `n_factors` factors of mixed ranks.
fn merge_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64, n_factors: usize) {
    let shapes = [(320usize, 320usize), (768, 640), (1280, 1280), (37, 13)];
    let mut layers = Vec::new();
    let mut factors = Vec::new();
    let mut keep_f = Vec::new();
    let mut bases = Vec::new();
    let mut outs = Vec::new();
    let mut wants = Vec::new();
    let mut max_dout = 0;
    for &(din, dout) in &shapes {
        let base = rounded::<T>(&randn(rng, dout * din, 0.05));
        let mut want: Vec<f64> = base.iter().map(|&v| v as f64).collect();
        let first = factors.len();
        for f in 0..n_factors {
            let rank = [1usize, 4, 16][f % 3];
            let scale = 0.5 + f as f32 * 0.25;
            let down = randn(rng, rank * din, 0.1);
            let up = randn(rng, dout * rank, 0.1);
            for o in 0..dout {
                for c in 0..din {
                    let s: f64 = (0..rank)
                        .map(|q| up[o * rank + q] as f64 * down[q * din + c] as f64)
                        .sum();
                    want[o * din + c] += scale as f64 * s;
                }
            }
            let (dd, ud) = (dev.upload(&down).unwrap(), dev.upload(&up).unwrap());
            factors.push(Factor {
                down: dev.ptr(&dd),
                up: dev.ptr(&ud),
                rank: rank as i32,
                scale,
            });
            keep_f.push((dd, ud));
        }
        let bd = dev.upload_f32::<T>(&base).unwrap();
        let od = poisoned::<T>(dev, dout * din);
        layers.push(MergeLayer {
            w_base: dev.ptr(&bd),
            w: dev.ptr(&od),
            dout: dout as i64,
            din: din as i64,
            first_factor: first as i32,
            n_factors: n_factors as i32,
        });
        max_dout = max_dout.max(dout);
        bases.push((bd, base));
        outs.push(od);
        wants.push(want);
    }
    let lt = dev.upload(&layers).unwrap();
    let ft = if factors.is_empty() {
        dev.upload(&[Factor::default()]).unwrap()
    } else {
        dev.upload(&factors).unwrap()
    };
    ops::lidb_merge::<T>(dev, &lt, layers.len(), max_dout, &ft).unwrap();
    for (i, ((od, want), (bd, _))) in outs.iter().zip(&wants).zip(&bases).enumerate() {
        let n = want.len();
        if n_factors == 0 {
            // The pristine base, bit for bit.
            let got: Vec<T> = dev.download(od, n).unwrap();
            let base: Vec<T> = dev.download(bd, n).unwrap();
            let same = got
                .iter()
                .zip(&base)
                .all(|(a, b)| bytemuck_bits(a) == bytemuck_bits(b));
            println!(
                "cuda-parity lidb_merge_{} layer {i} empty set: bit-exact={same}",
                T::SUFFIX
            );
            assert!(
                same,
                "lidb_merge_{}: empty set changed layer {i}",
                T::SUFFIX
            );
        } else {
            let got = dev.download_f32(od, n).unwrap();
            let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            check(
                &format!("lidb_merge_{} layer {i} {n_factors} factors", T::SUFFIX),
                &got,
                &want32,
                tol::<T>(1e-6),
            );
        }
    }
}

fn bytemuck_bits<T: DeviceElem>(v: &T) -> u32 {
    // f32 and the 16-bit types compared by their bit patterns.
    match std::mem::size_of::<T>() {
        4 => T::to_f32(*v).to_bits(),
        _ => {
            let x = T::to_f32(*v);
            if T::SUFFIX == "f16" {
                f16::from_f32(x).to_bits() as u32
            } else {
                bf16::from_f32(x).to_bits() as u32
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lidb_merge_matches_cpu_and_restores_the_base() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("lidb_merge");
    for n in [0, 1, 3] {
        merge_case::<f32>(&dev, &mut rng, n);
        merge_case::<f16>(&dev, &mut rng, n);
        merge_case::<bf16>(&dev, &mut rng, n);
    }
}

fn bgmv_case<T: DeviceElem>(dev: &CudaDevice, rng: &mut SplitMix64, din: usize, dout: usize) {
    let (batch, rows_per_sample) = (4usize, 77usize);
    let rows = batch * rows_per_sample;
    let ranks = [1usize, 4, 128];
    let mut facs = Vec::new();
    let mut keep = Vec::new();
    let mut host = Vec::new();
    for (i, &rank) in ranks.iter().enumerate() {
        let down = randn(rng, rank * din, 0.1);
        let up = randn(rng, dout * rank, 0.1);
        let (dd, ud) = (dev.upload(&down).unwrap(), dev.upload(&up).unwrap());
        let scale = 1.0 - 0.3 * i as f32;
        facs.push(Factor {
            down: dev.ptr(&dd),
            up: dev.ptr(&ud),
            rank: rank as i32,
            scale,
        });
        keep.push((dd, ud));
        host.push((down, up, rank, scale));
    }
    let index = [2i32, -1, 0, 1];
    let x = rounded::<T>(&randn(rng, rows * din, 1.0));
    let y0 = rounded::<T>(&randn(rng, rows * dout, 1.0));
    let mut want = y0.clone();
    for r in 0..rows {
        let a = index[r / rows_per_sample];
        if a < 0 {
            continue;
        }
        let (down, up, rank, scale) = &host[a as usize];
        let t: Vec<f64> = (0..*rank)
            .map(|q| {
                *scale as f64
                    * (0..din)
                        .map(|c| x[r * din + c] as f64 * down[q * din + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        for o in 0..dout {
            let s: f64 = (0..*rank).map(|q| t[q] * up[o * rank + q] as f64).sum();
            want[r * dout + o] = (want[r * dout + o] as f64 + s) as f32;
        }
    }
    let (xd, yd) = (
        dev.upload_f32::<T>(&x).unwrap(),
        dev.upload_f32::<T>(&y0).unwrap(),
    );
    let (id, fd) = (dev.upload(&index).unwrap(), dev.upload(&facs).unwrap());
    let s = BgmvShape {
        rows,
        rows_per_sample,
        din,
        dout,
        ld_x: din,
        ld_y: dout,
    };
    ops::lora_bgmv::<T>(dev, At::from(&yd), At::from(&xd), &id, &fd, facs.len(), s).unwrap();
    let got = dev.download_f32(&yd, want.len()).unwrap();
    check(
        &format!(
            "lora_bgmv_{} {din}->{dout} 4 samples, ranks 1/4/128",
            T::SUFFIX
        ),
        &got,
        &want,
        tol::<T>(1e-6),
    );
    // The sample with index -1 is untouched, bit for bit.
    let r0 = rows_per_sample;
    assert!(
        got[r0 * dout..2 * r0 * dout]
            .iter()
            .zip(&y0[r0 * dout..2 * r0 * dout])
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "lora_bgmv_{}: the sample without an adapter changed",
        T::SUFFIX
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lora_bgmv_matches_cpu() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    let mut rng = seed("lora_bgmv");
    // 8-wide path (SD shapes) and the element path (din, dout not multiples of 8).
    for (din, dout) in [(320, 640), (37, 13)] {
        bgmv_case::<f32>(&dev, &mut rng, din, dout);
        bgmv_case::<f16>(&dev, &mut rng, din, dout);
        bgmv_case::<bf16>(&dev, &mut rng, din, dout);
    }
}
