//! The UNet's backward pass for training adapters: one forward and one backward from the
//! gradient of a loss at its output, through every layer after the first adapted one, with
//! the adapter hook collecting its factors' gradients on the way (frozen weights get none).
//!
//! Activation checkpointing per block: the forward keeps only each block's input (and the
//! skips, which the up path needs anyway); the backward recomputes one block at a time with
//! its intermediates kept, then runs its backward. Off, the first forward keeps every block's
//! intermediates (faster, more memory).

use super::layers::{transpose_back, AttentionSaved, AttnParts, AttnSize, Dims, ResnetSaved};
use crate::backend::{Activation, AdapterHook, Backend};
use crate::error::{Error, Result};
use crate::model::layers::{add, transpose, Act, Hook};
use crate::model::unet::{
    check_input, Attention, Block, Proj, Transformer2d, TransformerBlock, Unet, UnetInput,
};

/// How a backward pass runs.
#[derive(Clone, Copy, Debug)]
pub struct GradOptions {
    /// Recompute each block's intermediates in the backward instead of keeping them all.
    pub checkpoint: bool,
    /// Also return the gradient at the UNet's context (for adapters on the text encoder).
    pub context_grad: bool,
}

impl Default for GradOptions {
    fn default() -> Self {
        GradOptions {
            checkpoint: true,
            context_grad: false,
        }
    }
}

/// A forward and backward pass's results.
#[derive(Debug)]
pub struct UnetGrad {
    /// The UNet's output `[B, out, H, W]`.
    pub out: Vec<f32>,
    /// dL/d(context) `[B, L, cross_attention_dim]`, when asked.
    pub d_context: Option<Vec<f32>>,
}

impl<B: Backend> Attention<B> {
    fn parts(&self) -> AttnParts<'_, B> {
        AttnParts {
            to_q: &self.to_q,
            to_k: &self.to_k,
            to_v: &self.to_v,
            to_out: &self.to_out,
            heads: self.heads,
            causal: false,
        }
    }
}

/// A transformer block's saved state: the residual stream before each of its three parts,
/// the attentions' states and the feed-forward's inner activations.
struct BlockSaved<B: Backend> {
    x0: B::Buf,
    x1: B::Buf,
    x2: B::Buf,
    a1: AttentionSaved<B>,
    a2: AttentionSaved<B>,
    /// ff_proj's input (norm3's output), GEGLU's input, ff_out's input.
    n3: B::Buf,
    f: B::Buf,
    g: B::Buf,
}

/// Everything a backward pass shares: the backend, the hook, the context and sizes.
struct Ctx<'a, B: Backend> {
    be: &'a B,
    ad: Hook<'a, B>,
    context: &'a B::Buf,
    emb: &'a B::Buf,
    l: usize,
    want_ctx: bool,
}

impl<B: Backend> TransformerBlock<B> {
    fn forward_saved(
        &self,
        c: &Ctx<'_, B>,
        x0: B::Buf,
        b: usize,
        t: usize,
    ) -> Result<(B::Buf, BlockSaved<B>)> {
        let be = c.be;
        let ch = self.norm1.dim;
        let s1 = AttnSize { b, lq: t, lk: t };
        let s2 = AttnSize { b, lq: t, lk: c.l };
        let n1 = self.norm1.forward(be, &x0)?;
        let (o1, a1) = self.attn1.parts().forward_saved(be, n1, None, s1, c.ad)?;
        let mut x1 = be.copy(&x0)?;
        add(be, &mut x1, &o1)?;
        let n2 = self.norm2.forward(be, &x1)?;
        let (o2, a2) = self
            .attn2
            .parts()
            .forward_saved(be, n2, Some(c.context), s2, c.ad)?;
        let mut x2 = be.copy(&x1)?;
        add(be, &mut x2, &o2)?;
        let n3 = self.norm3.forward(be, &x2)?;
        let f = self.ff_proj.forward(be, &n3, b * t)?;
        let g = be.geglu(&f, (b * t, 4 * ch))?;
        let o3 = self.ff_out.forward(be, &g, b * t)?;
        let mut x3 = be.copy(&x2)?;
        add(be, &mut x3, &o3)?;
        let saved = BlockSaved {
            x0,
            x1,
            x2,
            a1,
            a2,
            n3,
            f,
            g,
        };
        Ok((x3, saved))
    }

