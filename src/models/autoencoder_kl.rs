//! `AutoencoderKL`: the VAE that maps images to Stable Diffusion's latents and back.

use serde::{Deserialize, Serialize};

use super::nn::Conv2d;
use super::vae::Coder;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
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
    /// The VAE overflows in f16: SDXL pipelines decode (and encode) with it in f32.
    pub force_upcast: bool,
    /// Per-channel latent statistics some SDXL-derived VAEs carry: latents are
    /// `(z - mean) * scaling_factor / std` instead of `z * scaling_factor`.
    pub latents_mean: Option<Vec<f32>>,
    pub latents_std: Option<Vec<f32>>,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3, out_channels: 3, down_block_types: vec!["DownEncoderBlock2D".into()], up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64], layers_per_block: 1, act_fn: "silu".into(), latent_channels: 4, norm_num_groups: 32,
            sample_size: 32, scaling_factor: 0.18215, shift_factor: None, use_quant_conv: true, use_post_quant_conv: true, mid_block_add_attention: true,
            force_upcast: true, latents_mean: None, latents_std: None,
        }
    }
}

impl AutoencoderKLConfig {
    /// Bytes of the decoder's largest activation for latents `[b, _, h, w]`, to decide whether the
    /// decode must be tiled: at each resolution, the wider of its block's channels and those
    /// upsampled into it from the block below.
    pub fn decode_peak_bytes(&self, b: usize, h: usize, w: usize, dtype: DType) -> u64 {
        let ch = &self.block_out_channels;
        let f = self.scale_factor();
        (0..ch.len())
            .map(|i| {
                let c = ch[i].max(ch.get(i + 1).copied().unwrap_or(0));
                let (sh, sw) = ((h * f) >> i, (w * f) >> i);
                dtype.bytes_for(&[b, c, sh.max(1), sw.max(1)])
            })
            .max()
            .unwrap_or(0)
    }

    /// The tile size in pixels for [`AutoencoderKL::decode_tiled`] whose activations fit `max_binding`
    /// bytes: diffusers' `sample_size` where it fits (SD 1.x's 512), else halved until it does
    /// (SDXL's 1024 at 1024x1024 in a browser's 128 MiB bindings: 256), never below 8 latents.
    pub fn tile_sample_size(&self, b: usize, dtype: DType, max_binding: u64) -> usize {
        let f = self.scale_factor();
        let mut tile = self.sample_size;
        while tile / f > 8 && self.decode_peak_bytes(b, tile / f, tile / f, dtype) > max_binding {
            tile /= 2;
        }
        tile
    }

