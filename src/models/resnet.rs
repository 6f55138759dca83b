//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`.

use super::nn::{Conv2d, GroupNorm, Linear};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation};

/// How a resnet takes the time embedding (diffusers' `time_embedding_norm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimeEmbeddingNorm {
    /// `h + temb_proj(temb)` before `norm2` (Stable Diffusion).
    #[default]
    Default,
    /// `norm2(h) * (1 + scale) + shift` with `[scale, shift] = temb_proj(temb)` (the improved-DDPM
    /// "scale_shift" of some CompVis LDMs, e.g. the super-resolution model).
    ScaleShift,
}

impl TimeEmbeddingNorm {
    /// From the config value `resnet_time_scale_shift`.
    pub fn from_config(value: &str) -> Result<Self> {
        match value {
            "default" => Ok(Self::Default),
            "scale_shift" => Ok(Self::ScaleShift),
            other => Err(Error::Model(format!("unet config: resnet_time_scale_shift {other:?} is not supported (\"default\" and \"scale_shift\" are)"))),
        }
    }
}

/// Construction settings of a [`ResnetBlock2D`] besides its channels.
#[derive(Clone, Copy, Debug)]
pub struct ResnetOptions {
    /// `None` in the VAE, which has no time embedding.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f32,
    pub time_norm: TimeEmbeddingNorm,
    /// The block's output is divided by this (diffusers' `output_scale_factor`).
    pub output_scale_factor: f32,
}

impl ResnetOptions {
    /// A resnet without time embedding (the autoencoders').
    pub fn untimed(groups: usize, eps: f32) -> Self {
        Self { temb_channels: None, groups, eps, time_norm: TimeEmbeddingNorm::Default, output_scale_factor: 1.0 }
    }
}

/// The time embedding's projection: added to the features, or a scale and shift of them.
enum TimeProjection {
    Add(Linear),
    /// `scale` carries the `1 +` in its bias.
    ScaleShift { scale: Linear, shift: Linear },
}

/// `h = conv1(silu(norm1(x)))`, the time embedding added (or applied as scale and shift around
/// `norm2`), `out = (shortcut(x) + conv2(silu(norm2(h)))) / output_scale_factor`.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<TimeProjection>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f32,
    pub out_channels: usize,
}

impl ResnetBlock2D {
    /// `temb_channels` is `None` in the VAE, which has no time embedding.
    pub async fn load(w: &W<'_, '_>, cin: usize, cout: usize, temb_channels: Option<usize>, groups: usize, eps: f32) -> Result<Self> {
        let o = ResnetOptions { temb_channels, ..ResnetOptions::untimed(groups, eps) };
        Self::load_with(w, cin, cout, &o).await
    }

    /// Loads a resnet `cin -> cout` with every option.
    pub async fn load_with(w: &W<'_, '_>, cin: usize, cout: usize, o: &ResnetOptions) -> Result<Self> {
        let time_emb_proj = match (o.temb_channels, o.time_norm) {
            (None, _) => None,
            (Some(t), TimeEmbeddingNorm::Default) => Some(TimeProjection::Add(Linear::load(&w.sub("time_emb_proj"), t, cout, true).await?)),
            (Some(t), TimeEmbeddingNorm::ScaleShift) => {
                let p = w.sub("time_emb_proj");
                Some(TimeProjection::ScaleShift {
                    scale: Linear::load_rows(&p, t, 2 * cout, 0..cout, 1.0).await?,
                    shift: Linear::load_rows(&p, t, 2 * cout, cout..2 * cout, 0.0).await?,
                })
            }
        };
        let conv_shortcut = if cin != cout { Some(Conv2d::load(&w.sub("conv_shortcut"), cin, cout, 1, 1, 0).await?) } else { None };
        Ok(Self {
            norm1: GroupNorm::load(&w.sub("norm1"), o.groups, cin, o.eps).await?,
            conv1: Conv2d::load(&w.sub("conv1"), cin, cout, 3, 1, 1).await?,
            time_emb_proj,
            norm2: GroupNorm::load(&w.sub("norm2"), o.groups, cout, o.eps).await?,
            conv2: Conv2d::load(&w.sub("conv2"), cout, cout, 3, 1, 1).await?,
            conv_shortcut,
            output_scale_factor: o.output_scale_factor,
            out_channels: cout,
        })
    }

    /// `silu_temb` is `silu(temb)` `[B, temb_channels]`, shared by every block of a step.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu_temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(gpu, x, true)?;
        let h = self.conv1.forward(gpu, &h, None)?;
        let per_channel = |t: Tensor| t.reshape(&[t.dim(0), self.out_channels, 1, 1]);
        let h = match (&self.time_emb_proj, silu_temb) {
            (Some(TimeProjection::Add(proj)), Some(t)) => {
                let t = per_channel(proj.forward(gpu, t, Activation::None)?)?;
                self.norm2.forward(gpu, &ops::add(gpu, &h, &t)?, true)?
            }
            (Some(TimeProjection::ScaleShift { scale, shift }), Some(t)) => {
                let n = self.norm2.forward(gpu, &h, false)?;
                let n = ops::mul(gpu, &n, &per_channel(scale.forward(gpu, t, Activation::None)?)?)?;
                let n = ops::add(gpu, &n, &per_channel(shift.forward(gpu, t, Activation::None)?)?)?;
                ops::activation(gpu, &n, Activation::Silu)?
            }
            (Some(_), None) => return Err(Error::Shape("this resnet needs a time embedding".into())),
            (None, _) => self.norm2.forward(gpu, &h, true)?,
        };
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(gpu, x, None)?,
            None => x.clone(),
        };
        let out = self.conv2.forward(gpu, &h, Some(&shortcut))?;
        if self.output_scale_factor == 1.0 {
            return Ok(out);
        }
        ops::scale(gpu, &out, 1.0 / self.output_scale_factor, 0.0)
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

    /// Upsamples to `size` (height, width) when given (diffusers' `upsample_size`, for levels
    /// that did not halve evenly), else doubles.
    pub fn forward_to(&self, gpu: &Gpu, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let Some((h, w)) = size else { return self.forward(gpu, x) };
        let x = ops::layout::upsample_nearest(gpu, x, h, w)?;
        self.conv.forward(gpu, &x, None)
    }
}
