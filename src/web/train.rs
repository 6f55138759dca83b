//! Training in the page (the Train tab): the same run as `ldm train`, on the engine's device,
//! with its steps, checkpoints and samples sent to the worker as events.

use wasm_bindgen::prelude::*;

use super::engine::{cancelled, event, gpu, now_ms, poisons_device, release_model, reset_engine, to_js};
use super::source::JsSource;
use crate::error::{Error, Result};
use crate::loader::safetensors::FileDType;
use crate::loader::{FileSource, MemorySource};
use crate::pipelines::image_input::InputImage;
use crate::training::pairs::Pair;
use crate::training::checkpoint::RunInfo;
use crate::training::lora_run::{CaptionedImage, LoraRun, LoraSettings};
use crate::training::run::{autoencoder_dir, Cadence, RunEvent, RunSettings, TrainingRun, UNetSpec};
use crate::training::{LoraConfig, Objective, TrainConfig};

/// The Train tab's settings (JSON), named as `ldm train`'s flags.
#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TrainRequest {
    steps: u32,
    batch: usize,
    lr: f32,
    weight_decay: f32,
    max_grad_norm: f32,
    resolution: usize,
    objective: Objective,
    cond_dropout: f32,
    /// 0: no EMA.
    ema_decay: f32,
    seed: u64,
    channels: Vec<usize>,
    layers_per_block: usize,
    head_dim: usize,
    save_every: u32,
    sample_every: u32,
    sample_steps: usize,
    sample_guidance: f32,
    gradient_checkpointing: bool,
    mixed_precision: bool,
}

impl Default for TrainRequest {
    fn default() -> Self {
        let c = TrainConfig::default();
        Self {
            steps: c.steps, batch: c.batch, lr: c.lr, weight_decay: c.weight_decay, max_grad_norm: c.max_grad_norm, resolution: 64,
            objective: c.objective, cond_dropout: c.cond_dropout, ema_decay: c.ema_decay.unwrap_or(0.0), seed: 0,
            channels: vec![64, 128], layers_per_block: 1, head_dim: 32, save_every: 50, sample_every: 50, sample_steps: 20, sample_guidance: 1.0, gradient_checkpointing: false,
            mixed_precision: false,
        }
    }
}

fn field(obj: &JsValue, key: &str) -> Result<JsValue> {
    js_sys::Reflect::get(obj, &JsValue::from_str(key)).map_err(|_| Error::Input(format!("training pair without {key}")))
}

/// `{width, height, rgba: Uint8Array}` as an image.
fn image(obj: &JsValue, what: &str) -> Result<InputImage> {
    let number = |k: &str| field(obj, k).ok().and_then(|v| v.as_f64()).map(|v| v as usize);
    let (Some(w), Some(h)) = (number("width"), number("height")) else { return Err(Error::Input(format!("{what}: no width and height"))) };
    let rgba = field(obj, "rgba")?.dyn_into::<js_sys::Uint8Array>().map_err(|_| Error::Input(format!("{what}: rgba must be a Uint8Array")))?;
    InputImage::from_rgba8(w, h, &rgba.to_vec()).map_err(|e| Error::Input(format!("{what}: {e}")))
}

/// `[{name, cond, target}]` as pairs.
fn pairs(list: &JsValue) -> Result<Vec<Pair>> {
    let list = list.clone().dyn_into::<js_sys::Array>().map_err(|_| Error::Input("the training pairs must be an array".into()))?;
    list.iter()
        .map(|p| {
            let name = field(&p, "name")?.as_string().unwrap_or_default();
            Ok(Pair { cond: image(&field(&p, "cond")?, &format!("{name} (condition)"))?, target: image(&field(&p, "target")?, &format!("{name} (target)"))?, name })
        })
        .collect()
}

/// `{path: Uint8Array}` of a saved run as an in-memory folder.
fn saved_files(files: &JsValue) -> Result<MemorySource> {
    let obj = files.clone().dyn_into::<js_sys::Object>().map_err(|_| Error::Input("the saved run must be an object of files".into()))?;
    let mut out = Vec::new();
    for entry in js_sys::Object::entries(&obj).iter() {
        let pair: js_sys::Array = entry.into();
        let path = pair.get(0).as_string().unwrap_or_default();
        let bytes = pair.get(1).dyn_into::<js_sys::Uint8Array>().map_err(|_| Error::Input(format!("saved file {path} is not bytes")))?;
        out.push((path, bytes.to_vec()));
    }
    Ok(MemorySource::new("the saved training run", out))
}

