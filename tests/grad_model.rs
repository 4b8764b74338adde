//! Whole-model adapter gradients against torch autograd: diffusers' UNet2DConditionModel and
//! transformers' CLIPTextModel on the tiny SD fixture in float64, with the adapters applied as
//! differentiable weight deltas (tools/make_grad_fixtures.py). For LiDB v1 and v2, a kohya
//! LoRA with alpha and a PEFT LoRA, with hidden states (the UNet alone) and token ids (the
//! text encoder too): the loss within 1e-5 relative, every gradient within 1e-4 of the largest
//! gradient, through the library and through `hdb finetune grad`, with and without
//! activation checkpointing (which must give the same gradients bit for bit).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::runtime::{DeviceRequest, Runtime, RuntimeOptions};
use hdb::train::GradInput;
use hdb::{Engine, Model};

const CASES: [(&str, &str); 5] = [
    ("lidb-v1-hidden", "grad-id.v1.lidb.safetensors"),
    ("lidb-v2-ids", "grad-id.v2.lidb.safetensors"),
    ("kohya-ids", "grad-lora.kohya.safetensors"),
    ("peft-hidden", "grad-lora.peft.safetensors"),
    // A 9x9 latent: the up path crops its upsamples to the skips' sizes (and back in the
    // backward).
    ("peft-odd-hidden", "grad-lora.peft.safetensors"),
];

fn grad_fixture(p: &str) -> PathBuf {
    common::fixtures().join("grad").join(p)
}

fn engine() -> Engine {
    let m = Model::load(&common::fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let rt = Runtime::new(RuntimeOptions {
        device: DeviceRequest::Cpu,
        threads: 2,
    })
    .expect("runtime");
    Engine::new(Arc::new(rt), m)
}

/// Every tensor of the reference `want` is in `got` with the same shape, within 1e-4 of the
/// largest reference gradient; the losses agree within 1e-5 relative. NaN fails.
fn compare_files(case: &str, got: &SafetensorsFile, want: &SafetensorsFile) {
    let names: Vec<&str> = want.tensors().map(|e| e.name.as_str()).collect();
    let got_names: Vec<&str> = got.tensors().map(|e| e.name.as_str()).collect();
    assert_eq!(got_names, names, "{case}: tensor names");
    let (_, wl) = read_as_f32(want, "loss").expect("loss");
    let (gs, gl) = read_as_f32(got, "loss").expect("loss");
    assert!(gs.is_empty(), "{case}: loss is a scalar, got shape {gs:?}");
    let rel = ((gl[0] - wl[0]) / wl[0]).abs();
    assert!(
        rel < 1e-5,
        "{case}: loss {} vs torch {} ({rel:.2e})",
        gl[0],
        wl[0]
    );
    let scale = names
        .iter()
        .filter(|n| **n != "loss")
        .map(|n| {
            read_as_f32(want, n)
                .expect("grad")
                .1
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()))
        })
        .fold(0f32, f32::max) as f64;
    assert!(scale > 0.0, "{case}: all reference gradients are zero");
    let mut worst = (0f64, String::new(), 0usize, 0f32, 0f32);
    for n in names.iter().filter(|n| **n != "loss") {
        let (ws, w) = read_as_f32(want, n).expect("want");
        let (gs, g) = read_as_f32(got, n).expect("got");
        assert_eq!(gs, ws, "{case}: shape of {n}");
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let err = (*a as f64 - *b as f64).abs() / scale;
            assert!(
                !err.is_nan(),
                "{case}: {n}[{i}] is NaN (hdb {a}, torch {b})"
            );
            if err > worst.0 {
                worst = (err, n.to_string(), i, *a, *b);
            }
        }
    }
    println!(
        "{case}: loss {} (torch {}), worst gradient {}[{}] hdb {} torch {}: {:.2e} of max|grad| {scale:.3e}",
        gl[0], wl[0], worst.1, worst.2, worst.3, worst.4, worst.0
    );
    assert!(
        worst.0 <= 1e-4,
        "{case}: {}[{}] hdb {} vs torch {} ({:.2e} of the largest gradient)",
        worst.1,
        worst.2,
        worst.3,
        worst.4,
        worst.0
    );
}

