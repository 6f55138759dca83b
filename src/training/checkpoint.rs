//! A training run on disk (or in the browser's storage): the trained model as a diffusers
//! `LDMPipeline` folder that `ldm generate`, the page and diffusers load as they are, plus the
//! optimiser's state under `training/` so that the run can be resumed.
//!
//! The folder: `model_index.json`, `unet/` (config.json and the EMA weights, or the trained
//! ones without EMA), `vqvae/` (the frozen autoencoder, copied), `scheduler/` (a DDIMScheduler
//! with the training noise schedule and objective), `ldm-web.json` (the concatenation condition
//! and the run's settings and losses), `training/state.safetensors` (weights, AdamW moments,
//! EMA) and `training/state.json`.

use std::collections::BTreeMap;

use super::{safetensors_bytes, values_from_safetensors, Ema, LossScaler, Objective, Optimised, ParamSpec, TrainConfig, Trainer};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::safetensors::FileDType;
use crate::loader::{read_file, FileSource};
use crate::pipelines::ldm::ConcatCondition;

/// The frozen autoencoder's files, copied into every saved model.
#[derive(Clone)]
pub struct AutoencoderFiles {
    /// `VQModel` or `AutoencoderKL`.
    pub class: String,
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
}

impl AutoencoderFiles {
    /// Reads `dir`'s `config.json` and `diffusion_pytorch_model.safetensors` from `src`.
    pub async fn read(src: &dyn FileSource, dir: &str) -> Result<Self> {
        let path = |f: &str| crate::loader::join_path(dir, f);
        let config = read_file(src, &path("config.json")).await?.ok_or_else(|| Error::Input(format!("{} does not exist: point --autoencoder at an AutoencoderKL or VQModel folder", src.describe(&path("config.json")))))?;
        let value: serde_json::Value = crate::loader::parse_config_json(&config).map_err(|e| Error::Model(format!("{} is not valid JSON: {e}", src.describe(&path("config.json")))))?;
        let class = value.get("_class_name").and_then(|c| c.as_str()).unwrap_or("AutoencoderKL").to_string();
        let weights = match read_file(src, &path("diffusion_pytorch_model.safetensors")).await? {
            Some(w) => w,
            None => read_file(src, &path("diffusion_pytorch_model.fp16.safetensors")).await?.ok_or_else(|| Error::Input(format!("{} has no diffusion_pytorch_model.safetensors", src.describe(dir))))?,
        };
        Ok(Self { class, config, weights })
    }
}

/// What a saved run records besides weights.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub config: TrainConfig,
    /// Steps taken.
    pub step: u32,
    /// The loss of every step so far.
    pub losses: Vec<f32>,
    pub resolution: usize,
    /// Names of the training pairs.
    pub pairs: Vec<String>,
}

fn json(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Io(e.to_string()))
}

async fn read_all(gpu: &Gpu, ts: &[Tensor]) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(ts.len());
    for t in ts {
        out.push(gpu.read(t).await?);
    }
    Ok(out)
}

/// The diffusers scheduler config of the trained model: DDIM over the training schedule.
pub fn scheduler_config(train_schedule: &serde_json::Value, objective: Objective) -> serde_json::Value {
    let mut s = serde_json::json!({
        "_class_name": "DDIMScheduler",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    });
    for key in ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule"] {
        if let Some(v) = train_schedule.get(key) {
            s[key] = v.clone();
        }
    }
    s["prediction_type"] = serde_json::json!(match objective {
        Objective::Epsilon => "epsilon",
        Objective::V => "v_prediction",
    });
    s
}

/// The files of the trained model folder (paths relative to it). `unet_config` is the UNet's
/// `config.json` as given; weights are written in `dtype`.
#[allow(clippy::too_many_arguments)]
pub async fn model_files(
    gpu: &Gpu, trainer: &Trainer, unet_config: &serde_json::Value, train_schedule: &serde_json::Value, autoencoder: &AutoencoderFiles,
    condition: &ConcatCondition, info: &RunInfo, dtype: FileDType,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut unet_config = unet_config.clone();
    unet_config["_class_name"] = serde_json::json!("UNet2DModel");
    let index = serde_json::json!({
        "_class_name": "LDMPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", autoencoder.class],
    });
    let hints = serde_json::json!({
        "concat": condition,
        "training": { "config": info.config, "step": info.step, "resolution": info.resolution, "pairs": info.pairs.len(), "losses": info.losses },
    });
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), "pt".into());
    let values = read_all(gpu, trainer.trained.inference_params()).await?;
    let weights = safetensors_bytes(trainer.unet.params(), &values, dtype, &meta)?;
    Ok(vec![
        ("model_index.json".into(), json(&index)?),
        ("unet/config.json".into(), json(&unet_config)?),
        ("unet/diffusion_pytorch_model.safetensors".into(), weights),
        ("vqvae/config.json".into(), autoencoder.config.clone()),
        ("vqvae/diffusion_pytorch_model.safetensors".into(), autoencoder.weights.clone()),
        ("scheduler/scheduler_config.json".into(), json(&scheduler_config(train_schedule, info.config.objective))?),
        ("ldm-web.json".into(), json(&hints)?),
    ])
}

