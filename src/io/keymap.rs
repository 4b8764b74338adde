//! The one table that maps single-file LDM checkpoint keys (`model.diffusion_model.*`,
//! `cond_stage_model.*`, `first_stage_model.*`) to canonical diffusers names, and back.
//!
//! The rules are those of diffusers' single-file converters for SD 1.x
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` in
//! `diffusers/loaders/single_file_utils.py`), restated as a strict grammar: a key under one of the
//! three component prefixes that is not an SD 1.x weight is an error, not a silent pass-through, so
//! a checkpoint of another architecture fails at load time with the offending key in the message.
//! `tests/keymap.rs` checks the whole table against `tests/fixtures/tiny-sd*`, whose LDM file
//! diffusers' own converters turn back into the diffusers folder bit for bit
//! (`tools/make_io_fixtures.py`).
//!
//! Every parameter name is `<stem>.weight` or `<stem>.bias`; the leaf never changes, so the
//! functions below split it off and map stems only.

/// A model component as diffusers splits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    Vae,
}

impl Component {
    /// The diffusers sub-folder name: `unet`, `text_encoder`, `vae`.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::Vae => "vae",
        }
    }
}

/// Where an LDM key lands in diffusers naming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedKey {
    pub component: Component,
    /// The diffusers/transformers state-dict name inside the component, without a prefix.
    pub name: String,
    /// The LDM tensor is `[C, C, 1, 1]` where diffusers has `[C, C]` (VAE attention).
    pub squeeze_1x1: bool,
}

/// An LDM key as produced from a diffusers name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdmKey {
    pub key: String,
    /// The diffusers `[C, C]` tensor becomes `[C, C, 1, 1]` in LDM.
    pub unsqueeze_1x1: bool,
}

/// The structural facts the mapping needs that key names alone don't give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LdmLayout {
    pub unet_layers_per_block: usize,
    /// Number of VAE decoder up blocks (LDM numbers them in reverse of diffusers).
    pub vae_up_blocks: usize,
}

const UNET_PREFIX: &str = "model.diffusion_model.";
const TEXT_PREFIX: &str = "cond_stage_model.transformer.";
const VAE_PREFIX: &str = "first_stage_model.";
/// SD 2.x keeps its OpenCLIP text encoder here, with fused `in_proj` q/k/v that need splitting.
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SD 1.x's layers_per_block and VAE depth, used only when a checkpoint lacks that component
/// entirely (then nothing of it gets mapped, so the value is never observable).
const SD1_DEFAULT: LdmLayout = LdmLayout {
    unet_layers_per_block: 2,
    vae_up_blocks: 4,
};

/// (LDM stem, diffusers stem) pairs; each table is used in both directions.
const UNET_FIXED: [(&str, &str); 5] = [
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
];
/// Parts of an LDM `ResBlock` and of a diffusers `ResnetBlock2D` (the indices are positions in
/// LDM's `nn.Sequential`s; the SiLU and dropout slots have no weights).
const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];
const VAE_FIXED: [(&str, &str); 8] = [
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("encoder.norm_out", "encoder.conv_norm_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("decoder.norm_out", "decoder.conv_norm_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
];
const VAE_RESNET: [(&str, &str); 5] = [
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
];
/// LDM's `AttnBlock` (1x1 convolutions) and diffusers' `Attention` (linear layers).
const VAE_ATTN: [(&str, &str); 5] = [
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
];

fn to_diffusers(table: &[(&'static str, &'static str)], ldm: &str) -> Option<&'static str> {
    table.iter().find(|(l, _)| *l == ldm).map(|(_, d)| *d)
}

fn to_ldm(table: &[(&'static str, &'static str)], diffusers: &str) -> Option<&'static str> {
    table.iter().find(|(_, d)| *d == diffusers).map(|(l, _)| *l)
}

/// `"12.rest"` -> `(12, "rest")`. Only canonical decimal indices: `"01"` would not round-trip.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    Some((n.parse().ok()?, rest))
}

/// `prefix` + `"N.rest"` -> `(N, "rest")`.
fn idx<'a>(s: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    s.strip_prefix(prefix).and_then(split_index)
}

/// Splits `stem.weight` / `stem.bias`; every weight of the three components ends so.
fn split_leaf(name: &str) -> Result<(&str, &str), String> {
    match name.rsplit_once('.') {
        Some((stem, leaf @ ("weight" | "bias"))) if !stem.is_empty() => Ok((stem, leaf)),
        _ => Err("does not end in '.weight' or '.bias'".into()),
    }
}

/// A `SpatialTransformer` / `Transformer2DModel` part: named the same in LDM and diffusers.
fn is_transformer_part(s: &str) -> bool {
    if matches!(s, "norm" | "proj_in" | "proj_out") {
        return true;
    }
    let Some((_, p)) = idx(s, "transformer_blocks.") else {
        return false;
    };
    matches!(
        p,
        "norm1" | "norm2" | "norm3" | "ff.net.0.proj" | "ff.net.2"
    ) || p
        .strip_prefix("attn1.")
        .or_else(|| p.strip_prefix("attn2."))
        .is_some_and(|a| matches!(a, "to_q" | "to_k" | "to_v" | "to_out.0"))
}

/// `CLIPTextTransformer` stems below `text_model.`, and those below `encoder.layers.N.`.
const CLIP_PARTS: [&str; 3] = [
    "embeddings.token_embedding",
    "embeddings.position_embedding",
    "final_layer_norm",
];
const CLIP_LAYER_PARTS: [&str; 8] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "layer_norm1",
    "layer_norm2",
    "mlp.fc1",
    "mlp.fc2",
];

/// Checks a CLIP text encoder stem below `text_model.`: LDM and transformers name it the same.
fn clip_part(s: &str) -> Result<&str, String> {
    let layer = idx(s, "encoder.layers.").is_some_and(|(_, p)| CLIP_LAYER_PARTS.contains(&p));
    if layer || CLIP_PARTS.contains(&s) {
        Ok(s)
    } else {
        Err("not an SD 1.x CLIP text encoder weight".into())
    }
}

impl LdmLayout {
    /// Infers the layout from the full list of a checkpoint's keys.
    ///
    /// layers_per_block: LDM numbers `input_blocks` 1.. as `layers_per_block` resnet(+attention)
    /// slots followed by one downsampler slot, so the first `input_blocks.N.0.op` has
    /// `N = layers_per_block + 1`. A UNet without downsamplers would be odd, but the first up
    /// block's upsampler (`output_blocks.N.{1,2}.conv`) sits at `N = layers_per_block` too.
    /// VAE up blocks: `first_stage_model.decoder.up.N.*` are numbered 0..count.
    pub fn infer<'a, I: IntoIterator<Item = &'a str>>(keys: I) -> Result<Self, String> {
        // layers_per_block as the first downsampler and the first upsampler give it, with the key.
        let (mut by_op, mut by_up) = (None::<(usize, &str)>, None::<(usize, &str)>);
        let mut any_unet = false;
        let mut vae_up = Vec::new();
        for key in keys {
            let lower = |seen: Option<(usize, &'a str)>, n: usize| match seen {
                Some((m, _)) if m <= n => seen,
                _ => Some((n, key)),
            };
            if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
                any_unet = true;
                if let Some((n, "0.op.weight" | "0.op.bias")) = idx(rest, "input_blocks.") {
                    by_op = lower(by_op, n.wrapping_sub(1)); // n = 0 wraps: rejected below
                }
                if let Some((n, p)) = idx(rest, "output_blocks.") {
                    if matches!(p.split_once(".conv."), Some(("1" | "2", "weight" | "bias"))) {
                        by_up = lower(by_up, n);
                    }
                }
            } else if let Some((n, _)) = key
                .strip_prefix(VAE_PREFIX)
                .and_then(|r| idx(r, "decoder.up."))
            {
                vae_up.push(n);
            }
        }
        let unet_layers_per_block = match (by_op, by_up) {
            (Some((a, op)), Some((b, up))) if a != b => {
                return Err(format!(
                    "'{op}' and '{up}' disagree on layers_per_block: not SD 1.x"
                ))
            }
            (Some((n, key)), _) | (None, Some((n, key))) if n == 0 || n == usize::MAX => {
                return Err(format!(
                    "'{key}': a sampler here leaves no room for a resnet"
                ))
            }
            (Some((n, _)), _) | (None, Some((n, _))) => n,
            (None, None) if any_unet => {
                return Err(format!(
                    "cannot infer layers_per_block: no '{UNET_PREFIX}input_blocks.N.0.op.*' or \
                     '{UNET_PREFIX}output_blocks.N.{{1,2}}.conv.*' key"
                ))
            }
            (None, None) => SD1_DEFAULT.unet_layers_per_block,
        };
        vae_up.sort_unstable();
        vae_up.dedup();
        // Numbering must be 0..count without gaps, or the reversal would misplace blocks.
        if let Some((gap, seen)) = vae_up.iter().enumerate().find(|(i, n)| i != *n) {
            return Err(format!(
                "'{VAE_PREFIX}decoder.up.{gap}.*' is missing while \
                 '{VAE_PREFIX}decoder.up.{seen}.*' exists"
            ));
        }
        let vae_up_blocks = if vae_up.is_empty() {
            SD1_DEFAULT.vae_up_blocks
        } else {
            vae_up.len()
        };
        Ok(LdmLayout {
            unet_layers_per_block,
            vae_up_blocks,
        })
    }
}

/// Maps one LDM key. `Ok(None)` for keys that are not weights of the three components
/// (e.g. `model_ema.*`, `alphas_cumprod`); `Err` names the key that cannot be mapped.
pub fn ldm_to_diffusers(key: &str, layout: &LdmLayout) -> Result<Option<MappedKey>, String> {
    let with_key = |why: String| format!("'{key}': {why}");
    let (component, rest) = if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
        (Component::Unet, rest)
    } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
        if rest.starts_with("loss.") {
            return Ok(None); // the VAE's training loss (LPIPS, discriminator), not a weight
        }
        (Component::Vae, rest)
    } else if let Some(rest) = key.strip_prefix(TEXT_PREFIX) {
        // Early SD 1.x checkpoints saved the CLIPTextModel before transformers added the
        // `text_model.` level; both spellings name the same tensors.
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        if rest == "embeddings.position_ids" {
            return Ok(None); // a buffer (0..77), not a weight
        }
        (Component::TextEncoder, rest)
    } else if key.starts_with(OPEN_CLIP_PREFIX) {
        let why =
            "the SD 2 OpenCLIP text encoder layout (cond_stage_model.model.*) is not supported yet";
        return Err(with_key(why.into()));
    } else if key.starts_with("cond_stage_model.") {
        return Err(with_key(
            "unknown text encoder layout under 'cond_stage_model.'".into(),
        ));
    } else {
        return Ok(None);
    };
    let (stem, leaf) = split_leaf(rest).map_err(with_key)?;
    let stem = match component {
        Component::Unet => unet_to_diffusers(stem, layout.unet_layers_per_block),
        Component::Vae => vae_to_diffusers(stem, layout.vae_up_blocks),
        Component::TextEncoder => clip_part(stem).map(|p| format!("text_model.{p}")),
    }
    .map_err(with_key)?;
    let squeeze_1x1 = component == Component::Vae && is_vae_matrix(&stem, leaf);
    let name = format!("{stem}.{leaf}");
    Ok(Some(MappedKey {
        component,
        name,
        squeeze_1x1,
    }))
}

/// The inverse of [`ldm_to_diffusers`].
///
/// Text encoder names may be given as `text_model.X` (every SD 1.x repository) or as the flat `X`
/// that transformers >= 5.6 writes for `CLIPTextModel`; both give the same LDM key.
pub fn diffusers_to_ldm(
    component: Component,
    name: &str,
    layout: &LdmLayout,
) -> Result<LdmKey, String> {
    let with_key = |why: String| format!("'{}.{name}': {why}", component.name());
    let (stem, leaf) = split_leaf(name).map_err(with_key)?;
    let key = match component {
        Component::Unet => {
            unet_to_ldm(stem, layout.unet_layers_per_block).map(|s| UNET_PREFIX.to_string() + &s)
        }
        Component::Vae => {
            vae_to_ldm(stem, layout.vae_up_blocks).map(|s| VAE_PREFIX.to_string() + &s)
        }
        Component::TextEncoder => clip_part(stem.strip_prefix("text_model.").unwrap_or(stem))
            .map(|p| format!("{TEXT_PREFIX}text_model.{p}")),
    }
    .map_err(with_key)?;
    let unsqueeze_1x1 = component == Component::Vae && is_vae_matrix(stem, leaf);
    Ok(LdmKey {
        key: format!("{key}.{leaf}"),
        unsqueeze_1x1,
    })
}

/// True for tensors a diffusers component file may hold that are buffers, not weights, and have no
/// LDM counterpart: older transformers saved CLIP's `position_ids` (SD 1.5's own
/// `text_encoder/model.safetensors` has it).
pub fn is_diffusers_buffer(component: Component, name: &str) -> bool {
    component == Component::TextEncoder
        && matches!(
            name,
            "text_model.embeddings.position_ids" | "embeddings.position_ids"
        )
}

// ---------------------------------------------------------------- UNet

/// UNet stem below `model.diffusion_model.` -> diffusers stem.
///
/// `input_blocks` 1.. come in groups of `lpb + 1` per down block: `lpb` resnet(+attention) slots
/// (`.0` resnet, `.1` attention), then the downsampler `.0.op`. `output_blocks` come in groups of
/// `lpb + 1` per up block, all resnet(+attention) slots; the last slot also holds the upsampler,
/// at `.1.conv` after a bare resnet or `.2.conv` after resnet + attention.
fn unet_to_diffusers(stem: &str, lpb: usize) -> Result<String, String> {
    let bad = || "not a Stable Diffusion 1.x UNet weight".to_string();
    let resnet = |p: &str| to_diffusers(&UNET_RESNET, p).ok_or_else(bad);
    let group = lpb.saturating_add(1);
    if let Some(d) = to_diffusers(&UNET_FIXED, stem) {
        Ok(d.to_string())
    } else if let Some((n @ 1.., rest)) = idx(stem, "input_blocks.") {
        let (b, l) = ((n - 1) / group, (n - 1) % group);
        match (rest.split_once('.'), l == lpb) {
            (Some(("0", "op")), true) => Ok(format!("down_blocks.{b}.downsamplers.0.conv")),
            (Some(("0", p)), false) => Ok(format!("down_blocks.{b}.resnets.{l}.{}", resnet(p)?)),
            (Some(("1", p)), false) if is_transformer_part(p) => {
                Ok(format!("down_blocks.{b}.attentions.{l}.{p}"))
            }
            _ => Err(bad()),
        }
    } else if let Some((m, p)) = idx(stem, "middle_block.") {
        match m {
            0 | 2 => Ok(format!("mid_block.resnets.{}.{}", m / 2, resnet(p)?)),
            1 if is_transformer_part(p) => Ok(format!("mid_block.attentions.0.{p}")),
            _ => Err(bad()),
        }
    } else if let Some((n, rest)) = idx(stem, "output_blocks.") {
        let (b, l) = (n / group, n % group);
        match rest.split_once('.') {
            // diffusers takes either slot; a real checkpoint has the one its block type gives.
            Some(("1" | "2", "conv")) if l == lpb => Ok(format!("up_blocks.{b}.upsamplers.0.conv")),
            Some(("0", p)) => Ok(format!("up_blocks.{b}.resnets.{l}.{}", resnet(p)?)),
            Some(("1", p)) if is_transformer_part(p) => {
                Ok(format!("up_blocks.{b}.attentions.{l}.{p}"))
            }
            _ => Err(bad()),
        }
    } else {
        Err(bad())
    }
}

/// The inverse of [`unet_to_diffusers`]. The upsampler slot depends on whether the up block has
/// attention, which a diffusers name does not say; SD 1.x (and 2.x) has exactly one attention-free
/// up block, `up_blocks.0` (`UpBlock2D`), so its upsampler is `.1.conv` and the others' `.2.conv`.
fn unet_to_ldm(stem: &str, lpb: usize) -> Result<String, String> {
    let bad = || "not a Stable Diffusion 1.x UNet weight".to_string();
    let resnet = |p: &str| to_ldm(&UNET_RESNET, p).ok_or_else(bad);
    let group = lpb.saturating_add(1);
    // Slot `l` of block `b`. Indices come from input: absurd ones are errors, not overflows.
    let at = |b: usize, l: usize| {
        b.checked_mul(group)
            .and_then(|x| x.checked_add(l))
            .ok_or_else(bad)
    };
    if let Some(l) = to_ldm(&UNET_FIXED, stem) {
        Ok(l.to_string())
    } else if let Some((b, rest)) = idx(stem, "down_blocks.") {
        // input_blocks.0 is conv_in, hence the + 1 (as `l + 1` and `group`: no overflow).
        match slot(rest) {
            _ if rest == "downsamplers.0.conv" => {
                Ok(format!("input_blocks.{}.0.op", at(b, group)?))
            }
            Some((Slot::Resnet, l, p)) if l < lpb => {
                Ok(format!("input_blocks.{}.0.{}", at(b, l + 1)?, resnet(p)?))
            }
            Some((Slot::Attention, l, p)) if l < lpb => {
                Ok(format!("input_blocks.{}.1.{p}", at(b, l + 1)?))
            }
            _ => Err(bad()),
        }
    } else if let Some(rest) = stem.strip_prefix("mid_block.") {
        match slot(rest) {
            Some((Slot::Resnet, r @ (0 | 1), p)) => {
                Ok(format!("middle_block.{}.{}", 2 * r, resnet(p)?))
            }
            Some((Slot::Attention, 0, p)) => Ok(format!("middle_block.1.{p}")),
            _ => Err(bad()),
        }
    } else if let Some((b, rest)) = idx(stem, "up_blocks.") {
        match slot(rest) {
            _ if rest == "upsamplers.0.conv" => {
                let after = if b == 0 { 1 } else { 2 };
                Ok(format!("output_blocks.{}.{after}.conv", at(b, lpb)?))
            }
            Some((Slot::Resnet, l, p)) if l <= lpb => {
                Ok(format!("output_blocks.{}.0.{}", at(b, l)?, resnet(p)?))
            }
            Some((Slot::Attention, l, p)) if l <= lpb => {
                Ok(format!("output_blocks.{}.1.{p}", at(b, l)?))
            }
            _ => Err(bad()),
        }
    } else {
        Err(bad())
    }
}

enum Slot {
    Resnet,
    Attention,
}

/// `resnets.L.part` / `attentions.L.part` (a valid transformer part) inside a diffusers block.
fn slot(s: &str) -> Option<(Slot, usize, &str)> {
    if let Some((l, p)) = idx(s, "resnets.") {
        return Some((Slot::Resnet, l, p));
    }
    let (l, p) = idx(s, "attentions.")?;
    is_transformer_part(p).then_some((Slot::Attention, l, p))
}

// ---------------------------------------------------------------- VAE

/// `encoder.rest` / `decoder.rest` -> (`encoder`/`decoder`, `rest`).
fn split_coder(stem: &str) -> Option<(&str, &str)> {
    stem.split_once('.')
        .filter(|(c, _)| matches!(*c, "encoder" | "decoder"))
}

/// LDM numbers decoder `up` blocks from the other end: LDM `up.i` is diffusers
/// `up_blocks.(n - 1 - i)`, and the reverse. Encoder blocks keep their index.
fn flip_up(coder: &str, i: usize, n: usize) -> Result<usize, String> {
    match coder {
        "decoder" if i < n => Ok(n - 1 - i),
        "decoder" => Err(format!(
            "up block {i}, but the checkpoint has {n} up blocks"
        )),
        _ => Ok(i),
    }
}

/// A VAE attention weight matrix (diffusers stem): `[C, C]` in diffusers, a 1x1 conv in LDM.
fn is_vae_matrix(diffusers_stem: &str, leaf: &str) -> bool {
    leaf == "weight"
        && diffusers_stem
            .split_once(".mid_block.attentions.0.")
            .is_some_and(|(_, p)| p != "group_norm")
}

/// VAE stem below `first_stage_model.` -> diffusers stem.
fn vae_to_diffusers(stem: &str, n_up: usize) -> Result<String, String> {
    let bad = || "not a Stable Diffusion 1.x VAE weight".to_string();
    let resnet = |p: &str| to_diffusers(&VAE_RESNET, p).ok_or_else(bad);
    if let Some(d) = to_diffusers(&VAE_FIXED, stem) {
        return Ok(d.to_string());
    }
    let (coder, rest) = split_coder(stem).ok_or_else(bad)?;
    let (kind, blocks) = if coder == "encoder" {
        ("down", "down_blocks")
    } else {
        ("up", "up_blocks")
    };
    let name = if let Some(p) = rest.strip_prefix("mid.attn_1.") {
        format!(
            "mid_block.attentions.0.{}",
            to_diffusers(&VAE_ATTN, p).ok_or_else(bad)?
        )
    } else if let Some(p) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", resnet(p)?)
    } else if let Some(p) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", resnet(p)?)
    } else if let Some((i, p)) = idx(rest, &format!("{kind}.")) {
        let i = flip_up(coder, i, n_up)?;
        if p == format!("{kind}sample.conv") {
            format!("{blocks}.{i}.{kind}samplers.0.conv")
        } else {
            let (j, p) = idx(p, "block.").ok_or_else(bad)?;
            format!("{blocks}.{i}.resnets.{j}.{}", resnet(p)?)
        }
    } else {
        return Err(bad());
    };
    Ok(format!("{coder}.{name}"))
}

/// The inverse of [`vae_to_diffusers`].
fn vae_to_ldm(stem: &str, n_up: usize) -> Result<String, String> {
    let bad = || "not a Stable Diffusion 1.x VAE weight".to_string();
    let resnet = |p: &str| to_ldm(&VAE_RESNET, p).ok_or_else(bad);
    if let Some(l) = to_ldm(&VAE_FIXED, stem) {
        return Ok(l.to_string());
    }
    let (coder, rest) = split_coder(stem).ok_or_else(bad)?;
    let (kind, blocks) = if coder == "encoder" {
        ("down", "down_blocks")
    } else {
        ("up", "up_blocks")
    };
    let name = if let Some(p) = rest.strip_prefix("mid_block.attentions.0.") {
        format!("mid.attn_1.{}", to_ldm(&VAE_ATTN, p).ok_or_else(bad)?)
    } else if let Some((r @ (0 | 1), p)) = idx(rest, "mid_block.resnets.") {
        format!("mid.block_{}.{}", r + 1, resnet(p)?)
    } else if let Some((i, p)) = idx(rest, &format!("{blocks}.")) {
        let i = flip_up(coder, i, n_up)?;
        if p == format!("{kind}samplers.0.conv") {
            format!("{kind}.{i}.{kind}sample.conv")
        } else {
            let (j, p) = idx(p, "resnets.").ok_or_else(bad)?;
            format!("{kind}.{i}.block.{j}.{}", resnet(p)?)
        }
    } else {
        return Err(bad());
    };
    Ok(format!("{coder}.{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD1: LdmLayout = LdmLayout {
        unet_layers_per_block: 2,
        vae_up_blocks: 4,
    };

    /// Hand-checked against SD 1.5's key lists (v1-5-pruned.safetensors and the diffusers repo):
    /// `LDM key | component | diffusers name | 1x1`.
    const PAIRS: &str = "
        model.diffusion_model.time_embed.2.bias | unet | time_embedding.linear_2.bias | -
        model.diffusion_model.input_blocks.0.0.weight | unet | conv_in.weight | -
        model.diffusion_model.input_blocks.3.0.op.weight | unet | down_blocks.0.downsamplers.0.conv.weight | -
        model.diffusion_model.input_blocks.4.0.skip_connection.bias | unet | down_blocks.1.resnets.0.conv_shortcut.bias | -
        model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight | unet | down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight | -
        model.diffusion_model.input_blocks.11.0.out_layers.3.weight | unet | down_blocks.3.resnets.1.conv2.weight | -
        model.diffusion_model.middle_block.1.proj_in.weight | unet | mid_block.attentions.0.proj_in.weight | -
        model.diffusion_model.middle_block.2.emb_layers.1.weight | unet | mid_block.resnets.1.time_emb_proj.weight | -
        model.diffusion_model.output_blocks.2.1.conv.weight | unet | up_blocks.0.upsamplers.0.conv.weight | -
        model.diffusion_model.output_blocks.5.2.conv.bias | unet | up_blocks.1.upsamplers.0.conv.bias | -
        model.diffusion_model.output_blocks.6.0.in_layers.0.weight | unet | up_blocks.2.resnets.0.norm1.weight | -
        model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight | unet | up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight | -
        model.diffusion_model.out.2.weight | unet | conv_out.weight | -
        first_stage_model.encoder.norm_out.bias | vae | encoder.conv_norm_out.bias | -
        first_stage_model.encoder.down.1.block.0.nin_shortcut.weight | vae | encoder.down_blocks.1.resnets.0.conv_shortcut.weight | -
        first_stage_model.encoder.down.2.downsample.conv.bias | vae | encoder.down_blocks.2.downsamplers.0.conv.bias | -
        first_stage_model.encoder.mid.attn_1.q.weight | vae | encoder.mid_block.attentions.0.to_q.weight | 1x1
        first_stage_model.decoder.mid.attn_1.proj_out.weight | vae | decoder.mid_block.attentions.0.to_out.0.weight | 1x1
        first_stage_model.decoder.mid.attn_1.proj_out.bias | vae | decoder.mid_block.attentions.0.to_out.0.bias | -
        first_stage_model.decoder.mid.attn_1.norm.weight | vae | decoder.mid_block.attentions.0.group_norm.weight | -
        first_stage_model.decoder.mid.block_2.conv1.weight | vae | decoder.mid_block.resnets.1.conv1.weight | -
        first_stage_model.decoder.up.3.block.2.norm2.bias | vae | decoder.up_blocks.0.resnets.2.norm2.bias | -
        first_stage_model.decoder.up.1.block.0.nin_shortcut.bias | vae | decoder.up_blocks.2.resnets.0.conv_shortcut.bias | -
        first_stage_model.decoder.up.1.upsample.conv.weight | vae | decoder.up_blocks.2.upsamplers.0.conv.weight | -
        first_stage_model.post_quant_conv.weight | vae | post_quant_conv.weight | -
        cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight | text_encoder | text_model.encoder.layers.11.mlp.fc2.weight | -
        cond_stage_model.transformer.text_model.embeddings.token_embedding.weight | text_encoder | text_model.embeddings.token_embedding.weight | -
    ";

    #[test]
    fn hand_checked_keys_both_directions() {
        for line in PAIRS.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let [ldm, component, name, flag] = line.split(" | ").collect::<Vec<_>>()[..] else {
                panic!("bad table line {line}")
            };
            let component = [Component::Unet, Component::TextEncoder, Component::Vae]
                .into_iter()
                .find(|c| c.name() == component)
                .unwrap();
            let squeeze = flag == "1x1";
            let want = MappedKey {
                component,
                name: name.to_string(),
                squeeze_1x1: squeeze,
            };
            assert_eq!(ldm_to_diffusers(ldm, &SD1), Ok(Some(want)), "{ldm}");
            let back = LdmKey {
                key: ldm.to_string(),
                unsqueeze_1x1: squeeze,
            };
            assert_eq!(diffusers_to_ldm(component, name, &SD1), Ok(back), "{name}");
        }
    }

    #[test]
    fn old_clip_layout_and_flat_transformers_names() {
        let got = ldm_to_diffusers("cond_stage_model.transformer.final_layer_norm.bias", &SD1);
        assert_eq!(
            got.unwrap().unwrap().name,
            "text_model.final_layer_norm.bias"
        );
        let got = diffusers_to_ldm(
            Component::TextEncoder,
            "encoder.layers.0.mlp.fc1.weight",
            &SD1,
        );
        let want = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight";
        assert_eq!(got.unwrap().key, want);
    }
}