    /// Refuses configs the decoder cannot run.
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [("latents_mean", &self.latents_mean), ("latents_std", &self.latents_std)] {
            if v.as_ref().is_some_and(|v| v.len() != self.latent_channels) {
                return Err(crate::Error::Model(format!("vae config: {k} needs {} values, one per latent channel", self.latent_channels)));
            }
        }
        super::vae::validate_coder("vae", &self.block_out_channels, &self.down_block_types, &self.up_block_types, &self.act_fn, self.norm_num_groups, self.layers_per_block)
    }
    /// Scaled latents (what the UNet sees) from VAE latents, per element of channel `c`.
    pub fn scale_latent(&self, z: f32, c: usize) -> f32 {
        match (&self.latents_mean, &self.latents_std) {
            (Some(m), Some(s)) => (z - m[c]) * self.scaling_factor / s[c],
            _ => z * self.scaling_factor,
        }
    }
    /// The inverse of [`Self::scale_latent`]: what the decoder takes.
    pub fn unscale_latent(&self, z: f32, c: usize) -> f32 {
        match (&self.latents_mean, &self.latents_std) {
            (Some(m), Some(s)) => z * s[c] / self.scaling_factor + m[c],
            _ => z / self.scaling_factor,
        }
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

    /// diffusers' `tiled_decode` (`enable_tiling`) with tiles of `tile_sample` pixels (diffusers:
    /// `sample_size`): latents `[b, c, h, w]` (already divided by `scaling_factor`) decoded in tiles
    /// of `tile_sample / f` latents every 3/4 of a tile, each blended into its upper and left
    /// neighbours over a quarter tile of pixels, so the decoder's activations are those of one
    /// tile whatever the image size.
    pub async fn decode_tiled(&self, gpu: &Gpu, z: &[f32], [b, c, h, w]: [usize; 4], dtype: DType, tile_sample: usize) -> Result<Vec<f32>> {
        let f = self.config.scale_factor();
        let tile_latent = tile_sample / f;
        if tile_latent == 0 {
            return Err(Error::Model(format!("a VAE tile of {tile_sample} pixels is smaller than the scale factor {f}; it cannot be tiled")));
        }
        let overlap = ((tile_latent as f64 * 0.75) as usize).max(1);
        let blend = (tile_sample as f64 * 0.25) as usize;
        let row_limit = tile_sample - blend;
        // Tiles `[b, 3, th, tw]` by grid position.
        let mut rows: Vec<Vec<(Vec<f32>, usize, usize)>> = Vec::new();
        for i in (0..h).step_by(overlap) {
            let mut row = Vec::new();
            for j in (0..w).step_by(overlap) {
                let (th, tw) = (tile_latent.min(h - i), tile_latent.min(w - j));
                let mut tile = Vec::with_capacity(b * c * th * tw);
                for bc in 0..b * c {
                    for y in i..i + th {
                        let at = (bc * h + y) * w + j;
                        tile.extend_from_slice(&z[at..at + tw]);
                    }
                }
                let t = gpu.upload(&[b, c, th, tw], dtype, &tile)?;
                let decoded = self.decode(gpu, &t)?;
                row.push((gpu.read(&decoded).await?, th * f, tw * f));
            }
            rows.push(row);
        }
        // Blend in place, in diffusers' order: each tile takes its (already blended) upper
        // neighbour's last rows, then its left neighbour's last columns.
        let (out_h, out_w) = (h * f, w * f);
        let mut out = vec![0f32; b * 3 * out_h * out_w];
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                let (mut tile, th, tw) = std::mem::take(&mut rows[i][j]);
                if i > 0 {
                    let (above, ah, aw) = &rows[i - 1][j];
                    let e = blend.min(*ah).min(th);
                    for p in 0..b * 3 {
                        for y in 0..e {
                            let (wa, wb) = ((1.0 - y as f64 / e as f64) as f32, (y as f64 / e as f64) as f32);
                            for x in 0..tw {
                                let a = above[(p * ah + ah - e + y) * aw + x];
                                let v = &mut tile[(p * th + y) * tw + x];
                                *v = a * wa + *v * wb;
                            }
                        }
                    }
                }
                if j > 0 {
                    let (left, lh, lw) = &rows[i][j - 1];
                    let e = blend.min(*lw).min(tw);
                    for p in 0..b * 3 {
                        for y in 0..th.min(*lh) {
                            for x in 0..e {
                                let (wa, wb) = ((1.0 - x as f64 / e as f64) as f32, (x as f64 / e as f64) as f32);
                                let a = left[(p * lh + y) * lw + lw - e + x];
                                let v = &mut tile[(p * th + y) * tw + x];
                                *v = a * wa + *v * wb;
                            }
                        }
                    }
                }
                // Each tile contributes its first `row_limit` rows and columns.
                let (y0, x0) = (i * overlap * f, j * overlap * f);
                for p in 0..b * 3 {
                    for y in 0..th.min(row_limit) {
                        for x in 0..tw.min(row_limit) {
                            let (oy, ox) = (y0 + y, x0 + x);
                            if oy < out_h && ox < out_w {
                                out[(p * out_h + oy) * out_w + ox] = tile[(p * th + y) * tw + x];
                            }
                        }
                    }
                }
                rows[i][j] = (tile, th, tw);
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> AutoencoderKLConfig {
        serde_json::from_str(json).expect("vae config")
    }

    /// The decode's largest activation and the tile size that fits a browser's 128 MiB binding.
    #[test]
    fn tiles_fit_the_binding_limit() {
        let sd = config(crate::bench::unet::SD15_VAE_CONFIG);
        let xl = config(crate::bench::unet::SDXL_VAE_CONFIG);
        const MIB: u64 = 1 << 20;
        // 256 channels upsampled to full resolution dominate: 512x512 f32 is 256 MiB.
        assert_eq!(sd.decode_peak_bytes(1, 64, 64, DType::F32), 256 * MIB);
        assert_eq!(sd.decode_peak_bytes(1, 64, 64, DType::F16), 128 * MIB);
        // SDXL in f32 at 1024x1024: 1 GiB whole, diffusers' 1024-pixel tiles are the whole image.
        assert_eq!(xl.decode_peak_bytes(1, 128, 128, DType::F32), 1024 * MIB);
        assert_eq!(xl.tile_sample_size(1, DType::F32, 128 * MIB), 256);
        assert!(xl.decode_peak_bytes(1, 32, 32, DType::F32) <= 128 * MIB);
        assert_eq!(xl.tile_sample_size(1, DType::F32, 4096 * MIB), 1024);
        assert_eq!(sd.tile_sample_size(1, DType::F16, 128 * MIB), 512);
        // Never below 8 latents, however small the limit.
        assert_eq!(xl.tile_sample_size(1, DType::F32, 1), 64);
    }
}
