//! The latent diffusion paper's own pipelines, step for step as diffusers':
//! `LDMPipeline` (unconditional, e.g. CompVis' CelebA-HQ model), `LDMSuperResolutionPipeline`
//! (the low-resolution image concatenated to the latents, 4x) and `LDMTextToImagePipeline`
//! (LDMBert text encoder, classifier-free guidance). Each is reproduced with its own quirks, so a
//! seed gives diffusers' image: the unconditional pipeline scales the noise before
//! `set_timesteps`, the text-to-image one never calls `scale_model_input` and makes latents of
//! `height / 8`, the super-resolution one decodes without a scaling factor.
//!
//! And the paper's concatenation conditioning (section 3.3) for any spatially aligned condition:
//! an `LDMPipeline` folder whose `ldm-web.json` has a `concat` entry (written by
//! `scripts/convert_compvis_concat.py` from a CompVis `conditioning_key: concat` checkpoint) takes
//! a condition image, makes it the UNet's extra input channels as the entry says, and samples as
//! CompVis' DDIM sampler does (the converted scheduler config reproduces its schedule).
//!
//! Randomness: the initial latents come from torch's CPU generator seeded with the seed, as the
//! `generator` argument. These pipelines do not hand that generator to `scheduler.step`, so the
//! noise DDIM (eta > 0) and the ancestral samplers add each step comes from torch's global
//! generator; ldm-web draws it from a second generator seeded with the same seed, which is
//! diffusers after `torch.manual_seed(seed)`.

use super::conditions::{interpolate_by, Interpolation};
use super::image_input::{resize_u8, InputImage, Resample};
use super::loading::{config, ComponentQuant};
use super::stable_diffusion::{guide, to_hwc01, Images, Latents, Progress, StageTimes, StepProgress, Txt2ImgParams};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::{component_files, join_path, read_json, FileSource, Weights};
use crate::models::{AutoencoderKL, AutoencoderKLConfig, LdmBertConfig, LdmBertModel, UNet2DConditionConfig, UNet2DConditionModel, UNet2DConfig, UNet2DModel, VQModel, VQModelConfig};
use crate::ops::{self, Expr, ExprInput, IndexMap};
use crate::rng::TorchGenerator;
use crate::schedulers::{self, Latent, LatentMath, Scheduler, SchedulerKind};
use crate::tokenizer::{BertTokenizer, BertTokenizerConfig};

/// The paper's first stage: a vector-quantised or a KL-regularised autoencoder (`vqvae/`).
pub enum FirstStage {
    /// With the dtype it runs in (f32 when its config says `force_upcast`).
    Vq(VQModel, DType),
    Kl(AutoencoderKL),
}

impl FirstStage {
    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        match self {
            FirstStage::Vq(v, _) => v.config.scale_factor(),
            FirstStage::Kl(v) => v.config.scale_factor(),
        }
    }
    /// `vqvae.config.scaling_factor`.
    pub fn scaling_factor(&self) -> f32 {
        match self {
            FirstStage::Vq(v, _) => v.config.scaling_factor,
            FirstStage::Kl(v) => v.config.scaling_factor,
        }
    }
    /// Channels of its latents.
    pub fn latent_channels(&self) -> usize {
        match self {
            FirstStage::Vq(v, _) => v.config.embed_dim(),
            FirstStage::Kl(v) => v.config.latent_channels,
        }
    }
    /// CompVis' `encode_first_stage` as a condition stage: a VQ model's latents before
    /// quantisation, a KL model's mode. Images `[B, C, H, W]` in [-1, 1], latents unscaled.
    pub async fn encode(&self, gpu: &Gpu, image: &[f32], shape: [usize; 4], dtype: DType) -> Result<Vec<f32>> {
        match self {
            FirstStage::Vq(v, own) => gpu.read(&v.encode(gpu, &gpu.upload(&shape, *own, image)?)?).await,
            FirstStage::Kl(v) => Ok(v.encode(gpu, &gpu.upload(&shape, dtype, image)?).await?.mode().to_vec()),
        }
    }
    /// Loads the autoencoder in folder `dir` of `src` (`vqvae`, `vae`, or `""` for a component
    /// folder) as `class` (`VQModel` or `AutoencoderKL`); `encoder`: load its encoder too.
    pub async fn load(gpu: &Gpu, src: &dyn FileSource, dir: &'static str, class: &str, dtype: DType, quant: &ComponentQuant, encoder: bool) -> Result<Self> {
        let component = if dir.is_empty() { "vqvae" } else { dir };
        let cfg_path = join_path(dir, "config.json");
        let w = weights(src, dir, "diffusion_pytorch_model").await?;
        match class {
            "VQModel" => {
                let cfg: VQModelConfig = config(src, &cfg_path).await?;
                // force_upcast: the autoencoder is not to run in f16 (diffusers upcasts it).
                let own = if cfg.force_upcast { DType::F32 } else { dtype };
                Ok(FirstStage::Vq(VQModel::load(&quant.apply(w.at(gpu, own, ""), component), cfg, encoder).await?, own))
            }
            "AutoencoderKL" => {
                let cfg: AutoencoderKLConfig = config(src, &cfg_path).await?;
                Ok(FirstStage::Kl(AutoencoderKL::load(&quant.apply(w.at(gpu, dtype, ""), component), cfg, encoder).await?))
            }
            other => Err(Error::Model(format!("autoencoder class {other} is not supported (VQModel and AutoencoderKL are)"))),
        }
    }

    /// `vqvae.decode(latents)`: a VQ model snaps latents to its codebook first. Images in [-1, 1].
    pub fn decode(&self, gpu: &Gpu, latents: &[f32], shape: [usize; 4], dtype: DType) -> Result<Tensor> {
        match self {
            FirstStage::Vq(v, own) => v.decode(gpu, latents, shape, false, *own),
            FirstStage::Kl(v) => v.decode(gpu, &gpu.upload(&shape, dtype, latents)?),
        }
    }
}

