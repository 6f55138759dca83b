//! The layers of the trainable UNets, recorded on a [`Tape`]: diffusers' modules with diffusers'
//! parameter names, their parameters collected by a [`Registry`] as the modules are built, and
//! LoRA as a wrapper of the linear layer (PEFT's `lora.Linear`: `W x + b + (α / r) B A x`, the
//! base weights frozen).

use super::{Init, ParamSpec};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::gpu::{DType, Tensor};
use crate::ops::embedding::TimestepEmbedding;
use crate::ops::{self, Conv2dSpec};

/// LoRA settings (PEFT's `LoraConfig` keys): rank, alpha and the layers it wraps.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f32,
    /// Module names, matched as PEFT does: the whole path or its last components
    /// (`to_q` matches `...attn1.to_q`, `to_out.0` matches `...attn2.to_out.0`).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// diffusers' `train_text_to_image_lora.py`: rank 4, alpha = rank, every attention projection.
    fn default() -> Self {
        Self { r: 4, lora_alpha: 4.0, target_modules: ["to_k", "to_q", "to_v", "to_out.0"].map(String::from).to_vec() }
    }
}

impl LoraConfig {
    /// Whether the layer at `module` gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| module == t || module.strip_suffix(t.as_str()).is_some_and(|head| head.ends_with('.')))
    }

    /// The factor of the low-rank branch.
    pub fn scale(&self) -> f32 {
        self.lora_alpha / self.r as f32
    }

    /// Rejects settings that cannot train, saying which.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.r > 1024 || !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) || self.target_modules.is_empty() {
            return Err(Error::Input(format!("LoRA rank {} must be 1 to 1024, alpha {} positive, with at least one target module", self.r, self.lora_alpha)));
        }
        Ok(())
    }
}

/// Collects the parameters' names, shapes and initialisations as the modules are built; with a
/// LoRA config, the adapters of the layers it targets (whose indices [`Self::adapters`] lists).
pub(super) struct Registry {
    pub specs: Vec<ParamSpec>,
    pub lora: Option<LoraConfig>,
    pub adapters: Vec<usize>,
    /// A target the adapters cannot wrap (a convolution), reported once the model is built.
    pub unsupported: Option<String>,
}

impl Registry {
    pub fn new(lora: Option<LoraConfig>) -> Self {
        Self { specs: Vec::new(), lora, adapters: Vec::new(), unsupported: None }
    }

    fn add(&mut self, name: String, shape: Vec<usize>, init: Init) -> usize {
        self.specs.push(ParamSpec { name, shape, init });
        self.specs.len() - 1
    }

    /// The error for LoRA settings that wrap nothing or something they cannot.
    pub fn check_adapters(&self) -> Result<()> {
        if let Some(what) = &self.unsupported {
            return Err(Error::Unsupported(format!("LoRA on {what}: only linear layers take adapters; choose other target modules")));
        }
        match &self.lora {
            Some(l) if self.adapters.is_empty() => Err(Error::Input(format!("LoRA target modules {:?} match no linear layer of this UNet (try to_q, to_k, to_v, to_out.0)", l.target_modules))),
            _ => Ok(()),
        }
    }

    pub fn conv(&mut self, prefix: &str, cin: usize, cout: usize, k: usize, spec: Conv2dSpec) -> Conv {
        if self.lora.as_ref().is_some_and(|l| l.targets(prefix)) && self.unsupported.is_none() {
            self.unsupported = Some(format!("the convolution {prefix}"));
        }
        let fan_in = cin * k * k;
        let w = self.add(format!("{prefix}.weight"), vec![cout, cin, k, k], Init::Uniform { fan_in });
        let b = self.add(format!("{prefix}.bias"), vec![cout], Init::Uniform { fan_in });
        Conv { w, b, spec }
    }

    pub fn linear(&mut self, prefix: &str, cin: usize, cout: usize) -> Linear {
        self.linear_with(prefix, cin, cout, true)
    }

