//! The whole text-to-image path against diffusers' StableDiffusionPipeline on the tiny SD
//! fixture, from the same latents (tools/make_pipeline_fixtures.py): images as floats in
//! [0, 1] within 1e-3 (before 8-bit quantization), final latents within 1e-4 x max|ref|.

mod common;

use std::path::PathBuf;

use std::sync::Arc;

use common::{assert_close, Tol};
use hdb::adapter::apply::ApplyMode;
use hdb::adapter::Adapter;
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::scheduler::SamplerKind;
use hdb::model::Model;
use hdb::pipeline::GenerateParams;
use hdb::runtime::{DeviceRequest, Runtime, RuntimeOptions};
use hdb::{Engine, Session};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// A CPU session on the tiny model.
fn setup() -> Session {
    let m = Model::load(&fx("tiny-sd"), Default::default()).expect("model");
    let rt = Runtime::new(RuntimeOptions {
        device: DeviceRequest::Cpu,
        threads: 0,
    })
    .expect("runtime");
    Session::new(Arc::new(Engine::new(Arc::new(rt), m)))
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
    let p = setup();
    for (case, kind) in [
        ("ddim", SamplerKind::Ddim),
        ("euler", SamplerKind::Euler),
        ("dpmpp_2m", SamplerKind::DpmPp2M),
        ("dpmpp_2m_karras", SamplerKind::DpmPp2MKarras),
    ] {
        let out = p.generate(&params(kind, 2), None).expect("generate");
        check(case, &out.pixels, &out.latents);
        assert_eq!(out.images.len(), 2);
        assert_eq!(out.images[0].len(), 64 * 64 * 3);
    }
}

fn identities(s: &Session) -> Adapter {
    let load = |p: &str| {
        s.engine()
            .load_adapter(&SafetensorsFile::open(&fx(p)).expect("file"))
            .expect("adapter")
    };
    let mut both = load("adapter/id1.lidb.safetensors");
    both.layers
        .extend(load("text_encoder/te-id.lidb.safetensors").layers);
    both
}

#[test]
fn identities_on_unet_and_text_encoder_match_diffusers() {
    let mut p = setup();
    let both = identities(&p);
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        p.set_adapters(&[(&both, 1.0)], mode).expect("set");
        let out = p
            .generate(&params(SamplerKind::Ddim, 2), None)
            .expect("generate");
        check("ddim-id", &out.pixels, &out.latents);
    }
}

#[test]
fn one_identity_per_image_matches_separate_runs() {
    let mut p = setup();
    let both = identities(&p);
    p.set_adapters(&[(&both, 1.0)], ApplyMode::Runtime)
        .expect("set");
    p.set_sample_adapters(Some(vec![-1, 0])).expect("indices");
    let out = p
        .generate(&params(SamplerKind::Ddim, 2), None)
        .expect("generate");
    check("ddim-per-image", &out.pixels, &out.latents);
    let e = p
        .generate(&params(SamplerKind::Ddim, 1), None)
        .expect_err("2 indices for a batch of 1");
    assert!(e.to_string().contains("'adapter_index'"), "{e}");
}

#[test]
fn bad_parameters_are_clear_errors_and_cancel_is_prompt() {
    let p = setup();
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.width = 60;
    let e = p.generate(&bad, None).expect_err("size");
    assert!(e.to_string().contains("multiples of 8"), "{e}");
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.steps = 0;
    assert!(p
        .generate(&bad, None)
        .expect_err("steps")
        .to_string()
        .contains("steps"));
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.guidance = f32::NAN;
    assert!(p
        .generate(&bad, None)
        .expect_err("guidance")
        .to_string()
        .contains("'guidance'"));
    let mut bad = params(SamplerKind::Ddim, 2);
    bad.latents = Some(vec![0.0; 3]);
    assert!(p
        .generate(&bad, None)
        .expect_err("latents")
        .to_string()
        .contains("'latents'"));
    let mut calls = 0;
    let mut cancel = |_: usize, _: usize| {
        calls += 1;
        false
    };
    let e = p
        .generate(&params(SamplerKind::Ddim, 1), Some(&mut cancel))
        .expect_err("cancelled");
    assert!(
        matches!(e, hdb::Error::Cancelled) && calls == 1,
        "{e} after {calls} calls"
    );
    // Still usable afterwards.
    p.generate(&params(SamplerKind::Ddim, 1), None)
        .expect("after cancel");
    // Prompts of any length and content.
    let mut long = params(SamplerKind::Ddim, 1);
    long.prompt = "a very long prompt \u{1F600}\u{0000} ".repeat(200);
    p.generate(&long, None).expect("long prompt");
}

#[test]
fn seeded_noise_is_reproducible() {
    let p = setup();
    let mut a = params(SamplerKind::EulerAncestral, 1);
    a.latents = None;
    a.seed = 42;
    let x = p.generate(&a, None).expect("first");
    let y = p.generate(&a, None).expect("second");
    assert_eq!(x.images, y.images);
    a.seed = 43;
    let z = p.generate(&a, None).expect("other seed");
    assert_ne!(x.images, z.images);
}
