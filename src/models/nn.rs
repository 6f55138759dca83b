//! PyTorch-named layers (Linear, Conv2d, GroupNorm, LayerNorm, Attention projections) loaded from
//! weights and run with the ops, so model files read like diffusers' modules.

use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation, BiasAxis, Conv2dSpec, MatView, MatmulSpec};

/// `nn.Linear`: weight `[out, in]`, optional bias `[out]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias`) under `w`.
    pub async fn load(w: &W<'_, '_>, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = w.weight("weight", &[out_features, in_features]).await?;
        let bias = if bias { Some(w.get("bias", &[out_features]).await?) } else { None };
        Ok(Self { weight, bias, in_features, out_features })
    }

    /// Several linears with the same input fused into one (q, k, v): weights stacked by rows.
    pub async fn load_fused(parts: &[W<'_, '_>], in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let gpu = parts[0].gpu;
        let dtype = parts[0].dtype;
        let shape = [out_features, in_features];
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for p in parts {
            weights.push(p.weight_bytes("weight", &shape).await?);
            if bias {
                biases.extend(p.read_f32("bias", &[out_features]).await?);
            }
        }
        // Stacked as stored (exact for quantised rows); parts stored in different types are
        // brought to the first one's.
        let wdt = weights[0].0;
        for (d, b) in &mut weights {
            if *d != wdt {
                *b = wdt.encode(&shape, &d.decode(&shape, b));
                *d = wdt;
            }
        }
        let stacked: Vec<(&[usize], &[u8])> = weights.iter().map(|(_, b)| (&shape[..], b.as_slice())).collect();
        let n = out_features * parts.len();
        let weight = gpu.upload_bytes(&[n, in_features], wdt, &wdt.concat_rows(&stacked))?;
        let bias = if bias { Some(gpu.upload(&[n], dtype, &biases)?) } else { None };
        Ok(Self { weight, bias, in_features, out_features: n })
    }

    /// Output rows `rows` of a stored `[total_out, in]` linear as a linear of their own, with
    /// `bias_shift` added to the bias (e.g. 1 for a modulation `x * (1 + scale)`).
    pub async fn load_rows(w: &W<'_, '_>, in_features: usize, total_out: usize, rows: std::ops::Range<usize>, bias_shift: f32) -> Result<Self> {
        let (wdt, weight) = w.weight_bytes("weight", &[total_out, in_features]).await?;
        let bias = w.read_f32("bias", &[total_out]).await?;
        let out_features = rows.len();
        let weight = w.gpu.upload_bytes(&[out_features, in_features], wdt, &wdt.select_rows(&[total_out, in_features], &weight, rows.clone()))?;
        let bias: Vec<f32> = bias[rows].iter().map(|b| b + bias_shift).collect();
        let bias = Some(w.gpu.upload(&[out_features], w.dtype, &bias)?);
        Ok(Self { weight, bias, in_features, out_features })
    }

    /// `act(x W^T + b)` for x `[.., in]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, act: Activation) -> Result<Tensor> {
        ops::linear(gpu, x, &self.weight, self.bias.as_ref(), act)
    }

    /// `x W^T + b + residual` (the residual laid out like the output).
    pub fn forward_residual(&self, gpu: &Gpu, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let rows = x.numel() / self.in_features;
        let spec = MatmulSpec {
            a: MatView::packed(x, rows, self.in_features),
            b: MatView::transposed(&self.weight, self.in_features, self.out_features).broadcast(),
            m: rows, n: self.out_features, k: self.in_features, batch: 1, alpha: 1.0,
            bias: self.bias.as_ref().map(|b| (b, BiasAxis::Col)), act: Activation::None, residual: Some(residual),
        };
        let mut shape = x.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.out_features;
        }
        ops::matmul_spec(gpu, &spec)?.reshape(&shape)
    }

    /// Applied to a channels-first map `[B, C, N]`, giving tokens `[B, N, out]` (no permute copy).
    pub fn forward_channels_first(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (b, c, n) = (x.dim(0), x.dim(1), x.numel() / (x.dim(0) * x.dim(1)).max(1));
        let spec = MatmulSpec {
            a: MatView { tensor: x, base: 0, batch_stride: c * n, row_stride: 1, col_stride: n },
            b: MatView::transposed(&self.weight, self.in_features, self.out_features).broadcast(),
            m: n, n: self.out_features, k: c, batch: b, alpha: 1.0,
            bias: self.bias.as_ref().map(|b| (b, BiasAxis::Col)), act: Activation::None, residual: None,
        };
        ops::matmul_spec(gpu, &spec)?.reshape(&[b, n, self.out_features])
    }

    /// Applied to tokens `[B, N, in]`, giving a channels-first map `[B, out, N]` (+ residual in
    /// that layout), the inverse of [`Linear::forward_channels_first`].
    pub fn forward_to_channels_first(&self, gpu: &Gpu, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, n) = (x.dim(0), x.dim(1));
        let spec = MatmulSpec {
            a: MatView::packed(&self.weight, self.out_features, self.in_features).broadcast(),
            b: MatView { tensor: x, base: 0, batch_stride: n * self.in_features, row_stride: 1, col_stride: self.in_features },
            m: self.out_features, n, k: self.in_features, batch: b, alpha: 1.0,
            bias: self.bias.as_ref().map(|b| (b, BiasAxis::Row)), act: Activation::None, residual,
        };
        ops::matmul_spec(gpu, &spec)?.reshape(&[b, self.out_features, n])
    }
}

