//! The text encoder's backward pass for training adapters on its attention projections: the
//! forward keeps every layer's intermediates (77 tokens: small), the backward runs from the
//! gradient at the last hidden state down to layer 0's projections. The token and position
//! embeddings hold no adapters, so nothing is computed for them.

use super::layers::{AttentionSaved, AttnParts, AttnSize};
use crate::backend::{AdapterHook, Backend};
use crate::error::{Error, Result};
use crate::model::layers::add;
use crate::model::text_encoder::{Layer, TextEncoder};

/// One layer's saved state.
struct LayerSaved<B: Backend> {
    h0: B::Buf,
    attn: AttentionSaved<B>,
    h1: B::Buf,
    /// fc1's input (ln2's output), the activation's input (fc1's output), fc2's input.
    n2: B::Buf,
    f: B::Buf,
    a: B::Buf,
}

impl<B: Backend> Layer<B> {
    fn parts(&self, heads: usize) -> AttnParts<'_, B> {
        AttnParts {
            to_q: &self.q,
            to_k: &self.k,
            to_v: &self.v,
            to_out: &self.out,
            heads,
            causal: true,
        }
    }
}

/// The text encoder's forward, saved for [`TextEncoderTape::backward`].
pub struct TextEncoderTape<'m, B: Backend> {
    te: &'m TextEncoder<B>,
    batch: usize,
    len: usize,
    layers: Vec<LayerSaved<B>>,
    /// The final layer norm's input.
    last: B::Buf,
}

impl<B: Backend> TextEncoder<B> {
    /// The forward of [`TextEncoder::forward_hooked`] with adapters `ad`, keeping what the
    /// backward needs: (last_hidden_state `[batch, len, hidden]` on the host, the tape).
    pub fn forward_saved(
        &self,
        ids: &[u32],
        batch: usize,
        ad: &dyn AdapterHook<B>,
    ) -> Result<(Vec<f32>, TextEncoderTape<'_, B>)> {
        ad.validate(batch)?;
        let be = &self.be;
        let cfg = &self.config;
        let (mut h, len) = self.embed(ids, batch)?;
        let rows = batch * len;
        let act = self.activation();
        let size = AttnSize {
            b: batch,
            lq: len,
            lk: len,
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let n1 = l.ln1.forward(be, &h)?;
            let (o, attn) =
                l.parts(cfg.num_attention_heads)
                    .forward_saved(be, n1, None, size, Some(ad))?;
            let mut h1 = be.copy(&h)?;
            add(be, &mut h1, &o)?;
            let n2 = l.ln2.forward(be, &h1)?;
            let f = l.fc1.forward(be, &n2, rows)?;
            let mut a = be.copy(&f)?;
            be.activate(&mut a, act)?;
            let f2 = l.fc2.forward(be, &a, rows)?;
            let mut h2 = be.copy(&h1)?;
            add(be, &mut h2, &f2)?;
            layers.push(LayerSaved {
                h0: std::mem::replace(&mut h, h2),
                attn,
                h1,
                n2,
                f,
                a,
            });
        }
        let out = be.download(&self.final_ln.forward(be, &h)?)?;
        Ok((
            out,
            TextEncoderTape {
                te: self,
                batch,
                len,
                layers,
                last: h,
            },
        ))
    }
}

impl<B: Backend> TextEncoderTape<'_, B> {
    /// Runs the backward from `d_hidden` (dL/d last_hidden_state, host f32); the hook
    /// accumulates its adapters' factor gradients.
    pub fn backward(&self, d_hidden: &[f32], ad: &dyn AdapterHook<B>) -> Result<()> {
        let te = self.te;
        let be = &te.be;
        let cfg = &te.config;
        let (b, len) = (self.batch, self.len);
        let rows = b * len;
        if d_hidden.len() != rows * cfg.hidden_size {
            return Err(Error::Internal(format!(
                "text encoder backward: {} gradient values for [{b}, {len}, {}]",
                d_hidden.len(),
                cfg.hidden_size
            )));
        }
        let act = te.activation();
        let size = AttnSize {
            b,
            lq: len,
            lk: len,
        };
        let dy = be.upload(d_hidden)?;
        let mut g = te.final_ln.backward(be, &self.last, &dy)?;
        // Layers before the first adapted one need no gradient.
        let first = te
            .layers
            .iter()
            .position(|l| [&l.q, &l.k, &l.v, &l.out].iter().any(|p| p.key.is_some()))
            .unwrap_or(te.layers.len());
        for (i, (l, s)) in te.layers.iter().zip(&self.layers).enumerate().rev() {
            if i < first {
                break;
            }
            // h2 = h1 + fc2(act(fc1(ln2(h1))))
            let da = l.fc2.backward(be, &s.a, &g, rows, b, Some(ad))?;
            let df = be.activate_backward(&s.f, &da, act)?;
            let dn2 = l.fc1.backward(be, &s.n2, &df, rows, b, Some(ad))?;
            let mut dh1 = l.ln2.backward(be, &s.h1, &dn2)?;
            add(be, &mut dh1, &g)?;
            // h1 = h0 + attn(ln1(h0))
            let (dn1, _) = l.parts(cfg.num_attention_heads).backward(
                be,
                &s.attn,
                None,
                &dh1,
                size,
                Some(ad),
                false,
            )?;
            let mut dh0 = l.ln1.backward(be, &s.h0, &dn1)?;
            add(be, &mut dh0, &dh1)?;
            g = dh0;
        }
        Ok(())
    }
}
