//! `UNet2DModel`: the denoiser of the latent diffusion paper's unconditional and
//! image-conditioned models (e.g. CompVis' CelebA-HQ LDM and the 4x super-resolution LDM),
//! built from its config.json.
//!
//! eps = conv_out(silu(norm(up(mid(down(conv_in(x)), emb))))), where `emb` is the MLP of the
//! sinusoidal timestep embedding, plus a class embedding when the model has one. Its `Attn*`
//! blocks attend over pixels (self-attention), not to text.

use serde::Deserialize;

use super::resnet::TimeEmbeddingNorm;
use super::unet_2d_blocks::{block_kind, BlockAttention, BlockSettings, TimestepMlp, UNetBody, UNetBodyConfig};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation};

/// `sample_size`: one number, or `[height, width]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

impl SampleSize {
    /// `(height, width)`.
    pub fn height_width(&self) -> (usize, usize) {
        match self {
            SampleSize::Square(s) => (*s, *s),
            SampleSize::HeightWidth([h, w]) => (*h, *w),
        }
    }
}

/// `unet/config.json` of a `UNet2DModel`; keys mirror diffusers, unknown keys are ignored,
/// missing ones take diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UNet2DConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub freq_shift: f32,
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block_scale_factor: f32,
    pub downsample_padding: usize,
    pub downsample_type: String,
    pub upsample_type: String,
    pub act_fn: String,
    /// Channels per attention head; `None`: one head over all of a block's channels.
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: usize,
    pub attn_norm_num_groups: Option<usize>,
    pub norm_eps: f32,
    pub resnet_time_scale_shift: String,
    pub add_attention: bool,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
}

impl Default for UNet2DConfig {
    fn default() -> Self {
        Self {
            sample_size: None, in_channels: 3, out_channels: 3, center_input_sample: false, time_embedding_type: "positional".into(),
            time_embedding_dim: None, freq_shift: 0.0, flip_sin_to_cos: true,
            down_block_types: ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"].map(String::from).to_vec(),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"].map(String::from).to_vec(),
            block_out_channels: vec![224, 448, 672, 896], layers_per_block: 2, mid_block_scale_factor: 1.0, downsample_padding: 1,
            downsample_type: "conv".into(), upsample_type: "conv".into(), act_fn: "silu".into(), attention_head_dim: Some(8),
            norm_num_groups: 32, attn_norm_num_groups: None, norm_eps: 1e-5, resnet_time_scale_shift: "default".into(),
            add_attention: true, class_embed_type: None, num_class_embeds: None,
        }
    }
}

/// How class labels enter the time embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassEmbedKind {
    /// `nn.Embedding(num_class_embeds, temb)`: labels are integer ids.
    Table(usize),
    /// Labels are embedded like timesteps, then through their own MLP (e.g. noise levels).
    Timestep,
    /// Labels are already `[B, temb]` embeddings.
    Identity,
}

