//! What each fuzz target does with its input, shared by the libFuzzer targets
//! (`fuzz/fuzz_targets/*.rs`) and by `tests/fuzz_corpus.rs`, which replays the committed
//! corpora and the fixture seeds as ordinary tests (so `cargo test` covers them without
//! libFuzzer). Every function must return for any input: an `Err` is a refusal, a panic or a
//! crash is a bug. Included with `#[path]`; it uses only hdb's public API.
//!
//! Inputs that describe several files (a model folder, a tokenizer folder) are records:
//! `[name: u8][len: u32 little-endian][len bytes]...`, the name an index into the target's file
//! list; `scripts/fuzz-seeds.py` writes the fixtures in this form.

#![allow(dead_code)] // each includer uses its own part

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hdb::adapter::apply::{Applied, ApplyMode};
use hdb::adapter::{lidb::Lidb, lora, LayerShape};
use hdb::io::safetensors::{parse_header, read_as_f32, SafetensorsFile};
use hdb::model::unet::Unet;
use hdb::model::Model;

/// `tests/fixtures` seen from the crate that includes this file (the root or `fuzz/`).
pub fn fixtures() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let direct = here.join("tests/fixtures");
    if direct.is_dir() {
        direct
    } else {
        here.join("../tests/fixtures")
    }
}

/// The tiny SD model of the fixtures, loaded once.
fn tiny() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd fixture")
    })
}

fn tiny_table() -> &'static std::collections::BTreeMap<String, LayerShape> {
    static T: OnceLock<std::collections::BTreeMap<String, LayerShape>> = OnceLock::new();
    T.get_or_init(|| tiny().adaptable_layers())
}

/// The tiny model's UNet on the CPU, built once.
fn tiny_unet() -> &'static Unet {
    static U: OnceLock<Unet> = OnceLock::new();
    U.get_or_init(|| Unet::from_model(tiny()).expect("tiny UNet"))
}

/// A CPU session on the tiny model (its engine loads the fixture again: an engine owns its
/// model), behind a lock so any thread can use it.
fn tiny_session() -> &'static std::sync::Mutex<hdb::Session> {
    static S: OnceLock<std::sync::Mutex<hdb::Session>> = OnceLock::new();
    S.get_or_init(|| {
        let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
        let rt = hdb::Runtime::new(Default::default()).expect("runtime");
        let engine = std::sync::Arc::new(hdb::Engine::new(std::sync::Arc::new(rt), m));
        std::sync::Mutex::new(hdb::Session::new(engine))
    })
}

/// What hdb_model_load checks beyond the folder's files: every component built, the
/// VAE, scheduler and tokenizer read (an engine builds them on first use).
fn build_all(m: Model) {
    let Ok(rt) = hdb::Runtime::new(Default::default()) else {
        return;
    };
    let e = hdb::Engine::new(std::sync::Arc::new(rt), m);
    let _ = e.unet_config();
    let _ = e.vae_config();
    let _ = e.scheduler();
    let _ = e.tokenizer();
}

