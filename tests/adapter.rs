//! Identity adapters against the references of tools/make_adapter_fixtures.py: the basis
//! against an independent numpy implementation, and the UNet with LiDB / kohya / PEFT adapters
//! in both apply modes against diffusers + peft on the same weights and inputs.

mod common;

use std::path::PathBuf;

use common::{assert_close, compare, Tol};
use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::{basis::basis, lidb::Lidb, lora, Adapter};
use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::model::unet::{Unet, UnetInput};
use hdb::model::Model;

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn model() -> Model {
    Model::load(&fx("tiny-sd"), Default::default()).expect("tiny-sd")
}

fn adapter(m: &Model, file: &str) -> Adapter {
    let f = SafetensorsFile::open(&fx(&format!("adapter/{file}"))).expect("adapter file");
    hdb::adapter::load(&f, &m.adaptable_layers()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

struct Inputs {
    sample: Vec<f32>,
    t: Vec<f32>,
    ctx: Vec<f32>,
    dims: [usize; 4],
}

fn inputs() -> Inputs {
    let f = SafetensorsFile::open(&fx("unet/tiny-sd.in.safetensors")).expect("inputs");
    let (s, sample) = read_as_f32(&f, "sample").expect("sample");
    let (_, t) = read_as_f32(&f, "timestep").expect("timestep");
    let (c, ctx) = read_as_f32(&f, "encoder_hidden_states").expect("context");
    Inputs {
        sample,
        t,
        ctx,
        dims: [s[0], s[2], s[3], c[1]],
    }
}

impl Inputs {
    fn args(&self) -> UnetInput<'_> {
        let [batch, height, width, context_len] = self.dims;
        UnetInput {
            sample: &self.sample,
            timesteps: &self.t,
            context: &self.ctx,
            batch,
            height,
            width,
            context_len,
        }
    }
}

fn reference(file: &str) -> Vec<f32> {
    SafetensorsFile::open(&fx(file))
        .expect("reference")
        .to_f32("out")
        .expect("out")
}

fn run(
    unet: &Unet,
    set: &[(&Adapter, f32)],
    mode: ApplyMode,
    per_sample: Option<&[i32]>,
) -> Vec<f32> {
    let applied = Applied::new(set, mode, unet).expect("apply");
    let inp = inputs();
    unet.forward_adapted(
        &inp.args(),
        &AdapterCtx {
            applied: &applied,
            per_sample,
        },
    )
    .expect("forward")
}

#[test]
fn basis_equals_the_numpy_implementation() {
    let f = SafetensorsFile::open(&fx("adapter/basis.safetensors")).expect("basis fixture");
    let meta = f.metadata();
    let seed: u64 = meta["basis_seed"].parse().expect("seed");
    let (a, b): (usize, usize) = (meta["a"].parse().expect("a"), meta["b"].parse().expect("b"));
    let mut table = hdb::model::adaptable::identity_layers(&model().adaptable_layers());
    table.retain(|k, _| k.starts_with("unet."));
    assert_eq!(
        table.len(),
        128,
        "SD 1.5-shaped UNet: 128 adapted projections"
    );
    let mut worst = 0f64;
    let mut check = |key: &str, a: usize, b: usize, din: usize, dout: usize| {
        let bs = basis(key, seed, a, b, din, dout).expect("basis");
        for (name, got) in [("d_aux", &bs.d_aux), ("u_aux", &bs.u_aux)] {
            let want = f
                .to_f32(&format!("{key}.{name}"))
                .expect("reference tensor");
            let what = format!("{key}.{name} against numpy");
            let d = common::check(&what, got, &want, Tol::MaxAbs(1e-6))
                .unwrap_or_else(|e| panic!("{e}"));
            worst = worst.max(d.max_abs);
        }
    };
    for (k, s) in &table {
        check(k, a, b, s.din, s.dout);
    }
    for k in meta["synthetic"].split(',') {
        let p = |f: &str| {
            meta[&format!("{k}.{f}")]
                .parse::<usize>()
                .expect("synthetic dims")
        };
        check(k, p("a"), p("b"), p("in"), p("out"));
    }
    println!("basis: worst abs difference to numpy {worst:e}");
}

#[test]
fn lidb_in_both_modes_equals_diffusers_with_peft() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let id1 = adapter(&m, "id1.lidb.safetensors");
    let want = reference("adapter/id1.out.safetensors");
    assert_close(
        "id1 merge",
        &run(&unet, &[(&id1, 1.0)], ApplyMode::Merge, None),
        &want,
        Tol::MaxAbsOfRef(1e-4),
    );
    assert_close(
        "id1 runtime",
        &run(&unet, &[(&id1, 1.0)], ApplyMode::Runtime, None),
        &want,
        Tol::MaxAbsOfRef(1e-4),
    );
    let base = reference("unet/tiny-sd.out.safetensors");
    let change = compare(&want, &base);
    assert!(
        change.non_finite == 0 && change.max_abs > 1e-2,
        "the adapter must visibly change the output (max change {:e})",
        change.max_abs
    );
}

