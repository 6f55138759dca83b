//! Assembling a Stable Diffusion model from a diffusers folder or a single-file checkpoint.

use std::cell::OnceCell;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use super::ldm::{LdmKind, LdmModel};
use super::single_file;
use crate::loader::{component_files, read_file, read_json, refuse_pickle, FileSource, WeightFile, WeightLog, Weights, W};
use crate::models::{AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, ControlNetConfig, ControlNetModel, UNet2DConditionConfig, UNet2DConditionModel};
use crate::tokenizer::{ClipTokenizer, TokenizerConfig};

/// What to load besides the text-to-image essentials.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Load the VAE encoder too (img2img, inpainting).
    pub vae_encoder: bool,
    /// Prefer `*.fp16.safetensors` files when both precisions are present (smaller downloads).
    pub prefer_fp16: bool,
    /// Activation and weight dtype on the GPU; `None`: f32 (bit-for-bit closest to diffusers).
    pub dtype: Option<DType>,
    /// CLIP's BPE merges (`bpe_simple_vocab_16e6.txt`, see `assets/clip/`) for single-file
    /// checkpoints, which carry no tokenizer.
    pub clip_bpe: Option<String>,
    /// Leave the VAE's weights for [`StableDiffusionModel::load_vae`], so denoising can start
    /// while they are still downloading (the browser).
    pub defer_vae: bool,
    /// Quantise Linear and Conv2d weights on the fly, per component (weights a converted model
    /// stores quantised are used as stored whatever this says).
    pub quant: ComponentQuant,
    /// Always decode latents in tiles (diffusers' `enable_vae_tiling`); without it, only when
    /// the whole image would exceed the adapter's binding size.
    pub vae_tiling: bool,
}

/// A quantised type (q8_0, q4_0, q4_1) per model component, `None` for float weights.
#[derive(Clone, Debug, Default)]
pub struct ComponentQuant {
    pub unet: Option<DType>,
    /// The text encoder (CLIP, or LDMBert).
    pub text_encoder: Option<DType>,
    /// The first stage: AutoencoderKL or VQModel.
    pub vae: Option<DType>,
    /// Records what each component read (`ldm convert` writes that).
    pub log: Option<WeightLog>,
}

impl ComponentQuant {
    /// `w` set up for the component in `folder` (`unet`, `text_encoder` / `bert`, `vae` / `vqvae`).
    pub(crate) fn apply<'w, 's>(&self, w: W<'w, 's>, folder: &'static str) -> W<'w, 's> {
        let quant = match folder {
            // A ControlNet is half a UNet, quantised as the UNet.
            "unet" | "controlnet" => self.unet,
            "text_encoder" | "bert" => self.text_encoder,
            _ => self.vae,
        };
        w.with_quant(quant).logged(self.log.as_ref(), folder)
    }
}

/// Any model a diffusers folder holds, chosen by `model_index.json`'s `_class_name`: Stable
/// Diffusion or one of the latent diffusion paper's pipelines.
pub enum DiffusionModel {
    StableDiffusion(StableDiffusionModel),
    Ldm(LdmModel),
}

impl DiffusionModel {
    /// Loads the folder `src` as the pipeline its `model_index.json` names.
    pub async fn load(gpu: &Gpu, src: &dyn FileSource, name: &str, opts: &LoadOptions) -> Result<Self> {
        let index: serde_json::Value = config(src, "model_index.json").await?;
        let class = index.get("_class_name").and_then(|c| c.as_str()).unwrap_or("StableDiffusionPipeline");
        match LdmKind::from_class_name(class) {
            Some(kind) => Ok(Self::Ldm(LdmModel::load(gpu, src, name, kind, &index, opts.dtype.unwrap_or(DType::F32), &opts.quant).await?)),
            None => Ok(Self::StableDiffusion(StableDiffusionModel::load(gpu, src, name, opts).await?)),
        }
    }

