//! What is not a table row: refusals and faults on the device (clear errors, never panics or
//! device faults, and the device usable after them), and the CLI's bench refusing a peer.

use hdb::backend::cuda::ops::{self, At, AttnKernel, AttnShape, BlasElem};
use hdb::backend::cuda::{Cuda, CudaDevice};
use hdb::backend::Conv2d;
use hdb::backend::{AttnDims, Backend, NormDims};
use hdb::io::F32Weight;
use hdb::{Error, Result};

/// Shape mistakes through the trait are `Error::Internal` (or `Unsupported`), not panics or
/// device faults; `describe()` names the device and type.
pub fn shape_errors<T: BlasElem>(be: &Cuda<T>) {
    let s = T::SUFFIX;
    let d = be.describe();
    assert!(
        d.starts_with("cuda:") && d.ends_with(s),
        "describe() = {d:?}, expected cuda:<ordinal> {s}"
    );
    let wt = |v: &[f32]| be.weight(F32Weight::Owned(v.to_vec())).unwrap();
    let x = be.upload(&[1.0; 12]).unwrap();
    let w = wt(&[1.0; 8]);
    let internal = |what: &str, r: Result<()>| match r {
        Err(Error::Internal(m)) => println!("cuda-op errors {s} {what}: {m}"),
        other => panic!("{what} ({s}): expected Error::Internal, got {other:?}"),
    };
    internal("linear x", be.linear(&x, &w, None, (5, 2, 4)).map(|_| ()));
    internal(
        "linear weight",
        be.linear(&x, &w, None, (3, 4, 3)).map(|_| ()),
    );
    let p = Conv2d {
        batch: 1,
        c_in: 3,
        h: 2,
        w: 2,
        c_out: 1,
        kernel: 3,
        stride: 1,
        padding: 0,
    };
    let w27 = wt(&[1.0; 27]);
    internal(
        "conv2d kernel larger than the image",
        be.conv2d(&x, &w27, None, &p).map(|_| ()),
    );
    let causal = AttnDims {
        batch: 1,
        lq: 3,
        lk: 2,
        heads: 1,
        head_dim: 2,
        causal: true,
    };
    let q = be.upload(&[0.5; 6]).unwrap();
    let kv = be.upload(&[0.5; 4]).unwrap();
    internal(
        "causal lq != lk",
        be.attention(&q, &kv, &kv, causal).map(|_| ()),
    );
    let g = wt(&[1.0; 4]);
    let nd = NormDims {
        batch: 1,
        channels: 4,
        hw: 3,
        groups: 3,
        eps: 1e-5,
    };
    internal(
        "group_norm groups",
        be.group_norm(&x, &g, &g, nd, false).map(|_| ()),
    );
    let mut y = be.upload(&[0.0; 11]).unwrap();
    internal("add lengths", be.add_inplace(&mut y, &x));
    internal(
        "transpose dims",
        be.transpose(&x, (2, 3, 3), true).map(|_| ()),
    );
    internal(
        "pad_bottom_right dims",
        be.pad_bottom_right(&x, (1, 3, 5)).map(|_| ()),
    );
    internal(
        "timestep_embedding of no timesteps",
        be.timestep_embedding(&[], 8, true, 0.0).map(|_| ()),
    );
    // The backward ops refuse as their forwards do (x and dy have 12 values, y 11).
    internal(
        "linear_backward dy",
        be.linear_backward(&x, &w, (5, 2, 4)).map(|_| ()),
    );
    internal(
        "conv2d_backward kernel larger than the image",
        be.conv2d_backward(&x, &w27, &p).map(|_| ()),
    );
    internal(
        "group_norm_backward groups",
        be.group_norm_backward(&x, &g, &g, &x, nd, false)
            .map(|_| ()),
    );
    internal(
        "layer_norm_backward dy",
        be.layer_norm_backward(&x, &g, &y, (3, 4), 1e-5).map(|_| ()),
    );
    internal(
        "attention_backward causal lq != lk",
        be.attention_backward(&q, &kv, &kv, &q, causal).map(|_| ()),
    );
    internal(
        "activate_backward dy",
        be.activate_backward(&x, &y, hdb::backend::Activation::Silu)
            .map(|_| ()),
    );
    internal(
        "geglu_backward dy",
        be.geglu_backward(&x, &y, (2, 3)).map(|_| ()),
    );
    internal(
        "upsample_nearest2x_backward dims",
        be.upsample_nearest2x_backward(&x, (1, 2, 2)).map(|_| ()),
    );
    internal(
        "split_channels dims",
        be.split_channels(&x, (1, 2, 3, 3)).map(|_| ()),
    );
    internal(
        "split_channels into an empty part",
        be.split_channels(&x, (1, 0, 4, 3)).map(|_| ()),
    );
    // The device still works.
    be.dev()
        .synchronize()
        .expect("device usable after the errors");
}

