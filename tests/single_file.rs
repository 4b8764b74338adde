//! LDM single-file checkpoints generate out of the box: `hdb generate` on one (no tokenizer in
//! it, so hdb's built-in CLIP ViT-L/14 tokenizer) equals diffusers'
//! `StableDiffusionPipeline.from_single_file` from the same latents; `--tokenizer` and
//! `hdb_model_params.tokenizer` override it. Fixtures: tools/make_single_file_fixtures.py (the
//! checkpoint as a recipe, written here, and diffusers' outputs).

mod common;

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_close, fixtures, Tol};
use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::rng::SplitMix64;
use serde_json::Value;

fn fx(p: &str) -> PathBuf {
    fixtures().join("single-file").join(p)
}

fn fnv1a64_update(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001B3);
    }
    h
}

/// Writes the checkpoint of `recipe.json` (see tools/make_single_file_fixtures.py): element i of
/// an F16 tensor K is offset + scale * (2 k_i - 127) / 128, k_i the top 7 bits of the i-th
/// splitmix64 output of a stream started at fnv1a64(K); I64 tensors count 0, 1, ... Checks the
/// bytes against the tool's hash.
fn write_checkpoint(out: &Path) {
    let text = std::fs::read_to_string(fx("recipe.json")).expect("recipe.json");
    let recipe: Value = serde_json::from_str(&text).expect("recipe JSON");
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut hash = 0xCBF29CE484222325u64;
    for t in recipe["tensors"].as_array().expect("tensors") {
        let name = t["name"].as_str().expect("name");
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        let n: usize = shape.iter().product();
        let start = data.len();
        match t["dtype"].as_str().expect("dtype") {
            "F16" => {
                let (offset, scale) = (
                    t["offset"].as_f64().expect("offset"),
                    t["scale"].as_f64().expect("scale"),
                );
                let mut rng = SplitMix64(hdb::rng::fnv1a64(name));
                for _ in 0..n {
                    let k = (rng.next_u64() >> 57) as f64;
                    // Exact in f64 and in f16 (the recipe's 128 levels): no rounding to agree on.
                    let v = half::f16::from_f64(offset + scale * (2.0 * k - 127.0) / 128.0);
                    data.extend_from_slice(&v.to_le_bytes());
                }
            }
            "I64" => (0..n as i64).for_each(|i| data.extend_from_slice(&i.to_le_bytes())),
            d => panic!("{name}: dtype {d} is not in the recipe's vocabulary"),
        }
        hash = fnv1a64_update(hash, &data[start..]);
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": t["dtype"], "shape": shape, "data_offsets": [start, data.len()],
            }),
        );
    }
    let want: u64 = recipe["data_fnv1a64"]
        .as_str()
        .expect("data_fnv1a64")
        .parse()
        .expect("u64");
    assert_eq!(
        hash, want,
        "the checkpoint written from recipe.json differs from the one the tool gave diffusers"
    );
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = Value::Object(header).to_string().into_bytes();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(out, file).expect("write the checkpoint");
}

fn hdb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hdb"))
}

fn reference(key: &str) -> Vec<f32> {
    let f = SafetensorsFile::open(&fx("reference.safetensors")).expect("reference");
    read_as_f32(&f, key).expect(key).1
}

fn png_pixels(path: &Path) -> Vec<f32> {
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).expect("png"),
    ));
    let mut reader = dec.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    buf[..info.buffer_size()]
        .iter()
        .map(|&b| f32::from(b))
        .collect()
}

const PROMPT: &str = "a photo of sks person, highly detailed";

fn generate(model: &Path, dir: &Path, extra: &[&str]) -> (std::process::Output, PathBuf, PathBuf) {
    let (img, dump) = (dir.join("img.png"), dir.join("latents.safetensors"));
    let r = hdb()
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", PROMPT, "--negative", "blurry", "--steps", "4"])
        .args(["--sampler", "dpmpp_2m", "--guidance", "7.5"])
        .args(["--width", "16", "--height", "16", "--latents"])
        .arg(fx("reference.safetensors"))
        .arg("--dump-latents")
        .arg(&dump)
        .args(extra)
        .arg("-o")
        .arg(&img)
        .output()
        .expect("run hdb");
    (r, img, dump)
}

