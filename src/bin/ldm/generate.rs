//! `ldm generate` and `ldm bench generate`.

use std::path::{Path, PathBuf};

use clap::Args;
use ldm_web::gpu::{DType, Gpu, GpuOptions};
use ldm_web::loader::{DirSource, FileSource};
use ldm_web::pipelines::output::{encode_png, parameters_text_with, GenerateBench};
use ldm_web::pipelines::image_input::{default_size, Channels, InputImage};
use ldm_web::pipelines::ldm::LdmImage;
use ldm_web::models::ControlNetModel;
use ldm_web::pipelines::canny::{canny_image, parse_canny_thresholds, CannyParams};
use ldm_web::pipelines::{DiffusionModel, ImageConditions, UserImages, LdmKind, LdmModel, LoadOptions, LowResImage, PromptWeighting, StableDiffusionModel, Txt2ImgParams, VaeSource, XlConditions};
use ldm_web::loader::lora::AdapterSet;
use ldm_web::schedulers::SchedulerKind;
use ldm_web::{Error, Result};

/// `ldm generate` flags (other tools depend on these exact names).
#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    /// A diffusers folder, a single .safetensors checkpoint, or an http(s) URL laid out like a diffusers folder (default: the built-in emoji model).
    #[arg(long, default_value = crate::builtin::NAME)]
    model: String,
    /// For a single-file checkpoint: a diffusers folder whose configs and tokenizer to use instead of inferring them (as diffusers' from_single_file(config=...)).
    #[arg(long)]
    config: Option<PathBuf>,
    /// What to draw (truncated to the tokenizer's 77 tokens, as diffusers).
    #[arg(long, default_value = "")]
    prompt: String,
    /// What to steer away from (default: the empty prompt, as diffusers).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Seed of torch's CPU generator: the same seed gives diffusers' image.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Denoising steps (default: the model's ldm-web.json, else the pipeline's own as diffusers: 50; 100 for LDM super-resolution).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default: the model's ldm-web.json, else 7.5 for Stable Diffusion, where 1 or less skips the unconditional pass; 1 for LDM text-to-image and concatenation-conditioned LDMs, which guide at any other value; the latter's unconditional input is a zero condition, as `ldm train` drops conditions).
    #[arg(long)]
    guidance: Option<f32>,
    /// Default: the model's sample size times the VAE's scale factor.
    #[arg(long)]
    width: Option<usize>,
    /// Default: as --width.
    #[arg(long)]
    height: Option<usize>,
    /// ddim pndm ddpm euler euler-a heun lms dpmpp-2m dpmpp-2m-karras dpmpp-2m-sde-karras unipc lcm (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    /// DDIM's eta.
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Text encoder layers to skip, counted as diffusers (1 = penultimate layer; A1111's "Clip skip: 2").
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Init image (PNG, JPEG or WebP; any size and mode): img2img, with --mask inpainting, with --depth depth-to-image; the low-resolution input of upscalers. The output size defaults to its size, rounded down to what the model takes.
    #[arg(long)]
    init_image: Option<String>,
    /// How far to move from the init image, 0 to 1 (default 0.8; 1 for inpainting, as diffusers).
    #[arg(long)]
    strength: Option<f32>,
    /// Inpainting mask (white = repaint), any image; resized to the output and binarised as diffusers.
    #[arg(long)]
    mask: Option<String>,
    /// Gaussian blur radius applied to the mask first (diffusers' mask_processor.blur).
    #[arg(long, default_value_t = 0.0)]
    mask_blur: f32,
    /// Depth map for depth-to-image models: any grayscale image, 8- or 16-bit PNG (larger = farther or nearer, min-max normalised as diffusers).
    #[arg(long)]
    depth: Option<String>,
    /// A ControlNet folder and its condition image (any image: depth, edges, scribble, segmentation, another modality), with an optional conditioning scale (default 1); repeat for several ControlNets.
    #[arg(long, value_name = "DIR=IMAGE[:SCALE]")]
    control: Vec<String>,
    /// How each --control image becomes its condition, in --control order (one value applies to all): none (used as given), depth (the --depth-model estimator's depth image) or canny[:LOW,HIGH] (OpenCV's cv2.Canny edges of the image; default thresholds 100,200; append ,l2 for L2gradient).
    #[arg(long, value_name = "none|depth|canny[:LOW,HIGH]")]
    control_preprocess: Vec<String>,
    /// A depth estimator folder (Depth Anything V2, DPT: config.json, model.safetensors, preprocessor_config.json) for --control-preprocess depth.
    #[arg(long, value_name = "DIR")]
    depth_model: Option<String>,
    /// Decode the image in overlapping tiles (diffusers' enable_vae_tiling): less GPU memory for large images; done anyway when the whole image would not fit the adapter's binding size.
    #[arg(long)]
    vae_tiling: bool,
    /// Upscalers: noise added to the low-resolution input, 0 to the model's max_noise_level (default 20; more lets the model invent more detail).
    #[arg(long)]
    noise_level: Option<u32>,
    /// ControlNet guess mode: the ControlNets see only the prompt's half of guidance.
    #[arg(long)]
    guess_mode: bool,
    /// Fraction of the schedule where the ControlNets start acting (control_guidance_start).
    #[arg(long, default_value_t = 0.0)]
    control_start: f32,
    /// Fraction of the schedule where they stop (control_guidance_end).
    #[arg(long, default_value_t = 1.0)]
    control_end: f32,
    /// Images per run, from one seed as diffusers' num_images_per_prompt.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// A LoRA adapter (kohya / A1111 or diffusers / PEFT .safetensors, or a .pt/.ckpt read safely) with its multiplier (default 1); repeat for several. Run beside the weights (which may stay quantised).
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// Add the LoRAs into the weights at load instead (float weights only; faster per step).
    #[arg(long)]
    lora_merge: bool,
    /// A textual-inversion embedding (diffusers learned_embeds, A1111 .safetensors or .pt, SDXL clip_l/clip_g pairs) and the token it is used by (default: its own, or the file name); repeat for several.
    #[arg(long, value_name = "FILE[:TOKEN]")]
    embedding: Vec<String>,
    /// How prompts are read: none (diffusers: plain text, 77 tokens) or a1111 ((word:1.3), (word), [word], \( escapes, BREAK, prompts of any length).
    #[arg(long, default_value = "none")]
    prompt_weighting: String,
    /// SDXL: the prompt of the second text encoder (default: --prompt).
    #[arg(long)]
    prompt_2: Option<String>,
    /// SDXL: the negative prompt of the second text encoder (default: --negative-prompt).
    #[arg(long)]
    negative_prompt_2: Option<String>,
    /// SDXL size condition WIDTHxHEIGHT (default: the output size).
    #[arg(long, value_name = "WxH")]
    original_size: Option<String>,
    /// SDXL size condition WIDTHxHEIGHT (default: the output size).
    #[arg(long, value_name = "WxH")]
    target_size: Option<String>,
    /// SDXL crop condition TOP,LEFT (default 0,0).
    #[arg(long, value_name = "TOP,LEFT")]
    crops_coords_top_left: Option<String>,
    /// SDXL negative size conditions (default: the positive ones).
    #[arg(long, value_name = "WxH")]
    negative_original_size: Option<String>,
    #[arg(long, value_name = "WxH")]
    negative_target_size: Option<String>,
    #[arg(long, value_name = "TOP,LEFT")]
    negative_crops_coords_top_left: Option<String>,
    /// SDXL refiner: the aesthetic score it is conditioned on (default 6).
    #[arg(long)]
    aesthetic_score: Option<f32>,
    /// SDXL refiner: the negative aesthetic score (default 2.5).
    #[arg(long)]
    negative_aesthetic_score: Option<f32>,
    /// An SDXL refiner folder: the model (the base) denoises to --denoising-end, the refiner does the rest from its latents.
    #[arg(long)]
    refiner: Option<String>,
    /// SDXL: the fraction of the schedule the base runs before handing over (with --refiner; default 0.8), or where a base run stops.
    #[arg(long)]
    denoising_end: Option<f32>,
    /// SDXL img2img: start at this fraction of the schedule without adding noise (replaces --strength).
    #[arg(long)]
    denoising_start: Option<f32>,
    /// A tiny autoencoder folder (AutoencoderTiny: TAESD for SD 1.x / 2.x, TAESDXL for SDXL), for --vae-decoder tiny.
    #[arg(long)]
    tiny_vae: Option<String>,
    /// Which decoder makes the final image: full (the model's VAE) or tiny (--tiny-vae: much faster, approximate).
    #[arg(long, default_value = "full", value_parser = ["full", "tiny"])]
    vae_decoder: String,
    // clap renders a literal "{n}" in help as a line break; a word joiner (U+2060) keeps it visible.
    #[command(flatten)]
    quant: crate::convert::QuantArgs,
    #[arg(long, default_value = "out.png", help = "Output PNG; {\u{2060}n} in the name expands to the image's index in the batch (without it, -0, -1, ... are appended for batches)")]
    out: String,
}

