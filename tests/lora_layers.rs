//! LoRAs on every linear layer (attention, feed-forward, time embedding, resnets'
//! `time_emb_proj`, the text encoder's MLP) in the layouts people have (kohya with per-layer
//! and missing alphas, PEFT, diffusers' older attention-processor form), alone and stacked with
//! an identity, in both apply modes, against diffusers' LoRA loader with peft on the tiny model
//! (tools/make_lora_layers_fixtures.py). Tolerance: 1e-4 x max|reference|, as tests/adapter.rs.

mod common;

use std::path::PathBuf;

use common::{assert_close, compare, fixtures, Tol};
use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::{lora, Adapter, LoadOptions};
use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::model::adaptable::is_identity_layer;
use hdb::model::text_encoder::TextEncoder;
use hdb::model::unet::Unet;
use hdb::model::{Adaptable, LayerKind, Model};

const TOL: Tol = Tol::MaxAbsOfRef(1e-4);
const MODES: [ApplyMode; 2] = [ApplyMode::Merge, ApplyMode::Runtime];

fn fx(p: &str) -> PathBuf {
    fixtures().join(p)
}

fn model() -> Model {
    Model::load(&fx("tiny-sd"), Default::default()).expect("tiny-sd")
}

fn load(m: &Model, file: &str) -> Adapter {
    let f = SafetensorsFile::open(&fx(file)).expect("adapter file");
    hdb::adapter::load(&f, &m.adaptable_layers()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn reference(file: &str, key: &str) -> Vec<f32> {
    SafetensorsFile::open(&fx(&format!("lora-layers/{file}")))
        .expect("reference")
        .to_f32(key)
        .expect(key)
}

fn unet_run(
    unet: &Unet,
    set: &[(&Adapter, f32)],
    mode: ApplyMode,
    per_sample: Option<&[i32]>,
) -> Vec<f32> {
    let applied = Applied::new(set, mode, unet).expect("apply");
    let i = common::read_input("tiny-sd");
    let ad = AdapterCtx {
        applied: &applied,
        per_sample,
    };
    unet.forward_adapted(&i.args(), &ad).expect("forward")
}

fn ids() -> Vec<u32> {
    let f = SafetensorsFile::open(&fx("text_encoder/prompts.safetensors")).expect("ids");
    let (_, v) = read_as_f32(&f, "input_ids").expect("input_ids");
    v.iter().map(|&x| x as u32).collect()
}

#[test]
fn every_linear_and_conv_layer_is_adaptable_and_identity_layers_stay_the_attention_projections() {
    let m = model();
    let table = m.adaptable_layers();
    let identity = hdb::model::adaptable::identity_layers(&table);
    // tiny-sd (SD 1.5's layout): 128 + 8 attention projections; 32 feed-forward, 22
    // time_emb_proj, 2 time embedding layers in the UNet; 4 MLP layers in the text encoder;
    // 98 UNet convolutions.
    let convs = table
        .values()
        .filter(|s| s.kind != LayerKind::Linear)
        .count();
    assert_eq!((table.len(), identity.len(), convs), (196 + 98, 136, 98));
    // The weights-only table is the built components' (kinds, strides and paddings included).
    let mut built = Unet::from_model(&m).expect("unet").adaptable_layers();
    built.extend(TextEncoder::from_model(&m).expect("te").adaptable_layers());
    assert_eq!(built, table);
    let kind = |k: &str| table[k].kind;
    assert_eq!(
        kind("unet.down_blocks.0.downsamplers.0.conv"),
        LayerKind::Conv {
            in_channels: 4, // block_out_channels [4, 8, 12, 12]
            kernel: 3,
            stride: 2,
            padding: 1
        }
    );
    assert_eq!(
        kind("unet.mid_block.attentions.0.proj_in"),
        LayerKind::Conv {
            in_channels: 12,
            kernel: 1,
            stride: 1,
            padding: 0
        }
    );
    for k in [
        "unet.time_embedding.linear_1",
        "unet.down_blocks.0.resnets.0.time_emb_proj",
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "text_encoder.text_model.encoder.layers.1.mlp.fc2",
    ] {
        assert!(table.contains_key(k) && !identity.contains_key(k), "{k}");
    }
}

#[test]
fn style_lora_on_every_linear_layer_equals_diffusers_in_both_modes() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let te = TextEncoder::from_model(&m).expect("text encoder");
    let want = reference("unet.out.safetensors", "out");
    let want_06 = reference("unet-x0.6.out.safetensors", "out");
    let want_te = reference("te.out.safetensors", "hidden");
    let kohya = load(&m, "lora-layers/style.kohya.safetensors");
    let peft = load(&m, "lora-layers/style.peft.safetensors");
    assert_eq!(kohya.layers.len(), 196);
    assert_eq!(
        kohya.layers.keys().collect::<Vec<_>>(),
        peft.layers.keys().collect::<Vec<_>>()
    );
    for (name, a) in [("kohya", &kohya), ("peft", &peft)] {
        for mode in MODES {
            let what = format!("style.{name} {mode:?}");
            assert_close(
                &format!("{what} UNet"),
                &unet_run(&unet, &[(a, 1.0)], mode, None),
                &want,
                TOL,
            );
            assert_close(
                &format!("{what} x0.6 UNet"),
                &unet_run(&unet, &[(a, 0.6)], mode, None),
                &want_06,
                TOL,
            );
            let applied = Applied::new(&[(a, 1.0)], mode, &te).expect("apply");
            let ad = AdapterCtx {
                applied: &applied,
                per_sample: None,
            };
            let got = te.forward_adapted(&ids(), 2, &ad).expect("forward");
            assert_close(&format!("{what} text encoder"), &got, &want_te, TOL);
        }
    }
    let base = reference("../unet/tiny-sd.out.safetensors", "out");
    let change = compare(&want, &base);
    assert!(
        change.non_finite == 0 && change.max_abs > 1e-2,
        "the style must visibly change the output (max change {:e})",
        change.max_abs
    );
}

#[test]
fn identity_and_style_stack_in_both_modes_and_per_sample() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let style = load(&m, "lora-layers/style.kohya.safetensors");
    let id1 = load(&m, "adapter/id1.lidb.safetensors");
    let want = reference("unet-id1.out.safetensors", "out");
    for mode in MODES {
        assert_close(
            &format!("id1 + style {mode:?}"),
            &unet_run(&unet, &[(&id1, 1.0), (&style, 1.0)], mode, None),
            &want,
            TOL,
        );
    }
    // Per sample: the style on sample 0, nothing on sample 1 equals those two runs apart.
    let got = unet_run(&unet, &[(&style, 1.0)], ApplyMode::Runtime, Some(&[0, -1]));
    let with = unet_run(&unet, &[(&style, 1.0)], ApplyMode::Runtime, None);
    let without = unet_run(&unet, &[], ApplyMode::Runtime, None);
    let half = got.len() / 2;
    assert_close("sample 0 (style)", &got[..half], &with[..half], TOL);
    assert_close(
        "sample 1 (none)",
        &got[half..],
        &without[half..],
        Tol::MaxAbs(0.0),
    );
}

