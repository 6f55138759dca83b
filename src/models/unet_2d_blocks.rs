//! The UNets' down, mid and up blocks (diffusers' `unet_2d_blocks.py`): `CrossAttnDownBlock2D`,
//! `AttnDownBlock2D` and `DownBlock2D`; `UNetMidBlock2DCrossAttn` and `UNetMidBlock2D`;
//! `CrossAttnUpBlock2D`, `AttnUpBlock2D` and `UpBlock2D`. A block is its resnets, each followed
//! by an attention layer of the block's kind (or none), and its resampler. Also what both UNets
//! share around them: the timestep MLP and the body that strings the blocks together.

use super::nn::{Conv2d, GroupNorm, Linear};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetOptions, TimeEmbeddingNorm, Upsample2D};
use super::spatial_attention::SpatialSelfAttention;
use super::transformer_2d::Transformer2DModel;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, embedding::TimestepEmbedding, Activation};

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
    /// `Transformer2DModel` attending to the text (`CrossAttn*` blocks); `only_cross`: its
    /// self-attention is a second cross-attention.
    Cross { heads: usize, transformer_layers: usize, only_cross: bool },
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
            BlockAttention::Cross { heads, transformer_layers, only_cross } => {
                AttentionLayer::Cross(Transformer2DModel::load(w, channels, heads, transformer_layers, s.cross_attention_dim, s.groups, only_cross).await?)
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
                return Err(Error::Shape(format!("UNet skip state {:?} does not match {:?}", skip.shape(), h.shape())));
            }
            h = ops::concat(gpu, &[&h, &skip], 1)?;
            h = r.forward(gpu, &h, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(gpu, &h, context)?;
            }
        }
        if let Some(u) = &self.upsampler {
            // To the next skip state's size: a level of odd size (diffusers' upsample_size).
            let size = skips.last().map(|s| (s.dim(2), s.dim(3)));
            h = u.forward_to(gpu, &h, size)?;
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

/// diffusers' `Timesteps` + `TimestepEmbedding`: the sinusoidal embedding of a value per batch
/// item (a timestep, or a class label embedded like one), then `linear_2(silu(linear_1(.)))`;
/// with `cond_proj` (LCM's guidance embedding, `time_cond_proj_dim`) a projected condition is
/// added to the sinusoid first.
pub struct TimestepMlp {
    sinusoid: TimestepEmbedding,
    cond_proj: Option<Linear>,
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepMlp {
    /// Loads `linear_1` / `linear_2` under `w`: `dim` sinusoid channels to `temb`.
    pub async fn load(w: &W<'_, '_>, dim: usize, temb: usize, flip_sin_to_cos: bool, freq_shift: f32) -> Result<Self> {
        Self::load_with_condition(w, dim, temb, flip_sin_to_cos, freq_shift, None).await
    }

    /// As [`Self::load`], with `cond_proj` from `cond_dim` channels when given.
    pub async fn load_with_condition(w: &W<'_, '_>, dim: usize, temb: usize, flip_sin_to_cos: bool, freq_shift: f32, cond_dim: Option<usize>) -> Result<Self> {
        let cond_proj = match cond_dim {
            Some(c) => Some(Linear::load(&w.sub("cond_proj"), c, dim, false).await?),
            None => None,
        };
        Ok(Self {
            sinusoid: TimestepEmbedding { dim, flip_sin_to_cos, downscale_freq_shift: freq_shift, scale: 1.0, max_period: 10000.0 },
            cond_proj,
            linear_1: Linear::load(&w.sub("linear_1"), dim, temb, true).await?,
            linear_2: Linear::load(&w.sub("linear_2"), temb, temb, true).await?,
        })
    }

    /// `[B, temb]` for one value per batch item; `act` runs in `linear_2`'s epilogue.
    pub fn forward(&self, gpu: &Gpu, values: &[f32], dtype: DType, act: Activation) -> Result<Tensor> {
        self.forward_with(gpu, values, dtype, act, None)
    }

    /// As [`Self::forward`], adding `cond_proj(condition)` (`[B, cond_dim]`) to the sinusoid.
    pub fn forward_with(&self, gpu: &Gpu, values: &[f32], dtype: DType, act: Activation, condition: Option<&Tensor>) -> Result<Tensor> {
        let v = gpu.upload(&[values.len()], DType::F32, values)?;
        let mut s = ops::timestep_embedding(gpu, &v, &self.sinusoid, dtype)?;
        match (&self.cond_proj, condition) {
            (Some(p), Some(c)) => s = p.forward_residual(gpu, c, &s)?,
            (Some(_), None) => return Err(Error::Input("this UNet embeds a guidance scale (an LCM-distilled UNet, time_cond_proj_dim); none was given".into())),
            (None, _) => {}
        }
        let e = self.linear_1.forward(gpu, &s, Activation::Silu)?;
        self.linear_2.forward(gpu, &e, act)
    }

    /// The sinusoid width.
    pub fn dim(&self) -> usize {
        self.sinusoid.dim
    }
}

/// How to build a [`UNetBody`]: channels, resnets and attention per block, the mid block.
pub struct UNetBodyConfig<'a> {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: &'a [usize],
    /// Resnets per down block (the up block mirroring it has one more).
    pub layers_per_block: Vec<usize>,
    /// The attention after each resnet of down block `i`, and of up block `i`.
    pub down_attention: Vec<Option<BlockAttention>>,
    pub up_attention: Vec<Option<BlockAttention>>,
    /// `None`: no mid block; else its attention, the attention's input norm groups and the
    /// block's output scale factor.
    pub mid: Option<(Option<BlockAttention>, Option<usize>, f32)>,
    pub downsample_padding: usize,
    pub settings: BlockSettings,
}

/// What a ControlNet adds to a UNet: one tensor per skip state (in the order the down blocks
/// make them) and one to the mid block's output.
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// The contracting half of a UNet: `conv_in`, the down blocks, the mid block. A ControlNet is
/// this half plus its condition embedding and zero convolutions.
pub struct UNetEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock2D>,
    mid_block: Option<MidBlock2D>,
}

