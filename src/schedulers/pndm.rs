//! PNDM (diffusers `PNDMScheduler`): pseudo Runge-Kutta warm-up (unless `skip_prk_steps`)
//! then pseudo linear multistep.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::Scheduler;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "PNDMScheduler";

/// `PNDMScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct PndmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl Default for PndmConfig {
    fn default() -> Self {
        PndmConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

/// Pseudo numerical methods for diffusion models (Liu et al. 2022).
#[derive(Clone, Debug)]
pub struct PndmScheduler {
    config: PndmConfig,
    schedule: AlphaSchedule,
    final_alpha_cumprod: f32,
    prk_len: usize,
    prk_timesteps: Vec<i64>,
    // state
    counter: usize,
    ets: Vec<Vec<f32>>,
    cur_model_output: Option<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
}

impl PndmScheduler {
    pub fn new(config: PndmConfig) -> Result<Self> {
        require_epsilon_or_v(CLASS, config.prediction_type)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = AlphaSchedule::new(CLASS, &beta_config!(config, false), &[])?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(config.set_alpha_to_one);
        Ok(PndmScheduler {
            config,
            schedule,
            final_alpha_cumprod,
            prk_len: 0,
            prk_timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// `PNDMScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &PndmConfig {
        &self.config
    }

    /// `_get_prev_sample`.
    fn prev_sample(&self, sample: &[f32], t: i64, prev_t: i64, model_output: &[f32]) -> Result<Vec<f32>> {
        let a_t = self.schedule.alpha_prod(t)?;
        let a_prev = self.schedule.alpha_prod_prev(prev_t, self.final_alpha_cumprod)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let mo: Vec<f32> = if self.config.prediction_type == PredictionType::VPrediction {
            let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
            model_output.iter().zip(sample).map(|(m, s)| sa * m + sb * s).collect()
        } else {
            model_output.to_vec()
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let diff = a_prev - a_t;
        Ok(sample.iter().zip(&mo).map(|(s, m)| sample_coeff * s - diff * m / denom).collect())
    }

    fn step_prk(&mut self, model_output: &[f32], timestep: i64, sample: &[f32]) -> Result<Vec<f32>> {
        let half = (self.config.num_train_timesteps / self.schedule.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let mut mo = model_output.to_vec();
        match self.counter % 4 {
            0 => {
                let c = (1.0f64 / 6.0) as f32;
                let acc: Vec<f32> = add_scaled(self.cur_model_output.as_deref(), c, model_output);
                self.cur_model_output = Some(acc);
                self.ets.push(model_output.to_vec());
                self.cur_sample = Some(sample.to_vec());
            }
            1 | 2 => {
                let c = (1.0f64 / 3.0) as f32;
                let acc = add_scaled(self.cur_model_output.as_deref(), c, model_output);
                self.cur_model_output = Some(acc);
            }
            _ => {
                let c = (1.0f64 / 6.0) as f32;
                mo = add_scaled(self.cur_model_output.as_deref(), c, model_output);
                self.cur_model_output = None;
            }
        }
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.to_vec());
        let out = self.prev_sample(&cur, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(out)
    }

    fn step_plms(&mut self, model_output: &[f32], timestep: i64, sample: &[f32]) -> Result<Vec<f32>> {
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::Input(format!(
                "{CLASS}: PLMS steps need at least 3 previous PRK model outputs; use more inference steps"
            )));
        }
        let ratio = (self.config.num_train_timesteps / self.schedule.num_inference_steps) as i64;
        let mut t = timestep;
        let mut prev_t = timestep - ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.to_vec());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let n = sample.len();
        let mut cur_sample = sample.to_vec();
        let e = &self.ets;
        let k = e.len();
        let mo: Vec<f32> = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.to_vec());
            model_output.to_vec()
        } else if k == 1 && self.counter == 1 {
            if let Some(cs) = self.cur_sample.take() {
                cur_sample = cs;
            }
            let last = &e[k - 1];
            (0..n).map(|i| (model_output[i] + last[i]) / 2.0).collect()
        } else if k == 2 {
            (0..n).map(|i| (3.0 * e[1][i] - e[0][i]) / 2.0).collect()
        } else if k == 3 {
            (0..n).map(|i| (23.0 * e[2][i] - 16.0 * e[1][i] + 5.0 * e[0][i]) / 12.0).collect()
        } else if k >= 4 {
            let c = (1.0f64 / 24.0) as f32;
            let (e1, e2, e3, e4) = (&e[k - 1], &e[k - 2], &e[k - 3], &e[k - 4]);
            (0..n).map(|i| c * (55.0 * e1[i] - 59.0 * e2[i] + 37.0 * e3[i] - 9.0 * e4[i])).collect()
        } else {
            return Err(Error::Input(format!("{CLASS}: steps taken out of order; call set_timesteps again")));
        };
        let out = self.prev_sample(&cur_sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(out)
    }
}

/// `acc + c * x` where `acc` starts as Python's `0`.
fn add_scaled(acc: Option<&[f32]>, c: f32, x: &[f32]) -> Vec<f32> {
    match acc {
        Some(a) if a.len() == x.len() => a.iter().zip(x).map(|(a, v)| a + c * v).collect(),
        _ => x.iter().map(|v| c * v).collect(),
    }
}

impl Scheduler for PndmScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let total = self.config.num_train_timesteps;
        check_steps(CLASS, n, total)?;
        // self._timesteps, ascending
        let mut base = ddpm_style_timesteps(self.config.timestep_spacing, total, n, self.config.steps_offset);
        base.reverse();
        let m = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.config.skip_prk_steps {
            // concat(_t[:-1], _t[-2:-1], _t[-1:])[::-1]
            let mut v: Vec<i64> = base[..m.saturating_sub(1)].to_vec();
            if m >= 2 {
                v.push(base[m - 2]);
            }
            if m >= 1 {
                v.push(base[m - 1]);
            }
            v.reverse();
            (Vec::new(), v)
        } else {
            let order = 4usize;
            let tail = &base[m.saturating_sub(order)..];
            let half = (total / n / 2) as i64;
            // repeat(2) + tile([0, half])
            let mut prk: Vec<i64> = Vec::new();
            for &t in tail {
                prk.push(t);
                prk.push(t + half);
            }
            // [:-1].repeat(2)[1:-1][::-1]
            prk.pop();
            let rep: Vec<i64> = prk.iter().flat_map(|&t| [t, t]).collect();
            let mut p: Vec<i64> = if rep.len() >= 2 { rep[1..rep.len() - 1].to_vec() } else { Vec::new() };
            p.reverse();
            let mut plms: Vec<i64> = base[..m.saturating_sub(3)].to_vec();
            plms.reverse();
            (p, plms)
        };
        self.prk_len = prk.len();
        self.prk_timesteps = prk.clone();
        let mut ts = prk;
        ts.extend(plms);
        self.schedule.set_timesteps(n, ts);
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        self.schedule.timesteps_f32()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        _gen: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        let t = self.schedule.step_timestep(index, model_output, sample)?;
        let n = sample.len();
        if self.ets.iter().chain(&self.cur_sample).chain(&self.cur_model_output).any(|v| v.len() != n) {
            return Err(Error::Shape(format!("{CLASS}: the sample size changed between steps")));
        }
        if self.counter < self.prk_len && !self.config.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], index: usize) -> Vec<f32> {
        self.schedule.add_noise(original, noise, index)
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}
