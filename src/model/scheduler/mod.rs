//! Samplers (diffusers "schedulers") for Stable Diffusion 1.x, equal to diffusers 0.42.1 built
//! `from_config` of the model's `scheduler/scheduler_config.json`:
//!
//! | [`SamplerKind`] | diffusers class | options |
//! | --- | --- | --- |
//! | `ddim` | `DDIMScheduler` | `eta = 0` |
//! | `euler` | `EulerDiscreteScheduler` | defaults |
//! | `euler_a` | `EulerAncestralDiscreteScheduler` | defaults |
//! | `dpmpp_2m` | `DPMSolverMultistepScheduler` | defaults: `dpmsolver++`, order 2, midpoint |
//! | `dpmpp_2m_karras` | `DPMSolverMultistepScheduler` | same, `use_karras_sigmas=True` |
//!
//! Arithmetic follows diffusers' dtypes: the training schedule (`betas`, `alphas_cumprod`) and
//! every per-step coefficient in f32 as torch computes them, the numpy parts of
//! `set_timesteps` (`np.linspace`, `np.arange`, `np.interp`, the Karras ramp and `_sigma_to_t`)
//! in f64 before the cast to f32, and the latents in f32. tests/scheduler.rs holds the parity
//! checks against fixtures from tools/make_scheduler_fixtures.py.
//!
//! Timestep spacing: diffusers takes `timestep_spacing` from the config when the key is there
//! and each class's own default when it is not. SD 1.5's original `scheduler_config.json` has no
//! such key, so DDIM spaces "leading" while Euler, Euler ancestral and DPM++ space "linspace";
//! configs saved by newer diffusers (e.g. a `PNDMScheduler` config with `"timestep_spacing":
//! "leading"`) impose it on every sampler. [`SchedulerConfig::timestep_spacing`] is therefore an
//! `Option`.

mod ddim;
mod dpmpp;
mod euler;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The sampler a generation uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2M,
    DpmPp2MKarras,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 5] = [
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2M,
        SamplerKind::DpmPp2MKarras,
    ];

    /// The name used on the command line and in the C API.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::DpmPp2M => "dpmpp_2m",
            SamplerKind::DpmPp2MKarras => "dpmpp_2m_karras",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SamplerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
                Error::invalid_arg(
                    "sampler",
                    format!(
                        "unknown sampler '{s}'; expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, N)`.
    Linear,
    /// `torch.linspace(beta_start**0.5, beta_end**0.5, N) ** 2` (SD 1.x).
    ScaledLinear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn name(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The UNet predicts the noise (every SD 1.x model).
    Epsilon,
}

/// The model's noise schedule, from diffusers' `scheduler_config.json`.
///
/// Keys that describe the saved scheduler's own sampler rather than the model (`skip_prk_steps`,
/// `use_karras_sigmas`, `solver_order`, `algorithm_type`, `final_sigmas_type`, `sigma_min`, ...)
/// are ignored: the sampler is chosen by [`SamplerKind`], with diffusers' defaults for its
/// options. Unknown keys are ignored, as diffusers does.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`: explicit betas (length `num_train_timesteps`) instead of the schedule.
    pub trained_betas: Option<Vec<f32>>,
    pub steps_offset: usize,
    /// `None` when the config has no `timestep_spacing`: each sampler then uses its diffusers
    /// class default ("leading" for DDIM, "linspace" for Euler, Euler ancestral and DPM++).
    pub timestep_spacing: Option<TimestepSpacing>,
    pub prediction_type: PredictionType,
    /// DDIM: the final step goes to alpha_cumprod 1 (`true`) or to `alphas_cumprod[0]`.
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x0 to +-`clip_sample_range`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
}

impl Default for SchedulerConfig {
    /// SD 1.5's `scheduler_config.json` (a `PNDMScheduler` config with no `timestep_spacing`).
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            steps_offset: 1,
            timestep_spacing: None,
            prediction_type: PredictionType::Epsilon,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
        }
    }
}

