//! transformers' `CLIPTextModel` (SD 1.x's text encoder) on any [`Backend`]: token and position
//! embeddings, pre-norm transformer layers with causal self-attention and quick-GELU MLPs, a
//! final layer norm. Its attention projections take LiDB/LoRA adapters like the UNet's.

use std::path::Path;

use serde_json::Value;

use crate::backend::{Activation as Op, AdapterHook, AttnDims, Backend, Cpu};
use crate::error::{Error, Result};
use crate::io::keymap::Component;
use crate::io::F32Weight;
use crate::model::adaptable::{Adaptable, LayerTable, TEXT_ENCODER_PREFIX};
use crate::model::layers::{
    add, find_weight, layer_table, AdaptRef, Hook, LayerNorm, Linear, WeightSource,
};
use crate::model::WeightStore;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f32,
    pub hidden_act: Activation,
}

impl Default for TextEncoderConfig {
    /// CLIP ViT-L/14's text tower, as in SD 1.x.
    fn default() -> Self {
        TextEncoderConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        }
    }
}

impl TextEncoderConfig {
    /// Reads a transformers `CLIPTextConfig` (`text_encoder/config.json`).
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidFile {
            path: path.to_path_buf(),
            format: "text encoder config",
            reason,
        };
        let d = TextEncoderConfig::default();
        let uint = |k: &str, def: usize| -> Result<usize> {
            match json.get(k) {
                None | Some(Value::Null) => Ok(def),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| x as usize)
                    .ok_or_else(|| invalid(format!("'{k}' must be a positive integer"))),
            }
        };
        let hidden_act = match json.get("hidden_act").and_then(Value::as_str) {
            None | Some("quick_gelu") => Activation::QuickGelu,
            Some("gelu") => Activation::Gelu,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: text encoder 'hidden_act' = {other}",
                    path.display()
                )))
            }
        };
        let cfg = TextEncoderConfig {
            vocab_size: uint("vocab_size", d.vocab_size)?,
            hidden_size: uint("hidden_size", d.hidden_size)?,
            intermediate_size: uint("intermediate_size", d.intermediate_size)?,
            num_hidden_layers: uint("num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: uint("num_attention_heads", d.num_attention_heads)?,
            max_position_embeddings: uint("max_position_embeddings", d.max_position_embeddings)?,
            layer_norm_eps: json
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .map_or(d.layer_norm_eps, |x| x as f32),
            hidden_act,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        Ok(cfg)
    }

    /// Infers the config of an LDM single file's text encoder from its shapes (64-wide heads,
    /// quick-GELU, as CLIP ViT-L/14).
    pub fn infer(w: &WeightStore, path: &Path) -> Result<Self> {
        let dims = |name: &str| -> Result<Vec<usize>> {
            w.get(name).map(|x| x.shape.dims().to_vec()).ok_or_else(|| {
                Error::invalid_model(
                    path,
                    format!("cannot infer the text encoder: missing tensor '{name}'"),
                )
            })
        };
        let tok = dims("text_model.embeddings.token_embedding.weight")?;
        let pos = dims("text_model.embeddings.position_embedding.weight")?;
        let fc1 = dims("text_model.encoder.layers.0.mlp.fc1.weight")?;
        let mut layers = 0;
        while w
            .get(&format!(
                "text_model.encoder.layers.{layers}.layer_norm1.weight"
            ))
            .is_some()
        {
            layers += 1;
        }
        let hidden = tok.get(1).copied().unwrap_or(0);
        Ok(TextEncoderConfig {
            vocab_size: tok.first().copied().unwrap_or(0),
            hidden_size: hidden,
            intermediate_size: fc1.first().copied().unwrap_or(0),
            num_hidden_layers: layers,
            num_attention_heads: (hidden / 64).max(1),
            max_position_embeddings: pos.first().copied().unwrap_or(0),
            ..TextEncoderConfig::default()
        })
    }
}

pub(crate) struct Layer<B: Backend> {
    pub(crate) ln1: LayerNorm<B>,
    pub(crate) q: Linear<B>,
    pub(crate) k: Linear<B>,
    pub(crate) v: Linear<B>,
    pub(crate) out: Linear<B>,
    pub(crate) ln2: LayerNorm<B>,
    pub(crate) fc1: Linear<B>,
    pub(crate) fc2: Linear<B>,
}

