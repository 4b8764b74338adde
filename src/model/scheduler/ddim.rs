//! `DDIMScheduler` with `eta = 0` (deterministic DDIM).

use super::{
    check_len, check_step, np_round, spaced_timesteps, Scheduler, SchedulerConfig, TimestepSpacing,
    TrainSchedule,
};
use crate::error::{Error, Result};

pub(crate) struct Ddim {
    /// Integer timesteps (diffusers' int64), and the same as f32 for the UNet.
    t: Vec<usize>,
    timesteps: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // steps`: diffusers' step back, whatever the spacing.
    stride: usize,
    clip: Option<f32>,
}

impl Ddim {
    pub fn new(
        cfg: &SchedulerConfig,
        table: TrainSchedule,
        spacing: TimestepSpacing,
        steps: usize,
    ) -> Result<Self> {
        let raw = spaced_timesteps(cfg, spacing, steps);
        let n_train = cfg.num_train_timesteps;
        let mut t = Vec::with_capacity(raw.len());
        for x in raw {
            let r = np_round(x);
            if !(r >= 0.0 && r < n_train as f64) {
                return Err(Error::invalid_arg(
                    "steps",
                    format!(
                        "DDIM with {steps} steps, {} spacing and steps_offset {} reaches timestep {r}, \
                         outside the model's 0..{n_train}",
                        spacing.name(),
                        cfg.steps_offset
                    ),
                ));
            }
            t.push(r as usize);
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            table.alphas_cumprod[0]
        };
        Ok(Ddim {
            timesteps: t.iter().map(|&x| x as f32).collect(),
            t,
            alphas_cumprod: table.alphas_cumprod,
            final_alpha_cumprod,
            stride: n_train / steps,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, sample: &[f32], _step: usize) -> Vec<f32> {
        sample.to_vec()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        _noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        check_step(step, self.t.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let t = self.t[step];
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = match t.checked_sub(self.stride) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_prod_t = 1.0f32 - alpha_prod_t;
        let sqrt_beta = beta_prod_t.sqrt();
        let sqrt_alpha = alpha_prod_t.sqrt();
        let sqrt_alpha_prev = alpha_prod_t_prev.sqrt();
        // eta = 0: std_dev_t = 0, so the direction coefficient is sqrt(1 - alpha_prod_t_prev).
        let dir = (1.0f32 - alpha_prod_t_prev - 0.0f32).sqrt();
        let clip = self.clip;
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &eps)| {
                let mut x0 = (x - sqrt_beta * eps) / sqrt_alpha;
                if let Some(r) = clip {
                    x0 = x0.clamp(-r, r);
                }
                sqrt_alpha_prev * x0 + dir * eps
            })
            .collect())
    }
}
