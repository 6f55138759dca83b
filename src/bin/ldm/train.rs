//! `ldm train`: fits a concatenation-conditioned image-to-image LDM to pairs of images with a
//! frozen autoencoder, on the GPU (or `--device cpu`); `ldm bench train`: its speed and memory.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use ldm_web::gpu::GpuOptions;
use ldm_web::loader::safetensors::FileDType;
use ldm_web::loader::{DirSource, FileSource};
use ldm_web::training::pairs::Pair;
use ldm_web::pipelines::image_input::{resize_u8, InputImage, Resample};
use ldm_web::pipelines::stable_diffusion::Images;
use ldm_web::training::run::{autoencoder_dir, Cadence, RunEvent, RunSettings, TrainingRun, UNetSpec};
use ldm_web::training::{Objective, TrainConfig};
use ldm_web::{Error, Result};

/// What a run is made of: data, autoencoder, UNet and optimiser settings (`ldm train` and `ldm bench train`).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The training pairs: a folder with `cond/` and `target/` holding images of the same file names (PNG, JPEG, WebP), or a CSV file of `condition,target` paths (relative to the CSV); `ldm bench train` without it uses 16 synthetic pairs.
    #[arg(long)]
    pub pairs: Option<String>,
    /// The frozen autoencoder: `builtin` (the built-in model's), an AutoencoderKL / VQModel folder, or a pipeline folder with `vae/` or `vqvae/`.
    #[arg(long, default_value = "builtin")]
    pub autoencoder: String,
    /// Pairs per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f32,
    /// Gradients are clipped to this global norm.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Image side in pixels the pairs are resized to (a multiple of the autoencoder's factor).
    #[arg(long, default_value_t = 64)]
    pub resolution: usize,
    /// What the UNet predicts.
    #[arg(long, default_value = "epsilon", value_parser = ["epsilon", "v_prediction"])]
    pub objective: String,
    /// Probability of training a pair without its condition (what classifier-free guidance needs; 0 disables).
    #[arg(long, default_value_t = 0.1)]
    pub cond_dropout: f32,
    /// Decay of the weights' exponential moving average, which is what gets saved (0: no EMA, save the trained weights).
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f32,
    /// Seed of the initial weights and of the data order, timesteps and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// UNet channels per level (attention from the second level on).
    #[arg(long, default_value = "64,128", value_delimiter = ',')]
    pub channels: Vec<usize>,
    /// Resnets per UNet level.
    #[arg(long, default_value_t = 1)]
    pub layers_per_block: usize,
    /// Channels per attention head.
    #[arg(long, default_value_t = 32)]
    pub head_dim: usize,
    /// A UNet2DModel config.json to train instead of the one --channels describes.
    #[arg(long)]
    pub unet_config: Option<String>,
    /// Recompute each resnet's and attention's activations in the backward pass instead of keeping them: less GPU memory, about a third more time per step.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Matrix products and convolutions in f16 with f32 master weights and a scaled loss (torch's autocast + GradScaler); needs an adapter with shader-f16.
    #[arg(long)]
    pub mixed_precision: bool,
}

/// Arguments of `ldm train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Optimisation steps (in all, when resuming).
    #[arg(long, default_value_t = 1000)]
    pub steps: u32,
    /// Where the trained model goes: an LDMPipeline folder `ldm generate --model` and the page load, plus `training/` to resume from.
    #[arg(long, default_value = "trained")]
    pub out: String,
    /// Save the model and the training state every this many steps (and at the end).
    #[arg(long, default_value_t = 500)]
    pub save_every: u32,
    /// Write `samples/step-N.png` (the first pair's condition, target and generated image) every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub sample_every: u32,
    /// DDIM steps of those samples.
    #[arg(long, default_value_t = 25)]
    pub sample_steps: usize,
    /// Guidance scale of those samples.
    #[arg(long, default_value_t = 1.0)]
    pub sample_guidance: f32,
    /// Continue the run saved in --out (its settings; --steps may extend it).
    #[arg(long)]
    pub resume: bool,
    /// Save the model's UNet weights in f16 (half the size; training state stays f32).
    #[arg(long)]
    pub f16: bool,
}

/// Arguments of `ldm bench train`.
#[derive(Args, Debug, Clone)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Steps to time (the first, which compiles pipelines, is reported apart).
    #[arg(long, default_value_t = 10)]
    pub steps: u32,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The pairs `--pairs` names, read and decoded.
