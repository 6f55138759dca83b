//! DDPM (diffusers `DDPMScheduler`).

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::ddim::{add_noise_alpha, ddpm_style_timesteps, unreachable_flow};
use super::Scheduler;
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
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
}

impl DdpmScheduler {
    pub fn new(config: DdpmConfig) -> Result<Self> {
        reject_thresholding(CLASS, config.thresholding)?;
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(Error::Model(format!("{CLASS}: prediction_type flow_prediction is not supported")));
        }
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
        let betas = make_betas(
            CLASS,
            &BetaConfig {
                num_train_timesteps: config.num_train_timesteps,
                beta_start: config.beta_start,
                beta_end: config.beta_end,
                beta_schedule: config.beta_schedule,
                trained_betas: config.trained_betas.as_deref(),
                rescale_betas_zero_snr: config.rescale_betas_zero_snr,
            },
            &[BetaSchedule::Sigmoid, BetaSchedule::Laplace],
        )?;
        Ok(DdpmScheduler {
            alphas_cumprod: alphas_cumprod(&betas),
            config,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
        })
    }

    /// `DDPMScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        py_index(self.alphas_cumprod.len(), t)
            .map(|i| self.alphas_cumprod[i])
            .ok_or_else(|| Error::Input(format!("{CLASS}: timestep {t} is outside the training schedule")))
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.config.num_train_timesteps)?;
        let ts = ddpm_style_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            n,
            self.config.steps_offset,
        );
        self.timesteps_f32 = ts.iter().map(|&t| t as f32).collect();
        self.timesteps = ts;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, sample: &[f32], _index: usize) -> Vec<f32> {
        sample.to_vec()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        gen: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        if self.timesteps.is_empty() {
            return Err(not_set(CLASS));
        }
        check_len(CLASS, "model_output", model_output.len(), sample.len())?;
        let t = *self.timesteps.get(index).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
        let prev_t = self.timesteps.get(index + 1).copied().unwrap_or(-1);
        let a_t = self.alpha_at(t)?;
        let a_prev = if prev_t >= 0 { self.alpha_at(prev_t)? } else { 1.0 };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let n = sample.len();
        let mut x0: Vec<f32> = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
                (0..n).map(|i| (sample[i] - sb * model_output[i]) / sa).collect()
            }
            PredictionType::Sample => model_output.to_vec(),
            PredictionType::VPrediction => {
                let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
                (0..n).map(|i| sa * sample[i] - sb * model_output[i]).collect()
            }
            PredictionType::FlowPrediction => unreachable_flow()?,
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
        }
        let c_x0 = a_prev.sqrt() * cur_beta / b_t;
        let c_cur = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev: Vec<f32> = (0..n).map(|i| c_x0 * x0[i] + c_cur * sample[i]).collect();
        if t > 0 {
            let noise = gen.randn(n);
            // _get_variance(t)
            let var = ((1.0 - a_prev) / (1.0 - a_t) * cur_beta).max(1e-20);
            let scale = match self.config.variance_type {
                VarianceType::FixedSmallLog => (0.5 * var.ln()).exp(),
                VarianceType::FixedLarge => cur_beta.sqrt(),
                _ => var.sqrt(),
            };
            for i in 0..n {
                prev[i] += scale * noise[i];
            }
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], index: usize) -> Vec<f32> {
        add_noise_alpha(&self.alphas_cumprod, &self.timesteps, original, noise, index)
    }

    fn order(&self) -> usize {
        1
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}
