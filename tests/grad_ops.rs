//! The backward of every op the UNet and the text encoder run, on the CPU backend, against
//! torch autograd in float64 (tests/fixtures/grad/ops.safetensors, tools/make_grad_fixtures.py)
//! and against central finite differences of the CPU's own forward ops. Tolerance: 2e-5 of the
//! reference's largest magnitude for torch (f32 against f64), 2e-3 for finite differences
//! (f32 forward, step 1e-2 on smooth functions).

mod common;

use hdb::backend::{Activation, AttnDims, Backend, Conv2d, Cpu, NormDims};
use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::io::F32Weight;

const TORCH_TOL: f64 = 2e-5;

struct Fixture(SafetensorsFile);

impl Fixture {
    fn open() -> Fixture {
        Fixture(
            SafetensorsFile::open(&common::fixtures().join("grad/ops.safetensors"))
                .expect("tests/fixtures/grad/ops.safetensors (tools/make_grad_fixtures.py)"),
        )
    }

    fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        read_as_f32(&self.0, name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn v(&self, name: &str) -> Vec<f32> {
        self.get(name).1
    }

    fn w(&self, name: &str) -> F32Weight {
        F32Weight::Owned(self.v(name))
    }
}

/// Max |got - want| within `tol` x max|want|; NaN anywhere fails; prints the worst element.
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want
        .iter()
        .fold(0f64, |m, w| m.max(w.abs() as f64))
        .max(1e-30);
    let mut worst = (0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - *w as f64).abs() / scale;
        assert!(
            !err.is_nan(),
            "{what}: element {i} is NaN (got {g}, want {w})"
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let i = worst.1;
    println!(
        "{what}: max error {:.2e} of max|ref| {scale:.3e} at {i}",
        worst.0
    );
    assert!(
        worst.0 <= tol,
        "{what}: element {i}: got {} want {} ({:.2e} of max|ref|, tolerance {tol:e})",
        got[i],
        want[i],
        worst.0
    );
}

#[test]
fn linear_and_conv_input_gradients_match_torch() {
    let f = Fixture::open();
    let be = Cpu;
    for case in ["linear.a", "linear.rows1"] {
        let (xs, _) = f.get(&format!("{case}.x"));
        let (ws, _) = f.get(&format!("{case}.w"));
        let (rows, din, dout) = (xs[0], xs[1], ws[0]);
        let dx = be
            .linear_backward(
                &f.v(&format!("{case}.dy")),
                &f.w(&format!("{case}.w")),
                (rows, din, dout),
            )
            .expect("linear_backward");
        check(case, &dx, &f.v(&format!("{case}.want.x")), TORCH_TOL);
    }
    for (case, stride, padding) in [
        ("k3", 1, 1),
        ("k1", 1, 0),
        ("k3s2", 2, 1),
        ("k3s2even", 2, 1),
    ] {
        let name = format!("conv.{case}");
        let (xs, _) = f.get(&format!("{name}.x"));
        let (ws, _) = f.get(&format!("{name}.w"));
        let p = Conv2d {
            batch: xs[0],
            c_in: xs[1],
            h: xs[2],
            w: xs[3],
            c_out: ws[0],
            kernel: ws[2],
            stride,
            padding,
        };
        let dx = be
            .conv2d_backward(&f.v(&format!("{name}.dy")), &f.w(&format!("{name}.w")), &p)
            .expect("conv2d_backward");
        check(&name, &dx, &f.v(&format!("{name}.want.x")), TORCH_TOL);
    }
}

#[test]
fn norm_gradients_match_torch() {
    let f = Fixture::open();
    let be = Cpu;
    for (case, silu) in [("group_norm.plain", false), ("group_norm.silu", true)] {
        let (xs, x) = f.get(&format!("{case}.x"));
        let d = NormDims {
            batch: xs[0],
            channels: xs[1],
            hw: xs[2] * xs[3],
            groups: 3,
            eps: 1e-5,
        };
        let dx = be
            .group_norm_backward(
                &x,
                &f.w(&format!("{case}.gamma")),
                &f.w(&format!("{case}.beta")),
                &f.v(&format!("{case}.dy")),
                d,
                silu,
            )
            .expect("group_norm_backward");
        check(case, &dx, &f.v(&format!("{case}.want.x")), TORCH_TOL);
    }
    let (xs, x) = f.get("layer_norm.a.x");
    let dx = be
        .layer_norm_backward(
            &x,
            &f.w("layer_norm.a.gamma"),
            &f.v("layer_norm.a.dy"),
            (xs[0], xs[1]),
            1e-5,
        )
        .expect("layer_norm_backward");
    check("layer_norm", &dx, &f.v("layer_norm.a.want.x"), TORCH_TOL);
}

#[test]
fn attention_gradients_match_torch() {
    let f = Fixture::open();
    let be = Cpu;
    for (case, heads, causal) in [
        ("attention.self", 2, false),
        ("attention.cross", 2, false),
        ("attention.causal", 2, true),
        ("attention.long", 1, false),
    ] {
        let (qs, q) = f.get(&format!("{case}.q"));
        let (ks, k) = f.get(&format!("{case}.k"));
        let d = AttnDims {
            batch: qs[0],
            lq: qs[1],
            lk: ks[1],
            heads,
            head_dim: qs[2] / heads,
            causal,
        };
        let (dq, dk, dv) = be
            .attention_backward(
                &q,
                &k,
                &f.v(&format!("{case}.v")),
                &f.v(&format!("{case}.dy")),
                d,
            )
            .expect("attention_backward");
        check(
            &format!("{case} dq"),
            &dq,
            &f.v(&format!("{case}.want.q")),
            TORCH_TOL,
        );
        check(
            &format!("{case} dk"),
            &dk,
            &f.v(&format!("{case}.want.k")),
            TORCH_TOL,
        );
        check(
            &format!("{case} dv"),
            &dv,
            &f.v(&format!("{case}.want.v")),
            TORCH_TOL,
        );
    }
}

#[test]
fn elementwise_gradients_match_torch() {
    let f = Fixture::open();
    let be = Cpu;
    for (case, act) in [
        ("act.silu", Activation::Silu),
        ("act.gelu", Activation::Gelu),
        ("act.quick_gelu", Activation::QuickGelu),
    ] {
        let dx = be
            .activate_backward(&f.v(&format!("{case}.x")), &f.v(&format!("{case}.dy")), act)
            .expect("activate_backward");
        check(case, &dx, &f.v(&format!("{case}.want.x")), TORCH_TOL);
    }
    let (xs, x) = f.get("geglu.a.x");
    let dx = be
        .geglu_backward(&x, &f.v("geglu.a.dy"), (xs[0], xs[1] / 2))
        .expect("geglu_backward");
    check("geglu", &dx, &f.v("geglu.a.want.x"), TORCH_TOL);
    let (xs, _) = f.get("upsample.a.x");
    let dx = be
        .upsample_nearest2x_backward(&f.v("upsample.a.dy"), (xs[0] * xs[1], xs[2], xs[3]))
        .expect("upsample backward");
    check("upsample", &dx, &f.v("upsample.a.want.x"), TORCH_TOL);
}

/// <dy, f(x)> as a function of x, in f64 over the f32 forward.
fn directional(dy: &[f32], y: &[f32]) -> f64 {
    dy.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Central differences of `loss` at `x` for a few coordinates, against `grad`.
fn finite_differences(what: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64) {
    let h = 1e-2f32;
    let scale = grad
        .iter()
        .fold(0f64, |m, g| m.max(g.abs() as f64))
        .max(1e-6);
    let step = (x.len() / 17).max(1);
    let mut worst = (0f64, 0usize);
    for i in (0..x.len()).step_by(step) {
        let (mut p, mut m) = (x.to_vec(), x.to_vec());
        p[i] += h;
        m[i] -= h;
        let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
        let err = (fd - grad[i] as f64).abs() / scale;
        assert!(err.is_finite(), "{what}: non-finite difference at {i}");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    println!(
        "{what}: finite differences within {:.2e} of max|grad| (worst at {})",
        worst.0, worst.1
    );
    assert!(
        worst.0 < 2e-3,
        "{what}: element {} fd vs analytic differs by {:.3e} of max|grad|",
        worst.1,
        worst.0
    );
}

#[test]
fn gradients_match_finite_differences_of_the_forward_ops() {
    let f = Fixture::open();
    let be = Cpu;
    // conv 3x3 stride 2
    let (xs, x) = f.get("conv.k3s2.x");
    let (ws, _) = f.get("conv.k3s2.w");
    let w = f.w("conv.k3s2.w");
    let dy = f.v("conv.k3s2.dy");
    let p = Conv2d {
        batch: xs[0],
        c_in: xs[1],
        h: xs[2],
        w: xs[3],
        c_out: ws[0],
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    let dx = be.conv2d_backward(&dy, &w, &p).expect("conv backward");
    finite_differences("conv 3x3 stride 2", &x, &dx, |x| {
        directional(&dy, &be.conv2d(&x.to_vec(), &w, None, &p).expect("conv"))
    });
    // group norm + SiLU
    let (xs, x) = f.get("group_norm.silu.x");
    let (g, b) = (f.w("group_norm.silu.gamma"), f.w("group_norm.silu.beta"));
    let dy = f.v("group_norm.silu.dy");
    let d = NormDims {
        batch: xs[0],
        channels: xs[1],
        hw: xs[2] * xs[3],
        groups: 3,
        eps: 1e-5,
    };
    let dx = be
        .group_norm_backward(&x, &g, &b, &dy, d, true)
        .expect("gn backward");
    finite_differences("group norm + silu", &x, &dx, |x| {
        directional(
            &dy,
            &be.group_norm(&x.to_vec(), &g, &b, d, true).expect("gn"),
        )
    });
    // causal attention, through q
    let (qs, q) = f.get("attention.causal.q");
    let (k, v, dy) = (
        f.v("attention.causal.k"),
        f.v("attention.causal.v"),
        f.v("attention.causal.dy"),
    );
    let ad = AttnDims {
        batch: qs[0],
        lq: qs[1],
        lk: qs[1],
        heads: 2,
        head_dim: qs[2] / 2,
        causal: true,
    };
    let (dq, dk, _) = be
        .attention_backward(&q, &k, &v, &dy, ad)
        .expect("attention backward");
    finite_differences("causal attention dq", &q, &dq, |q| {
        directional(
            &dy,
            &be.attention(&q.to_vec(), &k, &v, ad).expect("attention"),
        )
    });
    finite_differences("causal attention dk", &k, &dk, |k| {
        directional(
            &dy,
            &be.attention(&q, &k.to_vec(), &v, ad).expect("attention"),
        )
    });
    // GEGLU
    let (xs, x) = f.get("geglu.a.x");
    let dy = f.v("geglu.a.dy");
    let dx = be
        .geglu_backward(&x, &dy, (xs[0], xs[1] / 2))
        .expect("geglu backward");
    finite_differences("geglu", &x, &dx, |x| {
        directional(
            &dy,
            &be.geglu(&x.to_vec(), (xs[0], xs[1] / 2)).expect("geglu"),
        )
    });
}

#[test]
fn backward_shape_mistakes_are_errors_not_panics() {
    let be = Cpu;
    let w = F32Weight::Owned(vec![0.0; 12]);
    let e = be
        .linear_backward(&vec![0.0; 5], &w, (2, 4, 3))
        .expect_err("dy of 5 for [2, 3]");
    assert!(e.to_string().contains("linear_backward"), "{e}");
    let d = AttnDims {
        batch: 1,
        lq: 2,
        lk: 3,
        heads: 1,
        head_dim: 2,
        causal: false,
    };
    let e = be
        .attention_backward(
            &vec![0.0; 4],
            &vec![0.0; 6],
            &vec![0.0; 6],
            &vec![0.0; 3],
            d,
        )
        .expect_err("dout of 3");
    assert!(e.to_string().contains("attention_backward"), "{e}");
    let e = be
        .split_channels(&vec![0.0; 7], (1, 2, 2, 2))
        .expect_err("7 values for [1, 4, 2]");
    assert!(e.to_string().contains("split_channels"), "{e}");
}