#[test]
fn single_file_generates_as_diffusers_from_single_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("tiny-sd1.safetensors");
    write_checkpoint(&ckpt);

    // The built-in tokenizer is the one the pipeline used.
    let r = hdb()
        .args(["tokenize", "--padded", "--model"])
        .arg(&ckpt)
        .args(["--", PROMPT])
        .output()
        .expect("run hdb tokenize");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ids: Vec<f32> = String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .map(|t| t.parse::<u32>().expect("id") as f32)
        .collect();
    assert_eq!(ids, reference("input_ids"), "token ids of '{PROMPT}'");

    let (r, img, dump) = generate(&ckpt, dir.path(), &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = SafetensorsFile::open(&dump)
        .expect("dump")
        .to_f32("latents")
        .expect("latents");
    // The pipeline's f32 tolerance (tests/cli_generate.rs): 4 steps of a UNet in f32.
    assert_close(
        "denoised latents",
        &got,
        &reference("out_latents"),
        Tol::MaxAbsOfRef(1e-4),
    );
    // Pixels: rounding to u8 (0.5) plus the float images' difference (<< 0.01 of a level).
    let want: Vec<f32> = reference("images").iter().map(|v| v * 255.0).collect();
    assert_close(
        "image (0..255)",
        &png_pixels(&img),
        &want,
        Tol::MaxAbs(0.51),
    );
}

#[test]
fn tokenizer_argument_overrides_the_built_in_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("tiny-sd1.safetensors");
    write_checkpoint(&ckpt);
    // tiny-sd's own small vocabulary tokenizes the prompt differently: other latents.
    let (r, _, dump) = generate(
        &ckpt,
        dir.path(),
        &[
            "--tokenizer",
            fixtures().join("tiny-sd").to_str().expect("utf-8"),
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = SafetensorsFile::open(&dump)
        .expect("dump")
        .to_f32("latents")
        .expect("latents");
    let want = reference("out_latents");
    let change = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        change > 1e-2,
        "--tokenizer changed the latents by only {change}: was it used?"
    );
    // A path that holds no tokenizer is refused, naming it.
    let bad = dir.path().join("no-tokenizer-here");
    std::fs::create_dir(&bad).expect("mkdir");
    let (r, _, _) = generate(
        &ckpt,
        dir.path(),
        &["--tokenizer", bad.to_str().expect("utf-8")],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("no-tokenizer-here"),
        "{err}"
    );
}

#[test]
fn c_api_model_params_tokenizer() {
    use hdb::ffi::hdb_status;
    use hdb::ffi::model::*;
    use hdb::ffi::runtime::*;

    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("tiny-sd1.safetensors");
    write_checkpoint(&ckpt);
    let ckpt = CString::new(ckpt.to_str().expect("utf-8")).expect("no NUL");
    let tiny = CString::new(fixtures().join("tiny-sd").to_str().expect("utf-8")).expect("no NUL");
    let bad = CString::new(dir.path().to_str().expect("utf-8")).expect("no NUL");
    let mut rp = hdb_runtime_params_default();
    rp.device = c"cpu".as_ptr();
    let mut rt = std::ptr::null_mut();
    // SAFETY: valid params and out pointer.
    assert_eq!(
        unsafe { hdb_runtime_new(&rp, &mut rt) },
        hdb_status::HDB_STATUS_OK
    );
    let has_tokenizer = |tok: Option<&CStr>| -> Result<u32, String> {
        let mut p = hdb_model_params_default();
        p.tokenizer = tok.map_or(std::ptr::null(), CStr::as_ptr);
        let mut m = std::ptr::null_mut();
        // SAFETY: live runtime, NUL-terminated paths, valid out pointers.
        let s = unsafe { hdb_model_load(rt, ckpt.as_ptr(), &p, &mut m) };
        if s != hdb_status::HDB_STATUS_OK {
            // SAFETY: a NUL-terminated thread-local string.
            let msg = unsafe { CStr::from_ptr(hdb::ffi::boundary::hdb_last_error_message()) };
            return Err(format!("{s:?}: {}", msg.to_string_lossy()));
        }
        let mut info: hdb_model_info = unsafe { std::mem::zeroed() };
        info.struct_size = std::mem::size_of::<hdb_model_info>() as u32;
        // SAFETY: live model, sized info.
        let s = unsafe { hdb_model_get_info(m, &mut info) };
        // SAFETY: loaded above, freed once.
        unsafe { hdb_model_free(m) };
        assert_eq!(s, hdb_status::HDB_STATUS_OK);
        Ok(info.has_tokenizer)
    };
    assert_eq!(has_tokenizer(None), Ok(0), "an LDM file has no tokenizer");
    assert_eq!(has_tokenizer(Some(&tiny)), Ok(1), "params.tokenizer");
    let err = has_tokenizer(Some(&bad)).expect_err("a folder without a tokenizer");
    assert!(
        err.contains("NOT_A_MODEL") && err.contains(bad.to_str().expect("utf-8")),
        "{err}"
    );
    // SAFETY: created above.
    unsafe { hdb_runtime_free(rt) };
}