    pub fn linear_with(&mut self, prefix: &str, cin: usize, cout: usize, bias: bool) -> Linear {
        let w = self.add(format!("{prefix}.weight"), vec![cout, cin], Init::Uniform { fan_in: cin });
        let b = bias.then(|| self.add(format!("{prefix}.bias"), vec![cout], Init::Uniform { fan_in: cin }));
        let lora = match self.lora.clone() {
            Some(l) if l.targets(prefix) => {
                // PEFT's "gaussian" init: A ~ N(0, 1/r), B = 0, so training starts at the base model.
                let a = self.add(format!("{prefix}.lora_A.weight"), vec![l.r, cin], Init::Normal { std: 1.0 / l.r as f32 });
                let b = self.add(format!("{prefix}.lora_B.weight"), vec![cout, l.r], Init::Zeros);
                self.adapters.extend([a, b]);
                Some(Lora { a, b, scale: l.scale() })
            }
            _ => None,
        };
        Linear { w, b, lora }
    }

    pub fn group_norm(&mut self, prefix: &str, channels: usize, groups: usize, eps: f32) -> Norm {
        let gamma = self.add(format!("{prefix}.weight"), vec![channels], Init::Ones);
        let beta = self.add(format!("{prefix}.bias"), vec![channels], Init::Zeros);
        Norm { gamma, beta, groups, eps }
    }

    fn layer_norm(&mut self, prefix: &str, channels: usize) -> Norm {
        // Over the last axis: one group per token.
        self.group_norm(prefix, channels, 0, 1e-5)
    }

    pub fn resnet(&mut self, prefix: &str, cin: usize, cout: usize, s: &Settings) -> Resnet {
        Resnet {
            norm1: self.group_norm(&format!("{prefix}.norm1"), cin, s.groups, s.eps),
            conv1: self.conv(&format!("{prefix}.conv1"), cin, cout, 3, Conv2dSpec::new(1, 1)),
            time_emb_proj: self.linear(&format!("{prefix}.time_emb_proj"), s.temb, cout),
            norm2: self.group_norm(&format!("{prefix}.norm2"), cout, s.groups, s.eps),
            conv2: self.conv(&format!("{prefix}.conv2"), cout, cout, 3, Conv2dSpec::new(1, 1)),
            shortcut: (cin != cout).then(|| self.conv(&format!("{prefix}.conv_shortcut"), cin, cout, 1, Conv2dSpec::new(1, 0))),
        }
    }

    /// `UNet2DModel`'s attention over pixels (`Attn*` blocks): biased projections.
    pub fn spatial_attention(&mut self, prefix: &str, channels: usize, head_dim: usize, groups: usize, eps: f32) -> SpatialAttention {
        let heads = channels / head_dim.max(1);
        SpatialAttention {
            norm: self.group_norm(&format!("{prefix}.group_norm"), channels, groups, eps),
            attention: self.attention(prefix, channels, channels, heads, head_dim, true),
        }
    }

    /// diffusers' `Attention`: queries from `dim` channels, keys and values from `context_dim`.
    fn attention(&mut self, prefix: &str, dim: usize, context_dim: usize, heads: usize, head_dim: usize, bias: bool) -> Attention {
        let inner = heads * head_dim;
        Attention {
            to_q: self.linear_with(&format!("{prefix}.to_q"), dim, inner, bias),
            to_k: self.linear_with(&format!("{prefix}.to_k"), context_dim, inner, bias),
            to_v: self.linear_with(&format!("{prefix}.to_v"), context_dim, inner, bias),
            to_out: self.linear(&format!("{prefix}.to_out.0"), inner, dim),
            heads,
            head_dim,
        }
    }