/// Opens `model` as a file source and says whether it is a single file (and its name).
pub(crate) fn open_model(model: &str) -> Result<(Box<dyn FileSource>, Option<String>)> {
    if model.starts_with("http://") || model.starts_with("https://") {
        return Ok((Box::new(crate::http::HttpSource::new(model)?), None));
    }
    let path = Path::new(model);
    let meta = std::fs::metadata(path).map_err(|e| Error::Io(format!("cannot open model {model}: {e}")))?;
    if meta.is_dir() {
        return Ok((Box::new(DirSource::new(path)), None));
    }
    if !ldm_web::loader::is_weight_file(model) {
        return Err(Error::Model(format!("{model} is neither a diffusers folder nor a checkpoint (.safetensors, or .ckpt / .pt read without running code)")));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    Ok((Box::new(DirSource::new(parent)), Some(name)))
}

/// The folder given to `--config`, checked to be one.
pub(crate) fn config_source(dir: &Path) -> Result<DirSource> {
    if !dir.join("model_index.json").is_file() && !dir.join("unet/config.json").is_file() {
        return Err(Error::Input(format!("--config {}: not a diffusers folder (no model_index.json or unet/config.json)", dir.display())));
    }
    Ok(DirSource::new(dir))
}

/// CLIP's BPE merges (open_clip_torch 3.3.0, MIT; see assets/clip), for single-file checkpoints.
const CLIP_BPE_GZ: &[u8] = include_bytes!("../../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

pub(crate) fn clip_bpe() -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(CLIP_BPE_GZ).read_to_string(&mut text).map_err(|e| Error::Io(format!("built-in CLIP vocabulary: {e}")))?;
    Ok(text)
}

/// Loads a model from a path or URL: a single file is Stable Diffusion, a folder is whatever
/// pipeline its `model_index.json` names.
pub async fn load_model(gpu: &Gpu, model: &str, config: Option<&Path>, opts: &LoadOptions) -> Result<DiffusionModel> {
    if model == crate::builtin::NAME && !Path::new(model).exists() {
        let src = crate::builtin::source().ok_or_else(|| Error::Model("this ldm was built without the built-in model (assets/builtin/emoji); pass --model".into()))?;
        return DiffusionModel::load(gpu, &src, "ldm-web emoji", opts).await;
    }
    let (src, single) = open_model(model)?;
    let name = model.trim_end_matches('/').rsplit('/').next().unwrap_or(model).to_string();
    match single {
        Some(file) => {
            let opts = LoadOptions { clip_bpe: Some(clip_bpe()?), ..opts.clone() };
            let configs = config.map(config_source).transpose()?;
            let configs = configs.as_ref().map(|c| c as &dyn FileSource);
            Ok(DiffusionModel::StableDiffusion(StableDiffusionModel::load_single_file(gpu, src.as_ref(), &file, configs, &opts).await?))
        }
        None if config.is_some() => Err(Error::Input("--config is for single-file checkpoints; a folder has its own configs".into())),
        None => DiffusionModel::load(gpu, src.as_ref(), &name, opts).await,
    }
}

/// Reads `path` as RGB in [-1, 1], channels first, resized as diffusers' super-resolution
/// `preprocess` does (down to a multiple of 32 per side, Lanczos; not bit-identical to PIL's).
fn read_low_res(path: &str) -> Result<LowResImage> {
    let img = image::open(path).map_err(|e| Error::Input(format!("cannot read the image {path}: {e}")))?.to_rgb8();
    let (w, h) = (img.width() - img.width() % 32, img.height() - img.height() % 32);
    if w == 0 || h == 0 {
        return Err(Error::Input(format!("{path} is {}x{}; the super-resolution model needs at least 32x32 pixels", img.width(), img.height())));
    }
    let img = if (w, h) == img.dimensions() { img } else { image::imageops::resize(&img, w, h, image::imageops::FilterType::Lanczos3) };
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = 2.0 * (p.0[c] as f32 / 255.0) - 1.0;
        }
    }
    Ok(LowResImage { width: w, height: h, data })
}

