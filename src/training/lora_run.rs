//! A LoRA fine-tuning run of a Stable Diffusion model on the user's captioned images: the images
//! encoded once by the model's VAE (the latent distribution's mean times `scaling_factor`), the
//! captions once by its text encoder, then [`LoraTrainer`] steps; saved as
//! `pytorch_lora_weights.safetensors` plus `training/` (state to resume from).

use std::collections::BTreeMap;

use super::checkpoint::{read_run_info, restore_state, state_files, RunInfo};
use super::lora::{lora_values, LoraTrainer, LORA_FILE};
use super::pairs::PairLatents;
use super::run::{Cadence, RunEvent};
use super::{LoraConfig, Objective, StepStats, TrainConfig, UNet2DConditionTrainable};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::loader::lora::AdapterSet;
use crate::loader::{component_files, read_file, FileSource, LocalFuture, MemorySource, Weights};
use crate::models::unet_2d_condition::UNet2DConditionConfig;
use crate::pipelines::image_input::{resize_u8, InputImage, Resample};
use crate::pipelines::loading::{DiffusionModel, LoadOptions, StableDiffusionModel};
use crate::pipelines::prompt::{PromptText, PromptWeighting};
use crate::pipelines::stable_diffusion::{Images, Txt2ImgParams};
use crate::schedulers::DdpmScheduler;

/// One training image and its caption.
pub struct CaptionedImage {
    /// For messages and the run's record.
    pub name: String,
    pub image: InputImage,
    pub caption: String,
}

/// What a new LoRA run is made of (a resumed one reads these from its state).
pub struct LoraSettings {
    pub config: TrainConfig,
    /// Image side in pixels; `None`: the UNet's `sample_size` times the VAE's factor.
    pub resolution: Option<usize>,
    pub lora: LoraConfig,
}

/// `training/lora.json`: the LoRA config of a saved run.
const LORA_CONFIG_FILE: &str = "training/lora.json";

/// A LoRA run in progress.
pub struct LoraRun {
    pub trainer: LoraTrainer,
    pub data: PairLatents,
    pub info: RunInfo,
}

/// The centre square of `img`, resized to `side` (diffusers' `train_text_to_image` crops the
/// centre), as planar RGB in [-1, 1].
fn square_planar(img: &InputImage, side: usize) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let s = w.min(h);
    let (x0, y0) = ((w - s) / 2, (h - s) / 2);
    let rgb = img.rgb8();
    let mut crop = Vec::with_capacity(s * s * 3);
    for y in y0..y0 + s {
        crop.extend_from_slice(&rgb[(y * w + x0) * 3..(y * w + x0 + s) * 3]);
    }
    let px = if s == side { crop } else { resize_u8(&crop, s, s, 3, side, side, Resample::Bicubic) };
    let plane = side * side;
    let mut planar = vec![0f32; 3 * plane];
    for (i, p) in px.chunks_exact(3).enumerate() {
        for (k, &v) in p.iter().enumerate() {
            planar[k * plane + i] = v as f32 / 127.5 - 1.0;
        }
    }
    planar
}

/// The text embedding `[L, D]` of `caption` as the pipeline computes it for a prompt.
async fn caption_embedding(gpu: &Gpu, model: &StableDiffusionModel, caption: &str) -> Result<Vec<f32>> {
    let text = PromptText { prompt: caption, prompt_2: None, clip_skip: 0 };
    let e = model.text.encode(gpu, &text, PromptWeighting::None, false).await?;
    gpu.read(&e.context).await
}

fn json_error(what: &str) -> impl Fn(serde_json::Error) -> Error + '_ {
    move |e| Error::Model(format!("{what}: {e}"))
}