#[test]
fn merge_mode_restores_the_base_bit_for_bit_on_every_layer_kind() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let style = load(&m, "lora-layers/style.peft.safetensors");
    let base = unet_run(&unet, &[], ApplyMode::Merge, None);
    let mut applied = Applied::new(&[(&style, 1.0)], ApplyMode::Merge, &unet).expect("merge");
    let cleared =
        Applied::replacing(Some(&mut applied), &[], ApplyMode::Merge, &unet).expect("clear");
    assert!(cleared.layers.is_empty());
    assert_eq!(unet_run(&unet, &[], ApplyMode::Merge, None), base);
}

#[test]
fn the_older_attention_processor_form_loads() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let a = load(&m, "lora-layers/attn.old.safetensors");
    assert_eq!(a.layers.len(), 128);
    assert!(a.layers.keys().all(|k| is_identity_layer(k)));
    let want = reference("attn.out.safetensors", "out");
    for mode in MODES {
        assert_close(
            &format!("attn.old {mode:?}"),
            &unet_run(&unet, &[(&a, 1.0)], mode, None),
            &want,
            TOL,
        );
    }
}

#[test]
fn export_round_trips_every_layer() {
    let m = model();
    let table = m.adaptable_layers();
    let style = load(&m, "lora-layers/style.kohya.safetensors");
    let dir = tempfile::tempdir().expect("tempdir");
    for fmt in [lora::LoraFormat::Kohya, lora::LoraFormat::Peft] {
        let p = dir.path().join(format!("{fmt:?}.safetensors"));
        lora::export(&style, fmt, &p).expect("export");
        let f = SafetensorsFile::open(&p).expect("open");
        if fmt == lora::LoraFormat::Kohya {
            // One alpha for every layer (the ranks differ: 1, 2 and 3), so readers that mis-key
            // some alphas still scale right (tools/make_lora_layers_fixtures.py --hdb).
            let alphas: std::collections::BTreeSet<u32> = f
                .tensors()
                .filter(|e| e.name.ends_with(".alpha"))
                .map(|e| f.to_f32(&e.name).expect("alpha")[0].to_bits())
                .collect();
            assert_eq!(alphas.len(), 1, "{alphas:?}");
        }
        let back = hdb::adapter::load(&f, &table).expect("import");
        assert_eq!(back.layers.len(), style.layers.len());
        for (k, l) in &style.layers {
            let b = &back.layers[k];
            assert_eq!((b.rank, &b.down), (l.rank, &l.down), "{fmt:?} {k} down");
            assert_close(&format!("{fmt:?} {k} up"), &b.up, &l.up, Tol::MaxAbs(1e-6));
        }
    }
}