/// Which of the three pipelines a model folder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LdmKind {
    /// `LDMPipeline`.
    Unconditional,
    /// `LDMSuperResolutionPipeline`.
    SuperResolution,
    /// `LDMTextToImagePipeline`.
    TextToImage,
    /// An `LDMPipeline` folder with `ldm-web.json`'s `concat`: a condition image concatenated.
    Concat,
}

impl LdmKind {
    /// From `model_index.json`'s `_class_name`.
    pub fn from_class_name(class: &str) -> Option<Self> {
        match class {
            "LDMPipeline" => Some(Self::Unconditional),
            "LDMSuperResolutionPipeline" => Some(Self::SuperResolution),
            "LDMTextToImagePipeline" => Some(Self::TextToImage),
            _ => None,
        }
    }
    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Unconditional => "LDMPipeline",
            Self::SuperResolution => "LDMSuperResolutionPipeline",
            Self::TextToImage => "LDMTextToImagePipeline",
            Self::Concat => "LDMPipeline (concatenation-conditioned)",
        }
    }
    /// diffusers' default `num_inference_steps`.
    pub fn default_steps(self) -> usize {
        match self {
            Self::SuperResolution => 100,
            _ => 50,
        }
    }
}

/// The denoiser: `UNet2DModel` for the unconditional and super-resolution models,
/// `UNet2DConditionModel` for text-to-image.
pub enum LdmUNet {
    Plain(UNet2DModel),
    Conditional(UNet2DConditionModel),
}

/// LDMBert and its tokenizer.
pub struct LdmText {
    pub tokenizer: BertTokenizer,
    pub bert: LdmBertModel,
}

/// A CompVis latent diffusion model in diffusers' layout.
pub struct LdmModel {
    /// Shown in PNG metadata (the folder name).
    pub name: String,
    pub kind: LdmKind,
    pub unet: LdmUNet,
    pub first_stage: FirstStage,
    pub text: Option<LdmText>,
    /// `scheduler/scheduler_config.json` as written.
    pub scheduler_config: serde_json::Value,
    pub dtype: DType,
    /// Concatenation-conditioned models: how their condition image is made.
    pub concat: Option<ConcatCondition>,
    /// Whether the model learnt to predict without its condition (trained with condition
    /// dropout), so that classifier-free guidance means something (the page guides only then).
    pub learnt_unconditional: bool,
}

/// What an LDM pipeline is given besides its settings.
pub enum LdmImage {
    /// The super-resolution model's input.
    LowRes(LowResImage),
    /// A concatenation-conditioned model's condition image.
    Condition(InputImage),
}

/// How a concatenation-conditioned model's condition image becomes the UNet's extra input
/// channels: `ldm-web.json`'s `concat` entry. The image is converted to RGB or gray (PIL's
/// `convert`), resized with PIL's `resample` filter to the output size (for the `identity` stage:
/// straight to the latent grid), mapped from [0, 1] to `range`, then put through the stage.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct ConcatCondition {
    pub stage: ConditionStage,
    /// 3 (RGB) or 1 (gray).
    pub channels: usize,
    #[serde(default = "default_range")]
    pub range: [f32; 2],
    #[serde(default = "default_resample")]
    pub resample: Resample,
    /// The `rescale` stage's steps.
    #[serde(default)]
    pub rescale: Option<SpatialRescale>,
}

fn default_range() -> [f32; 2] {
    [-1.0, 1.0]
}

fn default_resample() -> Resample {
    Resample::Bicubic
}

