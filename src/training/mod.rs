//! Training diffusion models on the user's device: a UNet recorded on the autograd [`Tape`],
//! AdamW with gradient clipping and an EMA of the weights, the DDPM noising objective (epsilon
//! or v), and checkpoints in diffusers' layout (see [`checkpoint`]).
//!
//! One step, as diffusers' training scripts take it: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε for a random
//! timestep per item, the UNet predicts ε (or v = √ᾱ_t ε - √(1-ᾱ_t) x_0) from
//! `cat([x_t, condition])`, the loss is their mean squared error; the condition is zeroed with
//! probability `cond_dropout` so the model also learns the unconditional prediction that
//! classifier-free guidance needs.

pub mod checkpoint;
mod layers;
pub mod lora;
pub mod lora_run;
pub mod pairs;
pub mod run;
pub mod unet_2d;
mod unet_body;
pub mod unet_2d_condition;

use std::collections::BTreeMap;

use crate::autograd::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::safetensors::{header_len, parse_header, serialize, FileDType, OutTensor};
use crate::ops::{self, Expr, ExprInput, IndexMap};
use crate::rng::TorchGenerator;
pub use layers::LoraConfig;
pub use unet_2d::UNet2DTrainable;
pub use unet_2d_condition::UNet2DConditionTrainable;

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// torch's default for linear and convolution layers: uniform in ±1/√fan_in.
    Uniform { fan_in: usize },
    /// Normal with this standard deviation (PEFT's "gaussian" LoRA A).
    Normal { std: f32 },
    Ones,
    Zeros,
}

/// A parameter's diffusers name, shape and initialisation.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Fresh parameter values from `seed` (each parameter from its own stream, so adding one does
/// not change the others).
pub fn init_values(specs: &[ParamSpec], seed: u64) -> Vec<Vec<f32>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| match s.init {
            Init::Ones => vec![1.0; s.numel()],
            Init::Zeros => vec![0.0; s.numel()],
            Init::Uniform { fan_in } => {
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                let mut rng = TorchGenerator::new(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
                rng.rand(s.numel()).into_iter().map(|u| (2.0 * u - 1.0) * bound).collect()
            }
            Init::Normal { std } => {
                let mut rng = TorchGenerator::new(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
                rng.randn(s.numel()).into_iter().map(|z| z * std).collect()
            }
        })
        .collect()
}

/// The values of `specs` read from a safetensors file (any float type), checking every name and
/// shape; `what` names the file in messages.
pub fn values_from_safetensors(specs: &[ParamSpec], bytes: &[u8], what: &str) -> Result<Vec<Vec<f32>>> {
    let n = header_len(bytes, bytes.len() as u64, what)? as usize;
    let header = parse_header(&bytes[8..8 + n], bytes.len() as u64, what)?;
    specs
        .iter()
        .map(|s| {
            let e = header.tensors.get(&s.name).ok_or_else(|| Error::Model(format!("{what} has no tensor {} (is it a checkpoint of this model config?)", s.name)))?;
            if e.shape != s.shape || !e.dtype.is_float() {
                return Err(Error::Model(format!("{what}: {} is {} {:?}, the model needs a float {:?}", s.name, e.dtype.name(), e.shape, s.shape)));
            }
            Ok(e.dtype.to_f32(&bytes[e.start as usize..(e.start + e.len) as usize]))
        })
        .collect()
}

/// A safetensors file of `values` under `specs`' names, in `dtype` (f32 or f16).
pub fn safetensors_bytes(specs: &[ParamSpec], values: &[Vec<f32>], dtype: FileDType, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let tensors = specs
        .iter()
        .zip(values)
        .map(|(s, v)| {
            let bytes = match dtype {
                FileDType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                FileDType::F32 => bytemuck::cast_slice(v).to_vec(),
                other => return Err(Error::Unsupported(format!("saving weights as {}", other.name()))),
            };
            Ok(OutTensor { name: s.name.clone(), dtype, shape: s.shape.clone(), bytes })
        })
        .collect::<Result<Vec<_>>>()?;
    serialize(&tensors, metadata)
}

/// diffusers' `EMAModel` (no warm-up): update k (from 1) uses decay 0 for k = 1 (the average
/// starts at the trained weights) and min(decay, k / (9 + k)) after, shadow ← shadow -
/// (1 - decay_k)(shadow - p).
pub struct Ema {
    pub decay: f32,
    pub updates: u32,
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at `params`.
    pub fn new(gpu: &Gpu, decay: f32, params: &[Tensor]) -> Result<Self> {
        let shadow = params.iter().map(|p| ops::scale(gpu, p, 1.0, 0.0)).collect::<Result<_>>()?;
        Ok(Self { decay, updates: 0, shadow })
    }