impl UNetEncoder {
    /// Loads the half under `w` with diffusers' channel bookkeeping.
    pub async fn load(w: &W<'_, '_>, c: &UNetBodyConfig<'_>) -> Result<Self> {
        let (ch, s) = (c.block_out_channels, &c.settings);
        let n = ch.len();
        let conv_in = Conv2d::load(&w.sub("conv_in"), c.in_channels, ch[0], 3, 1, 1).await?;
        let mut down_blocks = Vec::new();
        let mut cout = ch[0];
        for (i, &co) in ch.iter().enumerate() {
            let cin = cout;
            cout = co;
            down_blocks.push(DownBlock2D::load(&w.sub(format!("down_blocks.{i}")), cin, cout, c.layers_per_block[i], c.down_attention[i], i + 1 < n, c.downsample_padding, s).await?);
        }
        let mid_block = match c.mid {
            Some((attn, groups, scale)) => Some(MidBlock2D::load(&w.sub("mid_block"), ch[n - 1], attn, groups, scale, s).await?),
            None => None,
        };
        Ok(Self { conv_in, down_blocks, mid_block })
    }

    /// The mid block's output and every skip state; `added` is added to `conv_in`'s output (a
    /// ControlNet's condition embedding).
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu_emb: &Tensor, context: Option<&Tensor>, added: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut hs = self.conv_in.forward(gpu, x, None)?;
        if let Some(a) = added {
            hs = ops::add(gpu, &hs, a)?;
        }
        let mut skips = vec![hs.clone()];
        for block in &self.down_blocks {
            hs = block.forward(gpu, &hs, silu_emb, context, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            hs = mid.forward(gpu, &hs, silu_emb, context)?;
        }
        Ok((hs, skips))
    }
}

/// What both UNets are made of around their embeddings: `conv_in`, the down blocks, the mid
/// block, the up blocks fed the down blocks' skip states, group norm + SiLU, `conv_out`.
pub struct UNetBody {
    encoder: UNetEncoder,
    up_blocks: Vec<UpBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNetBody {
    /// Loads the body under `w` with diffusers' channel bookkeeping.
    pub async fn load(w: &W<'_, '_>, c: &UNetBodyConfig<'_>) -> Result<Self> {
        let (ch, s) = (c.block_out_channels, &c.settings);
        let n = ch.len();
        let encoder = UNetEncoder::load(w, c).await?;
        let mut up_blocks = Vec::new();
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut out = rev[0];
        for i in 0..n {
            let prev = out;
            out = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            up_blocks.push(UpBlock2D::load(&w.sub(format!("up_blocks.{i}")), cin, prev, out, c.layers_per_block[n - 1 - i] + 1, c.up_attention[i], i + 1 < n, s).await?);
        }
        Ok(Self {
            encoder,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.sub("conv_norm_out"), s.groups, ch[0], s.eps).await?,
            conv_out: Conv2d::load(&w.sub("conv_out"), ch[0], c.out_channels, 3, 1, 1).await?,
        })
    }

    /// The prediction for `x`, given `silu(temb)`, (cross-attention UNets) the text, and what
    /// ControlNets add (diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`).
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu_emb: &Tensor, context: Option<&Tensor>, residuals: Option<&Residuals>) -> Result<Tensor> {
        let (mut hs, mut skips) = self.encoder.forward(gpu, x, silu_emb, context, None)?;
        if let Some(r) = residuals {
            if r.down.len() != skips.len() {
                return Err(Error::Model(format!("the ControlNet gives {} residuals for the UNet's {} skip states; it was made for another UNet", r.down.len(), skips.len())));
            }
            for (s, d) in skips.iter_mut().zip(&r.down) {
                *s = ops::add(gpu, s, d)?;
            }
            hs = ops::add(gpu, &hs, &r.mid)?;
        }
        for block in &self.up_blocks {
            hs = block.forward(gpu, &hs, silu_emb, context, &mut skips)?;
        }
        let hs = self.conv_norm_out.forward(gpu, &hs, true)?;
        self.conv_out.forward(gpu, &hs, None)
    }
}
