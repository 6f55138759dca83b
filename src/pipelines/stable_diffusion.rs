//! Stable Diffusion 1.x / 2.x: text-to-image, img2img, inpainting and depth-to-image, step for
//! step as diffusers' pipelines, so a seed gives diffusers' image.

use super::conditions::{depth_latent, nearest, start_for_strength, Control, DepthMap, ImageConditions, Task};
use super::image_input::{self, InputImage, Resample};
use crate::models::ControlNetModel;
use super::loading::StableDiffusionModel;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::unet_2d_blocks::Residuals;
use crate::ops;
use crate::rng::TorchGenerator;
use crate::schedulers::{self, Scheduler, SchedulerKind};

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
}

impl Default for Txt2ImgParams {
    fn default() -> Self {
        Self {
            prompt: String::new(), negative_prompt: None, seed: 0, steps: 50, guidance_scale: 7.5, guidance_rescale: 0.0,
            width: 512, height: 512, scheduler: None, eta: 0.0, clip_skip: 0, batch: 1,
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
    /// The current latents `[batch, channels, height, width]`, for previews.
    pub latents: &'a [f32],
    pub shape: [usize; 4],
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
        Self { init: None, mask: None, mask_blur: 0.0, depth: None, controls: Vec::new(), strength: None, guess_mode: false, control_start: 0.0, control_end: 1.0, noise_level: None }
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
    /// The scheduler `kind` (default: the model's own, exactly as configured), built from the
    /// model's scheduler config after the fix-ups `StableDiffusionPipeline.__init__` applies
    /// (`steps_offset` 1, `clip_sample` off).
    pub fn scheduler(&self, kind: Option<SchedulerKind>) -> Result<Box<dyn Scheduler>> {
        let mut cfg = self.scheduler_config.clone();
        if let Some(obj) = cfg.as_object_mut() {
            if obj.get("steps_offset").and_then(|v| v.as_i64()).is_some_and(|v| v != 1) {
                obj.insert("steps_offset".into(), 1.into());
            }
            obj.insert("clip_sample".into(), false.into());
        }
        match kind {
            Some(k) => schedulers::build(k, &cfg),
            None => schedulers::build_default(&cfg),
        }
    }

    /// Text embeddings `[n, 77, D]` for `prompts`, with `clip_skip`.
    pub fn encode_text(&self, gpu: &Gpu, prompts: &[&str], clip_skip: usize) -> Result<Tensor> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect();
        self.text_encoder.forward(gpu, &ids, clip_skip)
    }

    /// Checks sizes and counts before any work starts.
    pub fn validate(&self, p: &Txt2ImgParams) -> Result<()> {
        let f = self.vae_config.scale_factor() * self.unet.config.downsample_factor();
        if p.width == 0 || p.height == 0 || !p.width.is_multiple_of(8) || !p.height.is_multiple_of(8) {
            return Err(Error::Input(format!("width and height must be positive multiples of 8, got {}x{}", p.width, p.height)));
        }
        if !p.width.is_multiple_of(f) || !p.height.is_multiple_of(f) {
            return Err(Error::Input(format!("this model needs width and height divisible by {f}, got {}x{}", p.width, p.height)));
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
        if p.clip_skip >= self.text_encoder.config.num_hidden_layers {
            return Err(Error::Input(format!("clip skip must be less than {}, got {}", self.text_encoder.config.num_hidden_layers, p.clip_skip)));
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
        self.vae()?;
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
            // diffusers takes the image's size rounded down to a multiple of 8; our UNet needs
            // a multiple of its whole downsampling factor.
            let (dw, dh) = image_input::default_size(img, width, height, 8);
            let (rw, rh) = (dw - dw % f, dh - dh % f);
            if rw == 0 || rh == 0 {
                return Err(Error::Input(format!("the input image is {}x{}; this model needs at least {f} pixels per side (or give a width and height)", img.width, img.height)));
            }
            if (rw, rh) != (dw, dh) && width.is_none() && height.is_none() {
                note = Some(format!("the output is {rw}x{rh}: this model takes sides divisible by {f} (the input image is {}x{})", img.width, img.height));
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
            depth: images.depth.as_ref().map(|d| DepthMap { width: d.width, height: d.height, data: d.gray_values() }),
            controls: images
                .controls
                .iter()
                .map(|(model, img, scale)| Control { model, image: image_input::rgb_tensor(img, w, h, false), scale: *scale, start: images.control_start, end: images.control_end })
                .collect(),
            guess_mode: images.guess_mode,
            noise_level: images.noise_level,
        };
        Ok(PreparedImages { width: w, height: h, conditions, note })
    }

    /// diffusers' default steps and guidance for this pipeline: 75 and 9 for the x4 upscaler,
    /// else `steps` and 7.5.
    pub fn default_steps_guidance(&self, steps: usize) -> (usize, f32) {
        if self.upscaler.is_some() { (75, 9.0) } else { (steps, 7.5) }
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
        let x = gpu.upload(&[1, 3, h, w], self.dtype, image)?;
        let dist = vae.encode(gpu, &x).await?;
        let scale = self.vae_config.scaling_factor;
        Ok(dist.sample(gen).into_iter().map(|v| v * scale).collect())
    }

    /// Text encoding and the denoising loop: everything before the VAE, step for step as
    /// diffusers' pipeline for the task (`StableDiffusion{,Img2Img,Inpaint,Depth2Img}Pipeline`),
    /// drawing from the seed's generator in the same order.
    pub async fn denoise_with(&self, gpu: &Gpu, p: &Txt2ImgParams, cond: &ImageConditions<'_>, now_ms: &dyn Fn() -> f64, progress: Progress<'_>) -> Result<(Latents, StageTimes)> {
        self.validate(p)?;
        let task = self.task(p, cond)?;
        let mut times = StageTimes::default();
        let mut scheduler = self.scheduler(p.scheduler)?;
        scheduler.set_timesteps(p.steps)?;
        if p.eta != 0.0 {
            scheduler.set_eta(p.eta);
        }
        let all = scheduler.timesteps().len();
        let strength = cond.strength.unwrap_or(task.default_strength());
        let start = if matches!(task, Task::TextToImage | Task::Upscale) { 0 } else { start_for_strength(p.steps, strength, scheduler.order()).0 };
        if start >= all {
            return Err(Error::Input(format!("strength {strength} of {} steps leaves no step to run; raise the strength or the steps", p.steps)));
        }
        let cfg = p.guidance_scale > 1.0;
        let b = p.batch;

        // Text: diffusers applies clip_skip to the prompt only; the negative prompt always uses
        // the last layer.
        let t0 = now_ms();
        let cond_text = self.encode_text(gpu, &[p.prompt.as_str()], p.clip_skip)?;
        let neg = if cfg { Some(self.encode_text(gpu, &[p.negative_prompt.as_deref().unwrap_or("")], 0)?) } else { None };
        // Rows [uncond x b; cond x b], assembled on the GPU (no readback).
        let rows: Vec<&Tensor> = neg.iter().flat_map(|n| std::iter::repeat_n(n, b)).chain(std::iter::repeat_n(&cond_text, b)).collect();
        let context = ops::concat(gpu, &rows, 0)?;
        let rows = rows.len();
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
            Task::Inpaint { unet_mask } => !unet_mask || strength < 1.0,
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
        let image_latents = if needs_image_latents { self.encode_image(gpu, init, p.width, p.height, &mut generator).await?.repeat(b) } else { Vec::new() };
        let noise = generator.randn(b * z * plane);
        let pure_noise = matches!(task, Task::TextToImage | Task::Upscale) || (matches!(task, Task::Inpaint { .. }) && strength == 1.0);
        let mut latents = if pure_noise {
            let sigma = scheduler.init_noise_sigma();
            noise.iter().map(|v| v * sigma).collect()
        } else {
            scheduler.add_noise(&image_latents, &noise, start)
        };

        // What the UNet takes besides the latents (the same for every row), and the mask of
        // latent blending.
        let (mut extra, mut blend_mask) = (Vec::new(), None);
        match task {
            Task::Inpaint { unet_mask } => {
                let mask = cond.mask.as_deref().unwrap_or(&[]);
                let mask_latent = nearest(mask, p.width, p.height, w, h);
                let hw = p.width * p.height;
                let masked: Vec<f32> = init.iter().enumerate().map(|(i, &v)| if mask[i % hw] < 0.5 { v } else { 0.0 }).collect();
                // diffusers encodes the masked image whatever the UNet, drawing its sample.
                if unet_mask {
                    let masked_latents = self.encode_image(gpu, &masked, p.width, p.height, &mut generator).await?;
                    extra = [mask_latent, masked_latents].concat();
                } else {
                    generator.randn(z * plane);
                    blend_mask = Some(mask_latent);
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

        // ControlNets: condition embeddings once; in guess mode with guidance they see only the
        // conditional rows.
        let embeddings: Vec<Tensor> = cond.controls.iter().map(|c| c.model.embed_condition(gpu, &c.image, p.width, p.height, self.dtype)).collect::<Result<_>>()?;
        let guess = cond.guess_mode && cfg;
        let control_context = if guess { ops::concat(gpu, &vec![&cond_text; b], 0)? } else { context.clone() };

        for i in start..all {
            let t_start = now_ms();
            let t = scheduler.timesteps()[i];
            let scaled = scheduler.scale_model_input(&latents, i);
            let input = if cfg { [scaled.as_slice(), scaled.as_slice()].concat() } else { scaled.clone() };
            let residuals = self.control_residuals(gpu, cond, &embeddings, i - start, all - start, t, if guess { &scaled } else { &input }, [z, h, w], &control_context, guess)?;
            let input = if extra.is_empty() { input } else { input.chunks(z * plane).flat_map(|row| row.iter().chain(&extra)).copied().collect() };
            let x = gpu.upload(&[rows, z + extra_c, h, w], self.dtype, &input)?;
            let out = self.unet.forward_with(gpu, &x, t, &context, residuals.as_ref(), class_label)?;
            let out = gpu.read(&out).await?;
            let noise_pred = if cfg { guide(&out, p.guidance_scale, p.guidance_rescale, b) } else { out };
            latents = scheduler.step(&noise_pred, i, &latents, &mut generator)?;
            if let Some(mask) = &blend_mask {
                // Outside the mask, the init image's latents noised to the next timestep.
                let proper = if i + 1 < all { scheduler.add_noise(&image_latents, &noise, i + 1) } else { image_latents.clone() };
                for (k, v) in latents.iter_mut().enumerate() {
                    let m = mask[k % plane];
                    *v = (1.0 - m) * proper[k] + m * *v;
                }
            }
            times.unet_steps_ms.push(now_ms() - t_start);
            progress(&StepProgress { step: i - start + 1, steps: all - start, latents: &latents, shape: [b, z, h, w] })?;
        }
        Ok((Latents { data: latents, shape: [b, z, h, w] }, times))
    }

    /// The ControlNets' summed residuals at step `k` of `n` for the latent rows `latents`
    /// (`[rows, z, h, w]`); `None` when no ControlNet acts at this step. In guess mode the rows
    /// are the conditional half only, and the unconditional half gets zeros.
    #[allow(clippy::too_many_arguments)]
    fn control_residuals(&self, gpu: &Gpu, cond: &ImageConditions, embeddings: &[Tensor], k: usize, n: usize, t: f32, latents: &[f32], [z, h, w]: [usize; 3], context: &Tensor, guess: bool) -> Result<Option<Residuals>> {
        let mut sum: Option<Residuals> = None;
        let mut x = None;
        for (c, emb) in cond.controls.iter().zip(embeddings) {
            let scale = c.scale * c.keep(k, n);
            // A scale of zero adds zeros: diffusers runs the ControlNet anyway, we skip it.
            if scale == 0.0 {
                continue;
            }
            // One upload per step, shared by every ControlNet.
            let x = match &x {
                Some(x) => x,
                None => x.insert(gpu.upload(&[latents.len() / (z * h * w), z, h, w], self.dtype, latents)?),
            };
            let r = c.model.forward(gpu, x, t, context, emb, scale, cond.guess_mode)?;
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

    /// Decodes latents to images with the VAE (diffusers' `vae.decode(latents / scaling_factor)`).
    pub async fn decode(&self, gpu: &Gpu, latents: &Latents) -> Result<Images> {
        let vae = self.vae()?;
        let inv = 1.0 / self.vae_config.scaling_factor;
        let z: Vec<f32> = latents.data.iter().map(|v| v * inv).collect();
        let [b, _, h, w] = latents.shape;
        let f = self.vae_config.scale_factor();
        // The denoising loop's buffers sit idle in the pool; free them so the decoder's (larger)
        // activations do not stack on top of them, and free the decoder's afterwards for the
        // next denoising loop: peak GPU memory is the larger phase, not the sum.
        gpu.trim_pool();
        // Tiles when asked, or when the whole image's activations would not fit a binding.
        let too_large = vae.decode_peak_bytes(b, h, w, self.dtype) > gpu.summary().max_storage_buffer_binding_size;
        let pixels = if self.vae_tiling || too_large {
            vae.decode_tiled(gpu, &z, latents.shape, self.dtype).await?
        } else {
            let z = gpu.upload(&latents.shape, self.dtype, &z)?;
            let image = vae.decode(gpu, &z)?;
            gpu.read(&image).await?
        };
        gpu.trim_pool();
        Ok(to_hwc01(&pixels, b, h * f, w * f))
    }
}

/// Classifier-free guidance on `[uncond; cond]` predictions, then diffusers' `rescale_noise_cfg`
/// (Lin et al. 2023, section 3.4) when `rescale > 0`.
pub fn guide(out: &[f32], scale: f32, rescale: f32, batch: usize) -> Vec<f32> {
    let half = out.len() / 2;
    let (uncond, text) = out.split_at(half);
    let mut g: Vec<f32> = uncond.iter().zip(text).map(|(&u, &t)| u + scale * (t - u)).collect();
    if rescale > 0.0 {
        let per = half / batch.max(1);
        for (gb, tb) in g.chunks_mut(per).zip(text.chunks(per)) {
            let (std_text, std_cfg) = (std_unbiased(tb), std_unbiased(gb));
            let factor = std_text / std_cfg;
            for v in gb.iter_mut() {
                let rescaled = *v * factor;
                *v = rescale * rescaled + (1.0 - rescale) * *v;
            }
        }
    }
    g
}

fn std_unbiased(x: &[f32]) -> f32 {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    var.sqrt() as f32
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
