//! PyTorch-named layers (Linear, Conv2d, GroupNorm, LayerNorm, Attention projections) loaded from
//! weights and run with the ops, so model files read like diffusers' modules.

use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::lora::LowRankFactors;
use crate::loader::{InputLayout, InputProbe, W};
use crate::ops::{self, Activation, BiasAxis, Conv2dSpec, MatView, MatmulSpec};

/// A LoRA branch beside a layer's weight: `y += up (down x)` (Hu et al. 2021), run as two thin
/// matmuls (or a convolution and a 1x1 one for conv LoRA) whose result enters the layer's own
/// kernel as its residual. The layer's weight is untouched, so it may stay quantised. Several
/// adapters are stacked along the rank, their scales folded into `up`.
pub struct LowRank {
    /// `[rank, in]`, or `[rank, cin, kh, kw]` for a convolution (the layer's stride and padding).
    pub down: Tensor,
    /// `[out, rank]` (`[out, rank, 1, 1]` beside a convolution).
    pub up: Tensor,
    pub rank: usize,
}

impl LowRank {
    /// The factors the view's adapters have for a layer with weight `shape` (`None`: none, or
    /// merged into the weight).
    pub async fn load(w: &W<'_, '_>, shape: &[usize]) -> Result<Option<Self>> {
        match w.low_rank(shape).await? {
            Some(f) => Self::upload(w.gpu, w.dtype, &f).map(Some),
            None => Ok(None),
        }
    }

    fn upload(gpu: &Gpu, dtype: DType, f: &LowRankFactors) -> Result<Self> {
        let out = f.up.len() / f.rank.max(1);
        let up_shape: Vec<usize> = if f.down_shape.len() == 4 { vec![out, f.rank, 1, 1] } else { vec![out, f.rank] };
        Ok(Self { down: gpu.upload(&f.down_shape, dtype, &f.down)?, up: gpu.upload(&up_shape, dtype, &f.up)?, rank: f.rank })
    }

    /// Several layers' factors as one for their fused layer (q, k and v stacked by output rows):
    /// downs stacked by rank, ups placed block-diagonally.
    fn fuse(parts: &[(usize, Option<LowRankFactors>)], in_features: usize) -> Option<LowRankFactors> {
        let rank: usize = parts.iter().filter_map(|(_, f)| f.as_ref().map(|f| f.rank)).sum();
        if rank == 0 {
            return None;
        }
        let out: usize = parts.iter().map(|(o, _)| o).sum();
        let (mut down, mut up) = (Vec::with_capacity(rank * in_features), vec![0f32; out * rank]);
        let (mut row0, mut r0) = (0, 0);
        for (o, f) in parts {
            if let Some(f) = f {
                down.extend_from_slice(&f.down);
                for i in 0..*o {
                    up[(row0 + i) * rank + r0..(row0 + i) * rank + r0 + f.rank].copy_from_slice(&f.up[i * f.rank..(i + 1) * f.rank]);
                }
                r0 += f.rank;
            }
            row0 += o;
        }
        Some(LowRankFactors { rank, down, down_shape: vec![rank, in_features], up })
    }

    /// The factors for output rows `rows` of a layer.
    fn rows(f: &LowRankFactors, rows: std::ops::Range<usize>) -> LowRankFactors {
        LowRankFactors { up: f.up[rows.start * f.rank..rows.end * f.rank].to_vec(), ..f.clone() }
    }

