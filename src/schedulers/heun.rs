//! Heun (diffusers `HeunDiscreteScheduler`): Karras et al. 2022 Algorithm 2, two model calls
//! per step. `timesteps()` repeats every timestep but the first, so there are `2n - 1`.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::euler::{beta_cfg, interp_sigmas, k_add_noise, k_init_noise_sigma, k_scale, k_timesteps};
use super::Scheduler;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "HeunDiscreteScheduler";

/// `HeunDiscreteScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct HeunConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    /// Needs scipy's beta distribution; rejected.
    pub use_beta_sigmas: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl Default for HeunConfig {
    fn default() -> Self {
        HeunConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

/// Heun's second-order method on the probability-flow ODE.
#[derive(Clone, Debug)]
pub struct HeunScheduler {
    config: HeunConfig,
    sigma_bounds: (Option<f64>, Option<f64>),
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    // state between the two halves of a step
    prev_derivative: Option<Vec<f32>>,
    dt: Option<f32>,
    prev_sample: Option<Vec<f32>>,
}

impl HeunScheduler {
    pub fn new(config: HeunConfig) -> Result<Self> {
        Self::with_bounds(config, (None, None))
    }

    fn with_bounds(config: HeunConfig, sigma_bounds: (Option<f64>, Option<f64>)) -> Result<Self> {
        if config.use_beta_sigmas {
            return Err(Error::Model(format!("{CLASS}: use_beta_sigmas is not supported")));
        }
        if config.use_karras_sigmas && config.use_exponential_sigmas {
            return Err(Error::Model(format!(
                "{CLASS}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
            )));
        }
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(Error::Model(format!("{CLASS}: prediction_type flow_prediction is not supported")));
        }
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let betas = make_betas(
            CLASS,
            &beta_cfg(
                config.num_train_timesteps,
                config.beta_start,
                config.beta_end,
                config.beta_schedule,
                config.trained_betas.as_deref(),
                false,
            ),
            &[BetaSchedule::Exp],
        )?;
        let ac = alphas_cumprod(&betas);
        let train_sigmas = train_sigmas(&ac);
        let mut s = HeunScheduler {
            config,
            sigma_bounds,
            alphas_cumprod: ac,
            train_sigmas,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            prev_derivative: None,
            dt: None,
            prev_sample: None,
        };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps); keep its sigmas for
        // init_noise_sigma, but report no timesteps until the caller sets them.
        let n = s.config.num_train_timesteps;
        s.set_timesteps(n)?;
        s.timesteps.clear();
        Ok(s)
    }

    /// `HeunDiscreteScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::with_bounds(parse_config(CLASS, json, overrides)?, config_sigma_bounds(json))
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &HeunConfig {
        &self.config
    }

    fn first_order(&self) -> bool {
        self.dt.is_none()
    }
}

impl Scheduler for HeunScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        check_steps(CLASS, n, c.num_train_timesteps)?;
        let ts32 = k_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
        let log_sigmas = log_f32(&self.train_sigmas);
        let interp = interp_sigmas(&ts32, &self.train_sigmas);
        let (mut sig64, ts64): (Vec<f64>, Vec<f64>) = if c.use_karras_sigmas || c.use_exponential_sigmas {
            let lo = self.sigma_bounds.0.unwrap_or(*interp.last().unwrap_or(&0.0));
            let hi = self.sigma_bounds.1.unwrap_or(*interp.first().unwrap_or(&0.0));
            let s = if c.use_karras_sigmas { karras_sigmas(lo, hi, n) } else { exponential_sigmas(lo, hi, n) };
            let t = s.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            (s, t)
        } else {
            (interp, ts32.iter().map(|&t| t as f64).collect())
        };
        sig64.push(0.0);
        let s32: Vec<f32> = sig64.iter().map(|&v| v as f32).collect();
        // cat(s[:1], s[1:-1].repeat_interleave(2), s[-1:])
        let mut sigmas = Vec::with_capacity(2 * s32.len());
        sigmas.push(s32[0]);
        for &v in &s32[1..s32.len() - 1] {
            sigmas.push(v);
            sigmas.push(v);
        }
        sigmas.push(s32[s32.len() - 1]);
        // cat(t[:1], t[1:].repeat_interleave(2)).to(float32)
        let mut timesteps = Vec::with_capacity(2 * ts64.len());
        if let Some(&t0) = ts64.first() {
            timesteps.push(t0 as f32);
        }
        for &t in ts64.iter().skip(1) {
            timesteps.push(t as f32);
            timesteps.push(t as f32);
        }
        self.sigmas = sigmas;
        self.timesteps = timesteps;
        self.prev_derivative = None;
        self.dt = None;
        self.prev_sample = None;
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
        if index >= self.timesteps.len() || (!self.first_order() && index == 0) {
            return Err(bad_index(CLASS, index, self.timesteps.len()));
        }
        let first = self.first_order();
        let (sigma, sigma_next) = if first {
            (self.sigmas[index], self.sigmas[index + 1])
        } else {
            (self.sigmas[index - 1], self.sigmas[index])
        };
        let sigma_hat = sigma; // gamma = 0
        let sigma_input = if first { sigma_hat } else { sigma_next };
        let n = sample.len();
        let mut x0: Vec<f32> = match self.config.prediction_type {
            PredictionType::Epsilon => (0..n).map(|i| sample[i] - sigma_input * model_output[i]).collect(),
            PredictionType::VPrediction => {
                let s2 = sigma_input * sigma_input + 1.0;
                let c_out = -sigma_input / s2.sqrt();
                (0..n).map(|i| model_output[i] * c_out + sample[i] / s2).collect()
            }
            PredictionType::Sample => model_output.to_vec(),
            PredictionType::FlowPrediction => {
                return Err(Error::Model(format!("{CLASS}: prediction_type flow_prediction is not supported")))
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
        }
        if first {
            let derivative: Vec<f32> = (0..n).map(|i| (sample[i] - x0[i]) / sigma_hat).collect();
            let dt = sigma_next - sigma_hat;
            let out = (0..n).map(|i| sample[i] + derivative[i] * dt).collect();
            self.prev_derivative = Some(derivative);
            self.dt = Some(dt);
            self.prev_sample = Some(sample.to_vec());
            Ok(out)
        } else {
            let (Some(pd), Some(dt), Some(ps)) = (self.prev_derivative.take(), self.dt.take(), self.prev_sample.take())
            else {
                return Err(bad_index(CLASS, index, self.timesteps.len()));
            };
            if pd.len() != n {
                return Err(Error::Shape(format!("{CLASS}: the sample size changed within a step")));
            }
            Ok((0..n)
                .map(|i| {
                    let d = (sample[i] - x0[i]) / sigma_next;
                    let d = (pd[i] + d) / 2.0;
                    ps[i] + d * dt
                })
                .collect())
        }
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], index: usize) -> Vec<f32> {
        k_add_noise(&self.sigmas[..self.timesteps.len().min(self.sigmas.len())], original, noise, index)
    }

    fn order(&self) -> usize {
        2
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
