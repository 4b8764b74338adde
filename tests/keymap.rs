//! Checks the LDM <-> diffusers key table against the two fixture layouts of one tiny SD 1.5-shaped
//! model (tools/make_io_fixtures.py, which verifies them with diffusers' own converters). The files
//! are read with the `safetensors` crate directly so that only the table is under test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use hdb::io::keymap::{
    diffusers_to_ldm, is_diffusers_buffer, ldm_to_diffusers, Component, LdmLayout,
};
use safetensors::SafeTensors;

const COMPONENT_FILES: [(Component, &str); 3] = [
    (Component::Unet, "unet/diffusion_pytorch_model"),
    (Component::TextEncoder, "text_encoder/model"),
    (Component::Vae, "vae/diffusion_pytorch_model"),
];

/// The keys of the LDM fixture that are not weights, as a real checkpoint has them.
const NON_WEIGHTS: [&str; 4] = [
    "alphas_cumprod",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "model_ema.decay",
    "model_ema.num_updates",
];

fn read(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with tools/make_io_fixtures.py)",
            path.display()
        )
    })
}

fn parse<'a>(bytes: &'a [u8], what: &str) -> SafeTensors<'a> {
    SafeTensors::deserialize(bytes).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The three diffusers component files of one variant (`""` or `".fp16"`), as raw bytes.
fn component_bytes(variant: &str) -> Vec<(Component, Vec<u8>)> {
    COMPONENT_FILES
        .iter()
        .map(|&(c, stem)| (c, read(&format!("tiny-sd/{stem}{variant}.safetensors"))))
        .collect()
}

fn sorted_names(st: &SafeTensors) -> Vec<String> {
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
}

