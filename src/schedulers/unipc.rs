//! UniPC (diffusers `UniPCMultistepScheduler`): unified predictor-corrector, bh1 / bh2.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::dpm_solver::{alpha_sigma, lambda, lincomb};
use super::euler::beta_cfg;
use super::Scheduler;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "UniPCMultistepScheduler";

/// UniPC's `solver_type` (`midpoint`, `heun`, `logrho` map to `bh2` as diffusers does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UniPcSolverType {
    Bh1,
    Bh2,
}

/// `UniPCMultistepScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UniPcConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub disable_corrector: Vec<i64>,
    /// A nested predictor scheduler; not supported (must be null).
    pub solver_p: Option<Value>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    /// Needs scipy's beta distribution; rejected.
    pub use_beta_sigmas: bool,
    /// Flow matching; rejected.
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub final_sigmas_type: FinalSigmasType,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub shift_terminal: Option<f64>,
}

impl Default for UniPcConfig {
    fn default() -> Self {
        UniPcConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
        }
    }
}

/// `torch.pow(x, k)` for the small integer powers UniPC uses.
fn powi(x: f32, k: usize) -> f32 {
    match k {
        0 => 1.0,
        1 => x,
        2 => x * x,
        3 => x * x * x,
        _ => x.powi(k as i32),
    }
}

/// UniPC (Zhao et al. 2023), multistep with the UniC corrector.
#[derive(Clone, Debug)]
pub struct UniPcScheduler {
    config: UniPcConfig,
    solver_type: UniPcSolverType,
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
    last_sample: Option<Vec<f32>>,
    this_order: usize,
}

/// The coefficients UniPC's predictor (`corrector = false`) or corrector builds from `rks`.
struct Coeffs {
    h_phi_1: f32,
    b_h: f32,
    rhos: Vec<f32>,
}