impl LoraRun {
    /// Encodes `images` with the Stable Diffusion model in `model_src` and starts a LoRA run on
    /// its UNet, or resumes the run saved in `resume` (its `training/`); `steps` of the settings
    /// extends a resumed run's length.
    pub async fn start(gpu: &Gpu, model_src: &dyn FileSource, name: &str, images: &[CaptionedImage], settings: LoraSettings, resume: Option<&dyn FileSource>) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::Input("no training images: give at least one image with a caption".into()));
        }
        let (info, lora, state) = match resume {
            Some(src) => {
                let read = |path: &'static str| async move { read_file(src, path).await?.ok_or_else(|| Error::Input(format!("{} is missing: is this the output folder of a LoRA training run?", src.describe(path)))) };
                let mut info = read_run_info(&read("training/state.json").await?)?;
                info.config.steps = settings.config.steps.max(info.step);
                let lora: LoraConfig = serde_json::from_slice(&read(LORA_CONFIG_FILE).await?).map_err(json_error(LORA_CONFIG_FILE))?;
                (info, lora, Some(read("training/state.safetensors").await?))
            }
            None => (RunInfo { config: settings.config, step: 0, losses: Vec::new(), resolution: settings.resolution.unwrap_or(0), pairs: Vec::new() }, settings.lora, None),
        };
        let opts = LoadOptions { dtype: Some(DType::F32), vae_encoder: true, ..Default::default() };
        let DiffusionModel::StableDiffusion(model) = DiffusionModel::load(gpu, model_src, name, &opts).await? else {
            return Err(Error::Input(format!("{name} is not a Stable Diffusion model folder: LoRA training fine-tunes a text-to-image UNet")));
        };
        if model.family.is_xl() {
            return Err(Error::Unsupported("LoRA training of SDXL UNets is not supported yet (their added conditions are not on the tape); Stable Diffusion 1.x and 2.x are".into()));
        }
        model.load_vae(gpu, model_src).await?;
        let vae = model.vae()?;
        let f = vae.config.scale_factor();
        let mut info = info;
        if info.resolution == 0 {
            info.resolution = model.unet.config.sample_size.unwrap_or(64) * f;
        }
        let side = info.resolution;
        let down = f * model.unet.config.downsample_factor();
        if side == 0 || side % down != 0 || side > 2048 {
            return Err(Error::Input(format!("training resolution {side} must be a multiple of {down} (the VAE's factor times the UNet's), at most 2048")));
        }
        let lat = side / f;
        let scale = vae.config.scaling_factor;
        let c = vae.config.latent_channels;
        let mut data = PairLatents { latent_shape: [c, lat, lat], cond_channels: 0, names: Vec::new(), x0: Vec::new(), cond: Vec::new() };
        for item in images {
            let x = gpu.upload(&[1, 3, side, side], DType::F32, &square_planar(&item.image, side))?;
            let dist = vae.encode(gpu, &x).await?;
            data.x0.push(dist.mean.iter().map(|v| v * scale).collect());
            data.cond.push(caption_embedding(gpu, &model, &item.caption).await?);
            data.names.push(item.name.clone());
        }
        let uncond = caption_embedding(gpu, &model, "").await?;
        let objective = match model.scheduler_config.get("prediction_type").and_then(|p| p.as_str()) {
            Some("v_prediction") => Objective::V,
            Some("epsilon") | None => Objective::Epsilon,
            Some(other) => return Err(Error::Unsupported(format!("LoRA training of a model that predicts {other:?} (epsilon and v_prediction are supported)"))),
        };
        info.config.objective = objective;
        // The training script's DDPMScheduler.from_pretrained(model, subfolder="scheduler").
        let alphas = DdpmScheduler::from_json(&model.scheduler_config, &[])?.alphas_cumprod().to_vec();
        let unet_config: UNet2DConditionConfig = model.unet.config.clone();
        // The inference model is done with: its weights leave the device before the trainer's load.
        drop(model);
        let unet = UNet2DConditionTrainable::new(unet_config, Some(lora))?;
        let files = component_files(model_src, "unet", "diffusion_pytorch_model", false).await?;
        let weights = Weights::new(model_src, files);
        // Under mixed precision the frozen weights are only ever read in f16: store them so.
        let w = weights.at(gpu, if info.config.mixed_precision { DType::F16 } else { DType::F32 }, "");
        let mut trainer = LoraTrainer::new(gpu, &w, unet, info.config.clone(), None, alphas, data.latent_shape, uncond).await?;
        if let Some(state) = state {
            restore_state(gpu, &mut trainer.trained, &state)?;
        }
        info.pairs = data.names.clone();
        Ok(Self { trainer, data, info })
    }

    /// Whether the run has taken all its steps.
    pub fn done(&self) -> bool {
        self.info.step >= self.info.config.steps
    }

    /// Takes the next step.
    pub async fn step(&mut self, gpu: &Gpu) -> Result<StepStats> {
        let batch = self.data.batch(&self.info.config, self.info.step, self.trainer.train_timesteps());
        let stats = self.trainer.step(gpu, &batch).await?;
        self.info.step += 1;
        self.info.losses.push(stats.loss);
        Ok(stats)
    }

    /// Takes the remaining steps, saving and sampling `prompt` as `cadence` says (its `weights`
    /// do not apply: a LoRA is saved in f32), as [`super::run::TrainingRun::train`] does: when `on`
    /// fails (a cancellation) the run saves where it is and stops with that error; `between` is
    /// awaited before each step.
    pub async fn train(
        &mut self, gpu: &Gpu, model_src: &dyn FileSource, cadence: &Cadence, prompt: &str, between: &dyn Fn() -> LocalFuture<'static, ()>, on: &mut dyn FnMut(RunEvent) -> Result<()>,
    ) -> Result<()> {
        while !self.done() {
            between().await;
            let stats = self.step(gpu).await?;
            let step = self.info.step;
            if let Err(e) = on(RunEvent::Step(stats)) {
                if cadence.save_every > 0 {
                    on(RunEvent::Checkpoint(&self.files(gpu).await?)).ok();
                }
                return Err(e);
            }
            if cadence.save_every > 0 && (step.is_multiple_of(cadence.save_every) || self.done()) {
                on(RunEvent::Checkpoint(&self.files(gpu).await?))?;
            }
            if (cadence.sample_every > 0 && step.is_multiple_of(cadence.sample_every)) || (cadence.sample_at_end && self.done()) {
                on(RunEvent::Sample(&self.sample(gpu, model_src, prompt, cadence.sample_steps, cadence.sample_guidance, 0).await?))?;
            }
        }
        Ok(())
    }

    /// `pytorch_lora_weights.safetensors` and the state's files (paths relative to the run's folder).
    pub async fn files(&self, gpu: &Gpu) -> Result<Vec<(String, Vec<u8>)>> {
        let lora = self.trainer.unet.lora.as_ref().ok_or_else(|| Error::Model("a LoRA run without a LoRA config (a bug in ldm-web)".into()))?;
        let mut files = vec![(LORA_FILE.to_string(), self.trainer.lora_file(gpu).await?)];
        files.push((LORA_CONFIG_FILE.to_string(), serde_json::to_vec_pretty(lora).map_err(|e| Error::Io(e.to_string()))?));
        files.extend(state_files(gpu, &self.trainer.trained, &self.info).await?);
        Ok(files)
    }

    /// Generates `prompt` with the model in `model_src` and the LoRA as it is now.
    pub async fn sample(&self, gpu: &Gpu, model_src: &dyn FileSource, prompt: &str, steps: usize, guidance: f32, seed: u64) -> Result<Images> {
        let file = self.trainer.lora_file(gpu).await?;
        // Check the file reads back as this UNet's adapters before handing it to the loader.
        lora_values(&self.trainer.unet, &file, LORA_FILE)?;
        let mut set = AdapterSet::new();
        set.add(Box::new(MemorySource::new("the LoRA being trained", [(LORA_FILE.to_string(), file)])), LORA_FILE, "trained LoRA", 1.0).await?;
        let opts = LoadOptions { dtype: Some(DType::F32), adapters: Some(std::rc::Rc::new(set)), ..Default::default() };
        let DiffusionModel::StableDiffusion(model) = DiffusionModel::load(gpu, model_src, "training", &opts).await? else {
            return Err(Error::Model("the base model did not load as a Stable Diffusion pipeline".into()));
        };
        let r = self.info.resolution;
        let p = Txt2ImgParams { prompt: prompt.to_string(), seed, steps, guidance_scale: guidance, width: r, height: r, batch: 1, ..Default::default() };
        let (images, _) = model.txt2img(gpu, &p, &|| 0.0, &mut |_| Ok(())).await?;
        Ok(images)
    }

    /// What the run recorded, for reports: name → value.
    pub fn summary(&self) -> BTreeMap<&'static str, serde_json::Value> {
        let losses = &self.info.losses;
        let tail = &losses[losses.len().saturating_sub(10)..];
        let adapters: usize = super::lora::adapter_specs(&self.trainer.unet).iter().map(|s| s.numel()).sum();
        BTreeMap::from([
            ("images", serde_json::json!(self.data.len())),
            ("lora_parameters", serde_json::json!(adapters)),
            ("batch", serde_json::json!(self.info.config.batch)),
            ("resolution", serde_json::json!(self.info.resolution)),
            ("first_loss", serde_json::json!(losses.first())),
            ("mean_loss_last_10", serde_json::json!(tail.iter().sum::<f32>() / tail.len().max(1) as f32)),
        ])
    }
}