    /// dx0 from dx3; the context's gradient is added to `d_ctx` when wanted.
    fn backward(
        &self,
        c: &Ctx<'_, B>,
        s: &BlockSaved<B>,
        dx3: B::Buf,
        (b, t): (usize, usize),
        d_ctx: &mut Option<B::Buf>,
    ) -> Result<B::Buf> {
        let be = c.be;
        let ch = self.norm1.dim;
        let rows = b * t;
        // x3 = x2 + ff_out(geglu(ff_proj(norm3(x2))))
        let dg = self.ff_out.backward(be, &s.g, &dx3, rows, b, c.ad)?;
        let df = be.geglu_backward(&s.f, &dg, (rows, 4 * ch))?;
        let dn3 = self.ff_proj.backward(be, &s.n3, &df, rows, b, c.ad)?;
        let mut dx2 = self.norm3.backward(be, &s.x2, &dn3)?;
        add(be, &mut dx2, &dx3)?;
        // x2 = x1 + attn2(norm2(x1), ctx)
        let s2 = AttnSize { b, lq: t, lk: c.l };
        let (dn2, dc) =
            self.attn2
                .parts()
                .backward(be, &s.a2, Some(c.context), &dx2, s2, c.ad, c.want_ctx)?;
        if let Some(dc) = dc {
            match d_ctx {
                Some(acc) => add(be, acc, &dc)?,
                None => *d_ctx = Some(dc),
            }
        }
        let mut dx1 = self.norm2.backward(be, &s.x1, &dn2)?;
        add(be, &mut dx1, &dx2)?;
        // x1 = x0 + attn1(norm1(x0))
        let s1 = AttnSize { b, lq: t, lk: t };
        let (dn1, _) = self
            .attn1
            .parts()
            .backward(be, &s.a1, None, &dx1, s1, c.ad, false)?;
        let mut dx0 = self.norm1.backward(be, &s.x0, &dn1)?;
        add(be, &mut dx0, &dx1)?;
        Ok(dx0)
    }
}

/// A Transformer2D's saved state.
struct T2dSaved<B: Backend> {
    x: Act<B>,
    /// The group norm's output (proj_in's input, NCHW).
    h: Act<B>,
    /// Linear projection: the transposed tokens proj_in read.
    tokens_in: Option<B::Buf>,
    blocks: Vec<BlockSaved<B>>,
    /// proj_out's input: NCHW for a conv projection, tokens for a linear one.
    pre_out: B::Buf,
}

impl<B: Backend> Transformer2d<B> {
    fn forward_saved(&self, c: &Ctx<'_, B>, x: Act<B>) -> Result<(Act<B>, T2dSaved<B>)> {
        let be = c.be;
        let (b, ch, hw) = (x.b, x.c, x.h * x.w);
        let h = self.norm.forward(be, &x, false)?;
        let (mut tokens, tokens_in) = match &self.proj_in {
            Proj::Conv(conv) => (
                transpose(be, &conv.forward(be, &h)?.data, b, ch, hw, true)?,
                None,
            ),
            Proj::Linear(lin) => {
                let tt = transpose(be, &h.data, b, ch, hw, true)?;
                (lin.forward(be, &tt, b * hw)?, Some(tt))
            }
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (next, s) = blk.forward_saved(c, tokens, b, hw)?;
            tokens = next;
            blocks.push(s);
        }
        let (mut out, pre_out) = match &self.proj_out {
            Proj::Conv(conv) => {
                let back = x.with(transpose(be, &tokens, b, ch, hw, false)?);
                (conv.forward(be, &back)?, back.data)
            }
            Proj::Linear(lin) => {
                let po = lin.forward(be, &tokens, b * hw)?;
                (x.with(transpose(be, &po, b, ch, hw, false)?), tokens)
            }
        };
        add(be, &mut out.data, &x.data)?;
        Ok((
            out,
            T2dSaved {
                x,
                h,
                tokens_in,
                blocks,
                pre_out,
            },
        ))
    }

