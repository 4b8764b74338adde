//! LyCORIS layouts only LyCORIS writes, against LyCORIS' own merge on the tiny model
//! (tools/make_lycoris_fixtures.py, lycoris-lora pinned in tools/requirements.txt):
//! CP-decomposed (Tucker) convolutions of LoCon (`lora_mid`), LoHa (`hada_t1`/`hada_t2`) and
//! LoKr (`lokr_t2`), and DoRA `dora_scale` per output row and per input channel, each merged at
//! multiplier 1.0 and 0.6 (LyCORIS' DoRA interpolates its rescale by the multiplier). Tolerance:
//! 1e-4 x max|reference|, as tests/lora_layers.rs.

mod common;

use std::path::PathBuf;

use common::{assert_close, fixtures, Tol};
use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::{Adapter, AdapterSource, DoraStyle};
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::unet::Unet;
use hdb::model::Model;

const TOL: Tol = Tol::MaxAbsOfRef(1e-4);

fn fx(p: &str) -> PathBuf {
    fixtures().join(p)
}

fn model() -> Model {
    Model::load(&fx("tiny-sd"), Default::default()).expect("tiny-sd")
}

fn load(m: &Model, path: &std::path::Path) -> hdb::Result<Adapter> {
    let f = SafetensorsFile::open(path)?;
    hdb::adapter::load(&f, &m.adaptable_layers())
}

fn unet_run(unet: &Unet, set: &[(&Adapter, f32)]) -> Vec<f32> {
    let applied = Applied::new(set, ApplyMode::Merge, unet).expect("apply");
    let ad = AdapterCtx {
        applied: &applied,
        per_sample: None,
    };
    unet.forward_adapted(&common::read_input("tiny-sd").args(), &ad)
        .expect("forward")
}

/// (fixture, layout, DoRA per output row)
const CASES: [(&str, &str, bool); 3] = [
    ("locon-tucker-dora", "DoRA", true),
    ("loha-tucker-dora-in", "LoHa", false),
    ("lokr-tucker", "LoKr", true),
];

#[test]
fn tucker_and_dora_scale_merge_as_lycoris_does_at_any_multiplier() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let base = unet_run(&unet, &[]);
    for (name, layout, on_out) in CASES {
        let a = load(&m, &fx(&format!("lycoris/{name}.safetensors")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.layers.len(), 160, "{name}");
        match &a.source {
            AdapterSource::Dora {
                layout: l,
                magnitudes,
            } => {
                assert_eq!(*l, layout, "{name}");
                assert_eq!(magnitudes.len(), 160, "{name}");
                assert!(
                    magnitudes
                        .values()
                        .all(|d| d.on_out == on_out && d.style == DoraStyle::Lycoris),
                    "{name}"
                );
            }
            other => panic!("{name}: read as {other:?}"),
        }
        for (scale, suffix) in [(1.0, ""), (0.6, "-x0.6")] {
            let want =
                SafetensorsFile::open(&fx(&format!("lycoris/{name}{suffix}.out.safetensors")))
                    .expect("reference")
                    .to_f32("out")
                    .expect("out");
            assert_close(
                &format!("{name} x{scale}"),
                &unet_run(&unet, &[(&a, scale)]),
                &want,
                TOL,
            );
        }
        // Runtime mode refuses it naming the layout; clearing restores the base bit for bit.
        let e = hdb::adapter::set::AdapterSet::build(
            unet.backend(),
            &unet,
            &[(&a, 1.0)],
            ApplyMode::Runtime,
            None,
        )
        .expect_err("runtime mode");
        assert!(
            e.to_string().contains(layout) && e.to_string().contains("merge mode"),
            "{name}: {e}"
        );
        assert_eq!(unet_run(&unet, &[]), base, "{name}: cleared");
    }
}

/// `file` with tensor `name` replaced by (or added as) `shape` filled with `value`.
fn with_tensor(file: &str, name: &str, shape: &[usize], value: f32, out: &std::path::Path) {
    common::rewrite_safetensors(&fx(file), out, &[], &[(name, shape.to_vec(), value)]);
}

