//! Hostile inputs (issue 18): files and arguments that once crashed, aborted, hung or were
//! silently misread. Each must now be refused with an error naming the fault. The files are in
//! `tests/fixtures/hostile/` (made by `tools/make_hostile.py`) or built here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

use hdb::adapter::apply::{Applied, ApplyMode};
use hdb::adapter::{Adapter, AdapterSource, LoraLayer};
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

/// A safetensors file from (name, dtype, shape, bytes) in order.
fn safetensors(tensors: &[(&str, &str, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
    safetensors_with_metadata(tensors, &[])
}

/// As [`safetensors`], with `__metadata__` pairs.
fn safetensors_with_metadata(
    tensors: &[(&str, &str, Vec<u64>, Vec<u8>)],
    metadata: &[(&str, String)],
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
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
    let table = m.adaptable_layers();
    for file in [
        "lora-rank-2p62.kohya.safetensors",
        "lora-rank-2p62.peft.safetensors",
    ] {
        let f = SafetensorsFile::open(&hostile(file)).expect("valid safetensors");
        let e = hdb::adapter::load(&f, &table).expect_err(file);
        let msg = e.to_string();
        // (kohya names the layer attn1_to_k, PEFT attn1.to_k)
        assert!(
            msg.contains(file) && msg.contains("attn1") && msg.contains("to_k"),
            "{file}: {msg}"
        );
    }
}

/// An adapter built in memory (not from a file) with the same wrapping sizes: the apply paths
/// check it again, in both modes.
#[test]
fn adapter_whose_rank_wraps_is_refused_by_both_apply_modes() {
    let m = model();
    let unet = hdb::model::unet::Unet::from_model(&m).expect("unet");
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    let rank = 1usize << 62;
    let layer = LoraLayer {
        rank,
        down: Vec::new(),
        up: Vec::new(),
        conv_kernel: None,
    };
    assert!(!layer.fits(4, 4), "rank 2^62 x 4 must not wrap to 0");
    let a = Adapter {
        layers: [(key.to_string(), layer)].into_iter().collect(),
        source: AdapterSource::Lora,
    };
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let e = Applied::new(&[(&a, 1.0)], mode, &unet).expect_err("wrapping rank");
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
    assert_cli_refuses(&r, "attn1_to_k");
    assert!(!out.exists());
}

// --- Finding 2: sizes from outside are bounded before anything is allocated ------------------

/// A copy of tiny-sd (its parts symlinked) whose scheduler config is `scheduler`.
fn tiny_sd_with_scheduler(dir: &Path, scheduler: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(m.join("scheduler")).expect("mkdir");
    for part in [
        "unet",
        "text_encoder",
        "vae",
        "tokenizer",
        "model_index.json",
    ] {
        std::os::unix::fs::symlink(fx("tiny-sd").join(part), m.join(part)).expect("symlink");
    }
    std::fs::copy(scheduler, m.join("scheduler/scheduler_config.json")).expect("copy");
    m
}

#[test]
fn scheduler_with_2p40_or_2p64_train_timesteps_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, file) in ["scheduler-2p40.json", "scheduler-2p64m1.json"]
        .iter()
        .enumerate()
    {
        let d = dir.path().join(i.to_string());
        let path = tiny_sd_with_scheduler(&d, &hostile(file));
        let m = Model::load(&path, Default::default()).expect("model");
        let rt = hdb::Runtime::new(Default::default()).expect("runtime");
        let e = hdb::Engine::new(std::sync::Arc::new(rt), m)
            .scheduler()
            .expect_err(file);
        assert!(
            matches!(e, Error::InvalidFile { .. })
                && e.to_string().contains("num_train_timesteps")
                && e.to_string().contains("scheduler_config.json"),
            "{file}: {e}"
        );
        let r = hdb(&[
            "generate",
            "--model",
            s(&path),
            "--prompt",
            "x",
            "--steps",
            "1",
            "-o",
            s(&d.join("x.png")),
        ]);
        assert_cli_refuses(&r, "num_train_timesteps");
    }
}

#[test]
fn png_declaring_100000_squared_pixels_is_refused_before_allocating() {
    let file = hostile("png-100000x100000.png");
    let e = hdb::io::png::read_png(&file).expect_err("too large");
    let msg = e.to_string();
    assert!(
        msg.contains("png-100000x100000.png")
            && msg.contains("100000x100000")
            && msg.contains("limit"),
        "{msg}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let r = hdb(&[
        "predict",
        "--hypernet",
        s(&fx("hypernet/tiny.hypernet.safetensors")),
        "--model",
        s(&fx("tiny-sd")),
        "--face",
        s(&file),
        "-o",
        s(&dir.path().join("x.safetensors")),
    ]);
    assert_cli_refuses(&r, "limit");
}

