//! What both trainable UNets are made of around their embeddings, built from the same
//! [`UNetBodyConfig`] the inference models load: `conv_in`, the down blocks (resnets, each
//! followed by its attention), the mid block, the up blocks fed the skip states, group norm +
//! SiLU, `conv_out`.

use std::rc::Rc;

use super::layers::{Conv, Norm, Registry, Resnet, Settings, SpatialAttention, Transformer2D};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::models::unet_2d_blocks::{BlockAttention, UNetBodyConfig};
use crate::models::resnet::TimeEmbeddingNorm;
use crate::ops::Conv2dSpec;

/// The attention after a resnet: over pixels (`UNet2DModel`) or a transformer attending to the
/// text (`UNet2DConditionModel`).
enum AttentionLayer {
    Spatial(SpatialAttention),
    Cross(Transformer2D),
}

impl AttentionLayer {
    #[allow(clippy::too_many_arguments)]
    fn build(r: &mut Registry, prefix: &str, channels: usize, kind: BlockAttention, groups: usize, s: &Settings, cross_dim: usize, linear_projection: bool) -> Self {
        match kind {
            BlockAttention::SelfAttention { head_dim } => Self::Spatial(r.spatial_attention(prefix, channels, head_dim, groups, s.eps)),
            BlockAttention::Cross { heads, transformer_layers, only_cross } => {
                Self::Cross(r.transformer(prefix, channels, heads, transformer_layers, cross_dim, s.groups, only_cross, linear_projection))
            }
        }
    }

    fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, context: Option<Var>) -> Result<Var> {
        match self {
            Self::Spatial(a) => a.forward(tape, p, x),
            Self::Cross(t) => t.forward(tape, p, x, context.ok_or_else(|| Error::Input("cross-attention blocks need text embeddings".into()))?),
        }
    }
}

/// A down or up block: resnets, each followed by its attention if any, then the resampling
/// convolution.
struct Block {
    resnets: Vec<Rc<Resnet>>,
    attentions: Vec<Rc<AttentionLayer>>,
    resample: Option<Conv>,
}

/// `UNetMidBlock2D` / `UNetMidBlock2DCrossAttn`: resnet, (attention, resnet).
struct Mid {
    first: Rc<Resnet>,
    attention: Option<Rc<AttentionLayer>>,
    second: Rc<Resnet>,
}

/// The UNet body on a tape; parameters are indices into the [`Registry`] it was built with.
pub(super) struct UNetBodyTrainable {
    /// Recompute each resnet's and attention's activations in the backward pass instead of
    /// keeping them (diffusers' `enable_gradient_checkpointing`): less memory, one more forward.
    pub gradient_checkpointing: bool,
    conv_in: Conv,
    down: Vec<Block>,
    mid: Option<Mid>,
    up: Vec<Block>,
    norm_out: Norm,
    conv_out: Conv,
}

