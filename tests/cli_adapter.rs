//! The adapter side of the CLI: `hdb unet --adapter/--scale/--mode` (with `adapter_index` in
//! IN), `hdb adapter info|export|basis`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_close, Tol};
use hdb::io::safetensors::{read_as_f32, write_f32, SafetensorsFile};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn hdb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(args)
        .output()
        .expect("run hdb")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn out(p: &Path) -> Vec<f32> {
    SafetensorsFile::open(p)
        .expect("output")
        .to_f32("out")
        .expect("out")
}

#[test]
fn unet_with_adapters_matches_diffusers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = dir.path().join("o.safetensors");
    let (model, input) = (fx("tiny-sd"), fx("unet/tiny-sd.in.safetensors"));
    for mode in ["merge", "runtime"] {
        let r = hdb(&[
            "unet",
            "--model",
            s(&model),
            "--input",
            s(&input),
            "--output",
            s(&o),
            "--threads",
            "1",
            "--adapter",
            s(&fx("adapter/id1.lidb.safetensors")),
            "--scale",
            "0.7",
            "--adapter",
            s(&fx("adapter/id2.peft.safetensors")),
            "--scale",
            "0.5",
            "--mode",
            mode,
        ]);
        assert!(
            r.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        // It says what it wrote.
        let said = String::from_utf8_lossy(&r.stdout);
        assert!(
            said.contains(&format!("wrote {} (out [2, 4, ", s(&o))),
            "{said}"
        );
        // 1e-4 x max|ref| (1.12) as the UNet parity tests allow.
        assert_close(
            &format!("{mode}: hdb unet with two adapters"),
            &out(&o),
            &out(&fx("adapter/id1x0.7-id2x0.5.out.safetensors")),
            Tol::MaxAbs(1e-4 * 1.12),
        );
    }
}