pub fn read_pairs(spec: &str) -> Result<Vec<Pair>> {
    let path = Path::new(spec);
    let io = |p: &Path, e: std::io::Error| Error::Input(format!("cannot read {}: {e}", p.display()));
    let mut paths: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    if path.is_dir() {
        let (cond_dir, target_dir) = (path.join("cond"), path.join("target"));
        if !cond_dir.is_dir() || !target_dir.is_dir() {
            return Err(Error::Input(format!("{spec} must hold cond/ and target/ folders of images with matching names (or pass a CSV of condition,target paths)")));
        }
        let mut names: Vec<PathBuf> = std::fs::read_dir(&cond_dir).map_err(|e| io(&cond_dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for c in names {
            let ext = c.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
            if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                continue;
            }
            let stem = c.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            let target = IMAGE_EXTENSIONS.iter().map(|e| target_dir.join(format!("{stem}.{e}"))).find(|p| p.is_file());
            let target = target.ok_or_else(|| Error::Input(format!("{} has no target image named {stem}.* in {}", c.display(), target_dir.display())))?;
            paths.push((stem, c, target));
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (n == 0 && line.to_ascii_lowercase().starts_with("cond")) {
                continue;
            }
            let (c, t) = line.split_once(',').ok_or_else(|| Error::Input(format!("{spec} line {}: expected `condition,target`", n + 1)))?;
            let (c, t) = (base.join(c.trim()), base.join(t.trim()));
            let stem = c.file_stem().and_then(|s| s.to_str()).unwrap_or("pair").to_string();
            paths.push((stem, c, t));
        }
    }
    if paths.is_empty() {
        return Err(Error::Input(format!("{spec}: no image pairs found")));
    }
    paths
        .into_iter()
        .map(|(name, c, t)| {
            let cond = crate::generate::read_image(&c.display().to_string(), "condition image")?;
            let target = crate::generate::read_image(&t.display().to_string(), "target image")?;
            Ok(Pair { name, cond, target })
        })
        .collect()
}

/// The autoencoder's source and folder within it.
async fn autoencoder_source(spec: &str) -> Result<(Box<dyn FileSource>, &'static str)> {
    let src: Box<dyn FileSource> = if spec == crate::builtin::NAME {
        Box::new(crate::builtin::source().ok_or_else(|| Error::Input("this ldm was built without the built-in model; pass --autoencoder DIR".into()))?)
    } else {
        Box::new(DirSource::new(spec))
    };
    let dir = autoencoder_dir(src.as_ref()).await?;
    Ok((src, dir))
}

fn config_of(a: &RunArgs, steps: u32) -> Result<TrainConfig> {
    let objective = if a.objective == "v_prediction" { Objective::V } else { Objective::Epsilon };
    let ema_decay = (a.ema_decay > 0.0).then_some(a.ema_decay);
    let c = TrainConfig { steps, batch: a.batch, lr: a.lr, weight_decay: a.weight_decay, max_grad_norm: a.max_grad_norm, objective, cond_dropout: a.cond_dropout, ema_decay, seed: a.seed, gradient_checkpointing: a.gradient_checkpointing, mixed_precision: a.mixed_precision };
    c.validate()?;
    Ok(c)
}

/// Writes `files` under `out`, each through a temporary file so an interrupted save leaves the
/// previous one whole.
pub(crate) fn write_files(out: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    for (rel, bytes) in files {
        let path = out.join(rel);
        let io = |e: std::io::Error| Error::Io(format!("cannot write {}: {e}", path.display()));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    Ok(())
}

fn settings(a: &RunArgs, steps: u32) -> Result<RunSettings> {
    let unet = match &a.unet_config {
        Some(p) => UNetSpec::Config(serde_json::from_slice(&std::fs::read(p).map_err(|e| Error::Input(format!("cannot read {p}: {e}")))?).map_err(|e| Error::Input(format!("{p}: {e}")))?),
        None => UNetSpec::Levels { channels: a.channels.clone(), layers: a.layers_per_block, head_dim: a.head_dim },
    };
    Ok(RunSettings { config: config_of(a, steps)?, resolution: a.resolution, unet, schedule: None })
}

/// Runs `ldm bench train`: the steps' times and peak GPU bytes as JSON.
pub fn bench(a: &BenchTrainArgs) -> Result<String> {
    let pairs = match &a.run.pairs {
        Some(p) => read_pairs(p)?,
        None => ldm_web::bench::train::synthetic_pairs(16, a.run.resolution)?,
    };
    pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: true, ..Default::default() }).await?;
        let (ae, ae_dir) = autoencoder_source(&a.run.autoencoder).await?;
        let start = std::time::Instant::now();
        let now_ms = || start.elapsed().as_secs_f64() * 1e3;
        let report = ldm_web::bench::train::run(&gpu, ae.as_ref(), ae_dir, &pairs, settings(&a.run, a.steps)?, a.steps as usize, &now_ms).await?;
        serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))
    })
}