/// A copy of `file` with `extra` tensors (name, shape) of zeros added.
fn with_extra(file: &str, extra: &[(&str, Vec<usize>)], out: &std::path::Path) {
    let add: Vec<(&str, Vec<usize>, f32)> =
        extra.iter().map(|(n, s)| (*n, s.clone(), 0.0)).collect();
    common::rewrite_safetensors(&fx(file), out, &[], &add);
}

#[test]
fn unmatched_keys_are_refused_unless_allowed() {
    let m = model();
    let table = m.adaptable_layers();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("extra.safetensors");
    // A convolution hdb does not adapt (the VAE's) and a layer SD 1.5 does not have.
    with_extra(
        "lora-layers/style.kohya.safetensors",
        &[
            ("lora_vae_conv_in.lora_down.weight", vec![2, 4, 3, 3]),
            ("lora_vae_conv_in.lora_up.weight", vec![32, 2, 1, 1]),
            ("lora_unet_no_such_layer.lora_down.weight", vec![2, 4]),
            ("lora_unet_no_such_layer.lora_up.weight", vec![4, 2]),
        ],
        &p,
    );
    let f = SafetensorsFile::open(&p).expect("open");
    let e = hdb::adapter::load(&f, &table).expect_err("unmatched keys");
    let msg = e.to_string();
    assert!(
        msg.contains("4 key(s)") && msg.contains("lora_vae_conv_in") && msg.contains("no_such"),
        "{msg}"
    );
    let opts = LoadOptions {
        allow_unmatched: true,
    };
    let a = hdb::adapter::load_with(&f, &table, &Default::default(), opts).expect("allowed");
    assert_eq!(a.layers.len(), 196);
    // Keys that do match must still fit: a wrong shape is refused even then.
    let q = dir.path().join("bad.safetensors");
    with_extra(
        "adapter/id1.peft.safetensors",
        &[
            ("unet.time_embedding.linear_1.lora_A.weight", vec![1, 3]),
            ("unet.time_embedding.linear_1.lora_B.weight", vec![128, 1]),
        ],
        &q,
    );
    let f = SafetensorsFile::open(&q).expect("open");
    let e = hdb::adapter::load_with(&f, &table, &Default::default(), opts).expect_err("shape");
    assert!(e.to_string().contains("time_embedding.linear_1"), "{e}");
    // Convolution factors on a linear layer: refused naming the key, allowed or not.
    let c = dir.path().join("conv-on-linear.safetensors");
    let t = [
        (
            "lora_unet_time_embedding_linear_1.lora_down.weight",
            vec![1, 32, 3, 3],
        ),
        (
            "lora_unet_time_embedding_linear_1.lora_up.weight",
            vec![128, 1, 1, 1],
        ),
    ];
    let zeros: Vec<Vec<f32>> = t
        .iter()
        .map(|(_, s)| vec![0.0; s.iter().product()])
        .collect();
    let refs: Vec<(&str, Vec<usize>, &[f32])> = t
        .iter()
        .zip(&zeros)
        .map(|((n, s), v)| (*n, s.clone(), v.as_slice()))
        .collect();
    hdb::io::safetensors::write_f32(&c, &refs).expect("write");
    let f = SafetensorsFile::open(&c).expect("open");
    let e = hdb::adapter::load_with(&f, &table, &Default::default(), opts).expect_err("conv");
    let msg = e.to_string();
    assert!(
        msg.contains("'unet.time_embedding.linear_1'") && msg.contains("3x3 convolution"),
        "{msg}"
    );
}

