//! Assembling a Stable Diffusion model from a diffusers folder or a single-file checkpoint.

use std::cell::OnceCell;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use super::ldm::{LdmKind, LdmModel};
use super::single_file;
use crate::loader::lora::{AdapterSet, AdapterTarget};
use super::prompt::{TextEncoder, TextEncoders};
use super::conditions::DepthMap;
use super::depth::DepthEstimator;
use super::image_input::InputImage;
use super::stable_diffusion::UserImages;
use crate::loader::quantised::LayerRule;
use crate::loader::InputSink;
use crate::quantise::Calibration;
use crate::loader::{component_files, read_file, read_json, FileSource, WeightFile, WeightLog, Weights, W};
use crate::models::{AutoencoderKL, AutoencoderKLConfig, AutoencoderTiny, AutoencoderTinyConfig, ClipTextConfig, ClipTextModel, ControlNetConfig, ControlNetModel, UNet2DConditionConfig, UNet2DConditionModel};
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
    /// LoRA adapters for the UNet and text encoders (run beside their weights, or merged).
    pub adapters: Option<Rc<AdapterSet>>,
    /// A VAE to use instead of the model's (an `AutoencoderKL` folder: `config.json` and its
    /// weights, e.g. SDXL's fp16-fix VAE).
    pub vae: Option<VaeSource>,
    /// A tiny autoencoder (`AutoencoderTiny`, TAESD / TAESDXL folder) for previews after each
    /// step, and for the final image when [`LoadOptions::tiny_decode`].
    pub tiny_vae: Option<VaeSource>,
    /// Decode the final image with the tiny autoencoder (fast, approximate).
    pub tiny_decode: bool,
}

/// A separate VAE folder (see [`LoadOptions::vae`]).
#[derive(Clone)]
pub struct VaeSource(pub Rc<dyn FileSource>);

impl std::fmt::Debug for VaeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaeSource({})", self.0.describe(""))
    }
}

impl LoadOptions {
    /// `w` set up for the model component in `folder`: its quantisation, the weight log and
    /// the LoRA adapters that target it.
    pub(crate) fn component<'w, 's>(&self, w: W<'w, 's>, folder: &'static str) -> W<'w, 's> {
        self.quant.apply(w, folder).with_adapters(self.adapters.as_ref(), folder)
    }
}

/// A quantised type (q8_0, q4_0, q4_1, q5_0, q5_1) per model component, `None` for float weights.
#[derive(Clone, Debug, Default)]
pub struct ComponentQuant {
    pub unet: Option<DType>,
    /// The text encoder (CLIP, or LDMBert).
    pub text_encoder: Option<DType>,
    /// The first stage: AutoencoderKL or VQModel.
    pub vae: Option<DType>,
    /// Per-layer rules over the component types (`ldm convert --layer`), first match wins.
    pub layer_rules: std::rc::Rc<[LayerRule]>,
    /// Records what each component read (`ldm convert` writes that).
    pub log: Option<WeightLog>,
    /// Receives every Linear / Conv2d input (a calibration run).
    pub inputs: Option<Rc<dyn InputSink>>,
    /// Input statistics that choose the quantised blocks (`ldm convert --calibrate`).
    pub calibration: Option<Rc<Calibration>>,
}