/// A PNG of the first pair's condition, its target and the generated image, side by side.
fn write_sample(images: &Images, a: &TrainArgs, pair: &Pair, step: u32) -> Result<()> {
    let r = a.run.resolution;
    let resized = |img: &InputImage| resize_u8(&img.rgb8(), img.width, img.height, 3, r, r, Resample::Bicubic);
    let panels = [resized(&pair.cond), resized(&pair.target), images.rgb8(0)];
    let mut strip = vec![0u8; 3 * r * 3 * r];
    for (k, p) in panels.iter().enumerate() {
        for y in 0..r {
            strip[(y * 3 * r + k * r) * 3..(y * 3 * r + (k + 1) * r) * 3].copy_from_slice(&p[y * r * 3..(y + 1) * r * 3]);
        }
    }
    let dir = Path::new(&a.out).join("samples");
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(format!("step-{step:06}.png"));
    crate::generate::write_png(&path.display().to_string(), 3 * r, r, &strip, &format!("ldm train sample: condition, target, generated at step {step}"))
}

/// Runs `ldm train`.
pub fn run(a: &TrainArgs) -> Result<String> {
    let spec = a.run.pairs.as_deref().ok_or_else(|| Error::Input("ldm train needs --pairs DIR (cond/ and target/) or --pairs FILE.csv".into()))?;
    let pairs = read_pairs(spec)?;
    pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: true, ..Default::default() }).await?;
        let resume = a.resume && Path::new(&a.out).join("training/state.json").is_file();
        if a.resume && !resume {
            return Err(Error::Input(format!("--resume: {} holds no training state (training/state.json)", a.out)));
        }
        let (ae, ae_dir) = autoencoder_source(&a.run.autoencoder).await?;
        let out = DirSource::new(&a.out);
        let mut run = TrainingRun::start(&gpu, ae.as_ref(), ae_dir, &pairs, settings(&a.run, a.steps)?, resume.then_some(&out as &dyn FileSource)).await?;
        let first = run.info.step;
        let bar = indicatif::ProgressBar::new(run.info.config.steps as u64);
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} {elapsed_precise} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        bar.set_position(first as u64);
        let start = std::time::Instant::now();
        let cadence = Cadence {
            save_every: a.save_every.max(1),
            sample_every: a.sample_every,
            sample_at_end: true,
            sample_steps: a.sample_steps,
            sample_guidance: a.sample_guidance,
            weights: if a.f16 { FileDType::F16 } else { FileDType::F32 },
        };
        let mut step = first;
        run.train(&gpu, &cadence, Some(&pairs[0].cond), &|| Box::pin(async {}), &mut |ev| {
            match ev {
                RunEvent::Step(stats) => {
                    step += 1;
                    let rate = (step - first) as f64 / start.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!("loss {:.4} | {rate:.2} steps/s", stats.loss));
                    bar.set_position(step as u64);
                    // Without a terminal (a log file) the bar is hidden: a line every 50 steps instead.
                    if !std::io::stderr().is_terminal() && (step % 50 == 0 || step == 1) {
                        eprintln!("step {step}/{}: loss {:.4}, {rate:.2} steps/s", bar.length().unwrap_or(0), stats.loss);
                    }
                }
                RunEvent::Checkpoint(files) => write_files(Path::new(&a.out), files)?,
                RunEvent::Sample(images) => write_sample(images, a, &pairs[0], step)?,
            }
            Ok(())
        })
        .await?;
        bar.finish();
        let seconds = start.elapsed().as_secs_f64();
        let steps = run.info.step - first;
        let losses = &run.info.losses;
        let tail = &losses[losses.len().saturating_sub(10)..];
        let report = serde_json::json!({
            "adapter": gpu.summary().name,
            "pairs": run.data.len(),
            "parameters": run.trainer.unet.params().iter().map(|p| p.numel()).sum::<usize>(),
            "batch": run.info.config.batch,
            "resolution": run.info.resolution,
            "steps": steps,
            "seconds": seconds,
            "steps_per_s": steps as f64 / seconds.max(1e-9),
            "first_loss": losses.first(),
            "mean_loss_last_10": tail.iter().sum::<f32>() / tail.len().max(1) as f32,
            "out": &a.out,
        });
        serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))
    })
}