/// Resolves in a new task of the worker's event loop (`setTimeout(0)`), after the messages
/// queued before it (Cancel) have been handled.
async fn next_task() {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let set_timeout = js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("setTimeout")).ok().and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        match set_timeout {
            Some(f) => {
                let _ = f.call2(&JsValue::NULL, &resolve, &JsValue::from_f64(0.0));
            }
            None => {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

impl TrainRequest {
    fn settings(&self) -> RunSettings {
        let config = TrainConfig {
            steps: self.steps, batch: self.batch, lr: self.lr, weight_decay: self.weight_decay, max_grad_norm: self.max_grad_norm, objective: self.objective,
            cond_dropout: self.cond_dropout, ema_decay: (self.ema_decay > 0.0).then_some(self.ema_decay), seed: self.seed,
            gradient_checkpointing: self.gradient_checkpointing, mixed_precision: self.mixed_precision,
        };
        let unet = UNetSpec::Levels { channels: self.channels.clone(), layers: self.layers_per_block, head_dim: self.head_dim };
        RunSettings { config, resolution: self.resolution, unet, schedule: None }
    }
}

/// `ldm bench train` in the page: `settings_json` as the Train tab's (its `steps` are the timed
/// steps) on 16 synthetic pairs, with the autoencoder of `ae_url`. Resolves to the report as JSON.
#[wasm_bindgen]
pub async fn bench_train(ae_url: String, ae_store: JsValue, settings_json: String) -> Result<String, JsValue> {
    async fn run(ae_url: &str, ae_store: JsValue, settings_json: &str) -> Result<String> {
        let req: TrainRequest = serde_json::from_str(settings_json).map_err(|e| Error::Input(format!("training settings: {e}")))?;
        let src = JsSource::new(ae_store, ae_url.to_string());
        let dir = autoencoder_dir(&src).await?;
        let pairs = crate::bench::train::synthetic_pairs(16, req.resolution)?;
        let gpu = gpu().await?;
        let report = crate::bench::train::run(&gpu, &src, dir, &pairs, req.settings(), req.steps as usize, &now_ms).await?;
        serde_json::to_string(&report).map_err(|e| Error::Io(e.to_string()))
    }
    run(&ae_url, ae_store, &settings_json).await.map_err(|e| to_js(&e))
}

/// Trains an image-to-image LDM on `pairs` (`[{name, cond, target}]`, each image
/// `{width, height, rgba}`) with the autoencoder of the folder `ae_url` (its `vae/` or `vqvae/`,
/// or the folder itself), read through `ae_store`; `settings_json` as [`TrainRequest`];
/// `resume`: `{path: bytes}` of a saved run to continue, or null. `on_event` receives
/// `{type: 'stage', stage: 'encode' | 'train'}`, `{type: 'train-step', step, steps, loss,
/// grad_norm, ms}`, `{type: 'checkpoint', step, files: [[path, bytes], ...]}` and
/// `{type: 'sample', step, width, height, rgba}` (from the first pair's condition). Resolves to
/// `{step, steps, losses}` as JSON; a cancelled run saves a checkpoint first.
#[wasm_bindgen]
pub async fn train(ae_url: String, ae_store: JsValue, pairs_list: JsValue, settings_json: String, resume: JsValue, on_event: js_sys::Function) -> Result<String, JsValue> {
    cancelled(true);
    settle(run_train(&ae_url, ae_store, &pairs_list, &settings_json, &resume, &on_event).await)
}

/// A training run's result for JavaScript; an error that leaves the device unusable resets the
/// engine first.
fn settle(result: Result<String>) -> Result<String, JsValue> {
    if let Err(e) = &result {
        if poisons_device(e) {
            reset_engine();
        }
    }
    result.map_err(|e| to_js(&e))
}

async fn run_train(ae_url: &str, ae_store: JsValue, pairs_list: &JsValue, settings_json: &str, resume: &JsValue, on_event: &js_sys::Function) -> Result<String> {
    let req: TrainRequest = serde_json::from_str(settings_json).map_err(|e| Error::Input(format!("training settings: {e}")))?;
    let pairs = pairs(pairs_list)?;
    let src = JsSource::new(ae_store, ae_url.to_string());
    let ae_dir = autoencoder_dir(&src).await?;
    let settings = req.settings();
    let saved = if resume.is_null() || resume.is_undefined() { None } else { Some(saved_files(resume)?) };
    let gpu = gpu().await?;
    event(on_event, "stage", &[("stage", "encode".into())]);
    let mut run = TrainingRun::start(&gpu, &src, ae_dir, &pairs, settings, saved.as_ref().map(|s| s as &dyn FileSource)).await?;
    event(on_event, "stage", &[("stage", "train".into())]);
    let cadence = Cadence {
        save_every: req.save_every.max(1), sample_every: req.sample_every, sample_at_end: true, sample_steps: req.sample_steps,
        sample_guidance: req.sample_guidance, weights: FileDType::F32,
    };
    let mut events = Events::new(on_event, run.info.step, run.info.config.steps);
    let outcome = run.train(&gpu, &cadence, Some(&pairs[0].cond), &|| Box::pin(next_task()), &mut |ev| events.send(ev)).await;
    report(&run.info, outcome)
}

/// A run's events as the worker's messages: `train-step`, `checkpoint` (with the files) and
/// `sample`; a step reports a Cancel as the error that stops the run.
struct Events<'a> {
    on_event: &'a js_sys::Function,
    step: u32,
    steps: u32,
    last: f64,
}

impl<'a> Events<'a> {
    fn new(on_event: &'a js_sys::Function, step: u32, steps: u32) -> Self {
        Self { on_event, step, steps, last: now_ms() }
    }

    fn send(&mut self, ev: RunEvent) -> Result<()> {
        let on_event = self.on_event;
        match ev {
            RunEvent::Step(s) => {
                self.step += 1;
                let t = now_ms();
                event(on_event, "train-step", &[("step", self.step.into()), ("steps", self.steps.into()), ("loss", s.loss.into()), ("grad_norm", s.grad_norm.into()), ("ms", (t - self.last).into())]);
                self.last = t;
                if cancelled(false) {
                    return Err(Error::Cancelled);
                }
            }
            RunEvent::Checkpoint(files) => {
                let list: js_sys::Array = files.iter().map(|(p, b)| -> JsValue { js_sys::Array::of2(&JsValue::from_str(p), &js_sys::Uint8Array::from(b.as_slice())).into() }).collect();
                event(on_event, "checkpoint", &[("step", self.step.into()), ("files", list.into())]);
            }
            RunEvent::Sample(images) => {
                let rgba: Vec<u8> = images.rgb8(0).chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
                let bytes = js_sys::Uint8ClampedArray::from(rgba.as_slice());
                event(on_event, "sample", &[("step", self.step.into()), ("width", images.width.into()), ("height", images.height.into()), ("rgba", bytes.into())]);
            }
        }
        Ok(())
    }
}

/// `{step, steps, losses, cancelled}` of a run that finished or was cancelled.
fn report(info: &RunInfo, outcome: Result<()>) -> Result<String> {
    let report = serde_json::json!({ "step": info.step, "steps": info.config.steps, "losses": info.losses, "cancelled": matches!(outcome, Err(Error::Cancelled)) });
    match outcome {
        Ok(()) | Err(Error::Cancelled) => Ok(report.to_string()),
        Err(e) => Err(e),
    }
}

/// The Train tab's LoRA settings (JSON), named as `ldm train-lora`'s flags.
#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LoraRequest {
    steps: u32,
    batch: usize,
    lr: f32,
    weight_decay: f32,
    max_grad_norm: f32,
    /// 0: the UNet's sample size times the VAE's factor.
    resolution: usize,
    rank: usize,
    /// 0: the rank.
    lora_alpha: f32,
    targets: Vec<String>,
    cond_dropout: f32,
    seed: u64,
    save_every: u32,
    sample_every: u32,
    sample_steps: usize,
    sample_guidance: f32,
    /// Empty: the first image's caption.
    sample_prompt: String,
    gradient_checkpointing: bool,
    mixed_precision: bool,
}

