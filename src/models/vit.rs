//! The pre-norm transformer layer of vision transformers: `x + attention(LN(x))`, then
//! `x + MLP(LN(x))`, as transformers' `ViTLayer` (DPT's `DPTViTLayer`) and `Dinov2Layer` (with
//! its per-channel layer scale, folded here into the two output projections).

use super::nn::{multi_head_attention, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::Activation;

/// Whose parameter names a layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VitNaming {
    /// `layernorm_before`, `intermediate.dense`, `output.dense`, `layernorm_after`.
    Vit,
    /// `norm1`, `mlp.fc1`, `mlp.fc2`, `norm2`, `layer_scale1/2.lambda1`.
    Dinov2,
}

/// A layer's sizes and settings (from the model's config).
#[derive(Clone, Copy, Debug)]
pub struct VitDims {
    pub hidden: usize,
    pub heads: usize,
    /// Hidden units of the MLP.
    pub mlp: usize,
    pub eps: f32,
    pub act: Activation,
    pub qkv_bias: bool,
}

/// One encoder layer.
pub struct VitLayer {
    norm1: LayerNorm,
    qkv: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

/// transformers' `hidden_act` names for vision transformers.
pub fn activation(name: &str) -> Result<Activation> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        "quick_gelu" => Ok(Activation::QuickGelu),
        "relu" => Ok(Activation::Relu),
        other => Err(Error::Model(format!("hidden_act {other:?} is not supported (gelu, gelu_new, quick_gelu, relu are)"))),
    }
}

impl VitLayer {
    /// Loads layer `w`.
    pub async fn load(w: &W<'_, '_>, naming: VitNaming, dims: VitDims) -> Result<Self> {
        let VitDims { hidden: d, heads, mlp, eps, act, qkv_bias } = dims;
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::Model(format!("hidden_size {d} is not divisible into {heads} attention heads")));
        }
        let a = w.sub("attention.attention");
        let qkv = Linear::load_fused(&[a.sub("query"), a.sub("key"), a.sub("value")], d, d, qkv_bias).await?;
        let (n1, n2, fc1, fc2) = match naming {
            VitNaming::Vit => ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"),
            VitNaming::Dinov2 => ("norm1", "norm2", "mlp.fc1", "mlp.fc2"),
        };
        let (out, fc2) = match naming {
            VitNaming::Vit => (Linear::load(&w.sub("attention.output.dense"), d, d, true).await?, Linear::load(&w.sub(fc2), mlp, d, true).await?),
            VitNaming::Dinov2 => {
                let s1 = w.read_f32("layer_scale1.lambda1", &[d]).await?;
                let s2 = w.read_f32("layer_scale2.lambda1", &[d]).await?;
                (Linear::load_row_scaled(&w.sub("attention.output.dense"), d, d, &s1).await?, Linear::load_row_scaled(&w.sub(fc2), mlp, d, &s2).await?)
            }
        };
        Ok(Self {
            norm1: LayerNorm::load(&w.sub(n1), d, eps).await?,
            qkv,
            out,
            norm2: LayerNorm::load(&w.sub(n2), d, eps).await?,
            fc1: Linear::load(&w.sub(fc1), d, mlp, true).await?,
            fc2,
            heads,
            act,
        })
    }

    /// `[B, N, D]` to `[B, N, D]`.
    pub fn forward(&self, gpu: &Gpu, h: &Tensor) -> Result<Tensor> {
        let (b, n, d) = (h.dim(0), h.dim(1), h.dim(2));
        let x = self.norm1.forward(gpu, h)?;
        let qkv = self.qkv.forward(gpu, &x, Activation::None)?;
        let attn = multi_head_attention(gpu, (&qkv, 0, 3 * d), (&qkv, d, 3 * d), (&qkv, 2 * d, 3 * d), b, n, n, self.heads, d / self.heads, false)?;
        let h = self.out.forward_residual(gpu, &attn, h)?;
        let x = self.norm2.forward(gpu, &h)?;
        let x = self.fc1.forward(gpu, &x, self.act)?;
        self.fc2.forward_residual(gpu, &x, &h)
    }
}