#[test]
fn training_refuses_loras_beyond_the_attention_projections() {
    let m = model();
    let table = m.adaptable_layers();
    let f = SafetensorsFile::open(&fx("lora-layers/style.peft.safetensors")).expect("open");
    let Err(e) = hdb::train::Trainable::from_file(&f, &table, &Default::default()) else {
        panic!("a LoRA on the MLP was taken for training");
    };
    let msg = e.to_string();
    // The first such key in key order.
    assert!(
        msg.contains("'text_encoder.text_model.encoder.layers.0.mlp.fc1'")
            && msg.contains("attention projection"),
        "{msg}"
    );
    let style = load(&m, "lora-layers/style.peft.safetensors");
    let Err(e) = hdb::train::finetune::relax(&style, 4, &table) else {
        panic!("a LoRA on the MLP was relaxed for training");
    };
    assert!(e.to_string().contains("mlp.fc1"), "{e}");
}

#[test]
fn locon_on_every_convolution_equals_diffusers_in_both_modes() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let want = reference("locon.out.safetensors", "out");
    let want_both = reference("locon-style.out.safetensors", "out");
    let style = load(&m, "lora-layers/style.peft.safetensors");
    for file in ["locon.kohya", "locon.peft"] {
        let a = load(&m, &format!("lora-layers/{file}.safetensors"));
        assert_eq!(a.layers.len(), 98);
        for mode in MODES {
            assert_close(
                &format!("{file} {mode:?}"),
                &unet_run(&unet, &[(&a, 1.0)], mode, None),
                &want,
                TOL,
            );
            assert_close(
                &format!("{file} x0.8 + style {mode:?}"),
                &unet_run(&unet, &[(&a, 0.8), (&style, 1.0)], mode, None),
                &want_both,
                TOL,
            );
        }
    }
    // Per sample (runtime): the LoCon on sample 1 only.
    let a = load(&m, "lora-layers/locon.kohya.safetensors");
    let got = unet_run(&unet, &[(&a, 1.0)], ApplyMode::Runtime, Some(&[-1, 0]));
    let without = unet_run(&unet, &[], ApplyMode::Runtime, None);
    let half = got.len() / 2;
    assert_close(
        "sample 0 (none)",
        &got[..half],
        &without[..half],
        Tol::MaxAbs(0.0),
    );
    assert_close("sample 1 (LoCon)", &got[half..], &want[half..], TOL);
    // Merge mode leaves the shared model as it was.
    let base = unet_run(&unet, &[], ApplyMode::Merge, None);
    let _ = unet_run(&unet, &[(&a, 1.0)], ApplyMode::Merge, None);
    assert_eq!(unet_run(&unet, &[], ApplyMode::Merge, None), base);
}

