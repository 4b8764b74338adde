//! `DPMSolverMultistepScheduler` with its defaults: `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`, `lower_order_final=True`,
//! `euler_at_final=False`, `final_sigmas_type="zero"`, `lambda_min_clipped=-inf`; optionally
//! `use_karras_sigmas=True`.
//!
//! With `final_sigmas_type="zero"` the last step is always first order (it lands on sigma 0,
//! i.e. returns the data prediction); the first step is first order too (no history yet), and
//! every step between is the second-order multistep update.

use super::{
    check_len, check_step, np_arange, np_interp, np_linspace, np_round, Scheduler, SchedulerConfig,
    TimestepSpacing, TrainSchedule,
};
use crate::error::{Error, Result};

const RHO: f64 = 7.0;

pub(crate) struct DpmPp2M {
    timesteps: Vec<f32>,
    /// `steps + 1` values, the last 0.
    sigmas: Vec<f32>,
    /// The previous step's data prediction (diffusers' `model_outputs[-2]` after the shift).
    prev_x0: Option<Vec<f32>>,
    /// diffusers' `lower_order_nums`, capped at the solver order (2).
    lower_order_nums: usize,
    next_step: usize,
}

impl DpmPp2M {
    pub fn new(
        cfg: &SchedulerConfig,
        table: &TrainSchedule,
        spacing: TimestepSpacing,
        steps: usize,
        karras: bool,
    ) -> Result<Self> {
        let n_train = cfg.num_train_timesteps;
        // lambda_min_clipped = -inf clips nothing: last_timestep = num_train_timesteps.
        let last = n_train;
        let mut t: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, (last - 1) as f64, steps + 1)
                    .into_iter()
                    .map(np_round)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                np_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|x| np_round(x) - 1.0)
                    .collect()
            }
        };
        // diffusers' "trailing" arange can yield one value too many (-1); keep `steps`.
        t.truncate(steps);

        let table_sigmas = table.sigmas();
        let mut sigmas: Vec<f64> = if karras {
            // numpy float32 log of the f32 table (for _sigma_to_t); the Karras ramp in f64.
            let log_sigmas: Vec<f32> = table_sigmas.iter().map(|&s| s.ln()).collect();
            let sigma_min = table_sigmas[0] as f64;
            let sigma_max = table_sigmas[n_train - 1] as f64;
            let min_inv_rho = sigma_min.powf(1.0 / RHO);
            let max_inv_rho = sigma_max.powf(1.0 / RHO);
            let s: Vec<f64> = np_linspace(0.0, 1.0, steps)
                .into_iter()
                .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(RHO))
                .collect();
            // scaled_linear/linear schedules round the fractional timesteps (diffusers rounds
            // for every schedule but squaredcos_cap_v2, which hdb does not support).
            t = s
                .iter()
                .map(|&sg| np_round(sigma_to_t(sg, &log_sigmas)))
                .collect();
            s
        } else {
            let fp: Vec<f64> = table_sigmas.iter().map(|&s| s as f64).collect();
            t.iter().map(|&x| np_interp(x, &fp)).collect()
        };
        sigmas.push(0.0);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        if t.iter().any(|x| !x.is_finite()) || sigmas.iter().any(|s| !s.is_finite()) {
            return Err(Error::Internal(
                "DPM++ timesteps or sigmas are not finite".into(),
            ));
        }
        // diffusers stores int64 timesteps; the UNet gets them as f32.
        let timesteps = t.iter().map(|&x| (x as i64) as f32).collect();
        Ok(DpmPp2M {
            timesteps,
            sigmas,
            prev_x0: None,
            lower_order_nums: 0,
            next_step: 0,
        })
    }
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log-sigma interpolates `sigma`'s,
/// with numpy's promotions (`low - high` in f32, the rest in f64).
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // argmax(cumsum(dists >= 0)): the last index with log_sigmas[j] <= log_sigma, else 0.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - ls as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / ((low - high) as f64)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `_sigma_to_alpha_sigma_t` in torch f32: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0f32 / (sigma * sigma + 1.0f32).sqrt();
    (alpha, sigma * alpha)
}

/// lambda = log(alpha) - log(sigma) (+inf at sigma 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Scheduler for DpmPp2M {
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
        let n = self.timesteps.len();
        check_step(step, n)?;
        if step != self.next_step {
            return Err(Error::invalid_arg(
                "step",
                format!(
                    "DPM++ steps run in order: expected step {}, got {step}",
                    self.next_step
                ),
            ));
        }
        check_len("model_output", model_output.len(), sample.len())?;
        if let Some(p) = &self.prev_x0 {
            check_len("sample", sample.len(), p.len())?;
        }
        // convert_model_output: the data prediction x0 = (x - sigma_t * eps) / alpha_t.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let x0: Vec<f32> = sample
            .iter()
            .zip(model_output)
            .map(|(&x, &eps)| (x - sigma_s0 * eps) / alpha_s0)
            .collect();

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = alpha_t * ((-h).exp() - 1.0f32);
        // euler_at_final=False, lower_order_final=True, final_sigmas_type="zero": the last
        // step is first order whatever the step count.
        let lower_order_final = step == n - 1;
        let out: Vec<f32> = match &self.prev_x0 {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                let inv_r0 = 1.0f32 / r0;
                let c_d1 = 0.5f32 * (alpha_t * ((-h).exp() - 1.0f32));
                sample
                    .iter()
                    .zip(&x0)
                    .zip(m1)
                    .map(|((&x, &m0), &m1)| {
                        let d1 = inv_r0 * (m0 - m1);
                        c_sample * x - c_d0 * m0 - c_d1 * d1
                    })
                    .collect()
            }
            _ => sample
                .iter()
                .zip(&x0)
                .map(|(&x, &m0)| c_sample * x - c_d0 * m0)
                .collect(),
        };
        self.prev_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        self.next_step = step + 1;
        Ok(out)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}