/// CompVis' condition stages (`cond_stage_config`) that keep the condition spatial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionStage {
    /// `torch.nn.Identity`: the image at the latent grid as it is.
    Identity,
    /// `SpatialRescaler`: `interpolate(x, scale_factor=multiplier, mode=method)`, `stages` times.
    Rescale,
    /// `__is_first_stage__`: encoded by the model's own autoencoder.
    FirstStage,
}

/// `ldm.modules.encoders.modules.SpatialRescaler`'s parameters (without its channel remap).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct SpatialRescale {
    pub method: Interpolation,
    pub multiplier: f64,
    pub stages: usize,
}

/// The parts of `ldm-web.json` the LDM pipelines read.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct LdmFolderHints {
    concat: Option<ConcatCondition>,
    /// Written by `ldm train`: the run's settings, among them its condition dropout.
    training: Option<TrainingHints>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct TrainingHints {
    config: TrainingConfigHints,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct TrainingConfigHints {
    cond_dropout: f32,
}

impl ConcatCondition {
    /// Channels the condition adds to the UNet's input.
    pub fn unet_channels(&self, first_stage: &FirstStage) -> usize {
        match self.stage {
            ConditionStage::FirstStage => first_stage.latent_channels(),
            _ => self.channels,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::Model(format!("ldm-web.json: concat.channels is {}; condition images are gray (1) or RGB (3)", self.channels)));
        }
        if !(self.range[0].is_finite() && self.range[1].is_finite()) {
            return Err(Error::Model("ldm-web.json: concat.range must be two finite numbers".into()));
        }
        match (&self.rescale, self.stage) {
            (None, ConditionStage::Rescale) => Err(Error::Model("ldm-web.json: the rescale stage needs concat.rescale {method, multiplier, stages}".into())),
            (Some(r), ConditionStage::Rescale) if !(r.multiplier > 0.0 && r.multiplier.is_finite()) || r.stages == 0 || r.stages > 8 => {
                Err(Error::Model(format!("ldm-web.json: concat.rescale needs a positive multiplier and 1 to 8 stages, got {} and {}", r.multiplier, r.stages)))
            }
            _ => Ok(()),
        }
    }

    /// The condition `[C, h, w]` on the latent grid of a `width x height` output.
    pub async fn prepare(&self, gpu: &Gpu, first_stage: &FirstStage, img: &InputImage, width: usize, height: usize, dtype: DType) -> Result<Vec<f32>> {
        let f = first_stage.scale_factor();
        let (lw, lh) = (width / f, height / f);
        let (tw, th) = if self.stage == ConditionStage::Identity { (lw, lh) } else { (width, height) };
        let c = self.channels;
        let values = if c == 3 { img.rgb8() } else { img.luma8() };
        let values = if (img.width, img.height) == (tw, th) { values } else { resize_u8(&values, img.width, img.height, c, tw, th, self.resample) };
        let [lo, hi] = self.range;
        let mut planar = vec![0f32; c * tw * th];
        for (i, px) in values.chunks_exact(c).enumerate() {
            for (k, &v) in px.iter().enumerate() {
                planar[k * tw * th + i] = (v as f32 / 255.0) * (hi - lo) + lo;
            }
        }
        let (out, w, h) = match (self.stage, &self.rescale) {
            (ConditionStage::Identity, _) => (planar, tw, th),
            (ConditionStage::FirstStage, _) => (first_stage.encode(gpu, &planar, [1, c, th, tw], dtype).await?, lw, lh),
            (ConditionStage::Rescale, Some(r)) => {
                let (mut planes, mut w, mut h) = (planar.chunks(tw * th).map(<[f32]>::to_vec).collect::<Vec<_>>(), tw, th);
                for _ in 0..r.stages {
                    let mut next = Vec::with_capacity(c);
                    let mut size = (w, h);
                    for p in &planes {
                        let (q, nw, nh) = interpolate_by(p, w, h, r.multiplier, r.method)?;
                        next.push(q);
                        size = (nw, nh);
                    }
                    (planes, (w, h)) = (next, size);
                }
                (planes.concat(), w, h)
            }
            (ConditionStage::Rescale, None) => return Err(Error::Model("ldm-web.json: the rescale stage needs concat.rescale".into())),
        };
        if (w, h) != (lw, lh) {
            return Err(Error::Input(format!("the condition comes out {w}x{h} for a {width}x{height} image, whose latent grid is {lw}x{lh}; choose a size the condition stage maps onto the grid")));
        }
        Ok(out)
    }
}

/// The low-resolution input of the super-resolution pipeline: `[3, H, W]` in [-1, 1].
#[derive(Clone, Debug)]
pub struct LowResImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

async fn weights<'s>(src: &'s dyn FileSource, dir: &str, stem: &str) -> Result<Weights<'s>> {
    Ok(Weights::new(src, component_files(src, dir, stem, false).await?))
}