#[test]
fn cli_generate_refuses_widths_and_batches_of_2p32() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = dir.path().join("x.png");
    let big = "4294967296";
    for (w, h, batch, name) in [
        (big, "64", "1", "'width'"),
        ("64", big, "1", "'height'"),
        ("64", "64", big, "'batch'"),
    ] {
        let r = hdb(&[
            "generate",
            "--model",
            s(&fx("tiny-sd")),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--width",
            w,
            "--height",
            h,
            "--batch",
            batch,
            "-o",
            s(&o),
        ]);
        assert_cli_refuses(&r, name);
    }
}

#[test]
fn cli_generate_refuses_latents_of_2p62_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = hdb(&[
        "generate",
        "--model",
        s(&fx("tiny-sd")),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--latents",
        s(&hostile("latents-2p62x0.safetensors")),
        "-o",
        s(&dir.path().join("x.png")),
    ]);
    assert_cli_refuses(&r, "'batch'");
}

#[test]
fn unet_inputs_beyond_the_limits_are_refused_before_a_forward() {
    let m = model();
    let unet = hdb::model::unet::Unet::from_model(&m).expect("unet");
    let (b, h, w, l) = (300usize, 8usize, 8usize, 1usize);
    let sample = vec![0f32; b * 4 * h * w];
    let t = vec![1f32; b];
    let ctx = vec![0f32; b * l * unet.config.cross_attention_dim];
    let input = hdb::model::unet::UnetInput {
        sample: &sample,
        timesteps: &t,
        context: &ctx,
        batch: b,
        height: h,
        width: w,
        context_len: l,
    };
    let e = unet.forward(&input).expect_err("batch 300");
    assert!(
        e.to_string().contains("'batch'") && e.to_string().contains("256"),
        "{e}"
    );
}

// --- Finding 3: documented limits on the work a small file can ask for ----------------------

/// The tiny hypernetwork with its config changed by `edit`, written to `dir/name`.
fn hypernet_variant(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let f = SafetensorsFile::open(&fx("hypernet/tiny.hypernet.safetensors")).expect("hypernet");
    let mut config: serde_json::Value =
        serde_json::from_str(&f.metadata()["config"]).expect("config JSON");
    edit(&mut config);
    let mut entries: Vec<_> = f.tensors().collect();
    entries.sort_by_key(|e| e.start);
    let dtypes: Vec<String> = entries.iter().map(|e| format!("{:?}", e.dtype)).collect();
    let tensors: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = entries
        .iter()
        .zip(&dtypes)
        .map(|(e, dt)| {
            let dims = e.shape.dims().iter().map(|&d| d as u64).collect();
            (e.name.as_str(), dt.as_str(), dims, f.data(e).to_vec())
        })
        .collect();
    let path = dir.join(name);
    let bytes = safetensors_with_metadata(&tensors, &[("config", config.to_string())]);
    std::fs::write(&path, bytes).expect("write");
    path
}

#[test]
fn hypernetwork_configs_of_2p20_layers_depth_or_iterations_fail_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (field, edit) in [
        (
            "layers",
            &(|c: &mut serde_json::Value| c["layers"] = (1u64 << 20).into())
                as &dyn Fn(&mut serde_json::Value),
        ),
        ("encoder.depth", &|c| {
            c["encoder"]["depth"] = (1u64 << 20).into()
        }),
        ("iterations", &|c| c["iterations"] = (1u64 << 20).into()),
    ] {
        let path = hypernet_variant(dir.path(), &format!("{field}.safetensors"), edit);
        let t = std::time::Instant::now();
        let e = hdb::hypernet::Hypernet::load(&path).expect_err(field);
        assert!(
            t.elapsed().as_secs_f64() < 2.0,
            "{field}: refusing took {:?}",
            t.elapsed()
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("'{field}'")) && msg.contains("limit"),
            "{field}: {msg}"
        );
    }
    // Within the limits but beyond the file: refused by the tensor check, before building.
    let path = hypernet_variant(dir.path(), "layers3.safetensors", |c| {
        c["layers"] = 3.into()
    });
    let e = hdb::hypernet::Hypernet::load(&path).expect_err("layers 3");
    assert!(
        e.to_string().contains("decoder.layers.2.") && e.to_string().contains("lacks"),
        "{e}"
    );
}

