//! Hostile inputs (issue 18): files and arguments that once crashed, aborted, hung or were
//! silently misread. Each must now be refused with an error naming the fault. The files are in
//! `tests/fixtures/hostile/` (made by `tools/make_hostile.py`) or built here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

use hdb::adapter::apply::{Applied, ApplyMode};
use hdb::adapter::{adaptable_layers, Adapter, AdapterSource, LoraLayer};
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::Model;
use hdb::Error;

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn hostile(name: &str) -> PathBuf {
    let p = fx("hostile").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run python3 tools/make_hostile.py",
        p.display()
    );
    p
}

fn model() -> Model {
    Model::load(&fx("tiny-sd"), Default::default()).expect("tiny-sd")
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

/// The CLI ran, failed cleanly (exit status 1, not a signal or an abort) and said `want`.
fn assert_cli_refuses(out: &std::process::Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean failure, got {:?}; stderr:\n{err}",
        out.status
    );
    assert!(err.contains(want), "stderr lacks '{want}':\n{err}");
    assert!(
        !err.contains("panicked"),
        "a panic reached the user:\n{err}"
    );
}

/// A safetensors file from (name, dtype, shape, bytes) in order, with a raw header.
fn safetensors(tensors: &[(&str, &str, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let off = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, data.len()]}),
        );
    }
    let text = serde_json::Value::Object(header).to_string();
    let mut v = (text.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(text.as_bytes());
    v.extend_from_slice(&data);
    v
}

// --- Finding 1: sizes from file data are checked, never wrapped ---------------------------

#[test]
fn lora_of_rank_2p62_with_empty_factors_is_refused() {
    let m = model();
    let table = adaptable_layers(&m);
    for file in [
        "lora-rank-2p62.kohya.safetensors",
        "lora-rank-2p62.peft.safetensors",
    ] {
        let f = SafetensorsFile::open(&hostile(file)).expect("valid safetensors");
        let e = hdb::adapter::load(&f, &table).expect_err(file);
        let msg = e.to_string();
        assert!(
            msg.contains(file) && msg.contains("attn1.to_k"),
            "{file}: {msg}"
        );
    }
}

/// An adapter built in memory (not from a file) with the same wrapping sizes: the apply paths
/// check it again, in both modes.
#[test]
fn adapter_whose_rank_wraps_is_refused_by_both_apply_modes() {
    let m = model();
    let unet = m.unet().expect("unet");
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    let rank = 1usize << 62;
    let layer = LoraLayer {
        rank,
        down: Vec::new(),
        up: Vec::new(),
    };
    assert!(!layer.fits(4, 4), "rank 2^62 x 4 must not wrap to 0");
    let a = Adapter {
        layers: [(key.to_string(), layer)].into_iter().collect(),
        source: AdapterSource::Lora,
    };
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let e = Applied::new(&[(&a, 1.0)], mode, &*unet).expect_err("wrapping rank");
        assert!(
            matches!(e, Error::AdapterMismatch(_)) && e.to_string().contains(key),
            "{mode:?}: {e}"
        );
    }
}

/// The kernels check their extents with checked products: a size that wraps to the length of
/// an empty buffer panics (caught at the C boundary) instead of running an unchecked GEMM.
#[test]
fn kernel_extents_that_overflow_panic_instead_of_writing_out_of_bounds() {
    let big = 1usize << 62;
    let r = catch_unwind(AssertUnwindSafe(|| {
        hdb::backend::cpu::matmul(&mut [], &[], &[], 4, 0, big, true, false)
    }));
    let msg = r.expect_err("must panic");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("overflows"), "{msg}");
    let r = catch_unwind(AssertUnwindSafe(|| {
        hdb::backend::cpu::linear(&mut [], &[], &[], None, big, 0, 4)
    }));
    assert!(r.is_err(), "linear must refuse a wrapping extent");
}

#[test]
fn tensor_shapes_whose_elements_overflow_are_invalid_files() {
    // (The safetensors crate's own product overflows on [2^62, 8, 0]; with the zero first
    // its running product stays 0, so hdb checks the non-zero dimensions itself.)
    let bytes = safetensors(&[("x", "F32", vec![0, 1 << 62, 8], vec![])]);
    let e = SafetensorsFile::from_vec(Path::new("big.safetensors"), bytes).expect_err("shape");
    let msg = e.to_string();
    assert!(
        msg.contains("big.safetensors") && msg.contains("'x'") && msg.contains("larger than"),
        "{msg}"
    );
}

#[test]
fn cli_adapter_commands_refuse_the_wrapping_lora() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = hostile("lora-rank-2p62.kohya.safetensors");
    let out = dir.path().join("x.safetensors");
    let r = hdb(&[
        "adapter",
        "export",
        "--model",
        s(&fx("tiny-sd")),
        "--format",
        "peft",
        s(&file),
        s(&out),
    ]);
    assert_cli_refuses(&r, "attn1.to_k");
    assert!(!out.exists());
}