    /// `Transformer2DModel` (`CrossAttn*` blocks): `heads` heads over `channels`, `layers`
    /// transformer blocks attending to a context of `cross_dim` channels.
    #[allow(clippy::too_many_arguments)]
    pub fn transformer(&mut self, prefix: &str, channels: usize, heads: usize, layers: usize, cross_dim: usize, groups: usize, only_cross: bool, linear_projection: bool) -> Transformer2D {
        let head_dim = channels / heads.max(1);
        let inner = heads * head_dim;
        let projection = |r: &mut Self, name: &str, cin: usize, cout: usize| {
            let name = format!("{prefix}.{name}");
            if linear_projection { Projection::Linear(r.linear(&name, cin, cout)) } else { Projection::Conv(r.conv(&name, cin, cout, 1, Conv2dSpec::new(1, 0))) }
        };
        let norm = self.group_norm(&format!("{prefix}.norm"), channels, groups, 1e-6);
        let proj_in = projection(self, "proj_in", channels, inner);
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("{prefix}.transformer_blocks.{i}");
                TransformerBlock {
                    only_cross,
                    norm1: self.layer_norm(&format!("{p}.norm1"), inner),
                    attn1: self.attention(&format!("{p}.attn1"), inner, if only_cross { cross_dim } else { inner }, heads, head_dim, false),
                    norm2: self.layer_norm(&format!("{p}.norm2"), inner),
                    attn2: self.attention(&format!("{p}.attn2"), inner, cross_dim, heads, head_dim, false),
                    norm3: self.layer_norm(&format!("{p}.norm3"), inner),
                    ff_proj: self.linear(&format!("{p}.ff.net.0.proj"), inner, inner * 8),
                    ff_out: self.linear(&format!("{p}.ff.net.2"), inner * 4, inner),
                }
            })
            .collect();
        let proj_out = projection(self, "proj_out", inner, channels);
        Transformer2D { norm, proj_in, blocks, proj_out, inner }
    }
}

/// What every resnet shares: the time embedding's width and the group norms' settings.
pub(super) struct Settings {
    pub temb: usize,
    pub groups: usize,
    pub eps: f32,
}

pub(super) struct Conv {
    w: usize,
    b: usize,
    spec: Conv2dSpec,
}

impl Conv {
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let (x, w, b) = (tape.autocast(x)?, tape.autocast(p[self.w])?, tape.autocast(p[self.b])?);
        tape.conv2d(x, w, Some(b), self.spec)
    }
}

/// A low-rank adapter's factors `A` `[r, in]` and `B` `[out, r]` and its scale α / r.
struct Lora {
    a: usize,
    b: usize,
    scale: f32,
}

pub(super) struct Linear {
    w: usize,
    b: Option<usize>,
    lora: Option<Lora>,
}

impl Linear {
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let (x, w) = (tape.autocast(x)?, tape.autocast(p[self.w])?);
        let b = self.b.map(|b| tape.autocast(p[b])).transpose()?;
        let y = tape.linear(x, w, b)?;
        let Some(l) = &self.lora else { return Ok(y) };
        let (a, b) = (tape.autocast(p[l.a])?, tape.autocast(p[l.b])?);
        let down = tape.linear(x, a, None)?;
        let up = tape.linear(down, b, None)?;
        let up = tape.scale(up, l.scale)?;
        tape.add(y, up)
    }
}

/// A group norm, or (with `groups` 0) a layer norm over the last axis, in the compute dtype (the
/// kernels and the gradient take the statistics in f32).
pub(super) struct Norm {
    gamma: usize,
    beta: usize,
    groups: usize,
    eps: f32,
}

impl Norm {
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let (x, gamma, beta) = (tape.autocast(x)?, tape.autocast(p[self.gamma])?, tape.autocast(p[self.beta])?);
        if self.groups == 0 {
            return tape.layer_norm(x, gamma, beta, self.eps);
        }
        tape.group_norm(x, self.groups, gamma, beta, self.eps)
    }
}

