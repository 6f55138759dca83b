//! Image pairs (condition → target) as training data: both encoded once by the frozen
//! autoencoder, the condition exactly as the concatenation pipeline prepares it at generation
//! time, the target as `scaling_factor · encode(target)` (what the pipeline's decoder undoes).

use super::{Batch, TrainConfig};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::pipelines::image_input::{resize_u8, InputImage, Resample};
use crate::pipelines::ldm::{ConcatCondition, FirstStage};
use crate::rng::TorchGenerator;

/// One pair: a name (for messages), the condition image and the target image.
pub struct Pair {
    pub name: String,
    pub cond: InputImage,
    pub target: InputImage,
}

/// Encoded pairs: per item the target's latents `[C, h, w]` and the condition's channels.
pub struct PairLatents {
    pub latent_shape: [usize; 3],
    pub cond_channels: usize,
    pub names: Vec<String>,
    pub x0: Vec<Vec<f32>>,
    pub cond: Vec<Vec<f32>>,
}

impl PairLatents {
    /// Encodes `pairs` at `resolution` (a multiple of the autoencoder's scale factor; images are
    /// resized to a square, bicubic).
    pub async fn encode(gpu: &Gpu, first_stage: &FirstStage, condition: &ConcatCondition, pairs: &[Pair], resolution: usize) -> Result<Self> {
        let f = first_stage.scale_factor();
        if pairs.is_empty() {
            return Err(Error::Input("no training pairs: give at least one condition image with a target image of the same name".into()));
        }
        if resolution == 0 || resolution % f != 0 || resolution > 2048 {
            return Err(Error::Input(format!("training resolution {resolution} must be a multiple of the autoencoder's factor {f}, at most 2048")));
        }
        let lat = resolution / f;
        let c = first_stage.latent_channels();
        let cc = condition.unet_channels(first_stage);
        let scale = first_stage.scaling_factor();
        let mut out = Self { latent_shape: [c, lat, lat], cond_channels: cc, names: Vec::new(), x0: Vec::new(), cond: Vec::new() };
        for p in pairs {
            let rgb = p.target.rgb8();
            let rgb = if (p.target.width, p.target.height) == (resolution, resolution) { rgb } else { resize_u8(&rgb, p.target.width, p.target.height, 3, resolution, resolution, Resample::Bicubic) };
            let plane = resolution * resolution;
            let mut planar = vec![0f32; 3 * plane];
            for (i, px) in rgb.chunks_exact(3).enumerate() {
                for (k, &v) in px.iter().enumerate() {
                    planar[k * plane + i] = v as f32 / 127.5 - 1.0;
                }
            }
            let z = first_stage.encode(gpu, &planar, [1, 3, resolution, resolution], DType::F32).await?;
            let cond = condition.prepare(gpu, first_stage, &p.cond, resolution, resolution, DType::F32).await?;
            if z.len() != c * lat * lat || cond.len() != cc * lat * lat {
                return Err(Error::Model(format!("pair {}: the autoencoder gave {} latent values, expected {}", p.name, z.len(), c * lat * lat)));
            }
            out.x0.push(z.into_iter().map(|v| v * scale).collect());
            out.cond.push(cond);
            out.names.push(p.name.clone());
        }
        Ok(out)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.x0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.x0.is_empty()
    }

    /// The batch of step `step` (from 0): items in a shuffled order per epoch, a uniform timestep,
    /// noise and condition dropout per item, all drawn from `config.seed` and the step alone so a
    /// resumed run sees the batches an uninterrupted one would.
    pub fn batch(&self, config: &TrainConfig, step: u32, train_timesteps: usize) -> Batch {
        let (n, b) = (self.len(), config.batch);
        let mut rng = TorchGenerator::new(config.seed.wrapping_mul(0x9E37_79B9).wrapping_add(step as u64 + 1));
        let mut items = Vec::with_capacity(b);
        let mut order: Option<(usize, Vec<usize>)> = None;
        for k in 0..b {
            let global = step as usize * b + k;
            let (epoch, pos) = (global / n, global % n);
            // A batch spans at most a few epochs: shuffle each once.
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, epoch_order(config.seed, epoch, n)));
            }
            items.push(order.as_ref().map_or(0, |(_, o)| o[pos]));
        }
        let timesteps = (0..b).map(|_| (rng.next_u64() % train_timesteps as u64) as u32).collect();
        let keep_cond = rng.rand(b).into_iter().map(|u| u >= config.cond_dropout).collect();
        let noise = rng.randn(b * self.x0[0].len());
        Batch {
            x0: items.iter().flat_map(|&i| self.x0[i].iter().copied()).collect(),
            cond: items.iter().flat_map(|&i| self.cond[i].iter().copied()).collect(),
            timesteps,
            noise,
            keep_cond,
        }
    }
}

/// The order of the items in `epoch`: a Fisher-Yates shuffle seeded by the run and the epoch.
fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut rng = TorchGenerator::new(seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
