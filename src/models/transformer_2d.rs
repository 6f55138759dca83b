//! diffusers' `Transformer2DModel` as the SD UNet uses it: group norm, projection in, basic
//! transformer blocks (self-attention, cross-attention, GEGLU feed-forward), projection out,
//! residual.

use super::nn::{multi_head_attention, GroupNorm, LayerNorm, Linear};
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation};

/// Self-attention with fused q/k/v, or cross-attention with k/v from the text embedding.
struct Attention {
    q: Option<Linear>,
    kv: Option<Linear>,
    qkv: Option<Linear>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    async fn load(w: &W<'_, '_>, dim: usize, heads: usize, head_dim: usize, cross_dim: Option<usize>) -> Result<Self> {
        let inner = heads * head_dim;
        let (q, kv, qkv) = match cross_dim {
            None => (None, None, Some(Linear::load_fused(&[w.sub("to_q"), w.sub("to_k"), w.sub("to_v")], dim, inner, false).await?)),
            Some(c) => (
                Some(Linear::load(&w.sub("to_q"), dim, inner, false).await?),
                Some(Linear::load_fused(&[w.sub("to_k"), w.sub("to_v")], c, inner, false).await?),
                None,
            ),
        };
        let to_out = Linear::load(&w.sub("to_out.0"), inner, dim, true).await?;
        Ok(Self { q, kv, qkv, to_out, heads, head_dim })
    }

    /// `x + to_out(attention(q(n), k(ctx), v(ctx)))` for normalised tokens `n` `[B, N, dim]`.
    fn forward(&self, gpu: &Gpu, n: &Tensor, context: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
        let (b, nq) = (n.dim(0), n.dim(1));
        let inner = self.heads * self.head_dim;
        let attn = match (&self.qkv, &self.q, &self.kv, context) {
            (Some(qkv), ..) => {
                let t = qkv.forward(gpu, n, Activation::None)?;
                multi_head_attention(gpu, (&t, 0, 3 * inner), (&t, inner, 3 * inner), (&t, 2 * inner, 3 * inner), b, nq, nq, self.heads, self.head_dim, false)?
            }
            (None, Some(q), Some(kv), Some(ctx)) => {
                let q = q.forward(gpu, n, Activation::None)?;
                let t = kv.forward(gpu, ctx, Activation::None)?;
                let nk = ctx.dim(1);
                multi_head_attention(gpu, (&q, 0, inner), (&t, 0, 2 * inner), (&t, inner, 2 * inner), b, nq, nk, self.heads, self.head_dim, false)?
            }
            _ => return Err(crate::Error::Shape("cross-attention needs a context".into())),
        };
        self.to_out.forward_residual(gpu, &attn, x)
    }
}