/// A private scratch folder for targets that must go through files, emptied per input.
fn scratch(name: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("hdb-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Splits record input into (name index, bytes).
pub fn records(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 5 {
        let name = data[0];
        let len = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let rest = &data[5..];
        let len = len.min(rest.len());
        out.push((name, &rest[..len]));
        data = &rest[len..];
    }
    out
}

/// Writes records into `dir` under `names[name % names.len()]` (sub-folders made as needed).
fn write_records(dir: &Path, data: &[u8], names: &[&str]) {
    for (name, bytes) in records(data) {
        let path = dir.join(names[name as usize % names.len()]);
        if let Some(p) = path.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        let _ = std::fs::write(path, bytes);
    }
}

// --- targets ----------------------------------------------------------------------------------

/// Any bytes as a safetensors file: the header, then every tensor read as f32.
pub fn safetensors(data: &[u8]) {
    let _ = parse_header(Path::new("fuzz.safetensors"), data);
    let Ok(f) = SafetensorsFile::from_vec(Path::new("fuzz.safetensors"), data.to_vec()) else {
        return;
    };
    let names: Vec<String> = f.tensors().map(|e| e.name.clone()).collect();
    for n in &names {
        let _ = read_as_f32(&f, n);
    }
}

/// Any bytes as an adapter file for the tiny model (LiDB v1/v2, kohya or PEFT LoRA): parsed,
/// composed, and when it loads, applied in both modes.
pub fn adapter(data: &[u8]) {
    let Ok(f) = SafetensorsFile::from_vec(Path::new("fuzz.safetensors"), data.to_vec()) else {
        return;
    };
    let _ = lora::read_layers(&f);
    let _ = Lidb::from_safetensors(&f);
    let Ok(a) = hdb::adapter::load(&f, tiny_table()) else {
        return;
    };
    let unet = tiny_unet();
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let _ = Applied::new(&[(&a, 0.5)], mode, unet);
    }
}

/// Any bytes as a hypernetwork config (the JSON of a v1 file's metadata).
pub fn hypernet_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = hdb::hypernet::HypernetConfig::from_json(text, Path::new("fuzz.json")) {
        let _ = c.parameter_count();
        let _ = c.to_json();
    }
}

/// Any bytes as a hypernetwork file (through a file: the loader maps it); a network that
/// loads and is small predicts once for the tiny model.
pub fn hypernet(data: &[u8]) {
    let dir = scratch("hypernet");
    let path = dir.join("net.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(net) = hdb::hypernet::Hypernet::load(&path) else {
        return;
    };
    let c = &net.config;
    if c.img_size() > 64 || c.parameter_count() > 1 << 20 || c.iterations > 4 {
        return;
    }
    let s = c.img_size();
    let Ok(image) = net.preprocess(&vec![128u8; 3 * 16 * 16], 16, 16, 48) else {
        return;
    };
    assert_eq!(image.len(), 3 * s * s);
    if net.check_layers(tiny_table()).is_ok() {
        if let Ok(theta) = net.predict(&image, Some(1), None) {
            if let Ok(l) = net.to_lidb(&theta) {
                let _ = l.compose(tiny_table());
            }
        }
    }
}

/// Any bytes as a component config (`config.json` of a UNet, VAE or text encoder) and as a
/// scheduler config; a scheduler that parses runs a few steps on a small sample.
pub fn configs(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let p = Path::new("config.json");
    let _ = hdb::model::config::UnetConfig::from_json(&v, p);
    let _ = hdb::model::vae::VaeConfig::from_json(&v, p);
    let _ = hdb::model::text_encoder::TextEncoderConfig::from_json(&v, p);
    let Ok(s) = hdb::model::scheduler::SchedulerConfig::from_json(&v, p) else {
        return;
    };
    let steps = 1 + data.len() % 7;
    for kind in hdb::model::scheduler::SamplerKind::ALL {
        let Ok(mut sched) = hdb::model::scheduler::make(kind, &s, steps) else {
            continue;
        };
        let mut x = vec![0.5f32; 16];
        let mut noise = |n: usize| vec![0.1f32; n];
        for i in 0..sched.timesteps().len() {
            let _ = sched.scale_model_input(&x, i);
            match sched.step(&[0.2f32; 16], i, &x, &mut noise) {
                Ok(y) => x = y,
                Err(_) => break,
            }
        }
    }
}

/// The files a model-folder input may write.
pub const FOLDER_FILES: &[&str] = &[
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/shard-1.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
];

/// A model: byte 0 even, the rest are records of a diffusers folder ([`FOLDER_FILES`]); odd,
/// the rest is one LDM single file. What loads is described, checked for unused tensors and,
/// when small, built into a pipeline.
pub fn model_folder(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch("model");
    let path = if mode % 2 == 0 {
        write_records(&dir, rest, FOLDER_FILES);
        dir.clone()
    } else {
        let p = dir.join("model.safetensors");
        if std::fs::write(&p, rest).is_err() {
            return;
        }
        p
    };
    let Ok(m) = Model::load(&path, Default::default()) else {
        return;
    };
    let _ = m.describe();
    let _ = hdb::model::unused::unused_tensors(&m);
    let _ = m.adaptable_layers();
    let params: u64 = m.components.values().map(|c| c.summary().parameters).sum();
    if params < 1 << 20 {
        let _ = hdb::model::text_encoder::TextEncoder::from_model(&m);
        build_all(m);
    }
}

