//! `hdb generate` (from given latents, equal to diffusers) and `hdb demo`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{assert_close, Tol};
use hdb::io::safetensors::SafetensorsFile;

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).expect("png"),
    ));
    let reader = dec.read_info().expect("png header");
    let info = reader.info();
    (info.width, info.height)
}

#[test]
fn generate_from_latents_matches_diffusers_and_writes_pngs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, dump) = (
        dir.path().join("img.png"),
        dir.path().join("latents.safetensors"),
    );
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["generate", "--model"])
        .arg(fx("tiny-sd"))
        .args([
            "--prompt",
            "a photo of sks person",
            "--negative",
            "blurry, low quality",
            "--steps",
            "4",
        ])
        .args([
            "--sampler",
            "dpmpp_2m",
            "--width",
            "64",
            "--height",
            "64",
            "--latents",
        ])
        .arg(fx("pipeline/latents.safetensors"))
        .arg("--dump-latents")
        .arg(&dump)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run hdb");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = SafetensorsFile::open(&dump)
        .expect("dump")
        .to_f32("latents")
        .expect("latents");
    let want = SafetensorsFile::open(&fx("pipeline/dpmpp_2m.safetensors"))
        .expect("ref")
        .to_f32("latents")
        .expect("ref");
    assert_close("latents", &got, &want, Tol::MaxAbsOfRef(1e-4));
    for i in 0..2 {
        assert_eq!(png_size(&dir.path().join(format!("img-{i}.png"))), (64, 64));
    }
}

#[test]
fn generate_rejects_bad_arguments_clearly() {
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["generate", "--model"])
        .arg(fx("tiny-sd"))
        .args([
            "--prompt",
            "x",
            "--width",
            "60",
            "--height",
            "64",
            "-o",
            "/nonexistent/x.png",
        ])
        .output()
        .expect("run hdb");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("multiples of 8"),
        "{err}"
    );
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["generate", "--model"])
        .arg(fx("tiny-sd"))
        .args(["--prompt", "x", "--sampler", "plms", "-o", "x.png"])
        .output()
        .expect("run hdb");
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("plms"));
    // hdb writes PNG only: another extension would get PNG bytes under the wrong name.
    for name in ["x.jpg", "x", "x.png.webp"] {
        let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
            .args(["generate", "--model"])
            .arg(fx("tiny-sd"))
            .args(["--prompt", "x", "-o", name])
            .output()
            .expect("run hdb");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && err.contains("-o") && err.contains(".png"),
            "{name}: {err}"
        );
    }
}

#[test]
fn demo_runs_the_whole_path_on_the_built_in_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args([
            "demo",
            "--steps",
            "3",
            "--size",
            "64",
            "--threads",
            "2",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .expect("run hdb demo");
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    for row in [
        "load model",
        "swap identity, merge mode",
        "per denoising step",
        "total",
    ] {
        assert!(
            stdout.contains(row),
            "timing table lacks '{row}':\n{stdout}"
        );
    }
    for f in [
        "identity-1.png",
        "batch-0-identity-0.png",
        "batch-1-identity-1.png",
    ] {
        assert_eq!(png_size(&dir.path().join(f)), (64, 64), "{f}");
    }
    assert!(dir.path().join("identity-0.lidb.safetensors").is_file());
    // The synthetic input faces are saved beside the images, and the demo says why its
    // images look like noise.
    for f in ["face-0.png", "face-1.png"] {
        assert_eq!(png_size(&dir.path().join(f)), (96, 80), "{f}");
    }
    assert!(
        stdout.contains("weights are random, so its images are noise"),
        "{stdout}"
    );
}

/// `hdb demo | head -1`: when the reader of stdout goes away, hdb ends quietly (by SIGPIPE,
/// as Unix tools do), never with a panic about the broken pipe.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args([
            "demo",
            "--steps",
            "1",
            "--size",
            "64",
            "--threads",
            "2",
            "--out",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run hdb demo");
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("first line");
    // The reader is dropped here: the pipe is closed while the demo still has lines to print.
    assert!(first.starts_with("hdb demo on"), "{first}");
    let r = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        r.status.success() || r.status.signal() == Some(13),
        "{:?}: {err}",
        r.status
    );
}

/// `hdb generate --device cuda` runs the UNet on the GPU where there is one, else fails before
/// loading anything, saying there is no device.
#[test]
fn generate_device_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("img.png");
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["generate", "--model"])
        .arg(fx("tiny-sd"))
        .args(["--prompt", "a photo", "--steps", "2", "--width", "64"])
        .args(["--height", "64", "--device", "cuda", "-o"])
        .arg(&out)
        .output()
        .expect("run hdb");
    let err = String::from_utf8_lossy(&r.stderr);
    if r.status.success() {
        assert_eq!(png_size(&out), (64, 64));
    } else {
        assert!(err.contains("no device"), "{err}");
    }
}

/// `hdb demo --device cuda` runs the demo with the UNet on the GPU where there is one, else
/// fails saying there is no device.
#[test]
fn demo_device_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["demo", "--steps", "2", "--size", "64", "--device", "cuda"])
        .args(["--threads", "2", "--out"])
        .arg(dir.path())
        .output()
        .expect("run hdb demo");
    let (out, err) = (
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr),
    );
    if r.status.success() {
        assert!(out.contains("the UNet on cuda:0"), "{out}");
        assert_eq!(
            png_size(&dir.path().join("batch-1-identity-1.png")),
            (64, 64)
        );
    } else {
        assert!(err.contains("no device"), "{err}");
    }
}