/// The class of component `key` in `model_index.json` (`["diffusers", "VQModel"]`).
fn component_class<'a>(index: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    index.get(key)?.as_array()?.get(1)?.as_str()
}

impl LdmModel {
    /// Loads a diffusers folder whose `model_index.json` names one of the LDM pipelines.
    pub async fn load(gpu: &Gpu, src: &dyn FileSource, name: &str, kind: LdmKind, index: &serde_json::Value, dtype: DType, quant: &ComponentQuant) -> Result<Self> {
        let hints: LdmFolderHints = read_json(src, "ldm-web.json").await?.unwrap_or_default();
        let concat = match (kind, hints.concat) {
            (LdmKind::Unconditional, Some(c)) => {
                c.validate()?;
                Some(c)
            }
            (_, Some(_)) => return Err(Error::Model(format!("ldm-web.json describes a concatenation condition, which {} does not take (it is for LDMPipeline folders)", kind.class_name()))),
            (_, None) => None,
        };
        let kind = if concat.is_some() { LdmKind::Concat } else { kind };
        let encoder = concat.as_ref().is_some_and(|c| c.stage == ConditionStage::FirstStage);
        let unet_class = component_class(index, "unet").unwrap_or(if kind == LdmKind::TextToImage { "UNet2DConditionModel" } else { "UNet2DModel" });
        let unet = match unet_class {
            "UNet2DModel" if kind != LdmKind::TextToImage => {
                let cfg: UNet2DConfig = config(src, "unet/config.json").await?;
                LdmUNet::Plain(UNet2DModel::load(&quant.apply(weights(src, "unet", "diffusion_pytorch_model").await?.at(gpu, dtype, ""), "unet"), cfg).await?)
            }
            "UNet2DConditionModel" if kind == LdmKind::TextToImage => {
                let cfg: UNet2DConditionConfig = config(src, "unet/config.json").await?;
                LdmUNet::Conditional(UNet2DConditionModel::load(&quant.apply(weights(src, "unet", "diffusion_pytorch_model").await?.at(gpu, dtype, ""), "unet"), cfg).await?)
            }
            other => return Err(Error::Model(format!("{} with a {other} is not supported (LDMTextToImagePipeline takes a UNet2DConditionModel, the others a UNet2DModel)", kind.class_name()))),
        };
        let first_stage = FirstStage::load(gpu, src, "vqvae", component_class(index, "vqvae").unwrap_or("VQModel"), dtype, quant, encoder).await?;
        let text = if kind == LdmKind::TextToImage {
            match component_class(index, "bert") {
                Some("LDMBertModel") | None => {}
                Some(other) => return Err(Error::Model(format!("LDMTextToImagePipeline with a {other} text encoder is not supported (LDMBertModel is)"))),
            }
            let tokenizer = load_bert_tokenizer(src, "tokenizer").await?;
            let cfg: LdmBertConfig = config(src, "bert/config.json").await?;
            let bert = LdmBertModel::load(&quant.apply(weights(src, "bert", "model").await?.at(gpu, dtype, ""), "bert"), cfg).await?;
            Some(LdmText { tokenizer, bert })
        } else {
            None
        };
        let scheduler_config = config(src, "scheduler/scheduler_config.json").await?;
        if let (Some(c), LdmUNet::Plain(u)) = (&concat, &unet) {
            let (latent, cond) = (first_stage.latent_channels(), c.unet_channels(&first_stage));
            if u.config.in_channels != latent + cond || u.config.out_channels != latent {
                return Err(Error::Model(format!(
                    "the UNet takes {} channels and predicts {}; the latents have {latent} and the condition adds {cond} (ldm-web.json's concat entry does not fit this model)",
                    u.config.in_channels, u.config.out_channels
                )));
            }
        }
        let learnt_unconditional = hints.training.is_some_and(|t| t.config.cond_dropout > 0.0);
        Ok(Self { name: name.to_string(), kind, unet, first_stage, text, scheduler_config, dtype, concat, learnt_unconditional })
    }

    /// The scheduler `kind` (default: the model's own), built from the model's config as
    /// `Scheduler.from_config` does (the LDM pipelines apply no fix-ups).
    pub fn scheduler(&self, kind: Option<SchedulerKind>) -> Result<Box<dyn Scheduler>> {
        match kind {
            Some(k) => schedulers::build(k, &self.scheduler_config),
            None => schedulers::build_default(&self.scheduler_config),
        }
    }

    /// The image size a run makes by default: the UNet's sample size through the first stage
    /// (the super-resolution pipeline's output size follows its input).
    pub fn default_size(&self) -> (usize, usize) {
        match &self.unet {
            LdmUNet::Plain(u) => {
                let (h, w) = u.config.sample_size.as_ref().map_or((64, 64), |s| s.height_width());
                (w * self.first_stage.scale_factor(), h * self.first_stage.scale_factor())
            }
            // diffusers: sample_size * vae_scale_factor.
            LdmUNet::Conditional(u) => {
                let s = u.config.sample_size.unwrap_or(32) * self.first_stage.scale_factor();
                (s, s)
            }
        }
    }

