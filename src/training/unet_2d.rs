//! `UNet2DModel` on a [`Tape`]: the same network as [`crate::models::unet_2d`], built from the same
//! `config.json` and with diffusers' parameter names, recorded so that its gradients can be taken.
//!
//! eps = conv_out(silu(norm(up(mid(down(conv_in(x)), emb))))), with emb = linear_2(silu(linear_1(
//! sinusoid(t)))) per batch item. The blocks are diffusers' `DownBlock2D` / `AttnDownBlock2D`,
//! `UNetMidBlock2D` and `UpBlock2D` / `AttnUpBlock2D`; attention is the materialised
//! softmax(q kᵀ / √d) v, whose gradient is the tape's.

use std::rc::Rc;

use super::{Init, ParamSpec};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::gpu::{DType, Tensor};
use crate::models::unet_2d::UNet2DConfig;
use crate::models::unet_2d_blocks::block_kind;
use crate::ops::embedding::TimestepEmbedding;
use crate::ops::{self, Conv2dSpec};

/// Collects the parameters' names, shapes and initialisations as the modules are built.
struct Registry {
    specs: Vec<ParamSpec>,
}

impl Registry {
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init) -> usize {
        self.specs.push(ParamSpec { name, shape, init });
        self.specs.len() - 1
    }

    fn conv(&mut self, prefix: &str, cin: usize, cout: usize, k: usize, spec: Conv2dSpec) -> Conv {
        let fan_in = cin * k * k;
        let w = self.add(format!("{prefix}.weight"), vec![cout, cin, k, k], Init::Uniform { fan_in });
        let b = self.add(format!("{prefix}.bias"), vec![cout], Init::Uniform { fan_in });
        Conv { w, b, spec }
    }

    fn linear(&mut self, prefix: &str, cin: usize, cout: usize) -> Linear {
        let w = self.add(format!("{prefix}.weight"), vec![cout, cin], Init::Uniform { fan_in: cin });
        let b = self.add(format!("{prefix}.bias"), vec![cout], Init::Uniform { fan_in: cin });
        Linear { w, b }
    }

    fn norm(&mut self, prefix: &str, channels: usize, groups: usize, eps: f32) -> Norm {
        let gamma = self.add(format!("{prefix}.weight"), vec![channels], Init::Ones);
        let beta = self.add(format!("{prefix}.bias"), vec![channels], Init::Zeros);
        Norm { gamma, beta, groups, eps }
    }

    fn resnet(&mut self, prefix: &str, cin: usize, cout: usize, s: &Settings) -> Resnet {
        Resnet {
            norm1: self.norm(&format!("{prefix}.norm1"), cin, s.groups, s.eps),
            conv1: self.conv(&format!("{prefix}.conv1"), cin, cout, 3, Conv2dSpec::new(1, 1)),
            time_emb_proj: self.linear(&format!("{prefix}.time_emb_proj"), s.temb, cout),
            norm2: self.norm(&format!("{prefix}.norm2"), cout, s.groups, s.eps),
            conv2: self.conv(&format!("{prefix}.conv2"), cout, cout, 3, Conv2dSpec::new(1, 1)),
            shortcut: (cin != cout).then(|| self.conv(&format!("{prefix}.conv_shortcut"), cin, cout, 1, Conv2dSpec::new(1, 0))),
        }
    }

    fn attention(&mut self, prefix: &str, channels: usize, head_dim: usize, groups: usize, eps: f32) -> Attention {
        Attention {
            norm: self.norm(&format!("{prefix}.group_norm"), channels, groups, eps),
            to_q: self.linear(&format!("{prefix}.to_q"), channels, channels),
            to_k: self.linear(&format!("{prefix}.to_k"), channels, channels),
            to_v: self.linear(&format!("{prefix}.to_v"), channels, channels),
            to_out: self.linear(&format!("{prefix}.to_out.0"), channels, channels),
            heads: channels / head_dim,
            head_dim,
        }
    }
}

struct Settings {
    temb: usize,
    groups: usize,
    eps: f32,
}