fn report(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn ldm_checkpoint_maps_onto_diffusers_folder_bit_for_bit() {
    let ldm_bytes = read("tiny-sd-ldm.safetensors");
    let ldm = parse(&ldm_bytes, "tiny-sd-ldm.safetensors");
    let comp_bytes = component_bytes("");
    let files: BTreeMap<Component, SafeTensors> = comp_bytes
        .iter()
        .map(|(c, b)| (*c, parse(b, c.name())))
        .collect();

    let ldm_names = sorted_names(&ldm);
    let layout = LdmLayout::infer(ldm_names.iter().map(String::as_str)).expect("infer layout");
    assert_eq!(
        layout,
        LdmLayout {
            unet_layers_per_block: 2,
            vae_up_blocks: 4
        }
    );

    let mut problems = Vec::new();
    let mut hit: BTreeMap<(Component, String), &str> = BTreeMap::new();
    let mut skipped = BTreeSet::new();
    for key in &ldm_names {
        let mapped = match ldm_to_diffusers(key, &layout) {
            Err(e) => {
                problems.push(format!("unmapped: {e}"));
                continue;
            }
            Ok(None) => {
                skipped.insert(key.as_str());
                continue;
            }
            Ok(Some(m)) => m,
        };
        let here = format!("'{key}' -> {}.{}", mapped.component.name(), mapped.name);
        if let Some(prev) = hit.insert((mapped.component, mapped.name.clone()), key) {
            problems.push(format!("{here}: also the target of '{prev}'"));
        }
        match diffusers_to_ldm(mapped.component, &mapped.name, &layout) {
            Ok(back) if back.key == *key && back.unsqueeze_1x1 == mapped.squeeze_1x1 => {}
            other => problems.push(format!("{here}: inverse gives {other:?}")),
        }
        let (Ok(l), Ok(d)) = (
            ldm.tensor(key),
            files[&mapped.component].tensor(&mapped.name),
        ) else {
            problems.push(format!("{here}: not in the diffusers file"));
            continue;
        };
        // The 1x1 squeeze drops two trailing unit dimensions; the bytes stay the same.
        let ldm_shape = match (mapped.squeeze_1x1, l.shape()) {
            (true, [a, b, 1, 1]) => vec![*a, *b],
            (true, s) => {
                problems.push(format!("{here}: squeeze_1x1 on LDM shape {s:?}"));
                continue;
            }
            (false, s) => s.to_vec(),
        };
        if l.dtype() != d.dtype() || ldm_shape != d.shape() {
            problems.push(format!(
                "{here}: LDM {:?} {:?} vs diffusers {:?} {:?}",
                l.dtype(),
                l.shape(),
                d.dtype(),
                d.shape()
            ));
        } else if l.data() != d.data() {
            problems.push(format!("{here}: same dtype and shape, different values"));
        }
    }
    // A bijection: every diffusers tensor is the image of exactly one LDM key.
    for (c, st) in &files {
        for name in sorted_names(st) {
            if !hit.contains_key(&(*c, name.clone())) {
                problems.push(format!("{}.{name}: no LDM key maps here", c.name()));
            }
        }
    }
    let want_skipped: BTreeSet<&str> = NON_WEIGHTS.into_iter().collect();
    if skipped != want_skipped {
        problems.push(format!(
            "skipped {skipped:?}, expected exactly {want_skipped:?}"
        ));
    }
    report(&problems);
    let total: usize = files.values().map(|st| st.len()).sum();
    assert_eq!(hit.len(), total);
    assert_eq!(ldm_names.len(), total + NON_WEIGHTS.len());
}

#[test]
fn every_diffusers_name_maps_to_an_ldm_key_in_both_variants() {
    let ldm_bytes = read("tiny-sd-ldm.safetensors");
    let ldm = parse(&ldm_bytes, "tiny-sd-ldm.safetensors");
    let ldm_names = sorted_names(&ldm);
    let layout = LdmLayout::infer(ldm_names.iter().map(String::as_str)).expect("infer layout");
    let ldm_names: BTreeSet<String> = ldm_names.into_iter().collect();
    let (f32_bytes, f16_bytes) = (component_bytes(""), component_bytes(".fp16"));

    let mut problems = Vec::new();
    for ((c, b32), (_, b16)) in f32_bytes.iter().zip(&f16_bytes) {
        let (st32, st16) = (parse(b32, c.name()), parse(b16, c.name()));
        let names = sorted_names(&st32);
        if names != sorted_names(&st16) {
            problems.push(format!(
                "{}: the fp16 variant has other tensor names",
                c.name()
            ));
        }
        for name in &names {
            match diffusers_to_ldm(*c, name, &layout) {
                Ok(k) if ldm_names.contains(&k.key) => {}
                other => problems.push(format!("{}.{name}: {other:?}", c.name())),
            }
            if let (Ok(t32), Ok(t16)) = (st32.tensor(name), st16.tensor(name)) {
                if t32.shape() != t16.shape() || t16.dtype() != safetensors::Dtype::F16 {
                    problems.push(format!(
                        "{}.{name}: fp16 variant is {:?} {:?}",
                        c.name(),
                        t16.dtype(),
                        t16.shape()
                    ));
                }
            }
        }
    }
    report(&problems);
}

#[test]
fn unknown_unet_key_is_an_error_naming_it() {
    let key = "model.diffusion_model.foo.weight";
    let err = ldm_to_diffusers(key, &SD1).expect_err("an unknown UNet key must not map");
    assert!(err.contains(key), "error does not name the key: {err}");
}

// The rest checks error paths and layout inference on hand-made key lists.

const SD1: LdmLayout = LdmLayout {
    unet_layers_per_block: 2,
    vae_up_blocks: 4,
};

#[test]
fn non_weights_are_skipped() {
    for key in [
        "alphas_cumprod",
        "model_ema.decay",
        "model_ema.diffusion_modelinput_blocks00weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
        "first_stage_model.loss.logvar", // the VAE's training loss, kept in some checkpoints
    ] {
        assert_eq!(ldm_to_diffusers(key, &SD1), Ok(None), "{key}");
    }
    assert!(is_diffusers_buffer(
        Component::TextEncoder,
        "text_model.embeddings.position_ids"
    ));
}

#[test]
fn errors_name_the_key() {
    for key in [
        "model.diffusion_model.foo.weight",
        "model.diffusion_model.input_blocks.3.0.in_layers.0.weight", // slot 3: downsampler
        "model.diffusion_model.input_blocks.1.0.op.weight",
        "model.diffusion_model.input_blocks.01.0.in_layers.0.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight", // not its block's last slot
        "model.diffusion_model.middle_block.3.in_layers.0.weight",
        "model.diffusion_model.label_emb.0.0.weight", // SDXL
        "model.diffusion_model.time_embed.0.running_mean",
        "model.diffusion_model.output_blocks.99999999999999999999999.0.in_layers.0.weight",
        "first_stage_model.decoder.up.4.block.0.conv1.weight", // only 4 up blocks
        "first_stage_model.decoder.up.18446744073709551615.block.0.conv1.weight",
        "first_stage_model.encoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.qkv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.qkv.weight",
        "cond_stage_model.transformer.text_projection.weight",
        "cond_stage_model.foo.weight",
    ] {
        let e = ldm_to_diffusers(key, &SD1);
        assert!(e.as_ref().is_err_and(|e| e.contains(key)), "{key}: {e:?}");
    }
    let e = ldm_to_diffusers(
        "cond_stage_model.model.transformer.resblocks.0.ln_1.bias",
        &SD1,
    );
    assert!(
        e.as_ref().is_err_and(|e| e.contains("SD 2 OpenCLIP")),
        "{e:?}"
    );
    for (c, name) in [
        (Component::Unet, "down_blocks.0.resnets.2.norm1.weight"), // 2 resnets per down block
        (Component::Unet, "up_blocks.0.resnets.3.norm1.weight"),
        (Component::Unet, "mid_block.attentions.1.norm.weight"),
        (
            Component::Unet,
            "down_blocks.18446744073709551615.resnets.0.norm1.weight",
        ),
        (Component::Vae, "decoder.up_blocks.4.resnets.0.norm1.weight"),
        (Component::Vae, "encoder.mid_block.resnets.2.norm1.weight"),
        (Component::TextEncoder, "text_model.embeddings.position_ids"),
        (Component::TextEncoder, "text_projection.weight"),
    ] {
        let e = diffusers_to_ldm(c, name, &SD1);
        assert!(e.as_ref().is_err_and(|e| e.contains(name)), "{name}: {e:?}");
    }
}

#[test]
fn absurd_layouts_do_not_panic() {
    for n in [0, usize::MAX] {
        let l = LdmLayout {
            unet_layers_per_block: n,
            vae_up_blocks: n,
        };
        let _ = ldm_to_diffusers("model.diffusion_model.input_blocks.5.0.op.weight", &l);
        let _ = ldm_to_diffusers("model.diffusion_model.output_blocks.3.1.conv.weight", &l);
        let _ = ldm_to_diffusers("first_stage_model.decoder.up.0.block.0.norm1.weight", &l);
        let _ = diffusers_to_ldm(Component::Unet, "up_blocks.7.upsamplers.0.conv.weight", &l);
        let _ = diffusers_to_ldm(
            Component::Unet,
            "down_blocks.7.downsamplers.0.conv.bias",
            &l,
        );
        let _ = diffusers_to_ldm(
            Component::Vae,
            "decoder.up_blocks.7.resnets.0.conv1.bias",
            &l,
        );
    }
}

#[test]
fn infer_layout() {
    let keys = [
        "model.diffusion_model.input_blocks.6.0.op.weight",
        "model.diffusion_model.input_blocks.3.0.op.bias",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.decoder.up.2.upsample.conv.weight",
        "first_stage_model.decoder.up.1.block.0.conv1.weight",
        "alphas_cumprod",
    ];
    let want = LdmLayout {
        unet_layers_per_block: 2,
        vae_up_blocks: 3,
    };
    assert_eq!(LdmLayout::infer(keys), Ok(want));
    // Only an upsampler to go by (output_blocks.N.2.conv: after an attention slot).
    let keys = ["model.diffusion_model.output_blocks.3.2.conv.weight"];
    assert_eq!(
        LdmLayout::infer(keys).map(|l| l.unet_layers_per_block),
        Ok(3)
    );
    // No UNet and no VAE: nothing will be mapped from them, SD 1.x values stand in.
    let keys = ["cond_stage_model.transformer.text_model.final_layer_norm.weight"];
    assert_eq!(LdmLayout::infer(keys), Ok(SD1));

    for (keys, needle) in [
        (
            &["model.diffusion_model.input_blocks.1.1.proj_in.weight"][..],
            "layers_per_block",
        ),
        (
            &["model.diffusion_model.input_blocks.1.0.op.weight"],
            "'model.diffusion_model.input_blocks.1.0.op.weight'",
        ),
        (
            &[
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.output_blocks.3.1.conv.weight",
            ],
            "'model.diffusion_model.output_blocks.3.1.conv.weight'",
        ),
        (
            &[
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                "first_stage_model.decoder.up.2.block.0.conv1.weight",
            ],
            "decoder.up.1.*' is missing",
        ),
    ] {
        let e = LdmLayout::infer(keys.iter().copied());
        assert!(
            e.as_ref().is_err_and(|e| e.contains(needle)),
            "{keys:?}: {e:?}"
        );
    }
}