    /// The name shown in PNG metadata.
    pub fn name(&self) -> &str {
        match self {
            Self::StableDiffusion(m) => &m.name,
            Self::Ldm(m) => &m.name,
        }
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> &serde_json::Value {
        match self {
            Self::StableDiffusion(m) => &m.scheduler_config,
            Self::Ldm(m) => &m.scheduler_config,
        }
    }
}

/// Where the VAE's weights are, until they are loaded.
#[derive(Clone)]
enum VaeWeights {
    Folder { prefer_fp16: bool },
    SingleFile(WeightFile),
}

/// The components of a Stable Diffusion 1.x / 2.x text-to-image model.
pub struct StableDiffusionModel {
    /// Shown in PNG metadata (the folder or file name).
    pub name: String,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae_config: AutoencoderKLConfig,
    vae: OnceCell<AutoencoderKL>,
    vae_weights: VaeWeights,
    vae_encoder: bool,
    vae_quant: ComponentQuant,
    /// `scheduler/scheduler_config.json` as written (with `_class_name`).
    pub scheduler_config: serde_json::Value,
    pub dtype: DType,
    /// The folder's `ldm-web.json`, when it has one.
    pub hints: ModelHints,
    /// `StableDiffusionUpscalePipeline` folders: how the low-resolution image is noised.
    pub upscaler: Option<UpscalerNoise>,
    /// Always decode in tiles ([`LoadOptions::vae_tiling`]).
    pub vae_tiling: bool,
}

/// The x4 upscaler's noise augmentation of its low-resolution input: the `low_res_scheduler`'s
/// `alphas_cumprod`, and the largest noise level the pipeline accepts (`max_noise_level`).
#[derive(Clone, Debug)]
pub struct UpscalerNoise {
    pub alphas_cumprod: Vec<f32>,
    pub max_noise_level: u32,
}

impl UpscalerNoise {
    /// Reads what `model_index.json` names (`None` for other pipelines).
    async fn load(src: &dyn FileSource, index: &serde_json::Value) -> Result<Option<Self>> {
        if index.get("low_res_scheduler").is_none() {
            return Ok(None);
        }
        let cfg: serde_json::Value = config(src, "low_res_scheduler/scheduler_config.json").await?;
        let sched = crate::schedulers::build_default(&cfg)?;
        let max_noise_level = index.get("max_noise_level").and_then(|v| v.as_u64()).unwrap_or(350) as u32;
        Ok(Some(Self { alphas_cumprod: sched.alphas_cumprod().to_vec(), max_noise_level }))
    }
}

/// What a model folder may say about its own use (`ldm-web.json`, written for the built-in
/// model): settings it was evaluated with, used when the user gives none, and prompts that work.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ModelHints {
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub example_prompts: Vec<String>,
}

impl ModelHints {
    /// Reads `ldm-web.json` from `src` (defaults when the folder has none).
    pub async fn load(src: &dyn FileSource) -> Result<Self> {
        Ok(read_json(src, "ldm-web.json").await?.unwrap_or_default())
    }
}

pub(crate) async fn config<T: serde::de::DeserializeOwned>(src: &dyn FileSource, path: &str) -> Result<T> {
    read_json(src, path).await?.ok_or_else(|| Error::Model(format!("{} is missing; is this a diffusers Stable Diffusion folder?", src.describe(path))))
}

/// Loads a `ControlNetModel` folder (`config.json` + weights) at `dir` of `src` (empty: its
/// root), in the dtype and with the UNet's quantisation of `opts`.
pub async fn load_controlnet(gpu: &Gpu, src: &dyn FileSource, dir: &str, opts: &LoadOptions) -> Result<ControlNetModel> {
    let path = crate::loader::join_path(dir, "config.json");
    let text = read_file(src, &path).await?.ok_or_else(|| Error::Model(format!("{} is missing; is this a diffusers ControlNet folder?", src.describe(&path))))?;
    let cfg = ControlNetConfig::from_json(&String::from_utf8_lossy(&text))?;
    let files = component_files(src, dir, "diffusion_pytorch_model", opts.prefer_fp16).await?;
    let w = Weights::new(src, files);
    ControlNetModel::load(&opts.quant.apply(w.at(gpu, opts.dtype.unwrap_or(DType::F32), ""), "controlnet"), cfg).await
}