impl Default for LoraRequest {
    fn default() -> Self {
        let (c, l) = (TrainConfig::default(), LoraConfig::default());
        Self {
            steps: 500, batch: 1, lr: 1e-4, weight_decay: c.weight_decay, max_grad_norm: c.max_grad_norm, resolution: 0, rank: l.r, lora_alpha: 0.0,
            targets: l.target_modules, cond_dropout: 0.0, seed: 0, save_every: 50, sample_every: 50, sample_steps: 20, sample_guidance: 7.5,
            sample_prompt: String::new(), gradient_checkpointing: false, mixed_precision: false,
        }
    }
}

impl LoraRequest {
    fn settings(&self) -> LoraSettings {
        let config = TrainConfig {
            steps: self.steps, batch: self.batch, lr: self.lr, weight_decay: self.weight_decay, max_grad_norm: self.max_grad_norm, cond_dropout: self.cond_dropout,
            ema_decay: None, seed: self.seed, gradient_checkpointing: self.gradient_checkpointing, mixed_precision: self.mixed_precision, ..Default::default()
        };
        let alpha = if self.lora_alpha > 0.0 { self.lora_alpha } else { self.rank as f32 };
        LoraSettings { config, resolution: (self.resolution > 0).then_some(self.resolution), lora: LoraConfig { r: self.rank, lora_alpha: alpha, target_modules: self.targets.clone() } }
    }
}

