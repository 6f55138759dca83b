//! Shared pieces of the schedulers: config enums, config parsing and validation, the training
//! noise schedules (`alphas_cumprod`, sigmas) and what the schedulers read from them, and the
//! numerics of the torch / numpy calls diffusers makes, reproduced operation by operation.
//!
//! Conventions (they are what makes the results match diffusers to the last bit or two):
//! * torch float32 tensor arithmetic is done in `f32`, in the same order as the Python source;
//!   `x ** 0.5` is `sqrt`, `x ** 2` is `x * x`, a Python float scalar is rounded to `f32` first.
//! * numpy float64 arithmetic (timesteps, interpolated sigmas, Karras sigmas) is done in `f64`
//!   and rounded to `f32` where diffusers casts.
//! * torch's own float32 `sqrt`/`log`/`exp` on CPU go through MKL and may differ from the
//!   correctly rounded result by one ulp; that is the one difference that remains.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::latent::{Inputs, Latent, LatentMath};
use crate::ops::Expr;
use crate::{Error, Result};

/// diffusers' `beta_schedule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// DDPM only.
    #[serde(rename = "sigmoid")]
    Sigmoid,
    /// DDPM only.
    #[serde(rename = "laplace")]
    Laplace,
    /// Heun only.
    #[serde(rename = "exp")]
    Exp,
}

/// diffusers' `prediction_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
    #[serde(rename = "sample", alias = "original_sample")]
    Sample,
    /// Flow-matching models; no scheduler here supports it (rejected with a clear error).
    #[serde(rename = "flow_prediction")]
    FlowPrediction,
}

/// diffusers' `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "trailing")]
    Trailing,
    #[serde(rename = "linspace")]
    Linspace,
}

/// diffusers' `final_sigmas_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum FinalSigmasType {
    #[serde(rename = "zero")]
    Zero,
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// The beta-related keys every scheduler config has.
#[derive(Clone, Debug)]
pub(crate) struct BetaConfig<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

/// The [`BetaConfig`] of a scheduler config struct. Every diffusers scheduler names these keys
/// alike, so one expansion serves all the config structs; the configs of classes without
/// `rescale_betas_zero_snr` give its value as the second argument.
macro_rules! beta_config {
    ($config:expr) => {
        beta_config!($config, $config.rescale_betas_zero_snr)
    };
    ($config:expr, $rescale_betas_zero_snr:expr) => {
        $crate::schedulers::common::BetaConfig {
            num_train_timesteps: $config.num_train_timesteps,
            beta_start: $config.beta_start,
            beta_end: $config.beta_end,
            beta_schedule: $config.beta_schedule,
            trained_betas: $config.trained_betas.as_deref(),
            rescale_betas_zero_snr: $rescale_betas_zero_snr,
        }
    };
}
pub(crate) use beta_config;

/// Parses a diffusers scheduler config the way `SchedulerClass.from_config(config, **overrides)`
/// does: keys the target does not know are ignored, its defaults fill the rest. `null` values
/// count as absent, as do keys listed in `_use_default_values` and private `_` keys.
pub(crate) fn parse_config<T: DeserializeOwned>(class: &str, json: &Value, overrides: &[(&str, Value)]) -> Result<T> {
    let obj = match json {
        Value::Object(m) => m,
        Value::Null => &Map::new(),
        _ => return Err(Error::Model(format!("{class}: the scheduler config must be a JSON object"))),
    };
    let defaulted: Vec<String> = match obj.get("_use_default_values") {
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    let mut clean = Map::new();
    for (k, v) in obj {
        if k.starts_with('_') || v.is_null() || defaulted.iter().any(|d| d == k) {
            continue;
        }
        clean.insert(k.clone(), v.clone());
    }
    for (k, v) in overrides {
        clean.insert((*k).to_string(), v.clone());
    }
    serde_json::from_value(Value::Object(clean))
        .map_err(|e| Error::Model(format!("{class}: bad scheduler config: {e}")))
}

/// `sigma_min` / `sigma_max` as diffusers' `_convert_to_karras` sees them: `hasattr(self.config,
/// ...)` also finds keys of the original config that the target class does not take.
pub(crate) fn config_sigma_bounds(json: &Value) -> (Option<f64>, Option<f64>) {
    let get = |k: &str| json.get(k).and_then(Value::as_f64);
    (get("sigma_min"), get("sigma_max"))
}

/// A sanity bound on `num_train_timesteps` (diffusion models use 1000).
const MAX_TRAIN_TIMESTEPS: usize = 10_000;

/// `steps_offset` must keep timesteps near the training range.
pub(crate) fn check_offset(class: &str, steps_offset: i64, num_train_timesteps: usize) -> Result<()> {
    if steps_offset.unsigned_abs() > num_train_timesteps as u64 {
        return Err(Error::Model(format!(
            "{class}: steps_offset {steps_offset} is outside the {num_train_timesteps} training timesteps"
        )));
    }
    Ok(())
}

pub(crate) fn check_steps(class: &str, n: usize, num_train_timesteps: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Input(format!("{class}: the number of inference steps must be at least 1")));
    }
    if n > num_train_timesteps {
        return Err(Error::Input(format!(
            "{class}: {n} inference steps is more than the {num_train_timesteps} timesteps the model was trained with"
        )));
    }
    Ok(())
}