/// The text encoder on backend `B` (the CPU by default). The embedding tables stay in host
/// memory: a lookup gathers at most 77 rows per sequence.
pub struct TextEncoder<B: Backend = Cpu> {
    pub config: TextEncoderConfig,
    pub(crate) be: B,
    pub(crate) token_embedding: F32Weight,
    pub(crate) position_embedding: F32Weight,
    pub(crate) layers: Vec<Layer<B>>,
    pub(crate) final_ln: LayerNorm<B>,
}

impl<B: Backend> std::fmt::Debug for TextEncoder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("backend", &self.be.describe())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TextEncoder<Cpu> {
    pub fn load(config: TextEncoderConfig, src: &dyn WeightSource) -> Result<TextEncoder> {
        TextEncoder::load_on(Cpu, config, src)
    }

    /// The model's text encoder: config from `text_encoder/config.json`, else inferred.
    pub fn from_model(model: &crate::Model) -> Result<TextEncoder> {
        TextEncoder::from_model_on(Cpu, model)
    }

    /// `ids` [batch, len] (len <= max_position_embeddings) -> last_hidden_state [batch, len,
    /// hidden], what SD conditions on. Ids out of the vocabulary are an error naming the first.
    /// Adapters: [`TextEncoder::forward_hooked`].
    pub fn forward(&self, ids: &[u32], batch: usize) -> Result<Vec<f32>> {
        self.forward_hooked(ids, batch, None)
    }
}

