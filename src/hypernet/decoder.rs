//! The hypernetwork's decoder: `torch.nn.TransformerDecoder` of
//! `TransformerDecoderLayer(d_model, nhead, 4 d_model, dropout=0, activation="gelu",
//! batch_first=True, norm_first=True)` layers and its final norm, on any [`Backend`]. Per layer:
//! `x += self_attn(norm1(x))`, `x += cross_attn(norm2(x), memory)`,
//! `x += linear2(gelu(linear1(norm3(x))))`; then `decoder.norm`.
//!
//! The memory (the projected image tokens) is the same in every refinement iteration, so each
//! layer's cross-attention keys and values are computed once per prediction (`MemoryKv`).

use super::vit::{linear_shapes, norm_shapes, split_rows, Part};
use crate::backend::{Activation, AttnDims, Backend};
use crate::error::{Error, Result};
use crate::model::layers::{add, LayerNorm, Linear, WeightSource};

/// torch's `nn.MultiheadAttention`: the packed `in_proj_weight` [3 d, d] (q, k, v rows) and
/// `in_proj_bias` [3 d] are split into three projections at load, then `out_proj`.
struct Mha<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    heads: usize,
}

impl<B: Backend> Mha<B> {
    fn load(be: &B, src: &dyn WeightSource, p: &str, d: usize, heads: usize) -> Result<Self> {
        let w = src.get(&format!("{p}.in_proj_weight"), &[3 * d, d])?;
        let b = src.get(&format!("{p}.in_proj_bias"), &[3 * d])?;
        let part = |i: usize| -> Result<Linear<B>> {
            Ok(Linear {
                w: be.weight(split_rows(&w, Part(i, 3)))?,
                b: Some(be.weight(split_rows(&b, Part(i, 3)))?),
                din: d,
                dout: d,
                key: None,
            })
        };
        Ok(Mha {
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: Linear::load(be, src, &format!("{p}.out_proj"), d, d, true)?,
            heads,
        })
    }

    fn attend(&self, be: &B, q: &B::Buf, kv: &(B::Buf, B::Buf), lq: usize) -> Result<B::Buf> {
        let d = self.q.dout;
        let a = {
            let dims = AttnDims {
                batch: 1,
                lq,
                lk: be.len(&kv.0) / d.max(1),
                heads: self.heads,
                head_dim: d / self.heads,
                causal: false,
            };
            be.attention(q, &kv.0, &kv.1, dims)?
        };
        self.out.forward(be, &a, lq)
    }

    /// Keys and values [m, d] each of memory [m, d].
    fn kv(&self, be: &B, memory: &B::Buf, m: usize) -> Result<(B::Buf, B::Buf)> {
        Ok((
            self.k.forward(be, memory, m)?,
            self.v.forward(be, memory, m)?,
        ))
    }

    /// Self-attention of x [rows, d].
    fn self_attention(&self, be: &B, x: &B::Buf, rows: usize) -> Result<B::Buf> {
        let q = self.q.forward(be, x, rows)?;
        self.attend(be, &q, &self.kv(be, x, rows)?, rows)
    }

    /// Attention of x [rows, d] over precomputed keys and values.
    fn cross_attention(
        &self,
        be: &B,
        x: &B::Buf,
        rows: usize,
        kv: &(B::Buf, B::Buf),
    ) -> Result<B::Buf> {
        let q = self.q.forward(be, x, rows)?;
        self.attend(be, &q, kv, rows)
    }
}

struct Layer<B: Backend> {
    norm1: LayerNorm<B>,
    self_attn: Mha<B>,
    norm2: LayerNorm<B>,
    cross_attn: Mha<B>,
    norm3: LayerNorm<B>,
    linear1: Linear<B>,
    linear2: Linear<B>,
}

pub(crate) struct Decoder<B: Backend> {
    layers: Vec<Layer<B>>,
    norm: LayerNorm<B>,
    d: usize,
}

