//! LCM (diffusers `LCMScheduler`): latent consistency model multistep sampling.
//!
//! diffusers' step also returns `denoised`; on the last step `prev_sample == denoised`, so the
//! usual loop's final `x` is what the LCM pipeline decodes.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "LCMScheduler";

/// `LCMScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LcmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    /// Present in the config but unused by diffusers' LCM schedule.
    pub timestep_spacing: TimestepSpacing,
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmConfig {
    fn default() -> Self {
        LcmConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Latent consistency models (Luo et al. 2023).
#[derive(Clone, Debug)]
pub struct LcmScheduler {
    config: LcmConfig,
    schedule: AlphaSchedule,
    final_alpha_cumprod: f32,
}

impl LcmScheduler {
    pub fn new(config: LcmConfig) -> Result<Self> {
        reject_thresholding(CLASS, config.thresholding)?;
        reject_flow_prediction(CLASS, config.prediction_type)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = AlphaSchedule::new(CLASS, &beta_config!(config), &[])?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(config.set_alpha_to_one);
        Ok(LcmScheduler { config, schedule, final_alpha_cumprod })
    }

    /// `LCMScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &LcmConfig {
        &self.config
    }
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let total = self.config.num_train_timesteps;
        let original = self.config.original_inference_steps;
        check_steps(CLASS, n, total)?;
        if original == 0 || original > total {
            return Err(Error::Model(format!(
                "{CLASS}: original_inference_steps {original} must be between 1 and num_train_timesteps {total}"
            )));
        }
        if n > original {
            return Err(Error::Input(format!(
                "{CLASS}: {n} inference steps is more than original_inference_steps ({original}); use at most {original}"
            )));
        }
        let k = (total / original) as i64;
        // lcm_origin_timesteps = arange(1, original + 1) * k - 1, reversed
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
        let ts: Vec<i64> = np_linspace(0.0, origin.len() as f64, n, false)
            .into_iter()
            .map(|x| origin[(x.floor() as usize).min(origin.len() - 1)])
            .collect();
        self.schedule.set_timesteps(n, ts);
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        self.schedule.timesteps_f32()
    }

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, gen: &mut TorchGenerator) -> Result<Latent> {
        let t = self.schedule.step_timestep(index, model_output, sample)?;
        let prev_t = self.schedule.timesteps.get(index + 1).copied().unwrap_or(t);
        let a_t = self.schedule.alpha_prod(t)?;
        let a_prev = self.schedule.alpha_prod_prev(prev_t, self.final_alpha_cumprod)?;
        let b_prev = 1.0 - a_prev;
        // get_scalings_for_boundary_condition_discrete (float32 tensor maths)
        let scaled = t as f32 * self.config.timestep_scaling as f32;
        let d = scaled * scaled + 0.25;
        let c_skip = 0.25 / d;
        let c_out = scaled / d.sqrt();
        let last = index == self.schedule.timesteps.len() - 1;
        let noise = if last { None } else { Some(m.put(gen.randn(sample.len()))?) };
        let mut ins = Inputs::new();
        let (x, e) = (ins.add(sample), ins.add(model_output));
        let x0 = alpha_pred_original_sample(self.config.prediction_type, a_t, &x, &e)?;
        let x0 = clip_sample(x0, self.config.clip_sample, self.config.clip_sample_range);
        let denoised = c_out * x0 + c_skip * x;
        match &noise {
            Some(noise) => {
                let (sap, sbp) = (a_prev.sqrt(), b_prev.sqrt());
                let z = ins.add(noise);
                m.eval(&(sap * denoised + sbp * z), &ins)
            }
            None => m.eval(&denoised, &ins),
        }
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
