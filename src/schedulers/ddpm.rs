//! DDPM (diffusers `DDPMScheduler`).

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "DDPMScheduler";

/// diffusers' DDPM `variance_type`. Only the fixed variances are supported (the learned ones
/// need a model that predicts its variance in extra channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VarianceType {
    #[serde(rename = "fixed_small")]
    FixedSmall,
    #[serde(rename = "fixed_small_log")]
    FixedSmallLog,
    #[serde(rename = "fixed_large")]
    FixedLarge,
    #[serde(rename = "fixed_large_log")]
    FixedLargeLog,
    #[serde(rename = "learned")]
    Learned,
    #[serde(rename = "learned_range")]
    LearnedRange,
}

/// `DDPMScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DdpmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        DdpmConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Denoising diffusion probabilistic models (Ho et al. 2020), ancestral sampling.
#[derive(Clone, Debug)]
pub struct DdpmScheduler {
    config: DdpmConfig,
    schedule: AlphaSchedule,
}

impl DdpmScheduler {
    /// `alphas_cumprod` over the training timesteps (what training's `add_noise` uses).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    pub fn new(config: DdpmConfig) -> Result<Self> {
        reject_thresholding(CLASS, config.thresholding)?;
        reject_flow_prediction(CLASS, config.prediction_type)?;
        if matches!(
            config.variance_type,
            VarianceType::Learned | VarianceType::LearnedRange | VarianceType::FixedLargeLog
        ) {
            return Err(Error::Model(format!(
                "{CLASS}: variance_type {:?} is not supported (use fixed_small, fixed_small_log or fixed_large)",
                config.variance_type
            )));
        }
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule =
            AlphaSchedule::new(CLASS, &beta_config!(config), &[BetaSchedule::Sigmoid, BetaSchedule::Laplace])?;
        Ok(DdpmScheduler { config, schedule })
    }

    /// `DDPMScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.schedule.set_spaced_timesteps(n, self.config.timestep_spacing, self.config.steps_offset)
    }

    fn timesteps(&self) -> &[f32] {
        self.schedule.timesteps_f32()
    }

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, gen: &mut TorchGenerator) -> Result<Latent> {
        let t = self.schedule.step_timestep(index, model_output, sample)?;
        let prev_t = self.schedule.timesteps.get(index + 1).copied().unwrap_or(-1);
        let a_t = self.schedule.alpha_prod(t)?;
        let a_prev = self.schedule.alpha_prod_prev(prev_t, 1.0)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let noise = if t > 0 { Some(m.put(gen.randn(sample.len()))?) } else { None };
        let mut ins = Inputs::new();
        let (x, e) = (ins.add(sample), ins.add(model_output));
        let x0 = alpha_pred_original_sample(self.config.prediction_type, a_t, &x, &e)?;
        let x0 = clip_sample(x0, self.config.clip_sample, self.config.clip_sample_range);
        let c_x0 = a_prev.sqrt() * cur_beta / b_t;
        let c_cur = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = c_x0 * x0 + c_cur * x;
        if let Some(noise) = &noise {
            // _get_variance(t)
            let var = ((1.0 - a_prev) / (1.0 - a_t) * cur_beta).max(1e-20);
            let scale = match self.config.variance_type {
                VarianceType::FixedSmallLog => (0.5 * var.ln()).exp(),
                VarianceType::FixedLarge => cur_beta.sqrt(),
                _ => var.sqrt(),
            };
            prev = prev + scale * ins.add(noise);
        }
        m.eval(&prev, &ins)
    }

    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        self.schedule.add_noise(m, original, noise, index)
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}