#[test]
fn kohya_and_peft_files_import_as_the_same_adapter() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let want = reference("adapter/id1.out.safetensors");
    for file in ["id1.kohya.safetensors", "id1.peft.safetensors"] {
        let a = adapter(&m, file);
        assert_close(
            file,
            &run(&unet, &[(&a, 1.0)], ApplyMode::Merge, None),
            &want,
            Tol::MaxAbsOfRef(1e-4),
        );
    }
    assert_close(
        "diffusers' own kohya loading",
        &reference("adapter/id1-kohya.out.safetensors"),
        &want,
        Tol::MaxAbsOfRef(1e-5),
    );
}

#[test]
fn two_weighted_adapters_and_a_partial_one_match_diffusers() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let (id1, id2) = (
        adapter(&m, "id1.lidb.safetensors"),
        adapter(&m, "id2.lidb.safetensors"),
    );
    let want = reference("adapter/id1x0.7-id2x0.5.out.safetensors");
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let got = run(&unet, &[(&id1, 0.7), (&id2, 0.5)], mode, None);
        assert_close(
            &format!("id1x0.7 + id2x0.5 {mode:?}"),
            &got,
            &want,
            Tol::MaxAbsOfRef(1e-4),
        );
    }
    let half = adapter(&m, "id1-half.lidb.safetensors");
    assert_eq!(half.layers.len(), 64);
    let got = run(&unet, &[(&half, 1.0)], ApplyMode::Runtime, None);
    assert_close(
        "id1-half",
        &got,
        &reference("adapter/id1-half.out.safetensors"),
        Tol::MaxAbsOfRef(1e-4),
    );
}

#[test]
fn one_identity_per_sample_equals_separate_runs() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let (id1, id2) = (
        adapter(&m, "id1.lidb.safetensors"),
        adapter(&m, "id2.lidb.safetensors"),
    );
    let got = run(
        &unet,
        &[(&id1, 1.0), (&id2, 1.0)],
        ApplyMode::Runtime,
        Some(&[0, 1]),
    );
    assert_close(
        "per-sample [id1, id2]",
        &got,
        &reference("adapter/per-sample.out.safetensors"),
        Tol::MaxAbsOfRef(1e-4),
    );
    // -1 leaves a sample on the base model.
    let got = run(&unet, &[(&id1, 1.0)], ApplyMode::Runtime, Some(&[-1, 0]));
    let (base, one) = (
        reference("unet/tiny-sd.out.safetensors"),
        reference("adapter/id1.out.safetensors"),
    );
    let half = base.len() / 2;
    assert_close(
        "sample 0 without adapter",
        &got[..half],
        &base[..half],
        Tol::MaxAbsOfRef(1e-4),
    );
    assert_close(
        "sample 1 with id1",
        &got[half..],
        &one[half..],
        Tol::MaxAbsOfRef(1e-4),
    );
}

#[test]
fn switching_back_to_no_adapter_restores_the_base_bit_for_bit() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let inp = inputs();
    let base = unet.forward(&inp.args()).expect("base");
    let id1 = adapter(&m, "id1.lidb.safetensors");
    let with = run(&unet, &[(&id1, 1.0)], ApplyMode::Merge, None);
    assert_ne!(with, base);
    let none = run(&unet, &[], ApplyMode::Merge, None);
    assert_eq!(
        none, base,
        "an empty merged set must run the pristine weights"
    );
    assert_eq!(
        unet.forward(&inp.args()).expect("again"),
        base,
        "the shared model never changes"
    );
}