    /// The decay the next update uses.
    pub fn next_decay(&self) -> f32 {
        // diffusers: step = optimization_step - 1; 0 at the first update.
        let step = self.updates as f32;
        if step == 0.0 { 0.0 } else { self.decay.min((1.0 + step) / (10.0 + step)) }
    }

    /// Moves the average towards `params`.
    pub fn update(&mut self, gpu: &Gpu, params: &[Tensor]) -> Result<()> {
        let one_minus = 1.0 - self.next_decay();
        self.updates += 1;
        for (s, p) in self.shadow.iter_mut().zip(params) {
            let n = p.numel();
            let ins = [ExprInput { tensor: s, map: IndexMap::same(n) }, ExprInput { tensor: p, map: IndexMap::same(n) }];
            *s = ops::expr(gpu, &(Expr::input(0) - one_minus * (Expr::input(0) - Expr::input(1))), &ins, p.shape(), DType::F32)?;
        }
        Ok(())
    }
}

/// What the UNet learns to predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// The noise ε (diffusers' `prediction_type: epsilon`).
    Epsilon,
    /// v = √ᾱ ε - √(1-ᾱ) x_0 (`v_prediction`).
    #[serde(rename = "v_prediction")]
    V,
}

/// The settings of a training run (saved with its checkpoints).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub steps: u32,
    pub batch: usize,
    pub lr: f32,
    pub weight_decay: f32,
    /// Gradients are clipped to this global norm.
    pub max_grad_norm: f32,
    pub objective: Objective,
    /// Probability of training an item without its condition.
    pub cond_dropout: f32,
    /// EMA decay; `None`: no EMA (the saved weights are the trained ones).
    pub ema_decay: Option<f32>,
    pub seed: u64,
    /// Recompute block activations in the backward pass (less memory, about a third more time).
    pub gradient_checkpointing: bool,
    /// Matrix products and convolutions in f16 with f32 master weights, normalisations, softmax
    /// and the loss in f32, and a dynamically scaled loss (torch's autocast + `GradScaler`); needs
    /// an adapter with shader-f16.
    pub mixed_precision: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { steps: 1000, batch: 4, lr: 1e-4, weight_decay: 1e-2, max_grad_norm: 1.0, objective: Objective::Epsilon, cond_dropout: 0.1, ema_decay: Some(0.999), seed: 0, gradient_checkpointing: false, mixed_precision: false }
    }
}

impl TrainConfig {
    /// Rejects settings that cannot train, saying which.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Input(format!("training setting {what}")));
        if self.batch == 0 || self.batch > 256 {
            return bad(format!("batch {} must be 1 to 256", self.batch));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be a positive number", self.lr));
        }
        if !(0.0..=1.0).contains(&self.cond_dropout) {
            return bad(format!("cond_dropout {} must be between 0 and 1", self.cond_dropout));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 || self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("max_grad_norm must be positive and weight_decay not negative".into());
        }
        if self.ema_decay.is_some_and(|d| !(0.0..1.0).contains(&d)) {
            return bad("ema_decay must be in [0, 1)".into());
        }
        Ok(())
    }
}

/// One step's inputs: clean latents, condition channels, timesteps, noise and which items keep
/// their condition.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, C, h, w]`.
    pub x0: Vec<f32>,
    /// `[B, Cc, h, w]`.
    pub cond: Vec<f32>,
    pub timesteps: Vec<u32>,
    pub noise: Vec<f32>,
    pub keep_cond: Vec<bool>,
}

/// What a step measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// The gradients' global norm before clipping (infinite or NaN when a mixed-precision step
    /// overflowed and was skipped).
    pub grad_norm: f32,
}

/// torch's `GradScaler`: the loss is multiplied by `scale` before the backward pass so that small
/// f16 gradients do not flush to zero; a step whose gradients overflow is skipped and halves the
/// scale, and every `growth_interval` good steps double it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    /// Good steps since the scale last changed.
    pub growth_tracker: u32,
}

impl LossScaler {
    /// torch's defaults: 2^16, ×2 every 2000 good steps, ×0.5 on overflow.
    const INIT: f32 = 65536.0;
    const GROWTH_INTERVAL: u32 = 2000;

    pub fn new() -> Self {
        Self { scale: Self::INIT, growth_tracker: 0 }
    }

    /// Records a step: `overflowed` when its gradients were not finite.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale *= 0.5;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.growth_tracker = 0;
            }
        }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new()
    }
}

