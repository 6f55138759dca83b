//! `ControlNetModel` (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
//! Models"): a trainable copy of the UNet's contracting half, fed the latents plus an embedding
//! of the condition image, whose skip states and mid output pass through zero-initialised 1x1
//! convolutions and are added to the frozen UNet's.
//!
//! residual_i = zero_conv_i(h_i),  h = encoder(conv_in(x) + cond_embedding(c), t, text)

use serde::Deserialize;

use super::nn::Conv2d;
use super::unet_2d_blocks::{Residuals, UNetEncoder};
use super::unet_2d_condition::{StepConditions, UNet2DConditionConfig, UNetEmbeddings};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation};

/// `controlnet/config.json`: the UNet keys it shares (down blocks, attention, embeddings) and
/// its own; unknown keys are ignored, missing ones take diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
    #[serde(default = "default_conditioning_channels")]
    pub conditioning_channels: usize,
    #[serde(default = "default_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default)]
    pub global_pool_conditions: bool,
    #[serde(default = "default_channel_order")]
    pub controlnet_conditioning_channel_order: String,
}

fn default_conditioning_channels() -> usize {
    3
}
fn default_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn default_channel_order() -> String {
    "rgb".into()
}

impl ControlNetConfig {
    /// Parses `config.json`, checking what this implementation runs.
    pub fn from_json(text: &str) -> Result<Self> {
        let mut c: ControlNetConfig = serde_json::from_str(text).map_err(|e| Error::Model(format!("controlnet config.json: {e}")))?;
        // A ControlNet has no up blocks: give the shared validation the mirror of the down ones.
        c.unet.up_block_types = c.unet.down_block_types.iter().rev().map(|t| t.replace("Down", "Up")).collect();
        c.validate()?;
        Ok(c)
    }

    /// Refuses configs this implementation does not run.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        c.unet.validate()?;
        if c.conditioning_channels != 3 {
            return Err(Error::Unsupported(format!("controlnet config: conditioning_channels {} (RGB condition images, 3, are supported)", c.conditioning_channels)));
        }
        if c.global_pool_conditions {
            return Err(Error::Unsupported("ControlNets with global_pool_conditions (shuffle) are not supported yet".into()));
        }
        if c.conditioning_embedding_out_channels.is_empty() {
            return Err(Error::Model("controlnet config: conditioning_embedding_out_channels is empty".into()));
        }
        if c.controlnet_conditioning_channel_order != "rgb" && c.controlnet_conditioning_channel_order != "bgr" {
            return Err(Error::Model(format!("controlnet config: controlnet_conditioning_channel_order {:?} (rgb or bgr)", c.controlnet_conditioning_channel_order)));
        }
        Ok(())
    }

    /// How much smaller the condition embedding is than the condition image: it must be the
    /// VAE's factor.
    pub fn condition_downscale(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }
}

/// `ControlNetConditioningEmbedding`: conv + SiLU, then per level a conv and a stride-2 conv
/// (each + SiLU), then a zero-initialised conv to the UNet's first block width.
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    async fn load(w: &W<'_, '_>, cin: usize, ch: &[usize], cout: usize) -> Result<Self> {
        let conv_in = Conv2d::load(&w.sub("conv_in"), cin, ch[0], 3, 1, 1).await?;
        let mut blocks = Vec::new();
        for i in 0..ch.len() - 1 {
            blocks.push(Conv2d::load(&w.sub(format!("blocks.{}", 2 * i)), ch[i], ch[i], 3, 1, 1).await?);
            blocks.push(Conv2d::load(&w.sub(format!("blocks.{}", 2 * i + 1)), ch[i], ch[i + 1], 3, 2, 1).await?);
        }
        let conv_out = Conv2d::load(&w.sub("conv_out"), ch[ch.len() - 1], cout, 3, 1, 1).await?;
        Ok(Self { conv_in, blocks, conv_out })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = ops::activation(gpu, &self.conv_in.forward(gpu, x, None)?, Activation::Silu)?;
        for b in &self.blocks {
            h = ops::activation(gpu, &b.forward(gpu, &h, None)?, Activation::Silu)?;
        }
        self.conv_out.forward(gpu, &h, None)
    }
}

