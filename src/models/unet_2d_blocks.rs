//! The UNet's down, mid and up blocks (diffusers' `unet_2d_blocks.py`): `CrossAttnDownBlock2D` /
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`; a block without
//! attentions is the plain variant.

use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::transformer_2d::Transformer2DModel;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops;

/// Settings shared by every block of one UNet.
#[derive(Clone, Copy, Debug)]
pub struct BlockSettings {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f32,
    pub cross_attention_dim: usize,
}

/// Cross-attention settings of one block: heads and transformer layers, or none.
#[derive(Clone, Copy, Debug)]
pub struct BlockAttention {
    pub heads: usize,
    pub transformer_layers: usize,
}

async fn load_attention(w: &W<'_, '_>, i: usize, channels: usize, attn: BlockAttention, s: &BlockSettings) -> Result<Transformer2DModel> {
    Transformer2DModel::load(&w.sub(format!("attentions.{i}")), channels, attn.heads, attn.transformer_layers, s.cross_attention_dim, s.groups).await
}

/// A down block: resnets (each followed by a transformer when cross-attention is on), then an
/// optional stride-2 downsampler. Every intermediate output is kept for the skip connections.
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// Loads `layers` resnets `cin -> cout`.
    pub async fn load(w: &W<'_, '_>, cin: usize, cout: usize, layers: usize, attn: Option<BlockAttention>, downsample: bool, s: &BlockSettings) -> Result<Self> {
        let (mut resnets, mut attentions) = (Vec::new(), Vec::new());
        for i in 0..layers {
            let c = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::load(&w.sub(format!("resnets.{i}")), c, cout, Some(s.temb_channels), s.groups, s.eps).await?);
            if let Some(a) = attn {
                attentions.push(load_attention(w, i, cout, a, s).await?);
            }
        }
        let downsampler = if downsample { Some(Downsample2D::load(&w.sub("downsamplers.0"), cout, false).await?) } else { None };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and appends every skip state to `skips`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(gpu, &h, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(gpu, &h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(gpu, &h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer.
pub struct MidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock2DCrossAttn {
    /// Loads a mid block on `channels` with one attention layer.
    pub async fn load(w: &W<'_, '_>, channels: usize, attn: BlockAttention, s: &BlockSettings) -> Result<Self> {
        let mut resnets = vec![ResnetBlock2D::load(&w.sub("resnets.0"), channels, channels, Some(s.temb_channels), s.groups, s.eps).await?];
        let attentions = vec![load_attention(w, 0, channels, attn, s).await?];
        resnets.push(ResnetBlock2D::load(&w.sub("resnets.1"), channels, channels, Some(s.temb_channels), s.groups, s.eps).await?);
        Ok(Self { resnets, attentions })
    }

    /// Runs the block.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(gpu, x, Some(temb))?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = a.forward(gpu, &h, context)?;
            h = r.forward(gpu, &h, Some(temb))?;
        }
        Ok(h)
    }
}

/// An up block: each resnet takes the previous output concatenated with a skip state; optional
/// transformers; then an optional 2x upsampler.
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    /// diffusers' channel bookkeeping: resnet `i` takes `prev_output` (first) or `cout`, plus
    /// `cin` (last) or `cout` skip channels.
    #[allow(clippy::too_many_arguments)]
    pub async fn load(w: &W<'_, '_>, cin: usize, prev_output: usize, cout: usize, layers: usize, attn: Option<BlockAttention>, upsample: bool, s: &BlockSettings) -> Result<Self> {
        let (mut resnets, mut attentions) = (Vec::new(), Vec::new());
        for i in 0..layers {
            let skip = if i == layers - 1 { cin } else { cout };
            let c = if i == 0 { prev_output } else { cout };
            resnets.push(ResnetBlock2D::load(&w.sub(format!("resnets.{i}")), c + skip, cout, Some(s.temb_channels), s.groups, s.eps).await?);
            if let Some(a) = attn {
                attentions.push(load_attention(w, i, cout, a, s).await?);
            }
        }
        let upsampler = if upsample { Some(Upsample2D::load(&w.sub("upsamplers.0"), cout).await?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Consumes skip states from the end of `skips`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| Error::Shape("UNet ran out of skip connections".into()))?;
            if skip.shape()[2..] != h.shape()[2..] {
                return Err(Error::Input(format!("latent size {:?} does not divide evenly through the UNet's downsampling; use a width and height divisible by a larger power of two", h.shape())));
            }
            h = ops::concat(gpu, &[&h, &skip], 1)?;
            h = r.forward(gpu, &h, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(gpu, &h, context)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(gpu, &h)?;
        }
        Ok(h)
    }
}
