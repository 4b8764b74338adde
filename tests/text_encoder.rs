//! The CLIP text encoder against transformers' CLIPTextModel on the tiny SD fixture, with and
//! without a text-encoder identity (both apply modes; reference: the model with W + dW merged,
//! which diffusers' own LoRA loading reproduces to 4e-7; tools/make_text_encoder_fixtures.py).
//! Tolerance: 1e-4 x max|reference|.

mod common;

use std::path::PathBuf;

use common::{assert_close, Tol};
use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::model::text_encoder::TextEncoder;
use hdb::model::Model;

const TOL: Tol = Tol::MaxAbsOfRef(1e-4);

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn ids() -> Vec<u32> {
    let f = SafetensorsFile::open(&fx("text_encoder/prompts.safetensors")).expect("fixture");
    read_as_f32(&f, "input_ids")
        .expect("ids")
        .1
        .iter()
        .map(|&x| x as u32)
        .collect()
}

#[test]
fn text_encoder_matches_transformers() {
    let m = Model::load(&fx("tiny-sd"), Default::default()).expect("model");
    let te = TextEncoder::from_model(&m).expect("text encoder");
    let got = te.forward(&ids(), 2).expect("forward");
    let want = SafetensorsFile::open(&fx("text_encoder/prompts.safetensors"))
        .expect("f")
        .to_f32("hidden")
        .expect("hidden");
    assert_close("last_hidden_state", &got, &want, TOL);
}

#[test]
fn text_encoder_identity_in_both_modes_and_from_peft() {
    let m = Model::load(&fx("tiny-sd"), Default::default()).expect("model");
    let te = TextEncoder::from_model(&m).expect("text encoder");
    let want = SafetensorsFile::open(&fx("text_encoder/te-id.out.safetensors"))
        .expect("f")
        .to_f32("hidden")
        .expect("hidden");
    let table = m.adaptable_layers();
    for file in ["te-id.lidb.safetensors", "te-id.peft.safetensors"] {
        let f = SafetensorsFile::open(&fx(&format!("text_encoder/{file}"))).expect("adapter");
        let a = hdb::adapter::load(&f, &table).expect("load");
        for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
            let applied = Applied::new(&[(&a, 1.0)], mode, &te).expect("apply");
            let ad = AdapterCtx {
                applied: &applied,
                per_sample: None,
            };
            let got = te.forward_adapted(&ids(), 2, &ad).expect("forward");
            assert_close(&format!("{file} {mode:?}"), &got, &want, TOL);
        }
    }
}

#[test]
fn bad_ids_are_errors_naming_the_argument() {
    let m = Model::load(&fx("tiny-sd"), Default::default()).expect("model");
    let te = TextEncoder::from_model(&m).expect("text encoder");
    let e = te
        .forward(&[1, 2, 99999], 1)
        .expect_err("out of vocabulary");
    assert!(
        e.to_string().contains("'ids'") && e.to_string().contains("99999"),
        "{e}"
    );
    let e = te.forward(&[1; 78], 1).expect_err("too long");
    assert!(e.to_string().contains("78 tokens"), "{e}");
    let e = te.forward(&[1, 2, 3], 2).expect_err("ragged");
    assert!(e.to_string().contains("'ids'"), "{e}");
}
