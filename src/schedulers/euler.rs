//! Euler and Euler ancestral (diffusers `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`).

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "EulerDiscreteScheduler";
const CLASS_A: &str = "EulerAncestralDiscreteScheduler";

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
    schedule: SigmaSchedule,
}

impl EulerScheduler {
    pub fn new(config: EulerConfig) -> Result<Self> {
        reject_beta_sigmas(CLASS, config.use_beta_sigmas)?;
        check_sigma_flags(CLASS, config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas)?;
        if config.interpolation_type != "linear" {
            return Err(Error::Model(format!(
                "{CLASS}: interpolation_type {:?} is not supported (linear)",
                config.interpolation_type
            )));
        }
        if !matches!(config.timestep_type.as_str(), "discrete" | "continuous") {
            return Err(Error::Model(format!("{CLASS}: timestep_type {:?} is not supported", config.timestep_type)));
        }
        reject_flow_prediction(CLASS, config.prediction_type)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = SigmaSchedule::new(CLASS, &beta_config!(config), &[])?.with_training_sigmas();
        Ok(EulerScheduler { config, schedule })
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
        let conversion = SigmaConversion::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let (mut sigmas, timesteps) =
            self.schedule.k_sigmas(c.timestep_spacing, n, c.steps_offset, conversion, (c.sigma_min, c.sigma_max));
        sigmas.push(self.schedule.final_sigma(c.final_sigmas_type));
        let schedule = &mut self.schedule;
        schedule.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        schedule.timesteps = if c.timestep_type == "continuous" && c.prediction_type == PredictionType::VPrediction {
            schedule.sigmas[..schedule.sigmas.len() - 1].iter().map(|s| 0.25 * s.ln()).collect()
        } else {
            timesteps.iter().map(|&t| t as f32).collect()
        };
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.schedule.init_noise_sigma(self.config.timestep_spacing)
    }

    fn scale_model_input(&self, m: LatentMath, sample: &Latent, index: usize) -> Result<Latent> {
        self.schedule.scale_model_input(m, sample, index)
    }

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, _gen: &mut TorchGenerator) -> Result<Latent> {
        self.schedule.check_step(index, model_output, sample)?;
        let sigma = self.schedule.sigmas[index];
        // s_churn = 0: gamma = 0 and sigma_hat = sigma * (0 + 1) = sigma
        let sigma_hat = sigma;
        let mut ins = Inputs::new();
        let (x, e) = (ins.add(sample), ins.add(model_output));
        let x0 = sigma_pred_original_sample(self.config.prediction_type, sigma, &x, &e)?;
        let dt = self.schedule.sigmas[index + 1] - sigma_hat;
        m.eval(&(x.clone() + (x - x0) / sigma_hat * dt), &ins)
    }

    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        self.schedule.add_noise(m, original, noise, index)
    }

    fn sigmas(&self) -> &[f32] {
        self.schedule.sigmas_if_set()
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
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
    schedule: SigmaSchedule,
}

impl EulerAncestralScheduler {
    pub fn new(config: EulerAncestralConfig) -> Result<Self> {
        require_epsilon_or_v(CLASS_A, config.prediction_type)?;
        check_offset(CLASS_A, config.steps_offset, config.num_train_timesteps)?;
        let schedule = SigmaSchedule::new(CLASS_A, &beta_config!(config), &[])?.with_training_sigmas();
        Ok(EulerAncestralScheduler { config, schedule })
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
        let (mut sigmas, timesteps) = self.schedule.k_sigmas(c.timestep_spacing, n, c.steps_offset, None, (None, None));
        sigmas.push(0.0);
        self.schedule.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        self.schedule.timesteps = timesteps.iter().map(|&t| t as f32).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.schedule.init_noise_sigma(self.config.timestep_spacing)
    }

    fn scale_model_input(&self, m: LatentMath, sample: &Latent, index: usize) -> Result<Latent> {
        self.schedule.scale_model_input(m, sample, index)
    }

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, gen: &mut TorchGenerator) -> Result<Latent> {
        self.schedule.check_step(index, model_output, sample)?;
        let sigma = self.schedule.sigmas[index];
        let sigma_from = sigma;
        let sigma_to = self.schedule.sigmas[index + 1];
        let from2 = sigma_from * sigma_from;
        let to2 = sigma_to * sigma_to;
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let noise = m.put(gen.randn(sample.len()))?;
        let mut ins = Inputs::new();
        let (x, e, z) = (ins.add(sample), ins.add(model_output), ins.add(&noise));
        let x0 = sigma_pred_original_sample(self.config.prediction_type, sigma, &x, &e)?;
        m.eval(&((x.clone() + (x - x0) / sigma * dt) + z * sigma_up), &ins)
    }

    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        self.schedule.add_noise(m, original, noise, index)
    }

    fn sigmas(&self) -> &[f32] {
        self.schedule.sigmas_if_set()
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn class_name(&self) -> &'static str {
        CLASS_A
    }
}
