//! Stable Diffusion 1.x / 2.x, SDXL (base, refiner, Turbo) and LCM: text-to-image, img2img,
//! inpainting, depth-to-image, ControlNet and upscaling, step for step as diffusers' pipelines,
//! so a seed gives diffusers' image.

use super::conditions::{depth_latent, interpolate, start_for_strength, Interpolation, Control, DepthMap, ImageConditions, Task};
use super::image_input::{self, InputImage, Resample};
use crate::models::ControlNetModel;
use super::loading::{Family, StableDiffusionModel};
use super::prompt::{PromptText, PromptWeighting};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::models::unet_2d_blocks::Residuals;
use crate::models::unet_2d_condition::{AddedConditions, StepConditions};
use crate::ops::{self, Expr, ExprInput, IndexMap};
use crate::rng::TorchGenerator;
use crate::schedulers::{self, Inputs, Latent, LatentMath, Scheduler, SchedulerKind};

/// diffusers' default `noise_level` of the x4 upscaler.
pub const DEFAULT_NOISE_LEVEL: u32 = 20;

/// Generation settings (diffusers' `__call__` arguments).
#[derive(Clone, Debug)]
pub struct Txt2ImgParams {
    pub prompt: String,
    /// `None` means the empty prompt, as diffusers.
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f32,
    pub guidance_rescale: f32,
    pub width: usize,
    pub height: usize,
    /// `None`: the model's own scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// DDIM's eta (ignored by other schedulers, as diffusers).
    pub eta: f32,
    /// Layers skipped at the end of the text encoder, counted as diffusers (1 = penultimate).
    pub clip_skip: usize,
    pub batch: usize,
    /// SDXL: the second text encoder's prompts (default: the prompt and negative prompt).
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
    /// How prompts are read (diffusers' plain text, or AUTOMATIC1111's weights and chunks).
    pub prompt_weighting: PromptWeighting,
    /// SDXL's size conditions and the refiner's aesthetic scores.
    pub xl: XlConditions,
    /// SDXL: end denoising at this fraction of the schedule (the base's part of a hand-over to
    /// the refiner; the result is latents, [`StableDiffusionModel::denoise_with`]).
    pub denoising_end: Option<f32>,
    /// SDXL img2img: start at this fraction of the schedule from the init latents, adding no
    /// noise (the refiner's part of a hand-over); replaces the strength.
    pub denoising_start: Option<f32>,
    /// Decode a preview with the tiny autoencoder every this many steps (0: none; needs one).
    pub tiny_preview_every: usize,
    /// Read the latents back for [`StepProgress::latents`] every this many steps (0: never; the
    /// latents otherwise stay on the device).
    pub latent_preview_every: usize,
    /// Wait for the GPU after every step, so that each step's time is its own (benchmarks);
    /// otherwise the next step is recorded while the GPU runs this one.
    pub sync_steps: bool,
}

impl Default for Txt2ImgParams {
    fn default() -> Self {
        Self {
            prompt: String::new(), negative_prompt: None, seed: 0, steps: 50, guidance_scale: 7.5, guidance_rescale: 0.0,
            width: 512, height: 512, scheduler: None, eta: 0.0, clip_skip: 0, batch: 1, prompt_2: None, negative_prompt_2: None,
            prompt_weighting: PromptWeighting::None, xl: XlConditions::default(), denoising_end: None, denoising_start: None,
            tiny_preview_every: 0, latent_preview_every: 0, sync_steps: false,
        }
    }
}

/// SDXL's micro-conditions (diffusers' `original_size`, `crops_coords_top_left`, `target_size`
/// and their negative counterparts, `(height, width)` pairs), and the refiner's aesthetic scores.
#[derive(Clone, Debug, PartialEq)]
pub struct XlConditions {
    /// Default: the output size.
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    /// Default: the output size.
    pub target_size: Option<(usize, usize)>,
    pub negative_original_size: Option<(usize, usize)>,
    pub negative_crops_coords_top_left: (usize, usize),
    pub negative_target_size: Option<(usize, usize)>,
    /// The refiner's (`requires_aesthetics_score`): 6 and 2.5 by default.
    pub aesthetic_score: f32,
    pub negative_aesthetic_score: f32,
}

impl Default for XlConditions {
    fn default() -> Self {
        Self {
            original_size: None, crops_coords_top_left: (0, 0), target_size: None, negative_original_size: None,
            negative_crops_coords_top_left: (0, 0), negative_target_size: None, aesthetic_score: 6.0, negative_aesthetic_score: 2.5,
        }
    }
}

/// Images as diffusers' `output_type="np"`: `[batch, height, width, 3]` in [0, 1].
#[derive(Clone, Debug)]
pub struct Images {
    pub batch: usize,
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Images {
    /// 8-bit RGB of image `i`, rounded as diffusers' `numpy_to_pil`.
    pub fn rgb8(&self, i: usize) -> Vec<u8> {
        let n = self.width * self.height * 3;
        self.data[i * n..(i + 1) * n].iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect()
    }
}

/// Where the time went.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StageTimes {
    pub text_encoder_ms: f64,
    /// Encoding init images (img2img, inpainting, depth-to-image).
    pub vae_encode_ms: f64,
    pub unet_steps_ms: Vec<f64>,
    pub vae_decode_ms: f64,
}

/// What a caller sees after each denoising step.
pub struct StepProgress<'a> {
    /// Steps done (1-based) and in all.
    pub step: usize,
    pub steps: usize,
    /// The current latents `[batch, channels, height, width]`, at the steps
    /// [`Txt2ImgParams::latent_preview_every`] asks (and the last).
    pub latents: Option<&'a [f32]>,
    pub shape: [usize; 4],
    /// The tiny autoencoder's image of them, at the steps [`Txt2ImgParams::tiny_preview_every`] asks.
    pub preview: Option<&'a Images>,
}

/// Called after every denoising step; an error (e.g. [`Error::Cancelled`]) stops the run.
pub type Progress<'a> = &'a mut dyn FnMut(&StepProgress) -> Result<()>;

/// Latents after the last denoising step, ready to decode.
#[derive(Clone, Debug)]
pub struct Latents {
    pub data: Vec<f32>,
    /// `[batch, channels, height, width]`.
    pub shape: [usize; 4],
}