    /// What the output's sides must be multiples of: the first stage's factor times the UNet's.
    pub fn size_multiple(&self) -> usize {
        match &self.unet {
            LdmUNet::Plain(u) => self.first_stage.scale_factor() * u.config.downsample_factor(),
            LdmUNet::Conditional(u) => 8 * u.config.downsample_factor(),
        }
    }

    /// Checks settings before any work starts.
    pub fn validate(&self, p: &Txt2ImgParams, image: Option<&LdmImage>) -> Result<()> {
        let low_res = match image {
            Some(LdmImage::LowRes(l)) => Some(l),
            _ => None,
        };
        if p.steps == 0 || p.steps > 1000 {
            return Err(Error::Input(format!("steps must be between 1 and 1000, got {}", p.steps)));
        }
        if p.batch == 0 || p.batch > 64 {
            return Err(Error::Input(format!("batch must be between 1 and 64, got {}", p.batch)));
        }
        if !p.guidance_scale.is_finite() || !p.eta.is_finite() {
            return Err(Error::Input("guidance and eta must be finite numbers".into()));
        }
        match (self.kind, &self.unet) {
            (LdmKind::SuperResolution, LdmUNet::Plain(u)) => {
                let img = low_res.ok_or_else(|| Error::Input("the super-resolution model needs a low-resolution input image (--init-image)".into()))?;
                let f = u.config.downsample_factor();
                if img.width == 0 || img.height == 0 || img.width % f != 0 || img.height % f != 0 {
                    return Err(Error::Input(format!("the low-resolution image is {}x{}; this model needs sides divisible by {f}", img.width, img.height)));
                }
                if u.config.in_channels < 3 || u.config.in_channels % 2 != 0 {
                    return Err(Error::Model(format!("a super-resolution UNet takes latents and the image in equal halves; this one has {} input channels", u.config.in_channels)));
                }
            }
            // The paper samples its convolutional LDMs beyond their training size: any size the
            // first stage and the UNet divide.
            (LdmKind::Unconditional | LdmKind::Concat, LdmUNet::Plain(u)) => {
                let f = self.first_stage.scale_factor() * u.config.downsample_factor();
                if p.width == 0 || p.height == 0 || p.width % f != 0 || p.height % f != 0 {
                    return Err(Error::Input(format!("this model needs width and height divisible by {f}, got {}x{}", p.width, p.height)));
                }
                if p.width.max(p.height) > 4096 {
                    return Err(Error::Input(format!("{}x{} is larger than the 4096-pixel limit", p.width, p.height)));
                }
            }
            (LdmKind::TextToImage, LdmUNet::Conditional(u)) => {
                let f = 8 * u.config.downsample_factor();
                if p.width == 0 || p.height == 0 || p.width % f != 0 || p.height % f != 0 {
                    return Err(Error::Input(format!("this model needs width and height divisible by {f}, got {}x{}", p.width, p.height)));
                }
                if p.width.max(p.height) > 4096 {
                    return Err(Error::Input(format!("{}x{} is larger than the 4096-pixel limit", p.width, p.height)));
                }
            }
            _ => {}
        }
        match (self.kind, image) {
            (LdmKind::SuperResolution, Some(LdmImage::LowRes(_))) | (LdmKind::Concat, Some(LdmImage::Condition(_))) => {}
            (LdmKind::Concat, _) => return Err(Error::Input("this concatenation-conditioned model needs its condition image (--init-image)".into())),
            (_, Some(LdmImage::Condition(_))) | (LdmKind::Unconditional | LdmKind::TextToImage, Some(_)) => {
                return Err(Error::Input(format!("{} takes no input image", self.kind.class_name())));
            }
            _ => {}
        }
        Ok(())
    }

    /// Generates `p.batch` images from the super-resolution model's input or a concatenation-
    /// conditioned model's condition image, or from nothing.
    pub async fn generate(&self, gpu: &Gpu, p: &Txt2ImgParams, image: Option<&LdmImage>, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Images, StageTimes)> {
        self.validate(p, image)?;
        let (latents, mut times) = match (&self.unet, image, &self.concat) {
            (LdmUNet::Plain(u), Some(LdmImage::Condition(img)), Some(c)) => self.denoise_concat(gpu, u, c, p, img, now_ms, progress).await?,
            (LdmUNet::Plain(u), Some(LdmImage::LowRes(img)), _) => self.denoise_super_resolution(gpu, u, p, img, now_ms, progress).await?,
            (LdmUNet::Plain(u), _, _) => self.denoise_unconditional(gpu, u, p, now_ms, progress).await?,
            (LdmUNet::Conditional(u), _, _) => self.denoise_text(gpu, u, p, now_ms, progress).await?,
        };
        let t0 = now_ms();
        // LDMPipeline and LDMTextToImagePipeline divide by the scaling factor; the
        // super-resolution pipeline decodes its latents as they are.
        let inv = if self.kind == LdmKind::SuperResolution { 1.0 } else { 1.0 / self.first_stage.scaling_factor() };
        let z: Vec<f32> = latents.data.iter().map(|v| v * inv).collect();
        let image = self.first_stage.decode(gpu, &z, latents.shape, self.dtype)?;
        let &[b, _, h, w] = image.shape() else { return Err(Error::Shape("decoded image".into())) };
        let pixels = gpu.read(&image).await?;
        times.vae_decode_ms = now_ms() - t0;
        Ok((to_hwc01(&pixels, b, h, w), times))
    }