/// Loads a single-file ControlNet in the original layout (`control_model.*`); its config is
/// `config` (diffusers' `from_single_file(config=...)`) or inferred from tensor shapes.
pub async fn load_controlnet_single_file(gpu: &Gpu, src: &dyn FileSource, file: &str, config: Option<ControlNetConfig>, opts: &LoadOptions) -> Result<ControlNetModel> {
    refuse_pickle(file)?;
    let wf = WeightFile::open(src, file).await?;
    let cfg = match config {
        Some(c) => c,
        None => single_file::infer_controlnet_config(&wf.header)?,
    };
    let w = single_file::controlnet_weights(src, vec![wf], &cfg)?;
    ControlNetModel::load(&opts.quant.apply(w.at(gpu, opts.dtype.unwrap_or(DType::F32), ""), "controlnet"), cfg).await
}

/// Reads the tokenizer from `dir`: vocab.json + merges.txt, or tokenizer.json.
pub async fn load_tokenizer(src: &dyn FileSource, dir: &str) -> Result<ClipTokenizer> {
    let text = |b: Vec<u8>, p: &str| String::from_utf8(b).map_err(|_| Error::Model(format!("{} is not UTF-8 text", src.describe(p))));
    let cfg_path = format!("{dir}/tokenizer_config.json");
    let cfg = match read_file(src, &cfg_path).await? {
        Some(b) => TokenizerConfig::from_json(&text(b, &cfg_path)?)?,
        None => TokenizerConfig::from_json("{}")?,
    };
    let (vocab_p, merges_p, json_p) = (format!("{dir}/vocab.json"), format!("{dir}/merges.txt"), format!("{dir}/tokenizer.json"));
    // transformers reads tokenizer.json when it exists and vocab.json + merges.txt otherwise.
    if let Some(j) = read_file(src, &json_p).await? {
        return ClipTokenizer::from_tokenizer_json(&text(j, &json_p)?, cfg);
    }
    if let (Some(v), Some(m)) = (read_file(src, &vocab_p).await?, read_file(src, &merges_p).await?) {
        return ClipTokenizer::from_files(&text(v, &vocab_p)?, &text(m, &merges_p)?, cfg);
    }
    Err(Error::Model(format!("no tokenizer in {} (expected vocab.json + merges.txt or tokenizer.json)", src.describe(dir))))
}

impl StableDiffusionModel {
    /// Loads a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
    pub async fn load(gpu: &Gpu, src: &dyn FileSource, name: &str, opts: &LoadOptions) -> Result<Self> {
        let index: serde_json::Value = config(src, "model_index.json").await?;
        if let Some(class) = index.get("_class_name").and_then(|c| c.as_str()) {
            if class.contains("XL") || class.contains("Flux") || class.contains("StableDiffusion3") {
                return Err(Error::Model(format!("{class} models are not supported yet; ldm-web runs Stable Diffusion 1.x / 2.x")));
            }
        }
        let dtype = opts.dtype.unwrap_or(DType::F32);
        let upscaler = UpscalerNoise::load(src, &index).await?;
        let tokenizer = load_tokenizer(src, "tokenizer").await?;
        let te_cfg: ClipTextConfig = config(src, "text_encoder/config.json").await?;
        let te_files = component_files(src, "text_encoder", "model", opts.prefer_fp16).await?;
        let te_w = Weights::new(src, te_files);
        let text_encoder = ClipTextModel::load(&opts.quant.apply(te_w.at(gpu, dtype, ""), "text_encoder"), te_cfg).await?;
        drop(te_w);
        let unet_cfg: UNet2DConditionConfig = config(src, "unet/config.json").await?;
        let unet_w = Weights::new(src, component_files(src, "unet", "diffusion_pytorch_model", opts.prefer_fp16).await?);
        let unet = UNet2DConditionModel::load(&opts.quant.apply(unet_w.at(gpu, dtype, ""), "unet"), unet_cfg).await?;
        drop(unet_w);
        let vae_config: AutoencoderKLConfig = config(src, "vae/config.json").await?;
        vae_config.validate()?;
        let scheduler_config: serde_json::Value = config(src, "scheduler/scheduler_config.json").await?;
        let vae_weights = VaeWeights::Folder { prefer_fp16: opts.prefer_fp16 };
        let hints = ModelHints::load(src).await?;
        let model = Self { name: name.to_string(), tokenizer, text_encoder, unet, vae_config, vae: OnceCell::new(), vae_weights, vae_encoder: opts.vae_encoder, vae_quant: opts.quant.clone(), scheduler_config, dtype, hints, upscaler, vae_tiling: opts.vae_tiling };
        model.finish_load(gpu, src, opts).await
    }