/// Images as the user gave them (any size and mode) and the settings that go with them, before
/// [`StableDiffusionModel::prepare_images`] sizes them.
pub struct UserImages<'m> {
    pub init: Option<InputImage>,
    pub mask: Option<InputImage>,
    /// Gaussian blur radius for the mask (diffusers' `mask_processor.blur`).
    pub mask_blur: f32,
    pub depth: Option<InputImage>,
    /// A depth estimator's prediction, taken as diffusers takes its own estimator's when no
    /// depth map is given ([`StableDiffusionModel::estimate_depth`]).
    pub depth_prediction: Option<DepthMap>,
    /// ControlNets with their condition images and scales.
    pub controls: Vec<(&'m ControlNetModel, InputImage, f32)>,
    pub strength: Option<f32>,
    pub guess_mode: bool,
    pub control_start: f32,
    pub control_end: f32,
    pub noise_level: Option<u32>,
}

impl Default for UserImages<'_> {
    fn default() -> Self {
        Self { init: None, mask: None, mask_blur: 0.0, depth: None, depth_prediction: None, controls: Vec::new(), strength: None, guess_mode: false, control_start: 0.0, control_end: 1.0, noise_level: None }
    }
}

/// What [`StableDiffusionModel::prepare_images`] makes of the user's images.
pub struct PreparedImages<'m> {
    pub width: usize,
    pub height: usize,
    pub conditions: ImageConditions<'m>,
    /// Said to the user when the size differs from the one diffusers would pick.
    pub note: Option<String>,
}

impl StableDiffusionModel {
    /// The scheduler `kind` for `task` (default: the model's own), built from the model's
    /// scheduler config as `Kind.from_config(pipe.scheduler.config)` after the fix-ups the
    /// task's diffusers pipeline class applies in `__init__` to the scheduler the model ships
    /// (see [`scheduler_fixups`]); keys the config lacks take the chosen class's defaults.
    pub fn scheduler(&self, kind: Option<SchedulerKind>, task: Task, controls: bool) -> Result<Box<dyn Scheduler>> {
        let cfg = scheduler_fixups(&self.scheduler_config, task, controls);
        match kind {
            Some(k) => schedulers::build(k, &cfg),
            None => schedulers::build_default(&cfg),
        }
    }

    /// Checks sizes and counts before any work starts.
    pub fn validate(&self, p: &Txt2ImgParams) -> Result<()> {
        // As diffusers: multiples of the VAE's factor; the UNet resizes levels that do not halve.
        let f = self.vae_config.scale_factor();
        if p.width == 0 || p.height == 0 || !p.width.is_multiple_of(f) || !p.height.is_multiple_of(f) {
            return Err(Error::Input(format!("width and height must be positive multiples of {f}, got {}x{}", p.width, p.height)));
        }
        if p.width.max(p.height) > 4096 {
            return Err(Error::Input(format!("{}x{} is larger than the 4096-pixel limit", p.width, p.height)));
        }
        if p.steps == 0 || p.steps > 1000 {
            return Err(Error::Input(format!("steps must be between 1 and 1000, got {}", p.steps)));
        }
        if p.batch == 0 || p.batch > 64 {
            return Err(Error::Input(format!("batch must be between 1 and 64, got {}", p.batch)));
        }
        if !p.guidance_scale.is_finite() || !p.guidance_rescale.is_finite() || !p.eta.is_finite() {
            return Err(Error::Input("guidance, guidance rescale and eta must be finite numbers".into()));
        }
        let layers = self.text.min_layers() - usize::from(self.family.is_xl());
        if p.clip_skip >= layers {
            return Err(Error::Input(format!("clip skip must be less than {layers}, got {}", p.clip_skip)));
        }
        for (what, v) in [("denoising_start", p.denoising_start), ("denoising_end", p.denoising_end)] {
            if let Some(v) = v {
                if !self.family.is_xl() {
                    return Err(Error::Input(format!("{what} is for SDXL models (the base-to-refiner hand-over)")));
                }
                if !(v > 0.0 && v < 1.0) {
                    return Err(Error::Input(format!("{what} must be between 0 and 1 (exclusive), got {v}")));
                }
            }
        }
        if !self.family.is_xl() && (p.prompt_2.is_some() || p.negative_prompt_2.is_some() || p.xl != XlConditions::default()) {
            return Err(Error::Input("prompt 2, size conditions and aesthetic scores are for SDXL models".into()));
        }
        Ok(())
    }

    /// Generates `params.batch` images (the VAE must be loaded); `now_ms` times stages, `progress`
    /// sees every step.
    pub async fn txt2img(&self, gpu: &Gpu, p: &Txt2ImgParams, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Images, StageTimes)> {
        self.generate(gpu, p, &ImageConditions::default(), now_ms, progress).await
    }

    /// Generates with image conditions: the task (text-to-image, img2img, inpainting,
    /// depth-to-image) follows from the UNet and the images given, as [`Task::choose`] says.
    pub async fn generate(&self, gpu: &Gpu, p: &Txt2ImgParams, cond: &ImageConditions<'_>, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Images, StageTimes)> {
        if !self.tiny_decode || cond.init.is_some() {
            self.vae()?;
        }
        let (latents, mut times) = self.denoise_with(gpu, p, cond, now_ms, progress).await?;
        let t0 = now_ms();
        let images = self.decode(gpu, &latents).await?;
        times.vae_decode_ms = now_ms() - t0;
        Ok((images, times))
    }

    /// Text encoding and the denoising loop of text-to-image.
    pub async fn denoise(&self, gpu: &Gpu, p: &Txt2ImgParams, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Latents, StageTimes)> {
        self.denoise_with(gpu, p, &ImageConditions::default(), now_ms, progress).await
    }