    fn scheduler_for(&self, p: &Txt2ImgParams) -> Result<Box<dyn Scheduler>> {
        let mut s = self.scheduler(p.scheduler)?;
        if p.eta != 0.0 {
            s.set_eta(p.eta);
        }
        Ok(s)
    }

    async fn denoise_unconditional(&self, gpu: &Gpu, unet: &UNet2DModel, p: &Txt2ImgParams, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Latents, StageTimes)> {
        // diffusers' LDMPipeline draws latents of the UNet's sample_size; other sizes are
        // that pipeline with the sample size changed (`unet.register_to_config(sample_size=...)`).
        let f = self.first_stage.scale_factor();
        let (h, w) = (p.height / f, p.width / f);
        let shape = [p.batch, unet.config.in_channels, h, w];
        let mut scheduler = self.scheduler_for(p)?;
        let mut gen = TorchGenerator::new(p.seed);
        // diffusers scales by init_noise_sigma before set_timesteps here.
        let sigma = scheduler.init_noise_sigma();
        let latents: Vec<f32> = gen.randn(shape.iter().product()).into_iter().map(|v| v * sigma).collect();
        scheduler.set_timesteps(p.steps)?;
        let step = Loop { shape, input_shape: shape, scale_input: true, guidance: None, condition: None, preview_every: p.latent_preview_every, sync: p.sync_steps };
        self.denoise_loop(gpu, scheduler.as_mut(), p.seed, latents, &step, &|x| Ok(x.clone()), &|x, t| unet.forward(gpu, x, t, None), now_ms, progress).await
    }

    /// CompVis' `DDIMSampler.sample` for `conditioning_key: concat`: `apply_model` runs the UNet
    /// on `cat([x, c])`; samplers that scale their input scale `x` only (as k-diffusion's
    /// wrappers of these models do), the condition goes in as it is.
    #[allow(clippy::too_many_arguments)]
    async fn denoise_concat(&self, gpu: &Gpu, unet: &UNet2DModel, c: &ConcatCondition, p: &Txt2ImgParams, img: &InputImage, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Latents, StageTimes)> {
        let t0 = now_ms();
        let condition = c.prepare(gpu, &self.first_stage, img, p.width, p.height, self.dtype).await?;
        let encode_ms = now_ms() - t0;
        let f = self.first_stage.scale_factor();
        let (cl, cc) = (self.first_stage.latent_channels(), c.unet_channels(&self.first_stage));
        let shape = [p.batch, cl, p.height / f, p.width / f];
        let mut scheduler = self.scheduler_for(p)?;
        let mut gen = TorchGenerator::new(p.seed);
        let noise = gen.randn(shape.iter().product());
        scheduler.set_timesteps(p.steps)?;
        let sigma = scheduler.init_noise_sigma();
        let latents: Vec<f32> = noise.into_iter().map(|v| v * sigma).collect();
        // Classifier-free guidance (for models trained with condition dropout, as `ldm train`
        // does): the unconditional half sees a zero condition, as dropped conditions were.
        let guided = p.guidance_scale != 1.0;
        let rows = if guided { 2 * shape[0] } else { shape[0] };
        let mut values = if guided { vec![0.0; shape[0] * cc * shape[2] * shape[3]] } else { Vec::new() };
        values.extend(condition.repeat(shape[0]));
        let condition = gpu.upload(&[rows, cc, shape[2], shape[3]], DType::F32, &values)?;
        let doubled = |x: &Latent| -> Result<Latent> {
            if !guided {
                return Ok(x.clone());
            }
            let x = LatentMath::Device(gpu).tensor(x)?.reshape(&shape)?;
            Ok(Latent::Device(ops::concat(gpu, &[&x, &x], 0)?))
        };
        let step = Loop {
            shape, input_shape: [rows, cl + cc, shape[2], shape[3]], scale_input: true, guidance: guided.then_some(p.guidance_scale),
            condition: Some(&condition), preview_every: p.latent_preview_every, sync: p.sync_steps,
        };
        let (latents, mut times) = self.denoise_loop(gpu, scheduler.as_mut(), p.seed, latents, &step, &doubled, &|x, t| unet.forward(gpu, x, t, None), now_ms, progress).await?;
        times.vae_encode_ms = encode_ms;
        Ok((latents, times))
    }

