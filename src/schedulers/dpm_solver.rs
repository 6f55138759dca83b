//! DPM-Solver / DPM-Solver++ multistep (diffusers `DPMSolverMultistepScheduler`), including the
//! SDE variants and Karras / exponential / Lu lambda schedules.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::ops::Expr;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// diffusers' `algorithm_type` (`deis` is mapped to `dpmsolver++` as diffusers does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpmAlgorithm {
    DpmSolver,
    DpmSolverPp,
    SdeDpmSolver,
    SdeDpmSolverPp,
}

/// diffusers' `solver_type` (`logrho`, `bh1`, `bh2` are mapped to `midpoint` as diffusers does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpmSolverType {
    Midpoint,
    Heun,
}

/// `DPMSolverMultistepScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DpmSolverConfig {
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
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    /// Needs scipy's beta distribution; rejected.
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    /// Flow matching; rejected.
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigmasType,
    pub lambda_min_clipped: f64,
    /// `learned` / `learned_range` (variance channels in the model output); rejected.
    pub variance_type: Option<String>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        DpmSolverConfig {
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
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
        }
    }
}

/// The multistep DPM-Solver(++) of Lu et al. 2022 (DPM++ 2M by default).
#[derive(Clone, Debug)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverConfig,
    algorithm: DpmAlgorithm,
    solver_type: DpmSolverType,
    sigma_bounds: (Option<f64>, Option<f64>),
    schedule: SigmaSchedule,
    lambda_t: Vec<f32>,
    model_outputs: ModelOutputs,
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: DpmSolverConfig) -> Result<Self> {
        Self::with_bounds(config, (None, None))
    }

    fn with_bounds(config: DpmSolverConfig, sigma_bounds: (Option<f64>, Option<f64>)) -> Result<Self> {
        let algorithm = match config.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => DpmAlgorithm::DpmSolverPp,
            "dpmsolver" => DpmAlgorithm::DpmSolver,
            "sde-dpmsolver++" => DpmAlgorithm::SdeDpmSolverPp,
            "sde-dpmsolver" => DpmAlgorithm::SdeDpmSolver,
            other => return Err(Error::Model(format!("{CLASS}: algorithm_type {other:?} is not implemented"))),
        };
        let solver_type = match config.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => DpmSolverType::Midpoint,
            "heun" => DpmSolverType::Heun,
            other => return Err(Error::Model(format!("{CLASS}: solver_type {other:?} is not implemented"))),
        };
        check_solver_order(CLASS, config.solver_order)?;
        if config.solver_order == 3 && algorithm == DpmAlgorithm::SdeDpmSolver {
            return Err(Error::Model(format!("{CLASS}: solver_order 3 is not implemented for sde-dpmsolver")));
        }
        if !matches!(algorithm, DpmAlgorithm::DpmSolverPp | DpmAlgorithm::SdeDpmSolverPp)
            && config.final_sigmas_type == FinalSigmasType::Zero
        {
            return Err(Error::Model(format!(
                "{CLASS}: final_sigmas_type zero is not supported for algorithm_type {}; choose sigma_min",
                config.algorithm_type
            )));
        }
        check_sigma_flags(CLASS, config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas)?;
        reject_unsupported_sigmas(CLASS, config.use_beta_sigmas, config.use_flow_sigmas, config.use_dynamic_shifting)?;
        if config.variance_type.as_deref().is_some_and(|v| v == "learned" || v == "learned_range") {
            return Err(Error::Model(format!("{CLASS}: learned variance_type is not supported")));
        }
        reject_flow_prediction(CLASS, config.prediction_type)?;
        reject_thresholding(CLASS, config.thresholding)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = SigmaSchedule::new(CLASS, &beta_config!(config), &[])?;
        let lambda_t = schedule.alphas_cumprod.iter().map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln()).collect();
        let model_outputs = ModelOutputs::new(config.solver_order);
        Ok(DpmSolverMultistepScheduler {
            config,
            algorithm,
            solver_type,
            sigma_bounds,
            schedule,
            lambda_t,
            model_outputs,
        })
    }

    /// `DPMSolverMultistepScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::with_bounds(parse_config(CLASS, json, overrides)?, config_sigma_bounds(json))
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    fn is_pp(&self) -> bool {
        matches!(self.algorithm, DpmAlgorithm::DpmSolverPp | DpmAlgorithm::SdeDpmSolverPp)
    }

    fn first_order(&self, m0: Expr, index: usize, x: Expr, noise: Option<Expr>) -> Expr {
        let sigmas = &self.schedule.sigmas;
        let (at, st) = alpha_sigma(sigmas[index + 1]);
        let (as_, ss) = alpha_sigma(sigmas[index]);
        let h = lambda(at, st) - lambda(as_, ss);
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => Expr::lincomb(vec![(st / ss, x), (-(at * ((-h).exp() - 1.0)), m0)]),
            (DpmAlgorithm::DpmSolver, _) => Expr::lincomb(vec![(at / as_, x), (-(st * (h.exp() - 1.0)), m0)]),
            (DpmAlgorithm::SdeDpmSolverPp, Some(z)) => {
                let e2 = (-2.0 * h).exp();
                Expr::lincomb(vec![(st / ss * (-h).exp(), x), (at * (1.0 - e2), m0), (st * (1.0 - e2).sqrt(), z)])
            }
            (DpmAlgorithm::SdeDpmSolver, Some(z)) => Expr::lincomb(vec![
                (at / as_, x),
                (-(2.0 * (st * (h.exp() - 1.0))), m0),
                (st * ((2.0 * h).exp() - 1.0).sqrt(), z),
            ]),
            _ => x,
        }
    }

    fn second_order<'a>(&'a self, index: usize, ins: &mut Inputs<'a>, x: Expr, noise: Option<Expr>) -> Expr {
        let (Some(m0), Some(m1)) = (self.model_outputs.get(0), self.model_outputs.get(1)) else {
            return x;
        };
        let (m0, m1) = (ins.add(m0), ins.add(m1));
        let sigmas = &self.schedule.sigmas;
        let (at, st) = alpha_sigma(sigmas[index + 1]);
        let (as0, ss0) = alpha_sigma(sigmas[index]);
        let (as1, ss1) = alpha_sigma(sigmas[index - 1]);
        let (lt, ls0, ls1) = (lambda(at, st), lambda(as0, ss0), lambda(as1, ss1));
        let h = lt - ls0;
        let h0 = ls0 - ls1;
        let r0 = h0 / h;
        let inv_r0 = 1.0 / r0;
        let d1 = inv_r0 * (m0.clone() - m1);
        let d0 = m0;
        let mid = self.solver_type == DpmSolverType::Midpoint;
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => {
                let c = at * ((-h).exp() - 1.0);
                if mid {
                    Expr::lincomb(vec![(st / ss0, x), (-c, d0), (-(0.5 * c), d1)])
                } else {
                    Expr::lincomb(vec![(st / ss0, x), (-c, d0), (at * (((-h).exp() - 1.0) / h + 1.0), d1)])
                }
            }
            (DpmAlgorithm::DpmSolver, _) => {
                let c = st * (h.exp() - 1.0);
                if mid {
                    Expr::lincomb(vec![(at / as0, x), (-c, d0), (-(0.5 * c), d1)])
                } else {
                    Expr::lincomb(vec![(at / as0, x), (-c, d0), (-(st * ((h.exp() - 1.0) / h - 1.0)), d1)])
                }
            }
            (DpmAlgorithm::SdeDpmSolverPp, Some(z)) => {
                let e2 = (-2.0 * h).exp();
                let c = at * (1.0 - e2);
                let cd1 = if mid { 0.5 * c } else { at * ((1.0 - e2) / (-2.0 * h) + 1.0) };
                Expr::lincomb(vec![(st / ss0 * (-h).exp(), x), (c, d0), (cd1, d1), (st * (1.0 - e2).sqrt(), z)])
            }
            (DpmAlgorithm::SdeDpmSolver, Some(z)) => {
                let c = st * (h.exp() - 1.0);
                let cd1 = if mid { -c } else { -(2.0 * (st * ((h.exp() - 1.0) / h - 1.0))) };
                Expr::lincomb(vec![(at / as0, x), (-(2.0 * c), d0), (cd1, d1), (st * ((2.0 * h).exp() - 1.0).sqrt(), z)])
            }
            _ => x,
        }
    }

    fn third_order<'a>(&'a self, index: usize, ins: &mut Inputs<'a>, x: Expr, noise: Option<Expr>) -> Expr {
        let (Some(m0), Some(m1), Some(m2)) =
            (self.model_outputs.get(0), self.model_outputs.get(1), self.model_outputs.get(2))
        else {
            return x;
        };
        let (m0, m1, m2) = (ins.add(m0), ins.add(m1), ins.add(m2));
        let sigmas = &self.schedule.sigmas;
        let (at, st) = alpha_sigma(sigmas[index + 1]);
        let (as0, ss0) = alpha_sigma(sigmas[index]);
        let (as1, ss1) = alpha_sigma(sigmas[index - 1]);
        let (as2, ss2) = alpha_sigma(sigmas[index - 2]);
        let (lt, ls0, ls1, ls2) = (lambda(at, st), lambda(as0, ss0), lambda(as1, ss1), lambda(as2, ss2));
        let h = lt - ls0;
        let (h0, h1) = (ls0 - ls1, ls1 - ls2);
        let (r0, r1) = (h0 / h, h1 / h);
        let (i0, i1) = (1.0 / r0, 1.0 / r1);
        let d1_0 = i0 * (m0.clone() - m1.clone());
        let d1_1 = i1 * (m1 - m2);
        let c1 = r0 / (r0 + r1);
        let c2 = 1.0 / (r0 + r1);
        let d1 = d1_0.clone() + c1 * (&d1_0 - &d1_1);
        let d2 = c2 * (d1_0 - d1_1);
        let d0 = m0;
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => {
                let em = (-h).exp() - 1.0;
                Expr::lincomb(vec![
                    (st / ss0, x),
                    (-(at * em), d0),
                    (at * (em / h + 1.0), d1),
                    (-(at * ((em + h) / (h * h) - 0.5)), d2),
                ])
            }
            (DpmAlgorithm::DpmSolver, _) => {
                let ep = h.exp() - 1.0;
                Expr::lincomb(vec![
                    (at / as0, x),
                    (-(st * ep), d0),
                    (-(st * (ep / h - 1.0)), d1),
                    (-(st * ((ep - h) / (h * h) - 0.5)), d2),
                ])
            }
            (DpmAlgorithm::SdeDpmSolverPp, Some(z)) => {
                let e2 = (-2.0 * h).exp();
                let h2 = 2.0 * h;
                Expr::lincomb(vec![
                    (st / ss0 * (-h).exp(), x),
                    (at * (1.0 - e2), d0),
                    (at * ((1.0 - e2) / (-2.0 * h) + 1.0), d1),
                    (at * ((1.0 - e2 - 2.0 * h) / (h2 * h2) - 0.5), d2),
                    (st * (1.0 - e2).sqrt(), z),
                ])
            }
            _ => x,
        }
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let total = c.num_train_timesteps;
        check_steps(CLASS, n, total)?;
        // clipped_idx = searchsorted(flip(lambda_t), lambda_min_clipped)
        let clipped_idx = self.lambda_t.iter().rev().filter(|&&l| (l as f64) < c.lambda_min_clipped).count();
        let last_timestep = total - clipped_idx;
        if last_timestep == 0 {
            return Err(Error::Model(format!("{CLASS}: lambda_min_clipped leaves no timesteps")));
        }
        let raw = multistep_timesteps(c.timestep_spacing, last_timestep, total, n, c.steps_offset);
        let schedule = &self.schedule;
        let (sigma_min, sigma_max) = schedule.sigma_range(self.sigma_bounds);
        // diffusers rounds the Karras and Lu timesteps, except under the cosine schedule
        let round = |t: Vec<f64>| -> Vec<f64> {
            if c.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                t
            } else {
                t.into_iter().map(np_round).collect()
            }
        };
        let (mut sigmas, timesteps): (Vec<f64>, Vec<f64>) = if c.use_karras_sigmas {
            let (sigmas, t) = schedule.convert(SigmaConversion::Karras, sigma_min, sigma_max, n);
            (sigmas, round(t))
        } else if c.use_lu_lambdas {
            let lmin = *schedule.log_sigmas.first().unwrap_or(&0.0) as f64;
            let lmax = *schedule.log_sigmas.last().unwrap_or(&0.0) as f64;
            let lambdas: Vec<f64> = np_linspace(0.0, 1.0, n, true).iter().map(|r| lmax + r * (lmin - lmax)).collect();
            let sigmas: Vec<f64> = lambdas.iter().map(|l| l.exp()).collect();
            let t = sigmas.iter().map(|&sigma| sigma_to_t(sigma, &schedule.log_sigmas)).collect();
            (sigmas, round(t))
        } else if c.use_exponential_sigmas {
            schedule.convert(SigmaConversion::Exponential, sigma_min, sigma_max, n)
        } else {
            let t: Vec<f64> = raw.iter().map(|&t| to_i64(t) as f64).collect();
            (schedule.interp(&t), t)
        };
        sigmas.push(schedule.final_sigma(c.final_sigmas_type));
        self.schedule.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        self.schedule.timesteps = timesteps.iter().map(|&t| to_i64(t) as f32).collect();
        self.model_outputs = ModelOutputs::new(c.solver_order);
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, gen: &mut TorchGenerator) -> Result<Latent> {
        self.schedule.check_step(index, model_output, sample)?;
        if self.model_outputs.size_differs(sample.len()) {
            return Err(Error::Shape(format!("{CLASS}: the sample size changed between steps")));
        }
        let c = &self.config;
        let len = self.schedule.timesteps.len();
        let lower_order_final = index == len - 1
            && (c.euler_at_final || (c.lower_order_final && len < 15) || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = index + 2 == len && c.lower_order_final && len < 15;
        let converted = {
            let mut ins = Inputs::new();
            let (x, e) = (ins.add(sample), ins.add(model_output));
            m.eval(&convert_model_output(c.prediction_type, self.is_pp(), self.schedule.sigmas[index], &e, &x), &ins)?
        };
        self.model_outputs.push(converted);
        let noise = match self.algorithm {
            DpmAlgorithm::SdeDpmSolver | DpmAlgorithm::SdeDpmSolverPp => Some(m.put(gen.randn(sample.len()))?),
            _ => None,
        };
        let order = self.config.solver_order;
        // Higher orders look back at sigmas[index - 1], [index - 2]: only reachable in order.
        let lower_order_nums = self.model_outputs.lower_order_nums;
        let mut ins = Inputs::new();
        let x = ins.add(sample);
        let z = noise.as_ref().map(|n| ins.add(n));
        let prev = if order == 1 || lower_order_nums < 1 || lower_order_final || index < 1 {
            let m0 = ins.add(self.model_outputs.get(0).unwrap_or(model_output));
            self.first_order(m0, index, x, z)
        } else if order == 2 || lower_order_nums < 2 || lower_order_second || index < 2 {
            self.second_order(index, &mut ins, x, z)
        } else {
            self.third_order(index, &mut ins, x, z)
        };
        let prev = m.eval(&prev, &ins)?;
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