#[test]
fn prediction_iterations_above_the_limit_are_refused() {
    let net =
        hdb::hypernet::Hypernet::load(&fx("hypernet/tiny.hypernet.safetensors")).expect("hypernet");
    let side = net.config.img_size();
    let image = vec![0f32; 3 * side * side];
    let e = net
        .predict(&image, Some(usize::MAX), None)
        .expect_err("2^64-1 iterations");
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                name: "iterations",
                ..
            }
        ),
        "{e}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let r = hdb(&[
        "predict",
        "--hypernet",
        s(&fx("hypernet/tiny.hypernet.safetensors")),
        "--model",
        s(&fx("tiny-sd")),
        "--face",
        s(&fx("hostile/png-20000x20000.png")),
        "--iterations",
        "18446744073709551615",
        "-o",
        s(&dir.path().join("x.safetensors")),
    ]);
    // The face is checked first here; either way the command fails cleanly at once.
    assert_cli_refuses(&r, "limit");
}

#[test]
fn adapters_above_the_rank_limit_are_refused() {
    let m = model();
    let table = m.adaptable_layers();
    let dir = tempfile::tempdir().expect("tempdir");
    // LiDB v1 of rank 4,000,000 (a = b = 1) on one layer: 16 MB of f16, as in the issue.
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    let r = 4_000_000u64;
    let down = format!("{key}.lidb_down");
    let up = format!("{key}.lidb_up");
    let zeros = vec![0u8; 2 * r as usize];
    let bytes = safetensors_with_metadata(
        &[
            (down.as_str(), "F16", vec![r, 1], zeros.clone()),
            (up.as_str(), "F16", vec![1, r], zeros),
        ],
        &[
            ("format", "hdb-lidb".into()),
            ("version", "1".into()),
            ("rank", r.to_string()),
            ("a", "1".into()),
            ("b", "1".into()),
            ("basis_seed", "1".into()),
            ("alpha", "1.0".into()),
        ],
    );
    let path = dir.path().join("rank4m.lidb.safetensors");
    std::fs::write(&path, bytes).expect("write");
    let f = SafetensorsFile::open(&path).expect("valid safetensors");
    let e = hdb::adapter::load(&f, &table).expect_err("rank 4M");
    assert!(
        e.to_string().contains("'rank'") && e.to_string().contains("1024"),
        "{e}"
    );
    // A kohya LoRA of rank 2000.
    let kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";
    let (dn, un) = (
        format!("{kohya}.lora_down.weight"),
        format!("{kohya}.lora_up.weight"),
    );
    let bytes = safetensors(&[
        (dn.as_str(), "F32", vec![2000, 4], vec![0; 32000]),
        (un.as_str(), "F32", vec![4, 2000], vec![0; 32000]),
    ]);
    let f = SafetensorsFile::from_vec(Path::new("rank2000.safetensors"), bytes).expect("valid");
    let e = hdb::adapter::load(&f, &table).expect_err("rank 2000");
    assert!(
        e.to_string().contains("rank 2000") && e.to_string().contains("1024"),
        "{e}"
    );
}

#[test]
fn face_images_above_16_megapixels_are_refused_before_any_work() {
    let e = hdb::hypernet::preprocess::check(20000 * 20000 * 3, 20000, 20000, 60000)
        .expect_err("20000x20000");
    assert!(
        matches!(e, Error::InvalidArgument { name: "image", .. })
            && e.to_string().contains("limit"),
        "{e}"
    );
    let e = hdb::io::png::read_png(&hostile("png-20000x20000.png")).expect_err("PNG");
    assert!(e.to_string().contains("20000x20000"), "{e}");
}

// --- Finding 4: FIFOs and other non-regular files are refused, never opened for blocking ------

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).expect("path");
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo {}", path.display());
}

/// Runs `f` on a thread and fails the test if it has not returned within 20 s (a FIFO opened
/// for reading with no writer blocks forever).
fn within_20s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} hung"))
}

fn assert_not_regular(what: &str, r: hdb::Result<impl std::fmt::Debug>, kind: &str) {
    let e = r.expect_err(what);
    let msg = e.to_string();
    assert!(
        msg.contains(kind) && msg.contains("regular file"),
        "{what}: {msg}"
    );
}

