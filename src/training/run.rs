//! A whole training run of a concatenation-conditioned image-to-image LDM, as `ldm train` and
//! the page's Train tab drive it: encode the pairs with the frozen autoencoder, build or resume
//! the UNet and its optimiser, take steps, write the model folder and the resumable state, and
//! sample images from the model as it is.

use super::checkpoint::{model_files, read_run_info, restore_state, state_files, AutoencoderFiles, RunInfo};
use super::pairs::{Pair, PairLatents};
use super::{init_values, StepStats, TrainConfig, Trainer, UNet2DTrainable};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::loader::safetensors::FileDType;
use crate::loader::{FileSource, LocalFuture, MemorySource};
use crate::models::unet_2d::UNet2DConfig;
use crate::pipelines::image_input::{InputImage, Resample};
use crate::pipelines::ldm::{ConcatCondition, ConditionStage, FirstStage, LdmImage};
use crate::pipelines::loading::ComponentQuant;
use crate::pipelines::stable_diffusion::{Images, Txt2ImgParams};
use crate::pipelines::{DiffusionModel, LoadOptions};
use crate::schedulers::{DdpmConfig, DdpmScheduler};

/// The noise schedule of new runs: the latent diffusion paper's (CompVis' `linear_start` 0.0015,
/// `linear_end` 0.0195, their "linear" being diffusers' `scaled_linear`).
pub fn default_schedule() -> serde_json::Value {
    serde_json::json!({ "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear" })
}

/// A `UNet2DModel` config.json for `latent` channels predicted from `latent + cond` input
/// channels: `channels` per level (attention from the second level on, and in the middle),
/// `layers` resnets per level, heads of `head_dim` channels.
pub fn unet_config(latent: usize, cond: usize, channels: &[usize], layers: usize, head_dim: usize, sample_size: usize) -> Result<serde_json::Value> {
    if channels.is_empty() || channels.contains(&0) || layers == 0 {
        return Err(Error::Input("the UNet needs at least one level of a positive channel count and one resnet per level".into()));
    }
    let groups = channels.iter().fold(32, |g, &c| gcd(g, c));
    let down: Vec<&str> = (0..channels.len()).map(|i| if i == 0 { "DownBlock2D" } else { "AttnDownBlock2D" }).collect();
    let up: Vec<&str> = (0..channels.len()).rev().map(|i| if i == 0 { "UpBlock2D" } else { "AttnUpBlock2D" }).collect();
    let config = serde_json::json!({
        "_class_name": "UNet2DModel", "sample_size": sample_size, "in_channels": latent + cond, "out_channels": latent,
        "center_input_sample": false, "time_embedding_type": "positional", "freq_shift": 0, "flip_sin_to_cos": true,
        "down_block_types": down, "mid_block_type": "UNetMidBlock2D", "up_block_types": up, "block_out_channels": channels,
        "layers_per_block": layers, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "act_fn": "silu", "attention_head_dim": head_dim, "norm_num_groups": groups, "norm_eps": 1e-5,
        "resnet_time_scale_shift": "default", "add_attention": true,
    });
    let parsed: UNet2DConfig = serde_json::from_value(config.clone()).map_err(|e| Error::Input(format!("UNet config: {e}")))?;
    parsed.validate()?;
    Ok(config)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The condition of models trained here: an RGB image encoded by the model's own autoencoder.
pub fn first_stage_condition() -> ConcatCondition {
    ConcatCondition { stage: ConditionStage::FirstStage, channels: 3, range: [-1.0, 1.0], resample: Resample::Bicubic, rescale: None }
}

/// Where the autoencoder is in `src`: `vae/` (a Stable Diffusion folder, as the built-in model),
/// `vqvae/` (an LDM folder, as a trained model) or the folder itself (a component folder).
pub async fn autoencoder_dir(src: &dyn FileSource) -> Result<&'static str> {
    for dir in ["vae", "vqvae", ""] {
        if src.size(&crate::loader::join_path(dir, "config.json")).await?.is_some() {
            return Ok(dir);
        }
    }
    Err(Error::Input(format!("{} holds no autoencoder (vae/config.json, vqvae/config.json or config.json)", src.describe(""))))
}