/// Writes an 8-bit RGB PNG with a `parameters` text chunk.
pub fn write_png(path: &str, width: usize, height: usize, rgb: &[u8], parameters: &str) -> Result<()> {
    let bytes = encode_png(width, height, rgb, parameters)?;
    std::fs::write(path, bytes).map_err(|e| Error::Io(format!("cannot write {path}: {e}")))
}

/// Output path of image `i`.
fn out_path(pattern: &str, i: usize, batch: usize) -> String {
    if pattern.contains("{n}") {
        pattern.replace("{n}", &i.to_string())
    } else if batch > 1 {
        match pattern.rsplit_once('.') {
            Some((stem, ext)) => format!("{stem}-{i}.{ext}"),
            None => format!("{pattern}-{i}"),
        }
    } else {
        pattern.to_string()
    }
}

/// Runs `ldm generate` (or its benchmark, which prints JSON instead of progress).
pub fn run(a: &GenerateArgs, bench: bool) -> Result<String> {
    let scheduler = a.scheduler.as_deref().map(str::parse::<SchedulerKind>).transpose()?;
    let start = std::time::Instant::now();
    let now = move || start.elapsed().as_secs_f64() * 1e3;
    pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: true, ..Default::default() }).await?;
        let t_load = now();
        // The VAE encoder is read only when an image is to be encoded.
        let adapters = load_adapters(&a.lora, a.lora_merge).await?;
        let vae = a.quant.vae_folder().map(|v| vae_source(v)).transpose()?;
        let tiny_vae = a.tiny_vae.as_deref().map(|d| folder_source(d, "--tiny-vae")).transpose()?;
        let opts = LoadOptions { quant: a.quant.choice()?.component_quant(None), vae_encoder: a.init_image.is_some(), vae_tiling: a.vae_tiling, adapters, vae, tiny_vae, tiny_decode: a.vae_decoder == "tiny", ..Default::default() };
        let mut model = load_model(&gpu, &a.model, a.config.as_deref(), &opts).await?;
        if !a.embedding.is_empty() {
            let DiffusionModel::StableDiffusion(m) = &mut model else { return Err(Error::Input("--embedding is for Stable Diffusion models (SD 1.x / 2.x, SDXL)".into())) };
            for spec in &a.embedding {
                add_embedding(&gpu, m, spec).await?;
            }
        }
        if (!a.lora.is_empty() || a.refiner.is_some()) && !matches!(model, DiffusionModel::StableDiffusion(_)) {
            return Err(Error::Input("--lora and --refiner are for Stable Diffusion models (SD 1.x / 2.x, SDXL)".into()));
        }
        let load_ms = now() - t_load;
        let kind = match scheduler {
            Some(k) => k,
            None => ldm_web::schedulers::default_kind(model.scheduler_config())?,
        };
        let bar = if bench { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(a.steps.unwrap_or(50) as u64) };
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        let mut progress = |s: &ldm_web::pipelines::StepProgress| {
            bar.set_length(s.steps as u64);
            bar.set_position(s.step as u64);
            Ok(())
        };
        let mut refiner_info = None;
        let (p, images, times, warmup_ms) = match &model {
            DiffusionModel::StableDiffusion(m) => {
                let specs = a.control.iter().map(|c| parse_control(c)).collect::<Result<Vec<_>>>()?;
                let mut nets = Vec::new();
                for (dir, _, _) in &specs {
                    nets.push(load_controlnet_dir(&gpu, dir, &opts).await?);
                }
                let controls: Vec<(&ControlNetModel, &str, f32)> = nets.iter().zip(&specs).map(|(n, (_, image, scale))| (n, image.as_str(), *scale)).collect();
                let (mut p, cond) = sd_params(a, &gpu, m, &controls, scheduler, bench).await?;
                // A benchmark times each step by itself (otherwise steps overlap on the GPU).
                p.sync_steps = bench;
                // The benchmark reports steady-state speed: a one-step warm-up run first compiles
                // every pipeline (seconds per generated kernel variant on software Vulkan).
                let warmup_ms = if bench {
                    let t = now();
                    m.generate(&gpu, &Txt2ImgParams { steps: 1, denoising_end: None, ..p.clone() }, &ImageConditions { strength: cond.strength.map(|_| 1.0), ..cond.clone() }, &now, &mut |_| Ok(())).await?;
                    now() - t
                } else {
                    0.0
                };
                match &a.refiner {
                    None => {
                        let (images, times) = m.generate(&gpu, &p, &cond, &now, &mut progress).await?;
                        (p, images, times, warmup_ms)
                    }
                    Some(dir) => {
                        // The hand-over: the base denoises to denoising_end, the refiner goes on
                        // from its latents (diffusers' denoising_end / denoising_start).
                        let at = a.denoising_end.unwrap_or(0.8);
                        p.denoising_end = Some(at);
                        let (latents, mut times) = m.denoise_with(&gpu, &p, &cond, &now, &mut progress).await?;
                        let refiner_opts = LoadOptions { adapters: None, vae_encoder: false, ..opts.clone() };
                        let DiffusionModel::StableDiffusion(r) = load_model(&gpu, dir, None, &refiner_opts).await? else {
                            return Err(Error::Input(format!("--refiner {dir}: not an SDXL refiner folder")));
                        };
                        if !r.family.is_xl() {
                            return Err(Error::Input(format!("--refiner {dir}: an SDXL refiner is needed, this is {:?}", r.family)));
                        }
                        let rp = Txt2ImgParams { denoising_end: None, denoising_start: Some(at), scheduler, ..p.clone() };
                        let rcond = ImageConditions { init_latents: Some(latents.data), ..Default::default() };
                        r.load_vae(&gpu, &ldm_web::loader::DirSource::new(dir)).await?;
                        let (images, rtimes) = r.generate(&gpu, &rp, &rcond, &now, &mut progress).await?;
                        times.unet_steps_ms.extend(rtimes.unet_steps_ms);
                        times.vae_decode_ms = rtimes.vae_decode_ms;
                        refiner_info = Some((r.name.clone(), at));
                        (rp, images, times, warmup_ms)
                    }
                }
            }
            DiffusionModel::Ldm(m) => {
                let (p, image) = ldm_params(a, m, scheduler)?;
                let p = Txt2ImgParams { sync_steps: bench, ..p };
                m.validate(&p, image.as_ref())?;
                let warmup_ms = if bench {
                    let t = now();
                    m.generate(&gpu, &Txt2ImgParams { steps: 1, ..p.clone() }, image.as_ref(), &now, &mut |_| Ok(())).await?;
                    now() - t
                } else {
                    0.0
                };
                let (images, times) = m.generate(&gpu, &p, image.as_ref(), &now, &mut progress).await?;
                (p, images, times, warmup_ms)
            }
        };
        bar.finish_and_clear();
        if bench {
            let report = GenerateBench { model: model.name(), adapter: gpu.summary(), params: &p, scheduler: kind, load_ms, warmup_ms, times: &times, peak_gpu_bytes: gpu.pool_stats().peak_bytes }.to_json();
            return serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()));
        }
        let mut written = Vec::new();
        for i in 0..images.batch {
            let path = out_path(&a.out, i, images.batch);
            let loras = match &model {
                DiffusionModel::StableDiffusion(m) => m.adapters.clone(),
                DiffusionModel::Ldm(_) => Vec::new(),
            };
            let refiner = refiner_info.as_ref().map(|(n, at)| (n.as_str(), *at));
            write_png(&path, images.width, images.height, &images.rgb8(i), &parameters_text_with(&p, kind, model.name(), i, &loras, refiner))?;
            written.push(path);
        }
        Ok(format!("wrote {}", written.join(", ")))
    })
}