    async fn finish_load(self, gpu: &Gpu, src: &dyn FileSource, opts: &LoadOptions) -> Result<Self> {
        if !opts.defer_vae {
            self.load_vae(gpu, src).await?;
        }
        Ok(self)
    }

    /// Loads the VAE's weights (a no-op once loaded); `src` is the source the model came from.
    pub async fn load_vae(&self, gpu: &Gpu, src: &dyn FileSource) -> Result<()> {
        if self.vae.get().is_some() {
            return Ok(());
        }
        let weights = match &self.vae_weights {
            VaeWeights::Folder { prefer_fp16 } => Weights::new(src, component_files(src, "vae", "diffusion_pytorch_model", *prefer_fp16).await?),
            VaeWeights::SingleFile(file) => single_file::vae_weights(src, vec![file.clone()], &self.vae_config)?,
        };
        let vae = AutoencoderKL::load(&self.vae_quant.apply(weights.at(gpu, self.dtype, ""), "vae"), self.vae_config.clone(), self.vae_encoder).await?;
        // A concurrent load may have won; either copy is the same model.
        let _ = self.vae.set(vae);
        Ok(())
    }

    /// The VAE, once [`Self::load_vae`] has run.
    pub fn vae(&self) -> Result<&AutoencoderKL> {
        self.vae.get().ok_or_else(|| Error::Model("the VAE's weights are not loaded yet (call load_vae first)".into()))
    }

    /// Whether the VAE's weights are on the GPU.
    pub fn vae_loaded(&self) -> bool {
        self.vae.get().is_some()
    }

    /// Loads a single-file checkpoint in the original layout. Configs come from `configs` (like
    /// diffusers' `from_single_file(config=...)`) or are inferred from tensor shapes.
    pub async fn load_single_file(gpu: &Gpu, src: &dyn FileSource, file: &str, configs: Option<&dyn FileSource>, opts: &LoadOptions) -> Result<Self> {
        refuse_pickle(file)?;
        let dtype = opts.dtype.unwrap_or(DType::F32);
        let wf = WeightFile::open(src, file).await?;
        let layout = single_file::detect(&wf.header)?;
        let (te_cfg, unet_cfg, vae_cfg, scheduler_config, tokenizer) = match configs {
            Some(c) => (
                config::<ClipTextConfig>(c, "text_encoder/config.json").await?,
                config::<UNet2DConditionConfig>(c, "unet/config.json").await?,
                config::<AutoencoderKLConfig>(c, "vae/config.json").await?,
                config::<serde_json::Value>(c, "scheduler/scheduler_config.json").await?,
                load_tokenizer(c, "tokenizer").await?,
            ),
            None => {
                let inferred = single_file::infer_configs(&wf.header, &layout)?;
                let bpe = opts.clip_bpe.as_deref().ok_or_else(|| Error::Model("single-file checkpoints carry no tokenizer and no CLIP vocabulary was given; use a diffusers folder or pass CLIP's BPE file (assets/clip)".into()))?;
                let tokenizer = single_file::builtin_tokenizer(&layout, bpe)?;
                (inferred.text_encoder, inferred.unet, inferred.vae, inferred.scheduler, tokenizer)
            }
        };
        let files = vec![wf];
        let te_w = single_file::text_encoder_weights(src, files.clone(), &layout, &te_cfg)?;
        let text_encoder = ClipTextModel::load(&opts.quant.apply(te_w.at(gpu, dtype, ""), "text_encoder"), te_cfg).await?;
        let unet_w = single_file::unet_weights(src, files.clone(), &unet_cfg)?;
        let unet = UNet2DConditionModel::load(&opts.quant.apply(unet_w.at(gpu, dtype, ""), "unet"), unet_cfg).await?;
        vae_cfg.validate()?;
        let name = file.rsplit('/').next().unwrap_or(file).to_string();
        let vae_weights = VaeWeights::SingleFile(files[0].clone());
        let model = Self { name, tokenizer, text_encoder, unet, vae_config: vae_cfg, vae: OnceCell::new(), vae_weights, vae_encoder: opts.vae_encoder, vae_quant: opts.quant.clone(), scheduler_config, dtype, hints: ModelHints::default(), upscaler: None, vae_tiling: opts.vae_tiling };
        model.finish_load(gpu, src, opts).await
    }
}