fn check_len(class: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!("{class}: {what} has {got} values, the sample has {want}")));
    }
    Ok(())
}

fn not_set(class: &str) -> Error {
    Error::Input(format!("{class}: call set_timesteps before step"))
}

pub(crate) fn bad_index(class: &str, index: usize, len: usize) -> Error {
    Error::Input(format!("{class}: step index {index} is out of range for {len} timesteps"))
}

pub(crate) fn reject_thresholding(class: &str, thresholding: bool) -> Result<()> {
    if thresholding {
        return Err(Error::Input(format!(
            "{class}: thresholding (dynamic thresholding) is not supported; set \"thresholding\": false"
        )));
    }
    Ok(())
}

/// No scheduler here implements flow matching.
pub(crate) fn reject_flow_prediction(class: &str, prediction_type: PredictionType) -> Result<()> {
    if prediction_type == PredictionType::FlowPrediction {
        return Err(Error::Model(format!("{class}: prediction_type flow_prediction is not supported")));
    }
    Ok(())
}

/// PNDM and Euler ancestral implement only these two in diffusers.
pub(crate) fn require_epsilon_or_v(class: &str, prediction_type: PredictionType) -> Result<()> {
    if !matches!(prediction_type, PredictionType::Epsilon | PredictionType::VPrediction) {
        return Err(Error::Model(format!(
            "{class}: prediction_type {prediction_type:?} is not supported (epsilon or v_prediction)"
        )));
    }
    Ok(())
}

/// Beta sigmas need scipy's beta distribution.
pub(crate) fn reject_beta_sigmas(class: &str, use_beta_sigmas: bool) -> Result<()> {
    if use_beta_sigmas {
        return Err(Error::Model(format!("{class}: use_beta_sigmas is not supported")));
    }
    Ok(())
}

/// diffusers allows at most one of `use_karras_sigmas`, `use_exponential_sigmas`,
/// `use_beta_sigmas`.
pub(crate) fn check_sigma_flags(class: &str, karras: bool, exponential: bool, beta: bool) -> Result<()> {
    if [karras, exponential, beta].iter().filter(|b| **b).count() > 1 {
        return Err(Error::Model(format!(
            "{class}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
        )));
    }
    Ok(())
}

/// The multistep solvers implement orders 1 to 3.
pub(crate) fn check_solver_order(class: &str, solver_order: usize) -> Result<()> {
    if !(1..=3).contains(&solver_order) {
        return Err(Error::Model(format!("{class}: solver_order must be 1, 2 or 3, got {solver_order}")));
    }
    Ok(())
}