#[test]
fn locon_exports_as_convolution_factors_and_round_trips() {
    let m = model();
    let table = m.adaptable_layers();
    let a = load(&m, "lora-layers/locon.kohya.safetensors");
    let dir = tempfile::tempdir().expect("tempdir");
    for fmt in [lora::LoraFormat::Kohya, lora::LoraFormat::Peft] {
        let p = dir.path().join(format!("{fmt:?}.safetensors"));
        lora::export(&a, fmt, &p).expect("export");
        let f = SafetensorsFile::open(&p).expect("open");
        let down = match fmt {
            lora::LoraFormat::Kohya => {
                "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"
            }
            lora::LoraFormat::Peft => "unet.down_blocks.0.downsamplers.0.conv.lora_A.weight",
        };
        let e = f.get(down).unwrap_or_else(|| panic!("{fmt:?}: {down}"));
        assert_eq!(e.shape.dims().len(), 4, "{down}: {}", e.shape);
        let back = hdb::adapter::load(&f, &table).expect("import");
        for (k, l) in &a.layers {
            let b = &back.layers[k];
            assert_eq!(
                (b.rank, &b.down, b.conv_kernel),
                (l.rank, &l.down, l.conv_kernel),
                "{k}"
            );
            assert_close(&format!("{fmt:?} {k} up"), &b.up, &l.up, Tol::MaxAbs(1e-6));
        }
    }
}

#[test]
fn conv_factors_of_the_wrong_kernel_are_refused_naming_the_key() {
    let m = model();
    let table = m.adaptable_layers();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.safetensors");
    // conv_in is 3x3; a 1x1 down factor does not fit it.
    let t = [
        ("lora_unet_conv_in.lora_down.weight", vec![1, 4, 1, 1]),
        ("lora_unet_conv_in.lora_up.weight", vec![32, 1, 1, 1]),
    ];
    let zeros: Vec<Vec<f32>> = t
        .iter()
        .map(|(_, s)| vec![0.0; s.iter().product()])
        .collect();
    let refs: Vec<(&str, Vec<usize>, &[f32])> = t
        .iter()
        .zip(&zeros)
        .map(|((n, s), v)| (*n, s.clone(), v.as_slice()))
        .collect();
    hdb::io::safetensors::write_f32(&p, &refs).expect("write");
    let e = hdb::adapter::load(&SafetensorsFile::open(&p).expect("open"), &table)
        .expect_err("1x1 factor on a 3x3 conv");
    let msg = e.to_string();
    assert!(
        msg.contains("'unet.conv_in'") && msg.contains("3x3 convolution"),
        "{msg}"
    );
}

#[test]
fn per_sample_identities_share_a_stacked_style() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let style = load(&m, "lora-layers/style.kohya.safetensors");
    let locon = load(&m, "lora-layers/locon.peft.safetensors");
    let (id1, id2) = (
        load(&m, "adapter/id1.lidb.safetensors"),
        load(&m, "adapter/id2.lidb.safetensors"),
    );
    // A stacked adapter is both at once, in either mode.
    let both = hdb::adapter::stack(&[(&id1, 1.0), (&style, 1.0)]).expect("stack");
    let want = reference("unet-id1.out.safetensors", "out");
    for mode in MODES {
        assert_close(
            &format!("stack(id1, style) {mode:?}"),
            &unet_run(&unet, &[(&both, 1.0)], mode, None),
            &want,
            TOL,
        );
    }
    // Per sample: id1 + style (+ LoCon at 0.8) on sample 0, id2 + style on sample 1, each equal
    // to its own whole-batch run.
    let s1 = hdb::adapter::stack(&[(&id1, 1.0), (&style, 1.0), (&locon, 0.8)]).expect("stack");
    let s2 = hdb::adapter::stack(&[(&id2, 1.0), (&style, 1.0)]).expect("stack");
    let got = unet_run(
        &unet,
        &[(&s1, 1.0), (&s2, 1.0)],
        ApplyMode::Runtime,
        Some(&[0, 1]),
    );
    let half = got.len() / 2;
    let one = unet_run(
        &unet,
        &[(&id1, 1.0), (&style, 1.0), (&locon, 0.8)],
        ApplyMode::Runtime,
        None,
    );
    let two = unet_run(
        &unet,
        &[(&id2, 1.0), (&style, 1.0)],
        ApplyMode::Runtime,
        None,
    );
    assert_close(
        "sample 0: id1 + style + LoCon",
        &got[..half],
        &one[..half],
        TOL,
    );
    assert_close("sample 1: id2 + style", &got[half..], &two[half..], TOL);
    // Scales are checked.
    let e = hdb::adapter::stack(&[(&id1, f32::NAN)]).expect_err("NaN scale");
    assert!(e.to_string().contains("scale #0"), "{e}");
}

