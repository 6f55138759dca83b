//! PNDM (diffusers `PNDMScheduler`): pseudo Runge-Kutta warm-up (unless `skip_prk_steps`)
//! then pseudo linear multistep.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::ops::Expr;
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
    ets: Vec<Latent>,
    cur_model_output: Option<Latent>,
    cur_sample: Option<Latent>,
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

    /// `_get_prev_sample` of the sample `x` and the model output `mo`.
    fn prev_sample(&self, x: Expr, t: i64, prev_t: i64, mo: Expr) -> Result<Expr> {
        let a_t = self.schedule.alpha_prod(t)?;
        let a_prev = self.schedule.alpha_prod_prev(prev_t, self.final_alpha_cumprod)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let mo = if self.config.prediction_type == PredictionType::VPrediction {
            let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
            sa * mo + sb * x.clone()
        } else {
            mo
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let diff = a_prev - a_t;
        Ok(sample_coeff * x - diff * mo / denom)
    }

    fn step_prk(&mut self, m: LatentMath, model_output: &Latent, timestep: i64, sample: &Latent) -> Result<Latent> {
        let half = (self.config.num_train_timesteps / self.schedule.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let mut mo = model_output.clone();
        match self.counter % 4 {
            0 => {
                let c = (1.0f64 / 6.0) as f32;
                self.cur_model_output = Some(add_scaled(m, self.cur_model_output.as_ref(), c, model_output)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => {
                let c = (1.0f64 / 3.0) as f32;
                self.cur_model_output = Some(add_scaled(m, self.cur_model_output.as_ref(), c, model_output)?);
            }
            _ => {
                let c = (1.0f64 / 6.0) as f32;
                mo = add_scaled(m, self.cur_model_output.as_ref(), c, model_output)?;
                self.cur_model_output = None;
            }
        }
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let mut ins = Inputs::new();
        let (x, mo) = (ins.add(&cur), ins.add(&mo));
        let out = m.eval(&self.prev_sample(x, t, prev_t, mo)?, &ins)?;
        self.counter += 1;
        Ok(out)
    }

    fn step_plms(&mut self, m: LatentMath, model_output: &Latent, timestep: i64, sample: &Latent) -> Result<Latent> {
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
            self.ets.push(model_output.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let mut cur_sample = sample.clone();
        let k = self.ets.len();
        if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
        } else if k == 1 && self.counter == 1 {
            if let Some(cs) = self.cur_sample.take() {
                cur_sample = cs;
            }
        }
        let e = &self.ets;
        let mut ins = Inputs::new();
        let x = ins.add(&cur_sample);
        let mo = if k == 1 && self.counter == 0 {
            ins.add(model_output)
        } else if k == 1 && self.counter == 1 {
            (ins.add(model_output) + ins.add(&e[k - 1])) / 2.0
        } else if k == 2 {
            (3.0 * ins.add(&e[1]) - ins.add(&e[0])) / 2.0
        } else if k == 3 {
            (23.0 * ins.add(&e[2]) - 16.0 * ins.add(&e[1]) + 5.0 * ins.add(&e[0])) / 12.0
        } else if k >= 4 {
            let c = (1.0f64 / 24.0) as f32;
            let (e1, e2, e3, e4) = (ins.add(&e[k - 1]), ins.add(&e[k - 2]), ins.add(&e[k - 3]), ins.add(&e[k - 4]));
            c * (55.0 * e1 - 59.0 * e2 + 37.0 * e3 - 9.0 * e4)
        } else {
            return Err(Error::Input(format!("{CLASS}: steps taken out of order; call set_timesteps again")));
        };
        let out = m.eval(&self.prev_sample(x, t, prev_t, mo)?, &ins)?;
        self.counter += 1;
        Ok(out)
    }
}

/// `acc + c * x`, or `c * x` when there is no `acc` yet.
fn add_scaled(m: LatentMath, acc: Option<&Latent>, c: f32, x: &Latent) -> Result<Latent> {
    let mut ins = Inputs::new();
    let xe = ins.add(x);
    match acc {
        Some(a) if a.len() == x.len() => {
            let a = ins.add(a);
            m.eval(&(a + c * xe), &ins)
        }
        _ => m.eval(&(c * xe), &ins),
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

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, _gen: &mut TorchGenerator) -> Result<Latent> {
        let t = self.schedule.step_timestep(index, model_output, sample)?;
        let n = sample.len();
        if self.ets.iter().chain(&self.cur_sample).chain(&self.cur_model_output).any(|v| v.len() != n) {
            return Err(Error::Shape(format!("{CLASS}: the sample size changed between steps")));
        }
        if self.counter < self.prk_len && !self.config.skip_prk_steps {
            self.step_prk(m, model_output, t, sample)
        } else {
            self.step_plms(m, model_output, t, sample)
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
