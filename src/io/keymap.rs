//! The one table that maps single-file LDM checkpoint keys (`model.diffusion_model.*`,
//! `cond_stage_model.*`, `first_stage_model.*`) to canonical diffusers names, and back.
//!
//! The rules are those of diffusers' single-file converters for SD 1.x
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` in
//! `diffusers/loaders/single_file_utils.py`), restated as a strict grammar: a key that is under one
//! of the three component prefixes but is not an SD 1.x weight is an error, not a silent pass-through,
//! so a checkpoint of another architecture fails at load time with the offending key in the message.
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
const SD1_DEFAULT: LdmLayout = LdmLayout { unet_layers_per_block: 2, vae_up_blocks: 4 };

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
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    Some((n.parse().ok()?, rest))
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
    let Some((_, p)) = s.strip_prefix("transformer_blocks.").and_then(split_index) else {
        return false;
    };
    matches!(p, "norm1" | "norm2" | "norm3" | "ff.net.0.proj" | "ff.net.2")
        || p.strip_prefix("attn1.")
            .or_else(|| p.strip_prefix("attn2."))
            .is_some_and(|a| matches!(a, "to_q" | "to_k" | "to_v" | "to_out.0"))
}

/// A `CLIPTextTransformer` part, below `text_model.`.
fn is_clip_part(s: &str) -> bool {
    if matches!(s, "embeddings.token_embedding" | "embeddings.position_embedding" | "final_layer_norm") {
        return true;
    }
    s.strip_prefix("encoder.layers.").and_then(split_index).is_some_and(|(_, p)| {
        matches!(
            p,
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" | "self_attn.out_proj"
                | "layer_norm1" | "layer_norm2" | "mlp.fc1" | "mlp.fc2"
        )
    })
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
        let mut first_op: Option<(usize, &str)> = None;
        let mut first_up: Option<(usize, &str)> = None;
        let mut any_unet = false;
        let mut vae_up: Vec<usize> = Vec::new();
        for key in keys {
            if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
                any_unet = true;
                if let Some((n, "0.op.weight" | "0.op.bias")) = rest.strip_prefix("input_blocks.").and_then(split_index) {
                    if first_op.is_none_or(|(m, _)| n < m) {
                        first_op = Some((n, key));
                    }
                }
                if let Some((n, "1.conv.weight" | "1.conv.bias" | "2.conv.weight" | "2.conv.bias")) =
                    rest.strip_prefix("output_blocks.").and_then(split_index)
                {
                    if first_up.is_none_or(|(m, _)| n < m) {
                        first_up = Some((n, key));
                    }
                }
            } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
                if let Some((n, _)) = rest.strip_prefix("decoder.up.").and_then(split_index) {
                    vae_up.push(n);
                }
            }
        }
        let unet_layers_per_block = match (first_op, first_up) {
            (Some((n, key)), _) if n < 2 => {
                return Err(format!("'{key}': a downsampler at input_blocks.{n} leaves no room for a resnet"))
            }
            (Some((n, op)), Some((m, up))) if m != n - 1 => {
                return Err(format!(
                    "'{op}' says layers_per_block = {} but '{up}' says {m}: not an SD 1.x UNet",
                    n - 1
                ))
            }
            (Some((n, _)), _) => n - 1,
            (None, Some((m, key))) if m == 0 => {
                return Err(format!("'{key}': an upsampler at output_blocks.0 leaves no room for a resnet"))
            }
            (None, Some((m, _))) => m,
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
        if let Some(gap) = vae_up.iter().enumerate().find(|(i, n)| i != *n).map(|(i, _)| i) {
            let max = vae_up.last().copied().unwrap_or(gap);
            return Err(format!(
                "'{VAE_PREFIX}decoder.up.{gap}.*' is missing while '{VAE_PREFIX}decoder.up.{max}.*' exists"
            ));
        }
        let vae_up_blocks = if vae_up.is_empty() { SD1_DEFAULT.vae_up_blocks } else { vae_up.len() };
        Ok(LdmLayout { unet_layers_per_block, vae_up_blocks })
    }
}

/// Maps one LDM key. `Ok(None)` for keys that are not weights of the three components
/// (e.g. `model_ema.*`, `alphas_cumprod`); `Err` names the key that cannot be mapped.
pub fn ldm_to_diffusers(key: &str, layout: &LdmLayout) -> Result<Option<MappedKey>, String> {
    let with_key = |why: String| format!("'{key}': {why}");
    if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
        let (stem, leaf) = split_leaf(rest).map_err(with_key)?;
        let name = unet_to_diffusers(stem, layout.unet_layers_per_block).map_err(with_key)?;
        return Ok(Some(MappedKey { component: Component::Unet, name: format!("{name}.{leaf}"), squeeze_1x1: false }));
    }
    if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
        let (stem, leaf) = split_leaf(rest).map_err(with_key)?;
        let (name, matrix) = vae_to_diffusers(stem, layout.vae_up_blocks).map_err(with_key)?;
        return Ok(Some(MappedKey {
            component: Component::Vae,
            name: format!("{name}.{leaf}"),
            squeeze_1x1: matrix && leaf == "weight",
        }));
    }
    if let Some(rest) = key.strip_prefix(TEXT_PREFIX) {
        // Early SD 1.x checkpoints saved the CLIPTextModel before transformers added the
        // `text_model.` level; both spellings name the same tensors.
        let part = rest.strip_prefix("text_model.").unwrap_or(rest);
        if part == "embeddings.position_ids" {
            return Ok(None); // a buffer (0..77), not a weight
        }
        let (stem, leaf) = split_leaf(part).map_err(with_key)?;
        if !is_clip_part(stem) {
            return Err(with_key("not a CLIP text encoder weight".into()));
        }
        return Ok(Some(MappedKey {
            component: Component::TextEncoder,
            name: format!("text_model.{stem}.{leaf}"),
            squeeze_1x1: false,
        }));
    }
    if key.starts_with(OPEN_CLIP_PREFIX) {
        return Err(with_key(
            "the SD 2 OpenCLIP text encoder layout (cond_stage_model.model.*) is not supported yet".into(),
        ));
    }
    if key.starts_with("cond_stage_model.") {
        return Err(with_key("unknown text encoder layout under 'cond_stage_model.'".into()));
    }
    Ok(None)
}

/// The inverse of [`ldm_to_diffusers`].
///
/// Text encoder names may be given as `text_model.X` (every SD 1.x repository) or as the flat `X`
/// that transformers >= 5.6 writes for `CLIPTextModel`; both give the same LDM key.
pub fn diffusers_to_ldm(component: Component, name: &str, layout: &LdmLayout) -> Result<LdmKey, String> {
    let with_key = |why: String| format!("'{}.{name}': {why}", component.name());
    let (stem, leaf) = split_leaf(name).map_err(with_key)?;
    let (key, unsqueeze_1x1) = match component {
        Component::Unet => {
            let stem = unet_to_ldm(stem, layout.unet_layers_per_block).map_err(with_key)?;
            (format!("{UNET_PREFIX}{stem}.{leaf}"), false)
        }
        Component::Vae => {
            let (stem, matrix) = vae_to_ldm(stem, layout.vae_up_blocks).map_err(with_key)?;
            (format!("{VAE_PREFIX}{stem}.{leaf}"), matrix && leaf == "weight")
        }
        Component::TextEncoder => {
            let part = stem.strip_prefix("text_model.").unwrap_or(stem);
            if !is_clip_part(part) {
                return Err(with_key("not a CLIP text encoder weight".into()));
            }
            (format!("{TEXT_PREFIX}text_model.{part}.{leaf}"), false)
        }
    };
    Ok(LdmKey { key, unsqueeze_1x1 })
}

/// True for tensors a diffusers component file may hold that are buffers, not weights, and have no
/// LDM counterpart: older transformers saved CLIP's `position_ids` (SD 1.5's own
/// `text_encoder/model.safetensors` has it).
pub fn is_diffusers_buffer(component: Component, name: &str) -> bool {
    component == Component::TextEncoder
        && matches!(name, "text_model.embeddings.position_ids" | "embeddings.position_ids")
}

// ---------------------------------------------------------------- UNet

/// UNet stem below `model.diffusion_model.` -> diffusers stem.
///
/// `input_blocks` 1.. come in groups of `lpb + 1` per down block: `lpb` resnet(+attention) slots
/// (`.0` resnet, `.1` attention), then the downsampler `.0.op`. `output_blocks` come in groups of
/// `lpb + 1` per up block, all resnet(+attention) slots; the last slot also holds the upsampler,
/// at `.1.conv` after a bare resnet or `.2.conv` after resnet + attention.
fn unet_to_diffusers(stem: &str, lpb: usize) -> Result<String, String> {
    if let Some(d) = to_diffusers(&UNET_FIXED, stem) {
        return Ok(d.to_string());
    }
    let bad = || "not a Stable Diffusion 1.x UNet weight".to_string();
    let group = lpb.saturating_add(1);
    if let Some((n, rest)) = stem.strip_prefix("input_blocks.").and_then(split_index) {
        if n == 0 {
            return Err(bad());
        }
        let (b, l) = ((n - 1) / group, (n - 1) % group);
        return match rest {
            "0.op" if l == lpb => Ok(format!("down_blocks.{b}.downsamplers.0.conv")),
            _ if l == lpb => Err(bad()),
            _ => {
                if let Some(p) = rest.strip_prefix("0.") {
                    let r = to_diffusers(&UNET_RESNET, p).ok_or_else(bad)?;
                    Ok(format!("down_blocks.{b}.resnets.{l}.{r}"))
                } else if let Some(p) = rest.strip_prefix("1.").filter(|p| is_transformer_part(p)) {
                    Ok(format!("down_blocks.{b}.attentions.{l}.{p}"))
                } else {
                    Err(bad())
                }
            }
        };
    }
    if let Some((m, rest)) = stem.strip_prefix("middle_block.").and_then(split_index) {
        return match m {
            0 | 2 => to_diffusers(&UNET_RESNET, rest)
                .map(|r| format!("mid_block.resnets.{}.{r}", m / 2))
                .ok_or_else(bad),
            1 if is_transformer_part(rest) => Ok(format!("mid_block.attentions.0.{rest}")),
            _ => Err(bad()),
        };
    }
    if let Some((n, rest)) = stem.strip_prefix("output_blocks.").and_then(split_index) {
        let (b, l) = (n / group, n % group);
        if matches!(rest, "1.conv" | "2.conv") {
            // diffusers accepts either slot; a real checkpoint has only the one its block type gives.
            return if l == lpb { Ok(format!("up_blocks.{b}.upsamplers.0.conv")) } else { Err(bad()) };
        }
        if let Some(p) = rest.strip_prefix("0.") {
            let r = to_diffusers(&UNET_RESNET, p).ok_or_else(bad)?;
            return Ok(format!("up_blocks.{b}.resnets.{l}.{r}"));
        }
        if let Some(p) = rest.strip_prefix("1.").filter(|p| is_transformer_part(p)) {
            return Ok(format!("up_blocks.{b}.attentions.{l}.{p}"));
        }
    }
    Err(bad())
}

/// The inverse of [`unet_to_diffusers`]. The upsampler slot depends on whether the up block has
/// attention, which a diffusers name does not say; SD 1.x (and 2.x) has exactly one attention-free
/// up block, `up_blocks.0` (`UpBlock2D`), so its upsampler is `.1.conv` and the others' `.2.conv`.
fn unet_to_ldm(stem: &str, lpb: usize) -> Result<String, String> {
    if let Some(l) = to_ldm(&UNET_FIXED, stem) {
        return Ok(l.to_string());
    }
    let bad = || "not a Stable Diffusion 1.x UNet weight".to_string();
    let group = lpb.saturating_add(1);
    // Indices come from input; checked arithmetic turns absurd ones into errors, not panics.
    let at = |b: usize, l: usize| b.checked_mul(group).and_then(|x| x.checked_add(l)).ok_or_else(bad);
    if let Some((b, rest)) = stem.strip_prefix("down_blocks.").and_then(split_index) {
        if rest == "downsamplers.0.conv" {
            return Ok(format!("input_blocks.{}.0.op", at(b, lpb)?.saturating_add(1)));
        }
        let (what, (l, p)) = slot(rest).ok_or_else(bad)?;
        if l >= lpb {
            return Err(bad());
        }
        let n = at(b, l)?.saturating_add(1);
        return match what {
            Slot::Resnet => Ok(format!("input_blocks.{n}.0.{}", to_ldm(&UNET_RESNET, p).ok_or_else(bad)?)),
            Slot::Attention => Ok(format!("input_blocks.{n}.1.{p}")),
        };
    }
    if let Some(rest) = stem.strip_prefix("mid_block.") {
        return match slot(rest).ok_or_else(bad)? {
            (Slot::Resnet, (r @ (0 | 1), p)) => {
                Ok(format!("middle_block.{}.{}", 2 * r, to_ldm(&UNET_RESNET, p).ok_or_else(bad)?))
            }
            (Slot::Attention, (0, p)) => Ok(format!("middle_block.1.{p}")),
            _ => Err(bad()),
        };
    }
    if let Some((b, rest)) = stem.strip_prefix("up_blocks.").and_then(split_index) {
        if rest == "upsamplers.0.conv" {
            let after = if b == 0 { 1 } else { 2 };
            return Ok(format!("output_blocks.{}.{after}.conv", at(b, lpb)?));
        }
        let (what, (l, p)) = slot(rest).ok_or_else(bad)?;
        if l > lpb {
            return Err(bad());
        }
        let n = at(b, l)?;
        return match what {
            Slot::Resnet => Ok(format!("output_blocks.{n}.0.{}", to_ldm(&UNET_RESNET, p).ok_or_else(bad)?)),
            Slot::Attention => Ok(format!("output_blocks.{n}.1.{p}")),
        };
    }
    Err(bad())
}

enum Slot {
    Resnet,
    Attention,
}

/// `resnets.L.part` / `attentions.L.part` (a valid transformer part) inside a diffusers block.
fn slot(s: &str) -> Option<(Slot, (usize, &str))> {
    if let Some(r) = s.strip_prefix("resnets.") {
        return split_index(r).map(|x| (Slot::Resnet, x));
    }
    let (l, p) = s.strip_prefix("attentions.").and_then(split_index)?;
    is_transformer_part(p).then_some((Slot::Attention, (l, p)))
}

// ---------------------------------------------------------------- VAE

/// Block `i` of `n` counted from the other end; `None` if there is no such block.
fn reverse(i: usize, n: usize) -> Option<usize> {
    (i < n).then(|| n - 1 - i)
}

/// VAE stem below `first_stage_model.` -> (diffusers stem, is an attention matrix stored 1x1).
/// LDM numbers decoder `up` blocks from the lowest resolution's opposite end: LDM `up.i` is
/// diffusers `up_blocks.(n - 1 - i)`.
fn vae_to_diffusers(stem: &str, n_up: usize) -> Result<(String, bool), String> {
    if let Some(d) = to_diffusers(&VAE_FIXED, stem) {
        return Ok((d.to_string(), false));
    }
    let bad = || "not a Stable Diffusion 1.x VAE weight".to_string();
    let (coder, rest) = stem.split_once('.').filter(|(c, _)| matches!(*c, "encoder" | "decoder")).ok_or_else(bad)?;
    if let Some(mid) = rest.strip_prefix("mid.") {
        if let Some(p) = mid.strip_prefix("attn_1.") {
            let d = to_diffusers(&VAE_ATTN, p).ok_or_else(bad)?;
            return Ok((format!("{coder}.mid_block.attentions.0.{d}"), p != "norm"));
        }
        let (r, p) = match mid.split_once('.') {
            Some(("block_1", p)) => (0, p),
            Some(("block_2", p)) => (1, p),
            _ => return Err(bad()),
        };
        let d = to_diffusers(&VAE_RESNET, p).ok_or_else(bad)?;
        return Ok((format!("{coder}.mid_block.resnets.{r}.{d}"), false));
    }
    let (kind, blocks, sampler) = if coder == "encoder" {
        ("down", "down_blocks", "downsample")
    } else {
        ("up", "up_blocks", "upsample")
    };
    let (i, p) = rest.strip_prefix(kind).and_then(|r| r.strip_prefix('.')).and_then(split_index).ok_or_else(bad)?;
    let i = if coder == "decoder" {
        reverse(i, n_up).ok_or_else(|| format!("decoder.up.{i} but the checkpoint has {n_up} up blocks"))?
    } else {
        i
    };
    if p == format!("{sampler}.conv") {
        return Ok((format!("{coder}.{blocks}.{i}.{sampler}rs.0.conv"), false));
    }
    let (j, part) = p.strip_prefix("block.").and_then(split_index).ok_or_else(bad)?;
    let d = to_diffusers(&VAE_RESNET, part).ok_or_else(bad)?;
    Ok((format!("{coder}.{blocks}.{i}.resnets.{j}.{d}"), false))
}

/// The inverse of [`vae_to_diffusers`].
fn vae_to_ldm(stem: &str, n_up: usize) -> Result<(String, bool), String> {
    if let Some(l) = to_ldm(&VAE_FIXED, stem) {
        return Ok((l.to_string(), false));
    }
    let bad = || "not a Stable Diffusion 1.x VAE weight".to_string();
    let (coder, rest) = stem.split_once('.').filter(|(c, _)| matches!(*c, "encoder" | "decoder")).ok_or_else(bad)?;
    if let Some(p) = rest.strip_prefix("mid_block.attentions.0.") {
        let l = to_ldm(&VAE_ATTN, p).ok_or_else(bad)?;
        return Ok((format!("{coder}.mid.attn_1.{l}"), p != "group_norm"));
    }
    if let Some((r, p)) = rest.strip_prefix("mid_block.resnets.").and_then(split_index) {
        let l = to_ldm(&VAE_RESNET, p).filter(|_| r < 2).ok_or_else(bad)?;
        return Ok((format!("{coder}.mid.block_{}.{l}", r + 1), false));
    }
    let (kind, blocks, sampler) = if coder == "encoder" {
        ("down", "down_blocks", "downsample")
    } else {
        ("up", "up_blocks", "upsample")
    };
    let (i, p) = rest.strip_prefix(blocks).and_then(|r| r.strip_prefix('.')).and_then(split_index).ok_or_else(bad)?;
    let i = if coder == "decoder" {
        reverse(i, n_up).ok_or_else(|| format!("up_blocks.{i} but the checkpoint has {n_up} up blocks"))?
    } else {
        i
    };
    if p == format!("{sampler}rs.0.conv") {
        return Ok((format!("{coder}.{kind}.{i}.{sampler}.conv"), false));
    }
    let (j, part) = p.strip_prefix("resnets.").and_then(split_index).ok_or_else(bad)?;
    let l = to_ldm(&VAE_RESNET, part).ok_or_else(bad)?;
    Ok((format!("{coder}.{kind}.{i}.block.{j}.{l}"), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD1: LdmLayout = LdmLayout { unet_layers_per_block: 2, vae_up_blocks: 4 };

    /// Hand-checked against SD 1.5's real key lists (v1-5-pruned.safetensors and the diffusers
    /// repository): (LDM key, component, diffusers name, 1x1).
    const PAIRS: &[(&str, Component, &str, bool)] = &[
        ("model.diffusion_model.time_embed.2.bias", Component::Unet, "time_embedding.linear_2.bias", false),
        ("model.diffusion_model.input_blocks.0.0.weight", Component::Unet, "conv_in.weight", false),
        ("model.diffusion_model.input_blocks.3.0.op.weight", Component::Unet, "down_blocks.0.downsamplers.0.conv.weight", false),
        ("model.diffusion_model.input_blocks.4.0.skip_connection.bias", Component::Unet, "down_blocks.1.resnets.0.conv_shortcut.bias", false),
        ("model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight", Component::Unet,
            "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight", false),
        ("model.diffusion_model.input_blocks.11.0.out_layers.3.weight", Component::Unet, "down_blocks.3.resnets.1.conv2.weight", false),
        ("model.diffusion_model.middle_block.1.proj_in.weight", Component::Unet, "mid_block.attentions.0.proj_in.weight", false),
        ("model.diffusion_model.middle_block.2.emb_layers.1.weight", Component::Unet, "mid_block.resnets.1.time_emb_proj.weight", false),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", Component::Unet, "up_blocks.0.upsamplers.0.conv.weight", false),
        ("model.diffusion_model.output_blocks.5.2.conv.bias", Component::Unet, "up_blocks.1.upsamplers.0.conv.bias", false),
        ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", Component::Unet,
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight", false),
        ("model.diffusion_model.output_blocks.6.0.in_layers.0.weight", Component::Unet, "up_blocks.2.resnets.0.norm1.weight", false),
        ("model.diffusion_model.out.2.weight", Component::Unet, "conv_out.weight", false),
        ("first_stage_model.encoder.norm_out.bias", Component::Vae, "encoder.conv_norm_out.bias", false),
        ("first_stage_model.encoder.down.1.block.0.nin_shortcut.weight", Component::Vae,
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight", false),
        ("first_stage_model.encoder.down.2.downsample.conv.bias", Component::Vae, "encoder.down_blocks.2.downsamplers.0.conv.bias", false),
        ("first_stage_model.encoder.mid.attn_1.q.weight", Component::Vae, "encoder.mid_block.attentions.0.to_q.weight", true),
        ("first_stage_model.decoder.mid.attn_1.proj_out.weight", Component::Vae, "decoder.mid_block.attentions.0.to_out.0.weight", true),
        ("first_stage_model.decoder.mid.attn_1.proj_out.bias", Component::Vae, "decoder.mid_block.attentions.0.to_out.0.bias", false),
        ("first_stage_model.decoder.mid.attn_1.norm.weight", Component::Vae, "decoder.mid_block.attentions.0.group_norm.weight", false),
        ("first_stage_model.decoder.mid.block_2.conv1.weight", Component::Vae, "decoder.mid_block.resnets.1.conv1.weight", false),
        ("first_stage_model.decoder.up.3.block.2.norm2.bias", Component::Vae, "decoder.up_blocks.0.resnets.2.norm2.bias", false),
        ("first_stage_model.decoder.up.1.block.0.nin_shortcut.bias", Component::Vae,
            "decoder.up_blocks.2.resnets.0.conv_shortcut.bias", false),
        ("first_stage_model.decoder.up.1.upsample.conv.weight", Component::Vae, "decoder.up_blocks.2.upsamplers.0.conv.weight", false),
        ("first_stage_model.post_quant_conv.weight", Component::Vae, "post_quant_conv.weight", false),
        ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight", Component::TextEncoder,
            "text_model.encoder.layers.11.mlp.fc2.weight", false),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", Component::TextEncoder,
            "text_model.embeddings.token_embedding.weight", false),
    ];

    #[test]
    fn hand_checked_keys_both_directions() {
        for &(ldm, component, name, squeeze) in PAIRS {
            let want = MappedKey { component, name: name.to_string(), squeeze_1x1: squeeze };
            assert_eq!(ldm_to_diffusers(ldm, &SD1), Ok(Some(want)), "{ldm}");
            let back = LdmKey { key: ldm.to_string(), unsqueeze_1x1: squeeze };
            assert_eq!(diffusers_to_ldm(component, name, &SD1), Ok(back), "{name}");
        }
    }

    #[test]
    fn old_clip_layout_and_flat_transformers_names() {
        let got = ldm_to_diffusers("cond_stage_model.transformer.final_layer_norm.bias", &SD1).unwrap();
        assert_eq!(got.map(|m| m.name).as_deref(), Some("text_model.final_layer_norm.bias"));
        let got = diffusers_to_ldm(Component::TextEncoder, "encoder.layers.0.self_attn.out_proj.weight", &SD1);
        assert_eq!(
            got.map(|k| k.key).as_deref(),
            Ok("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight")
        );
    }

    #[test]
    fn non_weights_are_skipped() {
        for key in [
            "alphas_cumprod",
            "model_ema.decay",
            "model_ema.diffusion_modelinput_blocks00weight",
            "cond_stage_model.transformer.text_model.embeddings.position_ids",
            "cond_stage_model.transformer.embeddings.position_ids",
            "lora_unet_down_blocks_0.alpha",
        ] {
            assert_eq!(ldm_to_diffusers(key, &SD1), Ok(None), "{key}");
        }
        assert!(is_diffusers_buffer(Component::TextEncoder, "text_model.embeddings.position_ids"));
        assert!(!is_diffusers_buffer(Component::TextEncoder, "text_model.embeddings.position_embedding.weight"));
    }

    #[test]
    fn errors_name_the_key() {
        for key in [
            "model.diffusion_model.foo.weight",
            "model.diffusion_model.input_blocks.3.0.in_layers.0.weight", // slot 3 is the downsampler
            "model.diffusion_model.input_blocks.1.0.op.weight",
            "model.diffusion_model.input_blocks.01.0.in_layers.0.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight", // not the last slot of its block
            "model.diffusion_model.middle_block.3.in_layers.0.weight",
            "model.diffusion_model.label_emb.0.0.weight", // SDXL
            "model.diffusion_model.time_embed.0.running_mean",
            "model.diffusion_model.output_blocks.99999999999999999999999.0.in_layers.0.weight",
            "first_stage_model.decoder.up.4.block.0.conv1.weight", // only 4 up blocks
            "first_stage_model.decoder.up.18446744073709551615.block.0.conv1.weight",
            "first_stage_model.encoder.up.0.block.0.conv1.weight",
            "first_stage_model.encoder.mid.attn_1.qkv.weight",
            "first_stage_model.loss.logvar",
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.qkv.weight",
            "cond_stage_model.transformer.text_projection.weight",
            "cond_stage_model.foo.weight",
        ] {
            match ldm_to_diffusers(key, &SD1) {
                Err(e) => assert!(e.contains(key), "{e}"),
                Ok(m) => panic!("{key} mapped to {m:?}"),
            }
        }
        let e = ldm_to_diffusers("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", &SD1);
        assert!(e.as_ref().is_err_and(|e| e.contains("SD 2 OpenCLIP")), "{e:?}");
        for (c, name) in [
            (Component::Unet, "down_blocks.0.resnets.2.norm1.weight"), // only 2 resnets per down block
            (Component::Unet, "up_blocks.0.resnets.3.norm1.weight"),
            (Component::Unet, "mid_block.attentions.1.norm.weight"),
            (Component::Unet, "down_blocks.18446744073709551615.resnets.0.norm1.weight"),
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
        let huge = LdmLayout { unet_layers_per_block: usize::MAX, vae_up_blocks: usize::MAX };
        let _ = ldm_to_diffusers("model.diffusion_model.input_blocks.5.0.op.weight", &huge);
        let _ = diffusers_to_ldm(Component::Unet, "up_blocks.7.upsamplers.0.conv.weight", &huge);
        let _ = diffusers_to_ldm(Component::Unet, "down_blocks.7.downsamplers.0.conv.weight", &huge);
        let _ = diffusers_to_ldm(Component::Vae, "decoder.up_blocks.7.resnets.0.norm1.weight", &huge);
        let zero = LdmLayout { unet_layers_per_block: 0, vae_up_blocks: 0 };
        assert!(ldm_to_diffusers("first_stage_model.decoder.up.0.block.0.norm1.weight", &zero).is_err());
        let _ = ldm_to_diffusers("model.diffusion_model.output_blocks.3.1.conv.weight", &zero);
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
        assert_eq!(LdmLayout::infer(keys), Ok(LdmLayout { unet_layers_per_block: 2, vae_up_blocks: 3 }));
        // Only the upsampler to go by (output_blocks.N.2.conv after an attention slot).
        let keys = ["model.diffusion_model.output_blocks.3.2.conv.weight", "model.diffusion_model.out.2.bias"];
        assert_eq!(LdmLayout::infer(keys).map(|l| l.unet_layers_per_block), Ok(3));
        // No UNet and no VAE: nothing will be mapped from them, SD 1.x values stand in.
        assert_eq!(LdmLayout::infer(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]), Ok(SD1));

        let e = LdmLayout::infer(["model.diffusion_model.input_blocks.1.1.proj_in.weight"]);
        assert!(e.is_err_and(|e| e.contains("layers_per_block")));
        let e = LdmLayout::infer(["model.diffusion_model.input_blocks.1.0.op.weight"]);
        assert!(e.is_err_and(|e| e.contains("'model.diffusion_model.input_blocks.1.0.op.weight'")));
        let e = LdmLayout::infer([
            "model.diffusion_model.input_blocks.3.0.op.weight",
            "model.diffusion_model.output_blocks.3.1.conv.weight",
        ]);
        assert!(e.is_err_and(|e| e.contains("output_blocks.3.1.conv.weight")));
        let e = LdmLayout::infer(["first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.decoder.up.2.block.0.conv1.weight"]);
        assert!(e.is_err_and(|e| e.contains("decoder.up.1.*") && e.contains("decoder.up.2.*")));
    }
}