impl UniPcScheduler {
    pub fn new(config: UniPcConfig) -> Result<Self> {
        let solver_type = match config.solver_type.as_str() {
            "bh1" => UniPcSolverType::Bh1,
            "bh2" | "midpoint" | "heun" | "logrho" => UniPcSolverType::Bh2,
            other => return Err(Error::Model(format!("{CLASS}: solver_type {other:?} is not implemented"))),
        };
        if config.solver_order == 0 || config.solver_order > 3 {
            return Err(Error::Model(format!("{CLASS}: solver_order must be 1, 2 or 3, got {}", config.solver_order)));
        }
        let flags = [config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas];
        if flags.iter().filter(|b| **b).count() > 1 {
            return Err(Error::Model(format!(
                "{CLASS}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
            )));
        }
        if config.use_beta_sigmas || config.use_flow_sigmas || config.use_dynamic_shifting {
            return Err(Error::Model(format!(
                "{CLASS}: use_beta_sigmas, use_flow_sigmas and use_dynamic_shifting are not supported"
            )));
        }
        if config.solver_p.is_some() {
            return Err(Error::Model(format!("{CLASS}: solver_p is not supported")));
        }
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(Error::Model(format!("{CLASS}: prediction_type flow_prediction is not supported")));
        }
        reject_thresholding(CLASS, config.thresholding)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let betas = make_betas(
            CLASS,
            &beta_cfg(
                config.num_train_timesteps,
                config.beta_start,
                config.beta_end,
                config.beta_schedule,
                config.trained_betas.as_deref(),
                config.rescale_betas_zero_snr,
            ),
            &[],
        )?;
        let mut ac = alphas_cumprod(&betas);
        if config.rescale_betas_zero_snr {
            if let Some(l) = ac.last_mut() {
                *l = 2f32.powi(-24);
            }
        }
        let train_sigmas = train_sigmas(&ac);
        let order = config.solver_order;
        Ok(UniPcScheduler {
            config,
            solver_type,
            alphas_cumprod: ac,
            train_sigmas,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        })
    }

    /// `UniPCMultistepScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    fn convert(&self, model_output: &[f32], sample: &[f32], index: usize) -> Vec<f32> {
        let (a, s) = alpha_sigma(self.sigmas[index]);
        let n = sample.len();
        if self.config.predict_x0 {
            match self.config.prediction_type {
                PredictionType::Epsilon => (0..n).map(|i| (sample[i] - s * model_output[i]) / a).collect(),
                PredictionType::VPrediction => (0..n).map(|i| a * sample[i] - s * model_output[i]).collect(),
                _ => model_output.to_vec(),
            }
        } else {
            match self.config.prediction_type {
                PredictionType::Epsilon => model_output.to_vec(),
                PredictionType::VPrediction => (0..n).map(|i| a * model_output[i] + s * sample[i]).collect(),
                _ => (0..n).map(|i| (sample[i] - a * model_output[i]) / s).collect(),
            }
        }
    }

    /// The `R`, `b` system and its solution, shared by predictor and corrector.
    fn coeffs(&self, h: f32, rks: &[f32], order: usize, corrector: bool) -> Result<Coeffs> {
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i: u64 = 1;
        let b_h = match self.solver_type {
            UniPcSolverType::Bh1 => hh,
            UniPcSolverType::Bh2 => hh.exp_m1(),
        };
        let k = rks.len(); // == order
        let mut r = vec![0f32; order * k];
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            for (j, &rk) in rks.iter().enumerate() {
                r[(i - 1) * k + j] = powi(rk, i - 1);
            }
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= (i + 1) as u64;
            h_phi_k = h_phi_k / hh - (1.0 / factorial_i as f64) as f32;
        }
        let rhos = if corrector {
            if order == 1 {
                vec![0.5]
            } else {
                solve_f32(&r, &b, order).ok_or_else(|| Error::Input(format!("{CLASS}: singular corrector system")))?
            }
        } else if order <= 1 {
            Vec::new()
        } else if order == 2 {
            vec![0.5]
        } else {
            // R[:-1, :-1], b[:-1]
            let m = order - 1;
            let mut sub = Vec::with_capacity(m * m);
            for i in 0..m {
                sub.extend_from_slice(&r[i * k..i * k + m]);
            }
            solve_f32(&sub, &b[..m], m).ok_or_else(|| Error::Input(format!("{CLASS}: singular predictor system")))?
        };
        Ok(Coeffs { h_phi_1, b_h, rhos })
    }

    fn outputs(&self, back: usize) -> Option<&[f32]> {
        let k = self.model_outputs.len();
        self.model_outputs.get(k.checked_sub(back + 1)?)?.as_deref()
    }

    /// `multistep_uni_p_bh_update`.
    fn predictor(&self, index: usize, x: &[f32], order: usize) -> Result<Vec<f32>> {
        let m0 = self.outputs(0).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
        let (at, st) = alpha_sigma(self.sigmas[index + 1]);
        let (as0, ss0) = alpha_sigma(self.sigmas[index]);
        let ls0 = lambda(as0, ss0);
        let h = lambda(at, st) - ls0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s: Vec<Vec<f32>> = Vec::new();
        for i in 1..order {
            let si = index.checked_sub(i).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
            let mi = self.outputs(i).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
            let (a, s) = alpha_sigma(self.sigmas[si]);
            let rk = (lambda(a, s) - ls0) / h;
            rks.push(rk);
            d1s.push(mi.iter().zip(m0).map(|(m, z)| (m - z) / rk).collect());
        }
        rks.push(1.0);
        let c = self.coeffs(h, &rks, order, false)?;
        let (c_x, c_m0, c_res) = if self.config.predict_x0 {
            (st / ss0, -(at * c.h_phi_1), at * c.b_h)
        } else {
            (at / as0, -(st * c.h_phi_1), st * c.b_h)
        };
        let x_t_ = lincomb(&[(c_x, x), (c_m0, m0)]);
        if d1s.is_empty() {
            return Ok(x_t_);
        }
        let n = x.len();
        Ok((0..n)
            .map(|i| {
                let mut res = c.rhos[0] * d1s[0][i];
                for (rho, d) in c.rhos.iter().zip(&d1s).skip(1) {
                    res += rho * d[i];
                }
                x_t_[i] - c_res * res
            })
            .collect())
    }

    /// `multistep_uni_c_bh_update`.
    fn corrector(&self, index: usize, model_t: &[f32], last_sample: &[f32], order: usize) -> Result<Vec<f32>> {
        let m0 = self.outputs(0).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
        let (at, st) = alpha_sigma(self.sigmas[index]);
        let (as0, ss0) = alpha_sigma(self.sigmas[index - 1]);
        let ls0 = lambda(as0, ss0);
        let h = lambda(at, st) - ls0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s: Vec<Vec<f32>> = Vec::new();
        for i in 1..order {
            let si = index.checked_sub(i + 1).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
            let mi = self.outputs(i).ok_or_else(|| bad_index(CLASS, index, self.timesteps.len()))?;
            let (a, s) = alpha_sigma(self.sigmas[si]);
            let rk = (lambda(a, s) - ls0) / h;
            rks.push(rk);
            d1s.push(mi.iter().zip(m0).map(|(m, z)| (m - z) / rk).collect());
        }
        rks.push(1.0);
        let c = self.coeffs(h, &rks, order, true)?;
        let (c_x, c_m0, c_res) = if self.config.predict_x0 {
            (st / ss0, -(at * c.h_phi_1), at * c.b_h)
        } else {
            (at / as0, -(st * c.h_phi_1), st * c.b_h)
        };
        let x_t_ = lincomb(&[(c_x, last_sample), (c_m0, m0)]);
        let rho_t = *c.rhos.last().unwrap_or(&0.5);
        let n = last_sample.len();
        Ok((0..n)
            .map(|i| {
                let d1_t = model_t[i] - m0[i];
                let corr = if d1s.is_empty() {
                    rho_t * d1_t
                } else {
                    let mut res = c.rhos[0] * d1s[0][i];
                    for (rho, d) in c.rhos[..c.rhos.len() - 1].iter().zip(&d1s).skip(1) {
                        res += rho * d[i];
                    }
                    res + rho_t * d1_t
                };
                x_t_[i] - c_res * corr
            })
            .collect())
    }
}