/// The tensors a run trains (all of a UNet's, or a LoRA's factors), their AdamW state and EMA.
pub struct Optimised {
    /// Names and shapes of [`Self::params`].
    pub specs: Vec<ParamSpec>,
    pub params: Vec<Tensor>,
    pub optimizer: AdamW,
    pub ema: Option<Ema>,
    /// Under mixed precision.
    pub scaler: Option<LossScaler>,
    max_grad_norm: f32,
}

impl Optimised {
    /// Starts from `values` (one per spec) with `config`'s optimiser and EMA.
    pub fn new(gpu: &Gpu, specs: Vec<ParamSpec>, values: &[Vec<f32>], config: &TrainConfig) -> Result<Self> {
        if values.len() != specs.len() {
            return Err(Error::Shape(format!("{} values for {} trained tensors", values.len(), specs.len())));
        }
        if config.mixed_precision && !gpu.supports(DType::F16) {
            return Err(Error::Unsupported(format!("mixed precision needs f16 kernels (shader-f16), which {} does not have; train in f32", gpu.summary().name)));
        }
        let params = specs.iter().zip(values).map(|(s, v)| gpu.upload(&s.shape, DType::F32, v)).collect::<Result<Vec<_>>>()?;
        let adam = AdamWConfig { lr: config.lr, weight_decay: config.weight_decay, ..Default::default() };
        let optimizer = AdamW::new(adam, params.len());
        let ema = config.ema_decay.map(|d| Ema::new(gpu, d, &params)).transpose()?;
        let scaler = config.mixed_precision.then(LossScaler::new);
        Ok(Self { specs, params, optimizer, ema, scaler, max_grad_norm: config.max_grad_norm })
    }

    /// What the loss is multiplied by before the backward pass (1 without mixed precision).
    pub fn loss_scale(&self) -> f32 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// Clipping, AdamW and the EMA with `grads` (one per parameter, of the loss times
    /// [`Self::loss_scale`]); then reads back the step's `loss` and the gradients' norm. Under
    /// mixed precision a step whose gradients overflowed changes nothing but the scale.
    pub async fn apply(&mut self, gpu: &Gpu, loss: &Tensor, mut grads: Vec<Tensor>) -> Result<StepStats> {
        let read = |norm: &Tensor| {
            let stats = norm.reshape(&[1]).and_then(|n| ops::concat(gpu, &[loss, &n], 0));
            async move { gpu.read(&stats?).await }
        };
        let finite_loss = |stats: &[f32], step: u32| {
            if stats[0].is_finite() {
                Ok(StepStats { loss: stats[0], grad_norm: stats[1] })
            } else {
                Err(Error::Model(format!("the training loss became {} at step {step}; lower the learning rate", stats[0])))
            }
        };
        if let Some(scaler) = self.scaler {
            let unscale = 1.0 / scaler.scale;
            grads = grads.iter().map(|g| ops::scale(gpu, g, unscale, 0.0)).collect::<Result<_>>()?;
        }
        let norm = clip_grad_norm(gpu, &mut grads, self.max_grad_norm)?;
        // Under mixed precision the norm decides whether the step happens: read it first.
        let early = match &mut self.scaler {
            Some(scaler) => {
                let stats = read(&norm).await?;
                scaler.update(!stats[1].is_finite());
                if !stats[1].is_finite() {
                    return finite_loss(&stats, self.optimizer.steps);
                }
                Some(stats)
            }
            None => None,
        };
        let grad_refs: Vec<Option<&Tensor>> = grads.iter().map(Some).collect();
        self.optimizer.step(gpu, &mut self.params, &grad_refs)?;
        if let Some(ema) = &mut self.ema {
            ema.update(gpu, &self.params)?;
        }
        let stats = match early {
            Some(s) => s,
            None => read(&norm).await?,
        };
        finite_loss(&stats, self.optimizer.steps)
    }

    /// The tape a step records on: f32, or f16 products under mixed precision.
    pub fn tape<'g>(&self, gpu: &'g Gpu) -> Result<Tape<'g>> {
        Tape::with_compute(gpu, if self.scaler.is_some() { DType::F16 } else { DType::F32 })
    }

    /// The gradients of the one-element `loss` (f32) for `params`' variables, scaled by
    /// [`Self::loss_scale`].
    pub fn backward(&self, tape: &Tape, loss: Var, params: &[Var], names: &[ParamSpec]) -> Result<Vec<Tensor>> {
        let seed = tape.gpu().upload(&[1], DType::F32, &[self.loss_scale()])?;
        let grads = tape.backward_from(loss, seed)?;
        params
            .iter()
            .zip(names)
            .map(|(v, s)| grads.get(*v).cloned().ok_or_else(|| Error::Model(format!("parameter {} got no gradient (a bug in ldm-web)", s.name))))
            .collect()
    }

    /// The weights to save or sample with: the EMA's when there is one.
    pub fn inference_params(&self) -> &[Tensor] {
        self.ema.as_ref().map_or(&self.params, |e| &e.shadow)
    }
}

