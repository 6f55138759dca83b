//! Euler and Euler ancestral (diffusers `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`), plus the sigma-schedule helpers the k-diffusion style
//! schedulers (Heun, LMS) share.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::Scheduler;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "EulerDiscreteScheduler";
const CLASS_A: &str = "EulerAncestralDiscreteScheduler";

/// The float timesteps of the k-diffusion style schedulers (numpy float32 values, descending).
pub(crate) fn k_timesteps(spacing: TimestepSpacing, total: usize, n: usize, offset: i64) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (total - 1) as f64, n, true).into_iter().rev().map(|x| x as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = total / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + offset as f32).collect()
        }
        TimestepSpacing::Trailing => np_arange_f64(total as f64, 0.0, -(total as f64 / n as f64))
            .into_iter()
            .map(|x| np_round(x) as f32 - 1.0)
            .collect(),
    }
}

/// `np.interp(timesteps, arange, train_sigmas)`.
pub(crate) fn interp_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    timesteps.iter().map(|&t| np_interp_arange(t as f64, train_sigmas)).collect()
}

/// `init_noise_sigma` of the sigma-based schedulers.
pub(crate) fn k_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let max = if max.is_finite() { max } else { 1.0 };
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// `sample / (sigma ** 2 + 1) ** 0.5`.
pub(crate) fn k_scale(sample: &[f32], sigma: f32) -> Vec<f32> {
    let d = (sigma * sigma + 1.0).sqrt();
    sample.iter().map(|x| x / d).collect()
}

/// The `x0` prediction of the sigma-based schedulers at `sigma`.
pub(crate) fn k_pred_x0(pt: PredictionType, sample: &[f32], model_output: &[f32], sigma: f32) -> Result<Vec<f32>> {
    let n = sample.len();
    Ok(match pt {
        PredictionType::Epsilon => (0..n).map(|i| sample[i] - sigma * model_output[i]).collect(),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            let c_out = -sigma / s2.sqrt();
            (0..n).map(|i| model_output[i] * c_out + sample[i] / s2).collect()
        }
        PredictionType::Sample => model_output.to_vec(),
        PredictionType::FlowPrediction => {
            return Err(Error::Model("prediction_type flow_prediction is not supported".into()))
        }
    })
}

/// `original + noise * sigma`.
pub(crate) fn k_add_noise(sigmas: &[f32], original: &[f32], noise: &[f32], index: usize) -> Vec<f32> {
    let Some(&s) = sigmas.get(index).or(sigmas.last()) else { return original.to_vec() };
    original.iter().zip(noise).map(|(x, n)| x + n * s).collect()
}

pub(crate) fn beta_cfg(
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: BetaSchedule,
    trained_betas: Option<&[f64]>,
    rescale: bool,
) -> BetaConfig<'_> {
    BetaConfig {
        num_train_timesteps,
        beta_start,
        beta_end,
        beta_schedule,
        trained_betas,
        rescale_betas_zero_snr: rescale,
    }
}

// ---------------------------------------------------------------------------------------------

