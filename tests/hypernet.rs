//! The hypernetwork against its PyTorch reference (tools/hypernet_ref.py: timm's
//! VisionTransformer, torch's TransformerDecoderLayer, Pillow's resize), stage by stage:
//! preprocessing (1e-5 absolute: the resize is Pillow's algorithm step for step), encoder
//! tokens, decoder output, theta after 1, 2 and 4 iterations (each 1e-4 x max|reference|).
//! Two networks: `tiny` (a small ViT, d_model 64, 2 decoder layers, 5 of tiny-sd's layers,
//! weights stored f16 in the file; the reference ran in f32 on the same rounded values) and
//! `default-shapes` (the default decoder and token shapes, d_model 1024, 8 heads, 4 layers,
//! a 100, b 50, with a one-block ViT-H/14-wide encoder, on 8 of SD 1.5's layers; its weights are
//! hdb's RandomWeights, which the reference reproduces value for value).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, Tol};
use hdb::adapter::lidb::Lidb;
use hdb::hypernet::{preprocess, Hypernet, HypernetConfig};
use hdb::io::safetensors::{write_f32_with_metadata, SafetensorsFile};
use hdb::model::Model;
use hdb::Error;
use hdb::{model::random::RandomWeights, rng::SplitMix64};

/// The encoder's tokens, the decoder's output and theta: within 1e-4 x max|reference|.
const TOL: Tol = Tol::MaxAbsOfRef(1e-4);

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn open(p: &str) -> SafetensorsFile {
    SafetensorsFile::open(&fx(p)).unwrap_or_else(|e| panic!("fixture {p}: {e}"))
}

fn tensor(f: &SafetensorsFile, name: &str) -> Vec<f32> {
    f.to_f32(name)
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"))
}

/// tools/hypernet_ref.py's `test_image`: byte i of the RGB8 image (row-major y, x, c) is the top
/// byte of output i of a splitmix64 started at `seed`.
fn test_image(w: usize, h: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64(seed);
    (0..w * h * 3)
        .map(|_| (rng.next_u64() >> 56) as u8)
        .collect()
}

/// The same image with rows `pad` bytes longer than needed, the padding filled with noise.
fn padded(rgb: &[u8], w: usize, pad: usize) -> Vec<u8> {
    rgb.chunks_exact(w * 3)
        .flat_map(|row| row.iter().copied().chain((0..pad).map(|i| (i * 37) as u8)))
        .collect()
}

fn clip_mean() -> [f32; 3] {
    hdb::hypernet::vit::OPENAI_CLIP_MEAN.map(|v| v as f32)
}

fn clip_std() -> [f32; 3] {
    hdb::hypernet::vit::OPENAI_CLIP_STD.map(|v| v as f32)
}

#[test]
fn preprocessing_matches_pillow() {
    let f = open("hypernet/preprocess.safetensors");
    // (width, height, img_size, seed), as PRE_CASES in tools/hypernet_ref.py.
    let cases = [
        (37, 23, 32, 1),
        (53, 71, 32, 2),
        (97, 97, 32, 3),
        (16, 16, 32, 4),
        (301, 200, 32, 5),
        (32, 40, 32, 6),
        (640, 480, 61, 7),
        (45, 50, 61, 8),
    ];
    for (w, h, s, seed) in cases {
        let want = tensor(&f, &format!("pre.{w}x{h}.{s}"));
        let rgb = test_image(w, h, seed);
        let got = preprocess(&rgb, w, h, w * 3, s, clip_mean(), clip_std()).expect("preprocess");
        assert_close(
            &format!("preprocess {w}x{h} -> {s}"),
            &got,
            &want,
            Tol::MaxAbs(1e-5),
        );
        let got = preprocess(
            &padded(&rgb, w, 7),
            w,
            h,
            w * 3 + 7,
            s,
            clip_mean(),
            clip_std(),
        )
        .expect("preprocess with a stride");
        assert_close(
            &format!("preprocess {w}x{h} -> {s}, stride"),
            &got,
            &want,
            Tol::MaxAbs(1e-5),
        );
    }
}