impl UNet2DConfig {
    /// Rejects what this implementation does not run, saying which key is the problem.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let unsupported = |what: String| Err(Error::Model(format!("unet config: {what} is not supported by ldm-web's UNet2DModel")));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Model(format!("unet config has {n} block_out_channels, {} down and {} up block types; they must match", self.down_block_types.len(), self.up_block_types.len())));
        }
        if self.layers_per_block == 0 || self.norm_num_groups == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return Err(Error::Model("unet config: layers_per_block, norm_num_groups, in_channels and out_channels must be positive".into()));
        }
        for (types, kind) in [(&self.down_block_types, "Down"), (&self.up_block_types, "Up")] {
            for t in types {
                match block_kind(t) {
                    Some((_, false)) if t.contains(kind) => {}
                    _ => return unsupported(format!("{} block {t} (DownBlock2D, AttnDownBlock2D, UpBlock2D and AttnUpBlock2D are)", kind.to_lowercase())),
                }
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2D") => {}
            Some(other) => return unsupported(format!("mid_block_type {other:?}")),
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let head_dim = self.head_dim(i);
            if c % self.norm_num_groups != 0 || head_dim == 0 || head_dim > c {
                return Err(Error::Model(format!("unet block {i}: {c} channels do not divide into {} groups or heads of {head_dim} channels", self.norm_num_groups)));
            }
        }
        if let Some(g) = self.attn_norm_num_groups {
            if g == 0 || self.block_out_channels.last().is_some_and(|c| c % g != 0) {
                return Err(Error::Model(format!("unet config: attn_norm_num_groups {g} does not divide the mid block's channels")));
            }
        }
        if self.time_embedding_type != "positional" {
            return unsupported(format!("time_embedding_type {:?} (only \"positional\")", self.time_embedding_type));
        }
        if self.downsample_type != "conv" || self.upsample_type != "conv" || self.downsample_padding > 1 {
            return unsupported(format!("downsample_type {:?} / upsample_type {:?} / downsample_padding {}", self.downsample_type, self.upsample_type, self.downsample_padding));
        }
        if self.act_fn != "silu" {
            return unsupported(format!("act_fn {:?}", self.act_fn));
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor > 0.0) {
            return Err(Error::Model(format!("unet config: mid_block_scale_factor {} must be positive", self.mid_block_scale_factor)));
        }
        TimeEmbeddingNorm::from_config(&self.resnet_time_scale_shift)?;
        self.class_embedding()?;
        Ok(())
    }

    /// Channels per attention head in block `i`.
    pub fn head_dim(&self, i: usize) -> usize {
        self.attention_head_dim.unwrap_or_else(|| self.block_out_channels.get(i).copied().unwrap_or(0))
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    /// The blocks this config describes (block i's settings; up block i mirrors down block
    /// n - 1 - i).
    pub fn body_config(&self) -> Result<UNetBodyConfig<'_>> {
        let config = self;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = config.time_embed_dim();
        let time_norm = TimeEmbeddingNorm::from_config(&config.resnet_time_scale_shift)?;
        let attention = |types: &[String], i: usize, r: usize| {
            block_kind(&types[i]).is_some_and(|(a, _)| a).then(|| BlockAttention::SelfAttention { head_dim: config.head_dim(r) })
        };
        // diffusers: the mid attention normalises with the resnets' groups only with the default
        // time embedding, unless attn_norm_num_groups says otherwise.
        let mid_groups = config.attn_norm_num_groups.or((time_norm == TimeEmbeddingNorm::Default).then_some(config.norm_num_groups));
        let mid_attention = config.add_attention.then(|| BlockAttention::SelfAttention { head_dim: config.head_dim(n - 1) });
        Ok(UNetBodyConfig {
            in_channels: config.in_channels,
            out_channels: config.out_channels,
            block_out_channels: ch,
            layers_per_block: vec![config.layers_per_block; n],
            down_attention: (0..n).map(|i| attention(&config.down_block_types, i, i)).collect(),
            up_attention: (0..n).map(|i| attention(&config.up_block_types, i, n - 1 - i)).collect(),
            mid: config.mid_block_type.is_some().then_some((mid_attention, mid_groups, config.mid_block_scale_factor)),
            downsample_padding: config.downsample_padding,
            settings: BlockSettings { temb_channels: temb, groups: config.norm_num_groups, eps: config.norm_eps, cross_attention_dim: 0, time_norm },
        })
    }

    /// The class embedding this config asks for, if any.
    pub fn class_embedding(&self) -> Result<Option<ClassEmbedKind>> {
        match (self.class_embed_type.as_deref(), self.num_class_embeds) {
            (None, None) => Ok(None),
            (None, Some(0)) => Err(Error::Model("unet config: num_class_embeds is 0".into())),
            (None, Some(n)) => Ok(Some(ClassEmbedKind::Table(n))),
            (Some("timestep"), _) => Ok(Some(ClassEmbedKind::Timestep)),
            (Some("identity"), _) => Ok(Some(ClassEmbedKind::Identity)),
            (Some(other), _) => Err(Error::Model(format!("unet config: class_embed_type {other:?} is not supported (\"timestep\" and \"identity\" are)"))),
        }
    }

    /// How much smaller the innermost feature map is than the sample.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The class embedding's weights.
enum ClassEmbedding {
    Table(Tensor),
    Timestep(TimestepMlp),
    Identity,
}

/// `UNet2DModel`.
pub struct UNet2DModel {
    pub config: UNet2DConfig,
    time_embedding: TimestepMlp,
    class_embedding: Option<ClassEmbedding>,
    body: UNetBody,
}

