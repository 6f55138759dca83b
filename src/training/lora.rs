//! LoRA fine-tuning of a text-to-image UNet, as diffusers' `train_text_to_image_lora.py` does it:
//! the base weights frozen on the device, low-rank factors on the attention projections trained on
//! the DDPM objective (latents of the user's images, text embeddings of their captions, a dropped
//! caption becoming the empty one), and the result saved as that script saves it
//! (`pytorch_lora_weights.safetensors`: `unet.<module>.lora.down.weight` / `.lora.up.weight`,
//! the LoRA config in `lora_adapter_metadata`), which `ldm generate --lora`, the page and
//! diffusers' `load_lora_weights` read.

use std::collections::BTreeMap;

use super::{alpha_cumprod, init_values, noised, safetensors_bytes, values_from_safetensors, Batch, Optimised, ParamSpec, StepStats, TrainConfig, UNet2DConditionTrainable};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::safetensors::FileDType;
use crate::loader::W;

/// The file name diffusers saves and loads LoRA weights under.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// A text-to-image UNet with LoRA adapters being trained; `Batch::cond` holds each item's text
/// embedding `[L, D]`.
pub struct LoraTrainer {
    pub unet: UNet2DConditionTrainable,
    pub config: TrainConfig,
    /// The adapters' factors, in [`UNet2DConditionTrainable::adapters`] order.
    pub trained: Optimised,
    /// Every parameter's frozen value; `None` at the adapters.
    base: Vec<Option<Tensor>>,
    alphas_cumprod: Vec<f32>,
    /// `[C, h, w]` of the latents.
    pub latent_shape: [usize; 3],
    /// `[L, D]`: the empty caption's embedding, what a dropped caption becomes.
    uncond: Vec<f32>,
}

impl LoraTrainer {
    /// A trainer for `unet`'s adapters, its base weights read through `w` (f32), the adapters
    /// starting from `adapters` (in adapter order) or, without them, PEFT's initialisation from
    /// the config's seed.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        gpu: &Gpu, w: &W<'_, '_>, mut unet: UNet2DConditionTrainable, config: TrainConfig, adapters: Option<&[Vec<f32>]>, alphas_cumprod: Vec<f32>,
        latent_shape: [usize; 3], uncond: Vec<f32>,
    ) -> Result<Self> {
        config.validate()?;
        if latent_shape[0] != unet.config.in_channels || latent_shape[0] != unet.config.out_channels {
            return Err(Error::Model(format!("the UNet takes {} channels; the latents have {}", unet.config.in_channels, latent_shape[0])));
        }
        let specs = adapter_specs(&unet);
        if specs.is_empty() {
            return Err(Error::Input("LoRA training needs a UNet with adapters (a LoRA config)".into()));
        }
        let mut base = Vec::with_capacity(unet.params().len());
        for (i, spec) in unet.params().iter().enumerate() {
            base.push(if unet.adapters().contains(&i) { None } else { Some(w.get(&spec.name, &spec.shape).await?) });
        }
        let values = match adapters {
            Some(v) => v.to_vec(),
            None => init_values(&specs, config.seed),
        };
        let trained = Optimised::new(gpu, specs, &values, &config)?;
        unet.set_gradient_checkpointing(config.gradient_checkpointing);
        Ok(Self { unet, config, trained, base, alphas_cumprod, latent_shape, uncond })
    }

    /// Training timesteps (`num_train_timesteps`).
    pub fn train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The loss of `batch` (a one-element tensor) and its gradient for every adapter factor.
    pub fn loss_and_gradients(&self, gpu: &Gpu, b: &Batch) -> Result<(Tensor, Vec<Tensor>)> {
        let [c, h, w] = self.latent_shape;
        let (plane, ctx) = (c * h * w, self.uncond.len());
        let n = b.timesteps.len();
        if b.x0.len() != n * plane || b.noise.len() != b.x0.len() || b.cond.len() != n * ctx || b.keep_cond.len() != n || n == 0 {
            return Err(Error::Shape(format!("a training batch of {n} items has {} latent, {} noise and {} text embedding values", b.x0.len(), b.noise.len(), b.cond.len())));
        }
        let (mut input, mut target, mut context) = (Vec::with_capacity(n * plane), Vec::with_capacity(n * plane), Vec::with_capacity(n * ctx));
        for i in 0..n {
            let acp = alpha_cumprod(&self.alphas_cumprod, b.timesteps[i])?;
            let range = i * plane..(i + 1) * plane;
            noised(acp, self.config.objective, &b.x0[range.clone()], &b.noise[range], &mut input, &mut target);
            context.extend_from_slice(if b.keep_cond[i] { &b.cond[i * ctx..(i + 1) * ctx] } else { &self.uncond });
        }
        let mut tape = self.trained.tape(gpu)?;
        let mut adapters = self.trained.params.iter();
        let mut vars = Vec::with_capacity(self.base.len());
        for frozen in &self.base {
            vars.push(match frozen {
                Some(t) => tape.constant(t.clone())?,
                None => tape.param(adapters.next().ok_or_else(|| Error::Model("LoRA factors do not match the UNet's adapters (a bug in ldm-web)".into()))?.clone())?,
            });
        }
        let tokens = ctx / self.unet.config.cross_attention_dim.get(0).max(1);
        let x = tape.constant(gpu.upload(&[n, c, h, w], DType::F32, &input)?)?;
        let context = tape.constant(gpu.upload(&[n, tokens, ctx / tokens.max(1)], DType::F32, &context)?)?;
        let t: Vec<f32> = b.timesteps.iter().map(|&t| t as f32).collect();
        let pred = self.unet.forward(&mut tape, &vars, x, &t, context)?;
        let pred = tape.cast(pred, DType::F32)?;
        let target = tape.constant(gpu.upload(&[n, c, h, w], DType::F32, &target)?)?;
        let loss = tape.mse_loss(pred, target)?;
        let adapters: Vec<_> = self.unet.adapters().iter().map(|&i| vars[i]).collect();
        let grads = self.trained.backward(&tape, loss, &adapters, &self.trained.specs)?;
        Ok((tape.value(loss).clone(), grads))
    }

    /// One optimisation step on `batch`: forward, backward, clipping, AdamW, EMA.
    pub async fn step(&mut self, gpu: &Gpu, batch: &Batch) -> Result<StepStats> {
        let (loss, grads) = self.loss_and_gradients(gpu, batch)?;
        self.trained.apply(gpu, &loss, grads).await
    }

    /// The LoRA file of the current factors (the EMA's when there is one).
    pub async fn lora_file(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let mut values = Vec::with_capacity(self.trained.params.len());
        for t in self.trained.inference_params() {
            values.push(gpu.read(t).await?);
        }
        lora_file(&self.unet, &values)
    }
}

