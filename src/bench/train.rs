//! `ldm bench train` and `bench.html?mode=train`: the speed and memory of training steps, on
//! given pairs or on synthetic ones (training speed does not depend on what the images show).

use crate::error::Result;
use crate::gpu::{AdapterSummary, Gpu};
use crate::loader::FileSource;
use crate::pipelines::image_input::InputImage;
use crate::training::pairs::Pair;
use crate::training::run::{RunSettings, TrainingRun};

/// What a training benchmark measured.
#[derive(Debug, serde::Serialize)]
pub struct TrainBenchReport {
    pub adapter: AdapterSummary,
    pub device: &'static str,
    pub pairs: usize,
    pub parameters: usize,
    pub batch: usize,
    pub resolution: usize,
    pub latent_shape: [usize; 3],
    /// Encoding the pairs with the autoencoder and building the run.
    pub start_ms: f64,
    /// The first step (pipelines compiled, buffers allocated).
    pub first_step_ms: f64,
    /// The mean of the other steps.
    pub ms_per_step: f64,
    pub steps_per_s: f64,
    pub steps: usize,
    pub peak_gpu_bytes: u64,
    pub losses: Vec<f32>,
}

/// `n` pairs of `side`-pixel images: coloured discs (the condition) and the same discs shifted and
/// recoloured (the target), different per pair.
pub fn synthetic_pairs(n: usize, side: usize) -> Result<Vec<Pair>> {
    (0..n)
        .map(|k| {
            let (cx, cy, r) = ((k * 7 % 11) as f32 / 11.0, (k * 5 % 13) as f32 / 13.0, 0.2 + (k % 4) as f32 * 0.05);
            let draw = |dx: f32, colour: [u8; 3]| -> Result<InputImage> {
                let mut rgba = vec![255u8; side * side * 4];
                for y in 0..side {
                    for x in 0..side {
                        let (u, v) = (x as f32 / side as f32 - cx - dx, y as f32 / side as f32 - cy);
                        if u * u + v * v < r * r {
                            rgba[(y * side + x) * 4..(y * side + x) * 4 + 3].copy_from_slice(&colour);
                        }
                    }
                }
                InputImage::from_rgba8(side, side, &rgba)
            };
            let c = [(k * 40 % 256) as u8, (k * 90 % 256) as u8, 200];
            Ok(Pair { name: format!("synthetic-{k}"), cond: draw(0.0, c)?, target: draw(0.1, [c[2], c[0], c[1]])? })
        })
        .collect()
}

/// Starts a run on `pairs` and times `steps` steps (at least 2: the first is reported apart).
pub async fn run(gpu: &Gpu, ae: &dyn FileSource, ae_dir: &'static str, pairs: &[Pair], settings: RunSettings, steps: usize, now_ms: &dyn Fn() -> f64) -> Result<TrainBenchReport> {
    let steps = steps.max(2);
    gpu.reset_pool_peak();
    let t0 = now_ms();
    let mut settings = settings;
    settings.config.steps = steps as u32;
    let mut run = TrainingRun::start(gpu, ae, ae_dir, pairs, settings, None).await?;
    let start_ms = now_ms() - t0;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = now_ms();
        run.step(gpu).await?;
        times.push(now_ms() - t);
    }
    let rest = &times[1..];
    let ms_per_step = rest.iter().sum::<f64>() / rest.len() as f64;
    Ok(TrainBenchReport {
        adapter: gpu.summary().clone(),
        device: if gpu.is_cpu() { "cpu" } else { "gpu" },
        pairs: run.data.len(),
        parameters: run.trainer.unet.params().iter().map(|p| p.numel()).sum(),
        batch: run.info.config.batch,
        resolution: run.info.resolution,
        latent_shape: run.data.latent_shape,
        start_ms,
        first_step_ms: times[0],
        ms_per_step,
        steps_per_s: 1e3 / ms_per_step,
        steps,
        peak_gpu_bytes: gpu.pool_stats().peak_bytes,
        losses: run.info.losses.clone(),
    })
}
