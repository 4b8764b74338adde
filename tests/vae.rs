//! The CPU VAE against diffusers' `AutoencoderKL` decode and encode on the same weights and
//! inputs (fixtures from tools/make_vae_fixtures.py). Tolerance: max abs error <= 1e-4 x
//! max|ref| per output (f32 compute on both sides); the worst element is printed on failure.

mod common;

use std::path::Path;

use common::{fixtures, Tol};
use hdb::io::diffusers::Variant;
use hdb::io::keymap::Component;
use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::model::vae::{Vae, VaeConfig};
use hdb::model::{LoadOptions, Model};

/// max|hdb - diffusers| <= 1e-4 x max|diffusers|.
const TOL: Tol = Tol::MaxAbsOfRef(1e-4);

/// The named tensors of `vae/<case>.<kind>.safetensors` with their shapes.
fn fixture(case: &str, kind: &str, names: &[&str]) -> Vec<(Vec<usize>, Vec<f32>)> {
    let path = fixtures().join(format!("vae/{case}.{kind}.safetensors"));
    let f =
        SafetensorsFile::open(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    names
        .iter()
        .map(|n| read_as_f32(&f, n).unwrap_or_else(|e| panic!("{case}.{kind} {n}: {e}")))
        .collect()
}

/// The reference's standard deviation: a flat reference would let a flat output pass.
fn std_dev(x: &[f32]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// Asserts max|got - want| <= 1e-4 x max|want| (printing the figures and, on a failure, the
/// worst element) against a reference that is not degenerate.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let std = std_dev(want);
    println!("{what}: reference std {std:.4}");
    assert!(std > 1e-3, "{what}: degenerate reference (std {std:e})");
    common::assert_close(what, got, want, TOL);
}

fn runtime() -> hdb::Runtime {
    hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cpu,
        threads: 2,
    })
    .expect("runtime")
}

fn load(path: &Path, variant: Variant) -> Model {
    Model::load(
        path,
        LoadOptions {
            variant,
            ..Default::default()
        },
    )
    .expect("model")
}

/// Runs decode and encode of fixture `case` on `vae`; returns (image, mean, logvar).
fn check(case: &str, vae: &Vae) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rt = runtime();
    let dec = fixture(case, "decode", &["latents", "image"]);
    let (ls, latents) = &dec[0];
    let image = rt
        .install(|| vae.decode(latents, ls[0], ls[2], ls[3]))
        .expect("decode");
    let (is, want) = &dec[1];
    assert_eq!(
        image.len(),
        is.iter().product::<usize>(),
        "{case}: image size"
    );
    assert_close(&format!("{case} decode"), &image, want);

    let enc = fixture(
        case,
        "encode",
        &["image", "mean", "logvar", "noise", "sample"],
    );
    let (xs, x) = &enc[0];
    let (mean, logvar) = rt
        .install(|| vae.encode(x, xs[0], xs[2], xs[3]))
        .expect("encode");
    assert_close(&format!("{case} encode mean"), &mean, &enc[1].1);
    assert_close(&format!("{case} encode logvar"), &logvar, &enc[2].1);
    let sample = Vae::sample(&mean, &logvar, &enc[3].1).expect("sample");
    assert_close(&format!("{case} encode sample"), &sample, &enc[4].1);
    (image, mean, logvar)
}

#[test]
fn tiny_sd_vae_matches_diffusers() {
    let m = load(&fixtures().join("tiny-sd"), Variant::Full);
    let vae = Vae::from_model(&m).expect("vae");
    assert_eq!(vae.config.block_out_channels, vec![4, 8, 12, 12]);
    assert_eq!(vae.config.downscale(), 8);
    check("tiny-sd", &vae);
}

#[test]
fn fp16_variant_gives_the_same_output() {
    // tools/make_io_fixtures.py rounds the tiny model through f16 before writing the f32
    // files, so both variants hold the same values: this checks the f16 load path.
    let vae = Vae::from_model(&load(&fixtures().join("tiny-sd"), Variant::Fp16)).expect("vae");
    check("tiny-sd", &vae);
}

