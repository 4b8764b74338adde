//! The CPU UNet against diffusers' `UNet2DConditionModel` on the same weights and inputs
//! (fixtures from tools/make_unet_fixtures.py). Tolerance: max abs error <= 1e-4 x max|ref|
//! (f32 compute on both sides; the f16 cases compare with diffusers run in f32 on the same
//! f16-rounded weights, so the bound is the same).

mod common;
use common::{assert_close, fixtures, read_input, Tol};
use std::path::Path;

use hdb::io::diffusers::Variant;
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::unet::{Unet, UnetInput};
use hdb::model::{LoadOptions, Model};

fn reference(case: &str) -> Vec<f32> {
    let f = SafetensorsFile::open(&fixtures().join(format!("unet/{case}.out.safetensors")))
        .expect("output fixture");
    f.to_f32("out").expect("out")
}

fn run(case: &str, model: &Path, variant: Variant) {
    let m = Model::load(
        model,
        LoadOptions {
            variant,
            ..Default::default()
        },
    )
    .expect("model");
    let unet = Unet::from_model(&m).expect("unet");
    let inp = read_input(case);
    let rt = hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cpu,
        threads: 2,
    })
    .expect("runtime");
    let got = rt.install(|| unet.forward(&inp.args())).expect("forward");
    assert_close(case, &got, &reference(case), Tol::MaxAbsOfRef(1e-4));
}

#[test]
fn tiny_sd15_shaped_unet_matches_diffusers() {
    run("tiny-sd", &fixtures().join("tiny-sd"), Variant::Full);
}

#[test]
fn f16_weights_match_diffusers_on_the_same_rounded_weights() {
    run("tiny-sd-fp16", &fixtures().join("tiny-sd"), Variant::Fp16);
}

#[test]
fn sd2_style_linear_projection_and_per_block_heads_match_diffusers() {
    run(
        "sd2-linear",
        &fixtures().join("unet/sd2-linear"),
        Variant::Auto,
    );
}

#[test]
fn one_layer_per_block_three_blocks_two_transformer_layers_match_diffusers() {
    run("lpb1", &fixtures().join("unet/lpb1"), Variant::Auto);
}

#[test]
fn ldm_single_file_with_inferred_config_matches_diffusers() {
    run(
        "ldm-sd1",
        &fixtures().join("unet/ldm-sd1.safetensors"),
        Variant::Auto,
    );
}

/// Latent sizes that are not multiples of the UNet's downsampling (tiny-sd: 8): diffusers
/// passes each skip's size to the upsampler (tools/make_odd_size_fixtures.py).
#[test]
fn odd_latent_sizes_match_diffusers() {
    for case in ["tiny-sd-odd-9x8", "tiny-sd-odd-5x7"] {
        run(case, &fixtures().join("tiny-sd"), Variant::Full);
    }
}

#[test]
fn cli_unet_verb_writes_the_same_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["unet", "--model"])
        .arg(fixtures().join("unet/sd2-linear"))
        .arg("--input")
        .arg(fixtures().join("unet/sd2-linear.in.safetensors"))
        .arg("--output")
        .arg(&out)
        .args(["--threads", "1"])
        .status()
        .expect("run hdb");
    assert!(status.success());
    let got = SafetensorsFile::open(&out)
        .expect("output")
        .to_f32("out")
        .expect("out");
    assert_close(
        "cli sd2-linear",
        &got,
        &reference("sd2-linear"),
        Tol::MaxAbsOfRef(1e-4),
    );
}

#[test]
fn wrong_input_shapes_are_errors_naming_the_tensor() {
    let m = Model::load(&fixtures().join("tiny-sd"), LoadOptions::default()).expect("model");
    let unet = Unet::from_model(&m).expect("unet");
    let inp = read_input("tiny-sd");
    let args = inp.args();
    let e = unet
        .forward(&UnetInput {
            sample: &inp.sample[1..],
            ..args
        })
        .expect_err("short sample");
    assert!(
        e.to_string().contains("'sample'") && e.to_string().contains("[2, 4, 16, 16]"),
        "{e}"
    );
    let e = unet
        .forward(&UnetInput {
            context: &inp.ctx[1..],
            ..args
        })
        .expect_err("short context");
    assert!(e.to_string().contains("'encoder_hidden_states'"), "{e}");
    let e = unet
        .forward(&UnetInput {
            timesteps: &inp.t[..1],
            ..args
        })
        .expect_err("timesteps");
    assert!(e.to_string().contains("'timestep'"), "{e}");
}

#[test]
fn config_and_weights_that_disagree_name_the_tensor_and_expected_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = fixtures().join("tiny-sd/unet");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    let cfg = std::fs::read_to_string(src.join("config.json")).expect("config");
    let mut json: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    json["cross_attention_dim"] = 24.into();
    std::fs::write(dir.path().join("config.json"), json.to_string()).expect("write");
    let m = Model::load(dir.path(), LoadOptions::default())
        .expect("model loads; the UNet is built lazily");
    let e = Unet::from_model(&m).expect_err("mismatch");
    let msg = e.to_string();
    assert!(
        msg.contains("attn2.to_k.weight") && msg.contains("expected [") && msg.contains("24]"),
        "{msg}"
    );
}