#[test]
fn fifos_as_model_shard_adapter_hypernet_or_face_are_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("model.safetensors");
    mkfifo(&fifo);
    let p = fifo.clone();
    let r = within_20s("Model::load(FIFO)", move || {
        Model::load(&p, Default::default()).map(|_| ())
    });
    assert_not_regular("model", r, "FIFO");
    let p = fifo.clone();
    let r = within_20s("SafetensorsFile::open(FIFO)", move || {
        SafetensorsFile::open(&p).map(|_| ())
    });
    assert_not_regular("adapter", r, "FIFO");
    let p = fifo.clone();
    let r = within_20s("Hypernet::load(FIFO)", move || {
        hdb::hypernet::Hypernet::load(&p).map(|_| ())
    });
    assert_not_regular("hypernet", r, "FIFO");
    let face = dir.path().join("face.png");
    mkfifo(&face);
    let r = within_20s("read_png(FIFO)", move || {
        hdb::io::png::read_png(&face).map(|_| ())
    });
    assert_not_regular("face", r, "FIFO");

    // A sharded UNet whose index names a FIFO as a shard.
    let m = dir.path().join("sharded");
    std::fs::create_dir_all(m.join("unet")).expect("mkdir");
    std::fs::copy(fx("tiny-sd/unet/config.json"), m.join("unet/config.json")).expect("copy");
    std::fs::write(
        m.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        br#"{"weight_map":{"conv_in.weight":"shard-1.safetensors"}}"#,
    )
    .expect("index");
    mkfifo(&m.join("unet/shard-1.safetensors"));
    let r = within_20s("Model::load(sharded with a FIFO)", move || {
        Model::load(&m, Default::default()).map(|_| ())
    });
    assert_not_regular("shard", r, "FIFO");
}

#[test]
fn c_api_model_load_of_a_fifo_returns_an_io_error_at_once() {
    use hdb::ffi::{model as fm, runtime as fr, status::hdb_status};
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("model.safetensors");
    mkfifo(&fifo);
    let status = within_20s("hdb_model_load(FIFO)", move || {
        let path = std::ffi::CString::new(s(&fifo)).expect("path");
        let mut rp = fr::hdb_runtime_params_default();
        rp.device = c"cpu".as_ptr();
        let mut rt = std::ptr::null_mut();
        // SAFETY: valid params and out-pointers; every object is freed below.
        unsafe {
            assert_eq!(fr::hdb_runtime_new(&rp, &mut rt), hdb_status::HDB_STATUS_OK);
            let mut m = std::ptr::null_mut();
            let st = fm::hdb_model_load(rt, path.as_ptr(), std::ptr::null(), &mut m);
            fm::hdb_model_free(m);
            fr::hdb_runtime_free(rt);
            st
        }
    });
    assert_eq!(status, hdb_status::HDB_STATUS_IO_ERROR);
}

#[test]
fn directories_as_weights_or_adapter_files_say_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("adapter.safetensors");
    std::fs::create_dir(&d).expect("mkdir");
    assert_not_regular(
        "directory adapter",
        SafetensorsFile::open(&d).map(|_| ()),
        "a directory",
    );
    let r = hdb(&["adapter", "info", s(&d)]);
    assert_cli_refuses(&r, "is a directory");
    // A directory where a component's weight file should be.
    let m = dir.path().join("model");
    std::fs::create_dir_all(m.join("unet/diffusion_pytorch_model.safetensors")).expect("mkdir");
    std::fs::copy(fx("tiny-sd/unet/config.json"), m.join("unet/config.json")).expect("copy");
    std::fs::write(
        m.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        br#"{"weight_map":{"conv_in.weight":"diffusion_pytorch_model.safetensors"}}"#,
    )
    .expect("index");
    assert_not_regular(
        "directory shard",
        Model::load(&m, Default::default()).map(|_| ()),
        "a directory",
    );
}

// --- Finding 5: files that used to be read silently wrong ------------------------------------

