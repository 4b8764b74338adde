//! The fuzz targets' inputs replayed as ordinary tests, so `cargo test` covers them without
//! libFuzzer: every file of the committed corpora (`fuzz/corpus/<target>/`, minimized by
//! `scripts/fuzz.sh --merge`), the inputs that once crashed a target (`fuzz/regressions/`)
//! and the seeds `scripts/fuzz-seeds.py` makes from the fixtures
//! go through the same `fuzz/harness.rs` functions the targets run. A panic names the target
//! and the file.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The seed corpora, made once per test process into a temporary folder.
fn seeds() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("python3")
            .arg(root().join("scripts/fuzz-seeds.py"))
            .arg(dir.path())
            .output()
            .expect("python3 runs scripts/fuzz-seeds.py");
        assert!(
            out.status.success(),
            "scripts/fuzz-seeds.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

fn replay(target: &str) {
    let f = harness::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no harness for target {target}"));
    let mut corpus = files(&root().join("fuzz/corpus").join(target));
    corpus.extend(files(&root().join("fuzz/regressions").join(target)));
    let seeds = files(&seeds().join(target));
    assert!(!seeds.is_empty(), "{target}: no seeds");
    for p in corpus.iter().chain(&seeds) {
        let data = std::fs::read(p).expect("read input");
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(&data))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target}: {} panicked: {msg}", p.display());
        }
    }
    println!(
        "{target}: {} corpus inputs and {} seeds replayed",
        corpus.len(),
        seeds.len()
    );
}

/// Every target of fuzz/Cargo.toml has a harness entry and a test here.
#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).expect("manifest");
    let bins: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|l| l.trim_end_matches('"'))
        .filter(|n| *n != "hdb-fuzz")
        .collect();
    let mut names: Vec<&str> = harness::TARGETS.iter().map(|(n, _)| *n).collect();
    let mut bins_sorted = bins.clone();
    bins_sorted.sort();
    names.sort();
    assert_eq!(
        bins_sorted, names,
        "fuzz/Cargo.toml targets vs harness::TARGETS"
    );
    let this = std::fs::read_to_string(root().join("tests/fuzz_corpus.rs")).expect("this file");
    for n in names {
        assert!(
            this.contains(&format!("replay(\"{n}\")")),
            "tests/fuzz_corpus.rs has no test replaying {n}"
        );
    }
}

#[test]
fn safetensors() {
    replay("safetensors");
}

#[test]
fn lidb() {
    replay("lidb");
}

#[test]
fn lora() {
    replay("lora");
}

#[test]
fn hypernet_config() {
    replay("hypernet_config");
}

#[test]
fn hypernet() {
    replay("hypernet");
}

#[test]
fn configs() {
    replay("configs");
}

#[test]
fn model_folder() {
    replay("model_folder");
}

#[test]
fn ldm_keys() {
    replay("ldm_keys");
}

#[test]
fn tokenizer() {
    replay("tokenizer");
}

#[test]
fn png() {
    replay("png");
}

#[test]
fn cli_inputs() {
    replay("cli_inputs");
}
