//! `AutoencoderKL`: the VAE that maps images to Stable Diffusion's latents and back.

use serde::{Deserialize, Serialize};

use super::nn::Conv2d;
use super::vae::Coder;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;

/// `vae/config.json`; unknown keys ignored, missing ones take diffusers' defaults.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f32,
    pub shift_factor: Option<f32>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3, out_channels: 3, down_block_types: vec!["DownEncoderBlock2D".into()], up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64], layers_per_block: 1, act_fn: "silu".into(), latent_channels: 4, norm_num_groups: 32,
            sample_size: 32, scaling_factor: 0.18215, shift_factor: None, use_quant_conv: true, use_post_quant_conv: true, mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Refuses configs the decoder cannot run.
    pub fn validate(&self) -> Result<()> {
        super::vae::validate_coder("vae", &self.block_out_channels, &self.down_block_types, &self.up_block_types, &self.act_fn, self.norm_num_groups, self.layers_per_block)
    }
    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        super::vae::scale_factor(&self.block_out_channels)
    }
}

/// The encoder's diagonal Gaussian over latents (diffusers' `DiagonalGaussianDistribution`).
pub struct LatentDist {
    /// `[B, latent_channels, h, w]`
    pub shape: Vec<usize>,
    pub mean: Vec<f32>,
    /// Log-variance clamped to [-30, 20], as diffusers.
    pub logvar: Vec<f32>,
}

impl LatentDist {
    /// The distribution's mode (its mean): `latent_dist.mode()`.
    pub fn mode(&self) -> &[f32] {
        &self.mean
    }
    /// `latent_dist.sample(generator)`: mean + exp(logvar / 2) * randn, drawn as diffusers does.
    pub fn sample(&self, gen: &mut crate::rng::TorchGenerator) -> Vec<f32> {
        let noise = gen.randn(self.mean.len());
        self.mean.iter().zip(&self.logvar).zip(noise).map(|((&m, &lv), n)| m + (0.5 * lv).exp() * n).collect()
    }
}

/// `AutoencoderKL`.
pub struct AutoencoderKL {
    pub config: AutoencoderKLConfig,
    encoder: Option<Coder>,
    quant_conv: Option<Conv2d>,
    decoder: Coder,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Loads the decoder, and the encoder when `with_encoder` (text-to-image needs no encoder).
    pub async fn load(w: &W<'_, '_>, config: AutoencoderKLConfig, with_encoder: bool) -> Result<Self> {
        config.validate()?;
        let ch = &config.block_out_channels;
        let (g, l, z) = (config.norm_num_groups, config.layers_per_block, config.latent_channels);
        let encoder = if with_encoder {
            Some(Coder::encoder(&w.sub("encoder"), config.in_channels, ch, l, g, 2 * z, config.mid_block_add_attention).await?)
        } else {
            None
        };
        let quant_conv = if with_encoder && config.use_quant_conv { Some(Conv2d::load(&w.sub("quant_conv"), 2 * z, 2 * z, 1, 1, 0).await?) } else { None };
        let post_quant_conv = if config.use_post_quant_conv { Some(Conv2d::load(&w.sub("post_quant_conv"), z, z, 1, 1, 0).await?) } else { None };
        let decoder = Coder::decoder(&w.sub("decoder"), z, config.out_channels, ch, l, g, config.mid_block_add_attention).await?;
        Ok(Self { config, encoder, quant_conv, decoder, post_quant_conv })
    }

    /// Decodes latents `z` (already divided by `scaling_factor`) into images in [-1, 1].
    pub fn decode(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(gpu, z, None)?,
            None => z.clone(),
        };
        self.decoder.forward(gpu, &z, true)
    }

    /// Encodes images in [-1, 1] `[B, 3, H, W]` into the latent distribution.
    pub async fn encode(&self, gpu: &Gpu, x: &Tensor) -> Result<LatentDist> {
        let enc = self.encoder.as_ref().ok_or_else(|| Error::Unsupported("this VAE was loaded without its encoder".into()))?;
        let f = self.config.scale_factor();
        if x.shape().len() != 4 || !x.dim(2).is_multiple_of(f) || !x.dim(3).is_multiple_of(f) {
            return Err(Error::Input(format!("image {:?} must be [B, 3, H, W] with sides divisible by {f}", x.shape())));
        }
        let h = enc.forward(gpu, x, false)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(gpu, &h, None)?,
            None => h,
        };
        let &[b, c2, hh, ww] = moments.shape() else { return Err(Error::Shape("vae moments".into())) };
        let z = c2 / 2;
        let all = gpu.read(&moments).await?;
        let plane = z * hh * ww;
        let (mut mean, mut logvar) = (Vec::with_capacity(b * plane), Vec::with_capacity(b * plane));
        for i in 0..b {
            mean.extend_from_slice(&all[i * 2 * plane..i * 2 * plane + plane]);
            logvar.extend(all[i * 2 * plane + plane..(i + 1) * 2 * plane].iter().map(|v| v.clamp(-30.0, 20.0)));
        }
        Ok(LatentDist { shape: vec![b, z, hh, ww], mean, logvar })
    }
}