impl Scheduler for UniPcScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let total = c.num_train_timesteps;
        check_steps(CLASS, n, total)?;
        let raw: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v = spaced_timesteps(Spacing::Linspace { last: (total - 1) as f64, count: n + 1, round: true });
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let mut v = spaced_timesteps(Spacing::Leading { total, count: n + 1, offset: 0 });
                v.pop();
                v.into_iter().map(|t| t + c.steps_offset as f64).collect()
            }
            TimestepSpacing::Trailing => {
                spaced_timesteps(Spacing::Trailing { start: total as f64, total, n, round: true })
            }
        };
        let log_sigmas = log_f32(&self.train_sigmas);
        let in_min = *self.train_sigmas.first().unwrap_or(&0.0) as f64;
        let in_max = *self.train_sigmas.last().unwrap_or(&0.0) as f64;
        let (mut sig64, ts64): (Vec<f64>, Vec<f64>) = if c.use_karras_sigmas || c.use_exponential_sigmas {
            let lo = c.sigma_min.unwrap_or(in_min);
            let hi = c.sigma_max.unwrap_or(in_max);
            let s = if c.use_karras_sigmas { karras_sigmas(lo, hi, n) } else { exponential_sigmas(lo, hi, n) };
            let karras = c.use_karras_sigmas;
            let t: Vec<f64> =
                s.iter().map(|&s| sigma_to_t(s, &log_sigmas)).map(|t| if karras { np_round(t) } else { t }).collect();
            let last = match c.final_sigmas_type {
                FinalSigmasType::SigmaMin => *s.last().unwrap_or(&0.0),
                FinalSigmasType::Zero => 0.0,
            };
            let mut s = s;
            s.push(last);
            (s, t)
        } else {
            let mut s: Vec<f64> = raw.iter().map(|&t| np_interp_arange(to_i64(t) as f64, &self.train_sigmas)).collect();
            let last = match c.final_sigmas_type {
                FinalSigmasType::SigmaMin => {
                    let a0 = self.alphas_cumprod[0];
                    ((1.0 - a0) / a0).sqrt() as f64
                }
                FinalSigmasType::Zero => 0.0,
            };
            s.push(last);
            (s, raw.iter().map(|&t| to_i64(t) as f64).collect())
        };
        self.sigmas = sig64.drain(..).map(|s| s as f32).collect();
        self.timesteps = ts64.iter().map(|&t| to_i64(t) as f32).collect();
        self.model_outputs = vec![None; c.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.this_order = 1;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
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
        _gen: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        let len = self.timesteps.len();
        if len == 0 {
            return Err(not_set(CLASS));
        }
        check_len(CLASS, "model_output", model_output.len(), sample.len())?;
        if index >= len {
            return Err(bad_index(CLASS, index, len));
        }
        if self.model_outputs.iter().flatten().any(|m| m.len() != sample.len())
            || self.last_sample.as_ref().is_some_and(|s| s.len() != sample.len())
        {
            return Err(Error::Shape(format!("{CLASS}: the sample size changed between steps")));
        }
        let use_corrector =
            index > 0 && !self.config.disable_corrector.contains(&(index as i64 - 1)) && self.last_sample.is_some();
        let converted = self.convert(model_output, sample, index);
        let sample = if use_corrector {
            let last = self.last_sample.take().unwrap_or_default();
            self.corrector(index, &converted, &last, self.this_order)?
        } else {
            sample.to_vec()
        };
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(converted);
        }
        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final { order.min(len - index) } else { order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predictor(index, &sample, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], index: usize) -> Vec<f32> {
        let Some(&s) = self.sigmas.get(index.min(self.timesteps.len().saturating_sub(1))) else {
            return original.to_vec();
        };
        let (a, sg) = alpha_sigma(s);
        original.iter().zip(noise).map(|(x, z)| a * x + sg * z).collect()
    }

    fn order(&self) -> usize {
        1
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}