#[test]
fn cli_shared_adapter_is_stacked_into_each_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = SafetensorsFile::open(&fx("unet/tiny-sd.in.safetensors")).expect("input");
    let names = ["sample", "timestep", "encoder_hidden_states"];
    let tensors: Vec<(Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| read_as_f32(&f, n).expect("tensor"))
        .collect();
    let idx = [0.0f32, -1.0];
    let mut list: Vec<(&str, Vec<usize>, &[f32])> = names
        .iter()
        .zip(&tensors)
        .map(|(n, (sh, v))| (*n, sh.clone(), v.as_slice()))
        .collect();
    list.push(("adapter_index", vec![2], &idx));
    let input = dir.path().join("in.safetensors");
    hdb::io::safetensors::write_f32(&input, &list).expect("write input");
    let o = dir.path().join("o.safetensors");
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["unet", "--mode", "runtime", "--model"])
        .arg(fx("tiny-sd"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&o)
        .arg("--adapter")
        .arg(fx("adapter/id1.lidb.safetensors"))
        .arg("--shared-adapter")
        .arg(fx("lora-layers/style.kohya.safetensors"))
        .output()
        .expect("run hdb");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = SafetensorsFile::open(&o)
        .expect("out")
        .to_f32("out")
        .expect("out");
    let half = got.len() / 2;
    let want = reference("unet-id1.out.safetensors", "out");
    let base = reference("../unet/tiny-sd.out.safetensors", "out");
    assert_close(
        "sample 0: id1 + shared style",
        &got[..half],
        &want[..half],
        TOL,
    );
    assert_close("sample 1: -1, nothing", &got[half..], &base[half..], TOL);
}

#[test]
fn loha_and_lokr_merge_as_peft_computes_them_and_runtime_mode_refuses_them() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let style = load(&m, "lora-layers/style.peft.safetensors");
    for (name, layers) in [("loha", 182), ("lokr", 232)] {
        let a = load(&m, &format!("lora-layers/{name}.kohya.safetensors"));
        assert_eq!(a.layers.len(), layers, "{name}");
        let want = reference(&format!("{name}.out.safetensors"), "out");
        assert_close(
            &format!("{name} merge"),
            &unet_run(&unet, &[(&a, 1.0)], ApplyMode::Merge, None),
            &want,
            TOL,
        );
        // Stacked with a LoRA in one merged set; clearing restores the base bit for bit.
        let base = unet_run(&unet, &[], ApplyMode::Merge, None);
        let both = unet_run(&unet, &[(&a, 1.0), (&style, 1.0)], ApplyMode::Merge, None);
        assert!(compare(&both, &want).max_abs > 1e-3, "{name} + style");
        assert_eq!(unet_run(&unet, &[], ApplyMode::Merge, None), base);
        let e = hdb::adapter::set::AdapterSet::build(
            unet.backend(),
            &unet,
            &[(&style, 1.0), (&a, 1.0)],
            ApplyMode::Runtime,
            None,
        )
        .expect_err("runtime mode");
        let msg = e.to_string();
        let layout = if name == "loha" { "LoHa" } else { "LoKr" };
        assert!(
            msg.contains("adapter #1") && msg.contains(layout) && msg.contains("merge mode"),
            "{msg}"
        );
        assert!(hdb::adapter::set::AdapterSet::build(
            unet.backend(),
            &unet,
            &[(&a, 1.0)],
            ApplyMode::Merge,
            None
        )
        .is_ok());
    }
}