    fn backward(
        &self,
        c: &Ctx<'_, B>,
        s: &T2dSaved<B>,
        g: &B::Buf,
        d_ctx: &mut Option<B::Buf>,
    ) -> Result<B::Buf> {
        let be = c.be;
        let dims = s.x.dims();
        let (b, hw) = (dims.b, dims.h * dims.w);
        let mut d_tokens = match &self.proj_out {
            Proj::Conv(conv) => {
                let d_back = conv.backward_dims(be, &dims, g)?;
                transpose_back(be, &d_back, dims, true)?
            }
            Proj::Linear(lin) => {
                let d_po = transpose_back(be, g, dims, true)?;
                lin.backward(be, &s.pre_out, &d_po, b * hw, b, c.ad)?
            }
        };
        for (blk, sv) in self.blocks.iter().zip(&s.blocks).rev() {
            d_tokens = blk.backward(c, sv, d_tokens, (b, hw), d_ctx)?;
        }
        let d_h = match (&self.proj_in, &s.tokens_in) {
            (Proj::Conv(conv), _) => {
                let d_t = transpose(be, &d_tokens, b, dims.c, hw, false)?;
                conv.backward(be, &s.h, &d_t)?.data
            }
            (Proj::Linear(lin), Some(tt)) => {
                let d_tt = lin.backward(be, tt, &d_tokens, b * hw, b, c.ad)?;
                transpose(be, &d_tt, b, dims.c, hw, false)?
            }
            (Proj::Linear(_), None) => {
                return Err(Error::Internal("transformer: tokens were not saved".into()))
            }
        };
        let mut dx = self.norm.backward(be, &s.x, &d_h, false)?;
        add(be, &mut dx, g)?;
        Ok(dx)
    }
}

/// One resnet (+ transformer) step of a block, saved.
struct StepSaved<B: Backend> {
    resnet: ResnetSaved<B>,
    attention: Option<T2dSaved<B>>,
}

/// The size an up block's upsampler produces: the next skip's (the one before `range`, which
/// the next block consumes first), `None` for the last block.
fn up_target<B: Backend>(
    skips: &[Act<B>],
    range: &std::ops::Range<usize>,
) -> Option<(usize, usize)> {
    range
        .start
        .checked_sub(1)
        .and_then(|i| skips.get(i))
        .map(|s| (s.h, s.w))
}

/// A block's saved state: its steps and the resampler's input.
struct BlockState<B: Backend> {
    steps: Vec<StepSaved<B>>,
    /// The down-sampling conv's input, or the up-sampling conv's (upsampled) input and the
    /// dims before upsampling.
    resample_in: Option<(Act<B>, Dims)>,
}

/// A down block's forward: (output, the skips it pushes, saved state when kept).
type DownOut<B> = (Act<B>, Vec<Act<B>>, Option<BlockState<B>>);

/// Keeps a block's saved state only when asked (`keep`), so the one forward code serves the
/// checkpointed pass (nothing kept) and the recomputation (everything kept).
fn keep_if<T>(keep: bool, v: T) -> Option<T> {
    keep.then_some(v)
}

impl<B: Backend> Unet<B> {
    /// Down block `i` from `x`: (output, the skips it pushes, saved state when `keep`).
    fn down_forward(&self, c: &Ctx<'_, B>, i: usize, x: Act<B>, keep: bool) -> Result<DownOut<B>> {
        let be = c.be;
        let blk: &Block<B> = &self.down[i];
        let mut steps = Vec::new();
        let mut skips = Vec::new();
        let mut x = x;
        for (j, r) in blk.resnets.iter().enumerate() {
            let (y, rs) = r.forward_saved(be, x, Some(c.emb))?;
            x = y;
            let mut attention = None;
            if let Some(a) = blk.attentions.get(j) {
                let (y, ts) = a.forward_saved(c, x)?;
                x = y;
                attention = keep_if(keep, ts);
            }
            if keep {
                steps.push(StepSaved {
                    resnet: rs,
                    attention,
                });
            }
            skips.push(x.clone_act(be)?);
        }
        let mut resample_in = None;
        if let Some(ds) = &blk.resample {
            let y = ds.forward(be, &x)?;
            let d = x.dims();
            resample_in = keep_if(keep, (x, d));
            x = y;
            skips.push(x.clone_act(be)?);
        }
        let state = keep.then_some(BlockState { steps, resample_in });
        Ok((x, skips, state))
    }

