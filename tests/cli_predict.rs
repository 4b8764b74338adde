//! `hdb predict`: a face PNG -> a LiDB adapter equal to the library's own prediction.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{assert_close, Tol};
use hdb::adapter::lidb::Lidb;
use hdb::hypernet::Hypernet;

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// Writes an RGB8 PNG.
fn write_png(path: &std::path::Path, rgb: &[u8], w: usize, h: usize) {
    let f = std::fs::File::create(path).expect("png file");
    let mut enc = png::Encoder::new(f, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().expect("header");
    wr.write_image_data(rgb).expect("pixels");
}

#[test]
fn predict_writes_the_adapter_the_library_predicts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, h) = (45usize, 37usize);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i * 37) % 253) as u8).collect();
    let face = dir.path().join("face.png");
    write_png(&face, &rgb, w, h);
    let out = dir.path().join("id.lidb.safetensors");
    let net_path = fx("hypernet/tiny.hypernet.safetensors");
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["predict", "--hypernet"])
        .arg(&net_path)
        .arg("--model")
        .arg(fx("tiny-sd"))
        .arg("--face")
        .arg(&face)
        .args(["--iterations", "2", "-o"])
        .arg(&out)
        .output()
        .expect("run hdb");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = Lidb::load(&out).expect("written adapter");
    let net = Hypernet::load(&net_path).expect("hypernet");
    let image = net.preprocess(&rgb, w, h, w * 3).expect("preprocess");
    let mut want = net
        .to_lidb(&net.predict(&image, Some(2), None).expect("predict"))
        .expect("lidb");
    // The file says which model it was predicted for (the library's own adapter cannot know).
    assert_eq!(want.meta.base, None);
    want.meta.base = Some("tiny-sd (SD 1.x)".into());
    assert_eq!(got, want);
    let info = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["adapter", "info"])
        .arg(&out)
        .output()
        .expect("run hdb");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("base: tiny-sd (SD 1.x)"), "{text}");

    // A face smaller than 16x16 is refused with the argument named.
    let tiny = dir.path().join("tiny.png");
    write_png(&tiny, &[0; 8 * 8 * 3], 8, 8);
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["predict", "--hypernet"])
        .arg(&net_path)
        .arg("--model")
        .arg(fx("tiny-sd"))
        .arg("--face")
        .arg(&tiny)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run hdb");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("16"), "{err}");
}

/// `hdb predict --device cuda` predicts on the GPU where there is one, else fails before writing
/// anything, saying there is no device. On the GPU the network runs in its file's storage type:
/// the fixture is stored in f16, so the adapter is the CPU's within f16's tolerance (1e-2
/// relative L2 error, tests/cuda_models.rs's).
#[test]
fn predict_device_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, h) = (32usize, 32usize);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i * 11) % 251) as u8).collect();
    let face = dir.path().join("face.png");
    write_png(&face, &rgb, w, h);
    let out = dir.path().join("id.lidb.safetensors");
    let net_path = fx("hypernet/tiny.hypernet.safetensors");
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["predict", "--hypernet"])
        .arg(&net_path)
        .arg("--model")
        .arg(fx("tiny-sd"))
        .arg("--face")
        .arg(&face)
        .args(["--iterations", "2", "--device", "cuda", "-o"])
        .arg(&out)
        .output()
        .expect("run hdb");
    let err = String::from_utf8_lossy(&r.stderr);
    if !r.status.success() {
        assert!(err.contains("no device"), "{err}");
        assert!(!out.exists(), "nothing is written when there is no device");
        return;
    }
    let got = Lidb::load(&out).expect("written adapter");
    let net = Hypernet::load(&net_path).expect("hypernet");
    let image = net.preprocess(&rgb, w, h, w * 3).expect("preprocess");
    let want = net
        .to_lidb(&net.predict(&image, Some(2), None).expect("predict"))
        .expect("lidb");
    // The CLI names the model the identity is for; the bare network does not.
    assert_eq!(got.meta.base.as_deref(), Some("tiny-sd (SD 1.x)"));
    let mut want_meta = want.meta.clone();
    want_meta.base = got.meta.base.clone();
    assert_eq!(got.meta, want_meta);
    let keys = |l: &Lidb| l.layers.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&got), keys(&want));
    // Every layer's factors, in key order.
    let flat = |l: &Lidb| -> Vec<f32> {
        l.layers
            .values()
            .flat_map(|(d, u)| d.iter().chain(u).copied())
            .collect()
    };
    assert_close(
        "hdb predict --device cuda (f16) against the CPU's adapter",
        &flat(&got),
        &flat(&want),
        Tol::RelL2(1e-2),
    );
}

/// `hdb bench hypernet --dtype`: a type that is not one is refused by name, and half precision
/// on the CPU is refused naming the argument, before the (large) network is built.
#[test]
fn bench_hypernet_dtype_errors_name_the_argument() {
    let run = |args: &[&str]| {
        let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
            .args(["bench", "hypernet", "--device", "cpu"])
            .args(args)
            .output()
            .expect("run hdb");
        (
            r.status.success(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--dtype", "f8"]);
    assert!(
        !ok && err.contains("'f8' is not a storage type: f32, f16 or bf16"),
        "{err}"
    );
    let (ok, err) = run(&["--dtype", "f16"]);
    assert!(
        !ok && err.contains("--dtype") && err.contains("needs --device cuda"),
        "{err}"
    );
    assert!(
        !err.contains("made in"),
        "the network was built before the refusal: {err}"
    );
}