/// Every `decoder.*` tensor and its shape, in torch's names.
pub(crate) fn tensor_shapes(d: usize, layers: usize) -> Vec<(String, Vec<usize>)> {
    let mut s = Vec::new();
    for i in 0..layers {
        let p = format!("decoder.layers.{i}");
        for a in ["self_attn", "multihead_attn"] {
            s.push((format!("{p}.{a}.in_proj_weight"), vec![3 * d, d]));
            s.push((format!("{p}.{a}.in_proj_bias"), vec![3 * d]));
            linear_shapes(&mut s, &format!("{p}.{a}.out_proj"), d, d);
        }
        linear_shapes(&mut s, &format!("{p}.linear1"), d, 4 * d);
        linear_shapes(&mut s, &format!("{p}.linear2"), 4 * d, d);
        for n in ["norm1", "norm2", "norm3"] {
            norm_shapes(&mut s, &format!("{p}.{n}"), d);
        }
    }
    norm_shapes(&mut s, "decoder.norm", d);
    s
}

/// Per decoder layer, the cross-attention keys and values of one image's memory.
pub(crate) struct MemoryKv<B: Backend>(Vec<(B::Buf, B::Buf)>);

impl<B: Backend> Decoder<B> {
    /// `decoder.layers.{i}.*` and `decoder.norm.*` (torch's default LayerNorm eps, 1e-5).
    pub(crate) fn load(
        be: &B,
        src: &dyn WeightSource,
        d: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Self> {
        let layers = (0..layers)
            .map(|i| {
                let p = format!("decoder.layers.{i}");
                Ok(Layer {
                    norm1: LayerNorm::load(be, src, &format!("{p}.norm1"), d)?,
                    self_attn: Mha::load(be, src, &format!("{p}.self_attn"), d, heads)?,
                    norm2: LayerNorm::load(be, src, &format!("{p}.norm2"), d)?,
                    cross_attn: Mha::load(be, src, &format!("{p}.multihead_attn"), d, heads)?,
                    norm3: LayerNorm::load(be, src, &format!("{p}.norm3"), d)?,
                    linear1: Linear::load(be, src, &format!("{p}.linear1"), d, 4 * d, true)?,
                    linear2: Linear::load(be, src, &format!("{p}.linear2"), 4 * d, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            layers,
            norm: LayerNorm::load(be, src, "decoder.norm", d)?,
            d,
        })
    }

    /// The cross-attention keys and values of memory [m, d_model], for every layer.
    pub(crate) fn memory_kv(&self, be: &B, memory: &B::Buf, m: usize) -> Result<MemoryKv<B>> {
        Ok(MemoryKv(
            self.layers
                .iter()
                .map(|l| l.cross_attn.kv(be, memory, m))
                .collect::<Result<_>>()?,
        ))
    }

    /// tgt [rows, d_model] -> decoder output after `decoder.norm` [rows, d_model].
    pub(crate) fn forward(
        &self,
        be: &B,
        mut x: B::Buf,
        rows: usize,
        kv: &MemoryKv<B>,
    ) -> Result<B::Buf> {
        if be.len(&x) != rows * self.d {
            return Err(Error::Internal(format!(
                "hypernet decoder: {} values for {rows} rows of {}",
                be.len(&x),
                self.d
            )));
        }
        for (l, kv) in self.layers.iter().zip(&kv.0) {
            let h = l.norm1.forward(be, &x)?;
            add(be, &mut x, &l.self_attn.self_attention(be, &h, rows)?)?;
            let h = l.norm2.forward(be, &x)?;
            add(be, &mut x, &l.cross_attn.cross_attention(be, &h, rows, kv)?)?;
            let h = l.norm3.forward(be, &x)?;
            let mut f = l.linear1.forward(be, &h, rows)?;
            be.activate(&mut f, Activation::Gelu)?;
            add(be, &mut x, &l.linear2.forward(be, &f, rows)?)?;
        }
        self.norm.forward(be, &x)
    }
}
