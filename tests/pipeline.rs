//! The whole text-to-image path against diffusers' StableDiffusionPipeline on the tiny SD
//! fixture, from the same latents (tools/make_pipeline_fixtures.py): images as floats in
//! [0, 1] within 1e-3 (before 8-bit quantization), final latents within 1e-4 x max|ref|.

mod common;

use std::path::PathBuf;

use common::{assert_close, Tol};
use hdb::adapter::apply::{Applied, ApplyMode};
use hdb::adapter::{adaptable_layers, Adapter};
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::scheduler::SamplerKind;
use hdb::model::Model;
use hdb::pipeline::{GenerateAdapters, GenerateParams, Pipeline};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn setup() -> (Model, Pipeline) {
    let m = Model::load(&fx("tiny-sd"), Default::default()).expect("model");
    let p = Pipeline::from_model(&m).expect("pipeline");
    (m, p)
}

fn params(sampler: SamplerKind, batch: usize) -> GenerateParams {
    let latents = SafetensorsFile::open(&fx("pipeline/latents.safetensors"))
        .expect("latents")
        .to_f32("latents")
        .expect("f32");
    let n = latents.len() / 2 * batch;
    GenerateParams {
        prompt: "a photo of sks person".into(),
        negative_prompt: "blurry, low quality".into(),
        steps: 4,
        guidance: 7.5,
        sampler,
        seed: 0,
        width: 64,
        height: 64,
        batch,
        latents: Some(latents[..n].to_vec()),
    }
}

fn check(case: &str, got_pixels: &[f32], got_latents: &[f32]) {
    let f = SafetensorsFile::open(&fx(&format!("pipeline/{case}.safetensors"))).expect("reference");
    let (want_px, want_lat) = (
        f.to_f32("images").expect("images"),
        f.to_f32("latents").expect("latents"),
    );
    assert_close(
        &format!("{case}: pixels"),
        got_pixels,
        &want_px,
        Tol::MaxAbs(1e-3),
    );
    assert_close(
        &format!("{case}: latents"),
        got_latents,
        &want_lat,
        Tol::MaxAbsOfRef(1e-4),
    );
}

#[test]
fn samplers_match_diffusers_from_the_same_latents() {
    let (_m, p) = setup();
    for (case, kind) in [
        ("ddim", SamplerKind::Ddim),
        ("euler", SamplerKind::Euler),
        ("dpmpp_2m", SamplerKind::DpmPp2M),
        ("dpmpp_2m_karras", SamplerKind::DpmPp2MKarras),
    ] {
        let out = p
            .generate(&params(kind, 2), GenerateAdapters::default(), None)
            .expect("generate");
        check(case, &out.pixels, &out.latents);
        assert_eq!(out.images.len(), 2);
        assert_eq!(out.images[0].len(), 64 * 64 * 3);
    }
}

fn identities(m: &Model) -> Adapter {
    let table = adaptable_layers(m);
    let load = |p: &str| {
        hdb::adapter::load(&SafetensorsFile::open(&fx(p)).expect("file"), &table).expect("adapter")
    };
    let mut both = load("adapter/id1.lidb.safetensors");
    both.layers
        .extend(load("text_encoder/te-id.lidb.safetensors").layers);
    both
}

#[test]
fn identities_on_unet_and_text_encoder_match_diffusers() {
    let (m, p) = setup();
    let both = identities(&m);
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let (unet, device_unet) = p.unet_adapters(&[(&both, 1.0)], mode).expect("unet set");
        assert!(
            device_unet.is_none(),
            "a CPU pipeline's UNet set is on the host"
        );
        let unet = unet.expect("host set");
        let (te, device_te) = p.text_adapters(&[(&both, 1.0)], mode).expect("te set");
        assert!(
            device_te.is_none(),
            "a CPU pipeline's text encoder set is on the host"
        );
        let ad = GenerateAdapters {
            unet: Some(&unet),
            text_encoder: te.as_ref(),
            per_image: None,
            ..Default::default()
        };
        let out = p
            .generate(&params(SamplerKind::Ddim, 2), ad, None)
            .expect("generate");
        check("ddim-id", &out.pixels, &out.latents);
    }
}

#[test]
fn one_identity_per_image_matches_separate_runs() {
    let (m, p) = setup();
    let both = identities(&m);
    let cpu_unet = p.unet.as_deref().expect("a CPU pipeline has its UNet");
    let unet = Applied::new(&[(&both, 1.0)], ApplyMode::Runtime, cpu_unet).expect("unet set");
    let cpu_te = p
        .text_encoder
        .as_ref()
        .expect("a CPU pipeline has its text encoder");
    let te = Applied::new(&[(&both, 1.0)], ApplyMode::Runtime, cpu_te).expect("te set");
    let ad = GenerateAdapters {
        unet: Some(&unet),
        text_encoder: Some(&te),
        per_image: Some(&[-1, 0]),
        ..Default::default()
    };
    let out = p
        .generate(&params(SamplerKind::Ddim, 2), ad, None)
        .expect("generate");
    check("ddim-per-image", &out.pixels, &out.latents);
}

#[test]
fn bad_parameters_are_clear_errors_and_cancel_is_prompt() {
    let (_m, p) = setup();
    let none = GenerateAdapters::default();
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.width = 60;
    let e = p.generate(&bad, none, None).expect_err("size");
    assert!(e.to_string().contains("multiples of 8"), "{e}");
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.steps = 0;
    assert!(p
        .generate(&bad, none, None)
        .expect_err("steps")
        .to_string()
        .contains("steps"));
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.guidance = f32::NAN;
    assert!(p
        .generate(&bad, none, None)
        .expect_err("guidance")
        .to_string()
        .contains("'guidance'"));
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.latents = Some(vec![0.0; 3]);
    assert!(p
        .generate(&bad, none, None)
        .expect_err("latents")
        .to_string()
        .contains("'latents'"));
    let mut calls = 0;
    let mut cancel = |_: usize, _: usize| {
        calls += 1;
        false
    };
    let e = p
        .generate(&params(SamplerKind::Ddim, 1), none, Some(&mut cancel))
        .expect_err("cancelled");
    assert!(
        matches!(e, hdb::Error::Cancelled) && calls == 1,
        "{e} after {calls} calls"
    );
    // Still usable afterwards.
    p.generate(&params(SamplerKind::Ddim, 1), none, None)
        .expect("after cancel");
    // Prompts of any length and content.
    let mut long = params(SamplerKind::Ddim, 1);
    long.prompt = "a very long prompt \u{1F600}\u{0000} ".repeat(200);
    p.generate(&long, none, None).expect("long prompt");
}

#[test]
fn seeded_noise_is_reproducible() {
    let (_m, p) = setup();
    let mut a = params(SamplerKind::EulerAncestral, 1);
    a.latents = None;
    a.seed = 42;
    let x = p
        .generate(&a, GenerateAdapters::default(), None)
        .expect("first");
    let y = p
        .generate(&a, GenerateAdapters::default(), None)
        .expect("second");
    assert_eq!(x.images, y.images);
    a.seed = 43;
    let z = p
        .generate(&a, GenerateAdapters::default(), None)
        .expect("other seed");
    assert_ne!(x.images, z.images);
}