/// Reads an image file of any common format as the pipelines take it: PNG through the same
/// decoder as the page, JPEG and WebP through the `image` crate.
pub fn read_image(path: &str, what: &str) -> Result<InputImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::Input(format!("cannot read the {what} {path}: {e}")))?;
    let named = |e: Error| Error::Input(format!("the {what} {path}: {e}"));
    if bytes.starts_with(b"\x89PNG") {
        return InputImage::from_png(&bytes).map_err(named);
    }
    // Turned upright by its EXIF orientation, as diffusers' load_image does.
    let unreadable = |e: image::ImageError| Error::Input(format!("cannot read the {what} {path} (PNG, JPEG or WebP): {e}"));
    let mut decoder = image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format().map_err(|e| Error::Input(format!("cannot read the {what} {path}: {e}")))?.into_decoder().map_err(unreadable)?;
    let orientation = image::ImageDecoder::orientation(&mut decoder).unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(unreadable)?;
    img.apply_orientation(orientation);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (channels, data): (Channels, Vec<u16>) = match img {
        image::DynamicImage::ImageLuma8(i) => (Channels::Gray, i.into_raw().into_iter().map(u16::from).collect()),
        image::DynamicImage::ImageLumaA8(i) => (Channels::GrayAlpha, i.into_raw().into_iter().map(u16::from).collect()),
        image::DynamicImage::ImageRgb8(i) => (Channels::Rgb, i.into_raw().into_iter().map(u16::from).collect()),
        other => (Channels::Rgba, other.to_rgba8().into_raw().into_iter().map(u16::from).collect()),
    };
    InputImage::new(w, h, channels, false, data).map_err(named)
}