#[test]
fn lidb_save_load_roundtrip_and_sd15_size() {
    let l = Lidb::load(&fx("adapter/id2.lidb.safetensors")).expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("x.safetensors");
    l.save(&p).expect("save");
    assert_eq!(Lidb::load(&p).expect("reload"), l);
    // An SD 1.5 identity: its 176 real layer keys, r = 1, a = 100, b = 50, f32.
    let mut keys = Vec::new();
    let blocks =
        (0..3).flat_map(|i| (0..2).map(move |j| format!("down_blocks.{i}.attentions.{j}")));
    let blocks = blocks
        .chain((1..4).flat_map(|i| (0..3).map(move |j| format!("up_blocks.{i}.attentions.{j}"))))
        .chain(std::iter::once("mid_block.attentions.0".to_string()));
    for blk in blocks {
        for attn in ["attn1", "attn2"] {
            for p in ["to_q", "to_k", "to_v", "to_out.0"] {
                keys.push(format!("unet.{blk}.transformer_blocks.0.{attn}.{p}"));
            }
        }
    }
    for i in 0..12 {
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            keys.push(format!(
                "text_encoder.text_model.encoder.layers.{i}.self_attn.{p}"
            ));
        }
    }
    assert_eq!(keys.len(), 176);
    let mut big = l.clone();
    (big.meta.rank, big.meta.a, big.meta.b) = (1, 100, 50);
    big.layers = keys
        .into_iter()
        .map(|k| (k, (vec![0.5; 100], vec![0.25; 50])))
        .collect();
    big.save(&p).expect("save");
    let size = std::fs::metadata(&p).expect("size").len();
    let bytes = std::fs::read(&p).expect("read");
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    println!(
        "SD 1.5 LiDB adapter in f32: {size} bytes ({} of weights, {header} of header)",
        size - header
    );
    // The weights are exactly 176 x 150 x 4 bytes. Version 1's per-layer tensor names made a
    // 47 KB header (152.8 KB in all); version 2 packs them, and its front-coded key list and
    // metadata fit in a few KB, under the 110 KB.
    assert_eq!(size - header, 176 * 150 * 4);
    assert!(header < 4096, "header {header} bytes");
    assert!(size <= 110 * 1024, "{size} bytes");
    assert_eq!(Lidb::load(&p).expect("reload"), big);
}

#[test]
fn export_to_kohya_and_peft_reimports_to_the_same_factors() {
    let m = model();
    let table = m.adaptable_layers();
    let id2 = adapter(&m, "id2.lidb.safetensors");
    let dir = tempfile::tempdir().expect("tempdir");
    for fmt in [lora::LoraFormat::Kohya, lora::LoraFormat::Peft] {
        let p = dir.path().join(format!("{fmt:?}.safetensors"));
        lora::export(&id2, fmt, &p).expect("export");
        let back =
            hdb::adapter::load(&SafetensorsFile::open(&p).expect("open"), &table).expect("import");
        for (k, l) in &id2.layers {
            let b = &back.layers[k];
            assert_eq!((b.rank, &b.down), (l.rank, &l.down), "{fmt:?} {k} down");
            assert_close(&format!("{fmt:?} {k} up"), &b.up, &l.up, Tol::MaxAbs(1e-6));
        }
    }
}

fn load_err(m: &Model, bytes: Vec<u8>) -> hdb::Error {
    let f = match SafetensorsFile::from_vec(std::path::Path::new("bad.safetensors"), bytes) {
        Ok(f) => f,
        Err(e) => return e,
    };
    hdb::adapter::load(&f, &m.adaptable_layers()).expect_err("must be refused")
}

fn saved(l: &Lidb) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("a.safetensors");
    l.save(&p).expect("save");
    std::fs::read(&p).expect("read")
}