#[test]
fn adapter_gradients_match_torch_autograd() {
    let e = engine();
    let dir = tempfile::tempdir().expect("tempdir");
    for (case, adapter) in CASES {
        let input = GradInput::from_safetensors(
            &SafetensorsFile::open(&grad_fixture(&format!("{case}.in.safetensors")))
                .expect("input"),
        )
        .expect("input");
        let a = SafetensorsFile::open(&grad_fixture(adapter)).expect("adapter");
        let mut bits = Vec::new();
        for checkpoint in [true, false] {
            let (loss, t, grads) = e
                .adapter_gradients(&a, &input, checkpoint)
                .expect("gradients");
            let out = dir.path().join(format!("{case}-{checkpoint}.safetensors"));
            t.write_gradients(&out, loss as f32, &grads).expect("write");
            let got = SafetensorsFile::open(&out).expect("written");
            let want = SafetensorsFile::open(&grad_fixture(&format!("{case}.grad.safetensors")))
                .expect("reference");
            compare_files(&format!("{case} checkpoint={checkpoint}"), &got, &want);
            bits.push(
                grads
                    .iter()
                    .flat_map(|g| g.down.iter().chain(&g.up).map(|x| x.to_bits()))
                    .collect::<Vec<u32>>(),
            );
        }
        assert_eq!(
            bits[0], bits[1],
            "{case}: checkpointing changed the gradients"
        );
    }
}

#[test]
fn finetune_grad_cli_writes_the_contract_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (case, adapter) in [CASES[1], CASES[2]] {
        let out = dir.path().join(format!("{case}.safetensors"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_hdb"))
            .args(["finetune", "grad", "--model"])
            .arg(common::fixtures().join("tiny-sd"))
            .arg("--adapter")
            .arg(grad_fixture(adapter))
            .arg("--input")
            .arg(grad_fixture(&format!("{case}.in.safetensors")))
            .arg("--output")
            .arg(&out)
            .args(["--threads", "2"])
            .status()
            .expect("run hdb");
        assert!(status.success(), "{case}: hdb finetune grad failed");
        let got = SafetensorsFile::open(&out).expect("output");
        let want = SafetensorsFile::open(&grad_fixture(&format!("{case}.grad.safetensors")))
            .expect("reference");
        if case.starts_with("lidb-v2") {
            // The packed layout keeps the adapter's metadata, so its layer order.
            assert_eq!(got.metadata().get("layers"), want.metadata().get("layers"));
        }
        compare_files(&format!("cli {case}"), &got, &want);
    }
}

#[test]
fn bad_grad_inputs_are_errors_naming_the_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = SafetensorsFile::open(&grad_fixture("peft-hidden.in.safetensors")).expect("input");
    let (ss, sample) = read_as_f32(&src, "sample").expect("sample");
    let (cs, ctx) = read_as_f32(&src, "encoder_hidden_states").expect("ctx");
    let t = vec![10.0f32, 20.0];
    let ids = vec![1.5f32; 2 * 77];
    let short = vec![0.0f32; 3];
    type Tensors<'a> = Vec<(&'a str, Vec<usize>, &'a [f32])>;
    let cases: Vec<(&str, Tensors<'_>)> = vec![
        (
            "'target'",
            vec![
                ("sample", ss.clone(), &sample),
                ("timestep", vec![2], &t),
                ("target", vec![3], &short),
                ("encoder_hidden_states", cs.clone(), &ctx),
            ],
        ),
        (
            "'encoder_hidden_states' or 'input_ids'",
            vec![
                ("sample", ss.clone(), &sample),
                ("timestep", vec![2], &t),
                ("target", ss.clone(), &sample),
            ],
        ),
        (
            "'input_ids' holds 1.5",
            vec![
                ("sample", ss.clone(), &sample),
                ("timestep", vec![2], &t),
                ("target", ss.clone(), &sample),
                ("input_ids", vec![2, 77], &ids),
            ],
        ),
        (
            "'timestep'",
            vec![
                ("sample", ss.clone(), &sample),
                ("timestep", vec![3], &short),
                ("target", ss.clone(), &sample),
                ("encoder_hidden_states", cs.clone(), &ctx),
            ],
        ),
    ];
    for (want, tensors) in cases {
        let p = dir.path().join("bad.safetensors");
        hdb::io::safetensors::write_f32(&p, &tensors).expect("write");
        let err =
            GradInput::from_safetensors(&SafetensorsFile::open(&p).expect("open")).expect_err(want);
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    // An adapter made for another model is a mismatch naming the layer, nothing computed.
    let e = engine();
    let input = GradInput::from_safetensors(&src).expect("input");
    let sd15 = dir.path().join("sd15.safetensors");
    let down = vec![0.0f32; 320];
    let up = vec![0.0f32; 320];
    hdb::io::safetensors::write_f32(
        &sd15,
        &[
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                vec![1, 320],
                &down,
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
                vec![320, 1],
                &up,
            ),
        ],
    )
    .expect("write");
    let err = e
        .adapter_gradients(&SafetensorsFile::open(&sd15).expect("open"), &input, true)
        .expect_err("sd15-sized LoRA");
    assert!(
        matches!(err, hdb::Error::AdapterMismatch(_)) && err.to_string().contains("attn1.to_q"),
        "{err}"
    );
}
