//! The convolutional encoder and decoder the paper's autoencoders share (diffusers'
//! `autoencoders/vae.py`): `AutoencoderKL` and `VQModel` differ only around them.

use super::nn::{Conv2d, GroupNorm};
use super::spatial_attention::SpatialSelfAttention;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;

/// Checks the encoder/decoder half of an autoencoder's config (`what` names the component).
pub(crate) fn validate_coder(what: &str, block_out_channels: &[usize], down: &[String], up: &[String], act_fn: &str, groups: usize, layers: usize) -> Result<()> {
    let n = block_out_channels.len();
    if n == 0 || down.len() != n || up.len() != n {
        return Err(Error::Model(format!("{what} config has {n} block_out_channels, {} down and {} up block types; they must match", down.len(), up.len())));
    }
    if down.iter().any(|t| t != "DownEncoderBlock2D") || up.iter().any(|t| t != "UpDecoderBlock2D") || act_fn != "silu" {
        return Err(Error::Model(format!("{what} config: only DownEncoderBlock2D / UpDecoderBlock2D with silu are supported")));
    }
    if groups == 0 || block_out_channels.iter().any(|c| c % groups != 0) || layers == 0 {
        return Err(Error::Model(format!("{what} config: channels {block_out_channels:?} do not divide into {groups} groups")));
    }
    Ok(())
}

/// Image pixels per latent pixel along each side: one 2x resampling between consecutive blocks.
pub(crate) fn scale_factor(block_out_channels: &[usize]) -> usize {
    1 << block_out_channels.len().saturating_sub(1)
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
struct VaeMidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialSelfAttention>,
    resnet1: ResnetBlock2D,
}

impl VaeMidBlock {
    async fn load(w: &W<'_, '_>, c: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock2D::load(&w.sub("resnets.0"), c, c, None, groups, 1e-6).await?,
            // One head over all channels, as diffusers' `attention_head_dim=in_channels`.
            attention: if attention { Some(SpatialSelfAttention::load(&w.sub("attentions.0"), c, 1, c, Some(groups), 1e-6, 1.0).await?) } else { None },
            resnet1: ResnetBlock2D::load(&w.sub("resnets.1"), c, c, None, groups, 1e-6).await?,
        })
    }
    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(gpu, x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(gpu, &h)?;
        }
        self.resnet1.forward(gpu, &h, None)
    }
}

pub(crate) struct CoderBlock {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

impl CoderBlock {
    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(gpu, &h, None)?;
        }
        if let Some(d) = &self.down {
            h = d.forward(gpu, &h)?;
        }
        if let Some(u) = &self.up {
            h = u.forward(gpu, &h)?;
        }
        Ok(h)
    }
}

/// diffusers' `Encoder` / `Decoder` (`autoencoders/vae.py`): conv in, resnet blocks with down- or
/// upsampling, a mid block with attention, group norm + SiLU, conv out.
pub(crate) struct Coder {
    conv_in: Conv2d,
    blocks: Vec<CoderBlock>,
    mid: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Coder {
    /// `mid_first`: the decoder runs its mid block before the up blocks, the encoder after.
    pub(crate) fn forward(&self, gpu: &Gpu, x: &Tensor, mid_first: bool) -> Result<Tensor> {
        let mut h = self.conv_in.forward(gpu, x, None)?;
        if mid_first {
            h = self.mid.forward(gpu, &h)?;
        }
        for b in &self.blocks {
            h = b.forward(gpu, &h)?;
        }
        if !mid_first {
            h = self.mid.forward(gpu, &h)?;
        }
        let h = self.conv_norm_out.forward(gpu, &h, true)?;
        self.conv_out.forward(gpu, &h, None)
    }
}


impl Coder {
    /// diffusers' `Encoder` (`double_z` decides `out_channels` at the caller).
    pub(crate) async fn encoder(e: &W<'_, '_>, in_channels: usize, ch: &[usize], layers: usize, groups: usize, out_channels: usize, mid_attention: bool) -> Result<Self> {
        let n = ch.len();
        let mut blocks = Vec::new();
        let mut cout = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let cin = cout;
            cout = c;
            let b = e.sub(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..layers {
                resnets.push(ResnetBlock2D::load(&b.sub(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, None, groups, 1e-6).await?);
            }
            let down = if i + 1 < n { Some(Downsample2D::load(&b.sub("downsamplers.0"), cout, true).await?) } else { None };
            blocks.push(CoderBlock { resnets, down, up: None });
        }
        Ok(Coder {
            conv_in: Conv2d::load(&e.sub("conv_in"), in_channels, ch[0], 3, 1, 1).await?,
            blocks,
            mid: VaeMidBlock::load(&e.sub("mid_block"), ch[n - 1], groups, mid_attention).await?,
            conv_norm_out: GroupNorm::load(&e.sub("conv_norm_out"), groups, ch[n - 1], 1e-6).await?,
            conv_out: Conv2d::load(&e.sub("conv_out"), ch[n - 1], out_channels, 3, 1, 1).await?,
        })
    }

    /// diffusers' `Decoder` with group norms (`norm_type="group"`).
    pub(crate) async fn decoder(d: &W<'_, '_>, in_channels: usize, out_channels: usize, ch: &[usize], layers: usize, groups: usize, mid_attention: bool) -> Result<Self> {
        let n = ch.len();
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut cout = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let cin = cout;
            cout = c;
            let b = d.sub(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..=layers {
                resnets.push(ResnetBlock2D::load(&b.sub(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, None, groups, 1e-6).await?);
            }
            let up = if i + 1 < n { Some(Upsample2D::load(&b.sub("upsamplers.0"), cout).await?) } else { None };
            blocks.push(CoderBlock { resnets, down: None, up });
        }
        Ok(Coder {
            conv_in: Conv2d::load(&d.sub("conv_in"), in_channels, rev[0], 3, 1, 1).await?,
            blocks,
            mid: VaeMidBlock::load(&d.sub("mid_block"), rev[0], groups, mid_attention).await?,
            conv_norm_out: GroupNorm::load(&d.sub("conv_norm_out"), groups, ch[0], 1e-6).await?,
            conv_out: Conv2d::load(&d.sub("conv_out"), ch[0], out_channels, 3, 1, 1).await?,
        })
    }
}