#[test]
fn lora_factors_are_checked_by_shape_and_alpha_is_one_number() {
    let m = model();
    let table = m.adaptable_layers();
    for (file, want) in [
        ("lora-up-transposed.kohya.safetensors", "not [out, 1]"),
        ("lora-alpha-3.kohya.safetensors", "alpha is one number"),
        ("lora-alpha-empty.kohya.safetensors", "alpha is one number"),
    ] {
        let f = SafetensorsFile::open(&hostile(file)).expect("valid safetensors");
        let e = hdb::adapter::load(&f, &table).expect_err(file);
        let msg = e.to_string();
        assert!(msg.contains(file) && msg.contains(want), "{file}: {msg}");
        // `hdb adapter info` checks the same structure without a model.
        let r = hdb(&["adapter", "info", s(&hostile(file))]);
        assert_cli_refuses(&r, want);
    }
    // The fixtures' valid LoRAs still load (their alphas are scalars).
    for file in [
        "adapter/id1.kohya.safetensors",
        "adapter/id1.peft.safetensors",
    ] {
        let f = SafetensorsFile::open(&fx(file)).expect("fixture");
        hdb::adapter::load(&f, &table).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn a_tensor_named_twice_in_a_header_is_refused() {
    let file = hostile("duplicate-names.safetensors");
    let e = SafetensorsFile::open(&file).expect_err("duplicate names");
    let msg = e.to_string();
    assert!(
        msg.contains("duplicate-names.safetensors") && msg.contains("lora_down.weight' twice"),
        "{msg}"
    );
}

#[test]
fn nan_starting_latents_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = hdb(&[
        "generate",
        "--model",
        s(&fx("tiny-sd")),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--latents",
        s(&hostile("latents-nan.safetensors")),
        "-o",
        s(&dir.path().join("x.png")),
    ]);
    assert_cli_refuses(&r, "'latents'");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("NaN") && err.contains("value 0"), "{err}");
    assert!(!dir.path().join("x.png").exists());
}

/// tiny-sd (parts symlinked) whose UNet weight file also holds `extra` tensors.
fn tiny_sd_with_extra_unet_tensors(dir: &Path, extra: &[&str]) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(m.join("unet")).expect("mkdir");
    for part in [
        "text_encoder",
        "vae",
        "tokenizer",
        "scheduler",
        "model_index.json",
    ] {
        std::os::unix::fs::symlink(fx("tiny-sd").join(part), m.join(part)).expect("symlink");
    }
    std::fs::copy(fx("tiny-sd/unet/config.json"), m.join("unet/config.json")).expect("copy");
    let f = SafetensorsFile::open(&fx("tiny-sd/unet/diffusion_pytorch_model.safetensors"))
        .expect("unet");
    let mut entries: Vec<_> = f.tensors().collect();
    entries.sort_by_key(|e| e.start);
    let dtypes: Vec<String> = entries.iter().map(|e| format!("{:?}", e.dtype)).collect();
    let mut tensors: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = entries
        .iter()
        .zip(&dtypes)
        .map(|(e, dt)| {
            let dims = e.shape.dims().iter().map(|&d| d as u64).collect();
            (e.name.as_str(), dt.as_str(), dims, f.data(e).to_vec())
        })
        .collect();
    for name in extra {
        tensors.push((name, "F32", vec![2], vec![0; 8]));
    }
    std::fs::write(
        m.join("unet/diffusion_pytorch_model.safetensors"),
        safetensors(&tensors),
    )
    .expect("write");
    m
}

#[test]
fn unknown_tensors_in_model_files_are_listed_in_the_log_and_by_hdb_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = ["mystery.weight", "down_blocks.0.extra_head.bias"];
    let path = tiny_sd_with_extra_unet_tensors(dir.path(), &extra);
    let logged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = logged.clone();
    hdb::logging::set_sink(
        Some(Box::new(move |_, _, msg| {
            if let Ok(mut v) = sink.lock() {
                v.push(msg.to_string());
            }
        })),
        log::LevelFilter::Warn,
    );
    let m = Model::load(&path, Default::default()).expect("extra tensors are not an error");
    hdb::logging::set_sink(None, log::LevelFilter::Off);
    let log = logged.lock().expect("log").join("\n");
    assert!(
        log.contains("2 tensor(s)") && log.contains("mystery.weight"),
        "log: {log}"
    );
    let unused = hdb::model::unused::unused_tensors(&m);
    let mut want: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(unused.tensors, want);
    assert!(unused.unchecked.is_empty(), "{:?}", unused.unchecked);
    assert_eq!(
        m.describe()["unused_tensors"]["tensors"][0],
        want[0].as_str()
    );
    // The model still works, and the pristine fixture lists nothing.
    hdb::model::unet::Unet::from_model(&m).expect("unet builds");
    assert!(hdb::model::unused::unused_tensors(&model())
        .tensors
        .is_empty());
    let r = hdb(&["info", s(&path)]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success()
            && out.contains("2 tensor(s) read by no component")
            && out.contains("mystery.weight"),
        "{out}"
    );
}