/// `BasicTransformerBlock` (pre-norm, no ada-norm).
struct BasicTransformerBlock {
    only_cross: bool,
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    /// `only_cross`: `attn1` attends to the text too (diffusers' `only_cross_attention`).
    async fn load(w: &W<'_, '_>, dim: usize, heads: usize, head_dim: usize, cross_dim: usize, only_cross: bool) -> Result<Self> {
        let inner_ff = dim * 4;
        Ok(Self {
            only_cross,
            norm1: LayerNorm::load(&w.sub("norm1"), dim, 1e-5).await?,
            attn1: Attention::load(&w.sub("attn1"), dim, heads, head_dim, only_cross.then_some(cross_dim)).await?,
            norm2: LayerNorm::load(&w.sub("norm2"), dim, 1e-5).await?,
            attn2: Attention::load(&w.sub("attn2"), dim, heads, head_dim, Some(cross_dim)).await?,
            norm3: LayerNorm::load(&w.sub("norm3"), dim, 1e-5).await?,
            ff_proj: Linear::load(&w.sub("ff.net.0.proj"), dim, inner_ff * 2, true).await?,
            ff_out: Linear::load(&w.sub("ff.net.2"), inner_ff, dim, true).await?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let n = self.norm1.forward(gpu, x)?;
        let x = self.attn1.forward(gpu, &n, self.only_cross.then_some(context), x)?;
        let n = self.norm2.forward(gpu, &x)?;
        let x = self.attn2.forward(gpu, &n, Some(context), &x)?;
        let n = self.norm3.forward(gpu, &x)?;
        self.feed_forward(gpu, &n, &x)
    }

    /// `x + ff_out(geglu(ff_proj(n)))`, over chunks of tokens when the GEGLU's input would not fit
    /// one storage binding (SDXL at 1024x1024 in f32 in a browser's 128 MiB), as diffusers'
    /// `enable_forward_chunking`: every token is independent, so the result is the same.
    fn feed_forward(&self, gpu: &Gpu, n: &Tensor, x: &Tensor) -> Result<Tensor> {
        let ff = |n: &Tensor, x: &Tensor| self.ff_out.forward_residual(gpu, &ops::geglu(gpu, &self.ff_proj.forward(gpu, n, Activation::None)?)?, x);
        let &[b, tokens, dim] = n.shape() else { return ff(n, x) };
        let rows = b * tokens;
        let wide = self.ff_proj.out_features;
        let limit = gpu.summary().max_storage_buffer_binding_size;
        let bytes = n.dtype().bytes_for(&[rows, wide]);
        if bytes <= limit {
            return ff(n, x);
        }
        let chunk = ((rows as u64 * limit / bytes) as usize).max(1);
        let mut parts = Vec::new();
        for start in (0..rows).step_by(chunk) {
            let len = chunk.min(rows - start);
            let nc = ops::slice(gpu, n, start * dim, &[1, len, dim])?;
            let xc = ops::slice(gpu, x, start * dim, &[1, len, dim])?;
            parts.push(ff(&nc, &xc)?);
        }
        ops::concat(gpu, &parts.iter().collect::<Vec<_>>(), 1)?.reshape(&[b, tokens, dim])
    }
}

/// `Transformer2DModel` on a `[B, C, H, W]` map.
pub struct Transformer2DModel {
    norm: GroupNorm,
    /// 1x1 convolutions (SD 1.x) or linears (`use_linear_projection`, SD 2.x): the same map over
    /// channels, so both load as linears applied to the channels-first feature map.
    proj_in: Linear,
    proj_out: Linear,
    blocks: Vec<BasicTransformerBlock>,
}

impl Transformer2DModel {
    /// `heads` heads of `channels / heads`, `layers` transformer blocks; `only_cross`: their
    /// first attention attends to the text as well (the x4 upscaler's).
    #[allow(clippy::too_many_arguments)]
    pub async fn load(w: &W<'_, '_>, channels: usize, heads: usize, layers: usize, cross_dim: usize, groups: usize, only_cross: bool) -> Result<Self> {
        let head_dim = channels / heads.max(1);
        let inner = heads * head_dim;
        let proj_in = Linear::load(&w.sub("proj_in"), channels, inner, true).await?;
        let proj_out = Linear::load(&w.sub("proj_out"), inner, channels, true).await?;
        let mut blocks = Vec::new();
        for i in 0..layers {
            blocks.push(BasicTransformerBlock::load(&w.sub(format!("transformer_blocks.{i}")), inner, heads, head_dim, cross_dim, only_cross).await?);
        }
        Ok(Self { norm: GroupNorm::load(&w.sub("norm"), groups, channels, 1e-6).await?, proj_in, proj_out, blocks })
    }

    /// `x + proj_out(blocks(proj_in(norm(x))))`, attending to `context` `[B, L, cross_dim]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else { return Err(crate::Error::Shape(format!("transformer input {:?}", x.shape()))) };
        let n = self.norm.forward(gpu, x, false)?;
        let flat = n.reshape(&[b, c, h * w])?;
        let mut t = self.proj_in.forward_channels_first(gpu, &flat)?;
        for block in &self.blocks {
            t = block.forward(gpu, &t, context)?;
        }
        let residual = x.reshape(&[b, c, h * w])?;
        let out = self.proj_out.forward_to_channels_first(gpu, &t, Some(&residual))?;
        out.reshape(&[b, c, h, w])
    }
}