#[test]
fn bad_adapters_are_clear_errors_naming_the_layer() {
    let m = model();
    let good = Lidb::load(&fx("adapter/id1.lidb.safetensors")).expect("id1");
    let first = good.layers.keys().next().expect("a layer").clone();

    let mut nan = good.clone();
    nan.layers.get_mut(&first).expect("layer").0[0] = f32::NAN;
    let e = load_err(&m, saved(&nan));
    assert!(
        matches!(e, hdb::Error::AdapterMismatch(_)) && e.to_string().contains(&first),
        "{e}"
    );

    let mut other_base = good.clone();
    let v = other_base.layers.remove(&first).expect("layer");
    other_base.layers.insert(
        "unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q".into(),
        v,
    );
    let e = load_err(&m, saved(&other_base));
    assert!(
        matches!(e, hdb::Error::AdapterMismatch(_)) && e.to_string().contains("down_blocks.9"),
        "{e}"
    );

    let mut too_wide = good.clone();
    too_wide.meta.a = 5; // the first layers are 4 wide
    too_wide
        .layers
        .values_mut()
        .for_each(|(d, _)| d.resize(5, 0.1));
    let e = load_err(&m, saved(&too_wide));
    assert!(
        matches!(e, hdb::Error::AdapterMismatch(_)) && e.to_string().contains("a = 5"),
        "{e}"
    );

    let bytes = saved(&good);
    let e = load_err(&m, bytes[..bytes.len() - 7].to_vec());
    assert!(
        matches!(e, hdb::Error::InvalidFile { .. }),
        "truncated: {e}"
    );

    // Same-length edits of the JSON header.
    let edit = |from: &str, to: &str| -> Vec<u8> {
        let (f, t) = (from.as_bytes(), to.as_bytes());
        let at = bytes
            .windows(f.len())
            .position(|w| w == f)
            .unwrap_or_else(|| panic!("no {from} in the header"));
        let mut v = bytes.clone();
        v[at..at + t.len()].copy_from_slice(t);
        v
    };
    let e = load_err(&m, edit("\"rank\":\"1\"", "\"rank\":\"0\""));
    assert!(e.to_string().contains("'rank'"), "rank 0: {e}");
    // hdb writes version 2: the packed lidb_down is [L, r, a].
    let l = good.layers.len();
    let e = load_err(
        &m,
        edit(
            &format!("\"shape\":[{l},1,3]"),
            &format!("\"shape\":[{l},3,1]"),
        ),
    );
    assert!(
        e.to_string().contains("lidb_down")
            && e.to_string().contains(&format!("expected [{l}, 1, 3]")),
        "{e}"
    );
    // Version 2's front-coded layer list: a count past the previous key is an error naming
    // the metadata field.
    let e = load_err(&m, edit("\"layers\":\"0:", "\"layers\":\"9:"));
    assert!(e.to_string().contains("'layers'"), "layers: {e}");
}