impl ComponentQuant {
    /// `w` set up for the component in `folder` (`unet`, `text_encoder` / `bert`, `vae` / `vqvae`).
    pub(crate) fn apply<'w, 's>(&self, w: W<'w, 's>, folder: &'static str) -> W<'w, 's> {
        let quant = match folder {
            // A ControlNet is half a UNet, quantised as the UNet.
            "unet" | "controlnet" => self.unet,
            "text_encoder" | "text_encoder_2" | "bert" => self.text_encoder,
            _ => self.vae,
        };
        w.with_quant(quant).with_layer_rules(&self.layer_rules, folder).with_input_sink(self.inputs.as_ref(), folder).with_calibration(self.calibration.as_ref(), folder).logged(self.log.as_ref(), folder)
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
    /// A separate `AutoencoderKL` folder (its root).
    Separate { src: Rc<dyn FileSource>, prefer_fp16: bool },
}

/// Which diffusers pipeline family a model belongs to, with the settings its `model_index.json`
/// gives that family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Family {
    /// `StableDiffusionPipeline` and its image-conditioned siblings (SD 1.x / 2.x, SD-Turbo).
    StableDiffusion,
    /// `LatentConsistencyModelPipeline`: never classifier-free guidance, 4 steps, guidance 8.5.
    LatentConsistency,
    /// `StableDiffusionXL*Pipeline` (base, refiner, Turbo).
    Xl {
        /// Zeros for the negative embeddings when no negative prompt is given.
        force_zeros_for_empty_prompt: bool,
        /// The refiner: the aesthetic score replaces the target size among the size conditions.
        requires_aesthetics_score: bool,
    },
}

impl Family {
    /// The family `model_index.json` names, or why it is not one ldm-web runs.
    pub fn from_index(index: &serde_json::Value) -> Result<Self> {
        let class = index.get("_class_name").and_then(|c| c.as_str()).unwrap_or("StableDiffusionPipeline");
        let flag = |k: &str, default: bool| index.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        let xl = class.starts_with("StableDiffusionXL") || component_present(index, "text_encoder_2");
        if xl {
            // diffusers' defaults: the img2img and inpaint classes default requires_aesthetics_score off too.
            return Ok(Self::Xl { force_zeros_for_empty_prompt: flag("force_zeros_for_empty_prompt", true), requires_aesthetics_score: flag("requires_aesthetics_score", false) });
        }
        if class == "LatentConsistencyModelPipeline" {
            return Ok(Self::LatentConsistency);
        }
        if class.contains("Flux") || class.contains("StableDiffusion3") || class.contains("Kandinsky") || class.contains("PixArt") || class.contains("Cascade") {
            return Err(Error::Model(format!("{class} models are not supported; ldm-web runs Stable Diffusion 1.x / 2.x, SDXL (base, refiner, Turbo), LCM and the CompVis LDMs")));
        }
        Ok(Self::StableDiffusion)
    }

    /// Whether this is an SDXL model.
    pub fn is_xl(self) -> bool {
        matches!(self, Self::Xl { .. })
    }
}

/// Whether `model_index.json` lists component `name` with a class (not `[null, null]`).
fn component_present(index: &serde_json::Value, name: &str) -> bool {
    index.get(name).and_then(|v| v.as_array()).is_some_and(|a| a.iter().any(|x| !x.is_null()))
}

/// The components of a Stable Diffusion (1.x / 2.x, SDXL, LCM) model.
pub struct StableDiffusionModel {
    /// Shown in PNG metadata (the folder or file name).
    pub name: String,
    pub family: Family,
    pub text: TextEncoders,
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
    /// The dtype the VAE runs in: f32 for SDXL's `force_upcast` VAEs when the rest runs f16.
    pub vae_dtype: DType,
    /// The LoRA adapters applied (for PNG metadata).
    pub adapters: Vec<(String, f32)>,
    /// The tiny autoencoder for previews (and the final decode when `tiny_decode`).
    pub tiny_vae: Option<AutoencoderTiny>,
    pub tiny_decode: bool,
    /// Depth-to-image folders with `depth_estimator/` and `feature_extractor/`: estimated
    /// depth when no depth map is given, loaded on first use.
    pub bundled_depth_estimator: bool,
    depth_estimator: OnceCell<DepthEstimator>,
}

