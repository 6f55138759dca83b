//! diffusers' `Attention` as the autoencoders' mid blocks and the `Attn*Block2D` UNet blocks use
//! it (`_from_deprecated_attn_block`): multi-head self-attention over the pixels of a feature
//! map, `(x + to_out(attention(q, k, v of group_norm(x)))) / rescale_output_factor`.

use super::nn::{multi_head_attention, GroupNorm, Linear};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops;

/// Self-attention on a `[B, C, H, W]` map, q/k/v fused into one projection.
pub struct SpatialSelfAttention {
    group_norm: Option<GroupNorm>,
    qkv: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    rescale_output_factor: f32,
}

impl SpatialSelfAttention {
    /// `heads` heads of `head_dim` channels over `channels` (diffusers: `heads = C // dim_head`);
    /// `groups: None` skips the input norm (UNet mid blocks with scale-shift resnets).
    pub async fn load(w: &W<'_, '_>, channels: usize, heads: usize, head_dim: usize, groups: Option<usize>, eps: f32, rescale_output_factor: f32) -> Result<Self> {
        if heads == 0 || head_dim == 0 {
            return Err(Error::Model(format!("{}: attention over {channels} channels needs at least one head of at least one channel", w.describe())));
        }
        let inner = heads * head_dim;
        let group_norm = match groups {
            Some(g) => Some(GroupNorm::load(&w.sub("group_norm"), g, channels, eps).await?),
            None => None,
        };
        Ok(Self {
            group_norm,
            qkv: Linear::load_fused(&[w.sub("to_q"), w.sub("to_k"), w.sub("to_v")], channels, inner, true).await?,
            to_out: Linear::load(&w.sub("to_out.0"), inner, channels, true).await?,
            heads,
            head_dim,
            rescale_output_factor,
        })
    }

    /// Attends every pixel to every pixel; same shape out.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else { return Err(Error::Shape(format!("spatial attention input {:?}", x.shape()))) };
        let n = match &self.group_norm {
            Some(g) => g.forward(gpu, x, false)?,
            None => x.clone(),
        };
        let qkv = self.qkv.forward_channels_first(gpu, &n.reshape(&[b, c, h * w])?)?;
        let d = self.heads * self.head_dim;
        let a = multi_head_attention(gpu, (&qkv, 0, 3 * d), (&qkv, d, 3 * d), (&qkv, 2 * d, 3 * d), b, h * w, h * w, self.heads, self.head_dim, false)?;
        let residual = x.reshape(&[b, c, h * w])?;
        let out = self.to_out.forward_to_channels_first(gpu, &a, Some(&residual))?.reshape(&[b, c, h, w])?;
        if self.rescale_output_factor == 1.0 {
            return Ok(out);
        }
        ops::scale(gpu, &out, 1.0 / self.rescale_output_factor, 0.0)
    }
}
