//! UniPC (diffusers `UniPCMultistepScheduler`): unified predictor-corrector, bh1 / bh2.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::ops::Expr;
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
    schedule: SigmaSchedule,
    model_outputs: ModelOutputs,
    last_sample: Option<Latent>,
    this_order: usize,
}

/// The coefficients UniPC's predictor (`corrector = false`) or corrector builds from `rks`.
struct Coeffs {
    h_phi_1: f32,
    b_h: f32,
    rhos: Vec<f32>,
}

/// What the predictor and the corrector share: `x_t_ = c_x * x + c_m0 * m0`, and the `rhos`
/// and `D1s` of the residual scaled by `c_res`.
struct BhUpdate {
    m0: Expr,
    c_x: f32,
    c_m0: f32,
    c_res: f32,
    rhos: Vec<f32>,
    d1s: Vec<Expr>,
}

impl BhUpdate {
    /// `einsum("k,bkc...->bc...", rhos, D1s)`, over the `D1s`.
    fn residual(&self) -> Expr {
        let mut res = self.rhos[0] * self.d1s[0].clone();
        for (rho, d) in self.rhos.iter().zip(&self.d1s).skip(1) {
            res = res + *rho * d.clone();
        }
        res
    }
}

impl UniPcScheduler {
    pub fn new(config: UniPcConfig) -> Result<Self> {
        let solver_type = match config.solver_type.as_str() {
            "bh1" => UniPcSolverType::Bh1,
            "bh2" | "midpoint" | "heun" | "logrho" => UniPcSolverType::Bh2,
            other => return Err(Error::Model(format!("{CLASS}: solver_type {other:?} is not implemented"))),
        };
        check_solver_order(CLASS, config.solver_order)?;
        check_sigma_flags(CLASS, config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas)?;
        reject_unsupported_sigmas(CLASS, config.use_beta_sigmas, config.use_flow_sigmas, config.use_dynamic_shifting)?;
        if config.solver_p.is_some() {
            return Err(Error::Model(format!("{CLASS}: solver_p is not supported")));
        }
        reject_flow_prediction(CLASS, config.prediction_type)?;
        reject_thresholding(CLASS, config.thresholding)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = SigmaSchedule::new(CLASS, &beta_config!(config), &[])?;
        let model_outputs = ModelOutputs::new(config.solver_order);
        Ok(UniPcScheduler { config, solver_type, schedule, model_outputs, last_sample: None, this_order: 1 })
    }

    /// `UniPCMultistepScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::new(parse_config(CLASS, json, overrides)?)
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &UniPcConfig {
        &self.config
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

    /// The part of the predictor (`corrector = false`: from `sigmas[index]` to
    /// `sigmas[index + 1]`) and the corrector (from `sigmas[index - 1]` to `sigmas[index]`) that
    /// they share.
    fn bh_update<'a>(&'a self, ins: &mut Inputs<'a>, index: usize, order: usize, corrector: bool) -> Result<BhUpdate> {
        let out_of_range = || bad_index(CLASS, index, self.schedule.timesteps.len());
        let m0 = ins.add(self.model_outputs.get(0).ok_or_else(out_of_range)?);
        let (t, s0) =
            if corrector { (index, index.checked_sub(1).ok_or_else(out_of_range)?) } else { (index + 1, index) };
        let sigmas = &self.schedule.sigmas;
        let (at, st) = alpha_sigma(sigmas[t]);
        let (as0, ss0) = alpha_sigma(sigmas[s0]);
        let ls0 = lambda(as0, ss0);
        let h = lambda(at, st) - ls0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::new();
        for i in 1..order {
            let si = s0.checked_sub(i).ok_or_else(out_of_range)?;
            let mi = ins.add(self.model_outputs.get(i).ok_or_else(out_of_range)?);
            let (a, s) = alpha_sigma(sigmas[si]);
            let rk = (lambda(a, s) - ls0) / h;
            rks.push(rk);
            d1s.push((mi - m0.clone()) / rk);
        }
        rks.push(1.0);
        let c = self.coeffs(h, &rks, order, corrector)?;
        let (c_x, c_m0, c_res) = if self.config.predict_x0 {
            (st / ss0, -(at * c.h_phi_1), at * c.b_h)
        } else {
            (at / as0, -(st * c.h_phi_1), st * c.b_h)
        };
        Ok(BhUpdate { m0, c_x, c_m0, c_res, rhos: c.rhos, d1s })
    }

