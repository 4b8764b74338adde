//! `EulerDiscreteScheduler` (defaults: no churn, linear sigma interpolation, final sigma 0) and
//! `EulerAncestralDiscreteScheduler`.

use super::{
    check_len, check_step, np_interp, spaced_timesteps, Scheduler, SchedulerConfig,
    TimestepSpacing, TrainSchedule,
};
use crate::error::{Error, Result};

pub(crate) struct Euler {
    timesteps: Vec<f32>,
    /// `steps + 1` values, the last 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    ancestral: bool,
}

impl Euler {
    pub fn new(
        cfg: &SchedulerConfig,
        table: &TrainSchedule,
        spacing: TimestepSpacing,
        steps: usize,
        ancestral: bool,
    ) -> Result<Self> {
        // Both classes: timesteps in f64 (numpy), cast to f32; "trailing" subtracts 1 after the
        // cast, which is exact for these integers.
        let timesteps: Vec<f32> = spaced_timesteps(cfg, spacing, steps)
            .into_iter()
            .map(|t| t as f32)
            .collect();
        // np.interp(timesteps, arange(N), sigmas) in f64 on the f32 table, then `astype(f32)`.
        let table_sigmas: Vec<f64> = table.sigmas().into_iter().map(f64::from).collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| np_interp(t as f64, &table_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        // `self.sigmas.max()`, then for "leading" `(max**2 + 1) ** 0.5`, in torch f32.
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0f32).sqrt(),
        };
        if sigmas.iter().any(|s| !s.is_finite()) {
            return Err(Error::Internal("Euler sigmas are not finite".into()));
        }
        Ok(Euler {
            timesteps,
            sigmas,
            init_noise_sigma,
            ancestral,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32> {
        debug_assert!(step < self.timesteps.len(), "step {step} out of range");
        let sigma = self.sigmas[step.min(self.timesteps.len() - 1)];
        let d = (sigma * sigma + 1.0f32).sqrt();
        sample.iter().map(|&x| x / d).collect()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        check_step(step, self.timesteps.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let sigma = self.sigmas[step];
        let sigma_next = self.sigmas[step + 1];
        if !self.ancestral {
            // s_churn = 0: gamma = 0 and sigma_hat = sigma * (0 + 1) = sigma.
            let sigma_hat = sigma;
            let dt = sigma_next - sigma_hat;
            return Ok(sample
                .iter()
                .zip(model_output)
                .map(|(&x, &eps)| {
                    let pred_original = x - sigma_hat * eps;
                    let derivative = (x - pred_original) / sigma_hat;
                    x + derivative * dt
                })
                .collect());
        }
        let (from, to) = (sigma, sigma_next);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let z = noise(sample.len());
        check_len("noise", z.len(), sample.len())?;
        Ok(sample
            .iter()
            .zip(model_output)
            .zip(&z)
            .map(|((&x, &eps), &n)| {
                let pred_original = x - sigma * eps;
                let derivative = (x - pred_original) / sigma;
                let prev = x + derivative * dt;
                prev + n * sigma_up
            })
            .collect())
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}