/// Keys whose non-default values change the model's schedule in ways hdb does not implement.
const REFUSED_IF_SET: [(&str, &str); 3] = [
    ("thresholding", "dynamic thresholding"),
    ("rescale_betas_zero_snr", "zero-terminal-SNR rescaling"),
    ("use_flow_sigmas", "flow-matching sigmas"),
];

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json` (already parsed; `path` names it in errors).
    /// Missing keys take diffusers' defaults (for the DDIM-only keys `set_alpha_to_one` and
    /// `clip_sample`, `DDIMScheduler`'s: both true). `null` counts as missing.
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad_file(path, "expected a JSON object".into()))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let num = |k: &str, default: f64| -> Result<f64> {
            match get(k) {
                None => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| {
                    bad_file(path, format!("key '{k}': expected a number, got {v}"))
                }),
            }
        };
        let uint = |k: &str, default: usize| -> Result<usize> {
            match get(k) {
                None => Ok(default),
                Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    bad_file(
                        path,
                        format!("key '{k}': expected a non-negative integer, got {v}"),
                    )
                }),
            }
        };
        let boolean = |k: &str, default: bool| -> Result<bool> {
            match get(k) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    bad_file(path, format!("key '{k}': expected true or false, got {v}"))
                }),
            }
        };
        let string = |k: &str| -> Result<Option<&str>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.as_str().map(Some).ok_or_else(|| {
                    bad_file(path, format!("key '{k}': expected a string, got {v}"))
                }),
            }
        };

        let num_train_timesteps = uint("num_train_timesteps", 1000)?;
        if num_train_timesteps < 2 {
            return Err(bad_file(
                path,
                format!(
                    "key 'num_train_timesteps': {num_train_timesteps} is too small (at least 2)"
                ),
            ));
        }
        // Tables of this length are allocated below and at every generation: bound it first.
        if num_train_timesteps > crate::limits::MAX_TRAIN_TIMESTEPS {
            return Err(bad_file(
                path,
                format!(
                    "key 'num_train_timesteps': {num_train_timesteps} is above hdb's limit of {} \
                     (SD uses 1000)",
                    crate::limits::MAX_TRAIN_TIMESTEPS
                ),
            ));
        }
        let beta_schedule = match string("beta_schedule")?.unwrap_or("linear") {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            other @ ("squaredcos_cap_v2" | "sigmoid" | "exp") => {
                return Err(unsupported(path, "beta_schedule", other, "\"linear\" or \"scaled_linear\""))
            }
            other => {
                return Err(bad_file(
                    path,
                    format!("key 'beta_schedule': unknown value \"{other}\" (expected \"linear\" or \"scaled_linear\")"),
                ))
            }
        };
        let trained_betas = match get("trained_betas") {
            None => None,
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| {
                    bad_file(
                        path,
                        format!("key 'trained_betas': expected a list of numbers or null, got {v}"),
                    )
                })?;
                let betas = arr
                    .iter()
                    .map(|b| b.as_f64().map(|x| x as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| {
                        bad_file(
                            path,
                            "key 'trained_betas': expected a list of numbers".into(),
                        )
                    })?;
                if betas.len() != num_train_timesteps {
                    return Err(bad_file(
                        path,
                        format!(
                            "key 'trained_betas': {} values for num_train_timesteps {num_train_timesteps}",
                            betas.len()
                        ),
                    ));
                }
                Some(betas)
            }
        };
        let timestep_spacing = match string("timestep_spacing")? {
            None => None,
            Some("leading") => Some(TimestepSpacing::Leading),
            Some("trailing") => Some(TimestepSpacing::Trailing),
            Some("linspace") => Some(TimestepSpacing::Linspace),
            Some(other) => {
                return Err(bad_file(
                    path,
                    format!(
                        "key 'timestep_spacing': unknown value \"{other}\" (expected \"leading\", \"trailing\" or \"linspace\")"
                    ),
                ))
            }
        };
        let prediction_type = match string("prediction_type")?.unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            other @ ("v_prediction" | "sample" | "flow_prediction") => {
                return Err(unsupported(path, "prediction_type", other, "\"epsilon\""))
            }
            other => {
                return Err(bad_file(
                    path,
                    format!(
                        "key 'prediction_type': unknown value \"{other}\" (expected \"epsilon\")"
                    ),
                ))
            }
        };
        for (key, what) in REFUSED_IF_SET {
            if boolean(key, false)? {
                return Err(Error::Unsupported(format!(
                    "{}: scheduler config key '{key}' is true: {what} is not implemented",
                    path.display()
                )));
            }
        }
        if let Some(vt) = string("variance_type")? {
            return Err(unsupported(
                path,
                "variance_type",
                vt,
                "null (a UNet predicting only the noise)",
            ));
        }
        let steps_offset = uint("steps_offset", 0)?;
        if steps_offset >= num_train_timesteps {
            // The first timestep would lie past the noise tables (diffusers fails on it too).
            return Err(bad_file(
                path,
                format!(
                    "key 'steps_offset': {steps_offset} is not below num_train_timesteps \
                     {num_train_timesteps}"
                ),
            ));
        }
        let cfg = SchedulerConfig {
            num_train_timesteps,
            beta_start: num("beta_start", 0.0001)?,
            beta_end: num("beta_end", 0.02)?,
            beta_schedule,
            trained_betas,
            steps_offset,
            timestep_spacing,
            prediction_type,
            set_alpha_to_one: boolean("set_alpha_to_one", true)?,
            clip_sample: boolean("clip_sample", true)?,
            clip_sample_range: num("clip_sample_range", 1.0)?,
        };
        if cfg.trained_betas.is_none()
            && !(cfg.beta_start > 0.0 && cfg.beta_end > 0.0 && cfg.beta_end < 1.0)
        {
            return Err(bad_file(
                path,
                format!(
                    "keys 'beta_start'/'beta_end': {} and {} are not in (0, 1)",
                    cfg.beta_start, cfg.beta_end
                ),
            ));
        }
        Ok(cfg)
    }

    /// The spacing sampler `kind` uses: the config's, else the diffusers class default.
    fn spacing_for(&self, kind: SamplerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SamplerKind::Ddim => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        })
    }
}

fn bad_file(path: &Path, reason: String) -> Error {
    Error::InvalidFile {
        path: path.to_path_buf(),
        format: "scheduler config",
        reason,
    }
}

fn unsupported(path: &Path, key: &str, value: &str, supported: &str) -> Error {
    Error::Unsupported(format!(
        "{}: scheduler config key '{key}' = \"{value}\" is not supported (hdb supports {supported})",
        path.display()
    ))
}

/// A sampler set up for a fixed number of steps. Step `i` runs the UNet at `timesteps()[i]` on
/// `scale_model_input(sample, i)`, then calls `step(eps, i, sample, noise)`; steps run in order.
pub trait Scheduler: Send {
    /// The model timesteps of each step, in order (what the UNet receives, as f32).
    fn timesteps(&self) -> &[f32];
    /// diffusers' init_noise_sigma: the pipeline multiplies the initial unit-variance noise (or
    /// given `latents`) by this.
    fn init_noise_sigma(&self) -> f32;
    /// diffusers' scale_model_input for step i (identity for DDIM and DPM++; / sqrt(sigma^2+1)
    /// for the Euler samplers).
    fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32>;
    /// One step: given the (already guided) model output eps and the current sample, return
    /// the next sample. `noise` supplies unit normals for ancestral samplers (called with the
    /// count needed; Euler ancestral calls it once per step, the last one included, as diffusers
    /// draws noise there too).
    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Result<Vec<f32>>;
    /// The noise levels, `timesteps().len() + 1` of them ending at 0, for the sigma-based
    /// samplers (Euler, Euler ancestral, DPM++); `None` for DDIM.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// Builds sampler `kind` for `steps` steps, like diffusers' `from_config` + `set_timesteps`.
pub fn make(kind: SamplerKind, cfg: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    if steps == 0 {
        return Err(Error::invalid_arg("steps", "must be at least 1"));
    }
    if steps > cfg.num_train_timesteps {
        return Err(Error::invalid_arg(
            "steps",
            format!(
                "{steps} is more than the model's {} training timesteps",
                cfg.num_train_timesteps
            ),
        ));
    }
    let table = TrainSchedule::new(cfg)?;
    let spacing = cfg.spacing_for(kind);
    Ok(match kind {
        SamplerKind::Ddim => Box::new(ddim::Ddim::new(cfg, table, spacing, steps)?),
        SamplerKind::Euler => Box::new(euler::Euler::new(cfg, &table, spacing, steps, false)?),
        SamplerKind::EulerAncestral => {
            Box::new(euler::Euler::new(cfg, &table, spacing, steps, true)?)
        }
        SamplerKind::DpmPp2M => Box::new(dpmpp::DpmPp2M::new(cfg, &table, spacing, steps, false)?),
        SamplerKind::DpmPp2MKarras => {
            Box::new(dpmpp::DpmPp2M::new(cfg, &table, spacing, steps, true)?)
        }
    })
}

/// The training noise schedule, as diffusers' constructors compute it in torch float32.
pub(crate) struct TrainSchedule {
    pub alphas_cumprod: Vec<f32>,
}

impl TrainSchedule {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.clone(),
            (None, BetaSchedule::Linear) => {
                torch_linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n)
            }
            (None, BetaSchedule::ScaledLinear) => {
                // Python's `beta_start**0.5` in f64, cast to f32 by torch.linspace; `** 2` is x*x.
                torch_linspace_f32(
                    cfg.beta_start.powf(0.5) as f32,
                    cfg.beta_end.powf(0.5) as f32,
                    n,
                )
                .into_iter()
                .map(|x| x * x)
                .collect()
            }
        };
        // torch.cumprod on the CPU accumulates float32 in double and stores each prefix as f32.
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        if alphas_cumprod.iter().any(|a| !(*a > 0.0 && *a < 1.0)) {
            return Err(Error::invalid_arg(
                "scheduler config",
                "betas give an alphas_cumprod outside (0, 1)",
            ));
        }
        Ok(TrainSchedule { alphas_cumprod })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, in torch float32, ascending in t.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0f32 - a) / a).sqrt())
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU, bit for bit: a fused
/// multiply-add from `start` for the first half and from `end` for the second.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64, bit for bit.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    if div == 0 {
        return vec![0.0 * (stop - start) + start];
    }
    let step = (stop - start) / div as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` in float64, bit for bit (length `ceil((stop - start) / step)`,
/// values `start + i * ((start + step) - start)` from the third on).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut v = Vec::with_capacity(len);
    v.push(start);
    if len > 1 {
        v.push(start + step);
    }
    let delta = if len > 1 { v[1] - v[0] } else { 0.0 };
    for i in 2..len {
        v.push(start + i as f64 * delta);
    }
    v
}