#[test]
fn unet_reads_per_sample_adapter_indices_from_the_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = SafetensorsFile::open(&fx("unet/tiny-sd.in.safetensors")).expect("input");
    let names = ["sample", "timestep", "encoder_hidden_states"];
    let tensors: Vec<(Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| read_as_f32(&f, n).expect("tensor"))
        .collect();
    let idx = [1.0f32, 0.0]; // written as f32 here; the CLI also reads i64
    let mut list: Vec<(&str, Vec<usize>, &[f32])> = names
        .iter()
        .zip(&tensors)
        .map(|(n, (sh, v))| (*n, sh.clone(), v.as_slice()))
        .collect();
    list.push(("adapter_index", vec![2], &idx));
    let input = dir.path().join("in.safetensors");
    write_f32(&input, &list).expect("write input");
    let o = dir.path().join("o.safetensors");
    let r = hdb(&[
        "unet",
        "--model",
        s(&fx("tiny-sd")),
        "--input",
        s(&input),
        "--output",
        s(&o),
        "--mode",
        "runtime",
        "--adapter",
        s(&fx("adapter/id2.lidb.safetensors")),
        "--adapter",
        s(&fx("adapter/id1.kohya.safetensors")),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // Sample 0 gets adapter 1 (id1), sample 1 adapter 0 (id2): the per-sample reference.
    let want = out(&fx("adapter/per-sample.out.safetensors"));
    let got = out(&o);
    let half = want.len() / 2;
    assert_close("sample 0", &got[..half], &want[..half], Tol::MaxAbs(1e-4));
    assert_close("sample 1", &got[half..], &want[half..], Tol::MaxAbs(1e-4));
    // Merge mode cannot give samples different identities.
    let r = hdb(&[
        "unet",
        "--model",
        s(&fx("tiny-sd")),
        "--input",
        s(&input),
        "--output",
        s(&o),
        "--mode",
        "merge",
        "--adapter",
        s(&fx("adapter/id2.lidb.safetensors")),
        "--adapter",
        s(&fx("adapter/id1.kohya.safetensors")),
    ]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("adapter_index"));
}

#[test]
fn adapter_info_export_and_basis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = hdb(&["adapter", "info", s(&fx("adapter/id2.lidb.safetensors"))]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && text.contains("rank 2, a 3, b 2") && text.contains("128 UNet"),
        "{text}"
    );

    // LyCORIS' DoRA and Tucker forms are named.
    let r = hdb(&[
        "adapter",
        "info",
        s(&fx("lycoris/locon-tucker-dora.safetensors")),
    ]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success()
            && text.contains("DoRA magnitudes on 160 layer(s)")
            && text.contains("Tucker convolutions (lora_mid) on"),
        "{text}"
    );

    let k = dir.path().join("k.safetensors");
    let r = hdb(&[
        "adapter",
        "export",
        "--model",
        s(&fx("tiny-sd")),
        "--format",
        "kohya",
        s(&fx("adapter/id1.lidb.safetensors")),
        s(&k),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = hdb(&["adapter", "info", s(&k)]);
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("Kohya LoRA"),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    let o = dir.path().join("o.safetensors");
    let r = hdb(&[
        "unet",
        "--model",
        s(&fx("tiny-sd")),
        "--input",
        s(&fx("unet/tiny-sd.in.safetensors")),
        "--output",
        s(&o),
        "--adapter",
        s(&k),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_close(
        "exported kohya file",
        &out(&o),
        &out(&fx("adapter/id1.out.safetensors")),
        Tol::MaxAbs(1.3e-4),
    );

    let b = dir.path().join("basis.safetensors");
    let r = hdb(&[
        "adapter",
        "basis",
        "--model",
        s(&fx("tiny-sd")),
        "--seed",
        "1234567890123456789",
        "--a",
        "3",
        "--b",
        "2",
        "--output",
        s(&b),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (got, want) = (
        SafetensorsFile::open(&b).expect("basis"),
        SafetensorsFile::open(&fx("adapter/basis.safetensors")).expect("ref"),
    );
    let key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.u_aux";
    assert_eq!(
        got.to_f32(key).expect("got"),
        want.to_f32(key).expect("want")
    );
    // The default a = 100 does not fit the tiny model's 4-wide layers: the error names one.
    let r = hdb(&[
        "adapter",
        "basis",
        "--model",
        s(&fx("tiny-sd")),
        "--seed",
        "1",
        "--output",
        s(&b),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success()
            && err.contains("a = 100")
            && err.contains("'unet.") | err.contains("'text_encoder."),
        "{err}"
    );
}

/// `--device`: a bad name is refused naming the choices; `cuda` either runs the UNet there (a
/// GPU machine with the `cuda` build: the output stays within f16 error of the CPU's) or fails
/// saying there is no device.
#[test]
fn unet_device_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, input) = (fx("tiny-sd"), fx("unet/tiny-sd.in.safetensors"));
    let run = |device: &str, o: &Path| {
        hdb(&[
            "unet",
            "--model",
            s(&model),
            "--input",
            s(&input),
            "--output",
            s(o),
            "--threads",
            "1",
            "--adapter",
            s(&fx("adapter/id1.lidb.safetensors")),
            "--device",
            device,
        ])
    };
    let r = run("tpu", &dir.path().join("x.safetensors"));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("auto, cpu, cuda, cuda:N"),
        "{err}"
    );
    let cpu = dir.path().join("cpu.safetensors");
    let r = run("cpu", &cpu);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let want = out(&fx("adapter/id1.out.safetensors"));
    assert_close("--device cpu", &out(&cpu), &want, Tol::MaxAbs(1e-4 * 1.12));
    let gpu = dir.path().join("gpu.safetensors");
    let r = run("cuda:0", &gpu);
    let err = String::from_utf8_lossy(&r.stderr);
    if r.status.success() {
        assert_close(
            "hdb unet --device cuda:0 against diffusers",
            &out(&gpu),
            &want,
            Tol::MaxAbsOfRef(2e-2),
        );
    } else {
        assert!(err.contains("no device"), "{err}");
    }
}
