//! `VQModel`: the latent diffusion paper's vector-quantised autoencoder (the first stage of the
//! CompVis LDMs). Decoding snaps each latent pixel to its nearest codebook vector, then runs the
//! same convolutional decoder as `AutoencoderKL`.

use serde::Deserialize;

use super::nn::Conv2d;
use super::vae::Coder;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;

/// `vqvae/config.json`; unknown keys ignored, missing ones take diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VQModelConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub sample_size: usize,
    pub num_vq_embeddings: usize,
    pub norm_num_groups: usize,
    pub vq_embed_dim: Option<usize>,
    pub scaling_factor: f32,
    pub norm_type: String,
    pub mid_block_add_attention: bool,
    pub lookup_from_codebook: bool,
    pub force_upcast: bool,
}

impl Default for VQModelConfig {
    fn default() -> Self {
        Self {
            in_channels: 3, out_channels: 3, down_block_types: vec!["DownEncoderBlock2D".into()], up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64], layers_per_block: 1, act_fn: "silu".into(), latent_channels: 3, sample_size: 32, num_vq_embeddings: 256,
            norm_num_groups: 32, vq_embed_dim: None, scaling_factor: 0.18215, norm_type: "group".into(), mid_block_add_attention: true,
            lookup_from_codebook: false, force_upcast: false,
        }
    }
}

impl VQModelConfig {
    /// Refuses configs the decoder cannot run.
    pub fn validate(&self) -> Result<()> {
        super::vae::validate_coder("vqvae", &self.block_out_channels, &self.down_block_types, &self.up_block_types, &self.act_fn, self.norm_num_groups, self.layers_per_block)?;
        if self.norm_type != "group" {
            return Err(Error::Model(format!("vqvae config: norm_type {:?} (MoVQ's spatial norm) is not supported; the CompVis LDMs use \"group\"", self.norm_type)));
        }
        if self.lookup_from_codebook {
            return Err(Error::Model("vqvae config: lookup_from_codebook (latents given as code indices) is not supported".into()));
        }
        if self.num_vq_embeddings == 0 {
            return Err(Error::Model("vqvae config: num_vq_embeddings is 0; the codebook needs at least one vector".into()));
        }
        Ok(())
    }
    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        super::vae::scale_factor(&self.block_out_channels)
    }
    /// Channels of a codebook vector.
    pub fn embed_dim(&self) -> usize {
        self.vq_embed_dim.unwrap_or(self.latent_channels)
    }
}

/// `VQModel`: the decoder, and the encoder when loaded with it.
pub struct VQModel {
    pub config: VQModelConfig,
    /// `[num_vq_embeddings, embed_dim]`, kept on the CPU: quantising is a nearest-neighbour search
    /// over a few thousand short vectors per latent pixel.
    codebook: Vec<f32>,
    /// The encoder and its `quant_conv`.
    encoder: Option<(Coder, Conv2d)>,
    post_quant_conv: Conv2d,
    decoder: Coder,
}

impl VQModel {
    /// Loads the codebook and the decoder, and the encoder when `with_encoder` (the
    /// unconditional models never encode).
    pub async fn load(w: &W<'_, '_>, config: VQModelConfig, with_encoder: bool) -> Result<Self> {
        config.validate()?;
        let (d, z) = (config.embed_dim(), config.latent_channels);
        let codebook = w.read_f32("quantize.embedding.weight", &[config.num_vq_embeddings, d]).await?;
        let post_quant_conv = Conv2d::load(&w.sub("post_quant_conv"), d, z, 1, 1, 0).await?;
        let c = &config;
        let encoder = if with_encoder {
            let e = Coder::encoder(&w.sub("encoder"), c.in_channels, &c.block_out_channels, c.layers_per_block, c.norm_num_groups, z, c.mid_block_add_attention).await?;
            Some((e, Conv2d::load(&w.sub("quant_conv"), z, d, 1, 1, 0).await?))
        } else {
            None
        };
        let decoder = Coder::decoder(&w.sub("decoder"), z, c.out_channels, &c.block_out_channels, c.layers_per_block, c.norm_num_groups, c.mid_block_add_attention).await?;
        Ok(Self { config, codebook, encoder, post_quant_conv, decoder })
    }

    /// `VQModel.encode(x).latents`: images in [-1, 1] `[B, in_channels, H, W]` to latents after
    /// `quant_conv`, not yet quantised (decoding quantises).
    pub fn encode(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (enc, quant_conv) = self.encoder.as_ref().ok_or_else(|| Error::Unsupported("this VQModel was loaded without its encoder".into()))?;
        let f = self.config.scale_factor();
        if x.shape().len() != 4 || x.dim(1) != self.config.in_channels || !x.dim(2).is_multiple_of(f) || !x.dim(3).is_multiple_of(f) {
            return Err(Error::Input(format!("image {:?} must be [B, {}, H, W] with sides divisible by {f}", x.shape(), self.config.in_channels)));
        }
        let h = enc.forward(gpu, x, false)?;
        quant_conv.forward(gpu, &h, None)
    }

    /// `VectorQuantizer`: each pixel of `latents` (`[B, D, H, W]`) replaced by its nearest codebook
    /// vector (first one on ties, as `argmin`), written as diffusers does (`z + (z_q - z)`, which
    /// rounds like it). Returns the quantised latents and the code of each pixel.
    pub fn quantize(&self, latents: &[f32], shape: [usize; 4]) -> Result<(Vec<f32>, Vec<u32>)> {
        let [b, d, h, w] = shape;
        if d != self.config.embed_dim() || latents.len() != b * d * h * w {
            return Err(Error::Shape(format!("vqvae quantize: latents {shape:?} ({} values), codebook vectors of {}", latents.len(), self.config.embed_dim())));
        }
        let hw = h * w;
        let mut out = vec![0f32; latents.len()];
        let mut codes = Vec::with_capacity(b * hw);
        for bi in 0..b {
            for p in 0..hw {
                let at = |c: usize| latents[(bi * d + c) * hw + p];
                let mut best = (f64::INFINITY, 0usize);
                for (k, e) in self.codebook.chunks_exact(d).enumerate() {
                    let dist: f64 = e.iter().enumerate().map(|(c, &v)| (at(c) as f64 - v as f64).powi(2)).sum();
                    if dist < best.0 {
                        best = (dist, k);
                    }
                }
                let e = &self.codebook[best.1 * d..(best.1 + 1) * d];
                for c in 0..d {
                    let z = at(c);
                    out[(bi * d + c) * hw + p] = z + (e[c] - z);
                }
                codes.push(best.1 as u32);
            }
        }
        Ok((out, codes))
    }

    /// `VQModel.decode(h, force_not_quantize)`: images in [-1, 1], `[B, out_channels, H*f, W*f]`.
    pub fn decode(&self, gpu: &Gpu, latents: &[f32], shape: [usize; 4], force_not_quantize: bool, dtype: crate::gpu::DType) -> Result<Tensor> {
        let quant = if force_not_quantize { latents.to_vec() } else { self.quantize(latents, shape)?.0 };
        let x = gpu.upload(&shape, dtype, &quant)?;
        let x = self.post_quant_conv.forward(gpu, &x, None)?;
        self.decoder.forward(gpu, &x, true)
    }
}
