//! Heun (diffusers `HeunDiscreteScheduler`): Karras et al. 2022 Algorithm 2, two model calls
//! per step. `timesteps()` repeats every timestep but the first, so there are `2n - 1`.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
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
    schedule: SigmaSchedule,
    // state between the two halves of a step
    prev_derivative: Option<Latent>,
    dt: Option<f32>,
    prev_sample: Option<Latent>,
}

impl HeunScheduler {
    pub fn new(config: HeunConfig) -> Result<Self> {
        Self::with_bounds(config, (None, None))
    }

    fn with_bounds(config: HeunConfig, sigma_bounds: (Option<f64>, Option<f64>)) -> Result<Self> {
        reject_beta_sigmas(CLASS, config.use_beta_sigmas)?;
        check_sigma_flags(CLASS, config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas)?;
        reject_flow_prediction(CLASS, config.prediction_type)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = SigmaSchedule::new(CLASS, &beta_config!(config, false), &[BetaSchedule::Exp])?;
        let mut s =
            HeunScheduler { config, sigma_bounds, schedule, prev_derivative: None, dt: None, prev_sample: None };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps); keep its sigmas for
        // init_noise_sigma, but report no timesteps until the caller sets them.
        let n = s.config.num_train_timesteps;
        s.set_timesteps(n)?;
        s.schedule.timesteps.clear();
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
        let conversion = SigmaConversion::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let (mut sig64, ts64) =
            self.schedule.k_sigmas(c.timestep_spacing, n, c.steps_offset, conversion, self.sigma_bounds);
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
        self.schedule.sigmas = sigmas;
        self.schedule.timesteps = timesteps;
        self.prev_derivative = None;
        self.dt = None;
        self.prev_sample = None;
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
        let first = self.first_order();
        if !first && index == 0 {
            return Err(bad_index(CLASS, index, self.schedule.timesteps.len()));
        }
        // The second half reads what the first half left.
        let second = if first {
            None
        } else {
            let (Some(pd), Some(dt), Some(ps)) = (self.prev_derivative.take(), self.dt.take(), self.prev_sample.take())
            else {
                return Err(bad_index(CLASS, index, self.schedule.timesteps.len()));
            };
            if pd.len() != sample.len() {
                return Err(Error::Shape(format!("{CLASS}: the sample size changed within a step")));
            }
            Some((pd, dt, ps))
        };
        let s = &self.schedule.sigmas;
        let (sigma, sigma_next) = if first { (s[index], s[index + 1]) } else { (s[index - 1], s[index]) };
        let sigma_hat = sigma; // gamma = 0
        let sigma_input = if first { sigma_hat } else { sigma_next };
        let mut ins = Inputs::new();
        let (x, e) = (ins.add(sample), ins.add(model_output));
        let x0 = sigma_pred_original_sample(self.config.prediction_type, sigma_input, &x, &e)?;
        let x0 = clip_sample(x0, self.config.clip_sample, self.config.clip_sample_range);
        match &second {
            None => {
                let derivative = m.eval(&((x - x0) / sigma_hat), &ins)?;
                let dt = sigma_next - sigma_hat;
                let mut ins = Inputs::new();
                let (x, d) = (ins.add(sample), ins.add(&derivative));
                let out = m.eval(&(x + d * dt), &ins)?;
                self.prev_derivative = Some(derivative);
                self.dt = Some(dt);
                self.prev_sample = Some(sample.clone());
                Ok(out)
            }
            Some((pd, dt, ps)) => {
                let (pd, ps) = (ins.add(pd), ins.add(ps));
                let d = (x - x0) / sigma_next;
                let d = (pd + d) / 2.0;
                m.eval(&(ps + d * *dt), &ins)
            }
        }
    }

    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        self.schedule.add_noise(m, original, noise, index)
    }

    fn order(&self) -> usize {
        2
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
