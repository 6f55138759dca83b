//! `ldm bench quality`: how far a quantised model's output is from the same model's f32 output —
//! the single-step noise prediction on fixed inputs, whole generations over prompts and seeds
//! (PSNR and SSIM of the 8-bit images), and what the UNet costs (bytes, bits per weight).

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::loader::{FileSource, WeightLog};
use crate::pipelines::loading::{ComponentQuant, DiffusionModel, LoadOptions, StableDiffusionModel};
use crate::pipelines::prompt::{PromptText, PromptWeighting};
use crate::pipelines::stable_diffusion::Txt2ImgParams;
use crate::rng::TorchGenerator;

/// What to compare on.
#[derive(Clone, Debug)]
pub struct QualityCase {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f32,
    /// `None`: the model's default size.
    pub size: Option<(usize, usize)>,
    /// The noise level of the single-step comparison.
    pub timestep: f32,
}

/// One image of the comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageQuality {
    pub prompt: String,
    pub seed: u64,
    pub psnr_db: f64,
    pub ssim: f64,
}

/// Everything `ldm bench quality` measured (JSON).
#[derive(Clone, Debug, serde::Serialize)]
pub struct QualityReport {
    pub model: String,
    /// The quantisation compared against f32 (`unet=q4_1,text_encoder=q8_0,...`).
    pub recipe: String,
    pub unet_parameters: u64,
    pub unet_bytes: u64,
    pub unet_bytes_f32: u64,
    pub bits_per_weight: f64,
    /// Bits per weight of the UNet's quantised tensors alone (a tiny UNet's norms and biases,
    /// kept float, weigh on `bits_per_weight`; an SD-sized one's do not).
    pub quantised_bits_per_weight: f64,
    /// PSNR of the UNet's noise prediction (peak: the f32 prediction's range), per prompt, at
    /// [`QualityCase::timestep`] from seeded latents; mean and minimum over prompts and seeds.
    pub noise_prediction_psnr_db: f64,
    pub noise_prediction_psnr_min_db: f64,
    pub images: Vec<ImageQuality>,
    pub mean_psnr_db: f64,
    pub min_psnr_db: f64,
    pub mean_ssim: f64,
}

/// PSNR in dB of `got` against `want` with peak `peak`.
pub fn psnr(got: &[f64], want: &[f64], peak: f64) -> f64 {
    let mse = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / want.len().max(1) as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (peak * peak / mse).log10() }
}

/// SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, 8-bit range) of
/// the luma of two RGB8 images, averaged over the valid windows.
pub fn ssim(a: &[u8], b: &[u8], w: usize, h: usize) -> f64 {
    let luma = |x: &[u8]| -> Vec<f64> { x.chunks_exact(3).map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64).collect() };
    let (x, y) = (luma(a), luma(b));
    let r = 5usize.min(w.saturating_sub(1) / 2).min(h.saturating_sub(1) / 2);
    let g: Vec<f64> = (0..=2 * r).map(|i| (-((i as f64 - r as f64).powi(2)) / (2.0 * 1.5 * 1.5)).exp()).collect();
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let (mut total, mut n) = (0.0, 0usize);
    for cy in r..h - r {
        for cx in r..w - r {
            let (mut sw, mut mx, mut my, mut xx, mut yy, mut xy) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
            for (dy, gy) in g.iter().enumerate() {
                for (dx, gx) in g.iter().enumerate() {
                    let k = (cy + dy - r) * w + cx + dx - r;
                    let wt = gy * gx;
                    sw += wt;
                    mx += wt * x[k];
                    my += wt * y[k];
                    xx += wt * x[k] * x[k];
                    yy += wt * y[k] * y[k];
                    xy += wt * x[k] * y[k];
                }
            }
            let (mx, my) = (mx / sw, my / sw);
            let (vx, vy, cov) = (xx / sw - mx * mx, yy / sw - my * my, xy / sw - mx * my);
            total += ((2.0 * mx * my + c1) * (2.0 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
            n += 1;
        }
    }
    if n == 0 { 1.0 } else { total / n as f64 }
}

/// The outputs of one model on the case: per (prompt, seed) its noise prediction and its image.
struct Outputs {
    noise: Vec<Vec<f32>>,
    images: Vec<Vec<u8>>,
    size: (usize, usize),
    unet_bytes: u64,
    unet_parameters: u64,
    /// Bytes and parameters of the quantised UNet tensors.
    quantised: (u64, u64),
}

async fn outputs(gpu: &Gpu, src: &dyn FileSource, name: &str, quant: ComponentQuant, case: &QualityCase) -> Result<Outputs> {
    let log = WeightLog::default();
    let opts = LoadOptions { dtype: Some(DType::F32), quant: ComponentQuant { log: Some(log.clone()), ..quant }, ..Default::default() };
    let DiffusionModel::StableDiffusion(model) = DiffusionModel::load(gpu, src, name, &opts).await? else {
        return Err(Error::Input(format!("{name} is not a Stable Diffusion model: ldm bench quality compares text-to-image models")));
    };
    let (mut noise, mut images) = (Vec::new(), Vec::new());
    let mut size = (0, 0);
    let side = model.unet.config.sample_size.unwrap_or(64) * model.vae_config.scale_factor();
    let (width, height) = case.size.unwrap_or((side, side));
    for prompt in &case.prompts {
        for &seed in &case.seeds {
            noise.push(noise_prediction(gpu, &model, prompt, seed, (width, height), case.timestep).await?);
            let p = Txt2ImgParams { prompt: prompt.clone(), seed, steps: case.steps, guidance_scale: case.guidance, width, height, batch: 1, ..Default::default() };
            let (img, _) = model.txt2img(gpu, &p, &|| 0.0, &mut |_| Ok(())).await?;
            size = (img.width, img.height);
            images.push(img.rgb8(0));
        }
    }
    let records: Vec<_> = log.records().into_iter().filter(|r| r.folder == "unet").collect();
    let unet_parameters = records.iter().map(|r| r.shape.iter().product::<usize>() as u64).sum();
    let q = records.iter().filter(|r| r.dtype.is_quantised());
    let quantised = q.fold((0, 0), |(b, n), r| (b + r.bytes.len() as u64, n + r.shape.iter().product::<usize>() as u64));
    Ok(Outputs { noise, images, size, unet_bytes: log.bytes("unet"), unet_parameters, quantised })
}

/// The UNet's prediction for seeded latents of an image of `size` at `timestep`, conditioned on
/// `prompt`.
pub async fn noise_prediction(gpu: &Gpu, model: &StableDiffusionModel, prompt: &str, seed: u64, size: (usize, usize), timestep: f32) -> Result<Vec<f32>> {
    let text = model.text.encode(gpu, &PromptText { prompt, prompt_2: None, clip_skip: 0 }, PromptWeighting::None, false).await?;
    let c = &model.unet.config;
    let f = model.vae_config.scale_factor();
    let (h, w) = (size.1 / f, size.0 / f);
    let latents = TorchGenerator::new(seed).randn(c.in_channels * h * w);
    let x = gpu.upload(&[1, c.in_channels, h, w], DType::F32, &latents)?;
    let eps = model.unet.forward(gpu, &x, timestep, &text.context)?;
    gpu.read(&eps).await
}

/// Compares `quant` against f32 on `case` for the model in `src` (its f32 outputs from
/// `reference` instead where given: `src` is a converted folder of it).
pub async fn run(gpu: &Gpu, src: &dyn FileSource, reference: Option<&dyn FileSource>, name: &str, quant: ComponentQuant, recipe: &str, case: &QualityCase) -> Result<QualityReport> {
    if case.prompts.is_empty() || case.seeds.is_empty() {
        return Err(Error::Input("ldm bench quality needs at least one prompt and one seed".into()));
    }
    let reference = outputs(gpu, reference.unwrap_or(src), name, ComponentQuant::default(), case).await?;
    let quantised = outputs(gpu, src, name, quant, case).await?;
    let as_f64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    let noise: Vec<f64> = reference
        .noise
        .iter()
        .zip(&quantised.noise)
        .map(|(want, got)| {
            let want = as_f64(want);
            let range = want.iter().cloned().fold(f64::MIN, f64::max) - want.iter().cloned().fold(f64::MAX, f64::min);
            psnr(&as_f64(got), &want, range)
        })
        .collect();
    let (w, h) = reference.size;
    let mut images = Vec::new();
    let mut k = 0;
    for prompt in &case.prompts {
        for &seed in &case.seeds {
            let (a, b) = (&quantised.images[k], &reference.images[k]);
            let to = |x: &[u8]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
            images.push(ImageQuality { prompt: prompt.clone(), seed, psnr_db: psnr(&to(a), &to(b), 255.0), ssim: ssim(a, b, w, h) });
            k += 1;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let psnrs: Vec<f64> = images.iter().map(|i| i.psnr_db.min(99.0)).collect();
    Ok(QualityReport {
        model: name.to_string(),
        recipe: recipe.to_string(),
        unet_parameters: quantised.unet_parameters,
        unet_bytes: quantised.unet_bytes,
        unet_bytes_f32: reference.unet_bytes,
        bits_per_weight: 8.0 * quantised.unet_bytes as f64 / quantised.unet_parameters.max(1) as f64,
        quantised_bits_per_weight: 8.0 * quantised.quantised.0 as f64 / quantised.quantised.1.max(1) as f64,
        noise_prediction_psnr_db: mean(&noise.iter().map(|v| v.min(99.0)).collect::<Vec<_>>()),
        noise_prediction_psnr_min_db: noise.iter().cloned().fold(f64::INFINITY, f64::min).min(99.0),
        mean_psnr_db: mean(&psnrs),
        min_psnr_db: psnrs.iter().cloned().fold(f64::INFINITY, f64::min),
        mean_ssim: mean(&images.iter().map(|i| i.ssim).collect::<Vec<_>>()),
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_and_ssim_of_known_images() {
        let a: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(ssim(&a, &a, 16, 16), 1.0);
        let to = |x: &[u8]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
        assert!(psnr(&to(&a), &to(&a), 255.0).is_infinite());
        // Every value off by 1: MSE 1, PSNR 20 log10(255).
        let b: Vec<u8> = a.iter().map(|&v| if v < 255 { v + 1 } else { v - 1 }).collect();
        assert!((psnr(&to(&b), &to(&a), 255.0) - 48.1308).abs() < 1e-3);
        let s = ssim(&a, &b, 16, 16);
        assert!(s > 0.99 && s < 1.0, "{s}");
        let inverted: Vec<u8> = a.iter().map(|&v| 255 - v).collect();
        assert!(ssim(&a, &inverted, 16, 16) < 0.0);
    }
}