    #[allow(clippy::too_many_arguments)]
    async fn denoise_super_resolution(&self, gpu: &Gpu, unet: &UNet2DModel, p: &Txt2ImgParams, img: &LowResImage, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Latents, StageTimes)> {
        let (b, c, h, w) = (p.batch, unet.config.in_channels / 2, img.height, img.width);
        if img.data.len() != 3 * h * w || unet.config.in_channels - c != 3 {
            return Err(Error::Input(format!("the low-resolution image must be RGB {w}x{h} for a UNet with {} input channels", unet.config.in_channels)));
        }
        let mut scheduler = self.scheduler_for(p)?;
        let mut gen = TorchGenerator::new(p.seed);
        let noise = gen.randn(b * c * h * w);
        scheduler.set_timesteps(p.steps)?;
        let sigma = scheduler.init_noise_sigma();
        let latents: Vec<f32> = noise.into_iter().map(|v| v * sigma).collect();
        // The scheduler scales the concatenation [latents, image] as one tensor.
        let image = gpu.upload(&[b, 3, h, w], DType::F32, &img.data.repeat(b))?;
        let concat = |x: &Latent| -> Result<Latent> {
            let x = LatentMath::Device(gpu).tensor(x)?.reshape(&[b, c, h, w])?;
            Ok(Latent::Device(ops::concat(gpu, &[&x, &image], 1)?))
        };
        let step = Loop { shape: [b, c, h, w], input_shape: [b, c + 3, h, w], scale_input: true, guidance: None, condition: None, preview_every: p.latent_preview_every, sync: p.sync_steps };
        self.denoise_loop(gpu, scheduler.as_mut(), p.seed, latents, &step, &concat, &|x, t| unet.forward(gpu, x, t, None), now_ms, progress).await
    }

    async fn denoise_text(&self, gpu: &Gpu, unet: &UNet2DConditionModel, p: &Txt2ImgParams, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Latents, StageTimes)> {
        let text = self.text.as_ref().ok_or_else(|| Error::Model("this text-to-image model has no text encoder".into()))?;
        let b = p.batch;
        // diffusers guides whenever the scale is not exactly 1 (not only above 1).
        let guided = p.guidance_scale != 1.0;
        let t0 = now_ms();
        // The pipeline pads to 77 tokens whatever the tokenizer's own maximum.
        let embed = |prompt: &str| text.bert.forward(gpu, &[text.tokenizer.encode(prompt, 77)]);
        let cond = embed(&p.prompt)?;
        let uncond = if guided { Some(embed("")?) } else { None };
        let rows: Vec<&Tensor> = uncond.iter().flat_map(|n| std::iter::repeat_n(n, b)).chain(std::iter::repeat_n(&cond, b)).collect();
        let context = ops::concat(gpu, &rows, 0)?;
        gpu.sync().await?;
        let text_ms = now_ms() - t0;
        let shape = [b, unet.config.in_channels, p.height / 8, p.width / 8];
        let mut scheduler = self.scheduler_for(p)?;
        let mut gen = TorchGenerator::new(p.seed);
        let latents = gen.randn(shape.iter().product());
        scheduler.set_timesteps(p.steps)?;
        // LDMTextToImagePipeline calls neither init_noise_sigma nor scale_model_input.
        let rows = if guided { 2 * b } else { b };
        let step = Loop { shape, input_shape: [rows, shape[1], shape[2], shape[3]], scale_input: false, guidance: guided.then_some(p.guidance_scale), condition: None, preview_every: p.latent_preview_every, sync: p.sync_steps };
        let duplicate = |x: &Latent| -> Result<Latent> {
            if !guided {
                return Ok(x.clone());
            }
            let t = LatentMath::Device(gpu).tensor(x)?;
            Ok(Latent::Device(ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: &t, map: IndexMap::repeat(t.numel()) }], &[2 * t.numel()], DType::F32)?))
        };
        let (latents, mut times) = self.denoise_loop(gpu, scheduler.as_mut(), p.seed, latents, &step, &duplicate, &|x, t| unet.forward(gpu, x, t, &context), now_ms, progress).await?;
        times.text_encoder_ms = text_ms;
        Ok((latents, times))
    }

    /// The loop all three share: the model input is made from the latents (and scaled by the
    /// scheduler when the pipeline does), the prediction guided when asked, one step taken; the
    /// latents stay on the device.
    #[allow(clippy::too_many_arguments)]
    async fn denoise_loop(
        &self, gpu: &Gpu, scheduler: &mut dyn Scheduler, seed: u64, latents: Vec<f32>, l: &Loop<'_>,
        make_input: &dyn Fn(&Latent) -> Result<Latent>, model: &dyn Fn(&Tensor, f32) -> Result<Tensor>, now_ms: &dyn Fn() -> f64, progress: Progress<'_>,
    ) -> Result<(Latents, StageTimes)> {
        let mut times = StageTimes::default();
        let steps = scheduler.timesteps().len();
        let math = LatentMath::Device(gpu);
        let mut latents = math.put(latents)?;
        let n: usize = l.shape.iter().product();
        // The scheduler's own noise: torch's global generator in diffusers (see the module doc).
        let mut step_noise = TorchGenerator::new(seed);
        for i in 0..steps {
            let t_start = now_ms();
            let t = scheduler.timesteps()[i];
            let input = make_input(&latents)?;
            let input = if l.scale_input { scheduler.scale_model_input(math, &input, i)? } else { input };
            let input = math.tensor(&input)?;
            let input = match l.condition {
                Some(c) => {
                    let b = l.input_shape[0];
                    let rows = [b, input.numel() / (b * l.shape[2] * l.shape[3]), l.shape[2], l.shape[3]];
                    ops::concat(gpu, &[&input.reshape(&rows)?, c], 1)?
                }
                None => input,
            };
            let x = ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: &input, map: IndexMap::same(input.numel()) }], &l.input_shape, self.dtype)?;
            let out = model(&x, t)?;
            let prediction = match l.guidance {
                Some(g) => guide(gpu, &out, g, 0.0, l.shape[0])?,
                None => ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: &out, map: IndexMap::same(n) }], &[n], DType::F32)?,
            };
            latents = scheduler.step(math, &Latent::Device(prediction), i, &latents, &mut step_noise)?;
            // One submission per step: the GPU runs this step while the next one is recorded.
            gpu.flush();
            if l.sync {
                gpu.sync().await?;
            }
            times.unet_steps_ms.push(now_ms() - t_start);
            let host = if l.preview_every > 0 && ((i + 1) % l.preview_every == 0 || i + 1 == steps) { Some(gpu.read(&math.tensor(&latents)?).await?) } else { None };
            progress(&StepProgress { step: i + 1, steps, latents: host.as_deref(), shape: l.shape, preview: None })?;
        }
        let data = gpu.read(&math.tensor(&latents)?).await?;
        Ok((Latents { data, shape: l.shape }, times))
    }
}