/// `A<sep>B` as two numbers.
fn parse_pair(s: &str, sep: char) -> Option<(usize, usize)> {
    let (a, b) = s.split_once(sep)?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// `NAME[:VALUE]`: a trailing `:VALUE` that `parse` accepts is split off (other colons belong to
/// the path).
fn split_suffix<T>(spec: &str, parse: impl Fn(&str) -> Option<T>) -> (&str, Option<T>) {
    match spec.rsplit_once(':') {
        Some((head, tail)) if !head.is_empty() => match parse(tail) {
            Some(v) => (head, Some(v)),
            None => (spec, None),
        },
        _ => (spec, None),
    }
}

/// A file given on the command line (path or http(s) URL) as a source and the file's name in it.
fn file_source(path: &str, what: &str) -> Result<(Box<dyn FileSource>, String)> {
    if path.starts_with("http://") || path.starts_with("https://") {
        let (base, file) = path.rsplit_once('/').ok_or_else(|| Error::Input(format!("{what} {path}: not a file URL")))?;
        return Ok((Box::new(crate::http::HttpSource::new(&format!("{base}/"))?), file.to_string()));
    }
    let p = Path::new(path);
    if !p.is_file() {
        return Err(Error::Input(format!("{what} {path}: no such file")));
    }
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    Ok((Box::new(DirSource::new(parent)), name))
}

/// The `--lora FILE[:SCALE]` adapters (`None` when there are none).
async fn load_adapters(specs: &[String], merge: bool) -> Result<Option<std::rc::Rc<AdapterSet>>> {
    if specs.is_empty() {
        return Ok(None);
    }
    let mut set = AdapterSet::new();
    set.merge = merge;
    for spec in specs {
        let (path, scale) = split_suffix(spec, |s| s.parse::<f32>().ok().filter(|v| v.is_finite()));
        let (src, file) = file_source(path, "--lora")?;
        set.add(src, &file, path, scale.unwrap_or(1.0)).await?;
    }
    Ok(Some(std::rc::Rc::new(set)))
}

/// `--embedding FILE[:TOKEN]` added to the model's text encoders.
async fn add_embedding(gpu: &Gpu, m: &mut StableDiffusionModel, spec: &str) -> Result<()> {
    // A token is one word without path separators or dots.
    let (path, token) = split_suffix(spec, |s| (!s.is_empty() && !s.contains(['/', '\\', '.'])).then(|| s.to_string()));
    let (src, file) = file_source(path, "--embedding")?;
    let e = ldm_web::pipelines::prompt::Embedding::read(src.as_ref(), &file).await?;
    let stem = file.rsplit_once('.').map_or(file.as_str(), |(a, _)| a).to_string();
    let token = token.or(e.token.clone()).unwrap_or(stem);
    m.text.add_embedding(gpu, &e, &token).map_err(|err| match err {
        Error::Model(msg) => Error::Model(format!("--embedding {path}: {msg}")),
        other => other,
    })
}

/// `--vae DIR`: an AutoencoderKL folder.
fn vae_source(dir: &str) -> Result<VaeSource> {
    if !Path::new(dir).join("config.json").is_file() {
        return Err(Error::Input(format!("--vae {dir}: expected a weight type ({}, f16, f32) or an AutoencoderKL folder with config.json", DType::quantised_names())));
    }
    folder_source(dir, "--vae")
}

/// A component folder (path or http(s) URL) given by `flag`.
fn folder_source(dir: &str, flag: &str) -> Result<VaeSource> {
    if dir.starts_with("http://") || dir.starts_with("https://") {
        return Ok(VaeSource(std::rc::Rc::new(crate::http::HttpSource::new(dir)?)));
    }
    let p = Path::new(dir);
    if !p.join("config.json").is_file() {
        return Err(Error::Input(format!("{flag} {dir}: not a model folder (no config.json)")));
    }
    Ok(VaeSource(std::rc::Rc::new(DirSource::new(p))))
}

/// `DIR=IMAGE[:SCALE]` as (ControlNet folder, condition image, scale).
fn parse_control(spec: &str) -> Result<(String, String, f32)> {
    let bad = || Error::Input(format!("--control {spec}: expected DIR=IMAGE or DIR=IMAGE:SCALE (a ControlNet folder, its condition image, a conditioning scale)"));
    let (dir, rest) = spec.split_once('=').ok_or_else(bad)?;
    // A trailing `:number` is the scale; other colons belong to the path.
    let (image, scale) = match rest.rsplit_once(':') {
        Some((img, s)) if s.parse::<f32>().is_ok() => (img, s.parse::<f32>().map_err(|_| bad())?),
        _ => (rest, 1.0),
    };
    if dir.is_empty() || image.is_empty() || !scale.is_finite() {
        return Err(bad());
    }
    Ok((dir.to_string(), image.to_string(), scale))
}

/// What is done to a condition image before a ControlNet sees it.
#[derive(Clone, Copy, Debug)]
enum ControlPreprocess {
    None,
    Canny(CannyParams),
    /// The --depth-model estimator's depth image (transformers' depth-estimation pipeline).
    Depth,
}

impl ControlPreprocess {
    fn parse(spec: &str) -> Result<Self> {
        match spec.split_once(':') {
            None if spec == "none" => Ok(Self::None),
            None if spec == "canny" => Ok(Self::Canny(CannyParams::default())),
            None if spec == "depth" => Ok(Self::Depth),
            Some(("canny", t)) => Ok(Self::Canny(parse_canny_thresholds(t).map_err(|e| Error::Input(format!("--control-preprocess {spec}: {e}")))?)),
            _ => Err(Error::Input(format!("--control-preprocess {spec}: expected none, depth, canny or canny:LOW,HIGH"))),
        }
    }
}

/// The ControlNets' condition images, read and preprocessed as --control-preprocess says.
async fn control_images<'m>(a: &GenerateArgs, gpu: &Gpu, controls: &[(&'m ControlNetModel, &str, f32)]) -> Result<Vec<(&'m ControlNetModel, InputImage, f32)>> {
    let preprocess = control_preprocessing(&a.control_preprocess, controls.len())?;
    let estimator = match (preprocess.iter().any(|p| matches!(p, ControlPreprocess::Depth)), &a.depth_model) {
        (true, Some(dir)) => Some(crate::depth::load_estimator(gpu, dir, DType::F32).await?),
        (true, None) => return Err(Error::Input("--control-preprocess depth needs --depth-model DIR (a Depth Anything V2 or DPT folder)".into())),
        (false, _) => None,
    };
    let mut out = Vec::new();
    for ((model, path, scale), pre) in controls.iter().zip(preprocess) {
        let img = read_image(path, "condition image")?;
        let img = match (pre, &estimator) {
            (ControlPreprocess::None, _) => img,
            (ControlPreprocess::Canny(p), _) => canny_image(&img, p)?,
            (ControlPreprocess::Depth, Some(e)) => e.depth_image(gpu, &img).await?,
            (ControlPreprocess::Depth, None) => return Err(Error::Input("--control-preprocess depth needs --depth-model DIR".into())),
        };
        out.push((*model, img, *scale));
    }
    Ok(out)
}