#[test]
fn unknown_keys_of_an_ldm_file_are_listed_but_known_non_weights_are_not() {
    let f = SafetensorsFile::open(&fx("unet/ldm-sd1.safetensors")).expect("ldm");
    let mut entries: Vec<_> = f.tensors().collect();
    entries.sort_by_key(|e| e.start);
    let dtypes: Vec<String> = entries.iter().map(|e| format!("{:?}", e.dtype)).collect();
    let mut tensors: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = entries
        .iter()
        .zip(&dtypes)
        .map(|(e, dt)| {
            let dims = e.shape.dims().iter().map(|&d| d as u64).collect();
            (e.name.as_str(), dt.as_str(), dims, f.data(e).to_vec())
        })
        .collect();
    for name in ["foo.bar", "model_ema.decay", "alphas_cumprod"] {
        tensors.push((name, "F32", vec![2], vec![0; 8]));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ldm.safetensors");
    std::fs::write(&path, safetensors(&tensors)).expect("write");
    let m = Model::load(&path, Default::default()).expect("ldm");
    let u = hdb::model::unused::unused_tensors(&m);
    assert!(u.unchecked.is_empty(), "{:?}", u.unchecked);
    assert_eq!(u.tensors, ["foo.bar"]);
}

// --- Finding 6: files that change under a loaded model ---------------------------------------

/// A real copy of tiny-sd (its UNet file a copy, not a link, so it can be changed).
fn tiny_sd_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(m.join("unet")).expect("mkdir");
    for part in [
        "text_encoder",
        "vae",
        "tokenizer",
        "scheduler",
        "model_index.json",
    ] {
        std::os::unix::fs::symlink(fx("tiny-sd").join(part), m.join(part)).expect("symlink");
    }
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fx("tiny-sd/unet").join(f), m.join("unet").join(f)).expect("copy");
    }
    m
}

fn unet_weights(model_dir: &Path) -> PathBuf {
    model_dir.join("unet/diffusion_pytorch_model.safetensors")
}

/// Overwrites the middle of a file in place (no truncation) with other bytes.
fn rewrite_in_place(path: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(path).expect("stat").len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.seek(SeekFrom::Start(len / 2)).expect("seek");
    f.write_all(&[0x3f; 4096]).expect("write");
}

fn load_with(path: &Path, storage: hdb::io::safetensors::Storage) -> Model {
    Model::load(
        path,
        hdb::model::LoadOptions {
            storage,
            ..Default::default()
        },
    )
    .expect("load")
}

fn unet_output(m: &Model) -> Vec<f32> {
    let f = SafetensorsFile::open(&fx("unet/tiny-sd.in.safetensors")).expect("inputs");
    let (s, sample) = hdb::io::safetensors::read_as_f32(&f, "sample").expect("sample");
    let (_, t) = hdb::io::safetensors::read_as_f32(&f, "timestep").expect("timestep");
    let (c, ctx) = hdb::io::safetensors::read_as_f32(&f, "encoder_hidden_states").expect("context");
    let input = hdb::model::unet::UnetInput {
        sample: &sample,
        timesteps: &t,
        context: &ctx,
        batch: s[0],
        height: s[2],
        width: s[3],
        context_len: c[1],
    };
    hdb::model::unet::Unet::from_model(m)
        .expect("unet")
        .forward(&input)
        .expect("forward")
}

#[test]
fn copied_weights_are_immune_to_the_files_changing_and_mapped_ones_are_not() {
    use hdb::io::safetensors::Storage;
    let want = unet_output(&model());
    assert!(want.iter().all(|x| x.is_finite()));
    // Copied: rewritten in place, then truncated, before the UNet is even built.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny_sd_copy(dir.path());
    let m = load_with(&path, Storage::Copied);
    rewrite_in_place(&unet_weights(&path));
    std::fs::File::options()
        .write(true)
        .open(unet_weights(&path))
        .and_then(|f| f.set_len(0))
        .expect("truncate");
    assert_eq!(
        unet_output(&m),
        want,
        "copied weights changed with the file"
    );
    // Mapped: a rewrite in place reaches the model (documented; the reason COPY exists).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny_sd_copy(dir.path());
    let m = load_with(&path, Storage::Mapped);
    rewrite_in_place(&unet_weights(&path));
    assert_ne!(unet_output(&m), want, "a mapped file rewritten in place");
}