/// Shapes and options of one denoising loop.
struct Loop<'c> {
    /// The latents `[B, C, H, W]`.
    shape: [usize; 4],
    /// What the UNet is given.
    input_shape: [usize; 4],
    scale_input: bool,
    guidance: Option<f32>,
    /// Concatenated to each sample after scaling (f32 `[B, C', H, W]`).
    condition: Option<&'c Tensor>,
    /// Latents read back for the progress callback every this many steps (0: never).
    preview_every: usize,
    /// Wait for the GPU after every step (see [`Txt2ImgParams::sync_steps`]).
    sync: bool,
}

/// Reads a BERT tokenizer folder: `vocab.txt` (or `tokenizer.json`) and `tokenizer_config.json`.
pub async fn load_bert_tokenizer(src: &dyn FileSource, dir: &str) -> Result<BertTokenizer> {
    use crate::loader::read_file;
    let text = |b: Vec<u8>, p: &str| String::from_utf8(b).map_err(|_| Error::Model(format!("{} is not UTF-8 text", src.describe(p))));
    let cfg_path = format!("{dir}/tokenizer_config.json");
    let cfg: BertTokenizerConfig = match read_file(src, &cfg_path).await? {
        Some(b) => serde_json::from_str(&text(b, &cfg_path)?).map_err(|e| Error::Model(format!("{}: {e}", src.describe(&cfg_path))))?,
        None => BertTokenizerConfig::default(),
    };
    let vocab_path = format!("{dir}/vocab.txt");
    if let Some(v) = read_file(src, &vocab_path).await? {
        return BertTokenizer::from_vocab_txt(&text(v, &vocab_path)?, &cfg);
    }
    let json_path = format!("{dir}/tokenizer.json");
    if let Some(j) = read_file(src, &json_path).await? {
        let v: serde_json::Value = serde_json::from_str(&text(j, &json_path)?).map_err(|e| Error::Model(format!("{}: {e}", src.describe(&json_path))))?;
        let vocab = serde_json::from_value(v["model"]["vocab"].clone()).map_err(|e| Error::Model(format!("{}: model.vocab: {e}", src.describe(&json_path))))?;
        return BertTokenizer::from_vocab(vocab, &cfg);
    }
    Err(Error::Model(format!("no tokenizer in {} (expected vocab.txt or tokenizer.json)", src.describe(dir))))
}
