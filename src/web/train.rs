//! Training in the page (the Train tab): the same run as `ldm train`, on the engine's device,
//! with its steps, checkpoints and samples sent to the worker as events.

use wasm_bindgen::prelude::*;

use super::engine::{cancelled, event, gpu, now_ms, poisons_device, reset_engine, to_js};
use super::source::JsSource;
use crate::error::{Error, Result};
use crate::loader::safetensors::FileDType;
use crate::loader::{FileSource, MemorySource};
use crate::pipelines::image_input::InputImage;
use crate::training::pairs::Pair;
use crate::training::run::{autoencoder_dir, Cadence, RunEvent, RunSettings, TrainingRun, UNetSpec};
use crate::training::{Objective, TrainConfig};

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
}

impl Default for TrainRequest {
    fn default() -> Self {
        let c = TrainConfig::default();
        Self {
            steps: c.steps, batch: c.batch, lr: c.lr, weight_decay: c.weight_decay, max_grad_norm: c.max_grad_norm, resolution: 64,
            objective: c.objective, cond_dropout: c.cond_dropout, ema_decay: c.ema_decay.unwrap_or(0.0), seed: 0,
            channels: vec![64, 128], layers_per_block: 1, head_dim: 32, save_every: 50, sample_every: 50, sample_steps: 20, sample_guidance: 1.0, gradient_checkpointing: false,
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
            gradient_checkpointing: self.gradient_checkpointing, mixed_precision: false,
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
    let result = run_train(&ae_url, ae_store, &pairs_list, &settings_json, &resume, &on_event).await;
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
    let (mut step, steps) = (run.info.step, run.info.config.steps);
    let mut last = now_ms();
    let outcome = run
        .train(&gpu, &cadence, Some(&pairs[0].cond), &|| Box::pin(next_task()), &mut |ev| {
            match ev {
                RunEvent::Step(s) => {
                    step += 1;
                    let t = now_ms();
                    event(on_event, "train-step", &[("step", step.into()), ("steps", steps.into()), ("loss", s.loss.into()), ("grad_norm", s.grad_norm.into()), ("ms", (t - last).into())]);
                    last = t;
                    if cancelled(false) {
                        return Err(Error::Cancelled);
                    }
                }
                RunEvent::Checkpoint(files) => {
                    let list: js_sys::Array = files.iter().map(|(p, b)| -> JsValue { js_sys::Array::of2(&JsValue::from_str(p), &js_sys::Uint8Array::from(b.as_slice())).into() }).collect();
                    event(on_event, "checkpoint", &[("step", step.into()), ("files", list.into())]);
                }
                RunEvent::Sample(images) => {
                    let rgba: Vec<u8> = images.rgb8(0).chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
                    let bytes = js_sys::Uint8ClampedArray::from(rgba.as_slice());
                    event(on_event, "sample", &[("step", step.into()), ("width", images.width.into()), ("height", images.height.into()), ("rgba", bytes.into())]);
                }
            }
            Ok(())
        })
        .await;
    let report = serde_json::json!({ "step": run.info.step, "steps": run.info.config.steps, "losses": run.info.losses, "cancelled": matches!(outcome, Err(Error::Cancelled)) });
    match outcome {
        Ok(()) | Err(Error::Cancelled) => Ok(report.to_string()),
        Err(e) => Err(e),
    }
}