struct Conv {
    w: usize,
    b: usize,
    spec: Conv2dSpec,
}

impl Conv {
    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        tape.conv2d(x, p[self.w], Some(p[self.b]), self.spec)
    }
}

struct Linear {
    w: usize,
    b: usize,
}

impl Linear {
    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        tape.linear(x, p[self.w], Some(p[self.b]))
    }
}

struct Norm {
    gamma: usize,
    beta: usize,
    groups: usize,
    eps: f32,
}

impl Norm {
    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        tape.group_norm(x, self.groups, p[self.gamma], p[self.beta], self.eps)
    }
}

/// diffusers' `ResnetBlock2D` with the default time embedding norm and output scale 1.
struct Resnet {
    norm1: Norm,
    conv1: Conv,
    time_emb_proj: Linear,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    /// `silu_temb`: SiLU of the time embedding, shared by every resnet.
    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, silu_temb: Var) -> Result<Var> {
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

/// diffusers' `Attention` over pixels with a group norm and a residual connection.
struct Attention {
    norm: Norm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let &[b, c, h, w] = tape.value(x).shape() else { return Err(Error::Shape("attention input must be [B, C, H, W]".into())) };
        let (n, heads, d) = (h * w, self.heads, self.head_dim);
        let y = self.norm.forward(tape, p, x)?;
        let y = tape.reshape(y, &[b, c, n])?;
        let tokens = tape.permute(y, &[0, 2, 1])?;
        // [B, N, heads·d] -> [B·heads, N, d] (diffusers' head_to_batch_dim).
        let split = |lin: &Linear, tape: &mut Tape| -> Result<Var> {
            let v = lin.forward(tape, p, tokens)?;
            let v = tape.reshape(v, &[b, n, heads, d])?;
            let v = tape.permute(v, &[0, 2, 1, 3])?;
            tape.reshape(v, &[b * heads, n, d])
        };
        let q = split(&self.to_q, tape)?;
        let k = split(&self.to_k, tape)?;
        let v = split(&self.to_v, tape)?;
        let scores = tape.bmm(q, k, true)?;
        let probs = tape.softmax(scores, (d as f32).powf(-0.5))?;
        let out = tape.bmm(probs, v, false)?;
        let out = tape.reshape(out, &[b, heads, n, d])?;
        let out = tape.permute(out, &[0, 2, 1, 3])?;
        let out = tape.reshape(out, &[b, n, c])?;
        let out = self.to_out.forward(tape, p, out)?;
        let out = tape.permute(out, &[0, 2, 1])?;
        let out = tape.reshape(out, &[b, c, h, w])?;
        tape.add(out, x)
    }
}

/// A down or up block: resnets, each followed by attention in the `Attn*` blocks, then the
/// resampling convolution.
struct Block {
    resnets: Vec<Rc<Resnet>>,
    attentions: Vec<Rc<Attention>>,
    resample: Option<Conv>,
}

/// diffusers' `UNetMidBlock2D`: resnet, (attention, resnet).
struct Mid {
    first: Rc<Resnet>,
    attention: Option<Rc<Attention>>,
    second: Rc<Resnet>,
}

/// `UNet2DModel` recorded on a tape; parameters are indices into [`Self::params`].
pub struct UNet2DTrainable {
    pub config: UNet2DConfig,
    /// Recompute each resnet's and attention's activations in the backward pass instead of
    /// keeping them (diffusers' `enable_gradient_checkpointing`): less memory, one more forward.
    pub gradient_checkpointing: bool,
    params: Vec<ParamSpec>,
    sinusoid: TimestepEmbedding,
    time_1: Linear,
    time_2: Linear,
    conv_in: Conv,
    down: Vec<Block>,
    mid: Mid,
    up: Vec<Block>,
    norm_out: Norm,
    conv_out: Conv,
}