/// diffusers' `ResnetBlock2D` with the default time embedding norm and output scale 1.
pub(super) struct Resnet {
    norm1: Norm,
    conv1: Conv,
    time_emb_proj: Linear,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    /// `silu_temb`: SiLU of the time embedding, shared by every resnet.
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, silu_temb: Var) -> Result<Var> {
        let h = self.norm1.forward(tape, p, x)?;
        let h = tape.silu(h)?;
        let h = self.conv1.forward(tape, p, h)?;
        let t = self.time_emb_proj.forward(tape, p, silu_temb)?;
        let h = tape.add_per_channel(h, t)?;
        let h = self.norm2.forward(tape, p, h)?;
        let h = tape.silu(h)?;
        let h = self.conv2.forward(tape, p, h)?;
        let shortcut = match &self.shortcut {
            Some(c) => c.forward(tape, p, x)?,
            None => x,
        };
        tape.add(shortcut, h)
    }
}

/// diffusers' `Attention` on tokens: softmax(q kᵀ / √d) v per head, materialised.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `to_out(attention(q(x), k(context), v(context)))` for tokens `x` `[B, N, dim]` and
    /// `context` `[B, L, context_dim]`.
    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, context: Var) -> Result<Var> {
        let (heads, d) = (self.heads, self.head_dim);
        // [B, T, heads·d] -> [B·heads, T, d] (diffusers' head_to_batch_dim).
        let split = |lin: &Linear, input: Var, tape: &mut Tape| -> Result<Var> {
            let v = lin.forward(tape, p, input)?;
            let &[b, t, _] = tape.value(v).shape() else { return Err(Error::Shape("attention tokens must be [B, N, C]".into())) };
            let v = tape.reshape(v, &[b, t, heads, d])?;
            let v = tape.permute(v, &[0, 2, 1, 3])?;
            tape.reshape(v, &[b * heads, t, d])
        };
        let &[b, n, _] = tape.value(x).shape() else { return Err(Error::Shape("attention tokens must be [B, N, C]".into())) };
        let q = split(&self.to_q, x, tape)?;
        let k = split(&self.to_k, context, tape)?;
        let v = split(&self.to_v, context, tape)?;
        let scores = tape.bmm(q, k, true)?;
        let probs = tape.softmax(scores, (d as f32).powf(-0.5))?;
        let out = tape.bmm(probs, v, false)?;
        let out = tape.reshape(out, &[b, heads, n, d])?;
        let out = tape.permute(out, &[0, 2, 1, 3])?;
        let out = tape.reshape(out, &[b, n, heads * d])?;
        self.to_out.forward(tape, p, out)
    }
}

/// `[B, C, H, W]` -> tokens `[B, H·W, C]`.
fn to_tokens(tape: &mut Tape, x: Var) -> Result<Var> {
    let &[b, c, h, w] = tape.value(x).shape() else { return Err(Error::Shape("a feature map must be [B, C, H, W]".into())) };
    let flat = tape.reshape(x, &[b, c, h * w])?;
    tape.permute(flat, &[0, 2, 1])
}

/// Tokens `[B, H·W, C]` -> `[B, C, H, W]`.
fn to_map(tape: &mut Tape, t: Var, h: usize, w: usize) -> Result<Var> {
    let &[b, _, c] = tape.value(t).shape() else { return Err(Error::Shape("tokens must be [B, N, C]".into())) };
    let t = tape.permute(t, &[0, 2, 1])?;
    tape.reshape(t, &[b, c, h, w])
}

/// `UNet2DModel`'s attention over pixels with a group norm and a residual connection.
pub(super) struct SpatialAttention {
    norm: Norm,
    attention: Attention,
}