/// The adapters' names (PEFT's, `...to_q.lora_A.weight`), shapes and initialisations.
pub fn adapter_specs(unet: &UNet2DConditionTrainable) -> Vec<ParamSpec> {
    unet.adapters().iter().map(|&i| unet.params()[i].clone()).collect()
}

/// The name diffusers' training script saves a PEFT factor under.
fn diffusers_name(peft: &str) -> String {
    format!("unet.{}", peft.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"))
}

/// `pytorch_lora_weights.safetensors` of `values` (in adapter order), in f32.
pub fn lora_file(unet: &UNet2DConditionTrainable, values: &[Vec<f32>]) -> Result<Vec<u8>> {
    let lora = unet.lora.as_ref().ok_or_else(|| Error::Input("this UNet has no LoRA config".into()))?;
    let specs: Vec<ParamSpec> = adapter_specs(unet).into_iter().map(|s| ParamSpec { name: diffusers_name(&s.name), ..s }).collect();
    // What diffusers' save_lora_weights writes from `unet_lora_adapter_metadata`: the LoraConfig
    // keys under the component's name, which load_lora_weights turns back into a LoraConfig.
    let config = serde_json::json!({
        "unet.r": lora.r,
        "unet.lora_alpha": lora.lora_alpha,
        "unet.target_modules": lora.target_modules,
        "unet.init_lora_weights": "gaussian",
    });
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("lora_adapter_metadata".to_string(), serde_json::to_string_pretty(&config).map_err(|e| Error::Io(e.to_string()))?);
    safetensors_bytes(&specs, values, FileDType::F32, &meta)
}

/// The factors of a LoRA file written by [`lora_file`] (or diffusers) for `unet`'s adapters, in
/// adapter order: to continue training from it.
pub fn lora_values(unet: &UNet2DConditionTrainable, bytes: &[u8], what: &str) -> Result<Vec<Vec<f32>>> {
    let specs: Vec<ParamSpec> = adapter_specs(unet).into_iter().map(|s| ParamSpec { name: diffusers_name(&s.name), ..s }).collect();
    values_from_safetensors(&specs, bytes, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Tape;
    use crate::loader::lora::AdapterSet;
    use crate::loader::safetensors::{header_len, parse_header};
    use crate::loader::{component_files, DirSource, MemorySource, Weights};
    use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
    use crate::rng::TorchGenerator;
    use crate::schedulers::{DdpmConfig, DdpmScheduler};
    use crate::training::tests::{devices, max_rel};
    use crate::training::{Init, LoraConfig, Objective};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

    /// torch's run (scripts/lora_training_fixtures.py).
    #[derive(serde::Deserialize)]
    struct Run {
        rank: usize,
        alpha: f32,
        target_modules: Vec<String>,
        lr: f32,
        weight_decay: f32,
        max_grad_norm: f32,
        images: usize,
        tokens: usize,
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
        config: UNet2DConditionConfig,
        alphas_cumprod: Vec<f32>,
        weights: Weights<'static>,
    }

    fn read_tensor(bytes: &[u8], name: &str, shape: &[usize]) -> Vec<f32> {
        let spec = ParamSpec { name: name.into(), shape: shape.to_vec(), init: Init::Zeros };
        values_from_safetensors(&[spec], bytes, name).unwrap().remove(0)
    }

    fn header(bytes: &[u8]) -> crate::loader::safetensors::Header {
        let n = header_len(bytes, bytes.len() as u64, "t").unwrap() as usize;
        parse_header(&bytes[8..8 + n], bytes.len() as u64, "t").unwrap()
    }

    impl Fixture {
        fn load() -> Self {
            let dir = format!("{FIXTURES}/lora-training");
            let run: Run = serde_json::from_slice(&std::fs::read(format!("{dir}/run.json")).unwrap()).unwrap();
            let config: UNet2DConditionConfig = serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/sd1/unet/config.json")).unwrap()).unwrap();
            let schedule: DdpmConfig = serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/sd1/scheduler/scheduler_config.json")).unwrap()).unwrap();
            let alphas_cumprod = DdpmScheduler::new(schedule).unwrap().alphas_cumprod().to_vec();
            let src: &'static DirSource = Box::leak(Box::new(DirSource::new(format!("{FIXTURES}/sd1"))));
            let files = pollster::block_on(component_files(src, "unet", "diffusion_pytorch_model", false)).unwrap();
            Self { run, tensors: std::fs::read(format!("{dir}/run.safetensors")).unwrap(), config, alphas_cumprod, weights: Weights::new(src, files) }
        }

        fn lora(&self) -> LoraConfig {
            LoraConfig { r: self.run.rank, lora_alpha: self.run.alpha, target_modules: self.run.target_modules.clone() }
        }

        fn unet(&self) -> UNet2DConditionTrainable {
            UNet2DConditionTrainable::new(self.config.clone(), Some(self.lora())).unwrap()
        }

        fn config(&self) -> TrainConfig {
            let r = &self.run;
            TrainConfig { steps: r.steps.len() as u32, batch: 2, lr: r.lr, weight_decay: r.weight_decay, max_grad_norm: r.max_grad_norm, objective: Objective::Epsilon, cond_dropout: 0.0, ema_decay: None, seed: 0, gradient_checkpointing: false, mixed_precision: false }
        }

        fn context_len(&self) -> usize {
            self.run.tokens * self.config.cross_attention_dim.get(0)
        }

        fn trainer(&self, gpu: &Gpu, config: TrainConfig) -> LoraTrainer {
            let unet = self.unet();
            let init: Vec<Vec<f32>> = adapter_specs(&unet).iter().map(|s| read_tensor(&self.tensors, &format!("init.{}", s.name), &s.shape)).collect();
            let uncond = read_tensor(&self.tensors, "uncond", &[self.run.tokens, self.config.cross_attention_dim.get(0)]);
            let w = self.weights.at(gpu, DType::F32, "");
            pollster::block_on(LoraTrainer::new(gpu, &w, unet, config, Some(&init), self.alphas_cumprod.clone(), [4, 8, 8], uncond)).unwrap()
        }

        fn batch(&self, items: &[usize], timesteps: &[u32], keep_cond: &[bool], noise_seed: u64) -> Batch {
            let (n, ctx) = (self.run.images, self.context_len());
            let x0 = read_tensor(&self.tensors, "x0", &[n, 4, 8, 8]);
            let context = read_tensor(&self.tensors, "context", &[n, self.run.tokens, self.config.cross_attention_dim.get(0)]);
            Batch {
                x0: items.iter().flat_map(|&i| x0[i * 256..(i + 1) * 256].to_vec()).collect(),
                cond: items.iter().flat_map(|&i| context[i * ctx..(i + 1) * ctx].to_vec()).collect(),
                timesteps: timesteps.to_vec(),
                noise: TorchGenerator::new(noise_seed).randn(items.len() * 256),
                keep_cond: keep_cond.to_vec(),
            }
        }
    }

    /// The adapters' parameter names are PEFT's, on exactly the layers PEFT wraps.
    #[test]
    fn adapters_are_on_the_layers_peft_wraps() {
        let fx = Fixture::load();
        let unet = fx.unet();
        let want = header(&std::fs::read(format!("{FIXTURES}/lora-training/run.safetensors")).unwrap());
        let mut want: Vec<(String, Vec<usize>)> = want.tensors.into_iter().filter_map(|(k, e)| k.strip_prefix("init.").map(|n| (n.to_string(), e.shape))).collect();
        let mut got: Vec<(String, Vec<usize>)> = adapter_specs(&unet).into_iter().map(|s| (s.name, s.shape)).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn lora_gradients_match_torch() {
        let fx = Fixture::load();
        let g = &fx.run.gradients;
        let batch = fx.batch(&g.items, &g.timesteps, &g.keep_cond, g.noise_seed);
        for gpu in devices() {
            let trainer = fx.trainer(&gpu, fx.config());
            let (loss, grads) = trainer.loss_and_gradients(&gpu, &batch).unwrap();
            let name = gpu.summary().name.clone();
            let got_loss = pollster::block_on(gpu.read(&loss)).unwrap()[0];
            assert!((got_loss - g.loss).abs() <= 1e-5 * g.loss, "{name}: loss {got_loss} vs torch {}", g.loss);
            let specs = adapter_specs(&trainer.unet);
            let want: Vec<Vec<f32>> = specs.iter().map(|s| read_tensor(&fx.tensors, &format!("grad.{}", s.name), &s.shape)).collect();
            let global = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let mut worst = (0f32, String::new());
            for ((grad, spec), want) in grads.iter().zip(&specs).zip(&want) {
                let got = pollster::block_on(gpu.read(grad)).unwrap();
                let scale = want.iter().fold(1e-3 * global, |m, v| m.max(v.abs()));
                let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                if err > worst.0 {
                    worst = (err, spec.name.clone());
                }
            }
            eprintln!("{name}: {} LoRA gradients, worst {} at {:.2e}", grads.len(), worst.1, worst.0);
            assert!(worst.0 <= 2e-4, "{name}: gradient of {} off by {:.2e} of its largest value", worst.1, worst.0);
        }
    }

    /// Twenty steps follow torch's, and the saved file is diffusers' own (names, shapes, LoRA
    /// config) with the same trained values.
    #[test]
    fn twenty_lora_steps_follow_torch_and_save_as_diffusers_does() {
        let fx = Fixture::load();
        let theirs = std::fs::read(format!("{FIXTURES}/lora-training/{LORA_FILE}")).unwrap();
        for gpu in devices() {
            let mut trainer = fx.trainer(&gpu, fx.config());
            let (mut worst_loss, mut worst_norm) = (0f32, 0f32);
            for (s, step) in fx.run.steps.iter().enumerate() {
                let batch = fx.batch(&step.items, &step.timesteps, &step.keep_cond, 1000 + s as u64);
                let stats = pollster::block_on(trainer.step(&gpu, &batch)).unwrap();
                worst_loss = worst_loss.max((stats.loss - step.loss).abs() / step.loss);
                worst_norm = worst_norm.max((stats.grad_norm - step.grad_norm).abs() / step.grad_norm);
            }
            let name = gpu.summary().name.clone();
            eprintln!("{name}: {} LoRA steps, losses within {worst_loss:.2e}, gradient norms within {worst_norm:.2e} of torch's", fx.run.steps.len());
            assert!(worst_loss <= 1e-4 && worst_norm <= 1e-3, "{name}: losses off by {worst_loss:.2e}, gradient norms by {worst_norm:.2e}");
            let ours = pollster::block_on(trainer.lora_file(&gpu)).unwrap();
            let (h_ours, h_theirs) = (header(&ours), header(&theirs));
            let shapes = |h: &crate::loader::safetensors::Header| h.tensors.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect::<Vec<_>>();
            assert_eq!(shapes(&h_ours), shapes(&h_theirs));
            let meta = |h: &crate::loader::safetensors::Header| -> serde_json::Value { serde_json::from_str(&h.metadata["lora_adapter_metadata"]).unwrap() };
            let (m_ours, m_theirs) = (meta(&h_ours), meta(&h_theirs));
            for key in ["unet.r", "unet.lora_alpha", "unet.target_modules", "unet.init_lora_weights"] {
                assert_eq!(m_ours[key].as_f64().map_or_else(|| m_ours[key].clone(), |v| serde_json::json!(v)), m_theirs[key].as_f64().map_or_else(|| m_theirs[key].clone(), |v| serde_json::json!(v)), "{key}");
            }
            let (got, want) = (lora_values(&trainer.unet, &ours, "ours").unwrap(), lora_values(&trainer.unet, &theirs, "diffusers'").unwrap());
            let worst = got.iter().zip(&want).map(|(a, b)| max_rel(a, b)).fold(0f32, f32::max);
            assert!(worst <= 1e-3, "{name}: trained factors off by {worst:.2e} after {} steps", fx.run.steps.len());
        }
    }

    /// Mixed precision (frozen weights in f16, f16 products, f32 LoRA masters, scaled loss) on
    /// adapters with shader-f16: gradients and the 20-step run within f16's rounding of torch's.
    #[test]
    fn mixed_precision_lora_follows_torch_within_f16_rounding() {
        let fx = Fixture::load();
        let g = &fx.run.gradients;
        let batch = fx.batch(&g.items, &g.timesteps, &g.keep_cond, g.noise_seed);
        for gpu in devices().into_iter().filter(|g| g.supports(DType::F16)) {
            let name = gpu.summary().name.clone();
            let trainer = |config: TrainConfig| {
                let unet = fx.unet();
                let init: Vec<Vec<f32>> = adapter_specs(&unet).iter().map(|s| read_tensor(&fx.tensors, &format!("init.{}", s.name), &s.shape)).collect();
                let uncond = read_tensor(&fx.tensors, "uncond", &[fx.run.tokens, fx.config.cross_attention_dim.get(0)]);
                let w = fx.weights.at(&gpu, DType::F16, "");
                pollster::block_on(LoraTrainer::new(&gpu, &w, unet, config, Some(&init), fx.alphas_cumprod.clone(), [4, 8, 8], uncond)).unwrap()
            };
            let mixed = TrainConfig { mixed_precision: true, ..fx.config() };
            let t = trainer(mixed.clone());
            let (loss, grads) = t.loss_and_gradients(&gpu, &batch).unwrap();
            let got_loss = pollster::block_on(gpu.read(&loss)).unwrap()[0];
            let scale = t.trained.loss_scale();
            let want: Vec<Vec<f32>> = t.trained.specs.iter().map(|s| read_tensor(&fx.tensors, &format!("grad.{}", s.name), &s.shape)).collect();
            let global = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let mut worst = 0f32;
            for (grad, want) in grads.iter().zip(&want) {
                let got = pollster::block_on(gpu.read(grad)).unwrap();
                worst = worst.max(got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a / scale - b).abs())) / global);
            }
            let mut t = trainer(mixed);
            let mut worst_loss = 0f32;
            for (s, step) in fx.run.steps.iter().enumerate() {
                let batch = fx.batch(&step.items, &step.timesteps, &step.keep_cond, 1000 + s as u64);
                let stats = pollster::block_on(t.step(&gpu, &batch)).unwrap();
                worst_loss = worst_loss.max((stats.loss - step.loss).abs() / step.loss);
            }
            eprintln!("{name}: mixed-precision LoRA loss {got_loss} (torch f32 {}), gradients within {worst:.2e} of the largest, 20-step losses within {worst_loss:.2e}", g.loss);
            // f16 keeps 11 significant bits (rounding 4.9e-4): through f16 base weights and eleven
            // transformer blocks of f16 activations, the gradients drift about 1e-2 of the largest.
            assert!((got_loss - g.loss).abs() <= 1e-3 * g.loss && worst <= 2e-2 && worst_loss <= 1e-2, "{name}: mixed-precision LoRA loss {got_loss} vs {}, gradients off by {worst:.2e}, losses by {worst_loss:.2e}", g.loss);
        }
    }

    /// A saved LoRA runs in the inference UNet (the loader's LoRA path) as it ran in training.
    #[test]
    fn a_saved_lora_runs_in_the_inference_unet() {
        let fx = Fixture::load();
        let gpu = devices().remove(0);
        let trainer = fx.trainer(&gpu, fx.config());
        let file = pollster::block_on(trainer.lora_file(&gpu)).unwrap();
        let mut set = AdapterSet::new();
        pollster::block_on(set.add(Box::new(MemorySource::new("trained", [(LORA_FILE.to_string(), file)])), LORA_FILE, "trained", 1.0)).unwrap();
        let set = std::rc::Rc::new(set);
        let w = fx.weights.at(&gpu, DType::F32, "").with_adapters(Some(&set), "unet");
        let inference = pollster::block_on(UNet2DConditionModel::load(&w, fx.config.clone())).unwrap();
        let mut rng = TorchGenerator::new(4);
        let (x, ctx) = (rng.randn(2 * 4 * 64), rng.randn(2 * fx.context_len()));
        let xt = gpu.upload(&[2, 4, 8, 8], DType::F32, &x).unwrap();
        let ct = gpu.upload(&[2, fx.run.tokens, fx.config.cross_attention_dim.get(0)], DType::F32, &ctx).unwrap();
        let want = pollster::block_on(gpu.read(&inference.forward(&gpu, &xt, 310.0, &ct).unwrap())).unwrap();
        let plain = pollster::block_on(UNet2DConditionModel::load(&fx.weights.at(&gpu, DType::F32, ""), fx.config.clone())).unwrap();
        let base = pollster::block_on(gpu.read(&plain.forward(&gpu, &xt, 310.0, &ct).unwrap())).unwrap();
        let mut tape = Tape::new(&gpu);
        let mut adapters = trainer.trained.params.iter();
        let vars: Vec<_> = trainer.base.iter().map(|b| tape.constant(b.clone().unwrap_or_else(|| adapters.next().unwrap().clone())).unwrap()).collect();
        let (xv, cv) = (tape.constant(xt).unwrap(), tape.constant(ct).unwrap());
        let y = trainer.unet.forward(&mut tape, &vars, xv, &[310.0, 310.0], cv).unwrap();
        let got = pollster::block_on(gpu.read(tape.value(y))).unwrap();
        let (err, effect) = (max_rel(&got, &want), max_rel(&base, &want));
        eprintln!("trainable with LoRA vs inference with the saved file: {err:.2e} (the LoRA moves the output by {effect:.2e})");
        assert!(err <= 1e-5 && effect > 1e-3, "trainable vs inference UNet with the saved LoRA: {err:.2e}, LoRA effect {effect:.2e}");
    }

    /// Without adapters, the trainable UNet is the inference one, 1x1-convolution (SD 1.x) and
    /// linear (SD 2.x) transformer projections alike.
    #[test]
    fn forward_matches_the_inference_unet() {
        let gpu = devices().remove(0);
        for model in ["sd1", "sd2"] {
            let config: UNet2DConditionConfig = serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/{model}/unet/config.json")).unwrap()).unwrap();
            let src = DirSource::new(format!("{FIXTURES}/{model}"));
            let files = pollster::block_on(component_files(&src, "unet", "diffusion_pytorch_model", false)).unwrap();
            let weights = Weights::new(&src, files);
            let w = weights.at(&gpu, DType::F32, "");
            let inference = pollster::block_on(UNet2DConditionModel::load(&w, config.clone())).unwrap();
            let unet = UNet2DConditionTrainable::new(config.clone(), None).unwrap();
            let (cross, side) = (config.cross_attention_dim.get(0), 8);
            let mut rng = TorchGenerator::new(9);
            let (x, ctx) = (rng.randn(2 * config.in_channels * side * side), rng.randn(2 * 5 * cross));
            let xt = gpu.upload(&[2, config.in_channels, side, side], DType::F32, &x).unwrap();
            let ct = gpu.upload(&[2, 5, cross], DType::F32, &ctx).unwrap();
            let want = pollster::block_on(gpu.read(&inference.forward(&gpu, &xt, 77.0, &ct).unwrap())).unwrap();
            let mut tape = Tape::new(&gpu);
            let vars: Vec<_> = unet.params().iter().map(|s| tape.param(pollster::block_on(w.get(&s.name, &s.shape)).unwrap()).unwrap()).collect();
            let (xv, cv) = (tape.constant(xt).unwrap(), tape.constant(ct).unwrap());
            let y = unet.forward(&mut tape, &vars, xv, &[77.0, 77.0], cv).unwrap();
            let got = pollster::block_on(gpu.read(tape.value(y))).unwrap();
            let err = max_rel(&got, &want);
            assert!(err <= 1e-5, "{model}: trainable vs inference UNet2DConditionModel: {err:.2e}");
        }
    }
}