/// One preprocessing per ControlNet: as many as --control, or one for all, or none at all.
fn control_preprocessing(specs: &[String], controls: usize) -> Result<Vec<ControlPreprocess>> {
    let parsed = specs.iter().map(|s| ControlPreprocess::parse(s)).collect::<Result<Vec<_>>>()?;
    match parsed.len() {
        0 => Ok(vec![ControlPreprocess::None; controls]),
        1 => Ok(vec![parsed[0]; controls]),
        n if n == controls => Ok(parsed),
        n => Err(Error::Input(format!("{n} --control-preprocess values for {controls} --control flags: give one per ControlNet, in the same order, or one for all"))),
    }
}

/// Loads the ControlNet at `dir` (a diffusers folder, or a single original-layout
/// `.safetensors` file) with the UNet's dtype and quantisation.
async fn load_controlnet_dir(gpu: &Gpu, dir: &str, opts: &LoadOptions) -> Result<ControlNetModel> {
    let path = Path::new(dir);
    let named = |e: Error| match e {
        Error::Model(m) => Error::Model(format!("ControlNet {dir}: {m}")),
        other => other,
    };
    if path.is_file() {
        let (src, file) = open_model(dir)?;
        let file = file.ok_or_else(|| Error::Input(format!("--control {dir}: expected a folder or a .safetensors file")))?;
        return ldm_web::pipelines::load_controlnet_single_file(gpu, src.as_ref(), &file, None, opts).await.map_err(named);
    }
    if !path.join("config.json").is_file() {
        return Err(Error::Input(format!("--control {dir}: not a diffusers ControlNet folder (no config.json) or .safetensors file")));
    }
    ldm_web::pipelines::load_controlnet(gpu, &DirSource::new(path), "", opts).await.map_err(named)
}