#[test]
fn bad_tucker_cores_and_dora_scales_are_errors_naming_the_key() {
    let m = model();
    let dir = tempfile::tempdir().expect("tempdir");
    let conv = "lora_unet_down_blocks_0_resnets_0_conv1";
    let attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let cases: [(&str, String, Vec<usize>, f32, &str); 7] = [
        // a core whose rank disagrees with its factors
        (
            "locon-tucker-dora",
            format!("{conv}.lora_mid.weight"),
            vec![3, 3, 3, 3],
            0.1,
            "lora_mid",
        ),
        (
            "loha-tucker-dora-in",
            format!("{conv}.hada_t1"),
            vec![3, 2, 3, 3],
            0.1,
            "hada_t1",
        ),
        (
            "lokr-tucker",
            format!("{conv}.lokr_t2"),
            vec![2, 2, 3],
            0.1,
            "lokr_t2",
        ),
        // a dora_scale of neither [out, 1] nor [1, in]
        (
            "locon-tucker-dora",
            format!("{attn}.dora_scale"),
            vec![3, 1],
            1.0,
            "dora_scale",
        ),
        (
            "loha-tucker-dora-in",
            format!("{conv}.dora_scale"),
            vec![1, 5, 1, 1],
            1.0,
            "dora_scale",
        ),
        // NaN and negative magnitudes
        (
            "locon-tucker-dora",
            format!("{attn}.dora_scale"),
            vec![32, 1],
            f32::NAN,
            "dora_scale",
        ),
        (
            "lokr-tucker",
            format!("{attn}.dora_scale"),
            vec![32, 1],
            -1.0,
            "dora_scale",
        ),
    ];
    for (i, (file, name, shape, value, want)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("{i}.safetensors"));
        with_tensor(
            &format!("lycoris/{file}.safetensors"),
            &name,
            &shape,
            value,
            &p,
        );
        let e = load(&m, &p).expect_err(&name);
        let msg = e.to_string();
        let layer = if name.starts_with(conv) {
            "down_blocks.0.resnets.0.conv1"
        } else {
            "attn1.to_q"
        };
        assert!(
            msg.contains(want) && (msg.contains(layer) || msg.contains(&name)),
            "case {i} ({name}): {msg}"
        );
    }
    // Factors whose product would be far larger than the layer (1e5 x 1e5) are refused before
    // it is computed.
    let p2 = dir.path().join("big.safetensors");
    let (w1a, w1b) = (format!("{attn}.hada_w1_a"), format!("{attn}.hada_w1_b"));
    common::rewrite_safetensors(
        &fx("lycoris/loha-tucker-dora-in.safetensors"),
        &p2,
        &[],
        &[
            (w1a.as_str(), vec![100_000, 2], 0.1),
            (w1b.as_str(), vec![2, 100_000], 0.1),
        ],
    );
    let msg = load(&m, &p2).expect_err("huge").to_string();
    assert!(
        msg.contains("attn1.to_q") && msg.contains("larger than the layer"),
        "{msg}"
    );
    // Half a Tucker LoHa.
    let p = dir.path().join("half.safetensors");
    let t2 = format!("{conv}.hada_t2");
    common::rewrite_safetensors(
        &fx("lycoris/loha-tucker-dora-in.safetensors"),
        &p,
        &[t2.as_str()],
        &[],
    );
    let msg = load(&m, &p).expect_err("half").to_string();
    assert!(
        msg.contains("resnets.0.conv1") && msg.contains("hada_t2"),
        "{msg}"
    );
}

#[test]
fn lycoris_dora_is_not_exported_as_peft_dora() {
    let m = model();
    let a = load(&m, &fx("lycoris/locon-tucker-dora.safetensors")).expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    let e = a
        .save(&dir.path().join("out.safetensors"))
        .expect_err("LyCORIS DoRA as PEFT");
    assert!(e.to_string().contains("dora_scale"), "{e}");
    assert!(!dir.path().join("out.safetensors").exists());
}