/// `EulerDiscreteScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct EulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// `linear` (supported) or `log_linear` (rejected).
    pub interpolation_type: String,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    /// Needs scipy's beta distribution; rejected.
    pub use_beta_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    /// `discrete` or `continuous` (continuous timesteps `0.25 * ln(sigma)` with v_prediction).
    pub timestep_type: String,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerConfig {
    fn default() -> Self {
        EulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: "linear".into(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

/// Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2, no churn).
#[derive(Clone, Debug)]
pub struct EulerScheduler {
    config: EulerConfig,
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
}

impl EulerScheduler {
    pub fn new(config: EulerConfig) -> Result<Self> {
        if config.use_beta_sigmas {
            return Err(Error::Model(format!("{CLASS}: use_beta_sigmas is not supported")));
        }
        if [config.use_karras_sigmas, config.use_exponential_sigmas].iter().filter(|b| **b).count() > 1 {
            return Err(Error::Model(format!(
                "{CLASS}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
            )));
        }
        if config.interpolation_type != "linear" {
            return Err(Error::Model(format!(
                "{CLASS}: interpolation_type {:?} is not supported (linear)",
                config.interpolation_type
            )));
        }
        if !matches!(config.timestep_type.as_str(), "discrete" | "continuous") {
            return Err(Error::Model(format!("{CLASS}: timestep_type {:?} is not supported", config.timestep_type)));
        }
        k_pred_x0(config.prediction_type, &[], &[], 1.0)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let betas = make_betas(
            CLASS,
            &beta_cfg(
                config.num_train_timesteps,
                config.beta_start,
                config.beta_end,
                config.beta_schedule,
                config.trained_betas.as_deref(),
                config.rescale_betas_zero_snr,
            ),
            &[],
        )?;
        let mut ac = alphas_cumprod(&betas);
        if config.rescale_betas_zero_snr {
            if let Some(l) = ac.last_mut() {
                *l = 2f32.powi(-24);
            }
        }
        let train_sigmas = train_sigmas(&ac);
        let mut sigmas: Vec<f32> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        Ok(EulerScheduler { config, alphas_cumprod: ac, train_sigmas, sigmas, timesteps: Vec::new() })
    }

    /// `EulerDiscreteScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &EulerConfig {
        &self.config
    }
}

impl Scheduler for EulerScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        check_steps(CLASS, n, c.num_train_timesteps)?;
        let ts32 = k_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
        let log_sigmas = log_f32(&self.train_sigmas);
        let interp = interp_sigmas(&ts32, &self.train_sigmas);
        let (mut sig64, ts64): (Vec<f64>, Vec<f64>) = if c.use_karras_sigmas || c.use_exponential_sigmas {
            let lo = c.sigma_min.unwrap_or(*interp.last().unwrap_or(&0.0));
            let hi = c.sigma_max.unwrap_or(*interp.first().unwrap_or(&0.0));
            let s = if c.use_karras_sigmas { karras_sigmas(lo, hi, n) } else { exponential_sigmas(lo, hi, n) };
            let t = s.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            (s, t)
        } else {
            (interp, ts32.iter().map(|&t| t as f64).collect())
        };
        let last = match c.final_sigmas_type {
            FinalSigmasType::SigmaMin => {
                let a0 = self.alphas_cumprod[0];
                ((1.0 - a0) / a0).sqrt() as f64
            }
            FinalSigmasType::Zero => 0.0,
        };
        sig64.push(last);
        self.sigmas = sig64.iter().map(|&s| s as f32).collect();
        self.timesteps = if c.timestep_type == "continuous" && c.prediction_type == PredictionType::VPrediction {
            self.sigmas[..self.sigmas.len() - 1].iter().map(|s| 0.25 * s.ln()).collect()
        } else {
            ts64.iter().map(|&t| t as f32).collect()
        };
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        k_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&self, sample: &[f32], index: usize) -> Vec<f32> {
        let Some(&s) = self.sigmas.get(index.min(self.timesteps.len().saturating_sub(1))) else {
            return sample.to_vec();
        };
        k_scale(sample, s)
    }

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        _gen: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        if self.timesteps.is_empty() {
            return Err(not_set(CLASS));
        }
        check_len(CLASS, "model_output", model_output.len(), sample.len())?;
        if index >= self.timesteps.len() {
            return Err(bad_index(CLASS, index, self.timesteps.len()));
        }
        let sigma = self.sigmas[index];
        // s_churn = 0: gamma = 0 and sigma_hat = sigma * (0 + 1) = sigma
        let sigma_hat = sigma;
        let x0 = k_pred_x0(self.config.prediction_type, sample, model_output, sigma)?;
        let dt = self.sigmas[index + 1] - sigma_hat;
        Ok((0..sample.len()).map(|i| sample[i] + (sample[i] - x0[i]) / sigma_hat * dt).collect())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], index: usize) -> Vec<f32> {
        k_add_noise(&self.sigmas[..self.timesteps.len().min(self.sigmas.len())], original, noise, index)
    }

    fn order(&self) -> usize {
        1
    }

    fn sigmas(&self) -> &[f32] {
        if self.timesteps.is_empty() {
            &[]
        } else {
            &self.sigmas
        }
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}

