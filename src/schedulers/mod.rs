//! Diffusion schedulers, numerically matching diffusers 0.42.1.
//!
//! Each scheduler reproduces the arithmetic of its diffusers class operation by operation (float32
//! tensor maths in `f32`, numpy float64 maths in `f64`, the same casts), so a trajectory matches
//! diffusers to about 1e-6 relative; see `tests/schedulers.rs` for the measured tolerances. The
//! schedule (timesteps, sigmas, coefficients) is computed on the CPU; the per-element updates are
//! [`crate::ops::Expr`]essions over [`Latent`]s, evaluated on the CPU ([`LatentMath::Host`]) or as
//! kernels where the latents stay on the device ([`LatentMath::Device`]).
//!
//! ```ignore
//! let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("scheduler_config.json")?)?;
//! let mut sched = schedulers::build(SchedulerKind::DpmPp2mKarras, &cfg)?;
//! sched.set_timesteps(25)?;
//! let mut gen = TorchGenerator::new(seed);
//! let mut x: Vec<f32> = gen.randn(n).iter().map(|v| v * sched.init_noise_sigma()).collect();
//! for i in 0..sched.timesteps().len() {
//!     let input = sched.scale_model_input_host(&x, i)?;
//!     let eps = unet(&input, sched.timesteps()[i]);
//!     x = sched.step_host(&eps, i, &x, &mut gen)?;
//! }
//! ```

mod common;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod heun;
mod latent;
mod lcm;
mod lms;
mod pndm;
mod unipc;

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

pub use common::{BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing};
pub use ddim::{DdimConfig, DdimScheduler};
pub use ddpm::{DdpmConfig, DdpmScheduler, VarianceType};
pub use dpm_solver::{DpmAlgorithm, DpmSolverConfig, DpmSolverMultistepScheduler, DpmSolverType};
pub use euler::{EulerAncestralConfig, EulerAncestralScheduler, EulerConfig, EulerScheduler};
pub use heun::{HeunConfig, HeunScheduler};
pub use latent::{Inputs, Latent, LatentMath};
pub use lcm::{LcmConfig, LcmScheduler};
pub use lms::{LmsConfig, LmsScheduler};
pub use pndm::{PndmConfig, PndmScheduler};
pub use unipc::{UniPcConfig, UniPcScheduler, UniPcSolverType};

use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// A diffusion scheduler, as diffusers' `SchedulerMixin` (candle-like).
///
/// The denoising loop is
/// `for i in 0..timesteps().len() { x = step(&model(scale_model_input(&x, i), timesteps()[i]), i, &x, gen)? }`,
/// with `x` starting as noise times [`Scheduler::init_noise_sigma`]. `index` is the position in
/// [`Scheduler::timesteps`]; multistep schedulers (PNDM, Heun, LMS, DPM-Solver, UniPC) also keep
/// state between steps, so steps must be taken in order `0, 1, 2, ...` after `set_timesteps`
/// (which resets that state), exactly as diffusers pipelines do.
pub trait Scheduler {
    /// diffusers' `set_timesteps(num_inference_steps)`. Resets the multistep state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps the model is called with, as f32 (diffusers' int or float timesteps).
    /// Empty before `set_timesteps`. PNDM gives `n + 1` of them, Heun `2n - 1`.
    fn timesteps(&self) -> &[f32];
    /// The standard deviation of the initial noise (1 for DDPM-style schedulers).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    /// diffusers' `scale_model_input` for the step at `index` into `timesteps()`. An index past
    /// the end is clamped to the last step. Only the k-diffusion style schedulers scale; the
    /// others return the sample as it is.
    fn scale_model_input(&self, _m: LatentMath, sample: &Latent, _index: usize) -> Result<Latent> {
        Ok(sample.clone())
    }
    /// diffusers' `step` at `index` into `timesteps()`: returns `prev_sample`. `gen` draws the
    /// noise of the stochastic schedulers (DDPM, DDIM with eta > 0, Euler ancestral, DPM++ SDE,
    /// LCM), one `randn(sample.len())` per step as diffusers' `randn_tensor` does, on the CPU.
    fn step(&mut self, m: LatentMath, model_output: &Latent, index: usize, sample: &Latent, gen: &mut TorchGenerator) -> Result<Latent>;
    /// diffusers' `add_noise(original, noise, timesteps[index])` (img2img). An index past the end
    /// is clamped to the last step.
    fn add_noise(&self, m: LatentMath, original: &Latent, noise: &Latent, index: usize) -> Result<Latent>;
    /// diffusers' `scheduler.order` (2 for Heun, 1 otherwise, as `SchedulerMixin.order`): model
    /// calls per "step" for progress bars and img2img's `timesteps[t_start * order..]`.
    fn order(&self) -> usize {
        1
    }
    /// The sigma schedule (`len = timesteps().len() + 1`, ending in the final sigma) of
    /// sigma-based schedulers; empty for the alpha-based ones (DDIM, PNDM, DDPM, LCM).
    fn sigmas(&self) -> &[f32] {
        &[]
    }
    /// The training `alphas_cumprod` (float32), for diagnostics and img2img helpers.
    fn alphas_cumprod(&self) -> &[f32];
    /// DDIM's `eta` (0 = deterministic DDIM, 1 = DDPM-like); ignored by other schedulers.
    fn set_eta(&mut self, _eta: f32) {}
    /// The diffusers class this scheduler reproduces, e.g. `"EulerDiscreteScheduler"`.
    fn class_name(&self) -> &'static str;
}