#[test]
fn high_rank_merge_by_gemm_equals_runtime_mode() {
    // Ranks from 8 on merge by a GEMM (src/adapter/apply.rs); runtime mode is independent.
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let a = common::random_lora(m.adaptable_layers(), 7, 12, |_| true);
    let merged = unet_run(&unet, &[(&a, 0.5)], ApplyMode::Merge, None);
    let runtime = unet_run(&unet, &[(&a, 0.5)], ApplyMode::Runtime, None);
    assert_close("rank 12 merge vs runtime", &merged, &runtime, TOL);
    let base = unet_run(&unet, &[], ApplyMode::Merge, None);
    assert!(
        compare(&merged, &base).max_abs > 1e-2,
        "the adapter changes the output"
    );
}

#[test]
fn c_api_adapter_load_ex_allows_unmatched_keys_knowingly() {
    use hdb::ffi::adapter::*;
    use hdb::ffi::hdb_status;
    use hdb::ffi::model::*;
    use hdb::ffi::runtime::*;
    use std::ffi::CString;

    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("extra.safetensors");
    with_extra(
        "lora-layers/style.kohya.safetensors",
        &[
            ("lora_vae_conv_in.lora_down.weight", vec![2, 4]),
            ("lora_vae_conv_in.lora_up.weight", vec![4, 2]),
        ],
        &p,
    );
    let path = CString::new(p.to_str().expect("utf-8")).expect("no NUL");
    let tiny = CString::new(fx("tiny-sd").to_str().expect("utf-8")).expect("no NUL");
    let mut rp = hdb_runtime_params_default();
    rp.device = c"cpu".as_ptr();
    let (mut rt, mut m) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: valid params, NUL-terminated paths, out pointers; freed below.
    unsafe {
        assert_eq!(hdb_runtime_new(&rp, &mut rt), hdb_status::HDB_STATUS_OK);
        assert_eq!(
            hdb_model_load(rt, tiny.as_ptr(), std::ptr::null(), &mut m),
            hdb_status::HDB_STATUS_OK
        );
        let mut a = std::ptr::null_mut();
        assert_eq!(
            hdb_adapter_load(m, path.as_ptr(), &mut a),
            hdb_status::HDB_STATUS_ADAPTER_MISMATCH
        );
        assert_eq!(
            hdb_adapter_load_ex(m, path.as_ptr(), std::ptr::null(), &mut a),
            hdb_status::HDB_STATUS_ADAPTER_MISMATCH,
            "NULL params: the defaults"
        );
        let mut params = hdb_adapter_load_params_default();
        params.allow_unmatched = 2;
        assert_eq!(
            hdb_adapter_load_ex(m, path.as_ptr(), &params, &mut a),
            hdb_status::HDB_STATUS_INVALID_ARGUMENT
        );
        params.allow_unmatched = 1;
        assert_eq!(
            hdb_adapter_load_ex(m, path.as_ptr(), &params, &mut a),
            hdb_status::HDB_STATUS_OK
        );
        assert!(!a.is_null());
        hdb_adapter_free(a);
        hdb_model_free(m);
        hdb_runtime_free(rt);
    }
}

#[test]
fn cli_adapter_info_describes_lycoris_files() {
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["adapter", "info"])
        .arg(fx("lora-layers/loha.kohya.safetensors"))
        .output()
        .expect("run hdb");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && out.contains("LyCORIS") && out.contains("layers: 182"),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// A file of the given (name, shape) zeros.