impl UNet2DTrainable {
    /// The network `config` describes (what [`crate::models::unet_2d::UNet2DModel`] runs, less
    /// class embeddings and the scale-shift time norm, which training does not support yet).
    pub fn new(config: UNet2DConfig) -> Result<Self> {
        config.validate()?;
        let unsupported = |what: &str| Err(Error::Unsupported(format!("training a UNet2DModel with {what} is not supported; use a config without it")));
        if config.resnet_time_scale_shift != "default" {
            return unsupported("resnet_time_scale_shift other than \"default\"");
        }
        if config.class_embedding()?.is_some() {
            return unsupported("a class embedding");
        }
        if config.center_input_sample {
            return unsupported("center_input_sample");
        }
        let ch = config.block_out_channels.clone();
        let n = ch.len();
        let s = Settings { temb: config.time_embed_dim(), groups: config.norm_num_groups, eps: config.norm_eps };
        let mut r = Registry { specs: Vec::new() };
        let time_1 = r.linear("time_embedding.linear_1", ch[0], s.temb);
        let time_2 = r.linear("time_embedding.linear_2", s.temb, s.temb);
        let conv_in = r.conv("conv_in", config.in_channels, ch[0], 3, Conv2dSpec::new(1, 1));
        let attends = |t: &str| block_kind(t).is_some_and(|(a, _)| a);
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let prefix = format!("down_blocks.{i}");
            let attn = attends(&config.down_block_types[i]);
            let mut block = Block { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            for j in 0..config.layers_per_block {
                block.resnets.push(Rc::new(r.resnet(&format!("{prefix}.resnets.{j}"), if j == 0 { cin } else { ch[i] }, ch[i], &s)));
                if attn {
                    block.attentions.push(Rc::new(r.attention(&format!("{prefix}.attentions.{j}"), ch[i], config.head_dim(i), s.groups, s.eps)));
                }
            }
            if i + 1 < n {
                let spec = Conv2dSpec::new(2, config.downsample_padding);
                block.resample = Some(r.conv(&format!("{prefix}.downsamplers.0.conv"), ch[i], ch[i], 3, spec));
            }
            down.push(block);
        }
        let c = ch[n - 1];
        let mid_groups = config.attn_norm_num_groups.unwrap_or(s.groups);
        let mid = Mid {
            first: Rc::new(r.resnet("mid_block.resnets.0", c, c, &s)),
            attention: config.add_attention.then(|| Rc::new(r.attention("mid_block.attentions.0", c, config.head_dim(n - 1), mid_groups, s.eps))),
            second: Rc::new(r.resnet("mid_block.resnets.1", c, c, &s)),
        };
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let (prev, out, input) = (if i == 0 { reversed[0] } else { reversed[i - 1] }, reversed[i], reversed[(i + 1).min(n - 1)]);
            let prefix = format!("up_blocks.{i}");
            let attn = attends(&config.up_block_types[i]);
            let layers = config.layers_per_block + 1;
            let mut block = Block { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            for j in 0..layers {
                let skip = if j == layers - 1 { input } else { out };
                let cin = if j == 0 { prev } else { out };
                block.resnets.push(Rc::new(r.resnet(&format!("{prefix}.resnets.{j}"), cin + skip, out, &s)));
                if attn {
                    block.attentions.push(Rc::new(r.attention(&format!("{prefix}.attentions.{j}"), out, config.head_dim(n - 1 - i), s.groups, s.eps)));
                }
            }
            if i + 1 < n {
                block.resample = Some(r.conv(&format!("{prefix}.upsamplers.0.conv"), out, out, 3, Conv2dSpec::new(1, 1)));
            }
            up.push(block);
        }
        let norm_out = r.norm("conv_norm_out", ch[0], s.groups, s.eps);
        let conv_out = r.conv("conv_out", ch[0], config.out_channels, 3, Conv2dSpec::new(1, 1));
        let sinusoid = TimestepEmbedding { dim: ch[0], flip_sin_to_cos: config.flip_sin_to_cos, downscale_freq_shift: config.freq_shift, scale: 1.0, max_period: 10000.0 };
        Ok(Self { config, gradient_checkpointing: false, params: r.specs, sinusoid, time_1, time_2, conv_in, down, mid, up, norm_out, conv_out })
    }

