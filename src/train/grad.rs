//! One loss and its gradients for every trainable tensor of an adapter, through the UNet (and
//! the text encoder when the condition is token ids): what `hdb finetune grad` computes, and
//! each finetuning step.
//!
//! `loss = mean over all elements of (unet(sample, timestep, context) - target)^2`, so
//! `dL/d out = 2 (out - target) / N`.

use super::hook::TrainHook;
use super::params::{LayerGrad, Trainable};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::safetensors::{read_as_f32, SafetensorsFile};
use crate::model::grad::GradOptions;
use crate::model::text_encoder::TextEncoder;
use crate::model::unet::{Unet, UnetInput};

/// What the UNet is conditioned on.
#[derive(Clone, Debug)]
pub enum Condition {
    /// encoder_hidden_states `[B, len, cross_attention_dim]` (the UNet alone).
    Hidden { values: Vec<f32>, len: usize },
    /// Token ids `[B, len]`: the text encoder runs too, with its adapted layers.
    Ids { ids: Vec<u32>, len: usize },
}

/// One gradient evaluation's inputs (f32, row-major).
#[derive(Clone, Debug)]
pub struct GradInput {
    /// Noisy latents `[B, 4, H, W]`.
    pub sample: Vec<f32>,
    /// `[B]`.
    pub timesteps: Vec<f32>,
    /// What the output is compared with, `[B, 4, H, W]`.
    pub target: Vec<f32>,
    pub condition: Condition,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl GradInput {
    /// Reads the input file of `hdb finetune grad`: `sample` [B, C, H, W] (noisy latents),
    /// `timestep` `[B]` (or a scalar for the whole batch), `target` `[B, C, H, W]`, and either
    /// `encoder_hidden_states` [B, L, D] or `input_ids` [B, L] (integers). Errors name the
    /// file and the tensor.
    pub fn from_safetensors(f: &SafetensorsFile) -> Result<GradInput> {
        let bad = |name: &str, reason: String| Error::InvalidFile {
            path: f.path().to_path_buf(),
            format: "finetune grad input",
            reason: format!("'{name}' {reason}"),
        };
        let (s_shape, sample) = read_as_f32(f, "sample")?;
        let [b, _, h, w] = s_shape[..] else {
            return Err(bad(
                "sample",
                format!("has shape {s_shape:?}, expected [B, C, H, W]"),
            ));
        };
        let (t_shape, mut timesteps) = read_as_f32(f, "timestep")?;
        if timesteps.len() == 1 && b > 1 {
            timesteps = vec![timesteps[0]; b];
        } else if timesteps.len() != b || t_shape.len() > 1 {
            return Err(bad(
                "timestep",
                format!("has shape {t_shape:?}, expected [{b}] or a scalar"),
            ));
        }
        let (g_shape, target) = read_as_f32(f, "target")?;
        if g_shape != s_shape {
            return Err(bad(
                "target",
                format!("has shape {g_shape:?}, expected {s_shape:?} like 'sample'"),
            ));
        }
        let condition = match (f.get("encoder_hidden_states"), f.get("input_ids")) {
            (Some(_), None) => {
                let (c_shape, values) = read_as_f32(f, "encoder_hidden_states")?;
                let [cb, len, _] = c_shape[..] else {
                    return Err(bad(
                        "encoder_hidden_states",
                        format!("has shape {c_shape:?}, expected [B, L, D]"),
                    ));
                };
                if cb != b {
                    return Err(bad(
                        "encoder_hidden_states",
                        format!("has batch {cb}, 'sample' {b}"),
                    ));
                }
                Condition::Hidden { values, len }
            }
            (None, Some(_)) => {
                let (i_shape, raw) = read_as_f32(f, "input_ids")?;
                let [ib, len] = i_shape[..] else {
                    return Err(bad(
                        "input_ids",
                        format!("has shape {i_shape:?}, expected [B, L]"),
                    ));
                };
                if ib != b {
                    return Err(bad("input_ids", format!("has batch {ib}, 'sample' {b}")));
                }
                let ids = raw
                    .iter()
                    .map(|&v| {
                        (v >= 0.0 && v.fract() == 0.0 && v < u32::MAX as f32)
                            .then_some(v as u32)
                            .ok_or_else(|| bad("input_ids", format!("holds {v}, not a token id")))
                    })
                    .collect::<Result<Vec<u32>>>()?;
                Condition::Ids { ids, len }
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "input_ids",
                    "and 'encoder_hidden_states' are both given; give one".into(),
                ))
            }
            (None, None) => {
                return Err(bad(
                    "encoder_hidden_states",
                    "or 'input_ids' is needed".into(),
                ))
            }
        };
        Ok(GradInput {
            sample,
            timesteps,
            target,
            condition,
            batch: b,
            height: h,
            width: w,
        })
    }
}

/// The mean squared error of `out` against `target` and its gradient at `out`.
pub fn mse(out: &[f32], target: &[f32]) -> Result<(f64, Vec<f32>)> {
    if out.len() != target.len() || out.is_empty() {
        return Err(Error::invalid_arg(
            "target",
            format!("has {} values for an output of {}", target.len(), out.len()),
        ));
    }
    let n = out.len() as f64;
    let loss = out
        .iter()
        .zip(target)
        .map(|(&o, &t)| (o as f64 - t as f64).powi(2))
        .sum::<f64>()
        / n;
    let grad = out
        .iter()
        .zip(target)
        .map(|(&o, &t)| (2.0 * (o as f64 - t as f64) / n) as f32)
        .collect();
    Ok((loss, grad))
}

/// The loss and the gradient of every layer of `t` (in `t.layers`' order, the file's layout).
/// `text_encoder` is needed when the condition is token ids.
pub fn loss_and_gradients<B: Backend>(
    unet: &Unet<B>,
    text_encoder: Option<&TextEncoder<B>>,
    t: &Trainable,
    input: &GradInput,
    checkpoint: bool,
) -> Result<(f64, Vec<LayerGrad>)> {
    let hook = TrainHook::new(unet.backend(), t)?;
    let b = input.batch;
    let (context, len, tape) = match &input.condition {
        Condition::Hidden { values, len } => (values.clone(), *len, None),
        Condition::Ids { ids, len } => {
            let te = text_encoder.ok_or_else(|| {
                Error::invalid_arg("input_ids", "token ids need the model's text encoder")
            })?;
            if ids.len() != b * len {
                return Err(Error::invalid_arg(
                    "input_ids",
                    format!("has {} ids, expected [{b}, {len}]", ids.len()),
                ));
            }
            let (hidden, tape) = te.forward_saved(ids, b, &hook)?;
            (hidden, *len, Some(tape))
        }
    };
    let x = UnetInput {
        sample: &input.sample,
        timesteps: &input.timesteps,
        context: &context,
        batch: b,
        height: input.height,
        width: input.width,
        context_len: len,
    };
    let mut loss = f64::NAN;
    let opts = GradOptions {
        checkpoint,
        context_grad: tape.is_some(),
    };
    let target = &input.target;
    let grad = unet.forward_backward(&x, &hook, opts, &mut |out| {
        let (l, g) = mse(out, target)?;
        loss = l;
        Ok(g)
    })?;
    if let Some(tape) = tape {
        let d = grad
            .d_context
            .ok_or_else(|| Error::Internal("the UNet returned no context gradient".into()))?;
        tape.backward(&d, &hook)?;
    }
    let grads = t
        .layers
        .iter()
        .map(|l| {
            let (dd, du) = hook.gradients(&l.key)?;
            Ok(l.chain(&dd, &du))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((loss, grads))
}
