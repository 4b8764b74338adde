//! Host test of the attention backward's cuBLAS plan: run under cuBLAS's column-major
//! semantics (the forward's test memory), with the row kernel's math on the host, against the
//! CPU backend's attention backward.

use super::super::attention::tests::Mem;
use super::*;

/// `attention_backward_rows_*`'s contract on host memory (f64).
fn rows_kernel(mem: &mut Mem, l: &KernelLaunch, esize: usize) {
    let [Param::U64(p), Param::U64(ds), Param::U64(s), Param::U64(dp), Param::I64(rows), Param::I32(lk), Param::I32(per_head), Param::I32(q0), Param::I32(causal)] =
        l.params[..]
    else {
        panic!("attention_backward_rows params {:?}", l.params)
    };
    let warps = l.cfg.grid_dim.0 as i64 * (l.cfg.block_dim.0 as i64 / 32);
    assert!(warps >= rows, "{warps} warps for {rows} rows");
    let lk = lk as i64;
    for r in 0..rows {
        let qi = q0 as i64 + r % per_head as i64;
        let visible = if causal != 0 { lk.min(qi + 1) } else { lk };
        let sr: Vec<f64> = (0..visible)
            .map(|j| mem.get(s, 4, r * lk + j, "s") as f64)
            .collect();
        let m = sr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = sr.iter().map(|v| (v - m).exp()).sum();
        let pr: Vec<f64> = sr.iter().map(|v| (v - m).exp() / sum).collect();
        let dot: f64 = (0..visible)
            .map(|j| pr[j as usize] * mem.get(dp, 4, r * lk + j, "dp") as f64)
            .sum();
        for j in 0..lk {
            let (pv, g) = if j < visible {
                let pv = pr[j as usize];
                (pv, pv * (mem.get(dp, 4, r * lk + j, "dp") as f64 - dot))
            } else {
                (0.0, 0.0)
            };
            mem.set(p, esize, r * lk + j, pv as f32, "p");
            mem.set(ds, esize, r * lk + j, g as f32, "ds");
        }
    }
}