/// `nn.Conv2d` with square kernel, stride and padding.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub spec: Conv2dSpec,
    pub out_channels: usize,
}

impl Conv2d {
    /// Loads a `k x k` convolution `in -> out`.
    pub async fn load(w: &W<'_, '_>, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        let weight = w.weight("weight", &[cout, cin, k, k]).await?;
        let bias = w.get_opt("bias", &[cout]).await?;
        Ok(Self { weight, bias, spec: Conv2dSpec::new(stride, padding), out_channels: cout })
    }

    /// `conv(x) + b (+ residual)`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        ops::conv2d(gpu, x, &self.weight, self.bias.as_ref(), &self.spec, residual)
    }
}

/// `nn.GroupNorm`, optionally followed by SiLU in the same kernel.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    /// Loads a group norm over `channels`.
    pub async fn load(w: &W<'_, '_>, groups: usize, channels: usize, eps: f32) -> Result<Self> {
        Ok(Self { weight: w.get("weight", &[channels]).await?, bias: w.get("bias", &[channels]).await?, groups, eps })
    }
    /// Normalises x `[B, C, ..]`, then SiLU if `silu`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        ops::group_norm(gpu, x, self.groups, &self.weight, &self.bias, self.eps, silu)
    }
}

/// `nn.LayerNorm` over the last dimension.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    /// Loads a layer norm over `dim`.
    pub async fn load(w: &W<'_, '_>, dim: usize, eps: f32) -> Result<Self> {
        Ok(Self { weight: w.get("weight", &[dim]).await?, bias: w.get("bias", &[dim]).await?, eps })
    }
    /// Normalises the last dimension.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(gpu, x, Some((&self.weight, &self.bias)), self.eps)
    }
}

/// Multi-head attention of `q` rows against `k`/`v` rows, each given as (tensor, column offset,
/// row width) so fused projections are read in place. Output `[B, Nq, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn multi_head_attention(
    gpu: &Gpu, q: (&Tensor, usize, usize), k: (&Tensor, usize, usize), v: (&Tensor, usize, usize),
    batch: usize, nq: usize, nk: usize, heads: usize, head_dim: usize, causal: bool,
) -> Result<Tensor> {
    fn view(x: (&Tensor, usize, usize), rows: usize, head_dim: usize) -> ops::HeadView<'_> {
        let (tensor, base, width) = x;
        ops::HeadView { tensor, base, batch_stride: rows * width, head_stride: head_dim, row_stride: width }
    }
    let spec = ops::AttentionSpec {
        q: view(q, nq, head_dim), k: view(k, nk, head_dim), v: view(v, nk, head_dim),
        batch, heads, nq, nk, head_dim, scale: (head_dim as f32).powf(-0.5), causal,
    };
    ops::attention(gpu, &spec)
}