/// Loads an `AutoencoderTiny` folder (`config.json` + weights); with `encoder` its encoder too.
pub async fn load_tiny_vae(gpu: &Gpu, src: &dyn FileSource, dtype: DType, encoder: bool) -> Result<AutoencoderTiny> {
    let cfg: AutoencoderTinyConfig = config(src, "config.json").await?;
    let w = Weights::new(src, component_files(src, "", "diffusion_pytorch_model", dtype == DType::F16).await?);
    AutoencoderTiny::load(&w.at(gpu, dtype, ""), cfg, encoder).await.map_err(|e| match e {
        Error::Model(m) => Error::Model(format!("tiny autoencoder {}: {m}", src.describe(""))),
        other => other,
    })
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
    let wf = WeightFile::open_any(src, file).await?;
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

/// Loads a text encoder folder and its tokenizer folder.
async fn load_text_encoder(gpu: &Gpu, src: &dyn FileSource, opts: &LoadOptions, folder: &'static str, tokenizer: &str) -> Result<TextEncoder> {
    let dtype = opts.dtype.unwrap_or(DType::F32);
    let tokenizer = load_tokenizer(src, tokenizer).await?;
    let cfg: ClipTextConfig = config(src, &format!("{folder}/config.json")).await?;
    let w = Weights::new(src, component_files(src, folder, "model", opts.prefer_fp16).await?);
    let model = ClipTextModel::load(&opts.component(w.at(gpu, dtype, ""), folder), cfg).await?;
    Ok(TextEncoder::new(tokenizer, model))
}

/// The components LoRA adapters may target in a model with these text encoders.
fn adapter_targets(text: &TextEncoders) -> Vec<AdapterTarget> {
    let mut t = vec![AdapterTarget::Unet];
    match text {
        TextEncoders::Single(_) => t.push(AdapterTarget::TextEncoder),
        TextEncoders::Xl { first, .. } => {
            if first.is_some() {
                t.push(AdapterTarget::TextEncoder);
            }
            t.push(AdapterTarget::TextEncoder2);
        }
    }
    t
}

/// Renames SGM-named adapter modules for this UNet (SDXL kohya LoRAs) before it loads.
fn prepare_adapters(opts: &LoadOptions, unet: &UNet2DConditionConfig) -> Result<()> {
    if let Some(a) = &opts.adapters {
        let types = unet.up_block_types.clone();
        a.resolve_unet_names(unet.layers_per_block.get(0), &|b| types.get(b).is_some_and(|t| t.starts_with("CrossAttn")))?;
    }
    Ok(())
}

impl StableDiffusionModel {
    /// This model's UNet loaded again from its folder `src` with `opts` (a sensitivity scan
    /// quantises one layer at a time).
    pub async fn load_unet(&self, gpu: &Gpu, src: &dyn FileSource, opts: &LoadOptions) -> Result<UNet2DConditionModel> {
        let unet_w = Weights::new(src, component_files(src, "unet", "diffusion_pytorch_model", opts.prefer_fp16).await?);
        UNet2DConditionModel::load(&opts.component(unet_w.at(gpu, self.dtype, ""), "unet"), self.unet.config.clone()).await
    }

    /// Loads a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/` (and
    /// SDXL's `text_encoder_2/`), `tokenizer/` (`tokenizer_2/`), `scheduler/`).
    pub async fn load(gpu: &Gpu, src: &dyn FileSource, name: &str, opts: &LoadOptions) -> Result<Self> {
        let index: serde_json::Value = config(src, "model_index.json").await?;
        let family = Family::from_index(&index)?;
        let dtype = opts.dtype.unwrap_or(DType::F32);
        let upscaler = UpscalerNoise::load(src, &index).await?;
        let text = if family.is_xl() {
            let first = if component_present(&index, "text_encoder") { Some(load_text_encoder(gpu, src, opts, "text_encoder", "tokenizer").await?) } else { None };
            let second = load_text_encoder(gpu, src, opts, "text_encoder_2", "tokenizer_2").await?;
            if !second.model.has_projection() {
                return Err(Error::Model("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection (its text_projection.weight is missing)".into()));
            }
            TextEncoders::Xl { first, second }
        } else {
            TextEncoders::Single(load_text_encoder(gpu, src, opts, "text_encoder", "tokenizer").await?)
        };
        let unet_cfg: UNet2DConditionConfig = config(src, "unet/config.json").await?;
        prepare_adapters(opts, &unet_cfg)?;
        let unet_w = Weights::new(src, component_files(src, "unet", "diffusion_pytorch_model", opts.prefer_fp16).await?);
        let unet = UNet2DConditionModel::load(&opts.component(unet_w.at(gpu, dtype, ""), "unet"), unet_cfg).await?;
        drop(unet_w);
        let (vae_config, vae_weights): (AutoencoderKLConfig, VaeWeights) = match &opts.vae {
            Some(v) => (config(v.0.as_ref(), "config.json").await?, VaeWeights::Separate { src: v.0.clone(), prefer_fp16: opts.prefer_fp16 }),
            None => (config(src, "vae/config.json").await?, VaeWeights::Folder { prefer_fp16: opts.prefer_fp16 }),
        };
        vae_config.validate()?;
        let scheduler_config: serde_json::Value = config(src, "scheduler/scheduler_config.json").await?;
        let hints = ModelHints::load(src).await?;
        let mut model = Self::assemble(name.to_string(), family, text, unet, vae_config, vae_weights, scheduler_config, hints, upscaler, opts)?;
        model.bundled_depth_estimator = component_present(&index, "depth_estimator") && component_present(&index, "feature_extractor");
        model.finish_load(gpu, src, opts).await
    }

    /// Whether a run on `images` is depth-to-image without a depth map, so the folder's own
    /// estimator must make one ([`Self::estimate_depth`]).
    pub fn needs_depth_estimate(&self, images: &UserImages<'_>) -> bool {
        self.unet.config.in_channels == self.vae_config.latent_channels + 1 && images.init.is_some() && images.depth.is_none() && images.depth_prediction.is_none()
    }

    /// diffusers' `prepare_depth_map` without a depth map: the folder's `depth_estimator/`
    /// (with `feature_extractor/`'s processing) run on the init image, loaded on first use.
    pub async fn estimate_depth(&self, gpu: &Gpu, src: &dyn FileSource, init: &InputImage) -> Result<DepthMap> {
        if !self.bundled_depth_estimator {
            return Err(Error::Input("this depth-to-image model has no depth_estimator/ and feature_extractor/ of its own: give a depth map".into()));
        }
        if self.depth_estimator.get().is_none() {
            let e = DepthEstimator::load(gpu, src, "depth_estimator", "feature_extractor", DType::F32).await?;
            let _ = self.depth_estimator.set(e);
        }
        let e = self.depth_estimator.get().ok_or_else(|| Error::Model("the depth estimator did not load".into()))?;
        e.predict(gpu, init).await
    }

    /// The model from its loaded parts, checking the adapters found their layers.
    #[allow(clippy::too_many_arguments)]
    fn assemble(name: String, family: Family, text: TextEncoders, unet: UNet2DConditionModel, vae_config: AutoencoderKLConfig, vae_weights: VaeWeights, scheduler_config: serde_json::Value, hints: ModelHints, upscaler: Option<UpscalerNoise>, opts: &LoadOptions) -> Result<Self> {
        let dtype = opts.dtype.unwrap_or(DType::F32);
        if let Some(a) = &opts.adapters {
            a.check_all_used(&adapter_targets(&text))?;
        }
        if family.is_xl() && unet.config.addition_embed_type.as_deref() != Some("text_time") {
            return Err(Error::Model("an SDXL pipeline needs a UNet with addition_embed_type \"text_time\"".into()));
        }
        // diffusers' SDXL pipelines decode a force_upcast VAE in f32.
        let vae_dtype = if family.is_xl() && vae_config.force_upcast { DType::F32 } else { dtype };
        let adapters = opts.adapters.as_ref().map(|a| a.describe()).unwrap_or_default();
        Ok(Self { name, family, text, unet, vae_config, vae: OnceCell::new(), vae_weights, vae_encoder: opts.vae_encoder, vae_quant: opts.quant.clone(), scheduler_config, dtype, hints, upscaler, vae_tiling: opts.vae_tiling, vae_dtype, adapters, tiny_vae: None, tiny_decode: false, bundled_depth_estimator: false, depth_estimator: OnceCell::new() })
    }

    async fn finish_load(mut self, gpu: &Gpu, src: &dyn FileSource, opts: &LoadOptions) -> Result<Self> {
        if let Some(t) = &opts.tiny_vae {
            let tiny = load_tiny_vae(gpu, t.0.as_ref(), self.dtype, false).await?;
            if tiny.config.latent_channels != self.vae_config.latent_channels || tiny.config.scale_factor() != self.vae_config.scale_factor() {
                return Err(Error::Model(format!("the tiny autoencoder has {} latent channels and factor {}, this model's VAE {} and {}: use the TAESD of this model family (TAESD for SD 1.x / 2.x, TAESDXL for SDXL)", tiny.config.latent_channels, tiny.config.scale_factor(), self.vae_config.latent_channels, self.vae_config.scale_factor())));
            }
            self.tiny_vae = Some(tiny);
        }
        if opts.tiny_decode && self.tiny_vae.is_none() {
            return Err(Error::Input("decoding with the tiny autoencoder needs one (--tiny-vae DIR)".into()));
        }
        self.tiny_decode = opts.tiny_decode;
        if !opts.defer_vae && !self.tiny_decode {
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
            VaeWeights::Separate { src: own, prefer_fp16 } => Weights::new(own.as_ref(), component_files(own.as_ref(), "", "diffusion_pytorch_model", *prefer_fp16).await?),
        };
        let vae = AutoencoderKL::load(&self.vae_quant.apply(weights.at(gpu, self.vae_dtype, ""), "vae"), self.vae_config.clone(), self.vae_encoder).await?;
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

    /// An SDXL base or refiner checkpoint in Stability's SGM layout (`conditioner.embedders.*`).
    #[allow(clippy::too_many_arguments)]
    async fn load_single_file_xl(gpu: &Gpu, src: &dyn FileSource, file: &str, wf: WeightFile, layout: single_file::Layout, configs: Option<&dyn FileSource>, opts: &LoadOptions) -> Result<Self> {
        let dtype = opts.dtype.unwrap_or(DType::F32);
        let refiner = layout.text == single_file::TextLayout::XlRefiner;
        type Texts = (Option<(ClipTextConfig, ClipTokenizer)>, (ClipTextConfig, ClipTokenizer));
        let (family, texts, unet_cfg, vae_cfg, scheduler_config): (Family, Texts, UNet2DConditionConfig, AutoencoderKLConfig, serde_json::Value) = match configs {
            Some(c) => {
                let index: serde_json::Value = config(c, "model_index.json").await?;
                let first = if refiner { None } else { Some((config::<ClipTextConfig>(c, "text_encoder/config.json").await?, load_tokenizer(c, "tokenizer").await?)) };
                let second = (config::<ClipTextConfig>(c, "text_encoder_2/config.json").await?, load_tokenizer(c, "tokenizer_2").await?);
                (Family::from_index(&index)?, (first, second), config(c, "unet/config.json").await?, config(c, "vae/config.json").await?, config(c, "scheduler/scheduler_config.json").await?)
            }
            None => {
                let x = single_file::infer_xl_configs(&wf.header, &layout)?;
                let bpe = opts.clip_bpe.as_deref().ok_or_else(|| Error::Model("single-file checkpoints carry no tokenizer and no CLIP vocabulary was given; use a diffusers folder or pass CLIP's BPE file (assets/clip)".into()))?;
                let first = match x.text_encoder {
                    Some(cfg) => Some((cfg, ClipTokenizer::from_clip_bpe(bpe, crate::tokenizer::ClipPad::EndOfText)?)),
                    None => None,
                };
                let second = (x.text_encoder_2, ClipTokenizer::from_clip_bpe(bpe, crate::tokenizer::ClipPad::Exclamation)?);
                let family = Family::Xl { force_zeros_for_empty_prompt: !x.refiner, requires_aesthetics_score: x.refiner };
                (family, (first, second), x.unet, x.vae, x.scheduler)
            }
        };
        let files = vec![wf];
        let mut first = None;
        if let Some((cfg, tokenizer)) = texts.0 {
            let w = single_file::xl_text_weights(src, files.clone(), &layout, false, &cfg)?;
            first = Some(TextEncoder::new(tokenizer, ClipTextModel::load(&opts.component(w.at(gpu, dtype, ""), "text_encoder"), cfg).await?));
        }
        let (cfg2, tok2) = texts.1;
        let w2 = single_file::xl_text_weights(src, files.clone(), &layout, true, &cfg2)?;
        let second = TextEncoder::new(tok2, ClipTextModel::load(&opts.component(w2.at(gpu, dtype, ""), "text_encoder_2"), cfg2).await?);
        let text = TextEncoders::Xl { first, second };
        Self::single_file_rest(gpu, src, file, &files[0], family, text, unet_cfg, vae_cfg, scheduler_config, opts).await
    }

    /// What a single file holds after its text encoders, for SD and SDXL files alike: the UNet
    /// (with the LoRAs checked against it), the VAE's config and weights (or those of
    /// `opts.vae`), assembled into the model.
    #[allow(clippy::too_many_arguments)]
    async fn single_file_rest(gpu: &Gpu, src: &dyn FileSource, file: &str, wf: &WeightFile, family: Family, text: TextEncoders, unet_cfg: UNet2DConditionConfig, vae_cfg: AutoencoderKLConfig, scheduler_config: serde_json::Value, opts: &LoadOptions) -> Result<Self> {
        let dtype = opts.dtype.unwrap_or(DType::F32);
        prepare_adapters(opts, &unet_cfg)?;
        let unet_w = single_file::unet_weights(src, vec![wf.clone()], &unet_cfg)?;
        let unet = UNet2DConditionModel::load(&opts.component(unet_w.at(gpu, dtype, ""), "unet"), unet_cfg).await?;
        vae_cfg.validate()?;
        let name = file.rsplit('/').next().unwrap_or(file).to_string();
        let (vae_cfg, vae_weights) = match &opts.vae {
            Some(v) => (config(v.0.as_ref(), "config.json").await?, VaeWeights::Separate { src: v.0.clone(), prefer_fp16: opts.prefer_fp16 }),
            None => (vae_cfg, VaeWeights::SingleFile(wf.clone())),
        };
        Self::assemble(name, family, text, unet, vae_cfg, vae_weights, scheduler_config, ModelHints::default(), None, opts)?.finish_load(gpu, src, opts).await
    }

    /// Loads a single-file checkpoint in the original layout. Configs come from `configs` (like
    /// diffusers' `from_single_file(config=...)`) or are inferred from tensor shapes.
    pub async fn load_single_file(gpu: &Gpu, src: &dyn FileSource, file: &str, configs: Option<&dyn FileSource>, opts: &LoadOptions) -> Result<Self> {
        let dtype = opts.dtype.unwrap_or(DType::F32);
        let wf = WeightFile::open_any(src, file).await?;
        let layout = single_file::detect(&wf.header)?;
        if matches!(layout.text, single_file::TextLayout::Xl | single_file::TextLayout::XlRefiner) {
            return Self::load_single_file_xl(gpu, src, file, wf, layout, configs, opts).await;
        }
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
        let text_encoder = ClipTextModel::load(&opts.component(te_w.at(gpu, dtype, ""), "text_encoder"), te_cfg).await?;
        let text = TextEncoders::Single(TextEncoder::new(tokenizer, text_encoder));
        Self::single_file_rest(gpu, src, file, &files[0], Family::StableDiffusion, text, unet_cfg, vae_cfg, scheduler_config, opts).await
    }
}