/// Runs one network on the reference's image and compares every stage it stored.
fn compare_stages(name: &str, net: &Hypernet, rgb: (&[u8], usize, usize), reference: &str) {
    let f = open(reference);
    let image = net
        .preprocess(rgb.0, rgb.1, rgb.2, rgb.1 * 3)
        .expect("preprocess");
    assert_close(
        &format!("{name} preprocessed image"),
        &image,
        &tensor(&f, "image"),
        Tol::MaxAbs(1e-5),
    );
    let trace = net.predict_trace(&image, Some(4), None).expect("predict");
    assert_close(
        &format!("{name} encoder tokens"),
        &trace.image_tokens,
        &tensor(&f, "tokens"),
        TOL,
    );
    for i in [1, 2] {
        if f.get(&format!("decoded.{i}")).is_some() {
            assert_close(
                &format!("{name} decoder output, iteration {i}"),
                &trace.decoded[i - 1],
                &tensor(&f, &format!("decoded.{i}")),
                TOL,
            );
        }
    }
    for i in [1, 2, 4] {
        assert_close(
            &format!("{name} theta after {i} iteration(s)"),
            &trace.thetas[i - 1],
            &tensor(&f, &format!("theta.{i}")),
            TOL,
        );
    }
}

fn tiny() -> Hypernet {
    Hypernet::load(&fx("hypernet/tiny.hypernet.safetensors")).expect("tiny hypernetwork")
}

#[test]
fn tiny_hypernet_matches_pytorch() {
    let net = tiny();
    assert_eq!(net.config.layer_keys.len(), 5);
    compare_stages(
        "tiny",
        &net,
        (&test_image(53, 71, 2), 53, 71),
        "hypernet/tiny.ref.safetensors",
    );
}

#[test]
fn default_shapes_match_pytorch() {
    let f = open("hypernet/default-shapes.ref.safetensors");
    let meta = f.metadata();
    let config = HypernetConfig::from_json(&meta["config"], f.path()).expect("config");
    let seed: u64 = meta["seed"].parse().expect("seed");
    let d = HypernetConfig::default();
    assert_eq!(
        (
            config.d_model,
            config.heads,
            config.layers,
            config.token_dim()
        ),
        (d.d_model, d.heads, d.layers, d.token_dim()),
        "the fixture has the default decoder shapes"
    );
    assert_eq!(config.encoder.width, d.encoder.width);
    let net = Hypernet::from_source(config, &RandomWeights { seed }).expect("random weights");
    compare_stages(
        "default shapes",
        &net,
        (&test_image(50, 47, 9), 50, 47),
        "hypernet/default-shapes.ref.safetensors",
    );
}

#[test]
fn default_iterations_progress_and_cancel() {
    let net = tiny();
    let f = open("hypernet/tiny.ref.safetensors");
    let image = tensor(&f, "image");
    let mut calls = Vec::new();
    let mut record = |done: usize, total: usize| {
        calls.push((done, total));
        true
    };
    let theta = net
        .predict(&image, None, Some(&mut record))
        .expect("predict");
    assert_eq!(calls, [(1, 4), (2, 4), (3, 4), (4, 4)], "config default: 4");
    assert_close(
        "theta, default iterations",
        &theta,
        &tensor(&f, "theta.4"),
        TOL,
    );
    let theta2 = net.predict(&image, Some(2), None).expect("predict 2");
    assert_close("theta, 2 iterations", &theta2, &tensor(&f, "theta.2"), TOL);
    let mut stop = |done: usize, _: usize| done < 2;
    let r = net.predict(&image, None, Some(&mut stop));
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    let r = net.predict(&image, Some(0), None);
    assert!(
        matches!(
            r,
            Err(Error::InvalidArgument {
                name: "iterations",
                ..
            })
        ),
        "{r:?}"
    );
    let r = net.predict(&image[1..], None, None);
    assert!(
        matches!(r, Err(Error::InvalidArgument { name: "image", .. })),
        "{r:?}"
    );
}