#[test]
fn ldm_single_file_vae_matches_the_folder() {
    let ldm = load(&fixtures().join("tiny-sd-ldm.safetensors"), Variant::Auto);
    let w = &ldm.component(Component::Vae).expect("vae weights").weights;
    let path = Path::new("tiny-sd-ldm.safetensors");
    // Shapes cannot tell the group count; this tiny VAE's channels are not multiples of SD's 32.
    let e = VaeConfig::infer(w, path).expect_err("groups cannot be inferred");
    assert!(e.to_string().contains("norm_num_groups"), "{e}");
    let e = Vae::from_model(&ldm).expect_err("groups cannot be inferred");
    assert!(e.to_string().contains("norm_num_groups"), "{e}");
    // Everything else is inferred and equals the folder's config.json.
    let folder = load(&fixtures().join("tiny-sd"), Variant::Full);
    let want = Vae::from_model(&folder).expect("folder vae");
    let cfg = VaeConfig::infer_with_groups(w, path, 2).expect("infer");
    assert_eq!(cfg, want.config);
    let vae = Vae::load(cfg, w).expect("ldm vae");
    let (image, mean, logvar) = check("tiny-sd", &vae);
    // Same f32 values under other names (the mid attention's 1x1 convs squeezed): same bits.
    let (fi, fm, fl) = check("tiny-sd", &want);
    assert!(
        image == fi && mean == fm && logvar == fl,
        "LDM and folder outputs differ"
    );
}

#[test]
fn no_quant_convs_and_no_mid_attention_match_diffusers() {
    let m = load(&fixtures().join("vae/noquant"), Variant::Auto);
    let vae = Vae::from_model(&m).expect("vae");
    let c = &vae.config;
    assert!(!c.use_quant_conv && !c.use_post_quant_conv && !c.mid_block_add_attention);
    assert_eq!((c.latent_channels, c.downscale()), (3, 2));
    check("noquant", &vae);
    // Inference from the same weights finds the missing parts missing.
    let w = &m.component(Component::Vae).expect("vae weights").weights;
    let cfg = VaeConfig::infer_with_groups(w, Path::new("noquant"), 2).expect("infer");
    assert_eq!(
        cfg,
        VaeConfig {
            scaling_factor: 0.18215,
            ..c.clone()
        }
    );
}

#[test]
fn a_config_asking_for_absent_weights_names_the_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = fixtures().join("vae/noquant/vae");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    let json = std::fs::read_to_string(src.join("config.json")).expect("config");
    for (from, to, key) in [
        (
            "\"use_quant_conv\": false",
            "\"use_quant_conv\": true",
            "'quant_conv.weight'",
        ),
        (
            "\"mid_block_add_attention\": false",
            "\"mid_block_add_attention\": true",
            "'encoder.mid_block.attentions.0.group_norm.weight'",
        ),
    ] {
        assert!(json.contains(from), "config.json lacks {from}");
        std::fs::write(dir.path().join("config.json"), json.replace(from, to)).expect("write");
        let e = Vae::from_model(&load(dir.path(), Variant::Auto)).expect_err("missing weights");
        assert!(e.to_string().contains(key), "{e}");
    }
}

#[test]
fn wrong_sizes_are_errors_naming_the_argument() {
    let vae = Vae::from_model(&load(&fixtures().join("tiny-sd"), Variant::Full)).expect("vae");
    let e = vae
        .decode(&[0.0; 4 * 8 * 8 - 1], 1, 8, 8)
        .expect_err("short");
    let s = e.to_string();
    assert!(s.contains("'latents'") && s.contains("[1, 4, 8, 8]"), "{s}");
    let e = vae
        .encode(&[0.0; 3 * 60 * 64], 1, 60, 64)
        .expect_err("60 % 8");
    let s = e.to_string();
    assert!(s.contains("'image'") && s.contains("multiples of 8"), "{s}");
    let e = vae
        .encode(&[0.0; 3 * 64 * 64], 2, 64, 64)
        .expect_err("batch");
    assert!(e.to_string().contains("[2, 3, 64, 64]"), "{e}");
}