impl UNetBodyTrainable {
    /// The body `c` describes, with 1x1-convolution or (`linear_projection`) linear transformer
    /// projections, registering its parameters in `r`.
    pub fn build(r: &mut Registry, c: &UNetBodyConfig, linear_projection: bool) -> Result<Self> {
        let unsupported = |what: &str| Err(Error::Unsupported(format!("training a UNet with {what} is not supported; use a config without it")));
        if c.settings.time_norm != TimeEmbeddingNorm::Default {
            return unsupported("resnet_time_scale_shift other than \"default\"");
        }
        if c.downsample_padding != 1 {
            return unsupported("downsample_padding other than 1");
        }
        let st = &c.settings;
        let s = Settings { temb: st.temb_channels, groups: st.groups, eps: st.eps };
        let ch = c.block_out_channels;
        let n = ch.len();
        let attention = |r: &mut Registry, prefix: String, channels: usize, kind: BlockAttention, groups: usize| {
            Rc::new(AttentionLayer::build(r, &prefix, channels, kind, groups, &s, st.cross_attention_dim, linear_projection))
        };
        let conv_in = r.conv("conv_in", c.in_channels, ch[0], 3, Conv2dSpec::new(1, 1));
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let prefix = format!("down_blocks.{i}");
            let mut block = Block { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            for j in 0..c.layers_per_block[i] {
                block.resnets.push(Rc::new(r.resnet(&format!("{prefix}.resnets.{j}"), if j == 0 { cin } else { ch[i] }, ch[i], &s)));
                if let Some(kind) = c.down_attention[i] {
                    block.attentions.push(attention(r, format!("{prefix}.attentions.{j}"), ch[i], kind, s.groups));
                }
            }
            if i + 1 < n {
                block.resample = Some(r.conv(&format!("{prefix}.downsamplers.0.conv"), ch[i], ch[i], 3, Conv2dSpec::new(2, 1)));
            }
            down.push(block);
        }
        let mid = match c.mid {
            None => None,
            Some((kind, groups, scale)) => {
                if scale != 1.0 {
                    return unsupported("mid_block_scale_factor other than 1");
                }
                let cm = ch[n - 1];
                let first = Rc::new(r.resnet("mid_block.resnets.0", cm, cm, &s));
                let attention = match (kind, groups) {
                    (None, _) => None,
                    (Some(BlockAttention::SelfAttention { .. }), None) => return unsupported("a mid-block attention without its group norm"),
                    (Some(kind), groups) => Some(attention(r, "mid_block.attentions.0".into(), cm, kind, groups.unwrap_or(s.groups))),
                };
                Some(Mid { first, attention, second: Rc::new(r.resnet("mid_block.resnets.1", cm, cm, &s)) })
            }
        };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let (prev, out, input) = (if i == 0 { rev[0] } else { rev[i - 1] }, rev[i], rev[(i + 1).min(n - 1)]);
            let prefix = format!("up_blocks.{i}");
            let layers = c.layers_per_block[n - 1 - i] + 1;
            let mut block = Block { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            for j in 0..layers {
                let skip = if j == layers - 1 { input } else { out };
                let cin = if j == 0 { prev } else { out };
                block.resnets.push(Rc::new(r.resnet(&format!("{prefix}.resnets.{j}"), cin + skip, out, &s)));
                if let Some(kind) = c.up_attention[i] {
                    block.attentions.push(attention(r, format!("{prefix}.attentions.{j}"), out, kind, s.groups));
                }
            }
            if i + 1 < n {
                block.resample = Some(r.conv(&format!("{prefix}.upsamplers.0.conv"), out, out, 3, Conv2dSpec::new(1, 1)));
            }
            up.push(block);
        }
        let norm_out = r.group_norm("conv_norm_out", ch[0], s.groups, s.eps);
        let conv_out = r.conv("conv_out", ch[0], c.out_channels, 3, Conv2dSpec::new(1, 1));
        Ok(Self { gradient_checkpointing: false, conv_in, down, mid, up, norm_out, conv_out })
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
    fn attention(&self, tape: &mut Tape, p: &[Var], a: &Rc<AttentionLayer>, x: Var, context: Option<Var>) -> Result<Var> {
        if !self.gradient_checkpointing {
            return a.forward(tape, p, x, context);
        }
        let (a, n) = (Rc::clone(a), p.len());
        let inputs: Vec<Var> = p.iter().copied().chain([x]).chain(context).collect();
        tape.checkpoint(&inputs, Rc::new(move |t, v| a.forward(t, &v[..n], v[n], v.get(n + 1).copied())))
    }

    /// The prediction for `x` `[B, C, H, W]` given `silu(temb)` `[B, temb]` and, for
    /// cross-attention blocks, the text `[B, L, cross_dim]`.
    pub fn forward(&self, tape: &mut Tape, p: &[Var], x: Var, temb: Var, context: Option<Var>) -> Result<Var> {
        let mut x = self.conv_in.forward(tape, p, x)?;
        let mut skips = vec![x];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = self.resnet(tape, p, resnet, x, temb)?;
                if let Some(a) = block.attentions.get(j) {
                    x = self.attention(tape, p, a, x, context)?;
                }
                skips.push(x);
            }
            if let Some(down) = &block.resample {
                x = down.forward(tape, p, x)?;
                skips.push(x);
            }
        }
        if let Some(mid) = &self.mid {
            x = self.resnet(tape, p, &mid.first, x, temb)?;
            if let Some(a) = &mid.attention {
                x = self.attention(tape, p, a, x, context)?;
            }
            x = self.resnet(tape, p, &mid.second, x, temb)?;
        }
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| Error::Model("UNet skip connections do not match its blocks (a bug in ldm-web)".into()))?;
                x = tape.concat(&[x, skip], 1)?;
                x = self.resnet(tape, p, resnet, x, temb)?;
                if let Some(a) = block.attentions.get(j) {
                    x = self.attention(tape, p, a, x, context)?;
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