/// The noisy latents x_t and the regression target of one item at noise level `alpha_cumprod`,
/// as diffusers' `DDPMScheduler.add_noise` / `get_velocity` compute them in f32.
fn noised(alpha_cumprod: f32, objective: Objective, x0: &[f32], eps: &[f32], input: &mut Vec<f32>, target: &mut Vec<f32>) {
    let (sa, sb) = (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
    input.extend(x0.iter().zip(eps).map(|(x, e)| sa * x + sb * e));
    match objective {
        Objective::Epsilon => target.extend_from_slice(eps),
        Objective::V => target.extend(x0.iter().zip(eps).map(|(x, e)| sa * e - sb * x)),
    }
}

/// ᾱ_t from a schedule, or the error for a timestep past it.
fn alpha_cumprod(schedule: &[f32], t: u32) -> Result<f32> {
    schedule.get(t as usize).copied().ok_or_else(|| Error::Input(format!("timestep {t} is past the schedule's {}", schedule.len())))
}

/// A concatenation-conditioned UNet2DModel being trained: its weights, optimiser and EMA.
pub struct Trainer {
    pub unet: UNet2DTrainable,
    pub config: TrainConfig,
    pub trained: Optimised,
    alphas_cumprod: Vec<f32>,
    /// `[C, h, w]` of the latents and the condition's channels.
    pub latent_shape: [usize; 3],
    pub cond_channels: usize,
}

impl Trainer {
    /// A trainer starting from `values` (in [`UNet2DTrainable::params`] order).
    pub fn new(gpu: &Gpu, mut unet: UNet2DTrainable, config: TrainConfig, values: &[Vec<f32>], alphas_cumprod: Vec<f32>, latent_shape: [usize; 3], cond_channels: usize) -> Result<Self> {
        config.validate()?;
        let specs = unet.params();
        if values.len() != specs.len() {
            return Err(Error::Shape(format!("{} parameter values for a UNet of {}", values.len(), specs.len())));
        }
        if latent_shape[0] + cond_channels != unet.config.in_channels || latent_shape[0] != unet.config.out_channels {
            return Err(Error::Model(format!(
                "the UNet takes {} channels and predicts {}; the latents have {} and the condition {cond_channels}",
                unet.config.in_channels, unet.config.out_channels, latent_shape[0]
            )));
        }
        let trained = Optimised::new(gpu, specs.to_vec(), values, &config)?;
        unet.set_gradient_checkpointing(config.gradient_checkpointing);
        Ok(Self { unet, config, trained, alphas_cumprod, latent_shape, cond_channels })
    }

    /// Training timesteps (`num_train_timesteps`).
    pub fn train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The UNet's input `cat([x_t, condition])` and the regression target, computed as diffusers'
    /// `DDPMScheduler.add_noise` / `get_velocity` do in f32.
    pub fn inputs_and_target(&self, b: &Batch) -> Result<(Vec<f32>, Vec<f32>)> {
        let [c, h, w] = self.latent_shape;
        let (plane, cc) = (h * w, self.cond_channels);
        let n = b.timesteps.len();
        if b.x0.len() != n * c * plane || b.noise.len() != b.x0.len() || b.cond.len() != n * cc * plane || b.keep_cond.len() != n {
            return Err(Error::Shape(format!("a training batch of {n} items has {} latent, {} noise and {} condition values", b.x0.len(), b.noise.len(), b.cond.len())));
        }
        let mut input = Vec::with_capacity(n * (c + cc) * plane);
        let mut target = Vec::with_capacity(n * c * plane);
        for i in 0..n {
            let acp = alpha_cumprod(&self.alphas_cumprod, b.timesteps[i])?;
            let range = i * c * plane..(i + 1) * c * plane;
            noised(acp, self.config.objective, &b.x0[range.clone()], &b.noise[range], &mut input, &mut target);
            let cond = &b.cond[i * cc * plane..(i + 1) * cc * plane];
            if b.keep_cond[i] {
                input.extend_from_slice(cond);
            } else {
                input.extend(std::iter::repeat_n(0.0, cond.len()));
            }
        }
        Ok((input, target))
    }

    /// The loss of `batch` (a one-element tensor) and its gradient for every parameter.
    pub fn loss_and_gradients(&self, gpu: &Gpu, batch: &Batch) -> Result<(Tensor, Vec<Tensor>)> {
        let [c, h, w] = self.latent_shape;
        let n = batch.timesteps.len();
        let (input, target) = self.inputs_and_target(batch)?;
        let mut tape = self.trained.tape(gpu)?;
        let vars = self.trained.params.iter().map(|p| tape.param(p.clone())).collect::<Result<Vec<_>>>()?;
        let x = tape.constant(gpu.upload(&[n, c + self.cond_channels, h, w], DType::F32, &input)?)?;
        let t: Vec<f32> = batch.timesteps.iter().map(|&t| t as f32).collect();
        let pred = self.unet.forward(&mut tape, &vars, x, &t)?;
        let pred = tape.cast(pred, DType::F32)?;
        let target = tape.constant(gpu.upload(&[n, c, h, w], DType::F32, &target)?)?;
        let loss = tape.mse_loss(pred, target)?;
        let grads = self.trained.backward(&tape, loss, &vars, self.unet.params())?;
        Ok((tape.value(loss).clone(), grads))
    }

    /// One optimisation step on `batch`: forward, backward, clipping, AdamW, EMA.
    pub async fn step(&mut self, gpu: &Gpu, batch: &Batch) -> Result<StepStats> {
        let (loss, grads) = self.loss_and_gradients(gpu, batch)?;
        self.trained.apply(gpu, &loss, grads).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{component_files, DirSource, Weights};
    use crate::models::unet_2d::{UNet2DConfig, UNet2DModel};
    use crate::schedulers::{DdpmConfig, DdpmScheduler};

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/training");

    pub(super) use crate::gpu::test_devices as devices;

    /// torch's run (scripts/training_fixtures.py).
    #[derive(serde::Deserialize)]
    struct Run {
        lr: f32,
        weight_decay: f32,
        max_grad_norm: f32,
        ema_decay: f32,
        schedule: serde_json::Value,
        latent: usize,
        cond: usize,
        side: usize,
        pairs: usize,
        gradients: OneBatch,
        steps: Vec<Step>,
    }

    #[derive(serde::Deserialize)]
    struct OneBatch {
        items: Vec<usize>,
        timesteps: Vec<u32>,
        noise_seed: u64,
        keep_cond: Vec<bool>,
        loss: f32,
    }

    #[derive(serde::Deserialize)]
    struct Step {
        items: Vec<usize>,
        timesteps: Vec<u32>,
        keep_cond: Vec<bool>,
        loss: f32,
        grad_norm: f32,
    }

    struct Fixture {
        run: Run,
        tensors: Vec<u8>,
        config: UNet2DConfig,
        init: Vec<Vec<f32>>,
        alphas_cumprod: Vec<f32>,
    }

    impl Fixture {
        fn load() -> Self {
            let run: Run = serde_json::from_slice(&std::fs::read(format!("{DIR}/run.json")).unwrap()).unwrap();
            let config: UNet2DConfig = serde_json::from_slice(&std::fs::read(format!("{DIR}/unet/config.json")).unwrap()).unwrap();
            let unet = UNet2DTrainable::new(config.clone()).unwrap();
            let init = values_from_safetensors(unet.params(), &std::fs::read(format!("{DIR}/unet/diffusion_pytorch_model.safetensors")).unwrap(), "init").unwrap();
            let schedule: DdpmConfig = serde_json::from_value(run.schedule.clone()).unwrap();
            let alphas_cumprod = DdpmScheduler::new(schedule).unwrap().alphas_cumprod().to_vec();
            Self { run, tensors: std::fs::read(format!("{DIR}/run.safetensors")).unwrap(), config, init, alphas_cumprod }
        }

        fn tensor(&self, name: &str, shape: &[usize]) -> Vec<f32> {
            let spec = ParamSpec { name: name.into(), shape: shape.to_vec(), init: Init::Zeros };
            values_from_safetensors(&[spec], &self.tensors, "run.safetensors").unwrap().remove(0)
        }

        fn trainer(&self, gpu: &Gpu, config: TrainConfig) -> Trainer {
            let r = &self.run;
            Trainer::new(gpu, UNet2DTrainable::new(self.config.clone()).unwrap(), config, &self.init, self.alphas_cumprod.clone(), [r.latent, r.side, r.side], r.cond).unwrap()
        }

        fn batch(&self, items: &[usize], timesteps: &[u32], keep_cond: &[bool], noise_seed: u64) -> Batch {
            let r = &self.run;
            let (x0, cond) = (self.tensor("x0", &[r.pairs, r.latent, r.side, r.side]), self.tensor("cond", &[r.pairs, r.cond, r.side, r.side]));
            let (nl, nc) = (r.latent * r.side * r.side, r.cond * r.side * r.side);
            Batch {
                x0: items.iter().flat_map(|&i| x0[i * nl..(i + 1) * nl].to_vec()).collect(),
                cond: items.iter().flat_map(|&i| cond[i * nc..(i + 1) * nc].to_vec()).collect(),
                timesteps: timesteps.to_vec(),
                noise: TorchGenerator::new(noise_seed).randn(items.len() * nl),
                keep_cond: keep_cond.to_vec(),
            }
        }

        fn run_config(&self, objective: Objective) -> TrainConfig {
            let r = &self.run;
            TrainConfig { steps: r.steps.len() as u32, batch: 2, lr: r.lr, weight_decay: r.weight_decay, max_grad_norm: r.max_grad_norm, objective, cond_dropout: 0.0, ema_decay: Some(r.ema_decay), seed: 0, gradient_checkpointing: false, mixed_precision: false }
        }
    }

    fn fx_names(fx: &Fixture) -> Vec<String> {
        UNet2DTrainable::new(fx.config.clone()).unwrap().params().iter().map(|p| p.name.clone()).collect()
    }

    /// Largest difference relative to the reference's largest magnitude.
    pub(super) fn max_rel(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
    }

    #[test]
    fn forward_matches_the_inference_unet() {
        let fx = Fixture::load();
        let src = DirSource::new(DIR);
        let mut rng = TorchGenerator::new(3);
        let (b, c, s) = (2, fx.config.in_channels, fx.run.side);
        let x = rng.randn(b * c * s * s);
        for gpu in devices() {
            let files = pollster::block_on(component_files(&src, "unet", "diffusion_pytorch_model", false)).unwrap();
            let weights = Weights::new(&src, files);
            let inference = pollster::block_on(UNet2DModel::load(&weights.at(&gpu, DType::F32, ""), fx.config.clone())).unwrap();
            let xt = gpu.upload(&[b, c, s, s], DType::F32, &x).unwrap();
            // The inference model takes one timestep for the batch.
            let want = pollster::block_on(gpu.read(&inference.forward(&gpu, &xt, 421.0, None).unwrap())).unwrap();
            let unet = UNet2DTrainable::new(fx.config.clone()).unwrap();
            let mut tape = Tape::new(&gpu);
            let p: Vec<_> = unet.params().iter().zip(&fx.init).map(|(sp, v)| tape.param(gpu.upload(&sp.shape, DType::F32, v).unwrap()).unwrap()).collect();
            let xv = tape.constant(xt).unwrap();
            let y = unet.forward(&mut tape, &p, xv, &[421.0, 421.0]).unwrap();
            let got = pollster::block_on(gpu.read(tape.value(y))).unwrap();
            let err = max_rel(&got, &want);
            assert!(err <= 1e-5, "{}: trainable vs inference UNet2DModel: {err:.2e}", gpu.summary().name);
        }
    }

    #[test]
    fn gradients_match_torch() {
        let fx = Fixture::load();
        let g = &fx.run.gradients;
        let batch = fx.batch(&g.items, &g.timesteps, &g.keep_cond, g.noise_seed);
        for gpu in devices() {
            let trainer = fx.trainer(&gpu, fx.run_config(Objective::Epsilon));
            let (loss, grads) = trainer.loss_and_gradients(&gpu, &batch).unwrap();
            let got_loss = pollster::block_on(gpu.read(&loss)).unwrap()[0];
            assert!((got_loss - g.loss).abs() <= 1e-5 * g.loss, "{}: loss {got_loss} vs torch {}", gpu.summary().name, g.loss);
            // Relative to each tensor's largest gradient, but not below 1e-3 of the model's: a
            // key bias's gradient is zero in exact arithmetic (softmax ignores a shift common to a
            // row), so both sides hold rounding noise there.
            let want: Vec<Vec<f32>> = trainer.unet.params().iter().map(|s| fx.tensor(&format!("grad.{}", s.name), &s.shape)).collect();
            let global = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let mut worst = (0f32, String::new());
            for ((grad, spec), want) in grads.iter().zip(trainer.unet.params()).zip(&want) {
                let got = pollster::block_on(gpu.read(grad)).unwrap();
                let scale = want.iter().fold(1e-3 * global, |m, v| m.max(v.abs()));
                let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                if err > worst.0 {
                    worst = (err, spec.name.clone());
                }
            }
            assert!(worst.0 <= 2e-4, "{}: gradient of {} off by {:.2e} of its largest value", gpu.summary().name, worst.1, worst.0);
            eprintln!("{}: {} gradients, worst {} at {:.2e}", gpu.summary().name, grads.len(), worst.1, worst.0);
        }
    }

    #[test]
    fn fifty_steps_follow_torch() {
        let fx = Fixture::load();
        for gpu in devices() {
            let mut trainer = fx.trainer(&gpu, fx.run_config(Objective::V));
            let (mut worst_loss, mut worst_norm) = (0f32, 0f32);
            for (s, step) in fx.run.steps.iter().enumerate() {
                let batch = fx.batch(&step.items, &step.timesteps, &step.keep_cond, 1000 + s as u64);
                let stats = pollster::block_on(trainer.step(&gpu, &batch)).unwrap();
                worst_loss = worst_loss.max((stats.loss - step.loss).abs() / step.loss);
                worst_norm = worst_norm.max((stats.grad_norm - step.grad_norm).abs() / step.grad_norm);
            }
            let name = gpu.summary().name.clone();
            eprintln!("{name}: 50 steps, losses within {worst_loss:.2e}, gradient norms within {worst_norm:.2e} of torch's");
            assert!(worst_loss <= 1e-4 && worst_norm <= 1e-3, "{name}: losses off by {worst_loss:.2e}, gradient norms by {worst_norm:.2e}");
            let specs = trainer.unet.params().to_vec();
            for (which, params) in [("final", &trainer.trained.params), ("final_ema", &trainer.trained.ema.as_ref().unwrap().shadow)] {
                for (spec, p) in specs.iter().zip(params.iter()) {
                    let key = format!("{which}.{}", spec.name);
                    let spec_ok = ParamSpec { name: key.clone(), shape: spec.shape.clone(), init: Init::Zeros };
                    let Ok(mut want) = values_from_safetensors(&[spec_ok], &fx.tensors, "run.safetensors") else { continue };
                    let got = pollster::block_on(gpu.read(p)).unwrap();
                    let err = max_rel(&got, &want.remove(0));
                    assert!(err <= 1e-3, "{name}: {key} off by {err:.2e} after 50 steps");
                }
            }
        }
    }

    /// Mixed precision (f16 products, f32 masters, scaled loss) on adapters with shader-f16: the
    /// gradients and a 50-step run stay within f16's rounding of torch's f32 ones.
    #[test]
    fn mixed_precision_follows_torch_within_f16_rounding() {
        let fx = Fixture::load();
        let g = &fx.run.gradients;
        let batch = fx.batch(&g.items, &g.timesteps, &g.keep_cond, g.noise_seed);
        for gpu in devices() {
            let name = gpu.summary().name.clone();
            let mixed = TrainConfig { mixed_precision: true, ..fx.run_config(Objective::Epsilon) };
            if !gpu.supports(DType::F16) {
                let err = Trainer::new(&gpu, UNet2DTrainable::new(fx.config.clone()).unwrap(), mixed, &fx.init, fx.alphas_cumprod.clone(), [3, 8, 8], 3).err().expect("refused without f16");
                assert!(err.to_string().contains("shader-f16"), "{err}");
                eprintln!("{name}: no shader-f16, mixed precision refused");
                continue;
            }
            let trainer = fx.trainer(&gpu, mixed);
            let (loss, grads) = trainer.loss_and_gradients(&gpu, &batch).unwrap();
            let got_loss = pollster::block_on(gpu.read(&loss)).unwrap()[0];
            let scale = trainer.trained.loss_scale();
            let want: Vec<Vec<f32>> = trainer.unet.params().iter().map(|s| fx.tensor(&format!("grad.{}", s.name), &s.shape)).collect();
            let global = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let mut worst = 0f32;
            for (grad, want) in grads.iter().zip(&want) {
                let got = pollster::block_on(gpu.read(grad)).unwrap();
                worst = worst.max(got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a / scale - b).abs())) / global);
            }
            eprintln!("{name}: mixed precision loss {got_loss} (torch f32 {}), gradients within {worst:.2e} of the largest", g.loss);
            assert!((got_loss - g.loss).abs() <= 1e-3 * g.loss && worst <= 5e-3, "{name}: mixed-precision loss {got_loss} vs {}, gradients off by {worst:.2e}", g.loss);
            let mut trainer = fx.trainer(&gpu, TrainConfig { mixed_precision: true, ..fx.run_config(Objective::V) });
            let mut worst_loss = 0f32;
            for (s, step) in fx.run.steps.iter().enumerate() {
                let batch = fx.batch(&step.items, &step.timesteps, &step.keep_cond, 1000 + s as u64);
                let stats = pollster::block_on(trainer.step(&gpu, &batch)).unwrap();
                worst_loss = worst_loss.max((stats.loss - step.loss).abs() / step.loss);
            }
            eprintln!("{name}: 50 mixed-precision steps, losses within {worst_loss:.2e} of torch's f32 run, loss scale {}", trainer.trained.loss_scale());
            assert!(worst_loss <= 5e-3, "{name}: mixed-precision losses off by {worst_loss:.2e}");
            // A scale that overflows f16: the step is skipped and the scale halves.
            trainer.trained.scaler = Some(LossScaler { scale: 3e38, growth_tracker: 7 });
            let before = pollster::block_on(gpu.read(&trainer.trained.params[0])).unwrap();
            let steps = trainer.trained.optimizer.steps;
            let stats = pollster::block_on(trainer.step(&gpu, &batch)).unwrap();
            assert!(!stats.grad_norm.is_finite() && stats.loss.is_finite(), "{name}: an overflowing step reports {stats:?}");
            assert_eq!(trainer.trained.scaler, Some(LossScaler { scale: 1.5e38, growth_tracker: 0 }));
            assert_eq!((trainer.trained.optimizer.steps, pollster::block_on(gpu.read(&trainer.trained.params[0])).unwrap()), (steps, before), "{name}: a skipped step changed the weights");
        }
    }

    #[test]
    fn the_loss_scale_grows_after_good_steps_and_backs_off_on_overflow() {
        let mut s = LossScaler::new();
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s, LossScaler { scale: 65536.0, growth_tracker: 1999 });
        s.update(false);
        assert_eq!(s, LossScaler { scale: 131072.0, growth_tracker: 0 });
        s.update(false);
        s.update(true);
        assert_eq!(s, LossScaler { scale: 65536.0, growth_tracker: 0 });
    }

    /// What the trainer saves has the names, shapes and order-independent layout of diffusers'
    /// own `save_pretrained` of the same config.
    #[test]
    fn saved_weights_have_diffusers_names_and_shapes() {
        let fx = Fixture::load();
        let unet = UNet2DTrainable::new(fx.config.clone()).unwrap();
        let ours = safetensors_bytes(unet.params(), &fx.init, FileDType::F32, &BTreeMap::new()).unwrap();
        let header = |b: &[u8]| {
            let n = header_len(b, b.len() as u64, "t").unwrap() as usize;
            parse_header(&b[8..8 + n], b.len() as u64, "t").unwrap().tensors.into_iter().map(|(k, e)| (k, e.shape)).collect::<Vec<_>>()
        };
        let theirs = std::fs::read(format!("{DIR}/unet/diffusion_pytorch_model.safetensors")).unwrap();
        assert_eq!(header(&ours), header(&theirs));
        assert_eq!(values_from_safetensors(unet.params(), &ours, "ours").unwrap(), fx.init);
    }

    /// Checkpointed blocks give the same gradients (up to the order in which a value's gradient
    /// contributions are added: a block's are summed inside it first) and keep fewer bytes at the
    /// peak.
    #[test]
    fn gradient_checkpointing_keeps_the_gradients_and_saves_memory() {
        let fx = Fixture::load();
        let g = &fx.run.gradients;
        let batch = fx.batch(&g.items, &g.timesteps, &g.keep_cond, g.noise_seed);
        for gpu in devices() {
            let mut runs = Vec::new();
            for checkpointing in [false, true] {
                let mut trainer = fx.trainer(&gpu, fx.run_config(Objective::Epsilon));
                trainer.unet.set_gradient_checkpointing(checkpointing);
                gpu.reset_pool_peak();
                let (_, grads) = trainer.loss_and_gradients(&gpu, &batch).unwrap();
                let values: Vec<Vec<f32>> = grads.iter().map(|g| pollster::block_on(gpu.read(g)).unwrap()).collect();
                runs.push((values, gpu.pool_stats().peak_bytes));
            }
            let name = gpu.summary().name.clone();
            // Relative to the model's largest gradient (the key biases' true gradient is zero).
            let global = runs[0].0.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let (worst, at) = runs[0].0.iter().zip(&runs[1].0).zip(fx_names(&fx)).map(|((a, b), n)| (a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / global, n)).fold((0f32, String::new()), |w, x| if x.0 > w.0 { x } else { w });
            assert!(worst <= 1e-5, "{name}: checkpointed gradients differ by {worst:.2e} of the largest gradient, at {at}");
            eprintln!("{name}: peak {} bytes without checkpointing, {} with; gradients within {worst:.2e}", runs[0].1, runs[1].1);
            assert!(runs[1].1 < runs[0].1, "{name}: checkpointing did not lower the peak ({} vs {})", runs[1].1, runs[0].1);
        }
    }
}