    /// `up (down x) (+ residual)` for the layer spec `main` reads x with (x W^T or W x^T form):
    /// the same x view against `down`, then `up` on the result, laid out like the layer's output.
    fn branch(&self, gpu: &Gpu, main: &MatmulSpec, weight_is_b: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        let r = self.rank;
        if weight_is_b {
            // y [batch, m, n] = x [batch, m, k] . W^T: u = x . down^T [batch, m, r], then u . up^T.
            let s1 = MatmulSpec { b: MatView::transposed(&self.down, main.k, r).broadcast(), n: r, bias: None, act: Activation::None, residual: None, alpha: 1.0, ..*main };
            let u = ops::matmul_spec(gpu, &s1)?;
            let s2 = MatmulSpec { a: MatView::packed(&u, main.m, r), b: MatView::transposed(&self.up, r, main.n).broadcast(), k: r, bias: None, act: Activation::None, residual, alpha: 1.0, ..*main };
            ops::matmul_spec(gpu, &s2)
        } else {
            // y [batch, m, n] = W [m, k] . x: u = down . x [batch, r, n], then up . u.
            let s1 = MatmulSpec { a: MatView::packed(&self.down, r, main.k).broadcast(), m: r, bias: None, act: Activation::None, residual: None, alpha: 1.0, ..*main };
            let u = ops::matmul_spec(gpu, &s1)?;
            let s2 = MatmulSpec { a: MatView::packed(&self.up, main.m, r).broadcast(), b: MatView::packed(&u, r, main.n), k: r, bias: None, act: Activation::None, residual, alpha: 1.0, ..*main };
            ops::matmul_spec(gpu, &s2)
        }
    }
}

/// Runs a layer's matmul with its LoRA branch (if any) folded in as the residual; the
/// activation, which the kernel applies before its residual, then runs on its own.
fn matmul_with_lora(gpu: &Gpu, spec: &MatmulSpec, lora: Option<&LowRank>, weight_is_b: bool) -> Result<Tensor> {
    let Some(l) = lora else { return ops::matmul_spec(gpu, spec) };
    if spec.act == Activation::None {
        let extra = l.branch(gpu, spec, weight_is_b, spec.residual)?;
        return ops::matmul_spec(gpu, &MatmulSpec { residual: Some(&extra), ..*spec });
    }
    // act(x W^T + b + delta) (+ residual): the kernel adds its residual after the activation.
    let delta = l.branch(gpu, spec, weight_is_b, None)?;
    let y = ops::matmul_spec(gpu, &MatmulSpec { residual: Some(&delta), act: Activation::None, ..*spec })?;
    let y = ops::activation(gpu, &y, spec.act)?;
    match spec.residual {
        Some(r) => ops::add(gpu, &y, r),
        None => Ok(y),
    }
}