/// `np.interp(x, np.arange(len(fp)), fp)` in float64.
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize; // xp[j] <= x < xp[j + 1]
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    let r = slope * (x - j as f64) + fp[j];
    if r.is_nan() {
        return slope * (x - (j + 1) as f64) + fp[j + 1];
    }
    r
}

/// numpy's `round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// The timesteps of `steps` steps under `spacing` as DDIM and the Euler samplers compute them,
/// in f64 before each class's own cast ("linspace" is not rounded here: DDIM rounds it, Euler
/// keeps the fractions). diffusers' "trailing" `np.arange` yields `steps + 1` values for some `steps`
/// (61, 103, 121, ... of 1000), the extra one -1; hdb keeps the first `steps`.
pub(crate) fn spaced_timesteps(
    cfg: &SchedulerConfig,
    spacing: TimestepSpacing,
    steps: usize,
) -> Vec<f64> {
    let n_train = cfg.num_train_timesteps;
    let mut t: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, (n_train - 1) as f64, steps);
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|x| np_round(x) - 1.0)
                .collect()
        }
    };
    t.truncate(steps);
    t
}

/// Refuses a tensor whose length differs from the sample's.
pub(crate) fn check_len(what: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid_arg(
            what,
            format!("has {got} values, the sample has {want}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_step(step: usize, steps: usize) -> Result<()> {
    if step >= steps {
        return Err(Error::invalid_arg(
            "step",
            format!("step {step} is past the last of {steps} steps"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn p() -> PathBuf {
        PathBuf::from("scheduler_config.json")
    }

    #[test]
    fn sampler_names_round_trip() {
        for k in SamplerKind::ALL {
            assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
        }
        let e = "dpm++".parse::<SamplerKind>().unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    name: "sampler",
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains("dpm++") && msg.contains("euler_a"), "{msg}");
    }

    #[test]
    fn zero_and_too_many_steps_are_refused() {
        let cfg = SchedulerConfig::default();
        for k in SamplerKind::ALL {
            let e = make(k, &cfg, 0).err().unwrap();
            assert!(
                matches!(e, Error::InvalidArgument { name: "steps", .. }),
                "{e}"
            );
            let e = make(k, &cfg, 1001).err().unwrap();
            assert!(
                matches!(e, Error::InvalidArgument { name: "steps", .. }),
                "{e}"
            );
        }
    }

    #[test]
    fn sd15_json_equals_default() {
        let v = serde_json::json!({
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "trained_betas": null, "clip_sample": false
        });
        assert_eq!(
            SchedulerConfig::from_json(&v, &p()).unwrap(),
            SchedulerConfig::default()
        );
    }

    #[test]
    fn v_prediction_and_unknown_values_name_the_key() {
        let base = serde_json::json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012});
        let with = |k: &str, v: serde_json::Value| {
            let mut j = base.clone();
            j[k] = v;
            SchedulerConfig::from_json(&j, &p()).unwrap_err()
        };
        let e = with("prediction_type", "v_prediction".into());
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(
            e.to_string().contains("prediction_type") && e.to_string().contains("v_prediction"),
            "{e}"
        );
        let e = with("timestep_spacing", "middle".into());
        assert!(
            matches!(e, Error::InvalidFile { .. }) && e.to_string().contains("timestep_spacing"),
            "{e}"
        );
        let e = with("beta_schedule", "squaredcos_cap_v2".into());
        assert!(
            matches!(e, Error::Unsupported(_)) && e.to_string().contains("beta_schedule"),
            "{e}"
        );
        let e = with("beta_schedule", "quadratic".into());
        assert!(e.to_string().contains("beta_schedule"), "{e}");
        let e = with("steps_offset", "1".into());
        assert!(e.to_string().contains("steps_offset"), "{e}");
        let e = with("rescale_betas_zero_snr", true.into());
        assert!(
            matches!(e, Error::Unsupported(_)) && e.to_string().contains("rescale_betas_zero_snr"),
            "{e}"
        );
        let e = with("trained_betas", serde_json::json!([0.1, 0.2]));
        assert!(e.to_string().contains("trained_betas"), "{e}");
        let e = SchedulerConfig::from_json(&serde_json::json!([1]), &p()).unwrap_err();
        assert!(matches!(e, Error::InvalidFile { .. }), "{e}");
    }

    #[test]
    fn spacing_defaults_follow_the_diffusers_class() {
        let cfg = SchedulerConfig::default();
        assert_eq!(cfg.spacing_for(SamplerKind::Ddim), TimestepSpacing::Leading);
        assert_eq!(
            cfg.spacing_for(SamplerKind::Euler),
            TimestepSpacing::Linspace
        );
        assert_eq!(
            cfg.spacing_for(SamplerKind::DpmPp2MKarras),
            TimestepSpacing::Linspace
        );
        let lead = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Leading),
            ..cfg
        };
        assert_eq!(
            lead.spacing_for(SamplerKind::EulerAncestral),
            TimestepSpacing::Leading
        );
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        // np.arange(1000, 0, -1000/61) has 62 values; the 62nd rounds to 0.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
        let cfg = SchedulerConfig::default();
        let t = spaced_timesteps(&cfg, TimestepSpacing::Trailing, 61);
        assert_eq!(t.len(), 61);
        assert_eq!(t[0], 999.0);
        assert_eq!(np_interp(2.5, &[0.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(np_interp(-1.0, &[5.0, 1.0]), 5.0);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(torch_linspace_f32(1.0, 2.0, 1), vec![1.0]);
    }

    #[test]
    fn out_of_order_dpm_steps_are_refused() {
        let cfg = SchedulerConfig::default();
        let mut s = make(SamplerKind::DpmPp2M, &cfg, 4).unwrap();
        let x = vec![0.5f32; 8];
        let mut no_noise = |_n: usize| -> Vec<f32> { panic!("DPM++ 2M draws no noise") };
        s.step(&x, 0, &x, &mut no_noise).unwrap();
        let e = s.step(&x, 2, &x, &mut no_noise).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { name: "step", .. }),
            "{e}"
        );
        let e = s.step(&x[..4], 1, &x, &mut no_noise).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    }
}