    /// The gradient at down block `i`'s input, from the gradient at its output `g` and at its
    /// skips (`d_skips`, one per skip, in push order); `None` when no adapted layer comes
    /// before this point (nothing upstream needs it).
    fn down_backward(
        &self,
        c: &Ctx<'_, B>,
        i: usize,
        s: &BlockState<B>,
        mut g: B::Buf,
        d_skips: &mut [Option<B::Buf>],
        d_ctx: &mut Option<B::Buf>,
    ) -> Result<Option<B::Buf>> {
        let be = c.be;
        let blk = &self.down[i];
        let n = d_skips.len();
        // The last skip is the block's output.
        if let Some(d) = d_skips[n - 1].take() {
            add(be, &mut g, &d)?;
        }
        let mut next_skip = n - 1;
        if let (Some(ds), Some((x, _))) = (&blk.resample, &s.resample_in) {
            g = ds.backward(be, x, &g)?.data;
            next_skip -= 1;
            if let Some(d) = d_skips[next_skip].take() {
                add(be, &mut g, &d)?;
            }
        }
        for (j, st) in s.steps.iter().enumerate().rev() {
            if let (Some(a), Some(ts)) = (blk.attentions.get(j), &st.attention) {
                g = a.backward(c, ts, &g, d_ctx)?;
            }
            if !self.adapted_before(i, j) {
                return Ok(None);
            }
            g = blk.resnets[j].backward(be, &st.resnet, &g)?;
            if j > 0 {
                if let Some(d) = d_skips[j - 1].take() {
                    add(be, &mut g, &d)?;
                }
            }
        }
        Ok(Some(g))
    }

    /// Whether a transformer (the only adapted layers) comes before step `j` of down block `i`.
    fn adapted_before(&self, i: usize, j: usize) -> bool {
        self.down[..i].iter().any(|b| !b.attentions.is_empty())
            || self.down[i].attentions.len().min(j) > 0
    }

