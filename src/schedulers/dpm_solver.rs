//! DPM-Solver / DPM-Solver++ multistep (diffusers `DPMSolverMultistepScheduler`), including the
//! SDE variants and Karras / exponential / Lu lambda schedules.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::euler::beta_cfg;
use super::Scheduler;
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

/// `(alpha_t, sigma_t) = (1 / sqrt(sigma^2 + 1), sigma * alpha_t)`.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// `log(alpha) - log(sigma)`.
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `c0 * x0 + c1 * x1 + ...`, evaluated left to right like the torch expression.
pub(crate) fn lincomb(terms: &[(f32, &[f32])]) -> Vec<f32> {
    let n = terms.first().map_or(0, |t| t.1.len());
    (0..n)
        .map(|i| {
            let mut acc = terms[0].0 * terms[0].1[i];
            for (c, x) in &terms[1..] {
                acc += c * x[i];
            }
            acc
        })
        .collect()
}

/// The multistep DPM-Solver(++) of Lu et al. 2022 (DPM++ 2M by default).
#[derive(Clone, Debug)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverConfig,
    algorithm: DpmAlgorithm,
    solver_type: DpmSolverType,
    sigma_bounds: (Option<f64>, Option<f64>),
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f32>,
    lambda_t: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
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
        if !(1..=3).contains(&config.solver_order) {
            return Err(Error::Model(format!("{CLASS}: solver_order must be 1, 2 or 3, got {}", config.solver_order)));
        }
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
        if config.variance_type.as_deref().is_some_and(|v| v == "learned" || v == "learned_range") {
            return Err(Error::Model(format!("{CLASS}: learned variance_type is not supported")));
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
        let lambda_t = ac.iter().map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln()).collect();
        let train_sigmas = train_sigmas(&ac);
        let order = config.solver_order;
        Ok(DpmSolverMultistepScheduler {
            config,
            algorithm,
            solver_type,
            sigma_bounds,
            alphas_cumprod: ac,
            train_sigmas,
            lambda_t,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
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

    /// `convert_model_output`: x0 for the ++ algorithms, epsilon otherwise.
    fn convert(&self, model_output: &[f32], sample: &[f32], index: usize) -> Vec<f32> {
        let (a, s) = alpha_sigma(self.sigmas[index]);
        let n = sample.len();
        if self.is_pp() {
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

    fn first_order(&self, m0: &[f32], index: usize, sample: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let (at, st) = alpha_sigma(self.sigmas[index + 1]);
        let (as_, ss) = alpha_sigma(self.sigmas[index]);
        let h = lambda(at, st) - lambda(as_, ss);
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => lincomb(&[(st / ss, sample), (-(at * ((-h).exp() - 1.0)), m0)]),
            (DpmAlgorithm::DpmSolver, _) => lincomb(&[(at / as_, sample), (-(st * (h.exp() - 1.0)), m0)]),
            (DpmAlgorithm::SdeDpmSolverPp, Some(z)) => {
                let e2 = (-2.0 * h).exp();
                lincomb(&[(st / ss * (-h).exp(), sample), (at * (1.0 - e2), m0), (st * (1.0 - e2).sqrt(), z)])
            }
            (DpmAlgorithm::SdeDpmSolver, Some(z)) => lincomb(&[
                (at / as_, sample),
                (-(2.0 * (st * (h.exp() - 1.0))), m0),
                (st * ((2.0 * h).exp() - 1.0).sqrt(), z),
            ]),
            _ => sample.to_vec(),
        }
    }

    fn second_order(&self, index: usize, sample: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let k = self.model_outputs.len();
        let (Some(m0), Some(m1)) = (&self.model_outputs[k - 1], &self.model_outputs[k - 2]) else {
            return sample.to_vec();
        };
        let (at, st) = alpha_sigma(self.sigmas[index + 1]);
        let (as0, ss0) = alpha_sigma(self.sigmas[index]);
        let (as1, ss1) = alpha_sigma(self.sigmas[index - 1]);
        let (lt, ls0, ls1) = (lambda(at, st), lambda(as0, ss0), lambda(as1, ss1));
        let h = lt - ls0;
        let h0 = ls0 - ls1;
        let r0 = h0 / h;
        let inv_r0 = 1.0 / r0;
        let d1: Vec<f32> = m0.iter().zip(m1.iter()).map(|(a, b)| inv_r0 * (a - b)).collect();
        let d0: &[f32] = m0;
        let mid = self.solver_type == DpmSolverType::Midpoint;
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => {
                let c = at * ((-h).exp() - 1.0);
                if mid {
                    lincomb(&[(st / ss0, sample), (-c, d0), (-(0.5 * c), &d1)])
                } else {
                    lincomb(&[(st / ss0, sample), (-c, d0), (at * (((-h).exp() - 1.0) / h + 1.0), &d1)])
                }
            }
            (DpmAlgorithm::DpmSolver, _) => {
                let c = st * (h.exp() - 1.0);
                if mid {
                    lincomb(&[(at / as0, sample), (-c, d0), (-(0.5 * c), &d1)])
                } else {
                    lincomb(&[(at / as0, sample), (-c, d0), (-(st * ((h.exp() - 1.0) / h - 1.0)), &d1)])
                }
            }
            (DpmAlgorithm::SdeDpmSolverPp, Some(z)) => {
                let e2 = (-2.0 * h).exp();
                let c = at * (1.0 - e2);
                let cd1 = if mid { 0.5 * c } else { at * ((1.0 - e2) / (-2.0 * h) + 1.0) };
                lincomb(&[(st / ss0 * (-h).exp(), sample), (c, d0), (cd1, &d1), (st * (1.0 - e2).sqrt(), z)])
            }
            (DpmAlgorithm::SdeDpmSolver, Some(z)) => {
                let c = st * (h.exp() - 1.0);
                let cd1 = if mid { -c } else { -(2.0 * (st * ((h.exp() - 1.0) / h - 1.0))) };
                lincomb(&[(at / as0, sample), (-(2.0 * c), d0), (cd1, &d1), (st * ((2.0 * h).exp() - 1.0).sqrt(), z)])
            }
            _ => sample.to_vec(),
        }
    }

    fn third_order(&self, index: usize, sample: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let k = self.model_outputs.len();
        let (Some(m0), Some(m1), Some(m2)) =
            (&self.model_outputs[k - 1], &self.model_outputs[k - 2], &self.model_outputs[k - 3])
        else {
            return sample.to_vec();
        };
        let (at, st) = alpha_sigma(self.sigmas[index + 1]);
        let (as0, ss0) = alpha_sigma(self.sigmas[index]);
        let (as1, ss1) = alpha_sigma(self.sigmas[index - 1]);
        let (as2, ss2) = alpha_sigma(self.sigmas[index - 2]);
        let (lt, ls0, ls1, ls2) = (lambda(at, st), lambda(as0, ss0), lambda(as1, ss1), lambda(as2, ss2));
        let h = lt - ls0;
        let (h0, h1) = (ls0 - ls1, ls1 - ls2);
        let (r0, r1) = (h0 / h, h1 / h);
        let (i0, i1) = (1.0 / r0, 1.0 / r1);
        let n = sample.len();
        let d1_0: Vec<f32> = (0..n).map(|i| i0 * (m0[i] - m1[i])).collect();
        let d1_1: Vec<f32> = (0..n).map(|i| i1 * (m1[i] - m2[i])).collect();
        let c1 = r0 / (r0 + r1);
        let c2 = 1.0 / (r0 + r1);
        let d1: Vec<f32> = (0..n).map(|i| d1_0[i] + c1 * (d1_0[i] - d1_1[i])).collect();
        let d2: Vec<f32> = (0..n).map(|i| c2 * (d1_0[i] - d1_1[i])).collect();
        let d0: &[f32] = m0;
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => {
                let em = (-h).exp() - 1.0;
                lincomb(&[
                    (st / ss0, sample),
                    (-(at * em), d0),
                    (at * (em / h + 1.0), &d1),
                    (-(at * ((em + h) / (h * h) - 0.5)), &d2),
                ])
            }
            (DpmAlgorithm::DpmSolver, _) => {
                let ep = h.exp() - 1.0;
                lincomb(&[
                    (at / as0, sample),
                    (-(st * ep), d0),
                    (-(st * (ep / h - 1.0)), &d1),
                    (-(st * ((ep - h) / (h * h) - 0.5)), &d2),
                ])
            }
            (DpmAlgorithm::SdeDpmSolverPp, Some(z)) => {
                let e2 = (-2.0 * h).exp();
                let h2 = 2.0 * h;
                lincomb(&[
                    (st / ss0 * (-h).exp(), sample),
                    (at * (1.0 - e2), d0),
                    (at * ((1.0 - e2) / (-2.0 * h) + 1.0), &d1),
                    (at * ((1.0 - e2 - 2.0 * h) / (h2 * h2) - 0.5), &d2),
                    (st * (1.0 - e2).sqrt(), z),
                ])
            }
            _ => sample.to_vec(),
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
        let raw: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v =
                    spaced_timesteps(Spacing::Linspace { last: (last_timestep - 1) as f64, count: n + 1, round: true });
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let mut v = spaced_timesteps(Spacing::Leading { total: last_timestep, count: n + 1, offset: 0 });
                v.pop();
                v.into_iter().map(|t| t + c.steps_offset as f64).collect()
            }
            TimestepSpacing::Trailing => {
                spaced_timesteps(Spacing::Trailing { start: last_timestep as f64, total, n, round: true })
            }
        };
        let log_sigmas = log_f32(&self.train_sigmas);
        let in_min = *self.train_sigmas.first().unwrap_or(&0.0) as f64; // flipped: in_sigmas[-1]
        let in_max = *self.train_sigmas.last().unwrap_or(&0.0) as f64; // in_sigmas[0]
        let round_ts = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let (mut sig64, ts64): (Vec<f64>, Vec<f64>) = if c.use_karras_sigmas {
            let s = karras_sigmas(self.sigma_bounds.0.unwrap_or(in_min), self.sigma_bounds.1.unwrap_or(in_max), n);
            let t =
                s.iter().map(|&s| sigma_to_t(s, &log_sigmas)).map(|t| if round_ts { np_round(t) } else { t }).collect();
            (s, t)
        } else if c.use_lu_lambdas {
            let lmin = *log_sigmas.first().unwrap_or(&0.0) as f64;
            let lmax = *log_sigmas.last().unwrap_or(&0.0) as f64;
            let lambdas: Vec<f64> = np_linspace(0.0, 1.0, n, true).iter().map(|r| lmax + r * (lmin - lmax)).collect();
            let s: Vec<f64> = lambdas.iter().map(|l| l.exp()).collect();
            let t =
                s.iter().map(|&s| sigma_to_t(s, &log_sigmas)).map(|t| if round_ts { np_round(t) } else { t }).collect();
            (s, t)
        } else if c.use_exponential_sigmas {
            let s = exponential_sigmas(self.sigma_bounds.0.unwrap_or(in_min), self.sigma_bounds.1.unwrap_or(in_max), n);
            let t = s.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            (s, t)
        } else {
            let s = raw.iter().map(|&t| np_interp_arange(to_i64(t) as f64, &self.train_sigmas)).collect();
            (s, raw.iter().map(|&t| to_i64(t) as f64).collect())
        };
        let last = match c.final_sigmas_type {
            FinalSigmasType::SigmaMin => {
                let a0 = self.alphas_cumprod[0];
                ((1.0 - a0) / a0).sqrt() as f64
            }
            FinalSigmasType::Zero => 0.0,
        };
        sig64.push(last);
        self.sigmas = sig64.iter().map(|&s| s as f32).collect();
        self.timesteps = ts64.iter().map(|&t| to_i64(t) as f32).collect();
        self.model_outputs = vec![None; c.solver_order];
        self.lower_order_nums = 0;
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
        gen: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        let len = self.timesteps.len();
        if len == 0 {
            return Err(not_set(CLASS));
        }
        check_len(CLASS, "model_output", model_output.len(), sample.len())?;
        if index >= len {
            return Err(bad_index(CLASS, index, len));
        }
        if self.model_outputs.iter().flatten().any(|m| m.len() != sample.len()) {
            return Err(Error::Shape(format!("{CLASS}: the sample size changed between steps")));
        }
        let c = &self.config;
        let lower_order_final = index == len - 1
            && (c.euler_at_final || (c.lower_order_final && len < 15) || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = index + 2 == len && c.lower_order_final && len < 15;
        let converted = self.convert(model_output, sample, index);
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(converted);
        }
        let noise = match self.algorithm {
            DpmAlgorithm::SdeDpmSolver | DpmAlgorithm::SdeDpmSolverPp => Some(gen.randn(sample.len())),
            _ => None,
        };
        let order = self.config.solver_order;
        // Higher orders look back at sigmas[index - 1], [index - 2]: only reachable in order.
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final || index < 1 {
            let m0 = self.model_outputs.last().and_then(|m| m.as_deref()).unwrap_or(model_output);
            self.first_order(m0, index, sample, noise.as_deref())
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second || index < 2 {
            self.second_order(index, sample, noise.as_deref())
        } else {
            self.third_order(index, sample, noise.as_deref())
        };
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