/// The [`Scheduler`] methods on values in CPU memory ([`LatentMath::Host`]).
pub trait SchedulerHost {
    fn scale_model_input_host(&self, sample: &[f32], index: usize) -> Result<Vec<f32>>;
    fn step_host(&mut self, model_output: &[f32], index: usize, sample: &[f32], gen: &mut TorchGenerator) -> Result<Vec<f32>>;
    fn add_noise_host(&self, original: &[f32], noise: &[f32], index: usize) -> Result<Vec<f32>>;
}

impl<S: Scheduler + ?Sized> SchedulerHost for S {
    fn scale_model_input_host(&self, sample: &[f32], index: usize) -> Result<Vec<f32>> {
        self.scale_model_input(LatentMath::Host, &Latent::host(sample.to_vec()), index)?.into_host()
    }
    fn step_host(&mut self, model_output: &[f32], index: usize, sample: &[f32], gen: &mut TorchGenerator) -> Result<Vec<f32>> {
        self.step(LatentMath::Host, &Latent::host(model_output.to_vec()), index, &Latent::host(sample.to_vec()), gen)?.into_host()
    }
    fn add_noise_host(&self, original: &[f32], noise: &[f32], index: usize) -> Result<Vec<f32>> {
        self.add_noise(LatentMath::Host, &Latent::host(original.to_vec()), &Latent::host(noise.to_vec()), index)?.into_host()
    }
}

/// The scheduler choices offered to users, with their CLI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Ddpm,
    Euler,
    EulerAncestral,
    Heun,
    Lms,
    DpmPp2m,
    DpmPp2mKarras,
    DpmPp2mSdeKarras,
    UniPc,
    Lcm,
}

impl SchedulerKind {
    /// Every kind, in the order of [`SchedulerKind::names`].
    pub const ALL: [SchedulerKind; 12] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Heun,
        SchedulerKind::Lms,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::DpmPp2mSdeKarras,
        SchedulerKind::UniPc,
        SchedulerKind::Lcm,
    ];

    /// The CLI name (`ddim`, `euler-a`, `dpmpp-2m-karras`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Lms => "lms",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
            SchedulerKind::DpmPp2mSdeKarras => "dpmpp-2m-sde-karras",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// All CLI names, in the order of [`SchedulerKind::ALL`].
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.name()).collect()
    }

    /// The diffusers class this kind builds.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::DpmPp2mSdeKarras => {
                "DPMSolverMultistepScheduler"
            }
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
        }
    }

    /// The kind for a diffusers class name (a `scheduler_config.json`'s `_class_name`).
    /// `DPMSolverMultistepScheduler` maps to [`SchedulerKind::DpmPp2m`]; use [`default_kind`] to
    /// also read its Karras / SDE settings.
    pub fn from_class_name(class_name: &str) -> Result<Self> {
        Ok(match class_name {
            "DDIMScheduler" => SchedulerKind::Ddim,
            "PNDMScheduler" => SchedulerKind::Pndm,
            "DDPMScheduler" => SchedulerKind::Ddpm,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "HeunDiscreteScheduler" => SchedulerKind::Heun,
            "LMSDiscreteScheduler" => SchedulerKind::Lms,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
            "UniPCMultistepScheduler" => SchedulerKind::UniPc,
            "LCMScheduler" => SchedulerKind::Lcm,
            other => {
                return Err(Error::Model(format!(
                    "scheduler class {other:?} is not supported; supported: DDIMScheduler, PNDMScheduler, \
                     DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, \
                     LMSDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, LCMScheduler \
                     (or pick one with a scheduler name: {})",
                    Self::names().join(" ")
                )))
            }
        })
    }

    /// The `from_config` keyword overrides diffusers users apply for this choice.
    fn overrides(self) -> Vec<(&'static str, Value)> {
        match self {
            SchedulerKind::DpmPp2m => vec![("algorithm_type", "dpmsolver++".into()), ("solver_order", 2.into())],
            SchedulerKind::DpmPp2mKarras => vec![
                ("algorithm_type", "dpmsolver++".into()),
                ("solver_order", 2.into()),
                ("use_karras_sigmas", true.into()),
            ],
            SchedulerKind::DpmPp2mSdeKarras => vec![
                ("algorithm_type", "sde-dpmsolver++".into()),
                ("solver_order", 2.into()),
                ("use_karras_sigmas", true.into()),
            ],
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == t)
            .ok_or_else(|| Error::Input(format!("unknown scheduler {s:?}; valid names: {}", Self::names().join(" "))))
    }
}

