//! `ldm train-lora`: fine-tunes a Stable Diffusion model's UNet with LoRA on captioned images
//! (diffusers' `train_text_to_image_lora.py`), writing `pytorch_lora_weights.safetensors` that
//! `ldm generate --lora`, the page and diffusers load.

use std::io::IsTerminal;
use std::path::Path;

use clap::Args;
use ldm_web::gpu::GpuOptions;
use ldm_web::loader::{DirSource, FileSource};
use ldm_web::loader::safetensors::FileDType;
use ldm_web::training::lora_run::{CaptionedImage, LoraRun, LoraSettings};
use ldm_web::training::run::{Cadence, RunEvent};
use ldm_web::training::{LoraConfig, TrainConfig};
use ldm_web::{Error, Result};

/// Arguments of `ldm train-lora`.
#[derive(Args, Debug, Clone)]
pub struct TrainLoraArgs {
    /// The Stable Diffusion 1.x / 2.x model whose UNet gets the LoRA: a diffusers folder, or `builtin`.
    #[arg(long, default_value = "builtin")]
    pub model: String,
    /// The training images (PNG, JPEG, WebP) with their captions: `NAME.txt` beside each image, or a `metadata.jsonl` of {"file_name", "text"} lines (diffusers' image folder), or --caption for all.
    #[arg(long)]
    pub images: String,
    /// The caption of images that have none (a DreamBooth-style instance prompt).
    #[arg(long)]
    pub caption: Option<String>,
    /// Optimisation steps (in all, when resuming).
    #[arg(long, default_value_t = 500)]
    pub steps: u32,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// AdamW learning rate (diffusers' LoRA script: 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f32,
    /// Gradients are clipped to this global norm.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank; default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// The layers that get adapters, by module name (PEFT's target_modules).
    #[arg(long, default_value = "to_k,to_q,to_v,to_out.0", value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Image side in pixels (centre-cropped and resized; default: the UNet's sample size times the VAE's factor).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Probability of training an image with the empty caption instead of its own.
    #[arg(long, default_value_t = 0.0)]
    pub cond_dropout: f32,
    /// Seed of the LoRA's initial values and of the data order, timesteps and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute block activations in the backward pass: less GPU memory, more time.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Matrix products and convolutions in f16 (frozen weights stored in f16) with f32 LoRA master weights and a scaled loss; needs an adapter with shader-f16.
    #[arg(long)]
    pub mixed_precision: bool,
    /// Where the LoRA goes: `pytorch_lora_weights.safetensors`, plus `training/` to resume from.
    #[arg(long, default_value = "lora")]
    pub out: String,
    /// Save every this many steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub save_every: u32,
    /// Write `samples/step-N.png` (the sample prompt generated with the LoRA) every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub sample_every: u32,
    /// The prompt of those samples (default: the first image's caption).
    #[arg(long)]
    pub sample_prompt: Option<String>,
    /// Steps of those samples (the model's scheduler).
    #[arg(long, default_value_t = 25)]
    pub sample_steps: usize,
    /// Guidance scale of those samples.
    #[arg(long, default_value_t = 7.5)]
    pub sample_guidance: f32,
    /// Continue the run saved in --out (its settings; --steps may extend it).
    #[arg(long)]
    pub resume: bool,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The images of `dir` with their captions.
pub fn read_captioned(dir: &str, default_caption: Option<&str>) -> Result<Vec<CaptionedImage>> {
    let path = Path::new(dir);
    let io = |p: &Path, e: std::io::Error| Error::Input(format!("cannot read {}: {e}", p.display()));
    if !path.is_dir() {
        return Err(Error::Input(format!("--images {dir} must be a folder of images with captions")));
    }
    let mut from_metadata = std::collections::BTreeMap::new();
    let metadata = path.join("metadata.jsonl");
    if metadata.is_file() {
        let text = std::fs::read_to_string(&metadata).map_err(|e| io(&metadata, e))?;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = || Error::Input(format!("{} line {}: expected {{\"file_name\": ..., \"text\": ...}}", metadata.display(), n + 1));
            let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad())?;
            let (Some(file), Some(text)) = (v.get("file_name").and_then(|f| f.as_str()), v.get("text").and_then(|t| t.as_str())) else { return Err(bad()) };
            from_metadata.insert(file.to_string(), text.to_string());
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(path).map_err(|e| io(path, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let ext = f.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        let file_name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let txt = f.with_extension("txt");
        let caption = match from_metadata.get(&file_name) {
            Some(c) => c.clone(),
            None if txt.is_file() => std::fs::read_to_string(&txt).map_err(|e| io(&txt, e))?.trim().to_string(),
            None => default_caption.map(str::to_string).ok_or_else(|| Error::Input(format!("{} has no caption: add {}, a metadata.jsonl line, or pass --caption", f.display(), txt.display())))?,
        };
        let image = crate::generate::read_image(&f.display().to_string(), "training image")?;
        let name = f.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        out.push(CaptionedImage { name, image, caption });
    }
    if out.is_empty() {
        return Err(Error::Input(format!("{dir}: no images (PNG, JPEG, WebP) found")));
    }
    Ok(out)
}

/// The model's source.
fn model_source(spec: &str) -> Result<Box<dyn FileSource>> {
    if spec == crate::builtin::NAME {
        return Ok(Box::new(crate::builtin::source().ok_or_else(|| Error::Input("this ldm was built without the built-in model; pass --model DIR".into()))?));
    }
    if !Path::new(spec).join("model_index.json").is_file() {
        return Err(Error::Input(format!("--model {spec}: not a diffusers folder (no model_index.json); convert a checkpoint with ldm convert first")));
    }
    Ok(Box::new(DirSource::new(spec)))
}

/// Runs `ldm train-lora`.
pub fn run(a: &TrainLoraArgs) -> Result<String> {
    let images = read_captioned(&a.images, a.caption.as_deref())?;
    let lora = LoraConfig { r: a.rank, lora_alpha: a.lora_alpha.unwrap_or(a.rank as f32), target_modules: a.targets.clone() };
    lora.validate()?;
    let config = TrainConfig {
        steps: a.steps, batch: a.batch, lr: a.lr, weight_decay: a.weight_decay, max_grad_norm: a.max_grad_norm, cond_dropout: a.cond_dropout,
        ema_decay: None, seed: a.seed, gradient_checkpointing: a.gradient_checkpointing, mixed_precision: a.mixed_precision, ..Default::default()
    };
    config.validate()?;
    pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: true, ..Default::default() }).await?;
        let out_dir = Path::new(&a.out);
        let resume = a.resume && out_dir.join("training/state.json").is_file();
        if a.resume && !resume {
            return Err(Error::Input(format!("--resume: {} holds no training state (training/state.json)", a.out)));
        }
        let src = model_source(&a.model)?;
        let out = DirSource::new(&a.out);
        let settings = LoraSettings { config, resolution: a.resolution, lora };
        let mut run = LoraRun::start(&gpu, src.as_ref(), &a.model, &images, settings, resume.then_some(&out as &dyn FileSource)).await?;
        let first = run.info.step;
        let bar = indicatif::ProgressBar::new(run.info.config.steps as u64);
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} {elapsed_precise} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        bar.set_position(first as u64);
        let start = std::time::Instant::now();
        let prompt = a.sample_prompt.clone().unwrap_or_else(|| images[0].caption.clone());
        let cadence = Cadence { save_every: a.save_every.max(1), sample_every: a.sample_every, sample_at_end: true, sample_steps: a.sample_steps, sample_guidance: a.sample_guidance, weights: FileDType::F32 };
        let (mut step, steps) = (first, run.info.config.steps);
        run.train(&gpu, src.as_ref(), &cadence, &prompt, &|| Box::pin(async {}), &mut |ev| {
            match ev {
                RunEvent::Step(stats) => {
                    step += 1;
                    let rate = (step - first) as f64 / start.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!("loss {:.4} | {rate:.2} steps/s", stats.loss));
                    bar.set_position(step as u64);
                    if !std::io::stderr().is_terminal() && (step % 50 == 0 || step == first + 1) {
                        eprintln!("step {step}/{steps}: loss {:.4}, {rate:.2} steps/s", stats.loss);
                    }
                }
                RunEvent::Checkpoint(files) => crate::train::write_files(out_dir, files)?,
                RunEvent::Sample(images) => {
                    let dir = out_dir.join("samples");
                    std::fs::create_dir_all(&dir).map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
                    let path = dir.join(format!("step-{step:06}.png"));
                    crate::generate::write_png(&path.display().to_string(), images.width, images.height, &images.rgb8(0), &format!("ldm train-lora sample at step {step}: {prompt}"))?;
                }
            }
            Ok(())
        })
        .await?;
        bar.finish();
        let seconds = start.elapsed().as_secs_f64();
        let steps = run.info.step - first;
        let mut report = serde_json::Map::new();
        report.insert("adapter".into(), serde_json::json!(gpu.summary().name));
        for (k, v) in run.summary() {
            report.insert(k.into(), v);
        }
        report.insert("steps".into(), serde_json::json!(steps));
        report.insert("seconds".into(), serde_json::json!(seconds));
        report.insert("steps_per_s".into(), serde_json::json!(steps as f64 / seconds.max(1e-9)));
        report.insert("out".into(), serde_json::json!(a.out));
        serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))
    })
}