// ---------------------------------------------------------------------------------------------

/// `EulerAncestralDiscreteScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct EulerAncestralConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralConfig {
    fn default() -> Self {
        EulerAncestralConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Euler ancestral sampling (k-diffusion `sample_euler_ancestral`, eta = 1).
#[derive(Clone, Debug)]
pub struct EulerAncestralScheduler {
    config: EulerAncestralConfig,
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
}

impl EulerAncestralScheduler {
    pub fn new(config: EulerAncestralConfig) -> Result<Self> {
        if !matches!(config.prediction_type, PredictionType::Epsilon | PredictionType::VPrediction) {
            return Err(Error::Model(format!(
                "{CLASS_A}: prediction_type {:?} is not supported (epsilon or v_prediction)",
                config.prediction_type
            )));
        }
        check_offset(CLASS_A, config.steps_offset, config.num_train_timesteps)?;
        let betas = make_betas(
            CLASS_A,
            &beta_cfg(
                config.num_train_timesteps,
                config.beta_start,
                config.beta_end,
                config.beta_schedule,
                config.trained_betas.as_deref(),
                config.rescale_betas_zero_snr,
            ),
            &[],
        )?;
        let mut ac = alphas_cumprod(&betas);
        if config.rescale_betas_zero_snr {
            if let Some(l) = ac.last_mut() {
                *l = 2f32.powi(-24);
            }
        }
        let train_sigmas = train_sigmas(&ac);
        let mut sigmas: Vec<f32> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        Ok(EulerAncestralScheduler { config, alphas_cumprod: ac, train_sigmas, sigmas, timesteps: Vec::new() })
    }

    /// `EulerAncestralDiscreteScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS_A, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &EulerAncestralConfig {
        &self.config
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        check_steps(CLASS_A, n, c.num_train_timesteps)?;
        let ts = k_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
        let mut s = interp_sigmas(&ts, &self.train_sigmas);
        s.push(0.0);
        self.sigmas = s.iter().map(|&v| v as f32).collect();
        self.timesteps = ts;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        k_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&self, sample: &[f32], index: usize) -> Vec<f32> {
        let Some(&s) = self.sigmas.get(index.min(self.timesteps.len().saturating_sub(1))) else {
            return sample.to_vec();
        };
        k_scale(sample, s)
    }

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        gen: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        if self.timesteps.is_empty() {
            return Err(not_set(CLASS_A));
        }
        check_len(CLASS_A, "model_output", model_output.len(), sample.len())?;
        if index >= self.timesteps.len() {
            return Err(bad_index(CLASS_A, index, self.timesteps.len()));
        }
        let sigma = self.sigmas[index];
        let x0 = k_pred_x0(self.config.prediction_type, sample, model_output, sigma)?;
        let sigma_from = sigma;
        let sigma_to = self.sigmas[index + 1];
        let from2 = sigma_from * sigma_from;
        let to2 = sigma_to * sigma_to;
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let n = sample.len();
        let noise = gen.randn(n);
        Ok((0..n).map(|i| (sample[i] + (sample[i] - x0[i]) / sigma * dt) + noise[i] * sigma_up).collect())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], index: usize) -> Vec<f32> {
        k_add_noise(&self.sigmas[..self.timesteps.len().min(self.sigmas.len())], original, noise, index)
    }

    fn order(&self) -> usize {
        1
    }

    fn sigmas(&self) -> &[f32] {
        if self.timesteps.is_empty() {
            &[]
        } else {
            &self.sigmas
        }
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn class_name(&self) -> &'static str {
        CLASS_A
    }
}