/// Stable Diffusion settings and image conditions from the flags, checked; warns about prompts
/// cut to the tokenizer's window.
async fn sd_params<'m>(a: &GenerateArgs, gpu: &Gpu, model: &StableDiffusionModel, controls: &[(&'m ControlNetModel, &str, f32)], scheduler: Option<SchedulerKind>, bench: bool) -> Result<(Txt2ImgParams, ImageConditions<'m>)> {
    let mut images = UserImages {
        init: a.init_image.as_deref().map(|p| read_image(p, "init image")).transpose()?,
        mask: a.mask.as_deref().map(|p| read_image(p, "mask")).transpose()?,
        mask_blur: a.mask_blur,
        depth: a.depth.as_deref().map(|p| read_image(p, "depth map")).transpose()?,
        depth_prediction: None,
        controls: control_images(a, gpu, controls).await?,
        strength: a.strength,
        guess_mode: a.guess_mode,
        control_start: a.control_start,
        control_end: a.control_end,
        noise_level: a.noise_level,
    };
    // Depth-to-image without --depth: the folder's own estimator, as diffusers.
    if let (true, Some(init)) = (model.needs_depth_estimate(&images), images.init.as_ref()) {
        let (src, _) = open_model(&a.model)?;
        images.depth_prediction = Some(model.estimate_depth(gpu, src.as_ref(), init).await?);
    }
    let prepared = model.prepare_images(images, a.width, a.height)?;
    if let Some(note) = prepared.note.as_ref().filter(|_| !bench) {
        eprintln!("ldm: note: {note}");
    }
    let (steps, guidance) = model.default_steps_guidance(50);
    let size = |flag: &str, v: &Option<String>| -> Result<Option<(usize, usize)>> {
        v.as_deref().map(|s| parse_pair(s, 'x').map(|(w, h)| (h, w)).ok_or_else(|| Error::Input(format!("{flag} {s}: expected WIDTHxHEIGHT, e.g. 1024x1024")))).transpose()
    };
    let crops = |flag: &str, v: &Option<String>| -> Result<(usize, usize)> {
        v.as_deref().map(|s| parse_pair(s, ',').ok_or_else(|| Error::Input(format!("{flag} {s}: expected TOP,LEFT, e.g. 0,0")))).transpose().map(|c| c.unwrap_or((0, 0)))
    };
    let defaults = XlConditions::default();
    let xl = XlConditions {
        original_size: size("--original-size", &a.original_size)?,
        target_size: size("--target-size", &a.target_size)?,
        crops_coords_top_left: crops("--crops-coords-top-left", &a.crops_coords_top_left)?,
        negative_original_size: size("--negative-original-size", &a.negative_original_size)?,
        negative_target_size: size("--negative-target-size", &a.negative_target_size)?,
        negative_crops_coords_top_left: crops("--negative-crops-coords-top-left", &a.negative_crops_coords_top_left)?,
        aesthetic_score: a.aesthetic_score.unwrap_or(defaults.aesthetic_score),
        negative_aesthetic_score: a.negative_aesthetic_score.unwrap_or(defaults.negative_aesthetic_score),
    };
    if a.refiner.is_some() && !model.family.is_xl() {
        return Err(Error::Input("--refiner needs an SDXL base model (--model)".into()));
    }
    if a.refiner.is_some() && a.denoising_start.is_some() {
        return Err(Error::Input("--refiner hands over at --denoising-end; --denoising-start is for running a refiner on an init image".into()));
    }
    let p = Txt2ImgParams {
        prompt: a.prompt.clone(), negative_prompt: a.negative_prompt.clone(), seed: a.seed, steps: a.steps.or(model.hints.steps).unwrap_or(steps),
        guidance_scale: a.guidance.or(model.hints.guidance).unwrap_or(guidance), guidance_rescale: 0.0, width: prepared.width, height: prepared.height,
        scheduler, eta: a.eta, clip_skip: a.clip_skip, batch: a.batch, prompt_2: a.prompt_2.clone(), negative_prompt_2: a.negative_prompt_2.clone(),
        prompt_weighting: a.prompt_weighting.parse()?, xl, denoising_end: a.denoising_end.filter(|_| a.refiner.is_none()), denoising_start: a.denoising_start,
        ..Default::default()
    };
    model.validate(&p)?;
    let cond = prepared.conditions;
    model.task(&p, &cond)?;
    // As diffusers: text past the tokenizer's window is dropped, with a warning.
    for (what, text) in [("prompt", Some(&p.prompt)), ("negative prompt", p.negative_prompt.as_ref())] {
        let Some(text) = text.filter(|_| p.prompt_weighting == PromptWeighting::None) else { continue };
        let tk = model.text.tokenizer();
        let (n, max) = (tk.encode_unpadded(text).len(), tk.max_length());
        if n > max && !bench {
            eprintln!("ldm: warning: the {what} is {} tokens long; only the first {} are used (--prompt-weighting a1111 reads longer prompts in chunks)", n - 2, max - 2);
        }
    }
    Ok((p, cond))
}