/// `nn.Linear`: weight `[out, in]`, optional bias `[out]`, optional LoRA branch.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: Option<LowRank>,
    /// Reports the inputs during a calibration run (`ldm convert --calibrate`).
    pub probe: Option<InputProbe>,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias`) under `w`, with the view's LoRA adapters.
    pub async fn load(w: &W<'_, '_>, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = w.weight("weight", &[out_features, in_features]).await?;
        let bias = if bias { Some(w.get("bias", &[out_features]).await?) } else { None };
        let lora = LowRank::load(w, &[out_features, in_features]).await?;
        Ok(Self { weight, bias, in_features, out_features, lora, probe: w.input_probe("weight") })
    }

    /// The matmul of this layer on tokens `x` `[rows, in]` (x W^T + b).
    fn spec<'a>(&'a self, x: &'a Tensor, act: Activation, residual: Option<&'a Tensor>) -> MatmulSpec<'a> {
        let rows = x.numel() / self.in_features;
        MatmulSpec {
            a: MatView::packed(x, rows, self.in_features),
            b: MatView::transposed(&self.weight, self.in_features, self.out_features).broadcast(),
            m: rows, n: self.out_features, k: self.in_features, batch: 1, alpha: 1.0,
            bias: self.bias.as_ref().map(|b| (b, BiasAxis::Col)), act, residual,
        }
    }

    fn out_shape(&self, x: &Tensor) -> Vec<usize> {
        let mut shape = x.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.out_features;
        }
        shape
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
        let mut factors = Vec::new();
        for p in parts {
            factors.push((out_features, p.low_rank(&shape).await?));
        }
        let lora = LowRank::fuse(&factors, in_features).map(|f| LowRank::upload(gpu, dtype, &f)).transpose()?;
        let probe = InputProbe::fused(parts.iter().map(|p| p.input_probe("weight")).collect());
        Ok(Self { weight, bias, in_features, out_features: n, lora, probe })
    }

    /// Output rows `rows` of a stored `[total_out, in]` linear as a linear of their own, with
    /// `bias_shift` added to the bias (e.g. 1 for a modulation `x * (1 + scale)`).
    pub async fn load_rows(w: &W<'_, '_>, in_features: usize, total_out: usize, rows: std::ops::Range<usize>, bias_shift: f32) -> Result<Self> {
        let (wdt, weight) = w.weight_bytes("weight", &[total_out, in_features]).await?;
        let bias = w.read_f32("bias", &[total_out]).await?;
        let out_features = rows.len();
        let weight = w.gpu.upload_bytes(&[out_features, in_features], wdt, &wdt.select_rows(&[total_out, in_features], &weight, rows.clone()))?;
        let bias: Vec<f32> = bias[rows.clone()].iter().map(|b| b + bias_shift).collect();
        let bias = Some(w.gpu.upload(&[out_features], w.dtype, &bias)?);
        let lora = w.low_rank(&[total_out, in_features]).await?.map(|f| LowRank::upload(w.gpu, w.dtype, &LowRank::rows(&f, rows))).transpose()?;
        Ok(Self { weight, bias, in_features, out_features, lora, probe: w.input_probe("weight") })
    }

    /// A linear whose outputs are multiplied by `scale` (a per-channel layer scale folded in:
    /// `s (W x + b) = (s W) x + s b`); float weights, no LoRA.
    pub async fn load_row_scaled(w: &W<'_, '_>, in_features: usize, out_features: usize, scale: &[f32]) -> Result<Self> {
        let mut weight = w.read_f32("weight", &[out_features, in_features]).await?;
        let mut bias = w.read_f32("bias", &[out_features]).await?;
        for (o, &s) in scale.iter().enumerate().take(out_features) {
            weight[o * in_features..(o + 1) * in_features].iter_mut().for_each(|v| *v *= s);
            bias[o] *= s;
        }
        Ok(Self {
            weight: w.gpu.upload(&[out_features, in_features], w.dtype, &weight)?,
            bias: Some(w.gpu.upload(&[out_features], w.dtype, &bias)?),
            in_features,
            out_features,
            lora: None,
            probe: None,
        })
    }

    fn observe(&self, gpu: &Gpu, x: &Tensor, layout: InputLayout) -> Result<()> {
        match &self.probe {
            Some(p) => p.observe(gpu, x, layout),
            None => Ok(()),
        }
    }

    /// `act(x W^T + b)` for x `[.., in]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.observe(gpu, x, InputLayout::Rows)?;
        if self.lora.is_none() {
            return ops::linear(gpu, x, &self.weight, self.bias.as_ref(), act);
        }
        if x.dim(-1) != self.in_features {
            return Err(crate::Error::Shape(format!("linear input {:?} does not end in {}", x.shape(), self.in_features)));
        }
        matmul_with_lora(gpu, &self.spec(x, act, None), self.lora.as_ref(), true)?.reshape(&self.out_shape(x))
    }

    /// `x W^T + b + residual` (the residual laid out like the output).
    pub fn forward_residual(&self, gpu: &Gpu, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.observe(gpu, x, InputLayout::Rows)?;
        matmul_with_lora(gpu, &self.spec(x, Activation::None, Some(residual)), self.lora.as_ref(), true)?.reshape(&self.out_shape(x))
    }

    /// Applied to a channels-first map `[B, C, N]`, giving tokens `[B, N, out]` (no permute copy).
    pub fn forward_channels_first(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.observe(gpu, x, InputLayout::ChannelsFirst)?;
        let (b, c, n) = (x.dim(0), x.dim(1), x.numel() / (x.dim(0) * x.dim(1)).max(1));
        let spec = MatmulSpec {
            a: MatView { tensor: x, base: 0, batch_stride: c * n, row_stride: 1, col_stride: n },
            b: MatView::transposed(&self.weight, self.in_features, self.out_features).broadcast(),
            m: n, n: self.out_features, k: c, batch: b, alpha: 1.0,
            bias: self.bias.as_ref().map(|b| (b, BiasAxis::Col)), act: Activation::None, residual: None,
        };
        matmul_with_lora(gpu, &spec, self.lora.as_ref(), true)?.reshape(&[b, n, self.out_features])
    }

    /// Applied to tokens `[B, N, in]`, giving a channels-first map `[B, out, N]` (+ residual in
    /// that layout), the inverse of [`Linear::forward_channels_first`].
    pub fn forward_to_channels_first(&self, gpu: &Gpu, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        self.observe(gpu, x, InputLayout::Rows)?;
        let (b, n) = (x.dim(0), x.dim(1));
        let spec = MatmulSpec {
            a: MatView::packed(&self.weight, self.out_features, self.in_features).broadcast(),
            b: MatView { tensor: x, base: 0, batch_stride: n * self.in_features, row_stride: 1, col_stride: self.in_features },
            m: self.out_features, n, k: self.in_features, batch: b, alpha: 1.0,
            bias: self.bias.as_ref().map(|b| (b, BiasAxis::Row)), act: Activation::None, residual,
        };
        matmul_with_lora(gpu, &spec, self.lora.as_ref(), false)?.reshape(&[b, self.out_features, n])
    }
}