#[test]
fn version_2_files_with_missing_or_extra_parts_are_clear_errors() {
    let meta = |layers: Option<&str>| {
        let mut m: Vec<(String, String)> = [
            ("format", "hdb-lidb"),
            ("version", "2"),
            ("rank", "1"),
            ("a", "2"),
            ("b", "1"),
            ("basis_seed", "7"),
            ("alpha", "1.0"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if let Some(l) = layers {
            m.push(("layers".into(), l.into()));
        }
        m
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let load = |name: &str, tensors: &[(&str, Vec<usize>, &[f32])], m: Vec<(String, String)>| {
        let p = dir.path().join(name);
        hdb::io::safetensors::write_f32_with_metadata(&p, tensors, &m).expect("write");
        Lidb::load(&p).expect_err(name).to_string()
    };
    let (d, u, x) = ([0.5f32, 0.25], [1.0f32], [0.0f32]);
    let two = |extra: bool| {
        let mut t: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("lidb_down", vec![1, 1, 2], &d),
            ("lidb_up", vec![1, 1, 1], &u),
        ];
        if extra {
            t.push(("stray", vec![1], &x));
        }
        t
    };
    let e = load("no-layers.safetensors", &two(false), meta(None));
    assert!(e.contains("metadata has no 'layers'"), "{e}");
    let e = load("extra.safetensors", &two(true), meta(Some("0:unet.x")));
    assert!(e.contains("unexpected tensor 'stray'"), "{e}");
    let e = load(
        "count.safetensors",
        &two(false),
        meta(Some("0:unet.x\n5:y")),
    );
    assert!(
        e.contains("'lidb_down' has shape [1, 1, 2], expected [2, 1, 2] (2 layers in 'layers')"),
        "{e}"
    );
    let e = load(
        "missing.safetensors",
        &two(false)[..1],
        meta(Some("0:unet.x")),
    );
    assert!(e.contains("no tensor 'lidb_up'"), "{e}");
}

#[test]
fn version_1_files_still_load_and_version_2_round_trips() {
    // The fixtures were written in version 1 (per-layer tensors).
    let p = fx("adapter/id1.lidb.safetensors");
    let f = SafetensorsFile::open(&p).expect("open");
    assert_eq!(f.metadata().get("version").map(String::as_str), Some("1"));
    let v1 = Lidb::from_safetensors(&f).expect("v1");
    let dir = tempfile::tempdir().expect("tempdir");
    let q = dir.path().join("id1.v2.safetensors");
    v1.save(&q).expect("save");
    let f2 = SafetensorsFile::open(&q).expect("open v2");
    assert_eq!(f2.metadata().get("version").map(String::as_str), Some("2"));
    let names: Vec<&str> = f2.tensors().map(|e| e.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(Lidb::load(&q).expect("reload"), v1);
}

#[test]
fn lora_keys_that_match_no_layer_are_reported_not_dropped() {
    let m = model();
    let f = SafetensorsFile::open(&fx("adapter/id1.peft.safetensors")).expect("peft");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f
        .tensors()
        .map(|e| {
            (
                e.name.clone(),
                e.shape.dims().to_vec(),
                f.to_f32(&e.name).expect("f32"),
            )
        })
        .collect();
    tensors.push((
        "unet.down_blocks.0.resnets.0.norm1.lora_A.weight".into(),
        vec![1, 4],
        vec![0.0; 4],
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("extra.safetensors");
    let refs: Vec<(&str, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice()))
        .collect();
    hdb::io::safetensors::write_f32(&p, &refs).expect("write");
    let e = hdb::adapter::load(
        &SafetensorsFile::open(&p).expect("open"),
        &m.adaptable_layers(),
    )
    .expect_err("extra key");
    let msg = e.to_string();
    assert!(
        msg.contains("1 key(s)") && msg.contains("resnets.0.norm1"),
        "{msg}"
    );
}

#[test]
fn per_sample_indices_are_checked() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let id1 = adapter(&m, "id1.lidb.safetensors");
    let inp = inputs();
    let runtime = Applied::new(&[(&id1, 1.0)], ApplyMode::Runtime, &unet).expect("apply");
    for (idx, why) in [
        (&[0, 1][..], "index 1"),
        (&[0][..], "1 entries"),
        (&[-2, 0][..], "index -2"),
    ] {
        let ad = AdapterCtx {
            applied: &runtime,
            per_sample: Some(idx),
        };
        let e = unet
            .forward_adapted(&inp.args(), &ad)
            .expect_err("bad indices");
        assert!(
            e.to_string().contains("'adapter_index'") && e.to_string().contains(why),
            "{e}"
        );
    }
    let merged = Applied::new(&[(&id1, 1.0)], ApplyMode::Merge, &unet).expect("apply");
    let ad = AdapterCtx {
        applied: &merged,
        per_sample: Some(&[0, 0]),
    };
    let e = unet
        .forward_adapted(&inp.args(), &ad)
        .expect_err("merge + indices");
    assert!(e.to_string().contains("runtime"), "{e}");
}

#[test]
fn a_failed_replacement_leaves_the_previous_set_usable() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let id1 = adapter(&m, "id1.lidb.safetensors");
    let mut bad = adapter(&m, "id2.lidb.safetensors");
    let layer = bad.layers.values_mut().last().expect("a layer");
    layer.up.truncate(layer.up.len() - 1);
    let mut previous = Applied::new(&[(&id1, 1.0)], ApplyMode::Merge, &unet).expect("merge");
    let before: Vec<Vec<f32>> = previous
        .layers
        .values()
        .map(|l| l.merged.as_deref().expect("merged").to_vec())
        .collect();
    let e = Applied::replacing(
        Some(&mut previous),
        &[(&id1, 1.0), (&bad, 1.0)],
        ApplyMode::Merge,
        &unet,
    )
    .expect_err("misfit factors");
    assert!(matches!(e, hdb::Error::AdapterMismatch(_)), "{e}");
    let after: Vec<Vec<f32>> = previous
        .layers
        .values()
        .map(|l| l.merged.as_deref().expect("still merged").to_vec())
        .collect();
    assert_eq!(before, after, "the previous set must stay usable");
}

#[test]
fn factors_that_do_not_fit_the_target_are_a_mismatch_not_a_panic() {
    let m = model();
    let unet = Unet::from_model(&m).expect("unet");
    let mut bad = adapter(&m, "id1.lidb.safetensors");
    let (key, layer) = bad.layers.iter_mut().next().expect("a layer");
    let key = key.clone();
    layer.down.truncate(layer.down.len() - 1);
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let e = Applied::new(&[(&bad, 1.0)], mode, &unet).expect_err("misfit factors");
        assert!(
            matches!(e, hdb::Error::AdapterMismatch(_)) && e.to_string().contains(&key),
            "{mode:?}: {e}"
        );
    }
}