fn prefixed(specs: &[ParamSpec], prefix: &str) -> Vec<ParamSpec> {
    specs.iter().map(|s| ParamSpec { name: format!("{prefix}.{}", s.name), ..s.clone() }).collect()
}

/// `training/state.safetensors` and `training/state.json`: everything [`restore_state`] needs.
pub async fn state_files(gpu: &Gpu, trainer: &Optimised, info: &RunInfo) -> Result<Vec<(String, Vec<u8>)>> {
    let specs = &trainer.specs;
    let mut all_specs = prefixed(specs, "param");
    let mut values = read_all(gpu, &trainer.params).await?;
    let moments = trainer.optimizer.moments();
    if moments.iter().all(Option::is_some) && trainer.optimizer.steps > 0 {
        let (m, v): (Vec<Tensor>, Vec<Tensor>) = moments.iter().flatten().cloned().unzip();
        all_specs.extend(prefixed(specs, "adam_m"));
        values.extend(read_all(gpu, &m).await?);
        all_specs.extend(prefixed(specs, "adam_v"));
        values.extend(read_all(gpu, &v).await?);
    }
    if let Some(ema) = &trainer.ema {
        all_specs.extend(prefixed(specs, "ema"));
        values.extend(read_all(gpu, &ema.shadow).await?);
    }
    let mut meta = BTreeMap::new();
    meta.insert("adam_steps".into(), trainer.optimizer.steps.to_string());
    meta.insert("ema_updates".into(), trainer.ema.as_ref().map_or(0, |e| e.updates).to_string());
    if let Some(s) = trainer.scaler {
        meta.insert("loss_scale".into(), s.scale.to_string());
        meta.insert("loss_scale_growth_tracker".into(), s.growth_tracker.to_string());
    }
    let state = safetensors_bytes(&all_specs, &values, FileDType::F32, &meta)?;
    let info = serde_json::to_value(info).map_err(|e| Error::Io(e.to_string()))?;
    Ok(vec![("training/state.safetensors".into(), state), ("training/state.json".into(), json(&info)?)])
}

/// Reads `training/state.json` of a saved run.
pub fn read_run_info(bytes: &[u8]) -> Result<RunInfo> {
    serde_json::from_slice(bytes).map_err(|e| Error::Model(format!("training/state.json is not a training state of this version: {e}")))
}

/// Puts a saved state (from [`state_files`]) back into the trained tensors.
pub fn restore_state(gpu: &Gpu, trainer: &mut Optimised, state: &[u8]) -> Result<()> {
    let specs = trainer.specs.clone();
    let what = "training/state.safetensors";
    let upload = |values: Vec<Vec<f32>>| -> Result<Vec<Tensor>> { specs.iter().zip(values).map(|(s, v)| gpu.upload(&s.shape, DType::F32, &v)).collect() };
    trainer.params = upload(values_from_safetensors(&prefixed(&specs, "param"), state, what)?)?;
    let n = crate::loader::safetensors::header_len(state, state.len() as u64, what)? as usize;
    let header = crate::loader::safetensors::parse_header(&state[8..8 + n], state.len() as u64, what)?;
    let number = |key: &str| header.metadata.get(key).and_then(|v| v.parse::<u32>().ok()).ok_or_else(|| Error::Model(format!("{what} has no {key}")));
    let steps = number("adam_steps")?;
    if steps > 0 {
        let m = upload(values_from_safetensors(&prefixed(&specs, "adam_m"), state, what)?)?;
        let v = upload(values_from_safetensors(&prefixed(&specs, "adam_v"), state, what)?)?;
        trainer.optimizer.restore(steps, m.into_iter().zip(v).map(Some).collect())?;
    }
    if let Some(ema) = &mut trainer.ema {
        let shadow = upload(values_from_safetensors(&prefixed(&specs, "ema"), state, what)?)?;
        *ema = Ema { decay: ema.decay, updates: number("ema_updates")?, shadow };
    }
    if let (Some(scaler), Some(scale)) = (&mut trainer.scaler, header.metadata.get("loss_scale").and_then(|v| v.parse::<f32>().ok())) {
        *scaler = LossScaler { scale, growth_tracker: number("loss_scale_growth_tracker")? };
    }
    Ok(())
}