/// `nn.Conv2d` with square kernel, stride and padding, optional LoRA branch (conv LoRA /
/// LoCon: a convolution with the layer's kernel to the rank, then a 1x1 one).
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub spec: Conv2dSpec,
    pub out_channels: usize,
    pub lora: Option<LowRank>,
    /// Reports the inputs during a calibration run (`ldm convert --calibrate`).
    pub probe: Option<InputProbe>,
}

impl Conv2d {
    /// Loads a `k x k` convolution `in -> out`.
    pub async fn load(w: &W<'_, '_>, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        let shape = [cout, cin, k, k];
        let weight = w.weight("weight", &shape).await?;
        let bias = w.get_opt("bias", &[cout]).await?;
        let lora = match w.low_rank(&shape).await? {
            // A linear-style LoRA on a 1x1 convolution is a 1x1 conv LoRA.
            Some(f) if f.down_shape.len() == 2 => Some(LowRankFactors { down_shape: vec![f.rank, cin, 1, 1], ..f }),
            other => other,
        };
        let lora = lora.map(|f| LowRank::upload(w.gpu, w.dtype, &f)).transpose()?;
        Ok(Self { weight, bias, spec: Conv2dSpec::new(stride, padding), out_channels: cout, lora, probe: w.input_probe("weight") })
    }

    /// `act(conv(x) + b) (+ residual)`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(p) = &self.probe {
            let (kh, kw) = (self.weight.dim(2), self.weight.dim(3));
            let s = &self.spec;
            p.observe(gpu, x, InputLayout::Conv { kernel: (kh, kw), stride: s.stride, padding: s.padding, dilation: s.dilation })?;
        }
        let Some(l) = &self.lora else { return ops::conv2d(gpu, x, &self.weight, self.bias.as_ref(), &self.spec, residual) };
        let u = ops::conv2d(gpu, x, &l.down, None, &Conv2dSpec { act: Activation::None, ..self.spec }, None)?;
        let act = self.spec.act;
        let plain = Conv2dSpec { act: Activation::None, ..self.spec };
        let delta = ops::conv2d(gpu, &u, &l.up, None, &Conv2dSpec::default(), if act == Activation::None { residual } else { None })?;
        let y = ops::conv2d(gpu, x, &self.weight, self.bias.as_ref(), &plain, Some(&delta))?;
        if act == Activation::None {
            return Ok(y);
        }
        let y = ops::activation(gpu, &y, act)?;
        match residual {
            Some(r) => ops::add(gpu, &y, r),
            None => Ok(y),
        }
    }
}