fn file_of(dir: &std::path::Path, name: &str, t: &[(&str, Vec<usize>)]) -> std::path::PathBuf {
    let p = dir.join(name);
    let zeros: Vec<Vec<f32>> = t
        .iter()
        .map(|(_, s)| vec![0.0; s.iter().product()])
        .collect();
    let refs: Vec<(&str, Vec<usize>, &[f32])> = t
        .iter()
        .zip(&zeros)
        .map(|((n, s), v)| (*n, s.clone(), v.as_slice()))
        .collect();
    hdb::io::safetensors::write_f32(&p, &refs).expect("write");
    p
}

#[test]
fn sdxl_and_sd2_loras_are_refused_naming_the_key() {
    let m = model();
    let table = m.adaptable_layers();
    let dir = tempfile::tempdir().expect("tempdir");
    let load = |p: &std::path::Path| {
        hdb::adapter::load(&SafetensorsFile::open(p).expect("open"), &table)
            .expect_err("refused")
            .to_string()
    };
    // SDXL (kohya): LDM block names and two text encoders match nothing here.
    let sdxl = file_of(
        dir.path(),
        "sdxl.safetensors",
        &[
            (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
                vec![4, 2048],
            ),
            (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
                vec![640, 4],
            ),
            (
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                vec![4, 768],
            ),
            (
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                vec![768, 4],
            ),
        ],
    );
    let msg = load(&sdxl);
    assert!(
        msg.contains("4 key(s)") && msg.contains("lora_te1_") && msg.contains("input_blocks"),
        "{msg}"
    );
    // SD 2.x: the same names, but cross-attention reads 1024-wide text features.
    let sd2 = file_of(
        dir.path(),
        "sd2.safetensors",
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                vec![4, 1024],
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
                vec![4, 4],
            ),
        ],
    );
    let msg = load(&sd2);
    assert!(
        msg.contains("'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'")
            && msg.contains("do not fit"),
        "{msg}"
    );
    // Ranks that disagree between down and up, and NaN values, name the layer too.
    let bad_rank = file_of(
        dir.path(),
        "rank.safetensors",
        &[
            (
                "lora_unet_time_embedding_linear_1.lora_down.weight",
                vec![4, 4],
            ),
            (
                "lora_unet_time_embedding_linear_1.lora_up.weight",
                vec![16, 2],
            ),
        ],
    );
    let msg = load(&bad_rank);
    assert!(msg.contains("lora_unet_time_embedding_linear_1"), "{msg}");
}

#[test]
fn dora_merges_as_peft_computes_it_and_is_refused_where_it_cannot_apply() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let a = load(&m, "lora-layers/dora.peft.safetensors");
    assert_eq!(a.layers.len(), 210);
    assert!(matches!(a.source, hdb::adapter::AdapterSource::Dora { .. }));
    let want = reference("dora.out.safetensors", "out");
    let got = unet_run(&unet, &[(&a, 1.0)], ApplyMode::Merge, None);
    assert_close("dora merge", &got, &want, TOL);
    let base = unet_run(&unet, &[], ApplyMode::Merge, None);
    assert_eq!(unet_run(&unet, &[], ApplyMode::Merge, None), base);
    // Runtime mode, stacking and kohya export refuse it; PEFT export keeps the magnitudes.
    let e = Applied::new(&[(&a, 1.0)], ApplyMode::Runtime, &unet).expect_err("runtime");
    assert!(e.to_string().contains("DoRA"), "{e}");
    let e = hdb::adapter::stack(&[(&a, 1.0)]).expect_err("stack");
    assert!(e.to_string().contains("DoRA"), "{e}");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("k.safetensors");
    let e = lora::export(&a, lora::LoraFormat::Kohya, &p).expect_err("kohya");
    assert!(e.to_string().contains("DoRA"), "{e}");
    let p = dir.path().join("p.safetensors");
    lora::export(&a, lora::LoraFormat::Peft, &p).expect("peft");
    let back = hdb::adapter::load(
        &SafetensorsFile::open(&p).expect("open"),
        &m.adaptable_layers(),
    )
    .expect("reimport");
    assert_close(
        "dora re-imported, merged",
        &unet_run(&unet, &[(&back, 1.0)], ApplyMode::Merge, None),
        &want,
        TOL,
    );
}
