//! AdamW with `torch.optim.AdamW`'s semantics (the single-tensor CPU implementation, f32 state):
//! decoupled weight decay `p *= 1 - lr wd`; `m = lerp(m, g, 1 - beta1)`;
//! `v = beta2 v + (1 - beta2) g g`; `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`;
//! plus `torch.nn.utils.clip_grad_norm_` over all parameters and the learning-rate schedules
//! of diffusers' `get_scheduler` (constant, constant with warm-up, cosine with warm-up).

use crate::error::{Error, Result};

/// AdamW's hyperparameters (torch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Refuses values torch would refuse (or that cannot train), naming the field.
    pub fn check(&self) -> Result<()> {
        let bad = |name: &'static str, why: &str| Err(Error::invalid_arg(name, why.to_string()));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", "must be a finite number >= 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", "must be in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", "must be a finite number >= 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", "must be a finite number >= 0");
        }
        Ok(())
    }
}

/// The optimizer's state for a list of parameter tensors.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    step: u32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    /// State for tensors of these lengths, all zero.
    pub fn new(config: AdamWConfig, lens: &[usize]) -> Result<AdamW> {
        config.check()?;
        Ok(AdamW {
            config,
            step: 0,
            m: lens.iter().map(|&n| vec![0.0; n]).collect(),
            v: lens.iter().map(|&n| vec![0.0; n]).collect(),
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// One step at learning rate `lr` (the schedule's value for this step) on `params` with
    /// `grads`, tensor for tensor.
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &[&[f32]], lr: f32) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::Internal(format!(
                "AdamW: {} parameters and {} gradients for a state of {}",
                params.len(),
                grads.len(),
                self.m.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as f64;
        // Python floats (f64), as torch computes the scalars.
        let bias1 = 1.0 - (c.beta1 as f64).powf(t);
        let bias2_sqrt = (1.0 - (c.beta2 as f64).powf(t)).sqrt();
        let step_size = (lr as f64 / bias1) as f32;
        let decay = (1.0 - lr as f64 * c.weight_decay as f64) as f32;
        let w1 = 1.0 - c.beta1;
        let w2 = 1.0 - c.beta2;
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            if p.len() != g.len() || p.len() != m.len() {
                return Err(Error::Internal("AdamW: a tensor changed size".into()));
            }
            for i in 0..p.len() {
                let gi = g[i];
                p[i] *= decay;
                // torch's lerp: start + weight (end - start) for weight < 0.5, else
                // end - (end - start)(1 - weight).
                m[i] = if w1 < 0.5 {
                    m[i] + w1 * (gi - m[i])
                } else {
                    gi - (gi - m[i]) * (1.0 - w1)
                };
                v[i] = v[i] * c.beta2 + w2 * gi * gi;
                let denom = v[i].sqrt() / bias2_sqrt as f32 + c.eps;
                p[i] -= step_size * (m[i] / denom);
            }
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the global L2 norm of all gradients
/// (f32, the norm of the per-tensor norms); when `max_norm` is finite every gradient is scaled
/// by `min(1, max_norm / (norm + 1e-6))`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut Vec<f32>], max_norm: f32) -> f32 {
    let norms: Vec<f32> = grads
        .iter()
        .map(|g| {
            g.iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect();
    let total = norms
        .iter()
        .map(|n| (*n as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32;
    if max_norm.is_finite() {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|x| *x *= coef);
        }
    }
    total
}

/// The learning rate over the steps (diffusers' `get_scheduler` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LrSchedule {
    /// `lr` at every step.
    #[default]
    Constant,
    /// Linear from 0 to `lr` over the warm-up steps, then `lr`.
    ConstantWithWarmup,
    /// Linear warm-up, then a half cosine from `lr` to 0 over the remaining steps.
    Cosine,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based) of `total`, with `warmup` warm-up steps.
    pub fn lr(self, base: f32, step: usize, total: usize, warmup: usize) -> f32 {
        let warm = |s: usize| {
            if s < warmup {
                s as f64 / warmup.max(1) as f64
            } else {
                1.0
            }
        };
        let f = match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup => warm(step),
            LrSchedule::Cosine if step < warmup => warm(step),
            LrSchedule::Cosine => {
                let progress =
                    (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        };
        (base as f64 * f) as f32
    }
}

impl std::str::FromStr for LrSchedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "constant_with_warmup" => Ok(LrSchedule::ConstantWithWarmup),
            "cosine" => Ok(LrSchedule::Cosine),
            other => Err(Error::invalid_arg(
                "lr_schedule",
                format!("'{other}' is not one of constant, constant_with_warmup, cosine"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_diffusers() {
        let c = LrSchedule::Cosine;
        assert_eq!(c.lr(1.0, 0, 10, 2), 0.0);
        assert_eq!(c.lr(1.0, 1, 10, 2), 0.5);
        assert_eq!(c.lr(1.0, 2, 10, 2), 1.0);
        assert!(c.lr(1.0, 9, 10, 2) < 0.05);
        assert_eq!(LrSchedule::ConstantWithWarmup.lr(2.0, 5, 10, 2), 2.0);
        assert_eq!(LrSchedule::Constant.lr(2.0, 0, 10, 2), 2.0);
        assert!("linear".parse::<LrSchedule>().is_err());
    }

    #[test]
    fn bad_hyperparameters_name_the_field() {
        for (c, name) in [
            (
                AdamWConfig {
                    lr: f32::NAN,
                    ..Default::default()
                },
                "'lr'",
            ),
            (
                AdamWConfig {
                    beta1: 1.0,
                    ..Default::default()
                },
                "'beta1'",
            ),
            (
                AdamWConfig {
                    beta2: -0.1,
                    ..Default::default()
                },
                "'beta2'",
            ),
            (
                AdamWConfig {
                    weight_decay: -1.0,
                    ..Default::default()
                },
                "'weight_decay'",
            ),
        ] {
            let e = AdamW::new(c, &[1]).expect_err(name);
            assert!(e.to_string().contains(name), "{e}");
        }
    }
}