/// `[{name, caption, image}]` as captioned images.
fn captioned(list: &JsValue) -> Result<Vec<CaptionedImage>> {
    let list = list.clone().dyn_into::<js_sys::Array>().map_err(|_| Error::Input("the training images must be an array".into()))?;
    list.iter()
        .map(|p| {
            let name = field(&p, "name")?.as_string().unwrap_or_default();
            let caption = field(&p, "caption")?.as_string().ok_or_else(|| Error::Input(format!("training image {name} has no caption")))?;
            Ok(CaptionedImage { image: image(&field(&p, "image")?, &name)?, caption, name })
        })
        .collect()
}

/// Fine-tunes the Stable Diffusion model of the folder `model_url` (read through `model_store`)
/// with LoRA on `images` (`[{name, caption, image: {width, height, rgba}}]`); `settings_json` as
/// [`LoraRequest`]; `resume`: `{path: bytes}` of a saved run, or null. Events and result as
/// [`train`]'s (checkpoints hold `pytorch_lora_weights.safetensors` and `training/`; samples
/// generate the sample prompt with the LoRA).
#[wasm_bindgen]
pub async fn train_lora(model_url: String, model_store: JsValue, images: JsValue, settings_json: String, resume: JsValue, on_event: js_sys::Function) -> Result<String, JsValue> {
    cancelled(true);
    settle(run_train_lora(&model_url, model_store, &images, &settings_json, &resume, &on_event).await)
}

async fn run_train_lora(model_url: &str, model_store: JsValue, images: &JsValue, settings_json: &str, resume: &JsValue, on_event: &js_sys::Function) -> Result<String> {
    let req: LoraRequest = serde_json::from_str(settings_json).map_err(|e| Error::Input(format!("LoRA training settings: {e}")))?;
    let images = captioned(images)?;
    let src = JsSource::new(model_store, model_url.to_string());
    let saved = if resume.is_null() || resume.is_undefined() { None } else { Some(saved_files(resume)?) };
    let gpu = gpu().await?;
    // The generation model leaves the device: training needs the memory.
    release_model(&gpu);
    event(on_event, "stage", &[("stage", "encode".into())]);
    let name = model_url.trim_end_matches('/').rsplit('/').next().unwrap_or("model").to_string();
    let mut run = LoraRun::start(&gpu, &src, &name, &images, req.settings(), saved.as_ref().map(|s| s as &dyn FileSource)).await?;
    event(on_event, "stage", &[("stage", "train".into())]);
    let cadence = Cadence {
        save_every: req.save_every.max(1), sample_every: req.sample_every, sample_at_end: true, sample_steps: req.sample_steps,
        sample_guidance: req.sample_guidance, weights: FileDType::F32,
    };
    let prompt = if req.sample_prompt.is_empty() { images[0].caption.clone() } else { req.sample_prompt.clone() };
    let mut events = Events::new(on_event, run.info.step, run.info.config.steps);
    let outcome = run.train(&gpu, &src, &cadence, &prompt, &|| Box::pin(next_task()), &mut |ev| events.send(ev)).await;
    report(&run.info, outcome)
}