    /// `multistep_uni_p_bh_update`.
    fn predictor(&self, m: LatentMath, index: usize, x: &Latent, order: usize) -> Result<Latent> {
        let mut ins = Inputs::new();
        let xe = ins.add(x);
        let u = self.bh_update(&mut ins, index, order, false)?;
        let x_t_ = Expr::lincomb(vec![(u.c_x, xe), (u.c_m0, u.m0.clone())]);
        if u.d1s.is_empty() {
            return m.eval(&x_t_, &ins);
        }
        m.eval(&(x_t_ - u.c_res * u.residual()), &ins)
    }

    /// `multistep_uni_c_bh_update`.
    fn corrector(&self, m: LatentMath, index: usize, model_t: &Latent, last_sample: &Latent, order: usize) -> Result<Latent> {
        let mut ins = Inputs::new();
        let (mt, last) = (ins.add(model_t), ins.add(last_sample));
        let u = self.bh_update(&mut ins, index, order, true)?;
        let x_t_ = Expr::lincomb(vec![(u.c_x, last), (u.c_m0, u.m0.clone())]);
        let rho_t = *u.rhos.last().unwrap_or(&0.5);
        let d1_t = mt - u.m0.clone();
        let corr = if u.d1s.is_empty() { rho_t * d1_t } else { u.residual() + rho_t * d1_t };
        m.eval(&(x_t_ - u.c_res * corr), &ins)
    }
}

impl Scheduler for UniPcScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let total = c.num_train_timesteps;
        check_steps(CLASS, n, total)?;
        let raw = multistep_timesteps(c.timestep_spacing, total, total, n, c.steps_offset);
        let schedule = &self.schedule;
        let conversion = SigmaConversion::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = if let Some(conversion) = conversion {
            let (sigma_min, sigma_max) = schedule.sigma_range((c.sigma_min, c.sigma_max));
            let (mut sigmas, t) = schedule.convert(conversion, sigma_min, sigma_max, n);
            let t = if conversion == SigmaConversion::Karras { t.into_iter().map(np_round).collect() } else { t };
            // diffusers takes this final sigma_min from the converted schedule, not the training one
            let last = match c.final_sigmas_type {
                FinalSigmasType::SigmaMin => *sigmas.last().unwrap_or(&0.0),
                FinalSigmasType::Zero => 0.0,
            };
            sigmas.push(last);
            (sigmas, t)
        } else {
            let t: Vec<f64> = raw.iter().map(|&t| to_i64(t) as f64).collect();
            let mut sigmas = schedule.interp(&t);
            sigmas.push(schedule.final_sigma(c.final_sigmas_type));
            (sigmas, t)
        };
        self.schedule.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        self.schedule.timesteps = timesteps.iter().map(|&t| to_i64(t) as f32).collect();
        self.model_outputs = ModelOutputs::new(c.solver_order);
        self.last_sample = None;
        self.this_order = 1;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, _gen: &mut TorchGenerator) -> Result<Latent> {
        self.schedule.check_step(index, model_output, sample)?;
        if self.model_outputs.size_differs(sample.len())
            || self.last_sample.as_ref().is_some_and(|s| s.len() != sample.len())
        {
            return Err(Error::Shape(format!("{CLASS}: the sample size changed between steps")));
        }
        let use_corrector =
            index > 0 && !self.config.disable_corrector.contains(&(index as i64 - 1)) && self.last_sample.is_some();
        let c = &self.config;
        let converted = {
            let mut ins = Inputs::new();
            let (x, e) = (ins.add(sample), ins.add(model_output));
            m.eval(&convert_model_output(c.prediction_type, c.predict_x0, self.schedule.sigmas[index], &e, &x), &ins)?
        };
        let sample = match (use_corrector, self.last_sample.take()) {
            (true, Some(last)) => self.corrector(m, index, &converted, &last, self.this_order)?,
            _ => sample.clone(),
        };
        self.model_outputs.push(converted);
        let order = self.config.solver_order;
        let len = self.schedule.timesteps.len();
        let this_order = if self.config.lower_order_final { order.min(len - index) } else { order };
        self.this_order = this_order.min(self.model_outputs.lower_order_nums + 1);
        let prev = self.predictor(m, index, &sample, self.this_order)?;
        self.last_sample = Some(sample);
        self.model_outputs.count_step();
        Ok(prev)
    }

    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        self.schedule.add_noise_alpha_sigma(m, original, noise, index)
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