/// The multistep solvers' flow-matching and beta sigma schedules are not implemented.
pub(crate) fn reject_unsupported_sigmas(
    class: &str,
    use_beta_sigmas: bool,
    use_flow_sigmas: bool,
    use_dynamic_shifting: bool,
) -> Result<()> {
    if use_beta_sigmas || use_flow_sigmas || use_dynamic_shifting {
        return Err(Error::Model(format!(
            "{class}: use_beta_sigmas, use_flow_sigmas and use_dynamic_shifting are not supported"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// noise schedules

/// diffusers' `__init__`: the betas of the config and `alphas_cumprod = cumprod(1 - betas)`.
fn make_alphas_cumprod(class: &str, betas: &BetaConfig, allowed_extra: &[BetaSchedule]) -> Result<Vec<f32>> {
    Ok(alphas_cumprod(&make_betas(class, betas, allowed_extra)?))
}

/// The schedule of the alpha-based schedulers (DDIM, DDPM, PNDM, LCM): `alphas_cumprod`, indexed
/// by the integer `timesteps` of the last `set_timesteps`.
#[derive(Clone, Debug)]
pub(crate) struct AlphaSchedule {
    class: &'static str,
    pub alphas_cumprod: Vec<f32>,
    /// 0 until `set_timesteps`.
    pub num_inference_steps: usize,
    pub timesteps: Vec<i64>,
    /// `timesteps` as the model is called with them.
    timesteps_f32: Vec<f32>,
}

impl AlphaSchedule {
    pub fn new(class: &'static str, betas: &BetaConfig, allowed_extra: &[BetaSchedule]) -> Result<Self> {
        Ok(AlphaSchedule {
            class,
            alphas_cumprod: make_alphas_cumprod(class, betas, allowed_extra)?,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
        })
    }

    /// `final_alpha_cumprod`, the "previous" alpha of the last step.
    pub fn final_alpha_cumprod(&self, set_alpha_to_one: bool) -> f32 {
        if set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    pub fn set_timesteps(&mut self, num_inference_steps: usize, timesteps: Vec<i64>) {
        self.timesteps_f32 = timesteps.iter().map(|&t| t as f32).collect();
        self.timesteps = timesteps;
        self.num_inference_steps = num_inference_steps;
    }

    /// DDIM's and DDPM's `set_timesteps`: `n` of the training timesteps by `timestep_spacing`.
    pub fn set_spaced_timesteps(&mut self, n: usize, spacing: TimestepSpacing, steps_offset: i64) -> Result<()> {
        let total = self.alphas_cumprod.len();
        check_steps(self.class, n, total)?;
        self.set_timesteps(n, ddpm_style_timesteps(spacing, total, n, steps_offset));
        Ok(())
    }

    pub fn timesteps_f32(&self) -> &[f32] {
        &self.timesteps_f32
    }

    /// `timesteps[index]` for `step(model_output, index, sample)`, or why that step cannot be
    /// taken.
    pub fn step_timestep(&self, index: usize, model_output: &Latent, sample: &Latent) -> Result<i64> {
        if self.num_inference_steps == 0 {
            return Err(not_set(self.class));
        }
        check_len(self.class, "model_output", model_output.len(), sample.len())?;
        self.timesteps.get(index).copied().ok_or_else(|| bad_index(self.class, index, self.timesteps.len()))
    }

    /// `alphas_cumprod[t]`, a negative `t` counting from the end as in Python (trailing spacing
    /// can end at `t = -1`).
    pub fn alpha_prod(&self, t: i64) -> Result<f32> {
        py_index(self.alphas_cumprod.len(), t)
            .map(|i| self.alphas_cumprod[i])
            .ok_or_else(|| Error::Input(format!("{}: timestep {t} is outside the training schedule", self.class)))
    }

    /// `alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod`.
    pub fn alpha_prod_prev(&self, prev_t: i64, final_alpha_cumprod: f32) -> Result<f32> {
        if prev_t >= 0 {
            self.alpha_prod(prev_t)
        } else {
            Ok(final_alpha_cumprod)
        }
    }

    /// `add_noise` at `timesteps[index]`: `sqrt(alpha_prod) * original + sqrt(1 - alpha_prod) * noise`.
    pub fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        let Some(&t) = self.timesteps.get(index).or(self.timesteps.last()) else { return Ok(original.clone()) };
        let Some(i) = py_index(self.alphas_cumprod.len(), t) else { return Ok(original.clone()) };
        let a = self.alphas_cumprod[i];
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let mut ins = Inputs::new();
        let (x, n) = (ins.add(original), ins.add(noise));
        m.eval(&(sa * x + sb * n), &ins)
    }
}

/// `use_karras_sigmas` / `use_exponential_sigmas`: diffusers' `_convert_to_karras` /
/// `_convert_to_exponential` of a sigma range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SigmaConversion {
    Karras,
    Exponential,
}

impl SigmaConversion {
    pub fn from_flags(use_karras_sigmas: bool, use_exponential_sigmas: bool) -> Option<Self> {
        if use_karras_sigmas {
            Some(SigmaConversion::Karras)
        } else if use_exponential_sigmas {
            Some(SigmaConversion::Exponential)
        } else {
            None
        }
    }
}

/// The schedule of the sigma-based schedulers (Euler, Euler ancestral, Heun, LMS, DPM-Solver,
/// UniPC): the training sigmas they interpolate, and the `sigmas` / `timesteps` of the last
/// `set_timesteps`.
#[derive(Clone, Debug)]
pub(crate) struct SigmaSchedule {
    class: &'static str,
    pub alphas_cumprod: Vec<f32>,
    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in training order (diffusers keeps them
    /// flipped).
    pub train_sigmas: Vec<f32>,
    /// `np.log(train_sigmas)`.
    pub log_sigmas: Vec<f32>,
    /// One per model call, then the final sigma.
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
}

impl SigmaSchedule {
    pub fn new(class: &'static str, betas: &BetaConfig, allowed_extra: &[BetaSchedule]) -> Result<Self> {
        let mut alphas_cumprod = make_alphas_cumprod(class, betas, allowed_extra)?;
        if betas.rescale_betas_zero_snr {
            // A zero terminal alpha would make the first sigma infinite; diffusers sets 2**-24.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas = train_sigmas(&alphas_cumprod);
        let log_sigmas = log_f32(&train_sigmas);
        Ok(SigmaSchedule { class, alphas_cumprod, train_sigmas, log_sigmas, sigmas: Vec::new(), timesteps: Vec::new() })
    }

    /// With the sigmas diffusers' `__init__` sets (the training sigmas flipped, then 0), which
    /// `init_noise_sigma` reads before `set_timesteps`.
    pub fn with_training_sigmas(mut self) -> Self {
        self.sigmas = self.train_sigmas.iter().rev().copied().collect();
        self.sigmas.push(0.0);
        self
    }

    /// `final_sigmas_type`: 0, or `((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5`.
    pub fn final_sigma(&self, final_sigmas_type: FinalSigmasType) -> f64 {
        match final_sigmas_type {
            FinalSigmasType::SigmaMin => {
                let a0 = self.alphas_cumprod[0];
                ((1.0 - a0) / a0).sqrt() as f64
            }
            FinalSigmasType::Zero => 0.0,
        }
    }

    /// `np.interp(timesteps, np.arange(num_train_timesteps), train_sigmas)`.
    pub fn interp(&self, timesteps: &[f64]) -> Vec<f64> {
        timesteps.iter().map(|&t| np_interp_arange(t, &self.train_sigmas)).collect()
    }

    /// The training sigma range, unless `sigma_min` / `sigma_max` are given.
    pub fn sigma_range(&self, (sigma_min, sigma_max): (Option<f64>, Option<f64>)) -> (f64, f64) {
        (
            sigma_min.unwrap_or(*self.train_sigmas.first().unwrap_or(&0.0) as f64),
            sigma_max.unwrap_or(*self.train_sigmas.last().unwrap_or(&0.0) as f64),
        )
    }

    /// `n` sigmas of `conversion` from `sigma_max` down to `sigma_min`, and the timesteps
    /// `_sigma_to_t` maps them back to.
    pub fn convert(
        &self,
        conversion: SigmaConversion,
        sigma_min: f64,
        sigma_max: f64,
        n: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let sigmas = match conversion {
            SigmaConversion::Karras => karras_sigmas(sigma_min, sigma_max, n),
            SigmaConversion::Exponential => exponential_sigmas(sigma_min, sigma_max, n),
        };
        let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &self.log_sigmas)).collect();
        (sigmas, timesteps)
    }

    /// The float64 sigmas and timesteps of the k-diffusion schedulers' (Euler, Heun, LMS)
    /// `set_timesteps`, before the final sigma: the training sigmas interpolated at the spaced
    /// float32 timesteps or, with a `conversion`, its sigmas between `sigma_min` / `sigma_max`
    /// (the interpolated ends where not given).
    pub fn k_sigmas(
        &self,
        spacing: TimestepSpacing,
        n: usize,
        steps_offset: i64,
        conversion: Option<SigmaConversion>,
        (sigma_min, sigma_max): (Option<f64>, Option<f64>),
    ) -> (Vec<f64>, Vec<f64>) {
        let timesteps: Vec<f64> = spaced_timesteps(spacing, self.train_sigmas.len(), n, steps_offset, false)
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        let sigmas = self.interp(&timesteps);
        let Some(conversion) = conversion else { return (sigmas, timesteps) };
        let sigma_min = sigma_min.unwrap_or(*sigmas.last().unwrap_or(&0.0));
        let sigma_max = sigma_max.unwrap_or(*sigmas.first().unwrap_or(&0.0));
        self.convert(conversion, sigma_min, sigma_max, n)
    }

    /// `sigmas` as [`super::Scheduler::sigmas`] reports them: none before `set_timesteps`.
    pub fn sigmas_if_set(&self) -> &[f32] {
        if self.timesteps.is_empty() {
            &[]
        } else {
            &self.sigmas
        }
    }

    /// `init_noise_sigma` of the k-diffusion schedulers.
    pub fn init_noise_sigma(&self, spacing: TimestepSpacing) -> f32 {
        let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let max = if max.is_finite() { max } else { 1.0 };
        match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    /// `sigmas[index]`, an index past the end meaning the last step.
    fn sigma_at(&self, index: usize) -> Option<f32> {
        self.sigmas.get(index.min(self.timesteps.len().saturating_sub(1))).copied()
    }

    /// The sigma `add_noise` noises to: none before `set_timesteps`.
    fn noise_sigma(&self, index: usize) -> Option<f32> {
        if self.timesteps.is_empty() {
            None
        } else {
            self.sigma_at(index)
        }
    }

    /// k-diffusion `scale_model_input`: `sample / (sigma ** 2 + 1) ** 0.5`.
    pub fn scale_model_input(&self, m: LatentMath, sample: &Latent, index: usize) -> Result<Latent> {
        let Some(sigma) = self.sigma_at(index) else { return Ok(sample.clone()) };
        let d = (sigma * sigma + 1.0).sqrt();
        let mut ins = Inputs::new();
        let x = ins.add(sample);
        m.eval(&(x / d), &ins)
    }

    /// k-diffusion `add_noise`: `original + noise * sigma`.
    pub fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        let Some(sigma) = self.noise_sigma(index) else { return Ok(original.clone()) };
        let mut ins = Inputs::new();
        let (x, n) = (ins.add(original), ins.add(noise));
        m.eval(&(x + n * sigma), &ins)
    }

    /// The multistep solvers' `add_noise`: `alpha_t * original + sigma_t * noise`.
    pub fn add_noise_alpha_sigma(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        let Some(sigma) = self.noise_sigma(index) else { return Ok(original.clone()) };
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let mut ins = Inputs::new();
        let (x, z) = (ins.add(original), ins.add(noise));
        m.eval(&(alpha_t * x + sigma_t * z), &ins)
    }

    /// Why `step(model_output, index, sample)` cannot be taken, if it cannot.
    pub fn check_step(&self, index: usize, model_output: &Latent, sample: &Latent) -> Result<()> {
        let len = self.timesteps.len();
        if len == 0 {
            return Err(not_set(self.class));
        }
        check_len(self.class, "model_output", model_output.len(), sample.len())?;
        if index >= len {
            return Err(bad_index(self.class, index, len));
        }
        Ok(())
    }
}

/// The multistep solvers' (DPM-Solver, UniPC) `model_outputs`, oldest first, and
/// `lower_order_nums`.
#[derive(Clone, Debug)]
pub(crate) struct ModelOutputs {
    outputs: Vec<Option<Latent>>,
    pub lower_order_nums: usize,
}

impl ModelOutputs {
    pub fn new(solver_order: usize) -> Self {
        ModelOutputs { outputs: vec![None; solver_order], lower_order_nums: 0 }
    }

    /// `model_outputs[-1 - back]`.
    pub fn get(&self, back: usize) -> Option<&Latent> {
        let k = self.outputs.len();
        self.outputs.get(k.checked_sub(back + 1)?)?.as_ref()
    }

    pub fn size_differs(&self, n: usize) -> bool {
        self.outputs.iter().flatten().any(|m| m.len() != n)
    }

    /// `model_outputs[:-1] = model_outputs[1:]; model_outputs[-1] = model_output`.
    pub fn push(&mut self, model_output: Latent) {
        self.outputs.rotate_left(1);
        if let Some(last) = self.outputs.last_mut() {
            *last = Some(model_output);
        }
    }

    /// `if lower_order_nums < solver_order: lower_order_nums += 1`, at the end of a step.
    pub fn count_step(&mut self) {
        if self.lower_order_nums < self.outputs.len() {
            self.lower_order_nums += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// model outputs

fn flow_prediction_unsupported() -> Error {
    Error::Model("prediction_type flow_prediction is not supported".into())
}

/// `pred_original_sample` of the alpha-based schedulers at `alpha_prod_t`, over the sample `x`
/// and the model output `e`.
pub(crate) fn alpha_pred_original_sample(prediction_type: PredictionType, alpha_prod_t: f32, x: &Expr, e: &Expr) -> Result<Expr> {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    Ok(match prediction_type {
        PredictionType::Epsilon => (x - &(sb * e.clone())) / sa,
        PredictionType::Sample => e.clone(),
        PredictionType::VPrediction => sa * x.clone() - sb * e.clone(),
        PredictionType::FlowPrediction => return Err(flow_prediction_unsupported()),
    })
}

/// `pred_original_sample` of the k-diffusion schedulers at `sigma`, over the sample `x` and the
/// model output `e`.
pub(crate) fn sigma_pred_original_sample(prediction_type: PredictionType, sigma: f32, x: &Expr, e: &Expr) -> Result<Expr> {
    Ok(match prediction_type {
        PredictionType::Epsilon => x - &(sigma * e.clone()),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            let c_out = -sigma / s2.sqrt();
            e.clone() * c_out + x.clone() / s2
        }
        PredictionType::Sample => e.clone(),
        PredictionType::FlowPrediction => return Err(flow_prediction_unsupported()),
    })
}

/// `pred_original_sample.clamp(-clip_sample_range, clip_sample_range)` when `clip`.
pub(crate) fn clip_sample(pred_original_sample: Expr, clip: bool, clip_sample_range: f64) -> Expr {
    let r = clip_sample_range as f32;
    if clip {
        pred_original_sample.clamp(-r, r)
    } else {
        pred_original_sample
    }
}

/// `_sigma_to_alpha_sigma_t`: `(alpha_t, sigma_t) = (1 / sqrt(sigma^2 + 1), sigma * alpha_t)`.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// `log(alpha_t) - log(sigma_t)`.
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// The multistep solvers' `convert_model_output` at `sigma`: the data prediction x0 with
/// `predict_x0`, else the noise prediction epsilon; over the model output `e` and the sample `x`.
pub(crate) fn convert_model_output(prediction_type: PredictionType, predict_x0: bool, sigma: f32, e: &Expr, x: &Expr) -> Expr {
    let (a, s) = alpha_sigma(sigma);
    if predict_x0 {
        match prediction_type {
            PredictionType::Epsilon => (x - &(s * e.clone())) / a,
            PredictionType::VPrediction => a * x.clone() - s * e.clone(),
            _ => e.clone(),
        }
    } else {
        match prediction_type {
            PredictionType::Epsilon => e.clone(),
            PredictionType::VPrediction => a * e.clone() + s * x.clone(),
            _ => (x - &(a * e.clone())) / s,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// timestep spacing

/// `timestep_spacing` of the single-step schedulers: `n` of the `total` training timesteps,
/// descending, as numpy float64 before each scheduler's cast. `round` rounds the `linspace`
/// points, as the integer-timestep schedulers do.
fn spaced_timesteps(spacing: TimestepSpacing, total: usize, n: usize, steps_offset: i64, round: bool) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => linspace_timesteps((total - 1) as f64, n, round),
        TimestepSpacing::Leading => leading_timesteps(total, n, steps_offset),
        TimestepSpacing::Trailing => trailing_timesteps(total as f64, total as f64 / n as f64),
    }
}

/// The integer timesteps of DDIM, DDPM and PNDM (`timestep_spacing` with the linspace points
/// rounded), descending.
pub(crate) fn ddpm_style_timesteps(spacing: TimestepSpacing, total: usize, n: usize, steps_offset: i64) -> Vec<i64> {
    spaced_timesteps(spacing, total, n, steps_offset, true).into_iter().map(to_i64).collect()
}

/// `timestep_spacing` of the multistep solvers (DPM-Solver, UniPC): `linspace` and `leading`
/// space `n + 1` points below `last_timestep` and drop the last; `trailing` steps down from
/// `last_timestep` by `total / n`.
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    last_timestep: usize,
    total: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f64> {
    let mut v = match spacing {
        TimestepSpacing::Linspace => linspace_timesteps((last_timestep - 1) as f64, n + 1, true),
        TimestepSpacing::Leading => leading_timesteps(last_timestep, n + 1, steps_offset),
        TimestepSpacing::Trailing => return trailing_timesteps(last_timestep as f64, total as f64 / n as f64),
    };
    v.pop();
    v
}

/// `np.linspace(0, last, count)` (`.round()` with `round`), descending.
fn linspace_timesteps(last: f64, count: usize, round: bool) -> Vec<f64> {
    let mut v = np_linspace(0.0, last, count, true);
    if round {
        v.iter_mut().for_each(|x| *x = np_round(*x));
    }
    v.reverse();
    v
}

/// `(np.arange(0, count) * (total // count))[::-1] + steps_offset`.
fn leading_timesteps(total: usize, count: usize, steps_offset: i64) -> Vec<f64> {
    let ratio = total / count.max(1);
    (0..count).rev().map(|i| (i * ratio) as f64 + steps_offset as f64).collect()
}

/// `np.arange(start, 0, -ratio).round() - 1`.
fn trailing_timesteps(start: f64, ratio: f64) -> Vec<f64> {
    np_arange_f64(start, 0.0, -ratio).into_iter().map(|x| np_round(x) - 1.0).collect()
}

// ---------------------------------------------------------------------------------------------
// torch emulation

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit: torch
/// computes `start + step * i` for the first half and `end - step * (steps - 1 - i)` for the
/// second, with the multiply-add fused.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let s = start as f32;
    let e = end as f32;
    match steps {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| if i < half { step.mul_add(i as f32, s) } else { (-step).mul_add((steps - i - 1) as f32, e) })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 tensor on the CPU: accumulated in double, each output rounded.
fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (float64 maths, then a float32 tensor).
fn betas_for_alpha_bar(n: usize, transform: BetaSchedule) -> Vec<f32> {
    let alpha_bar = |t: f64| -> f64 {
        match transform {
            BetaSchedule::Laplace => {
                let lmb = -0.5 * (0.5 - t).signum_py() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lmb.exp();
                (snr / (1.0 + snr)).sqrt()
            }
            BetaSchedule::Exp => (t * -12.0).exp(),
            _ => {
                let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
                c * c
            }
        }
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            let b = 1.0 - alpha_bar(t2) / alpha_bar(t1);
            (if b < 0.999 { b } else { 0.999 }) as f32
        })
        .collect()
}

trait SignumPy {
    fn signum_py(self) -> f64;
}
impl SignumPy for f64 {
    /// `math.copysign(1, x)`.
    fn signum_py(self) -> f64 {
        1.0f64.copysign(self)
    }
}

/// diffusers' `rescale_zero_terminal_snr`, in float32 tensor arithmetic.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let cp = torch_cumprod_f32(&alphas);
    let mut s: Vec<f32> = cp.iter().map(|v| v.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else { return Vec::new() };
    for v in &mut s {
        *v -= st;
    }
    let scale = s0 / (s0 - st);
    for v in &mut s {
        *v *= scale;
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The float32 betas of a config, as each diffusers scheduler's `__init__` makes them.
fn make_betas(class: &str, cfg: &BetaConfig, allowed_extra: &[BetaSchedule]) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    if !(2..=MAX_TRAIN_TIMESTEPS).contains(&n) {
        return Err(Error::Model(format!(
            "{class}: num_train_timesteps must be between 2 and {MAX_TRAIN_TIMESTEPS}, got {n}"
        )));
    }
    let betas = if let Some(tb) = cfg.trained_betas {
        if tb.len() != n {
            return Err(Error::Model(format!(
                "{class}: trained_betas has {} values but num_train_timesteps is {n}",
                tb.len()
            )));
        }
        tb.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => torch_linspace_f32(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n)
                .into_iter()
                .map(|v| v * v)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n, BetaSchedule::SquaredcosCapV2),
            other if allowed_extra.contains(&other) => match other {
                BetaSchedule::Sigmoid => {
                    let range = (cfg.beta_end - cfg.beta_start) as f32;
                    let start = cfg.beta_start as f32;
                    torch_linspace_f32(-6.0, 6.0, n)
                        .into_iter()
                        .map(|x| (1.0 / (1.0 + (-x).exp())) * range + start)
                        .collect()
                }
                _ => betas_for_alpha_bar(n, other),
            },
            other => {
                return Err(Error::Model(format!(
                    "{class}: beta_schedule {other:?} is not implemented for this scheduler"
                )))
            }
        }
    };
    Ok(if cfg.rescale_betas_zero_snr { rescale_zero_terminal_snr(&betas) } else { betas })
}

/// `alphas_cumprod = cumprod(1 - betas)`.
fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    torch_cumprod_f32(&alphas)
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` as a float32 tensor.
fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.log` of a float32 array.
fn log_f32(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| (v as f64).ln() as f32).collect()
}

/// Python-style index: negative counts from the end.
fn py_index(len: usize, i: i64) -> Option<usize> {
    let j = if i < 0 { i + len as i64 } else { i };
    if j >= 0 && (j as u64) < len as u64 {
        Some(j as usize)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// numpy emulation

/// `np.linspace(start, stop, num, endpoint)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with a float step: the length is `ceil((stop - start) / step)`,
/// element 1 is `start + step`, element i >= 2 is `start + i * (element1 - start)`.
fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 || !len.is_finite() {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let next = start + step;
        out.push(next);
        let delta = next - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// `np.round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` with float32 `fp`.
fn np_interp_arange(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    if x.is_nan() {
        return x;
    }
    let last = (n - 1) as f64;
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x > last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize; // xp = 0, 1, 2, ...: the binary search lands here
    if j >= n - 1 {
        return fp[n - 1] as f64;
    }
    let xj = j as f64;
    if xj == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    let r = slope * (x - xj) + fp[j] as f64;
    if r.is_nan() {
        slope * (x - (xj + 1.0)) + fp[j + 1] as f64
    } else {
        r
    }
}

/// diffusers' `_sigma_to_t(sigma, log_sigmas)` with float32 `log_sigmas`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = (if sigma > 1e-10 { sigma } else { 1e-10 }).ln();
    // argmax of cumsum(dists >= 0): the last index where log_sigma >= log_sigmas[i], else 0.
    let mut low = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let lo = log_sigmas[low];
    let hi = log_sigmas[high];
    let w = (lo as f64 - log_sigma) / ((lo - hi) as f64);
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// diffusers' `_convert_to_karras` (rho = 7) in float64.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let ramp = np_linspace(0.0, 1.0, n, true);
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    ramp.iter().map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

/// diffusers' `_convert_to_exponential` in float64.
fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n, true).into_iter().map(f64::exp).collect()
}

/// `x.to(int64)` of numpy float timesteps (truncation toward zero).
pub(crate) fn to_i64(x: f64) -> i64 {
    x as i64
}

/// Solve `a x = b` (row-major `n x n`) in float32 with partial pivoting, as LAPACK `sgesv`.
pub(crate) fn solve_f32(a: &[f32], b: &[f32], n: usize) -> Option<Vec<f32>> {
    let mut m = a.to_vec();
    let mut x = b.to_vec();
    if m.len() != n * n || x.len() != n {
        return None;
    }
    for k in 0..n {
        let mut p = k;
        for i in k + 1..n {
            if m[i * n + k].abs() > m[p * n + k].abs() {
                p = i;
            }
        }
        if m[p * n + k] == 0.0 {
            return None;
        }
        if p != k {
            for j in 0..n {
                m.swap(k * n + j, p * n + j);
            }
            x.swap(k, p);
        }
        let piv = m[k * n + k];
        for i in k + 1..n {
            let l = m[i * n + k] / piv;
            m[i * n + k] = l;
            for j in k + 1..n {
                m[i * n + j] -= l * m[k * n + j];
            }
            x[i] -= l * x[k];
        }
    }
    for k in (0..n).rev() {
        let mut s = x[k];
        for j in k + 1..n {
            s -= m[k * n + j] * x[j];
        }
        x[k] = s / m[k * n + k];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_len_quirk() {
        // numpy gives 62 points for np.arange(1000, 0, -1000/61)
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 50.0).len(), 50);
    }

    #[test]
    fn linspace_endpoints() {
        let v = np_linspace(0.0, 999.0, 4, true);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 1.0, 1, true), vec![0.0]);
    }
}