/// What a new run is made of (a resumed one reads these from its state).
pub struct RunSettings {
    pub config: TrainConfig,
    pub resolution: usize,
    pub unet: UNetSpec,
    /// `None`: [`default_schedule`].
    pub schedule: Option<serde_json::Value>,
}

/// The UNet of a new run.
#[derive(Clone, Debug)]
pub enum UNetSpec {
    /// A `UNet2DModel` `config.json`.
    Config(serde_json::Value),
    /// [`unet_config`] with these channels per level, resnets per level and head width.
    Levels { channels: Vec<usize>, layers: usize, head_dim: usize },
}

impl Default for UNetSpec {
    fn default() -> Self {
        Self::Levels { channels: vec![64, 128], layers: 1, head_dim: 32 }
    }
}

/// When a run saves and samples.
#[derive(Clone, Copy, Debug)]
pub struct Cadence {
    /// Save every this many steps and at the end (0: never).
    pub save_every: u32,
    /// Sample every this many steps (0: never), and at the end when `sample_at_end`.
    pub sample_every: u32,
    pub sample_at_end: bool,
    pub sample_steps: usize,
    pub sample_guidance: f32,
    /// Type of the saved UNet weights.
    pub weights: FileDType,
}

/// What [`TrainingRun::train`] reports.
pub enum RunEvent<'a> {
    Step(StepStats),
    /// The model folder's and state's files at this step.
    Checkpoint(&'a [(String, Vec<u8>)]),
    /// Generated from the sampling condition.
    Sample(&'a Images),
}

/// A run in progress.
pub struct TrainingRun {
    pub trainer: Trainer,
    pub data: PairLatents,
    pub info: RunInfo,
    autoencoder: AutoencoderFiles,
    unet_config: serde_json::Value,
    schedule: serde_json::Value,
    condition: ConcatCondition,
}

impl TrainingRun {
    /// Encodes `pairs` with the autoencoder in `ae_dir` of `ae_src` and starts a new run, or
    /// resumes the saved one `resume` (its `training/state.json` and `training/state.safetensors`
    /// and `unet/config.json`, `scheduler/scheduler_config.json`); `steps` of the settings or of
    /// `more_steps` extends the resumed run's length.
    pub async fn start(gpu: &Gpu, ae_src: &dyn FileSource, ae_dir: &'static str, pairs: &[Pair], settings: RunSettings, resume: Option<&dyn FileSource>) -> Result<Self> {
        let autoencoder = AutoencoderFiles::read(ae_src, ae_dir).await?;
        let first_stage = FirstStage::load(gpu, ae_src, ae_dir, &autoencoder.class, DType::F32, &ComponentQuant::default(), true).await?;
        let condition = first_stage_condition();
        let (info, unet_config, schedule, state) = match resume {
            Some(src) => {
                let read = |path: &'static str| async move { crate::loader::read_file(src, path).await?.ok_or_else(|| Error::Input(format!("{} is missing: is this the output folder of a training run?", src.describe(path)))) };
                let mut info = read_run_info(&read("training/state.json").await?)?;
                info.config.steps = settings.config.steps.max(info.step);
                let unet_config: serde_json::Value = crate::loader::parse_config_json(&read("unet/config.json").await?).map_err(|e| Error::Model(e.to_string()))?;
                let sched: serde_json::Value = crate::loader::parse_config_json(&read("scheduler/scheduler_config.json").await?).map_err(|e| Error::Model(e.to_string()))?;
                (info, unet_config, sched, Some(read("training/state.safetensors").await?))
            }
            None => {
                let lat = settings.resolution / first_stage.scale_factor().max(1);
                let cc = condition.unet_channels(&first_stage);
                let unet_config = match settings.unet {
                    UNetSpec::Config(c) => c,
                    UNetSpec::Levels { channels, layers, head_dim } => unet_config(first_stage.latent_channels(), cc, &channels, layers, head_dim, lat)?,
                };
                let info = RunInfo { config: settings.config, step: 0, losses: Vec::new(), resolution: settings.resolution, pairs: Vec::new() };
                (info, unet_config, settings.schedule.unwrap_or_else(default_schedule), None)
            }
        };
        let data = PairLatents::encode(gpu, &first_stage, &condition, pairs, info.resolution).await?;
        let config: UNet2DConfig = serde_json::from_value(unet_config.clone()).map_err(|e| Error::Model(format!("UNet config: {e}")))?;
        let unet = UNet2DTrainable::new(config)?;
        let ddpm: DdpmConfig = serde_json::from_value(schedule.clone()).map_err(|e| Error::Model(format!("noise schedule: {e}")))?;
        let alphas = DdpmScheduler::new(ddpm)?.alphas_cumprod().to_vec();
        let values = init_values(unet.params(), info.config.seed);
        let mut trainer = Trainer::new(gpu, unet, info.config.clone(), &values, alphas, data.latent_shape, data.cond_channels)?;
        if let Some(state) = state {
            restore_state(gpu, &mut trainer.trained, &state)?;
        }
        let mut info = info;
        info.pairs = data.names.clone();
        Ok(Self { trainer, data, info, autoencoder, unet_config, schedule, condition })
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

    /// Takes the remaining steps, saving and sampling (from `condition`) as `cadence` says. When
    /// `on` fails (a cancellation, say) the run saves where it is, if it saves at all, and stops
    /// with that error.
    /// `between` is awaited before each step: the page's worker yields to its event loop there,
    /// so that a Cancel message (or anything else queued) is seen between steps even when the CPU
    /// backend's steps complete without waiting for anything.
    pub async fn train(&mut self, gpu: &Gpu, cadence: &Cadence, condition: Option<&InputImage>, between: &dyn Fn() -> LocalFuture<'static, ()>, on: &mut dyn FnMut(RunEvent) -> Result<()>) -> Result<()> {
        while !self.done() {
            between().await;
            let stats = self.step(gpu).await?;
            let step = self.info.step;
            if let Err(e) = on(RunEvent::Step(stats)) {
                if cadence.save_every > 0 {
                    on(RunEvent::Checkpoint(&self.files(gpu, cadence.weights).await?)).ok();
                }
                return Err(e);
            }
            if cadence.save_every > 0 && (step % cadence.save_every == 0 || self.done()) {
                on(RunEvent::Checkpoint(&self.files(gpu, cadence.weights).await?))?;
            }
            let due = (cadence.sample_every > 0 && step % cadence.sample_every == 0) || (cadence.sample_at_end && self.done());
            if let (true, Some(c)) = (due, condition) {
                on(RunEvent::Sample(&self.sample(gpu, c, cadence.sample_steps, cadence.sample_guidance, 0).await?))?;
            }
        }
        Ok(())
    }

    /// The model folder's files and the state's (paths relative to the folder).
    pub async fn files(&self, gpu: &Gpu, dtype: FileDType) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = model_files(gpu, &self.trainer, &self.unet_config, &self.schedule, &self.autoencoder, &self.condition, &self.info, dtype).await?;
        files.extend(state_files(gpu, &self.trainer.trained, &self.info).await?);
        Ok(files)
    }

    /// Generates from `condition` with the model as it is now (EMA weights when there are):
    /// DDIM with `steps` steps and guidance `guidance`.
    pub async fn sample(&self, gpu: &Gpu, condition: &InputImage, steps: usize, guidance: f32, seed: u64) -> Result<Images> {
        let files = model_files(gpu, &self.trainer, &self.unet_config, &self.schedule, &self.autoencoder, &self.condition, &self.info, FileDType::F32).await?;
        let src = MemorySource::new("the model being trained", files);
        let opts = LoadOptions { dtype: Some(DType::F32), ..Default::default() };
        let DiffusionModel::Ldm(model) = DiffusionModel::load(gpu, &src, "training", &opts).await? else {
            return Err(Error::Model("the trained model did not load as an LDM pipeline (a bug in ldm-web)".into()));
        };
        let r = self.info.resolution;
        let p = Txt2ImgParams { seed, steps, guidance_scale: guidance, width: r, height: r, batch: 1, ..Default::default() };
        let (images, _) = model.generate(gpu, &p, Some(&LdmImage::Condition(condition.clone())), &|| 0.0, &mut |_| Ok(())).await?;
        Ok(images)
    }
}