impl UNet2DModel {
    /// Builds the model from `config`, reading weights under `w`.
    pub async fn load(w: &W<'_, '_>, config: UNet2DConfig) -> Result<Self> {
        config.validate()?;
        let ch = &config.block_out_channels;
        let temb = config.time_embed_dim();
        let body = config.body_config()?;
        let time_embedding = TimestepMlp::load(&w.sub("time_embedding"), ch[0], temb, config.flip_sin_to_cos, config.freq_shift).await?;
        let class_embedding = match config.class_embedding()? {
            None => None,
            Some(ClassEmbedKind::Table(classes)) => Some(ClassEmbedding::Table(w.get("class_embedding.weight", &[classes, temb]).await?)),
            Some(ClassEmbedKind::Timestep) => Some(ClassEmbedding::Timestep(TimestepMlp::load(&w.sub("class_embedding"), ch[0], temb, config.flip_sin_to_cos, config.freq_shift).await?)),
            Some(ClassEmbedKind::Identity) => Some(ClassEmbedding::Identity),
        };
        let body = UNetBody::load(w, &body).await?;
        Ok(Self { config, time_embedding, class_embedding, body })
    }

    /// Predicts noise (or v, as trained) for `sample` `[B, C, H, W]` at `timestep`.
    /// `class_labels`: one per batch item (ids or values), or `B x temb` for an identity
    /// embedding; required exactly when the model has a class embedding.
    pub fn forward(&self, gpu: &Gpu, sample: &Tensor, timestep: f32, class_labels: Option<&[f32]>) -> Result<Tensor> {
        let &[b, c, h, w] = sample.shape() else { return Err(Error::Shape(format!("unet sample must be [B, C, H, W], got {:?}", sample.shape()))) };
        let f = self.config.downsample_factor();
        if c != self.config.in_channels || h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(Error::Input(format!("UNet2DModel input {:?} must have {} channels and a size divisible by {f}", sample.shape(), self.config.in_channels)));
        }
        let dtype = sample.dtype();
        let t = vec![timestep; b];
        // Every resnet applies SiLU to the embedding first: do it once (in linear_2's epilogue
        // when nothing is added to it).
        let silu_emb = match (&self.class_embedding, class_labels) {
            (None, None) => self.time_embedding.forward(gpu, &t, dtype, Activation::Silu)?,
            (Some(kind), Some(labels)) => {
                let emb = self.time_embedding.forward(gpu, &t, dtype, Activation::None)?;
                let class = self.embed_classes(gpu, kind, labels, b, dtype)?;
                ops::activation(gpu, &ops::add(gpu, &emb, &class)?, Activation::Silu)?
            }
            (None, Some(_)) => return Err(Error::Input("this UNet2DModel has no class embedding; give no class labels".into())),
            (Some(_), None) => return Err(Error::Input("this UNet2DModel is class-conditional; it needs class labels".into())),
        };
        let x = if self.config.center_input_sample { ops::scale(gpu, sample, 2.0, -1.0)? } else { sample.clone() };
        self.body.forward(gpu, &x, &silu_emb, None, None)
    }

    fn embed_classes(&self, gpu: &Gpu, kind: &ClassEmbedding, labels: &[f32], b: usize, dtype: DType) -> Result<Tensor> {
        let temb = self.config.time_embed_dim();
        match kind {
            ClassEmbedding::Table(table) => {
                let classes = table.dim(0);
                let ids = labels.iter().map(|&l| {
                    if l >= 0.0 && l.fract() == 0.0 && (l as usize) < classes { Ok(l as u32) } else { Err(Error::Input(format!("class label {l} is not one of the model's {classes} classes"))) }
                });
                let ids = ids.collect::<Result<Vec<u32>>>()?;
                if ids.len() != b {
                    return Err(Error::Input(format!("{} class labels for a batch of {b}", ids.len())));
                }
                ops::embedding(gpu, &ids, table)
            }
            ClassEmbedding::Timestep(mlp) => {
                if labels.len() != b {
                    return Err(Error::Input(format!("{} class labels for a batch of {b}", labels.len())));
                }
                mlp.forward(gpu, labels, dtype, Activation::None)
            }
            ClassEmbedding::Identity => {
                if labels.len() != b * temb {
                    return Err(Error::Input(format!("identity class embeddings must be {b} x {temb} values, got {}", labels.len())));
                }
                gpu.upload(&[b, temb], dtype, labels)
            }
        }
    }
}
