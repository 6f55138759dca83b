//! DDIM (diffusers `DDIMScheduler`).

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::rng::TorchGenerator;
use crate::Result;

const CLASS: &str = "DDIMScheduler";

/// `DDIMScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Denoising diffusion implicit models (Song et al. 2020), with `eta` (default 0).
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: DdimConfig,
    schedule: AlphaSchedule,
    final_alpha_cumprod: f32,
    eta: f32,
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        reject_thresholding(CLASS, config.thresholding)?;
        reject_flow_prediction(CLASS, config.prediction_type)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = AlphaSchedule::new(CLASS, &beta_config!(config), &[])?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(config.set_alpha_to_one);
        Ok(DdimScheduler { config, schedule, final_alpha_cumprod, eta: 0.0 })
    }

    /// `DDIMScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.schedule.set_spaced_timesteps(n, self.config.timestep_spacing, self.config.steps_offset)
    }

    fn timesteps(&self) -> &[f32] {
        self.schedule.timesteps_f32()
    }

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, gen: &mut TorchGenerator) -> Result<Latent> {
        let t = self.schedule.step_timestep(index, model_output, sample)?;
        let prev_t = t - (self.config.num_train_timesteps / self.schedule.num_inference_steps) as i64;
        let a_t = self.schedule.alpha_prod(t)?;
        let a_prev = self.schedule.alpha_prod_prev(prev_t, self.final_alpha_cumprod)?;
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let noise = if self.eta > 0.0 { Some(m.put(gen.randn(sample.len()))?) } else { None };
        let mut ins = Inputs::new();
        let (x, e) = (ins.add(sample), ins.add(model_output));
        let x0 = alpha_pred_original_sample(self.config.prediction_type, a_t, &x, &e)?;
        let eps = match self.config.prediction_type {
            PredictionType::Sample => (&x - &(sa * x0.clone())) / sb,
            PredictionType::VPrediction => sa * e.clone() + sb * x.clone(),
            _ => e.clone(),
        };
        let x0 = clip_sample(x0, self.config.clip_sample, self.config.clip_sample_range);
        // _get_variance(t, prev_t)
        let b_prev = 1.0 - a_prev;
        let variance = b_prev / b_t * (1.0 - a_t / a_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let dir_coef = (1.0 - a_prev - std_dev_t * std_dev_t).sqrt();
        let sa_prev = a_prev.sqrt();
        let mut prev = sa_prev * x0 + dir_coef * eps;
        if let Some(noise) = &noise {
            prev = prev + std_dev_t * ins.add(noise);
        }
        m.eval(&prev, &ins)
    }

    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        self.schedule.add_noise(m, original, noise, index)
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn set_eta(&mut self, eta: f32) {
        self.eta = eta;
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}