/// Settings of an LDM pipeline from the flags, refusing those the pipeline has no use for.
fn ldm_params(a: &GenerateArgs, model: &LdmModel, scheduler: Option<SchedulerKind>) -> Result<(Txt2ImgParams, Option<LdmImage>)> {
    let kind = model.kind;
    let unused = |flag: &str, given: bool| if given { Err(Error::Input(format!("{} does not use {flag}", kind.class_name()))) } else { Ok(()) };
    unused("--negative-prompt", a.negative_prompt.is_some())?;
    unused("--clip-skip", a.clip_skip != 0)?;
    unused("--strength", a.strength.is_some())?;
    unused("--mask", a.mask.is_some())?;
    unused("--depth", a.depth.is_some())?;
    unused("--control", !a.control.is_empty())?;
    unused("--control-preprocess", !a.control_preprocess.is_empty())?;
    unused("--depth-model", a.depth_model.is_some())?;
    unused("--noise-level", a.noise_level.is_some())?;
    if kind != LdmKind::TextToImage {
        unused("--prompt", !a.prompt.is_empty())?;
    }
    if !matches!(kind, LdmKind::TextToImage | LdmKind::Concat) {
        unused("--guidance", a.guidance.is_some())?;
    }
    if kind == LdmKind::SuperResolution {
        unused("--width / --height (its output size is its input image's times the first stage's factor)", a.width.is_some() || a.height.is_some())?;
    }
    let image = match (&a.init_image, kind) {
        (Some(path), LdmKind::SuperResolution) => Some(LdmImage::LowRes(read_low_res(path)?)),
        (None, LdmKind::SuperResolution) => return Err(Error::Input("this super-resolution model needs its low-resolution input: --init-image FILE".into())),
        (Some(path), LdmKind::Concat) => Some(LdmImage::Condition(read_image(path, "condition image")?)),
        (None, LdmKind::Concat) => return Err(Error::Input("this concatenation-conditioned model needs its condition image: --init-image FILE".into())),
        (Some(_), _) => return Err(Error::Input(format!("{} takes no --init-image", kind.class_name()))),
        (None, _) => None,
    };
    let (dw, dh) = model.default_size();
    let (width, height) = match &image {
        Some(LdmImage::LowRes(img)) => (img.width * model.first_stage.scale_factor(), img.height * model.first_stage.scale_factor()),
        // The condition image's size (rounded down to what the model divides) unless given, as
        // diffusers' image-to-image pipelines.
        Some(LdmImage::Condition(img)) => {
            let (w, h) = default_size(img, None, None, model.size_multiple());
            (a.width.unwrap_or(w), a.height.unwrap_or(h))
        }
        None => (a.width.unwrap_or(dw), a.height.unwrap_or(dh)),
    };
    let p = Txt2ImgParams {
        prompt: a.prompt.clone(), negative_prompt: None, seed: a.seed, steps: a.steps.unwrap_or(kind.default_steps()),
        guidance_scale: a.guidance.unwrap_or(1.0), guidance_rescale: 0.0, width, height, scheduler, eta: a.eta, clip_skip: 0, batch: a.batch,
        ..Default::default()
    };
    Ok((p, image))
}
