//! The UNets' down, mid and up blocks (diffusers' `unet_2d_blocks.py`): `CrossAttnDownBlock2D`,
//! `AttnDownBlock2D` and `DownBlock2D`; `UNetMidBlock2DCrossAttn` and `UNetMidBlock2D`;
//! `CrossAttnUpBlock2D`, `AttnUpBlock2D` and `UpBlock2D`. A block is its resnets, each followed
//! by an attention layer of the block's kind (or none), and its resampler.

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetOptions, TimeEmbeddingNorm, Upsample2D};
use super::spatial_attention::SpatialSelfAttention;
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
    /// Text embedding width (`UNet2DConditionModel`; unused by self-attention blocks).
    pub cross_attention_dim: usize,
    pub time_norm: TimeEmbeddingNorm,
}

impl BlockSettings {
    fn resnet(&self, output_scale_factor: f32) -> ResnetOptions {
        ResnetOptions { temb_channels: Some(self.temb_channels), groups: self.groups, eps: self.eps, time_norm: self.time_norm, output_scale_factor }
    }
}

/// The attention after each resnet of a block.
#[derive(Clone, Copy, Debug)]
pub enum BlockAttention {
    /// `Transformer2DModel` attending to the text (`CrossAttn*` blocks).
    Cross { heads: usize, transformer_layers: usize },
    /// Self-attention with heads of `head_dim` channels (`Attn*` blocks of `UNet2DModel`).
    SelfAttention { head_dim: usize },
}

enum AttentionLayer {
    Cross(Transformer2DModel),
    SelfAttention(SpatialSelfAttention),
}

impl AttentionLayer {
    /// `groups`: the self-attention's input norm (`None`: none); `rescale`: its output divisor.
    async fn load(w: &W<'_, '_>, channels: usize, kind: BlockAttention, s: &BlockSettings, groups: Option<usize>, rescale: f32) -> Result<Self> {
        Ok(match kind {
            BlockAttention::Cross { heads, transformer_layers } => {
                AttentionLayer::Cross(Transformer2DModel::load(w, channels, heads, transformer_layers, s.cross_attention_dim, s.groups).await?)
            }
            BlockAttention::SelfAttention { head_dim } => {
                AttentionLayer::SelfAttention(SpatialSelfAttention::load(w, channels, channels / head_dim.max(1), head_dim, groups, s.eps, rescale).await?)
            }
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        match self {
            AttentionLayer::Cross(t) => t.forward(gpu, x, context.ok_or_else(|| Error::Shape("cross-attention blocks need text embeddings".into()))?),
            AttentionLayer::SelfAttention(a) => a.forward(gpu, x),
        }
    }
}

/// A down block: resnets (each followed by its attention, if any), then an optional stride-2
/// downsampler. Every intermediate output is kept for the skip connections.
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttentionLayer>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// Loads `layers` resnets `cin -> cout`; `downsample_padding` 0 pads only the right and
    /// bottom edge, as diffusers' `Downsample2D`.
    #[allow(clippy::too_many_arguments)]
    pub async fn load(w: &W<'_, '_>, cin: usize, cout: usize, layers: usize, attn: Option<BlockAttention>, downsample: bool, downsample_padding: usize, s: &BlockSettings) -> Result<Self> {
        let (mut resnets, mut attentions) = (Vec::new(), Vec::new());
        for i in 0..layers {
            let c = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::load_with(&w.sub(format!("resnets.{i}")), c, cout, &s.resnet(1.0)).await?);
            if let Some(a) = attn {
                attentions.push(AttentionLayer::load(&w.sub(format!("attentions.{i}")), cout, a, s, Some(s.groups), 1.0).await?);
            }
        }
        let downsampler = if downsample { Some(Downsample2D::load(&w.sub("downsamplers.0"), cout, downsample_padding == 0).await?) } else { None };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and appends every skip state to `skips`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: Option<&Tensor>, skips: &mut Vec<Tensor>) -> Result<Tensor> {
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

/// `UNetMidBlock2DCrossAttn` / `UNetMidBlock2D`: resnet, then (attention, resnet).
pub struct MidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttentionLayer>,
}

impl MidBlock2D {
    /// A mid block on `channels`; `attn: None` is `add_attention=False`. `attn_groups` is the
    /// self-attention's input norm (diffusers: the resnet groups with default time embedding,
    /// none with scale-shift, unless `attn_norm_num_groups` says otherwise). `output_scale_factor`
    /// is the config's `mid_block_scale_factor`.
    pub async fn load(w: &W<'_, '_>, channels: usize, attn: Option<BlockAttention>, attn_groups: Option<usize>, output_scale_factor: f32, s: &BlockSettings) -> Result<Self> {
        let o = s.resnet(output_scale_factor);
        let mut resnets = vec![ResnetBlock2D::load_with(&w.sub("resnets.0"), channels, channels, &o).await?];
        let mut attentions = Vec::new();
        if let Some(a) = attn {
            attentions.push(AttentionLayer::load(&w.sub("attentions.0"), channels, a, s, attn_groups, output_scale_factor).await?);
        }
        resnets.push(ResnetBlock2D::load_with(&w.sub("resnets.1"), channels, channels, &o).await?);
        Ok(Self { resnets, attentions })
    }

    /// Runs the block.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(gpu, x, Some(temb))?;
        if let Some(a) = self.attentions.first() {
            h = a.forward(gpu, &h, context)?;
        }
        self.resnets[1].forward(gpu, &h, Some(temb))
    }
}

/// An up block: each resnet takes the previous output concatenated with a skip state, then its
/// attention (if any); then an optional 2x upsampler.
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttentionLayer>,
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
            resnets.push(ResnetBlock2D::load_with(&w.sub(format!("resnets.{i}")), c + skip, cout, &s.resnet(1.0)).await?);
            if let Some(a) = attn {
                attentions.push(AttentionLayer::load(&w.sub(format!("attentions.{i}")), cout, a, s, Some(s.groups), 1.0).await?);
            }
        }
        let upsampler = if upsample { Some(Upsample2D::load(&w.sub("upsamplers.0"), cout).await?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Consumes skip states from the end of `skips`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: Option<&Tensor>, skips: &mut Vec<Tensor>) -> Result<Tensor> {
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

/// The block kinds a config names, as (has attention, is cross-attention).
pub fn block_kind(name: &str) -> Option<(bool, bool)> {
    match name {
        "DownBlock2D" | "UpBlock2D" => Some((false, false)),
        "AttnDownBlock2D" | "AttnUpBlock2D" => Some((true, false)),
        "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Some((true, true)),
        _ => None,
    }
}