    /// The output size and image conditions for `images`, sized and normalised as diffusers'
    /// image processors do: the output follows `width` / `height` when given, else the init
    /// image (or the first condition image) rounded down to what the UNet takes, else the
    /// model's sample size. An upscaler's output is its input's size times the VAE's factor.
    pub fn prepare_images<'m>(&self, images: UserImages<'m>, width: Option<usize>, height: Option<usize>) -> Result<PreparedImages<'m>> {
        let vae_f = self.vae_config.scale_factor();
        let f = vae_f * self.unet.config.downsample_factor();
        let default_size = self.unet.config.sample_size.unwrap_or(64) * vae_f;
        let (mut w, mut h) = (width.unwrap_or(default_size), height.unwrap_or(default_size));
        let mut note = None;
        if !(0.0..=1000.0).contains(&images.mask_blur) {
            return Err(Error::Input(format!("the mask blur must be a radius from 0 to 1000, got {}", images.mask_blur)));
        }
        // The upscaler takes its input at a size the UNet divides evenly (bicubic, as its
        // image processor).
        let low_res = match (&images.init, &self.upscaler) {
            (Some(img), Some(_)) => {
                let step = f / vae_f;
                let (lw, lh) = (img.width - img.width % step, img.height - img.height % step);
                if lw == 0 || lh == 0 {
                    return Err(Error::Input(format!("the low-resolution image is {}x{}; this upscaler needs at least {step} pixels per side", img.width, img.height)));
                }
                (w, h) = (lw * vae_f, lh * vae_f);
                if width.is_some_and(|v| v != w) || height.is_some_and(|v| v != h) {
                    return Err(Error::Input(format!("this upscaler makes {w}x{h} from a {}x{} image (its size times {vae_f}); leave the width and height unset", img.width, img.height)));
                }
                Some(image_input::rgb_tensor_resampled(img, lw, lh, true, Resample::Bicubic))
            }
            _ => None,
        };
        if let (Some(img), None) = (images.init.as_ref().or(images.controls.first().map(|c| &c.1)), &low_res) {
            // diffusers takes the image's size rounded down to a multiple of the VAE's factor.
            let (rw, rh) = image_input::default_size(img, width, height, vae_f);
            if rw == 0 || rh == 0 {
                return Err(Error::Input(format!("the input image is {}x{}; this model needs at least {vae_f} pixels per side (or give a width and height)", img.width, img.height)));
            }
            if (rw, rh) != (img.width, img.height) && width.is_none() && height.is_none() {
                note = Some(format!("the output is {rw}x{rh}: the input image ({}x{}) is cut to multiples of {vae_f}", img.width, img.height));
            }
            (w, h) = (width.unwrap_or(rw), height.unwrap_or(rh));
        }
        if images.controls.is_empty() && (images.guess_mode || images.control_start != 0.0 || images.control_end != 1.0) {
            return Err(Error::Input("guess mode and the ControlNet start and end need a ControlNet".into()));
        }
        let conditions = ImageConditions {
            init: low_res.or_else(|| images.init.as_ref().map(|img| image_input::rgb_tensor(img, w, h, true))),
            strength: images.strength,
            mask: images.mask.as_ref().map(|m| image_input::mask_tensor(m, w, h, images.mask_blur)),
            depth: images.depth.as_ref().map(|d| DepthMap { width: d.width, height: d.height, data: d.gray_values() }).or(images.depth_prediction),
            controls: images
                .controls
                .iter()
                .map(|(model, img, scale)| Control { model, image: image_input::rgb_tensor(img, w, h, false), scale: *scale, start: images.control_start, end: images.control_end })
                .collect(),
            guess_mode: images.guess_mode,
            noise_level: images.noise_level,
            init_latents: None,
        };
        Ok(PreparedImages { width: w, height: h, conditions, note })
    }

    /// diffusers' default steps and guidance for this pipeline: 75 and 9 for the x4 upscaler,
    /// else `steps` and 7.5.
    pub fn default_steps_guidance(&self, steps: usize) -> (usize, f32) {
        match self.family {
            _ if self.upscaler.is_some() => (75, 9.0),
            Family::LatentConsistency => (4, 8.5),
            Family::Xl { .. } => (steps, 5.0),
            Family::StableDiffusion => (steps, 7.5),
        }
    }

    /// The task `cond` makes of a generation with this model, or why it does not fit.
    pub fn task(&self, p: &Txt2ImgParams, cond: &ImageConditions) -> Result<Task> {
        let task = Task::choose(self.unet.config.in_channels, self.vae_config.latent_channels, cond)?;
        let (w, h) = (p.width, p.height);
        if task == Task::Upscale {
            let f = self.vae_config.scale_factor();
            if cond.init.as_ref().is_some_and(|i| i.len() != 3 * (w / f) * (h / f)) {
                return Err(Error::Input(format!("the low-resolution image must be {}x{} for a {w}x{h} output", w / f, h / f)));
            }
            let noise = self.upscaler.as_ref().ok_or_else(|| Error::Model("this upscaling model has no low_res_scheduler in model_index.json".into()))?;
            let level = cond.noise_level.unwrap_or(DEFAULT_NOISE_LEVEL);
            if level > noise.max_noise_level || level as usize >= noise.alphas_cumprod.len() {
                return Err(Error::Input(format!("noise level {level} is above this model's max_noise_level {}", noise.max_noise_level)));
            }
        } else if cond.init.as_ref().is_some_and(|i| i.len() != 3 * w * h) || cond.mask.as_ref().is_some_and(|m| m.len() != w * h) {
            return Err(Error::Input(format!("the init image and mask must be {w}x{h}, the output size")));
        }
        Ok(task)
    }

    /// Encodes `[3, H, W]` pixels in [-1, 1] to scaled latents `[1, z, h, w]`, drawing the
    /// latent sample from `gen` (diffusers' `retrieve_latents(vae.encode(image), generator)`).
    async fn encode_image(&self, gpu: &Gpu, image: &[f32], w: usize, h: usize, gen: &mut TorchGenerator) -> Result<Vec<f32>> {
        let vae = self.vae()?;
        let x = gpu.upload(&[1, 3, h, w], self.vae_dtype, image)?;
        let dist = vae.encode(gpu, &x).await?;
        let plane = dist.mean.len() / self.vae_config.latent_channels.max(1);
        Ok(dist.sample(gen).into_iter().enumerate().map(|(i, v)| self.vae_config.scale_latent(v, i / plane.max(1))).collect())
    }

    /// diffusers' default strength for `task`: 0.8 (img2img, depth), 1 (inpainting); SDXL's
    /// img2img 0.3, its inpainting 0.9999.
    pub fn default_strength(&self, task: Task) -> f32 {
        match (self.family, task) {
            (Family::Xl { .. }, Task::ImageToImage) => 0.3,
            (Family::Xl { .. }, Task::Inpaint { .. }) => 0.9999,
            _ => task.default_strength(),
        }
    }

    /// Whether the pipeline runs classifier-free guidance: a scale above 1, and neither an LCM
    /// pipeline nor a UNet that embeds the guidance scale itself.
    pub fn guides(&self, p: &Txt2ImgParams) -> bool {
        p.guidance_scale > 1.0 && self.unet.config.time_cond_proj_dim.is_none() && self.family != Family::LatentConsistency
    }

    /// SDXL's size conditions of the prompt and the negative prompt for a `w x h` output
    /// (diffusers' `_get_add_time_ids`): `original_size + crops + target_size`, or for the
    /// refiner `original_size + crops + (aesthetic_score,)`. The text-to-image pipeline gives the
    /// negative row its own crops; img2img and inpainting, quirkily, the positive crops.
    fn time_ids(&self, p: &Txt2ImgParams, task: Task) -> Result<(Vec<f32>, Vec<f32>)> {
        let Family::Xl { requires_aesthetics_score, .. } = self.family else { return Ok((Vec::new(), Vec::new())) };
        let x = &p.xl;
        let out = (p.height, p.width);
        let original = x.original_size.unwrap_or(out);
        let target = x.target_size.unwrap_or(out);
        let pair = |(a, b): (usize, usize)| [a as f32, b as f32];
        let text = matches!(task, Task::TextToImage);
        if requires_aesthetics_score {
            if text {
                return Err(Error::Input("this SDXL refiner (requires_aesthetics_score) refines images: give an init image, or use it after a base model (ldm generate --refiner)".into()));
            }
            let neg_original = x.negative_original_size.unwrap_or(original);
            let pos = [pair(original), pair(x.crops_coords_top_left), [x.aesthetic_score, 0.0]].concat()[..5].to_vec();
            let neg = [pair(neg_original), pair(x.negative_crops_coords_top_left), [x.negative_aesthetic_score, 0.0]].concat()[..5].to_vec();
            return Ok((pos, neg));
        }
        let pos = [pair(original), pair(x.crops_coords_top_left), pair(target)].concat();
        let neg = if text {
            // StableDiffusionXLPipeline: its own negatives only when both sizes are given.
            match (x.negative_original_size, x.negative_target_size) {
                (Some(o), Some(t)) => [pair(o), pair(x.negative_crops_coords_top_left), pair(t)].concat(),
                _ => pos.clone(),
            }
        } else {
            [pair(x.negative_original_size.unwrap_or(original)), pair(x.crops_coords_top_left), pair(x.negative_target_size.unwrap_or(target))].concat()
        };
        Ok((pos, neg))
    }

    /// The scheduler window `[start, end)` of indices into its timesteps: from the strength (or
    /// SDXL's `denoising_start`) to the end (or SDXL's `denoising_end`), as diffusers'
    /// `get_timesteps` and its `denoising_end` filter.
    fn window(&self, p: &Txt2ImgParams, task: Task, strength: f32, scheduler: &dyn Scheduler) -> (usize, usize) {
        let ts = scheduler.timesteps();
        let all = ts.len();
        let train = scheduler.alphas_cumprod().len() as f32;
        let cutoff = |f: f32| (train - f * train).round();
        let start = match (task, p.denoising_start) {
            (Task::TextToImage | Task::Upscale, _) => 0,
            (_, Some(ds)) => {
                let c = cutoff(ds);
                let mut n = ts.iter().filter(|&&t| t < c).count();
                if scheduler.order() == 2 && n % 2 == 0 {
                    n += 1;
                }
                all - n.min(all)
            }
            _ => start_for_strength(p.steps, strength, scheduler.order()).0,
        };
        let end = match p.denoising_end {
            Some(de) if start < all => {
                let c = cutoff(de);
                start + ts[start..].iter().filter(|&&t| t >= c).count()
            }
            _ => all,
        };
        (start, end)
    }

    /// Text encoding and the denoising loop: everything before the VAE, step for step as
    /// diffusers' pipeline for the task (`StableDiffusion{,Img2Img,Inpaint,Depth2Img}Pipeline`,
    /// their SDXL counterparts, `LatentConsistencyModelPipeline`), drawing from the seed's
    /// generator in the same order.
    pub async fn denoise_with(&self, gpu: &Gpu, p: &Txt2ImgParams, cond: &ImageConditions<'_>, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Latents, StageTimes)> {
        self.validate(p)?;
        let task = self.task(p, cond)?;
        let xl = self.family.is_xl();
        if xl && !cond.controls.is_empty() && task != Task::TextToImage {
            return Err(Error::Unsupported("SDXL ControlNets run with text-to-image only so far (no init image or mask)".into()));
        }
        if p.denoising_start.is_some() && !matches!(task, Task::ImageToImage | Task::Inpaint { .. }) {
            return Err(Error::Input("denoising_start continues from an init image or the base model's latents (img2img or inpainting)".into()));
        }
        let mut times = StageTimes::default();
        let mut scheduler = self.scheduler(p.scheduler, task, !cond.controls.is_empty())?;
        scheduler.set_timesteps(p.steps)?;
        if p.eta != 0.0 {
            scheduler.set_eta(p.eta);
        }
        let strength = cond.strength.unwrap_or(self.default_strength(task));
        let (start, all) = self.window(p, task, strength, scheduler.as_ref());
        if start >= all {
            return Err(Error::Input(format!("strength {strength} of {} steps leaves no step to run; raise the strength or the steps", p.steps)));
        }
        let cfg = self.guides(p);
        let b = p.batch;

        // Text: [uncond x b; cond x b] rows, as one context, or two when A1111 weighting made
        // the prompts different lengths (then the UNet runs on each half, as A1111 does).
        let t0 = now_ms();
        let text = PromptText { prompt: &p.prompt, prompt_2: p.prompt_2.as_deref(), clip_skip: p.clip_skip };
        let cond_e = self.text.encode(gpu, &text, p.prompt_weighting, false).await?;
        let neg_e = if !cfg {
            None
        } else if matches!(self.family, Family::Xl { force_zeros_for_empty_prompt: true, .. }) && p.negative_prompt.is_none() {
            // force_zeros_for_empty_prompt: zeros, not the embedding of "".
            let zero = |t: &Tensor| ops::scale(gpu, t, 0.0, 0.0);
            Some(super::prompt::PromptEmbeds { context: zero(&cond_e.context)?, pooled: cond_e.pooled.as_ref().map(zero).transpose()? })
        } else {
            let neg = p.negative_prompt.as_deref().unwrap_or("");
            let neg_text = PromptText { prompt: neg, prompt_2: Some(p.negative_prompt_2.as_deref().unwrap_or(neg)), clip_skip: p.clip_skip };
            Some(self.text.encode(gpu, &neg_text, p.prompt_weighting, true).await?)
        };
        let repeat = |t: &Tensor, n: usize| -> Result<Tensor> { if n == 1 { Ok(t.clone()) } else { ops::concat(gpu, &vec![t; n], 0) } };
        let contexts: Vec<Tensor> = match &neg_e {
            Some(n) if n.context.shape() == cond_e.context.shape() => {
                let rows: Vec<&Tensor> = std::iter::repeat_n(&n.context, b).chain(std::iter::repeat_n(&cond_e.context, b)).collect();
                vec![ops::concat(gpu, &rows, 0)?]
            }
            Some(n) => vec![repeat(&n.context, b)?, repeat(&cond_e.context, b)?],
            None => vec![repeat(&cond_e.context, b)?],
        };
        let rows = if cfg { 2 * b } else { b };
        // SDXL's added conditions per UNet row.
        let added = if xl {
            let (pos_ids, neg_ids) = self.time_ids(p, task)?;
            let pooled = cond_e.pooled.as_ref().ok_or_else(|| Error::Model("SDXL's second text encoder gave no pooled embedding".into()))?;
            let mut text_rows: Vec<&Tensor> = Vec::new();
            let mut ids: Vec<f32> = Vec::new();
            match &neg_e {
                Some(n) => {
                    let np = n.pooled.as_ref().unwrap_or(pooled);
                    text_rows.extend(std::iter::repeat_n(np, b).chain(std::iter::repeat_n(pooled, b)));
                    if task == Task::TextToImage {
                        // StableDiffusionXLPipeline: cat([neg, pos]).repeat(batch): interleaved.
                        for _ in 0..b {
                            ids.extend(&neg_ids);
                            ids.extend(&pos_ids);
                        }
                    } else {
                        for _ in 0..b {
                            ids.extend(&neg_ids);
                        }
                        for _ in 0..b {
                            ids.extend(&pos_ids);
                        }
                    }
                }
                None => {
                    text_rows.extend(std::iter::repeat_n(pooled, b));
                    for _ in 0..b {
                        ids.extend(&pos_ids);
                    }
                }
            }
            Some(AddedConditions { text_embeds: ops::concat(gpu, &text_rows, 0)?, time_ids: ids })
        } else {
            None
        };
        // LCM: the guidance scale embedded (w = scale - 1), one row per image (no guidance batch).
        let timestep_cond = match self.unet.config.time_cond_proj_dim {
            Some(dim) => {
                let row = guidance_scale_embedding(p.guidance_scale - 1.0, dim);
                Some(gpu.upload(&[rows, dim], self.dtype, &row.repeat(rows))?)
            }
            None => None,
        };
        gpu.sync().await?;
        times.text_encoder_ms = now_ms() - t0;

        // Latents: noise from torch's CPU generator, scaled by the initial sigma, or added to the
        // init image's latents at the first timestep.
        let f = self.vae_config.scale_factor();
        let (z, h, w) = (self.vae_config.latent_channels, p.height / f, p.width / f);
        let plane = h * w;
        let mut generator = TorchGenerator::new(p.seed);
        let t0 = now_ms();
        let needs_image_latents = match task {
            Task::TextToImage | Task::Upscale => false,
            Task::ImageToImage | Task::Depth => true,
            Task::Inpaint { unet_mask } => !unet_mask || strength < 1.0 || p.denoising_start.is_some(),
        };
        let init = cond.init.as_deref().unwrap_or(&[]);
        // The upscaler's low-resolution input, noised at its noise level by the low-res
        // scheduler (diffusers draws this noise first).
        let noised_low_res = match (task, &self.upscaler) {
            (Task::Upscale, Some(u)) => {
                let acp = u.alphas_cumprod[cond.noise_level.unwrap_or(DEFAULT_NOISE_LEVEL) as usize];
                let (a, s) = (acp.sqrt(), (1.0 - acp).sqrt());
                let noise = generator.randn(init.len());
                init.iter().zip(noise).map(|(&x, n)| a * x + s * n).collect()
            }
            _ => Vec::new(),
        };
        // Latents given (the base model's, handed to the refiner) are used as they are.
        let image_latents = match (&cond.init_latents, needs_image_latents) {
            (Some(l), _) => {
                if l.len() != b * z * plane && l.len() != z * plane {
                    return Err(Error::Input(format!("the init latents have {} values for {b} x {z} x {h} x {w}", l.len())));
                }
                if l.len() == z * plane { l.repeat(b) } else { l.clone() }
            }
            (None, true) => self.encode_image(gpu, init, p.width, p.height, &mut generator).await?.repeat(b),
            (None, false) => Vec::new(),
        };
        let img2img_handover = task == Task::ImageToImage && p.denoising_start.is_some();
        let noise = if img2img_handover { Vec::new() } else { generator.randn(b * z * plane) };
        let pure_noise = matches!(task, Task::TextToImage | Task::Upscale) || (matches!(task, Task::Inpaint { .. }) && strength == 1.0 && p.denoising_start.is_none());
        // From here on the latents stay on the device: the scheduler's arithmetic, guidance and
        // blending run as kernels, and nothing is read back but the previews asked for.
        let math = LatentMath::Device(gpu);
        let n_lat = b * z * plane;
        let noise = (!noise.is_empty()).then(|| math.put(noise)).transpose()?;
        let image_latents = (!image_latents.is_empty()).then(|| math.put(image_latents)).transpose()?;
        let missing = || Error::Input("this task needs an init image's latents".into());
        let mut latents = if pure_noise {
            let sigma = scheduler.init_noise_sigma();
            let noise = noise.as_ref().ok_or_else(missing)?;
            let mut ins = Inputs::new();
            let n = ins.add(noise);
            math.eval(&(n * sigma), &ins)?
        } else if p.denoising_start.is_some() {
            image_latents.clone().ok_or_else(missing)?
        } else {
            scheduler.add_noise(math, image_latents.as_ref().ok_or_else(missing)?, noise.as_ref().ok_or_else(missing)?, start)?
        };

        // What the UNet takes besides the latents (the same for every row), and the mask of
        // latent blending.
        let (mut extra, mut blend_mask) = (Vec::new(), None);
        match task {
            Task::Inpaint { unet_mask } => {
                let mask = cond.mask.as_deref().unwrap_or(&[]);
                let mask_latent = interpolate(mask, p.width, p.height, w, h, Interpolation::Nearest);
                let hw = p.width * p.height;
                let masked: Vec<f32> = init.iter().enumerate().map(|(i, &v)| if mask[i % hw] < 0.5 { v } else { 0.0 }).collect();
                // diffusers encodes the masked image whatever the UNet, drawing its sample.
                if unet_mask {
                    let masked_latents = self.encode_image(gpu, &masked, p.width, p.height, &mut generator).await?;
                    extra = [mask_latent, masked_latents].concat();
                } else {
                    generator.randn(z * plane);
                    blend_mask = Some(gpu.upload(&[plane], DType::F32, &mask_latent)?);
                }
            }
            Task::Depth => {
                let depth = cond.depth.as_ref().ok_or_else(|| Error::Input("depth-to-image needs a depth map".into()))?;
                extra = depth_latent(depth, w, h)?;
            }
            Task::Upscale => extra = noised_low_res,
            Task::TextToImage | Task::ImageToImage => {}
        }
        let class_label = (task == Task::Upscale).then(|| cond.noise_level.unwrap_or(DEFAULT_NOISE_LEVEL));
        times.vae_encode_ms = now_ms() - t0;
        let extra_c = extra.len() / plane;
        // The extra channels of every UNet row, uploaded once.
        let extra_rows = if extra.is_empty() { None } else { Some(gpu.upload(&[rows, extra_c, h, w], self.dtype, &extra.repeat(rows))?) };

        // ControlNets: condition embeddings once; in guess mode with guidance they see only the
        // conditional rows.
        let embeddings: Vec<Tensor> = cond.controls.iter().map(|c| c.model.embed_condition(gpu, &c.image, p.width, p.height, self.dtype)).collect::<Result<_>>()?;
        let guess = cond.guess_mode && cfg;
        let control_context = if guess { repeat(&cond_e.context, b)? } else if contexts.len() == 1 { contexts[0].clone() } else { ops::concat(gpu, &[&contexts[0], &contexts[1]], 0)? };
        // diffusers gives a guess-mode SDXL ControlNet the second half of the added conditions.
        let control_added = match (&added, guess) {
            (Some(a), true) => {
                let half = a.text_embeds.dim(0) / 2;
                let k = a.time_ids.len() / a.text_embeds.dim(0);
                let text = ops::slice(gpu, &a.text_embeds, half * a.text_embeds.dim(1), &[half, a.text_embeds.dim(1)])?;
                Some(AddedConditions { text_embeds: text, time_ids: a.time_ids[half * k..].to_vec() })
            }
            _ => None,
        };

        for i in start..all {
            let t_start = now_ms();
            let t = scheduler.timesteps()[i];
            let scaled = math.tensor(&scheduler.scale_model_input(math, &latents, i)?)?;
            // The model's rows ([uncond; cond] under guidance: the latents twice) in its dtype.
            let as_rows = |k: usize| ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: &scaled, map: IndexMap::repeat(n_lat) }], &[k, z, h, w], self.dtype);
            let input = as_rows(rows)?;
            let step_cond = StepConditions { class_label, added: added.as_ref(), timestep_cond: timestep_cond.as_ref(), residuals: None };
            let control_cond = StepConditions { added: control_added.as_ref().or(added.as_ref()), ..step_cond };
            let residuals = if cond.controls.is_empty() {
                None
            } else {
                let control_input = if guess { as_rows(b)? } else { input.clone() };
                self.control_residuals(gpu, cond, &embeddings, i - start, all - start, t, &control_input, &control_context, guess, &control_cond)?
            };
            let x = match &extra_rows {
                Some(e) => ops::concat(gpu, &[&input, e], 1)?,
                None => input,
            };
            let step = StepConditions { residuals: residuals.as_ref(), ..step_cond };
            let out = if contexts.len() == 1 { self.unet.forward_with(gpu, &x, t, &contexts[0], &step)? } else { self.unet_halves(gpu, &x, t, &contexts, &step)? };
            let noise_pred = if cfg {
                guide(gpu, &out, p.guidance_scale, p.guidance_rescale, b)?
            } else {
                ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: &out, map: IndexMap::same(n_lat) }], &[n_lat], DType::F32)?
            };
            latents = scheduler.step(math, &Latent::Device(noise_pred), i, &latents, &mut generator)?;
            if let (Some(mask), Some(image_latents)) = (&blend_mask, &image_latents) {
                // Outside the mask, the init image's latents noised to the next timestep.
                let proper = match &noise {
                    Some(noise) if i + 1 < all => scheduler.add_noise(math, image_latents, noise, i + 1)?,
                    _ => image_latents.clone(),
                };
                let (proper, now) = (math.tensor(&proper)?, math.tensor(&latents)?);
                let (m, pr, v) = (Expr::input(0), Expr::input(1), Expr::input(2));
                let ins = [ExprInput { tensor: mask, map: IndexMap::repeat(plane) }, ExprInput { tensor: &proper, map: IndexMap::same(n_lat) }, ExprInput { tensor: &now, map: IndexMap::same(n_lat) }];
                latents = Latent::Device(ops::expr(gpu, &((1.0 - m.clone()) * pr + m * v), &ins, &[n_lat], DType::F32)?);
            }
            // One submission per step: the GPU runs this step while the next one is recorded.
            gpu.flush();
            if p.sync_steps {
                gpu.sync().await?;
            }
            times.unet_steps_ms.push(now_ms() - t_start);
            let (step, steps) = (i - start + 1, all - start);
            let at = |every: usize| every > 0 && (step % every == 0 || step == steps);
            let preview = match &self.tiny_vae {
                Some(_) if at(p.tiny_preview_every) => Some(self.decode_tiny_tensor(gpu, &math.tensor(&latents)?, [b, z, h, w]).await?),
                _ => None,
            };
            let host = if at(p.latent_preview_every) { Some(gpu.read(&math.tensor(&latents)?).await?) } else { None };
            progress(&StepProgress { step, steps, latents: host.as_deref(), shape: [b, z, h, w], preview: preview.as_ref() })?;
        }
        let data = gpu.read(&math.tensor(&latents)?).await?;
        Ok((Latents { data, shape: [b, z, h, w] }, times))
    }

    /// The UNet on the unconditional and the conditional half of the rows separately, each
    /// with its own context (prompts of different lengths), the outputs joined in row order.
    fn unet_halves(&self, gpu: &Gpu, x: &Tensor, t: f32, contexts: &[Tensor], step: &StepConditions<'_>) -> Result<Tensor> {
        let rows = x.dim(0);
        let half = rows / 2;

        // Rows `k * half ..` of a tensor batched like the UNet input.
        let half_rows = |t: &Tensor, k: usize| -> Result<Tensor> {
            let n = t.numel() / t.dim(0);
            let mut shape = t.shape().to_vec();
            shape[0] = half;
            ops::slice(gpu, t, k * half * n, &shape)
        };
        let mut out = Vec::new();
        for (k, ctx) in contexts.iter().enumerate() {
            let part = half_rows(x, k)?;
            let added = match step.added {
                Some(a) => {
                    let k_ids = a.time_ids.len() / rows;
                    Some(AddedConditions { text_embeds: half_rows(&a.text_embeds, k)?, time_ids: a.time_ids[k * half * k_ids..(k + 1) * half * k_ids].to_vec() })
                }
                None => None,
            };
            let residuals = match step.residuals {
                Some(r) => Some(Residuals { down: r.down.iter().map(|d| half_rows(d, k)).collect::<Result<_>>()?, mid: half_rows(&r.mid, k)? }),
                None => None,
            };
            let tc = step.timestep_cond.map(|c| half_rows(c, k)).transpose()?;
            let s = StepConditions { residuals: residuals.as_ref(), class_label: step.class_label, added: added.as_ref(), timestep_cond: tc.as_ref() };
            out.push(self.unet.forward_with(gpu, &part, t, ctx, &s)?);
        }
        ops::concat(gpu, &out.iter().collect::<Vec<_>>(), 0)
    }

    /// The ControlNets' summed residuals at step `k` of `n` for the UNet input rows `x` (in the
    /// model's dtype); `None` when no ControlNet acts at this step. In guess mode the rows are
    /// the conditional half only, and the unconditional half gets zeros.
    #[allow(clippy::too_many_arguments)]
    fn control_residuals(&self, gpu: &Gpu, cond: &ImageConditions, embeddings: &[Tensor], k: usize, n: usize, t: f32, x: &Tensor, context: &Tensor, guess: bool, step: &StepConditions) -> Result<Option<Residuals>> {
        let mut sum: Option<Residuals> = None;
        for (c, emb) in cond.controls.iter().zip(embeddings) {
            let scale = c.scale * c.keep(k, n);
            // A scale of zero adds zeros: diffusers runs the ControlNet anyway, we skip it.
            if scale == 0.0 {
                continue;
            }
            let r = c.model.forward(gpu, x, t, context, emb, scale, cond.guess_mode, step)?;
            sum = Some(match sum {
                None => r,
                Some(s) => Residuals {
                    down: s.down.iter().zip(&r.down).map(|(a, b)| ops::add(gpu, a, b)).collect::<Result<_>>()?,
                    mid: ops::add(gpu, &s.mid, &r.mid)?,
                },
            });
        }
        let Some(r) = sum else { return Ok(None) };
        if !guess {
            return Ok(Some(r));
        }
        let pad = |x: &Tensor| -> Result<Tensor> { ops::concat(gpu, &[&ops::scale(gpu, x, 0.0, 0.0)?, x], 0) };
        Ok(Some(Residuals { down: r.down.iter().map(pad).collect::<Result<_>>()?, mid: pad(&r.mid)? }))
    }

    /// Images from latents with the tiny autoencoder (diffusers with `pipe.vae =
    /// AutoencoderTiny`: `decode(latents / its scaling_factor)`): previews, or a fast decode.
    pub async fn decode_tiny(&self, gpu: &Gpu, latents: &Latents) -> Result<Images> {
        let z = gpu.upload(&[latents.data.len()], DType::F32, &latents.data)?;
        self.decode_tiny_tensor(gpu, &z, latents.shape).await
    }

    /// [`Self::decode_tiny`] of latents on the device (f32, `shape` `[batch, channels, h, w]`).
    pub async fn decode_tiny_tensor(&self, gpu: &Gpu, latents: &Tensor, shape: [usize; 4]) -> Result<Images> {
        let tiny = self.tiny_vae.as_ref().ok_or_else(|| Error::Input("this model has no tiny autoencoder (--tiny-vae)".into()))?;
        let [b, _, h, w] = shape;
        let inv = 1.0 / tiny.config.scaling_factor;
        let z = ops::expr(gpu, &(Expr::input(0) * inv), &[ExprInput { tensor: latents, map: IndexMap::same(latents.numel()) }], &shape, self.dtype)?;
        let image = tiny.decode(gpu, &z)?;
        let f = tiny.config.scale_factor();
        Ok(to_hwc01(&gpu.read(&image).await?, b, h * f, w * f))
    }

    /// Decodes latents to images with the VAE (diffusers' `vae.decode(latents / scaling_factor)`),
    /// or the tiny autoencoder when the model was loaded to decode with it.
    pub async fn decode(&self, gpu: &Gpu, latents: &Latents) -> Result<Images> {
        if self.tiny_decode {
            return self.decode_tiny(gpu, latents).await;
        }
        let vae = self.vae()?;
        let [b, c, h, w] = latents.shape;
        let z: Vec<f32> = latents.data.iter().enumerate().map(|(i, &v)| self.vae_config.unscale_latent(v, (i / (h * w)) % c.max(1))).collect();
        let f = self.vae_config.scale_factor();
        // The denoising loop's buffers sit idle in the pool; free them so the decoder's (larger)
        // activations do not stack on top of them, and free the decoder's afterwards for the
        // next denoising loop: peak GPU memory is the larger phase, not the sum.
        gpu.trim_pool();
        // Tiles when asked, or when the whole image's activations would not fit a binding.
        let limit = gpu.summary().max_storage_buffer_binding_size;
        let too_large = vae.config.decode_peak_bytes(b, h, w, self.vae_dtype) > limit;
        let pixels = if self.vae_tiling || too_large {
            // diffusers' tiles where they fit a binding, smaller ones where they do not.
            vae.decode_tiled(gpu, &z, latents.shape, self.vae_dtype, vae.config.tile_sample_size(b, self.vae_dtype, limit)).await?
        } else {
            let z = gpu.upload(&latents.shape, self.vae_dtype, &z)?;
            let image = vae.decode(gpu, &z)?;
            gpu.read(&image).await?
        };
        gpu.trim_pool();
        Ok(to_hwc01(&pixels, b, h * f, w * f))
    }
}