/// Device-level faults: out of memory, short buffers, unsupported shapes; then the device
/// still computes.
pub fn device_faults(dev: &CudaDevice) {
    // More memory than any GPU has.
    match dev.zeros::<f32>(1 << 42) {
        Err(Error::OutOfMemory(msg)) => println!("cuda-fault out of memory -> OutOfMemory: {msg}"),
        other => panic!("a 16 TiB allocation gave {other:?}"),
    }
    // A buffer too small for the op: refused before launch.
    let x = dev.zeros::<f32>(10).unwrap();
    let mut y = dev.zeros::<f32>(10).unwrap();
    let e = ops::geglu(dev, &mut y, &x, 10, 10).unwrap_err();
    println!("cuda-fault short buffer -> {e}");
    assert!(e.to_string().contains("'x'"), "{e}");
    // A head dim the kernels do not take.
    let big = dev.zeros::<f32>(2 * 300).unwrap();
    let e = ops::attention(
        dev,
        At::from(&big),
        At::from(&big),
        At::from(&big),
        At::from(&big),
        AttnShape::dense(1, 1, 2, 2, 300),
        AttnKernel::Auto,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    // f32 has no tensor-core convolution: Unsupported, for the caller to fall back to conv2d.
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
    let (xc, wc) = (
        dev.zeros::<f32>(64).unwrap(),
        dev.zeros::<f32>(144).unwrap(),
    );
    let mut yc = dev.zeros::<f32>(64).unwrap();
    let e = ops::conv2d_implicit(dev, &mut yc, &xc, &wc, None, &p).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    println!("cuda-fault conv2d_implicit_f32 -> Unsupported: {e}");
    // A shape past a kernel's int: refused by the launch builder, naming kernel and argument.
    let e = ops::softmax_rows_launch::<f32>(0, 1, 1 << 31).unwrap_err();
    assert!(
        e.to_string().contains("softmax_rows_f32") && e.to_string().contains("'n'"),
        "{e}"
    );
    // The backward ops too: a short output refused before launch, naming it; a shape past a
    // backward kernel's int refused by the launch builder.
    let mut dx = dev.zeros::<f32>(63).unwrap();
    let e = ops::conv2d_backward(dev, &mut dx, &yc, &wc, &p).unwrap_err();
    assert!(e.to_string().contains("'dx'"), "{e}");
    println!("cuda-fault conv2d_backward short dx -> {e}");
    let e = ops::layer_norm_backward_launch::<half::f16>([0; 4], 1, 1 << 31, 1e-5).unwrap_err();
    assert!(
        e.to_string().contains("layer_norm_backward_f16") && e.to_string().contains("'dim'"),
        "{e}"
    );
    // Still usable.
    let v = dev.upload(&[1.0f32, -2.0]).unwrap();
    let mut w = dev.upload(&[0.5f32, 0.25]).unwrap();
    ops::add_inplace(dev, &mut w, &v, 2).unwrap();
    assert_eq!(dev.download(&w, 2).unwrap(), vec![1.5, -1.75]);
    println!("cuda-fault device usable after the faults: yes");
}

/// `hdb bench cuda --smoke` times nothing worth comparing, so it refuses a peer, naming the
/// flag, before opening any device (no GPU needed).
#[test]
fn bench_smoke_refuses_a_peer() {
    // scripts/gpu-check.sh names the binary it carried to the GPU machine (the build's path
    // is not there).
    let hdb =
        std::env::var_os("HDB_TEST_HDB_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_hdb").into());
    let out = std::process::Command::new(hdb)
        .args(["bench", "cuda", "--smoke", "--peer-python", "python3"])
        .output()
        .expect("running hdb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "hdb accepted --smoke with a peer");
    assert!(
        err.contains("--peer-python") && err.contains("--smoke"),
        "the error should name --peer-python and --smoke: {err}"
    );
}