/// With mapped weights, truncating the file under a loaded model is fatal: the kernel sends
/// SIGBUS on the next read of a lost page (the rule the header and README state). Run in a
/// child process, this test's own binary.
#[test]
fn truncating_a_mapped_weights_file_under_a_loaded_model_is_sigbus() {
    const CHILD: &str = "HDB_TEST_TRUNCATE_MAPPED_CHILD";
    if let Some(dir) = std::env::var_os(CHILD) {
        let path = tiny_sd_copy(Path::new(&dir));
        let m = load_with(&path, hdb::io::safetensors::Storage::Mapped);
        std::fs::File::options()
            .write(true)
            .open(unet_weights(&path))
            .and_then(|f| f.set_len(0))
            .expect("truncate");
        let _ = unet_output(&m);
        return; // survived: the parent fails
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "truncating_a_mapped_weights_file_under_a_loaded_model_is_sigbus",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .output()
        .expect("run the child");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "expected SIGBUS, got {:?}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- Finding 9: sizes and messages -----------------------------------------------------------

/// torch's `F.interpolate(x, size=(oh, ow), mode="nearest")`: source index floor(dst * in / out).
fn torch_nearest(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let mut y = Vec::new();
    for p in 0..planes {
        for i in 0..oh {
            for j in 0..ow {
                let (si, sj) = (i * h / oh, j * w / ow);
                y.push(x[(p * h + si) * w + sj]);
            }
        }
    }
    y
}

#[test]
fn upsampling_to_an_odd_skip_size_is_torch_nearest_interpolation() {
    use hdb::backend::{Backend, Cpu};
    for (planes, h, w) in [(3, 5, 4), (2, 1, 1), (1, 9, 7), (4, 2, 3)] {
        let x: Vec<f32> = (0..planes * h * w).map(|i| i as f32).collect();
        let up = Cpu
            .upsample_nearest2x(&x, (planes, h, w))
            .expect("upsample");
        for (oh, ow) in [
            (2 * h - 1, 2 * w),
            (2 * h, 2 * w - 1),
            (2 * h - 1, 2 * w - 1),
        ] {
            let got = Cpu
                .crop_top_left(&up, (planes, 2 * h, 2 * w), (oh, ow))
                .expect("crop");
            assert_eq!(
                got,
                torch_nearest(&x, planes, (h, w), (oh, ow)),
                "{planes}x{h}x{w} -> {oh}x{ow}"
            );
        }
    }
    let e = Cpu
        .crop_top_left(&vec![0.0; 8], (2, 2, 2), (3, 2))
        .expect_err("larger");
    assert!(e.to_string().contains("crop_top_left"), "{e}");
}

#[test]
fn the_unet_takes_latents_that_are_not_multiples_of_its_downsampling() {
    let m = model();
    let unet = hdb::model::unet::Unet::from_model(&m).expect("unet");
    let cdim = unet.config.cross_attention_dim;
    for (h, w) in [(9, 8), (8, 9), (5, 7), (1, 1)] {
        let (b, l) = (2usize, 3usize);
        let sample: Vec<f32> = (0..b * 4 * h * w)
            .map(|i| ((i % 7) as f32 - 3.0) / 3.0)
            .collect();
        let ctx: Vec<f32> = (0..b * l * cdim)
            .map(|i| ((i % 5) as f32 - 2.0) / 2.0)
            .collect();
        let input = hdb::model::unet::UnetInput {
            sample: &sample,
            timesteps: &[500.0, 10.0],
            context: &ctx,
            batch: b,
            height: h,
            width: w,
            context_len: l,
        };
        let out = unet
            .forward(&input)
            .unwrap_or_else(|e| panic!("{h}x{w}: {e}"));
        assert_eq!(out.len(), b * 4 * h * w, "{h}x{w}");
        assert!(
            out.iter().all(|x| x.is_finite()),
            "{h}x{w}: non-finite output"
        );
    }
}

#[test]
fn images_of_72x64_generate_and_sizes_off_the_vae_factor_name_the_side() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = dir.path().join("x.png");
    let r = hdb(&[
        "generate",
        "--model",
        s(&fx("tiny-sd")),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--width",
        "72",
        "--height",
        "64",
        "-o",
        s(&o),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (_, w, h) = hdb::io::png::read_png(&o).expect("png");
    assert_eq!((w, h), (72, 64));
    let r = hdb(&[
        "generate",
        "--model",
        s(&fx("tiny-sd")),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "60",
        "-o",
        s(&o),
    ]);
    assert_cli_refuses(&r, "'height'");
    assert_cli_refuses(&r, "multiple of 8");
}

#[test]
fn random_bytes_named_like_a_checkpoint_are_not_called_a_pickle() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["model.bin", "model.ckpt"] {
        let p = dir.path().join(name);
        std::fs::copy(hostile("random-bytes.bin"), &p).expect("copy");
        let e = Model::load(&p, Default::default()).expect_err(name);
        let msg = e.to_string();
        assert!(
            matches!(e, Error::NotAModel { .. })
                && msg.contains("neither a PyTorch checkpoint nor a safetensors file")
                && !msg.contains("pickle checkpoints are not read"),
            "{name}: {msg}"
        );
        // A real zip or pickle header still gets the pickle message.
        for magic in [&b"PK\x03\x04rest"[..], &b"\x80\x02}q\x00"[..]] {
            std::fs::write(&p, magic).expect("write");
            let e = Model::load(&p, Default::default()).expect_err("pickle");
            assert!(
                e.to_string().contains("pickle checkpoints are not read"),
                "{e}"
            );
        }
    }
}

#[test]
fn saving_into_a_missing_folder_names_the_target_not_a_temporary_file() {
    let m = model();
    let f = SafetensorsFile::open(&fx("adapter/id1.lidb.safetensors")).expect("adapter");
    let a = hdb::adapter::load(&f, &m.adaptable_layers()).expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("no/such/folder/id.lidb.safetensors");
    let e = a.save(&target).expect_err("missing folder");
    let msg = e.to_string();
    assert!(
        msg.contains("no/such/folder/id.lidb.safetensors") && !msg.contains("safetensors.tmp"),
        "{msg}"
    );
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn device_strings_are_exact() {
    use hdb::runtime::DeviceRequest;
    for bad in ["", "cpu ", " cpu", "Cpu", "cuda:+1"] {
        let e = DeviceRequest::parse(bad).expect_err(bad);
        assert!(e.to_string().contains("'device'"), "{bad:?}: {e}");
    }
    let r = hdb(&[
        "predict",
        "--hypernet",
        "x",
        "--model",
        "x",
        "--face",
        "x",
        "-o",
        "x",
        "--device",
        "cpu ",
    ]);
    assert_eq!(r.status.code(), Some(2), "clap refuses the value");
}

/// A panic caught at the C boundary goes to the log callback, not the host's stderr: in the
/// caller's thread and in hdb's worker threads. Run in a child process (this binary) so its
/// stderr can be read.
#[test]
fn caught_panics_are_logged_not_printed_on_stderr() {
    const CHILD: &str = "HDB_TEST_PANIC_ROUTING_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = got.clone();
        hdb::logging::set_sink(
            Some(Box::new(move |lvl, target, msg| {
                if lvl == log::Level::Error {
                    if let Ok(mut v) = sink.lock() {
                        v.push(format!("{target}: {msg}"));
                    }
                }
            })),
            log::LevelFilter::Error,
        );
        use hdb::ffi::boundary::ffi_boundary;
        let st = ffi_boundary("hdb_test_direct", || panic!("direct boom"));
        assert_eq!(st, hdb::ffi::hdb_status::HDB_STATUS_PANIC);
        let rt = hdb::Runtime::new(hdb::RuntimeOptions {
            device: hdb::runtime::DeviceRequest::Cpu,
            threads: 2,
        })
        .expect("runtime");
        let st = ffi_boundary("hdb_test_worker", || {
            use rayon::prelude::*;
            rt.install(|| {
                (0..64).into_par_iter().for_each(|i| {
                    if i == 63 {
                        panic!("worker boom")
                    }
                })
            });
            Ok(())
        });
        assert_eq!(st, hdb::ffi::hdb_status::HDB_STATUS_PANIC);
        hdb::logging::set_sink(None, log::LevelFilter::Off);
        for line in got.lock().expect("log").iter() {
            println!("LOGGED {line}");
        }
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "caught_panics_are_logged_not_printed_on_stderr",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run the child");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    for boom in ["direct boom", "worker boom"] {
        assert!(
            stdout.contains("LOGGED hdb::panic: panic at ") && stdout.contains(boom),
            "'{boom}' not logged:\n{stdout}"
        );
        assert!(
            !stderr.contains(boom),
            "'{boom}' printed on stderr:\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked at"), "{stderr}");
}

// --- Found by fuzzing ---------------------------------------------------------------------

/// The png crate (0.18) panics expanding a palette that is not a whole number of RGB entries.
#[test]
fn a_png_palette_of_49_bytes_is_an_invalid_file_not_a_panic() {
    let file = hostile("png-plte-49-bytes.png");
    let e = hdb::io::png::read_png(&file).expect_err("bad palette");
    assert!(e.to_string().contains("PLTE chunk has 49 bytes"), "{e}");
}