#[test]
fn predicted_adapter_is_lidb_v1_for_tiny_sd() {
    let net = tiny();
    let f = open("hypernet/tiny.ref.safetensors");
    let theta = tensor(&f, "theta.4");
    let model = Model::load(&fx("tiny-sd"), Default::default()).expect("tiny-sd");
    let table = model.adaptable_layers();
    net.check_layers(&table).expect("layers match tiny-sd");
    let lidb = net.to_lidb(&theta).expect("to_lidb");
    let c = &net.config;
    assert_eq!(
        (
            lidb.meta.rank,
            lidb.meta.a,
            lidb.meta.b,
            lidb.meta.basis_seed
        ),
        (c.rank, c.a, c.b, c.basis_seed)
    );
    assert_eq!(lidb.meta.alpha, c.alpha);
    let t = c.token_dim();
    for (l, key) in c.layer_keys.iter().enumerate() {
        let (down, up) = &lidb.layers[key];
        assert_eq!(
            down[..],
            theta[l * t..l * t + c.rank * c.a],
            "{key} D_train"
        );
        assert_eq!(
            up[..],
            theta[l * t + c.rank * c.a..(l + 1) * t],
            "{key} U_train"
        );
    }
    lidb.compose(&table).expect("validates against tiny-sd");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("id.lidb.safetensors");
    lidb.save(&path).expect("save");
    assert_eq!(Lidb::load(&path).expect("load"), lidb);
    let f = SafetensorsFile::open(&path).expect("open");
    hdb::adapter::load(&f, &table).expect("loads as an adapter of tiny-sd");
    println!(
        "tiny adapter: {} bytes for {} layers",
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
        lidb.layers.len()
    );

    // A model without one of the layers: the mismatch is named.
    let mut small = table.clone();
    small.remove(&c.layer_keys[2]);
    match net.check_layers(&small) {
        Err(Error::AdapterMismatch(m)) => assert!(m.contains(&c.layer_keys[2]), "{m}"),
        other => panic!("expected AdapterMismatch, got {other:?}"),
    }
    assert!(matches!(
        lidb.compose(&small),
        Err(Error::AdapterMismatch(_))
    ));
    // A layer too narrow for the basis.
    let mut narrow = table.clone();
    if let Some(s) = narrow.get_mut(&c.layer_keys[0]) {
        s.din = c.a - 1;
    }
    assert!(matches!(
        net.check_layers(&narrow),
        Err(Error::AdapterMismatch(_))
    ));
    assert!(matches!(
        net.to_lidb(&theta[1..]),
        Err(Error::InvalidArgument { name: "theta", .. })
    ));
}

#[test]
fn bad_images_are_rejected_naming_the_argument() {
    let rgb = test_image(40, 30, 1);
    let run = |buf: &[u8], w: usize, h: usize, stride: usize| {
        preprocess(buf, w, h, stride, 32, clip_mean(), clip_std())
    };
    let expect = |r: hdb::Result<Vec<f32>>, name: &str, what: &str| match r {
        Err(Error::InvalidArgument { name: n, reason }) => {
            assert_eq!(n, name, "{what}: {reason}");
            println!("{what}: invalid argument '{n}': {reason}");
        }
        other => panic!("{what}: expected InvalidArgument({name}), got {other:?}"),
    };
    expect(run(&rgb, 15, 30, 45), "width", "15 pixels wide");
    expect(run(&rgb, 40, 15, 120), "height", "15 pixels high");
    expect(run(&rgb, 0, 30, 120), "width", "zero width");
    expect(run(&rgb, 40, 0, 120), "height", "zero height");
    expect(
        run(&rgb, 40, 30, 119),
        "stride",
        "stride shorter than a row",
    );
    expect(
        run(&rgb[..rgb.len() - 1], 40, 30, 120),
        "rgb",
        "buffer one byte short",
    );
    expect(run(&rgb, 40, 30, 121), "rgb", "stride past the buffer");
    expect(
        preprocess(&rgb, 40, 30, 120, 0, clip_mean(), clip_std()),
        "img_size",
        "zero output size",
    );
    expect(
        preprocess(&rgb, 40, 30, 120, 32, clip_mean(), [1.0, 0.0, 1.0]),
        "std",
        "zero std",
    );
    // The smallest image, 16x16, is fine; so is a stride with the last row unpadded.
    run(&rgb, 16, 16, 120).expect("16x16 with a stride");
    let net = tiny();
    let mut padded_last = padded(&rgb, 40, 5);
    padded_last.truncate(padded_last.len() - 5);
    let a = net.preprocess(&padded_last, 40, 30, 125).expect("stride");
    let b = net.preprocess(&rgb, 40, 30, 120).expect("tight");
    assert_eq!(a, b);
}

/// The tiny network's config JSON with `edit` applied, written into a file of the same weights.
fn tiny_with_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let f = open("hypernet/tiny.hypernet.safetensors");
    let mut config: serde_json::Value =
        serde_json::from_str(&f.metadata()["config"]).expect("json");
    edit(&mut config);
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f
        .tensors()
        .map(|e| (e.name.clone(), e.shape.dims().to_vec(), tensor(&f, &e.name)))
        .collect();
    let views: Vec<(&str, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice()))
        .collect();
    let path = dir.join("edited.hypernet.safetensors");
    write_f32_with_metadata(&path, &views, &[("config".into(), config.to_string())])
        .expect("write");
    path
}