    /// A resnet, checkpointed when asked (its inputs: every parameter, x and the embedding).
    fn resnet(&self, tape: &mut Tape, p: &[Var], r: &Rc<Resnet>, x: Var, temb: Var) -> Result<Var> {
        if !self.gradient_checkpointing {
            return r.forward(tape, p, x, temb);
        }
        let (r, n) = (Rc::clone(r), p.len());
        let inputs: Vec<Var> = p.iter().copied().chain([x, temb]).collect();
        tape.checkpoint(&inputs, Rc::new(move |t, v| r.forward(t, &v[..n], v[n], v[n + 1])))
    }

    /// An attention layer, checkpointed when asked.
    fn attention(&self, tape: &mut Tape, p: &[Var], a: &Rc<Attention>, x: Var) -> Result<Var> {
        if !self.gradient_checkpointing {
            return a.forward(tape, p, x);
        }
        let (a, n) = (Rc::clone(a), p.len());
        let inputs: Vec<Var> = p.iter().copied().chain([x]).collect();
        tape.checkpoint(&inputs, Rc::new(move |t, v| a.forward(t, &v[..n], v[n])))
    }

    /// The parameters in diffusers' names and shapes, in the order [`Self::forward`] takes them.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// The prediction for `sample` `[B, C, H, W]` with one timestep per batch item; `p` holds the
    /// tape's variables of [`Self::params`], in order.
    pub fn forward(&self, tape: &mut Tape, p: &[Var], sample: Var, timesteps: &[f32]) -> Result<Var> {
        if p.len() != self.params.len() {
            return Err(Error::Shape(format!("{} parameter variables for a UNet of {}", p.len(), self.params.len())));
        }
        let shape = tape.value(sample).shape().to_vec();
        let f = self.config.downsample_factor();
        match shape[..] {
            [b, c, h, w] if b == timesteps.len() && c == self.config.in_channels && h % f == 0 && w % f == 0 && h > 0 && w > 0 => {}
            _ => return Err(Error::Input(format!("UNet2DModel training input {shape:?} must be [B, {}, H, W] with H and W divisible by {f} and one timestep per item", self.config.in_channels))),
        }
        let gpu = tape.gpu();
        let t = gpu.upload(&[timesteps.len()], DType::F32, timesteps)?;
        let sinusoid: Tensor = ops::timestep_embedding(gpu, &t, &self.sinusoid, DType::F32)?;
        let sinusoid = tape.constant(sinusoid)?;
        let emb = self.time_1.forward(tape, p, sinusoid)?;
        let emb = tape.silu(emb)?;
        let emb = self.time_2.forward(tape, p, emb)?;
        let temb = tape.silu(emb)?;

        let mut x = self.conv_in.forward(tape, p, sample)?;
        let mut skips = vec![x];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = self.resnet(tape, p, resnet, x, temb)?;
                if let Some(a) = block.attentions.get(j) {
                    x = self.attention(tape, p, a, x)?;
                }
                skips.push(x);
            }
            if let Some(down) = &block.resample {
                x = down.forward(tape, p, x)?;
                skips.push(x);
            }
        }
        x = self.resnet(tape, p, &self.mid.first, x, temb)?;
        if let Some(a) = &self.mid.attention {
            x = self.attention(tape, p, a, x)?;
        }
        x = self.resnet(tape, p, &self.mid.second, x, temb)?;
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| Error::Model("UNet skip connections do not match its blocks (a bug in ldm-web)".into()))?;
                x = tape.concat(&[x, skip], 1)?;
                x = self.resnet(tape, p, resnet, x, temb)?;
                if let Some(a) = block.attentions.get(j) {
                    x = self.attention(tape, p, a, x)?;
                }
            }
            if let Some(conv) = &block.resample {
                x = tape.upsample_nearest2x(x)?;
                x = conv.forward(tape, p, x)?;
            }
        }
        let x = self.norm_out.forward(tape, p, x)?;
        let x = tape.silu(x)?;
        self.conv_out.forward(tape, p, x)
    }
}
