//! LMS (diffusers `LMSDiscreteScheduler`): linear multistep on the probability-flow ODE, up to
//! order 4. The integration coefficients diffusers gets from `scipy.integrate.quad` come from
//! the same 21-point Gauss-Kronrod rule QUADPACK applies first (and, the integrand being a
//! polynomial of degree <= 3, accepts at once), with the integrand evaluated in f32 as
//! diffusers' torch scalars do.

use serde::Deserialize;
use serde_json::Value;

use super::common::*;
use super::{Inputs, Latent, LatentMath, Scheduler};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

const CLASS: &str = "LMSDiscreteScheduler";
const MAX_ORDER: usize = 4;

/// `LMSDiscreteScheduler`'s config keys and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LmsConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    /// Needs scipy's beta distribution; rejected.
    pub use_beta_sigmas: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl Default for LmsConfig {
    fn default() -> Self {
        LmsConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

/// Linear multistep (k-diffusion `sample_lms`, order 4).
#[derive(Clone, Debug)]
pub struct LmsScheduler {
    config: LmsConfig,
    sigma_bounds: (Option<f64>, Option<f64>),
    schedule: SigmaSchedule,
    derivatives: Vec<Latent>,
}

impl LmsScheduler {
    pub fn new(config: LmsConfig) -> Result<Self> {
        Self::with_bounds(config, (None, None))
    }

    fn with_bounds(config: LmsConfig, sigma_bounds: (Option<f64>, Option<f64>)) -> Result<Self> {
        reject_beta_sigmas(CLASS, config.use_beta_sigmas)?;
        check_sigma_flags(CLASS, config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas)?;
        reject_flow_prediction(CLASS, config.prediction_type)?;
        check_offset(CLASS, config.steps_offset, config.num_train_timesteps)?;
        let schedule = SigmaSchedule::new(CLASS, &beta_config!(config, false), &[])?.with_training_sigmas();
        Ok(LmsScheduler { config, sigma_bounds, schedule, derivatives: Vec::new() })
    }

    /// `LMSDiscreteScheduler.from_config(json, **overrides)`.
    pub fn from_json(json: &Value, overrides: &[(&str, Value)]) -> Result<Self> {
        Self::with_bounds(parse_config(CLASS, json, overrides)?, config_sigma_bounds(json))
    }

    /// The config this scheduler was built with.
    pub fn config(&self) -> &LmsConfig {
        &self.config
    }

    /// `get_lms_coefficient(order, t, current_order)`.
    fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = &self.schedule.sigmas;
        let f = |tau: f64| -> f64 {
            let tau32 = tau as f32;
            let mut prod = 1.0f32;
            for k in 0..order {
                if k == current {
                    continue;
                }
                prod *= (tau32 - s[t - k]) / (s[t - current] - s[t - k]);
            }
            prod as f64
        };
        gauss_kronrod_21(f, s[t] as f64, s[t + 1] as f64)
    }
}

/// QUADPACK's `dqk21`: the 21-point Gauss-Kronrod estimate of the integral of `f` over `[a, b]`.
#[allow(clippy::excessive_precision)] // QUADPACK's constants, verbatim
fn gauss_kronrod_21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const XGK: [f64; 11] = [
        0.995657163025808080735527280689003,
        0.973906528517171720077964012084452,
        0.930157491355708226001207180059508,
        0.865063366688984510732096688423493,
        0.780817726586416897063717578345042,
        0.679409568299024406234327365114874,
        0.562757134668604683339000099272694,
        0.433395394129247190799265943165784,
        0.294392862701460198131126603103866,
        0.148874338981631210884826001129720,
        0.000000000000000000000000000000000,
    ];
    const WGK: [f64; 11] = [
        0.011694638867371874278064396062192,
        0.032558162307964727478818972459390,
        0.054755896574351996031381300244580,
        0.075039674810919952767043140916190,
        0.093125454583697605535065465083366,
        0.109387158802297641899210590325805,
        0.123491976262065851077958109831074,
        0.134709217311473325928054001771707,
        0.142775938577060080797094273138717,
        0.147739104901338491374841515972068,
        0.149445554002916905664936468389821,
    ];
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let fc = f(centr);
    let mut resk = WGK[10] * fc;
    // Gauss points (even 1-based indices) first, then the Kronrod extension points, as dqk21.
    for j in 1..=5 {
        let jtw = 2 * j - 1; // 0-based index of xgk(2j)
        let absc = hlgth * XGK[jtw];
        let fsum = f(centr - absc) + f(centr + absc);
        resk += WGK[jtw] * fsum;
    }
    for j in 1..=5 {
        let jtwm1 = 2 * j - 2; // 0-based index of xgk(2j-1)
        let absc = hlgth * XGK[jtwm1];
        let fsum = f(centr - absc) + f(centr + absc);
        resk += WGK[jtwm1] * fsum;
    }
    resk * hlgth
}

impl Scheduler for LmsScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        check_steps(CLASS, n, c.num_train_timesteps)?;
        let conversion = SigmaConversion::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        // LMS's own _convert_to_karras ignores config sigma_min / sigma_max
        let bounds = if c.use_karras_sigmas { (None, None) } else { self.sigma_bounds };
        let (mut sig64, ts64) = self.schedule.k_sigmas(c.timestep_spacing, n, c.steps_offset, conversion, bounds);
        sig64.push(0.0);
        self.schedule.sigmas = sig64.iter().map(|&v| v as f32).collect();
        self.schedule.timesteps = ts64.iter().map(|&t| t as f32).collect();
        self.derivatives.clear();
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
        if self.derivatives.iter().any(|d| d.len() != sample.len()) {
            return Err(Error::Shape(format!("{CLASS}: the sample size changed between steps")));
        }
        let sigma = self.schedule.sigmas[index];
        let mut ins = Inputs::new();
        let (x, e) = (ins.add(sample), ins.add(model_output));
        let x0 = sigma_pred_original_sample(self.config.prediction_type, sigma, &x, &e)?;
        let derivative = m.eval(&((x - x0) / sigma), &ins)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > MAX_ORDER {
            self.derivatives.remove(0);
        }
        let order = (index + 1).min(MAX_ORDER);
        let coeffs: Vec<f32> = (0..order).map(|k| self.lms_coefficient(order, index, k) as f32).collect();
        let mut ins = Inputs::new();
        let x = ins.add(sample);
        let mut acc: Option<crate::ops::Expr> = None;
        for (&c, d) in coeffs.iter().zip(self.derivatives.iter().rev()) {
            let d = ins.add(d);
            acc = Some(match acc {
                None => c * d,
                Some(a) => a + c * d,
            });
        }
        match acc {
            Some(a) => m.eval(&(x + a), &ins),
            None => Ok(sample.clone()),
        }
    }

    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent> {
        self.schedule.add_noise(m, original, noise, index)
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