/// `ControlNetModel`.
pub struct ControlNetModel {
    pub config: ControlNetConfig,
    embeddings: UNetEmbeddings,
    cond_embedding: ConditioningEmbedding,
    encoder: UNetEncoder,
    down_zero_convs: Vec<Conv2d>,
    mid_zero_conv: Conv2d,
}

impl ControlNetModel {
    /// Builds the model from `config`, reading weights under `w` (diffusers' names).
    pub async fn load(w: &W<'_, '_>, config: ControlNetConfig) -> Result<Self> {
        config.validate()?;
        let u = &config.unet;
        let ch = &u.block_out_channels;
        let embeddings = UNetEmbeddings::load(w, u).await?;
        let cond_embedding = ConditioningEmbedding::load(&w.sub("controlnet_cond_embedding"), config.conditioning_channels, &config.conditioning_embedding_out_channels, ch[0]).await?;
        let encoder = UNetEncoder::load(w, &u.body_config()).await?;
        // One zero conv per skip state: conv_in's, each resnet's, each downsampler's.
        let mut widths = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, u.layers_per_block.get(i)));
            if i + 1 < ch.len() {
                widths.push(c);
            }
        }
        let mut down_zero_convs = Vec::new();
        for (i, &c) in widths.iter().enumerate() {
            down_zero_convs.push(Conv2d::load(&w.sub(format!("controlnet_down_blocks.{i}")), c, c, 1, 1, 0).await?);
        }
        let last = ch[ch.len() - 1];
        let mid_zero_conv = Conv2d::load(&w.sub("controlnet_mid_block"), last, last, 1, 1, 0).await?;
        Ok(Self { config, embeddings, cond_embedding, encoder, down_zero_convs, mid_zero_conv })
    }

    /// The condition image's embedding, `[1, C, H / f, W / f]`, for an RGB image `[3, H, W]` in
    /// [0, 1] (flipped to BGR here for `bgr` models). Constant over a generation: computed once.
    pub fn embed_condition(&self, gpu: &Gpu, image: &[f32], width: usize, height: usize, dtype: crate::gpu::DType) -> Result<Tensor> {
        let plane = width * height;
        if image.len() != 3 * plane {
            return Err(Error::Input(format!("the condition image has {} values for 3x{height}x{width}", image.len())));
        }
        let data: Vec<f32> = if self.config.controlnet_conditioning_channel_order == "bgr" {
            image.chunks(plane).rev().flatten().copied().collect()
        } else {
            image.to_vec()
        };
        let x = gpu.upload(&[1, 3, height, width], dtype, &data)?;
        self.cond_embedding.forward(gpu, &x)
    }

    /// The residuals for latents `[B, C, h, w]` at `timestep` with text `[B, L, D]` and a
    /// condition embedding from [`Self::embed_condition`] (broadcast over the batch), scaled by
    /// `scale`; in guess mode by `logspace(-1, 0)` over the skip states times `scale`. `c`: the
    /// step's added conditions (SDXL ControlNets embed them as the UNet does).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&self, gpu: &Gpu, sample: &Tensor, timestep: f32, context: &Tensor, condition: &Tensor, scale: f32, guess_mode: bool, c: &StepConditions) -> Result<Residuals> {
        let b = sample.dim(0);
        if condition.shape()[2..] != sample.shape()[2..] {
            return Err(Error::Input(format!("the condition image embeds to {:?}, the latents are {:?}: the ControlNet's condition scale does not match the VAE's", &condition.shape()[2..], &sample.shape()[2..])));
        }
        let silu_emb = self.embeddings.forward(gpu, b, timestep, sample.dtype(), c)?;
        let (hs, skips) = self.encoder.forward(gpu, sample, &silu_emb, Some(context), Some(condition))?;
        let n = skips.len();
        // diffusers' guess mode: torch.logspace(-1, 0, n + 1), in f32.
        let weight = |i: usize| if guess_mode && !self.config.global_pool_conditions { scale * 10f32.powf(-1.0 + i as f32 / n as f32) } else { scale };
        let mut down = Vec::with_capacity(n);
        for (i, (s, conv)) in skips.iter().zip(&self.down_zero_convs).enumerate() {
            down.push(ops::scale(gpu, &conv.forward(gpu, s, None)?, weight(i), 0.0)?);
        }
        let mid = ops::scale(gpu, &self.mid_zero_conv.forward(gpu, &hs, None)?, weight(n), 0.0)?;
        Ok(Residuals { down, mid })
    }
}