impl Conv2d {
    /// A convolution from weights prepared on the CPU (weight-standardised, a batch norm folded
    /// in): `weight` `[cout, cin, kh, kw]` in `w`'s dtype, no LoRA.
    pub fn from_f32(w: &W<'_, '_>, shape: [usize; 4], weight: &[f32], bias: Option<&[f32]>, spec: Conv2dSpec) -> Result<Self> {
        let bias = bias.map(|b| w.gpu.upload(&[shape[0]], w.dtype, b)).transpose()?;
        Ok(Self { weight: w.gpu.upload(&shape, w.dtype, weight)?, bias, spec, out_channels: shape[0], lora: None, probe: None })
    }

    /// Loads a convolution followed by an inference-mode `nn.BatchNorm2d` (under `bn`), the norm
    /// folded into the weights: `w' = w g / sqrt(var + eps)`, `b' = (b - mean) g / sqrt(var + eps) + beta`.
    pub async fn load_with_batch_norm(w: &W<'_, '_>, bn: &W<'_, '_>, cin: usize, cout: usize, k: usize, spec: Conv2dSpec, eps: f64) -> Result<Self> {
        let shape = [cout, cin, k, k];
        let mut weight = w.read_f32("weight", &shape).await?;
        let bias = if w.contains("bias") { w.read_f32("bias", &[cout]).await? } else { vec![0.0; cout] };
        let (g, beta) = (bn.read_f32("weight", &[cout]).await?, bn.read_f32("bias", &[cout]).await?);
        let (mean, var) = (bn.read_f32("running_mean", &[cout]).await?, bn.read_f32("running_var", &[cout]).await?);
        let per = cin * k * k;
        let mut folded = Vec::with_capacity(cout);
        for o in 0..cout {
            let s = g[o] as f64 / (var[o] as f64 + eps).sqrt();
            weight[o * per..(o + 1) * per].iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
            folded.push(((bias[o] as f64 - mean[o] as f64) * s + beta[o] as f64) as f32);
        }
        Self::from_f32(w, shape, &weight, Some(&folded), spec)
    }
}

/// `nn.ConvTranspose2d` whose stride equals its kernel, without padding (DPT's upsampling in
/// its reassemble stage): each input pixel becomes a `k x k` patch, so it is a 1x1 convolution to
/// `cout * k * k` channels and a permutation putting the patches in place.
pub struct PatchConvTranspose2d {
    conv: Conv2d,
    cout: usize,
    k: usize,
}

impl PatchConvTranspose2d {
    /// Loads `weight` `[cin, cout, k, k]` and `bias` `[cout]`.
    pub async fn load(w: &W<'_, '_>, cin: usize, cout: usize, k: usize) -> Result<Self> {
        let stored = w.read_f32("weight", &[cin, cout, k, k]).await?;
        let bias = w.read_f32("bias", &[cout]).await?;
        // Rows (co, ky, kx), columns ci.
        let mut weight = vec![0f32; cout * k * k * cin];
        for ci in 0..cin {
            for r in 0..cout * k * k {
                weight[r * cin + ci] = stored[ci * cout * k * k + r];
            }
        }
        let bias: Vec<f32> = bias.iter().flat_map(|&b| std::iter::repeat_n(b, k * k)).collect();
        Ok(Self { conv: Conv2d::from_f32(w, [cout * k * k, cin, 1, 1], &weight, Some(&bias), Conv2dSpec::default())?, cout, k })
    }

    /// `[B, cin, H, W]` to `[B, cout, H k, W k]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, k) = (x.dim(0), x.dim(2), x.dim(3), self.k);
        let patches = self.conv.forward(gpu, x, None)?.reshape(&[b, self.cout, k, k, h, w])?;
        ops::permute(gpu, &patches, &[0, 1, 4, 2, 5, 3])?.reshape(&[b, self.cout, h * k, w * k])
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