impl SpatialAttention {
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let &[_, _, h, w] = tape.value(x).shape() else { return Err(Error::Shape("attention input must be [B, C, H, W]".into())) };
        let y = self.norm.forward(tape, p, x)?;
        let tokens = to_tokens(tape, y)?;
        let out = self.attention.forward(tape, p, tokens, tokens)?;
        let out = to_map(tape, out, h, w)?;
        tape.add(out, x)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each pre-norm
/// with a residual connection.
struct TransformerBlock {
    only_cross: bool,
    norm1: Norm,
    attn1: Attention,
    norm2: Norm,
    attn2: Attention,
    norm3: Norm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, context: Var) -> Result<Var> {
        let n = self.norm1.forward(tape, p, x)?;
        let a = self.attn1.forward(tape, p, n, if self.only_cross { context } else { n })?;
        let x = tape.add(a, x)?;
        let n = self.norm2.forward(tape, p, x)?;
        let a = self.attn2.forward(tape, p, n, context)?;
        let x = tape.add(a, x)?;
        let n = self.norm3.forward(tape, p, x)?;
        let h = self.ff_proj.forward(tape, p, n)?;
        let h = tape.geglu(h)?;
        let h = self.ff_out.forward(tape, p, h)?;
        tape.add(h, x)
    }
}

/// 1x1 convolutions (SD 1.x) or linears (`use_linear_projection`, SD 2.x).
enum Projection {
    Conv(Conv),
    Linear(Linear),
}

/// `Transformer2DModel`: group norm, projection in, transformer blocks, projection out, residual.
pub(super) struct Transformer2D {
    norm: Norm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
    inner: usize,
}

impl Transformer2D {
    /// `x + proj_out(blocks(proj_in(norm(x))))` for `x` `[B, C, H, W]`, attending to `context`
    /// `[B, L, cross_dim]`.
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, context: Var) -> Result<Var> {
        let &[_, _, h, w] = tape.value(x).shape() else { return Err(Error::Shape("transformer input must be [B, C, H, W]".into())) };
        let n = self.norm.forward(tape, p, x)?;
        let mut t = match &self.proj_in {
            Projection::Conv(c) => {
                let y = c.forward(tape, p, n)?;
                to_tokens(tape, y)?
            }
            Projection::Linear(l) => {
                let tokens = to_tokens(tape, n)?;
                l.forward(tape, p, tokens)?
            }
        };
        debug_assert_eq!(tape.value(t).shape()[2], self.inner);
        for block in &self.blocks {
            t = block.forward(tape, p, t, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(c) => {
                let map = to_map(tape, t, h, w)?;
                c.forward(tape, p, map)?
            }
            Projection::Linear(l) => {
                let y = l.forward(tape, p, t)?;
                to_map(tape, y, h, w)?
            }
        };
        tape.add(out, x)
    }
}

/// diffusers' `Timesteps` + `TimestepEmbedding`: `silu(linear_2(silu(linear_1(sinusoid(t)))))`
/// per batch item (the SiLU every resnet applies first).
pub(super) struct TimestepMlp {
    sinusoid: TimestepEmbedding,
    linear_1: Linear,
    linear_2: Linear,
}

impl Registry {
    /// `time_embedding`: `dim` sinusoid channels to `temb`.
    pub fn timestep_mlp(&mut self, dim: usize, temb: usize, flip_sin_to_cos: bool, freq_shift: f32) -> TimestepMlp {
        TimestepMlp {
            sinusoid: TimestepEmbedding { dim, flip_sin_to_cos, downscale_freq_shift: freq_shift, scale: 1.0, max_period: 10000.0 },
            linear_1: self.linear("time_embedding.linear_1", dim, temb),
            linear_2: self.linear("time_embedding.linear_2", temb, temb),
        }
    }
}

impl TimestepMlp {
    pub fn forward(&self, tape: &mut Tape, p: &[Var], timesteps: &[f32]) -> Result<Var> {
        let gpu = tape.gpu();
        let t = gpu.upload(&[timesteps.len()], DType::F32, timesteps)?;
        let sinusoid: Tensor = ops::timestep_embedding(gpu, &t, &self.sinusoid, DType::F32)?;
        let sinusoid = tape.constant(sinusoid)?;
        let emb = self.linear_1.forward(tape, p, sinusoid)?;
        let emb = tape.silu(emb)?;
        let emb = self.linear_2.forward(tape, p, emb)?;
        tape.silu(emb)
    }
}