impl<B: Backend> TextEncoder<B> {
    /// As [`TextEncoder::load`], on backend `be`.
    pub fn load_on(
        be: B,
        config: TextEncoderConfig,
        src: &dyn WeightSource,
    ) -> Result<TextEncoder<B>> {
        let (d, ff) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("text_model.encoder.layers.{i}");
                let proj = |name: &str| -> Result<Linear<B>> {
                    let path = format!("{p}.self_attn.{name}");
                    Ok(Linear::load(&be, src, &path, d, d, true)?
                        .adaptable_in(Component::TextEncoder, &path))
                };
                let mlp = |name: &str, din: usize, dout: usize| -> Result<Linear<B>> {
                    let path = format!("{p}.mlp.{name}");
                    Ok(Linear::load(&be, src, &path, din, dout, true)?
                        .adaptable_in(Component::TextEncoder, &path))
                };
                Ok(Layer {
                    ln1: LayerNorm::load_eps(&be, src, &format!("{p}.layer_norm1"), d, eps)?,
                    q: proj("q_proj")?,
                    k: proj("k_proj")?,
                    v: proj("v_proj")?,
                    out: proj("out_proj")?,
                    ln2: LayerNorm::load_eps(&be, src, &format!("{p}.layer_norm2"), d, eps)?,
                    fc1: mlp("fc1", d, ff)?,
                    fc2: mlp("fc2", ff, d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TextEncoder {
            token_embedding: src.get(
                "text_model.embeddings.token_embedding.weight",
                &[config.vocab_size, d],
            )?,
            position_embedding: src.get(
                "text_model.embeddings.position_embedding.weight",
                &[config.max_position_embeddings, d],
            )?,
            layers,
            final_ln: LayerNorm::load_eps(&be, src, "text_model.final_layer_norm", d, eps)?,
            config,
            be,
        })
    }

    /// As [`TextEncoder::from_model`], on backend `be`.
    pub fn from_model_on(be: B, model: &crate::Model) -> Result<TextEncoder<B>> {
        let (weights, config) = model.component_config(
            crate::io::keymap::Component::TextEncoder,
            TextEncoderConfig::from_json,
            TextEncoderConfig::infer,
        )?;
        TextEncoder::load_on(be, config, weights)
    }

    /// The backend this encoder runs on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// As [`TextEncoder::forward`], with adapters `ad` (a session's set as this backend's hook).
    pub fn forward_adapted(
        &self,
        ids: &[u32],
        batch: usize,
        ad: &dyn AdapterHook<B>,
    ) -> Result<Vec<f32>> {
        self.forward_hooked(ids, batch, Some(ad))
    }

    /// As [`TextEncoder::forward`], with adapters on this backend.
    pub fn forward_hooked(&self, ids: &[u32], batch: usize, ad: Hook<'_, B>) -> Result<Vec<f32>> {
        if let Some(ad) = ad {
            ad.validate(batch)?;
        }
        let cfg = &self.config;
        let d = cfg.hidden_size;
        let be = &self.be;
        let (mut h, len) = self.embed(ids, batch)?;
        let rows = batch * len;
        let act = self.activation();
        for l in &self.layers {
            let n = l.ln1.forward(be, &h)?;
            let q = l.q.forward_adapted(be, &n, rows, batch, ad)?;
            let k = l.k.forward_adapted(be, &n, rows, batch, ad)?;
            let v = l.v.forward_adapted(be, &n, rows, batch, ad)?;
            let a = {
                let dims = AttnDims {
                    batch,
                    lq: len,
                    lk: len,
                    heads: cfg.num_attention_heads,
                    head_dim: d / cfg.num_attention_heads,
                    causal: true,
                };
                be.attention(&q, &k, &v, dims)?
            };
            let o = l.out.forward_adapted(be, &a, rows, batch, ad)?;
            add(be, &mut h, &o)?;
            let n = l.ln2.forward(be, &h)?;
            let mut f = l.fc1.forward_adapted(be, &n, rows, batch, ad)?;
            be.activate(&mut f, act)?;
            let f = l.fc2.forward_adapted(be, &f, rows, batch, ad)?;
            add(be, &mut h, &f)?;
        }
        be.download(&self.final_ln.forward(be, &h)?)
    }

    /// Checks `ids` [batch, len] and looks up token + position embeddings: (`[batch * len,
    /// hidden]` on this backend, len).
    pub(crate) fn embed(&self, ids: &[u32], batch: usize) -> Result<(B::Buf, usize)> {
        let cfg = &self.config;
        let d = cfg.hidden_size;
        if batch == 0 || !ids.len().is_multiple_of(batch) {
            return Err(Error::invalid_arg(
                "ids",
                format!("{} ids do not split into {batch} sequences", ids.len()),
            ));
        }
        let len = ids.len() / batch;
        if len == 0 || len > cfg.max_position_embeddings {
            return Err(Error::invalid_arg(
                "ids",
                format!(
                    "sequences of {len} tokens; 1..={} allowed",
                    cfg.max_position_embeddings
                ),
            ));
        }
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= cfg.vocab_size)
        {
            return Err(Error::invalid_arg(
                "ids",
                format!(
                    "id {id} at position {i} is outside the vocabulary of {}",
                    cfg.vocab_size
                ),
            ));
        }
        let mut embedded = vec![0f32; batch * len * d];
        for (r, &id) in ids.iter().enumerate() {
            let t = &self.token_embedding[id as usize * d..(id as usize + 1) * d];
            let p = &self.position_embedding[(r % len) * d..(r % len + 1) * d];
            embedded[r * d..(r + 1) * d]
                .iter_mut()
                .zip(t.iter().zip(p))
                .for_each(|(o, (a, b))| *o = a + b);
        }
        Ok((self.be.upload(&embedded)?, len))
    }

    /// The activation of its MLP.
    pub(crate) fn activation(&self) -> Op {
        match self.config.hidden_act {
            Activation::QuickGelu => Op::QuickGelu,
            Activation::Gelu => Op::Gelu,
        }
    }

    /// Every adaptable linear layer: the attention projections and the MLP.
    fn projections(&self) -> impl Iterator<Item = &Linear<B>> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.out, &l.fc1, &l.fc2])
    }
}

impl<B: Backend> Adaptable<B> for TextEncoder<B> {
    fn key_prefix(&self) -> &'static str {
        TEXT_ENCODER_PREFIX
    }

    fn projection(&self, key: &str) -> Option<(&B::Weight, usize, usize)> {
        find_weight(self.projections().map(AdaptRef::Linear), key)
    }

    fn adaptable_layers(&self) -> LayerTable {
        layer_table(self.projections().map(AdaptRef::Linear))
    }
}
