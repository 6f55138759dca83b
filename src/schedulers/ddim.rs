//! DDIM (diffusers `DDIMScheduler`).

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::Scheduler;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

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

/// Timesteps of DDIM / DDPM: `leading`, `trailing` or `linspace` integers, descending.
pub(crate) fn ddpm_style_timesteps(spacing: TimestepSpacing, total: usize, n: usize, offset: i64) -> Vec<i64> {
    let v = match spacing {
        TimestepSpacing::Linspace => {
            spaced_timesteps(Spacing::Linspace { last: (total - 1) as f64, count: n, round: true })
        }
        TimestepSpacing::Leading => spaced_timesteps(Spacing::Leading { total, count: n, offset }),
        TimestepSpacing::Trailing => spaced_timesteps(Spacing::Trailing { start: total as f64, total, n, round: true }),
    };
    v.into_iter().map(to_i64).collect()
}

/// Denoising diffusion implicit models (Song et al. 2020), with `eta` (default 0).
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    num_inference_steps: usize,
    eta: f32,
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        reject_thresholding(CLASS, config.thresholding)?;
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(Error::Model(format!("{CLASS}: prediction_type flow_prediction is not supported")));
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
            &[],
        )?;
        let alphas_cumprod = alphas_cumprod(&betas);
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(DdimScheduler {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
            num_inference_steps: 0,
            eta: 0.0,
        })
    }

    /// `DDIMScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        py_index(self.alphas_cumprod.len(), t)
            .map(|i| self.alphas_cumprod[i])
            .ok_or_else(|| Error::Input(format!("{CLASS}: timestep {t} is outside the training schedule")))
    }
}

impl Scheduler for DdimScheduler {
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
        self.num_inference_steps = n;
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
        if self.num_inference_steps == 0 {
            return Err(not_set(CLASS));
        }
        check_len(CLASS, "model_output", model_output.len(), sample.len())?;
        let t = *self.timesteps.get(index).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
        let prev_t = t - (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = self.alpha_at(t)?;
        let a_prev = if prev_t >= 0 { self.alpha_at(prev_t)? } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let n = sample.len();
        let (mut x0, eps): (Vec<f32>, Vec<f32>) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                ((0..n).map(|i| (sample[i] - sb * model_output[i]) / sa).collect(), model_output.to_vec())
            }
            PredictionType::Sample => {
                let x0 = model_output.to_vec();
                let eps = (0..n).map(|i| (sample[i] - sa * x0[i]) / sb).collect();
                (x0, eps)
            }
            PredictionType::VPrediction => (
                (0..n).map(|i| sa * sample[i] - sb * model_output[i]).collect(),
                (0..n).map(|i| sa * model_output[i] + sb * sample[i]).collect(),
            ),
            PredictionType::FlowPrediction => unreachable_flow()?,
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
        }
        // _get_variance(t, prev_t)
        let b_prev = 1.0 - a_prev;
        let variance = b_prev / b_t * (1.0 - a_t / a_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let dir_coef = (1.0 - a_prev - std_dev_t * std_dev_t).sqrt();
        let sa_prev = a_prev.sqrt();
        let mut prev: Vec<f32> = (0..n).map(|i| sa_prev * x0[i] + dir_coef * eps[i]).collect();
        if self.eta > 0.0 {
            let noise = gen.randn(n);
            for i in 0..n {
                prev[i] += std_dev_t * noise[i];
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

    fn set_eta(&mut self, eta: f32) {
        self.eta = eta;
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}

pub(crate) fn unreachable_flow<T>() -> Result<T> {
    Err(Error::Model("prediction_type flow_prediction is not supported".into()))
}

/// `add_noise` of the alpha-based schedulers: `sqrt(a_t) * x + sqrt(1 - a_t) * noise`.
pub(crate) fn add_noise_alpha(
    ac: &[f32],
    timesteps: &[i64],
    original: &[f32],
    noise: &[f32],
    index: usize,
) -> Vec<f32> {
    let Some(&t) = timesteps.get(index).or(timesteps.last()) else { return original.to_vec() };
    let Some(i) = py_index(ac.len(), t) else { return original.to_vec() };
    let a = ac[i];
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    original.iter().zip(noise).map(|(x, n)| sa * x + sb * n).collect()
}