/// Newline-separated tensor names as the keys of an LDM checkpoint: the layout inferred, each
/// key mapped to its diffusers name and back.
pub fn ldm_keys(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let keys: Vec<&str> = text.lines().collect();
    let Ok(layout) = hdb::io::keymap::LdmLayout::infer(keys.iter().copied()) else {
        return;
    };
    for k in keys {
        if let Ok(Some(m)) = hdb::io::keymap::ldm_to_diffusers(k, &layout) {
            let _ = hdb::io::keymap::diffusers_to_ldm(m.component, &m.name, &layout);
        }
    }
}

/// The files a tokenizer input may write; record 5 is the prompt.
pub const TOKENIZER_FILES: &[&str] = &[
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "prompt",
];

/// A tokenizer folder (records, [`TOKENIZER_FILES`]) read and used on the prompt record.
pub fn tokenizer(data: &[u8]) {
    let dir = scratch("tokenizer");
    write_records(&dir, data, TOKENIZER_FILES);
    let prompt = std::fs::read(dir.join("prompt")).unwrap_or_default();
    let Ok(t) = hdb::model::tokenizer::ClipTokenizer::from_folder(&dir) else {
        return;
    };
    let prompt = String::from_utf8_lossy(&prompt);
    let ids = t.encode_padded(&prompt);
    assert_eq!(ids.len(), t.max_len());
    let _ = t.encode(&prompt);
}

/// Any bytes as a PNG face image: decoded and preprocessed for a 32 px network.
pub fn png(data: &[u8]) {
    let Ok((rgb, w, h)) = hdb::io::png::decode_png(data, Path::new("face.png")) else {
        return;
    };
    let _ = hdb::hypernet::preprocess::preprocess(&rgb, w, h, w * 3, 32, [0.5; 3], [0.25; 3]);
}

/// Any bytes as the CLI's input files: `hdb unet --input` (run on the tiny UNet when it fits
/// and is small) and `hdb generate --latents` (one step on the tiny pipeline when small).
pub fn cli_inputs(data: &[u8]) {
    let Ok(f) = SafetensorsFile::from_vec(Path::new("input.safetensors"), data.to_vec()) else {
        return;
    };
    if let Ok(ins) = hdb::io::inputs::UnetInputs::read(&f) {
        let unet = tiny_unet();
        let fits = ins.channels == unet.config.in_channels
            && ins.context_dim == unet.config.cross_attention_dim;
        if fits && ins.batch * ins.height * ins.width <= 1024 && ins.context_len <= 77 {
            let x = hdb::model::unet::UnetInput {
                sample: &ins.sample,
                timesteps: &ins.timesteps,
                context: &ins.context,
                batch: ins.batch,
                height: ins.height,
                width: ins.width,
                context_len: ins.context_len,
            };
            let _ = unet.forward(&x);
        }
    }
    // As hdb generate --latents reads them.
    if let Ok((shape, v)) = read_as_f32(&f, "latents") {
        let batch = shape.first().copied().unwrap_or(1);
        if v.len() > 2 * 4 * 8 * 8 || batch > 2 {
            return;
        }
        let p = hdb::pipeline::GenerateParams {
            steps: 1,
            width: 64,
            height: 64,
            batch,
            latents: Some(v),
            ..Default::default()
        };
        if let Ok(s) = tiny_session().lock() {
            let _ = s.generate(&p, None);
        }
    }
}

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("safetensors", safetensors),
    ("lidb", adapter),
    ("lora", adapter),
    ("hypernet_config", hypernet_config),
    ("hypernet", hypernet),
    ("configs", configs),
    ("model_folder", model_folder),
    ("ldm_keys", ldm_keys),
    ("tokenizer", tokenizer),
    ("png", png),
    ("cli_inputs", cli_inputs),
];
