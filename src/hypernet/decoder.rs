//! The hypernetwork's decoder: `torch.nn.TransformerDecoder` of
//! `TransformerDecoderLayer(d_model, nhead, 4 d_model, dropout=0, activation="gelu",
//! batch_first=True, norm_first=True)` layers and its final norm, on the CPU ops. Per layer:
//! `x += self_attn(norm1(x))`, `x += cross_attn(norm2(x), memory)`,
//! `x += linear2(gelu(linear1(norm3(x))))`; then `decoder.norm`.
//!
//! The memory (the projected image tokens) is the same in every refinement iteration, so each
//! layer's cross-attention keys and values are computed once per prediction ([`MemoryKv`]).

use super::vit::{linear_shapes, norm_shapes, split3};
use crate::backend::cpu as ops;
use crate::backend::profile::scope;
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::model::layers::{add, LayerNorm, Linear, WeightSource};
use crate::model::weights::F32Weight;

/// torch's `nn.MultiheadAttention` weights: packed `in_proj_weight` [3 d, d] (q, k, v rows),
/// `in_proj_bias` [3 d], `out_proj`.
struct Mha {
    in_w: F32Weight,
    in_b: F32Weight,
    out: Linear,
    d: usize,
    heads: usize,
}

impl Mha {
    fn load(src: &dyn WeightSource, p: &str, d: usize, heads: usize) -> Result<Mha> {
        Ok(Mha {
            in_w: src.get(&format!("{p}.in_proj_weight"), &[3 * d, d])?,
            in_b: src.get(&format!("{p}.in_proj_bias"), &[3 * d])?,
            out: Linear::load(&Cpu, src, &format!("{p}.out_proj"), d, d, true)?,
            d,
            heads,
        })
    }

    /// x [rows, d] -> x [rows, d] · W[part rows]^T + b[part], part `from..to` of the 3 d rows.
    fn project(&self, x: &[f32], rows: usize, from: usize, to: usize) -> Vec<f32> {
        let _p = scope("linear");
        let d = self.d;
        let mut y = vec![0f32; rows * (to - from) * d];
        ops::linear(
            &mut y,
            x,
            &self.in_w[from * d * d..to * d * d],
            Some(&self.in_b[from * d..to * d]),
            rows,
            d,
            (to - from) * d,
        );
        y
    }

    fn attend(&self, q: &[f32], k: &[f32], v: &[f32], lq: usize, lk: usize) -> Result<Vec<f32>> {
        let mut a = vec![0f32; q.len()];
        {
            let _p = scope("attention");
            ops::attention(&mut a, q, k, v, 1, lq, lk, self.heads, self.d / self.heads);
        }
        self.out.forward(&Cpu, &a, lq)
    }

    /// Self-attention of x [rows, d].
    fn self_attention(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let qkv = self.project(x, rows, 0, 3);
        let (q, k, v) = split3(&qkv, rows, self.d);
        self.attend(&q, &k, &v, rows, rows)
    }

    /// Keys and values [m, d] each of memory [m, d].
    fn kv(&self, memory: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
        (self.project(memory, m, 1, 2), self.project(memory, m, 2, 3))
    }

    /// Attention of x [rows, d] over precomputed keys and values.
    fn cross_attention(
        &self,
        x: &[f32],
        rows: usize,
        kv: &(Vec<f32>, Vec<f32>),
    ) -> Result<Vec<f32>> {
        let q = self.project(x, rows, 0, 1);
        self.attend(&q, &kv.0, &kv.1, rows, kv.0.len() / self.d)
    }
}

struct Layer {
    norm1: LayerNorm,
    self_attn: Mha,
    norm2: LayerNorm,
    cross_attn: Mha,
    norm3: LayerNorm,
    linear1: Linear,
    linear2: Linear,
}

pub(crate) struct Decoder {
    layers: Vec<Layer>,
    norm: LayerNorm,
    d: usize,
}

/// Per decoder layer, the cross-attention keys and values of one image's memory.
pub(crate) struct MemoryKv(Vec<(Vec<f32>, Vec<f32>)>);

impl Decoder {
    /// `decoder.layers.{i}.*` and `decoder.norm.*` (torch's default LayerNorm eps, 1e-5).
    pub(crate) fn load(
        src: &dyn WeightSource,
        d: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Decoder> {
        let layers = (0..layers)
            .map(|i| {
                let p = format!("decoder.layers.{i}");
                Ok(Layer {
                    norm1: LayerNorm::load(&Cpu, src, &format!("{p}.norm1"), d)?,
                    self_attn: Mha::load(src, &format!("{p}.self_attn"), d, heads)?,
                    norm2: LayerNorm::load(&Cpu, src, &format!("{p}.norm2"), d)?,
                    cross_attn: Mha::load(src, &format!("{p}.multihead_attn"), d, heads)?,
                    norm3: LayerNorm::load(&Cpu, src, &format!("{p}.norm3"), d)?,
                    linear1: Linear::load(&Cpu, src, &format!("{p}.linear1"), d, 4 * d, true)?,
                    linear2: Linear::load(&Cpu, src, &format!("{p}.linear2"), 4 * d, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            layers,
            norm: LayerNorm::load(&Cpu, src, "decoder.norm", d)?,
            d,
        })
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

    /// The cross-attention keys and values of memory [m, d_model], for every layer.
    pub(crate) fn memory_kv(&self, memory: &[f32], m: usize) -> MemoryKv {
        MemoryKv(
            self.layers
                .iter()
                .map(|l| l.cross_attn.kv(memory, m))
                .collect(),
        )
    }

    /// tgt [rows, d_model] -> decoder output after `decoder.norm` [rows, d_model].
    pub(crate) fn forward(&self, mut x: Vec<f32>, rows: usize, kv: &MemoryKv) -> Result<Vec<f32>> {
        if x.len() != rows * self.d {
            return Err(Error::Internal(format!(
                "hypernet decoder: {} values for {rows} rows of {}",
                x.len(),
                self.d
            )));
        }
        let be = &Cpu;
        for (l, kv) in self.layers.iter().zip(&kv.0) {
            let h = l.norm1.forward(be, &x)?;
            add(be, &mut x, &l.self_attn.self_attention(&h, rows)?)?;
            let h = l.norm2.forward(be, &x)?;
            add(be, &mut x, &l.cross_attn.cross_attention(&h, rows, kv)?)?;
            let h = l.norm3.forward(be, &x)?;
            let mut f = l.linear1.forward(be, &h, rows)?;
            {
                let _p = scope("activation");
                ops::gelu_inplace(&mut f);
            }
            add(be, &mut x, &l.linear2.forward(be, &f, rows)?)?;
        }
        self.norm.forward(be, &x)
    }
}
