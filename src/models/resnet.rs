//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`.

use super::nn::{Conv2d, GroupNorm, Linear};
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation};

/// `h = conv1(silu(norm1(x))) + temb_proj(silu(temb)); out = shortcut(x) + conv2(silu(norm2(h)))`.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    pub out_channels: usize,
}

impl ResnetBlock2D {
    /// `temb_channels` is `None` in the VAE, which has no time embedding.
    pub async fn load(w: &W<'_, '_>, cin: usize, cout: usize, temb_channels: Option<usize>, groups: usize, eps: f32) -> Result<Self> {
        let time_emb_proj = match temb_channels {
            Some(t) => Some(Linear::load(&w.sub("time_emb_proj"), t, cout, true).await?),
            None => None,
        };
        let conv_shortcut = if cin != cout { Some(Conv2d::load(&w.sub("conv_shortcut"), cin, cout, 1, 1, 0).await?) } else { None };
        Ok(Self {
            norm1: GroupNorm::load(&w.sub("norm1"), groups, cin, eps).await?,
            conv1: Conv2d::load(&w.sub("conv1"), cin, cout, 3, 1, 1).await?,
            time_emb_proj,
            norm2: GroupNorm::load(&w.sub("norm2"), groups, cout, eps).await?,
            conv2: Conv2d::load(&w.sub("conv2"), cout, cout, 3, 1, 1).await?,
            conv_shortcut,
            out_channels: cout,
        })
    }

    /// `silu_temb` is `silu(temb)` `[B, temb_channels]`, shared by every block of a step.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu_temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(gpu, x, true)?;
        let mut h = self.conv1.forward(gpu, &h, None)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, silu_temb) {
            let t = proj.forward(gpu, t, Activation::None)?;
            let t = t.reshape(&[t.dim(0), self.out_channels, 1, 1])?;
            h = ops::add(gpu, &h, &t)?;
        }
        let h = self.norm2.forward(gpu, &h, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(gpu, x, None)?,
            None => x.clone(),
        };
        self.conv2.forward(gpu, &h, Some(&shortcut))
    }
}

/// Stride-2 3x3 convolution. The UNet pads 1 on every side; the VAE encoder pads only the
/// right and bottom edge (`padding=0` plus `F.pad(x, (0, 1, 0, 1))`).
pub struct Downsample2D {
    conv: Conv2d,
    pad_end_only: bool,
}

impl Downsample2D {
    /// Loads `conv` under `w`.
    pub async fn load(w: &W<'_, '_>, channels: usize, pad_end_only: bool) -> Result<Self> {
        let conv = Conv2d::load(&w.sub("conv"), channels, channels, 3, 2, if pad_end_only { 0 } else { 1 }).await?;
        Ok(Self { conv, pad_end_only })
    }
    /// Halves height and width.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        if !self.pad_end_only {
            return self.conv.forward(gpu, x, None);
        }
        let &[b, c, h, w] = x.shape() else { return self.conv.forward(gpu, x, None) };
        let dtype = x.dtype();
        let col = gpu.constant(&format!("zeros/{b}x{c}x{h}x1/{}", dtype.name()), &[b, c, h, 1], dtype, || vec![0.0; b * c * h])?;
        let x = ops::concat(gpu, &[x, &col], 3)?;
        let row = gpu.constant(&format!("zeros/{b}x{c}x1x{}/{}", w + 1, dtype.name()), &[b, c, 1, w + 1], dtype, || vec![0.0; b * c * (w + 1)])?;
        let x = ops::concat(gpu, &[&x, &row], 2)?;
        self.conv.forward(gpu, &x, None)
    }
}

/// Nearest-neighbour 2x upsampling then a 3x3 convolution.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads `conv` under `w`.
    pub async fn load(w: &W<'_, '_>, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(&w.sub("conv"), channels, channels, 3, 1, 1).await? })
    }
    /// Doubles height and width.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let x = ops::upsample_nearest2x(gpu, x)?;
        self.conv.forward(gpu, &x, None)
    }
}