/// The scheduler config as diffusers' pipeline for `task` leaves it after `__init__`:
/// `StableDiffusionPipeline` and `StableDiffusionImg2ImgPipeline` set `steps_offset` to 1 and
/// turn off a `clip_sample` the config turns on; `StableDiffusionInpaintPipeline` sets
/// `steps_offset` 1 and turns on a `skip_prk_steps` the config turns off; the depth, upscale and
/// ControlNet pipelines change nothing. Keys missing from the config stay missing (a DDIM built
/// from a PNDM config without `clip_sample` clips, as in diffusers).
pub fn scheduler_fixups(config: &serde_json::Value, task: Task, controls: bool) -> serde_json::Value {
    let mut cfg = config.clone();
    let Some(obj) = cfg.as_object_mut() else { return cfg };
    let (offset, clip, prk) = match task {
        _ if controls => (false, false, false),
        Task::TextToImage | Task::ImageToImage => (true, true, false),
        Task::Inpaint { .. } => (true, false, true),
        Task::Depth | Task::Upscale => (false, false, false),
    };
    if offset && obj.get("steps_offset").and_then(|v| v.as_i64()).is_some_and(|v| v != 1) {
        obj.insert("steps_offset".into(), 1.into());
    }
    if clip && obj.get("clip_sample") == Some(&serde_json::Value::Bool(true)) {
        obj.insert("clip_sample".into(), false.into());
    }
    if prk && obj.get("skip_prk_steps") == Some(&serde_json::Value::Bool(false)) {
        obj.insert("skip_prk_steps".into(), true.into());
    }
    cfg
}