    /// Up block `i` from `x` and its skips (popped from the back of `skips`, as the forward
    /// does): (output, saved state when `keep`).
    fn up_forward(
        &self,
        c: &Ctx<'_, B>,
        i: usize,
        x: Act<B>,
        skips: &[Act<B>],
        target: Option<(usize, usize)>,
        keep: bool,
    ) -> Result<(Act<B>, Option<BlockState<B>>)> {
        let be = c.be;
        let blk = &self.up[i];
        let mut steps = Vec::new();
        let mut x = x;
        for (j, r) in blk.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - j];
            let cat = be.concat_channels(&x.data, &skip.data, (x.b, x.c, skip.c, x.h * x.w))?;
            let cat = Act {
                data: cat,
                c: x.c + skip.c,
                ..x
            };
            let (y, rs) = r.forward_saved(be, cat, Some(c.emb))?;
            x = y;
            let mut attention = None;
            if let Some(a) = blk.attentions.get(j) {
                let (y, ts) = a.forward_saved(c, x)?;
                x = y;
                attention = keep_if(keep, ts);
            }
            if keep {
                steps.push(StepSaved {
                    resnet: rs,
                    attention,
                });
            }
        }
        let mut resample_in = None;
        if let Some(us) = &blk.resample {
            let pre = x.dims();
            // As the forward (model/unet.rs): at odd latent sizes the upsample is cropped to
            // the next skip's size.
            let (th, tw) = target.unwrap_or((2 * x.h, 2 * x.w));
            if th + 1 < 2 * x.h || th > 2 * x.h || tw + 1 < 2 * x.w || tw > 2 * x.w {
                return Err(Error::Internal(format!(
                    "UNet: a {}x{} level cannot be upsampled to its skip's {th}x{tw}",
                    x.h, x.w
                )));
            }
            let mut up = be.upsample_nearest2x(&x.data, (x.b * x.c, x.h, x.w))?;
            if (th, tw) != (2 * x.h, 2 * x.w) {
                up = be.crop_top_left(&up, (x.b * x.c, 2 * x.h, 2 * x.w), (th, tw))?;
            }
            let up = Act {
                data: up,
                h: th,
                w: tw,
                ..x
            };
            x = us.forward(be, &up)?;
            resample_in = keep_if(keep, (up, pre));
        }
        Ok((x, keep.then_some(BlockState { steps, resample_in })))
    }

    /// The gradient at up block `i`'s input; its skips' gradients go to `d_skips` (in the
    /// order the block consumed them: first = the last pushed).
    #[allow(clippy::too_many_arguments)]
    fn up_backward(
        &self,
        c: &Ctx<'_, B>,
        i: usize,
        s: &BlockState<B>,
        skips: &[Act<B>],
        mut g: B::Buf,
        d_skips: &mut Vec<B::Buf>,
        d_ctx: &mut Option<B::Buf>,
    ) -> Result<B::Buf> {
        let be = c.be;
        let blk = &self.up[i];
        if let (Some(us), Some((up, pre))) = (&blk.resample, &s.resample_in) {
            g = us.backward(be, up, &g)?.data;
            if (up.h, up.w) != (2 * pre.h, 2 * pre.w) {
                let planes = pre.b * pre.c;
                g = be.uncrop_top_left(&g, (planes, up.h, up.w), (2 * pre.h, 2 * pre.w))?;
            }
            g = be.upsample_nearest2x_backward(&g, (pre.b * pre.c, pre.h, pre.w))?;
        }
        let mut per_step = Vec::new();
        for (j, st) in s.steps.iter().enumerate().rev() {
            if let (Some(a), Some(ts)) = (blk.attentions.get(j), &st.attention) {
                g = a.backward(c, ts, &g, d_ctx)?;
            }
            let d_cat = blk.resnets[j].backward(be, &st.resnet, &g)?;
            let skip = &skips[skips.len() - 1 - j];
            let x_c = st.resnet.x.c - skip.c;
            let hw = skip.h * skip.w;
            let (dx, ds) = be.split_channels(&d_cat, (skip.b, x_c, skip.c, hw))?;
            per_step.push(ds);
            g = dx;
        }
        per_step.reverse();
        *d_skips = per_step;
        Ok(g)
    }

    /// One forward pass with adapters `ad`, then one backward from `loss_grad(output)` (the
    /// loss's gradient at the output, `[B, out, H, W]`, host f32): the hook accumulates the
    /// gradients of its adapters' factors. Returns the output and, with
    /// `opts.context_grad`, the gradient at the context.
    pub fn forward_backward(
        &self,
        x: &UnetInput<'_>,
        ad: &dyn AdapterHook<B>,
        opts: GradOptions,
        loss_grad: &mut dyn FnMut(&[f32]) -> Result<Vec<f32>>,
    ) -> Result<UnetGrad> {
        ad.validate(x.batch)?;
        let UnetInput {
            sample,
            timesteps,
            context,
            batch: b,
            height: h,
            width: w,
            context_len: l,
        } = *x;
        let cfg = &self.config;
        check_input(
            cfg,
            (sample.len(), timesteps.len(), context.len()),
            (b, h, w, l),
        )?;
        let context_values = context.len();
        let be = &self.be;
        let c0 = cfg.block_out_channels[0];
        let temb = be.timestep_embedding(timesteps, c0, cfg.flip_sin_to_cos, cfg.freq_shift)?;
        let mut e = self.time_1.forward(be, &temb, b)?;
        be.activate(&mut e, Activation::Silu)?;
        let mut emb = self.time_2.forward(be, &e, b)?;
        be.activate(&mut emb, Activation::Silu)?;
        let context = be.upload(context)?;
        let c = Ctx {
            be,
            ad: Some(ad),
            context: &context,
            emb: &emb,
            l,
            want_ctx: opts.context_grad,
        };
        let keep = !opts.checkpoint;
        let x0 = Act {
            data: be.upload(sample)?,
            b,
            c: cfg.in_channels,
            h,
            w,
        };
        let mut x = self.conv_in.forward(be, &x0)?;
        let mut skips: Vec<Act<B>> = vec![x.clone_act(be)?];
        // Down: each block's input (kept for recomputation) and state (when not checkpointing).
        let mut down_in = Vec::new();
        let mut down_state = Vec::new();
        let mut down_skips = Vec::new();
        for i in 0..self.down.len() {
            down_in.push(if keep { None } else { Some(x.clone_act(be)?) });
            let (y, s, st) = self.down_forward(&c, i, x, keep)?;
            down_skips.push(s.len());
            skips.extend(s);
            down_state.push(st);
            x = y;
        }
        let mid_in = if keep { None } else { Some(x.clone_act(be)?) };
        let (mut x, mid_state) = self.mid_forward(&c, x, keep)?;
        // Up: each block consumes resnets.len() skips from the back.
        let mut up_in = Vec::new();
        let mut up_state = Vec::new();
        let mut used = skips.len();
        let mut up_skip_range = Vec::new();
        for i in 0..self.up.len() {
            let k = self.up[i].resnets.len();
            let range = used - k..used;
            up_in.push(if keep { None } else { Some(x.clone_act(be)?) });
            let target = up_target(&skips, &range);
            let (y, st) = self.up_forward(&c, i, x, &skips[range.clone()], target, keep)?;
            up_state.push(st);
            up_skip_range.push(range);
            used -= k;
            x = y;
        }
        let hn = self.norm_out.forward(be, &x, true)?;
        let y = self.conv_out.forward(be, &hn)?;
        let out = be.download(&y.data)?;
        let dy = loss_grad(&out)?;
        if dy.len() != out.len() {
            return Err(Error::Internal(format!(
                "the loss gradient has {} values for an output of {}",
                dy.len(),
                out.len()
            )));
        }
        drop(y);

        // Backward.
        let mut d_ctx = None;
        let dy = be.upload(&dy)?;
        let d_hn = self.conv_out.backward(be, &hn, &dy)?;
        let mut g = self.norm_out.backward(be, &x, &d_hn.data, true)?;
        drop((hn, x));
        let mut d_skip: Vec<Option<B::Buf>> = skips.iter().map(|_| None).collect();
        for i in (0..self.up.len()).rev() {
            let range = up_skip_range[i].clone();
            let recomputed;
            let st = match &up_state[i] {
                Some(st) => st,
                None => {
                    let input = up_in[i].take().ok_or_else(lost)?;
                    recomputed = self
                        .up_forward(
                            &c,
                            i,
                            input,
                            &skips[range.clone()],
                            up_target(&skips, &range),
                            true,
                        )?
                        .1;
                    recomputed.as_ref().ok_or_else(lost)?
                }
            };
            let mut ds = Vec::new();
            g = self.up_backward(&c, i, st, &skips[range.clone()], g, &mut ds, &mut d_ctx)?;
            // ds[j] is the gradient of the skip consumed at step j: skips[range.end - 1 - j].
            for (j, d) in ds.into_iter().enumerate() {
                accumulate(be, &mut d_skip[range.end - 1 - j], d)?;
            }
            up_state[i] = None;
        }
        let recomputed;
        let st = match &mid_state {
            Some(st) => st,
            None => {
                let input = mid_in.ok_or_else(lost)?;
                recomputed = self.mid_forward(&c, input, true)?.1;
                recomputed.as_ref().ok_or_else(lost)?
            }
        };
        g = self.mid_backward(&c, st, g, &mut d_ctx)?;
        let mut first_skip = skips.len();
        let mut g = Some(g);
        for i in (0..self.down.len()).rev() {
            let Some(grad) = g.take() else { break };
            first_skip -= down_skips[i];
            let recomputed;
            let st = match &down_state[i] {
                Some(st) => st,
                None => {
                    let input = down_in[i].take().ok_or_else(lost)?;
                    recomputed = self.down_forward(&c, i, input, true)?.2;
                    recomputed.as_ref().ok_or_else(lost)?
                }
            };
            let range = first_skip..first_skip + down_skips[i];
            g = self.down_backward(&c, i, st, grad, &mut d_skip[range], &mut d_ctx)?;
            down_state[i] = None;
        }
        let d_context = match d_ctx {
            Some(d) => Some(be.download(&d)?),
            // No cross-attention reads the context (a UNet without transformers).
            None if opts.context_grad => Some(vec![0.0; context_values]),
            None => None,
        };
        Ok(UnetGrad { out, d_context })
    }

    fn mid_forward(
        &self,
        c: &Ctx<'_, B>,
        x: Act<B>,
        keep: bool,
    ) -> Result<(Act<B>, Option<MidState<B>>)> {
        let be = c.be;
        let (x, r0) = self.mid.0.forward_saved(be, x, Some(c.emb))?;
        let (x, t) = self.mid.1.forward_saved(c, x)?;
        let (x, r1) = self.mid.2.forward_saved(be, x, Some(c.emb))?;
        Ok((x, keep.then_some(MidState { r0, t, r1 })))
    }

    fn mid_backward(
        &self,
        c: &Ctx<'_, B>,
        s: &MidState<B>,
        g: B::Buf,
        d_ctx: &mut Option<B::Buf>,
    ) -> Result<B::Buf> {
        let be = c.be;
        let g = self.mid.2.backward(be, &s.r1, &g)?;
        let g = self.mid.1.backward(c, &s.t, &g, d_ctx)?;
        self.mid.0.backward(be, &s.r0, &g)
    }
}

struct MidState<B: Backend> {
    r0: ResnetSaved<B>,
    t: T2dSaved<B>,
    r1: ResnetSaved<B>,
}

fn lost() -> Error {
    Error::Internal("UNet backward: a block's saved input is missing".into())
}

/// `slot` += `d` (or = when empty).
fn accumulate<B: Backend>(be: &B, slot: &mut Option<B::Buf>, d: B::Buf) -> Result<()> {
    match slot {
        Some(acc) => add(be, acc, &d),
        None => {
            *slot = Some(d);
            Ok(())
        }
    }
}