#[test]
fn bad_hypernetwork_files_name_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Unchanged (f32 instead of f16): loads and predicts the same.
    let p = tiny_with_config(dir.path(), |_| {});
    let net = Hypernet::load(&p).expect("f32 copy");
    let f = open("hypernet/tiny.ref.safetensors");
    let theta = net
        .predict(&tensor(&f, "image"), None, None)
        .expect("predict");
    assert_close("f32 copy theta", &theta, &tensor(&f, "theta.4"), TOL);

    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "encoder.width",
            Box::new(|c| {
                c["encoder"].as_object_mut().map(|o| o.remove("width"));
            }),
        ),
        (
            "layer_keys",
            Box::new(|c| {
                c.as_object_mut().map(|o| o.remove("layer_keys"));
            }),
        ),
        (
            "basis_seed",
            Box::new(|c| {
                c.as_object_mut().map(|o| o.remove("basis_seed"));
            }),
        ),
        (
            "encoder.image_std",
            Box::new(|c| c["encoder"]["image_std"] = serde_json::json!([0.5, 0.5])),
        ),
        (
            "format",
            Box::new(|c| c["format"] = serde_json::json!("hdb-lidb")),
        ),
        ("heads", Box::new(|c| c["heads"] = serde_json::json!(3))),
        (
            "twice",
            Box::new(|c| c["layer_keys"][1] = c["layer_keys"][0].clone()),
        ),
    ];
    for (field, edit) in cases {
        let p = tiny_with_config(dir.path(), edit);
        match Hypernet::load(&p) {
            Err(e @ Error::InvalidFile { .. }) => {
                let m = e.to_string();
                println!("{field}: {m}");
                assert!(m.contains(field), "{field}: {m}");
            }
            other => panic!("{field}: expected InvalidFile, got {other:?}"),
        }
    }
    let p = tiny_with_config(dir.path(), |c| c["version"] = serde_json::json!(2));
    assert!(matches!(Hypernet::load(&p), Err(Error::Unsupported(_))));
    // Config and tensors that disagree: the tensor is named.
    let p = tiny_with_config(dir.path(), |c| c["d_model"] = serde_json::json!(32));
    match Hypernet::load(&p) {
        Err(e) => assert!(e.to_string().contains("feature_proj.weight"), "{e}"),
        Ok(_) => panic!("d_model 32 loaded"),
    }
    let p = tiny_with_config(dir.path(), |c| c["layers"] = serde_json::json!(1));
    match Hypernet::load(&p) {
        Err(e) => assert!(e.to_string().contains("decoder.layers.1"), "{e}"),
        Ok(_) => panic!("layers 1 loaded"),
    }
    // A safetensors file without a config.
    let p = dir.path().join("plain.safetensors");
    write_f32_with_metadata(&p, &[("x", vec![1], &[0.0])], &[]).expect("write");
    match Hypernet::load(&p) {
        Err(e) => assert!(e.to_string().contains("config"), "{e}"),
        Ok(_) => panic!("plain file loaded"),
    }
    assert!(!hdb::hypernet::is_hypernet(
        &SafetensorsFile::open(&p).expect("open")
    ));
    assert!(hdb::hypernet::is_hypernet(&open(
        "hypernet/tiny.hypernet.safetensors"
    )));
}

#[test]
fn config_round_trips_and_default_is_the_paper_shape() {
    let d = HypernetConfig::default();
    assert_eq!(d.layer_keys.len(), 176);
    assert_eq!(
        d.layer_keys
            .iter()
            .filter(|k| k.starts_with("unet."))
            .count(),
        128
    );
    assert_eq!(d.token_dim(), 150);
    assert_eq!(d.encoder.tokens(), 257);
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Hypernet>();
    let text = d.to_json().to_string();
    assert_eq!(
        d.to_json()["encoder"]["layer_norm_eps"].as_f64(),
        Some(1e-5)
    );
    let back = HypernetConfig::from_json(&text, Path::new("default")).expect("parse");
    assert_eq!(back, d);
    // The tiny fixture's keys are tiny-sd's, in the reference's order.
    let net = tiny();
    assert_eq!(
        net.config.layer_keys[0],
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    );
    println!(
        "default config: {:.1} M parameters",
        d.parameter_count() as f64 / 1e6
    );
}