/// Builds `kind` from a model's `scheduler_config.json` as diffusers'
/// `SchedulerClass.from_config(pipe.scheduler.config, **overrides)` does: keys the target class
/// does not know are ignored and its defaults fill the rest; the DPM++ kinds set
/// `algorithm_type`, `solver_order = 2` and (Karras kinds) `use_karras_sigmas = true`.
/// Call [`Scheduler::set_timesteps`] before use.
pub fn build(kind: SchedulerKind, scheduler_config: &Value) -> Result<Box<dyn Scheduler>> {
    build_with(kind, scheduler_config, &kind.overrides())
}

/// Like [`build`], with extra `from_config` keyword overrides (e.g. `("timestep_spacing",
/// "trailing".into())`); they win over the config and over the kind's own overrides.
pub fn build_with(
    kind: SchedulerKind,
    scheduler_config: &Value,
    overrides: &[(&str, Value)],
) -> Result<Box<dyn Scheduler>> {
    let mut all = kind.overrides();
    for (k, v) in overrides {
        all.retain(|(a, _)| a != k);
        all.push((k, v.clone()));
    }
    construct(kind, scheduler_config, &all)
}

fn construct(kind: SchedulerKind, c: &Value, overrides: &[(&str, Value)]) -> Result<Box<dyn Scheduler>> {
    let o = overrides;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::from_json(c, o)?),
        SchedulerKind::Pndm => Box::new(PndmScheduler::from_json(c, o)?),
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::from_json(c, o)?),
        SchedulerKind::Euler => Box::new(EulerScheduler::from_json(c, o)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralScheduler::from_json(c, o)?),
        SchedulerKind::Heun => Box::new(HeunScheduler::from_json(c, o)?),
        SchedulerKind::Lms => Box::new(LmsScheduler::from_json(c, o)?),
        SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::DpmPp2mSdeKarras => {
            Box::new(DpmSolverMultistepScheduler::from_json(c, o)?)
        }
        SchedulerKind::UniPc => Box::new(UniPcScheduler::from_json(c, o)?),
        SchedulerKind::Lcm => Box::new(LcmScheduler::from_json(c, o)?),
    })
}

/// The kind a model's `scheduler_config.json` asks for (its `_class_name`; for
/// `DPMSolverMultistepScheduler` also its `use_karras_sigmas` and SDE `algorithm_type`).
pub fn default_kind(scheduler_config: &Value) -> Result<SchedulerKind> {
    let class = scheduler_config
        .get("_class_name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Model("scheduler_config.json has no \"_class_name\"".into()))?;
    let kind = SchedulerKind::from_class_name(class)?;
    if kind == SchedulerKind::DpmPp2m {
        let karras = scheduler_config.get("use_karras_sigmas").and_then(Value::as_bool).unwrap_or(false);
        let sde = scheduler_config.get("algorithm_type").and_then(Value::as_str) == Some("sde-dpmsolver++");
        return Ok(match (karras, sde) {
            (true, true) => SchedulerKind::DpmPp2mSdeKarras,
            (true, false) => SchedulerKind::DpmPp2mKarras,
            _ => SchedulerKind::DpmPp2m,
        });
    }
    Ok(kind)
}

/// The model's own scheduler exactly as its `scheduler_config.json` describes it (the
/// `_class_name` class, no overrides), like diffusers' `pipe.scheduler`.
pub fn build_default(scheduler_config: &Value) -> Result<Box<dyn Scheduler>> {
    construct(default_kind(scheduler_config)?, scheduler_config, &[])
}

/// Parses a `scheduler_config.json` text into the JSON value [`build`] takes and the
/// model's default kind.
pub fn parse_scheduler_config(text: &str) -> Result<(Value, SchedulerKind)> {
    let v: Value = crate::loader::parse_config_json(text.as_bytes())
        .map_err(|e| Error::Model(format!("scheduler_config.json is not valid JSON: {e}")))?;
    let kind = default_kind(&v)?;
    Ok((v, kind))
}