/// Runs [`attention_backward_plan`] for storage elements of `esize` bytes on host memory and
/// compares dq, dk and dv with the CPU's attention backward.
fn run_plan<T: DeviceElem>(s: AttnShape, causal: bool, chunk: usize) {
    let esize = std::mem::size_of::<T>();
    let mut rng = crate::rng::SplitMix64(11 + chunk as u64);
    let mut randn = |n: usize| -> Vec<f32> {
        crate::rng::normals(&mut rng, n)
            .iter()
            .map(|&v| v as f32)
            .collect()
    };
    let hd = s.heads * s.head_dim;
    let (nq, nk) = (s.batch * s.lq * hd, s.batch * s.lk * hd);
    let (q, k, v, dout) = (randn(nq), randn(nk), randn(nk), randn(nq));
    let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
    crate::backend::cpu::backward::attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &q,
        &k,
        &v,
        &dout,
        (s.batch, s.lq, s.lk, s.heads, s.head_dim),
        causal,
    );
    let per_chunk = s.heads * chunk.min(s.lq) * s.lk;
    let half = esize != 4;
    let mut mem = Mem { bufs: Vec::new() };
    let nan = |n: usize| vec![f32::NAN; n];
    let (q_a, k_a, v_a, do_a) = (
        mem.add(esize, q),
        mem.add(esize, k),
        mem.add(esize, v),
        mem.add(esize, dout),
    );
    let (dq_a, dk_a, dv_a) = (
        mem.add(esize, nan(nq)),
        mem.add(esize, nan(nk)),
        mem.add(esize, nan(nk)),
    );
    let (dk_acc, dv_acc) = if half {
        (mem.add(4, nan(nk)), mem.add(4, nan(nk)))
    } else {
        (dk_a, dv_a)
    };
    let at = BackwardAddrs {
        q: q_a,
        k: k_a,
        v: v_a,
        dout: do_a,
        dq: dq_a,
        dk: dk_a,
        dv: dv_a,
        dk_acc,
        dv_acc,
        scores: mem.add(4, nan(per_chunk)),
        dp: mem.add(4, nan(per_chunk)),
        probs: mem.add(esize, nan(per_chunk)),
        ds: mem.add(esize, nan(per_chunk)),
    };
    let mut casts = 0;
    for step in attention_backward_plan::<T>(at, &s, causal, chunk).expect("plan") {
        match step {
            MaterializedStep::Gemm {
                cfg,
                a,
                b,
                c,
                c_f32,
            } => mem.gemm(&cfg, (a, b, c), (esize, if c_f32 { 4 } else { esize })),
            MaterializedStep::Launch(l) if l.kernel.starts_with("attention_backward_rows_") => {
                assert_eq!(l.kernel, format!("attention_backward_rows_{}", T::SUFFIX));
                rows_kernel(&mut mem, &l, esize)
            }
            MaterializedStep::Launch(l) => {
                assert_eq!(l.kernel, format!("cast_from_f32_{}", T::SUFFIX));
                let [Param::U64(y), Param::U64(x), Param::I64(n)] = l.params[..] else {
                    panic!("cast params {:?}", l.params)
                };
                for i in 0..n {
                    let v = mem.get(x, 4, i, "cast x");
                    mem.set(y, esize, i, v, "cast y");
                }
                casts += 1;
            }
        }
    }
    assert_eq!(casts, if half { 2 } else { 0 }, "casts of dk and dv");
    for (name, addr, want) in [("dq", dq_a, &dq), ("dk", dk_a, &dk), ("dv", dv_a, &dv)] {
        let mut worst = (0f32, 0usize);
        for (i, w) in want.iter().enumerate() {
            let got = mem.get(addr, esize, i as i64, name);
            let e = (got - w).abs();
            let e = if e.is_nan() { f32::INFINITY } else { e };
            if e > worst.0 {
                worst = (e, i);
            }
        }
        assert!(
            worst.0 <= 2e-5,
            "{s:?} causal {causal} chunk {chunk} ({esize}-byte elements): {name}'s worst \
             |err| {} at {}",
            worst.0,
            worst.1
        );
    }
}

#[test]
fn the_backward_plan_is_attention_backward_under_cublas_semantics() {
    // Several heads (interleaved column blocks), batch 2, lq != lk, lk == d (so no leading
    // dimension is taken for another), chunks of 1 row, of rows that do not divide lq, of all
    // rows; causal with chunks (the mask's offset); 4- and 2-byte storage.
    for (s, causal) in [
        (AttnShape::dense(2, 3, 11, 7, 5), false),
        (AttnShape::dense(1, 2, 6, 4, 4), false),
        (AttnShape::dense(2, 2, 9, 9, 3), true),
    ] {
        for chunk in [1, 4, 100] {
            run_plan::<f32>(s, causal, chunk);
            run_plan::<half::f16>(s, causal, chunk);
        }
    }
}

#[test]
fn the_backward_plan_refuses_strided_rows_and_empty_chunks() {
    let at = BackwardAddrs {
        q: 1 << 40,
        k: 2 << 40,
        v: 3 << 40,
        dout: 4 << 40,
        dq: 5 << 40,
        dk: 6 << 40,
        dv: 7 << 40,
        dk_acc: 6 << 40,
        dv_acc: 7 << 40,
        scores: 8 << 40,
        dp: 9 << 40,
        probs: 10 << 40,
        ds: 11 << 40,
    };
    let dense = AttnShape::dense(1, 2, 3, 3, 4);
    let strided = AttnShape { ld_q: 9, ..dense };
    let e = attention_backward_plan::<f32>(at, &strided, false, 1).unwrap_err();
    assert!(e.to_string().contains("dense"), "{e}");
    assert!(attention_backward_plan::<f32>(at, &dense, false, 0).is_err());
}