/// diffusers' `get_guidance_scale_embedding(w)` (LCM, Luo et al. 2023): sines then cosines of
/// `1000 w` times `dim / 2` frequencies from 1 down to 1/10000, in f32 as torch computes them.
pub fn guidance_scale_embedding(w: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let w = w * 1000.0;
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut out: Vec<f32> = args.iter().map(|a| a.sin()).chain(args.iter().map(|a| a.cos())).collect();
    out.resize(dim, 0.0);
    out
}

/// Classifier-free guidance on the UNet's output `[2b, ...]` (the unconditional rows first):
/// `uncond + scale * (text - uncond)`, then, when `rescale > 0`, diffusers' `rescale_noise_cfg`
/// (Lin et al. 2023, section 3.4: the guided rows scaled towards the text rows' standard
/// deviation); an f32 tensor of `b * ...` values.
pub fn guide(gpu: &Gpu, out: &Tensor, scale: f32, rescale: f32, batch: usize) -> Result<Tensor> {
    let half = out.numel() / 2;
    let (u, t) = (Expr::input(0), Expr::input(1));
    let halves = [ExprInput { tensor: out, map: IndexMap::from(0, half) }, ExprInput { tensor: out, map: IndexMap::from(half, half) }];
    let g = ops::expr(gpu, &(u.clone() + scale * (t - u)), &halves, &[half], DType::F32)?;
    if rescale <= 0.0 {
        return Ok(g);
    }
    let batch = batch.max(1);
    let per = half / batch;
    // Standard deviations of every row of the output (the text rows are its second half) and of
    // the guided rows.
    let (std_out, std_cfg) = (ops::norm::row_std(gpu, out, per)?, ops::norm::row_std(gpu, &g, per)?);
    let (v, std_text, std_g) = (Expr::input(0), Expr::input(1), Expr::input(2));
    let ins = [
        ExprInput { tensor: &g, map: IndexMap::same(half) },
        ExprInput { tensor: &std_out, map: IndexMap { offset: batch, div: per, modulo: batch } },
        ExprInput { tensor: &std_cfg, map: IndexMap::per(per, batch) },
    ];
    let rescaled = v.clone() * (std_text / std_g);
    ops::expr(gpu, &(rescale * rescaled + (1.0 - rescale) * v), &ins, &[half], DType::F32)
}

/// `[B, 3, H, W]` in [-1, 1] to `[B, H, W, 3]` in [0, 1] (diffusers' postprocess).
pub fn to_hwc01(x: &[f32], b: usize, h: usize, w: usize) -> Images {
    let mut data = vec![0f32; b * h * w * 3];
    for i in 0..b {
        for c in 0..3 {
            for p in 0..h * w {
                data[(i * h * w + p) * 3 + c] = (x[(i * 3 + c) * h * w + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            }
        }
    }
    Images { batch: b, width: w, height: h, data }
}
