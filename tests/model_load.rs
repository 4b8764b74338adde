//! Loading the tiny SD fixture (made by tools/make_io_fixtures.py with diffusers) from its
//! diffusers folder, its fp16 variant, one component folder and the LDM single file.

mod common;

use std::path::PathBuf;

use common::{assert_close, Tol};
use hdb::io::diffusers::Variant;
use hdb::io::keymap::Component;
use hdb::model::{Architecture, LoadOptions, Model, SourceFormat};
use hdb::tensor::DType;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn load(p: &str, variant: Variant) -> Model {
    let path = fixture(p);
    Model::load(
        &path,
        LoadOptions {
            variant,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn counts(m: &Model) -> Vec<(Component, usize, u64)> {
    m.components
        .values()
        .map(|c| (c.component, c.weights.len(), c.weights.parameter_count()))
        .collect()
}

#[test]
fn diffusers_folder_loads_all_components() {
    let m = load("tiny-sd", Variant::Auto);
    assert_eq!(m.format, SourceFormat::Diffusers);
    assert_eq!(m.architecture, Architecture::Sd1);
    assert_eq!(m.cross_attention_dim(), Some(16));
    assert!(m.tokenizer.is_some());
    for c in [Component::Unet, Component::TextEncoder, Component::Vae] {
        let cw = m.component(c).unwrap_or_else(|| panic!("{c:?} missing"));
        assert!(cw.weights.parameter_count() > 0);
        assert_eq!(
            cw.main_dtype(),
            Some(DType::F32),
            "{c:?} should prefer the full files"
        );
        assert!(cw.config.is_some(), "{c:?} config.json");
    }
    // SD 1.5's UNet has 16 transformer blocks with 4 attention projections in attn1 and attn2.
    let unet = &m.component(Component::Unet).expect("unet").weights;
    let projections = unet
        .iter()
        .filter(|(k, _)| {
            k.contains(".attn") && (k.ends_with("to_q.weight") || k.ends_with("to_out.0.weight"))
        })
        .count();
    assert_eq!(projections, 16 * 2 * 2);
}

#[test]
fn fp16_variant_loads_in_f16_with_the_same_tensors() {
    let full = load("tiny-sd", Variant::Full);
    let half = load("tiny-sd", Variant::Fp16);
    assert_eq!(counts(&full), counts(&half));
    for cw in half.components.values() {
        assert_eq!(cw.main_dtype(), Some(DType::F16), "{:?}", cw.component);
    }
    // Same values up to f16 rounding.
    let a = full
        .component(Component::Unet)
        .expect("unet")
        .weights
        .to_f32("conv_in.weight")
        .expect("f32");
    let b = half
        .component(Component::Unet)
        .expect("unet")
        .weights
        .to_f32("conv_in.weight")
        .expect("f16");
    assert_close("f16 variant conv_in.weight", &b, &a, Tol::MaxAbs(1e-3));
}

#[test]
fn a_component_folder_loads_alone() {
    let m = load("tiny-sd/unet", Variant::Auto);
    assert_eq!(m.components.len(), 1);
    assert!(m.component(Component::Unet).is_some());
    assert_eq!(m.architecture, Architecture::Sd1);
}

#[test]
fn ldm_single_file_matches_the_diffusers_folder_bit_for_bit() {
    let folder = load("tiny-sd", Variant::Full);
    let single = load("tiny-sd-ldm.safetensors", Variant::Auto);
    assert_eq!(single.format, SourceFormat::LdmSingleFile);
    assert_eq!(single.architecture, Architecture::Sd1);
    assert_eq!(counts(&folder), counts(&single));
    for (c, cw) in &folder.components {
        let other = &single.component(*c).expect("component").weights;
        for (name, w) in cw.weights.iter() {
            let o = other
                .get(name)
                .unwrap_or_else(|| panic!("LDM file lacks {}.{name}", c.name()));
            assert_eq!(w.shape, o.shape, "{}.{name} shape", c.name());
            assert_eq!(
                cw.weights.bytes(w),
                other.bytes(o),
                "{}.{name} bytes",
                c.name()
            );
        }
    }
}

/// The same checkpoint from a caller's bytes (hdb_model_load_from_memory) is the same model,
/// weight for weight, named as the caller says.
#[test]
fn ldm_single_file_from_memory_matches_it_from_disk() {
    let disk = load("tiny-sd-ldm.safetensors", Variant::Auto);
    let bytes = std::fs::read(fixture("tiny-sd-ldm.safetensors")).expect("read the fixture");
    let name = std::path::Path::new("asset://tiny.safetensors");
    let mem =
        Model::load_single_file_bytes(name, bytes, LoadOptions::default()).expect("from memory");
    assert_eq!(mem.format, SourceFormat::LdmSingleFile);
    assert_eq!(mem.architecture, disk.architecture);
    assert_eq!(mem.path, name);
    assert_eq!(counts(&disk), counts(&mem));
    for (c, cw) in &disk.components {
        let other = &mem.component(*c).expect("component").weights;
        for (name, w) in cw.weights.iter() {
            let o = other
                .get(name)
                .unwrap_or_else(|| panic!("{}.{name} missing", c.name()));
            assert_eq!(w.shape, o.shape, "{}.{name} shape", c.name());
            assert_eq!(
                cw.weights.bytes(w),
                other.bytes(o),
                "{}.{name} bytes",
                c.name()
            );
        }
    }
    let truncated =
        std::fs::read(fixture("tiny-sd-ldm.safetensors")).expect("read")[..1000].to_vec();
    let err = Model::load_single_file_bytes(name, truncated, LoadOptions::default())
        .expect_err("truncated");
    assert!(
        err.to_string().contains("asset://tiny.safetensors"),
        "{err}"
    );
}

#[test]
fn progress_is_reported_and_can_cancel() {
    let path = fixture("tiny-sd");
    let mut calls = Vec::new();
    let mut cb = |done: usize, total: usize, _: &std::path::Path| {
        calls.push((done, total));
        true
    };
    Model::load(
        &path,
        LoadOptions {
            variant: Variant::Full,
            progress: Some(&mut cb),
            ..Default::default()
        },
    )
    .expect("load");
    assert_eq!(calls.last(), Some(&(3, 3)), "{calls:?}");
    let mut stop = |_: usize, _: usize, _: &std::path::Path| false;
    let e = Model::load(
        &path,
        LoadOptions {
            variant: Variant::Full,
            progress: Some(&mut stop),
            ..Default::default()
        },
    )
    .expect_err("cancelled");
    assert!(matches!(e, hdb::Error::Cancelled), "{e}");
}

#[test]
fn flat_text_encoder_names_from_transformers_5_are_made_canonical() {
    // transformers >= 5.6 drops CLIPTextModel's `text_model.` level when saving.
    let dir = tempfile::tempdir().expect("tempdir");
    let te = dir.path().join("text_encoder");
    std::fs::create_dir(&te).expect("mkdir");
    let header = r#"{"final_layer_norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 8]);
    std::fs::write(te.join("model.safetensors"), bytes).expect("write");
    let m = Model::load(dir.path(), LoadOptions::default()).expect("load");
    let w = &m
        .component(Component::TextEncoder)
        .expect("text encoder")
        .weights;
    assert!(w.get("text_model.final_layer_norm.weight").is_some());
}
