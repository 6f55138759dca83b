//! `UNet2DConditionModel`: the denoiser of Stable Diffusion 1.x / 2.x and SDXL, built from its
//! config.json.
//!
//! eps = conv_out(silu(norm(up(mid(down(conv_in(x)), t, c)))), with the timestep embedded
//! sinusoidally and passed through a two-layer MLP into every resnet, and the text embedding `c`
//! attended to by every transformer. SDXL adds to the time embedding an MLP of the pooled text
//! embedding and the sinusoids of its size conditions (`addition_embed_type: "text_time"`);
//! LCM-distilled UNets add a projection of a guidance-scale embedding (`time_cond_proj_dim`).

use serde::{Deserialize, Serialize};

use super::nn::Linear;
use super::resnet::TimeEmbeddingNorm;
use super::unet_2d_blocks::{BlockAttention, BlockSettings, Residuals, TimestepMlp, UNetBody, UNetBodyConfig};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, embedding::TimestepEmbedding, Activation};

/// A config value that is one number for every block or one per block.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).copied().unwrap_or(0),
        }
    }
    fn check(&self, n: usize, key: &str) -> Result<()> {
        match self {
            PerBlock::Each(v) if v.len() != n => Err(Error::Model(format!("unet config {key} has {} entries for {n} blocks", v.len()))),
            PerBlock::Each(v) if v.contains(&0) => Err(Error::Model(format!("unet config {key} has a zero"))),
            PerBlock::One(0) => Err(Error::Model(format!("unet config {key} is zero"))),
            _ => Ok(()),
        }
    }
}

/// `unet/config.json`; keys mirror diffusers, unknown keys are ignored, missing ones take
/// diffusers' defaults.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: serde_json::Value,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f32,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    pub cross_attention_dim: PerBlock,
    pub transformer_layers_per_block: PerBlock,
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    /// Size of the class-label embedding table (`num_class_embeds`: 1000 noise levels for the
    /// x4 upscaler).
    pub num_class_embeds: Option<usize>,
    pub addition_embed_type: Option<String>,
    /// SDXL: width of each size condition's sinusoid (`add_time_proj`).
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: input width of `add_embedding` (pooled text width + conditions x sinusoid width).
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub encoder_hid_dim: Option<usize>,
    /// Keys diffusers has that change the network; only their defaults are run.
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub class_embeddings_concat: bool,
    pub cross_attention_norm: Option<String>,
    pub attention_type: Option<String>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        Self {
            sample_size: None, in_channels: 4, out_channels: 4, center_input_sample: false, flip_sin_to_cos: true, freq_shift: 0.0,
            down_block_types: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec(),
            only_cross_attention: serde_json::Value::Bool(false),
            block_out_channels: vec![320, 640, 1280, 1280], layers_per_block: PerBlock::One(2), downsample_padding: 1,
            mid_block_scale_factor: 1.0, act_fn: "silu".into(), norm_num_groups: 32, norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280), transformer_layers_per_block: PerBlock::One(1), attention_head_dim: PerBlock::One(8),
            num_attention_heads: None, dual_cross_attention: false, use_linear_projection: false, class_embed_type: None, num_class_embeds: None,
            addition_embed_type: None, addition_time_embed_dim: None, projection_class_embeddings_input_dim: None, upcast_attention: false,
            resnet_time_scale_shift: "default".into(), time_embedding_type: "positional".into(), time_cond_proj_dim: None, conv_in_kernel: 3,
            conv_out_kernel: 3, encoder_hid_dim: None, time_embedding_dim: None, time_embedding_act_fn: None, timestep_post_act: None,
            class_embeddings_concat: false, cross_attention_norm: None, attention_type: None, reverse_transformer_layers_per_block: None,
        }
    }
}

impl UNet2DConditionConfig {
    /// Rejects what this implementation does not run, saying which key is the problem.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let unsupported = |what: String| Err(Error::Model(format!("unet config: {what} is not supported yet (Stable Diffusion 1.x / 2.x, SDXL and LCM UNets are)")));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Model(format!("unet config has {n} block_out_channels, {} down and {} up block types; they must match", self.down_block_types.len(), self.up_block_types.len())));
        }
        for key in ["layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"] {
            let v = match key {
                "layers_per_block" => &self.layers_per_block,
                "cross_attention_dim" => &self.cross_attention_dim,
                "transformer_layers_per_block" => &self.transformer_layers_per_block,
                _ => &self.attention_head_dim,
            };
            v.check(n, key)?;
        }
        if let Some(h) = &self.num_attention_heads {
            h.check(n, "num_attention_heads")?;
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 || c % self.heads(i).max(1) != 0 {
                return Err(Error::Model(format!("unet block {i}: {c} channels do not divide into {} groups and {} heads", self.norm_num_groups, self.heads(i))));
            }
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return unsupported(format!("down block {t}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return unsupported(format!("up block {t}"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return unsupported(format!("mid_block_type {other:?}")),
        }
        if !matches!(self.cross_attention_dim, PerBlock::One(_)) {
            return unsupported("a per-block cross_attention_dim".into());
        }
        let only_cross_ok = match &self.only_cross_attention {
            serde_json::Value::Bool(_) => true,
            serde_json::Value::Array(v) => v.len() == n && v.iter().all(|b| b.is_boolean()),
            _ => false,
        };
        if !only_cross_ok {
            return Err(Error::Model(format!("unet config only_cross_attention must be a bool or {n} bools")));
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention".into());
        }
        // Class labels are embedded by a table (num_class_embeds, the x4 upscaler's noise level).
        if self.class_embed_type.is_some() || self.encoder_hid_dim.is_some() {
            return unsupported(format!("class_embed_type {:?} / encoder_hid_dim {:?}", self.class_embed_type, self.encoder_hid_dim));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none_or(|d| d == 0) || self.projection_class_embeddings_input_dim.is_none_or(|d| d == 0) {
                    return Err(Error::Model("unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim".into()));
                }
            }
            Some(other) => return unsupported(format!("addition_embed_type {other:?} (\"text_time\", SDXL's, is)")),
        }
        if self.time_cond_proj_dim == Some(0) {
            return Err(Error::Model("unet config: time_cond_proj_dim is zero".into()));
        }
        if self.time_embedding_dim.is_some() || self.time_embedding_act_fn.is_some() || self.timestep_post_act.is_some() || self.class_embeddings_concat {
            return unsupported("time_embedding_dim, time_embedding_act_fn, timestep_post_act or class_embeddings_concat".into());
        }
        if self.cross_attention_norm.is_some() || self.attention_type.as_deref().is_some_and(|t| t != "default") {
            return unsupported(format!("cross_attention_norm {:?} / attention_type {:?}", self.cross_attention_norm, self.attention_type));
        }
        if self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("reverse_transformer_layers_per_block".into());
        }
        if self.resnet_time_scale_shift != "default" || self.time_embedding_type != "positional" || self.act_fn != "silu" {
            return unsupported(format!("resnet_time_scale_shift {:?}, time_embedding_type {:?}, act_fn {:?}", self.resnet_time_scale_shift, self.time_embedding_type, self.act_fn));
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 || self.downsample_padding != 1 || self.mid_block_scale_factor != 1.0 || self.center_input_sample {
            return unsupported("conv_in/out_kernel other than 3, downsample_padding other than 1, mid_block_scale_factor or center_input_sample".into());
        }
        Ok(())
    }

    /// Attention heads in block `i`: `num_attention_heads`, or `attention_head_dim`, which
    /// diffusers has always (mis)read as the number of heads for these UNets.
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }

    /// `only_cross_attention` of down block `i` (one bool for all, or one per block).
    pub fn only_cross_attention(&self, i: usize) -> bool {
        match &self.only_cross_attention {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Array(v) => v.get(i).and_then(|b| b.as_bool()).unwrap_or(false),
            _ => false,
        }
    }

    /// Width of the timestep embedding.
    pub fn temb_channels(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// The blocks this config describes. Block i's settings; up block i mirrors down block
    /// n - 1 - i (diffusers reverses the per-block lists for the up blocks).
    pub fn body_config(&self) -> UNetBodyConfig<'_> {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let attention = |r: usize, only_cross: bool| BlockAttention::Cross { heads: self.heads(r), transformer_layers: self.transformer_layers_per_block.get(r), only_cross };
        let cross = |types: &[String], i: usize, r: usize| types[i].starts_with("CrossAttn").then(|| attention(r, self.only_cross_attention(r)));
        UNetBodyConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            block_out_channels: ch,
            layers_per_block: (0..n).map(|i| self.layers_per_block.get(i)).collect(),
            down_attention: (0..n).map(|i| cross(&self.down_block_types, i, i)).collect(),
            up_attention: (0..n).map(|i| cross(&self.up_block_types, i, n - 1 - i)).collect(),
            // diffusers' UNetMidBlock2DCrossAttn has no only_cross_attention.
            mid: Some((Some(attention(n - 1, false)), None, self.mid_block_scale_factor)),
            downsample_padding: self.downsample_padding,
            settings: BlockSettings {
                temb_channels: self.temb_channels(), groups: self.norm_num_groups, eps: self.norm_eps,
                cross_attention_dim: self.cross_attention_dim.get(0), time_norm: TimeEmbeddingNorm::Default,
            },
        }
    }

    /// How much smaller the innermost feature map is than the latent.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// SDXL's added conditions for every row of a UNet batch: the pooled text embedding and the
/// size (or aesthetic-score) conditions (diffusers' `added_cond_kwargs`).
pub struct AddedConditions {
    /// `[rows, projection_dim]`.
    pub text_embeds: Tensor,
    /// `rows x k` values (`original_size + crops_coords_top_left + target_size`, or with the
    /// aesthetic score instead of the target size).
    pub time_ids: Vec<f32>,
}

/// What conditions a UNet step besides the latents, the timestep and the text.
#[derive(Default, Clone, Copy)]
pub struct StepConditions<'a> {
    /// What ControlNets add to the skip states and the mid block.
    pub residuals: Option<&'a Residuals>,
    /// The class label of every row (`num_class_embeds`: the x4 upscaler's noise level).
    pub class_label: Option<u32>,
    /// SDXL (`addition_embed_type: "text_time"`).
    pub added: Option<&'a AddedConditions>,
    /// LCM: the guidance-scale embedding `[rows, time_cond_proj_dim]` (`timestep_cond`).
    pub timestep_cond: Option<&'a Tensor>,
}

/// SDXL's `add_time_proj` + `add_embedding`: an MLP of the pooled text embedding concatenated
/// with the sinusoid of every size condition.
struct TextTimeEmbedding {
    sinusoid: TimestepEmbedding,
    mlp_1: Linear,
    mlp_2: Linear,
    input_dim: usize,
}

impl TextTimeEmbedding {
    async fn load(w: &W<'_, '_>, c: &UNet2DConditionConfig) -> Result<Self> {
        let (dim, input_dim) = (c.addition_time_embed_dim.unwrap_or(0), c.projection_class_embeddings_input_dim.unwrap_or(0));
        Ok(Self {
            sinusoid: TimestepEmbedding { dim, flip_sin_to_cos: c.flip_sin_to_cos, downscale_freq_shift: c.freq_shift, scale: 1.0, max_period: 10000.0 },
            mlp_1: Linear::load(&w.sub("add_embedding.linear_1"), input_dim, c.temb_channels(), true).await?,
            mlp_2: Linear::load(&w.sub("add_embedding.linear_2"), c.temb_channels(), c.temb_channels(), true).await?,
            input_dim,
        })
    }

    /// `[rows, temb]` added to the time embedding.
    fn forward(&self, gpu: &Gpu, added: &AddedConditions, rows: usize, dtype: DType) -> Result<Tensor> {
        let text = &added.text_embeds;
        let k = added.time_ids.len() / rows.max(1);
        if text.dim(0) != rows || k * rows != added.time_ids.len() || text.dim(1) + k * self.sinusoid.dim != self.input_dim {
            return Err(Error::Input(format!(
                "this UNet's added embedding takes {} values per row, got a pooled text embedding of {} and {k} size conditions of {} (an SDXL refiner needs the aesthetic score instead of the target size, the base the target size)",
                self.input_dim, text.dim(1), self.sinusoid.dim
            )));
        }
        let ids = gpu.upload(&[added.time_ids.len()], DType::F32, &added.time_ids)?;
        let t = ops::timestep_embedding(gpu, &ids, &self.sinusoid, dtype)?.reshape(&[rows, k * self.sinusoid.dim])?;
        let x = ops::concat(gpu, &[text, &t], 1)?;
        let h = self.mlp_1.forward(gpu, &x, Activation::Silu)?;
        self.mlp_2.forward(gpu, &h, Activation::None)
    }
}

/// Everything a UNet (and a ControlNet, which shares it) embeds into the vector every resnet
/// takes: timestep, class label, SDXL's added conditions, LCM's guidance scale. Gives
/// `silu(emb)`, which every resnet applies first.
pub struct UNetEmbeddings {
    time_embedding: TimestepMlp,
    /// `[num_class_embeds, temb]`, added to the time embedding.
    class_embedding: Option<Tensor>,
    add_embedding: Option<TextTimeEmbedding>,
}

impl UNetEmbeddings {
    /// Loads the embeddings `config` describes under `w`.
    pub async fn load(w: &W<'_, '_>, config: &UNet2DConditionConfig) -> Result<Self> {
        let ch = &config.block_out_channels;
        let time_embedding = TimestepMlp::load_with_condition(&w.sub("time_embedding"), ch[0], config.temb_channels(), config.flip_sin_to_cos, config.freq_shift, config.time_cond_proj_dim).await?;
        let class_embedding = match config.num_class_embeds {
            Some(n) => Some(w.get("class_embedding.weight", &[n, config.temb_channels()]).await?),
            None => None,
        };
        let add_embedding = match config.addition_embed_type.as_deref() {
            Some("text_time") => Some(TextTimeEmbedding::load(w, config).await?),
            _ => None,
        };
        Ok(Self { time_embedding, class_embedding, add_embedding })
    }

    /// `silu(emb)` `[rows, temb]` at `timestep`.
    pub fn forward(&self, gpu: &Gpu, rows: usize, timestep: f32, dtype: DType, c: &StepConditions) -> Result<Tensor> {
        let plain = self.class_embedding.is_none() && self.add_embedding.is_none();
        // Without additions, SiLU runs in linear_2's epilogue.
        let emb = self.time_embedding.forward_with(gpu, &vec![timestep; rows], dtype, if plain { Activation::Silu } else { Activation::None }, c.timestep_cond)?;
        if plain {
            if c.class_label.is_some() {
                return Err(Error::Input("this UNet takes no class label".into()));
            }
            if c.added.is_some() {
                return Err(Error::Input("this UNet takes no added conditions (it is not an SDXL UNet)".into()));
            }
            return Ok(emb);
        }
        let mut emb = emb;
        match (&self.class_embedding, c.class_label) {
            (Some(table), Some(label)) => emb = ops::add(gpu, &emb, &ops::embedding(gpu, &vec![label; rows], table)?)?,
            (Some(_), None) => return Err(Error::Input("this UNet embeds a class label (the upscaler's noise level); none was given".into())),
            (None, Some(_)) => return Err(Error::Input("this UNet takes no class label".into())),
            (None, None) => {}
        }
        match (&self.add_embedding, c.added) {
            (Some(a), Some(added)) => emb = ops::add(gpu, &emb, &a.forward(gpu, added, rows, dtype)?)?,
            (Some(_), None) => return Err(Error::Input("this SDXL UNet needs the pooled text embedding and size conditions".into())),
            (None, Some(_)) => return Err(Error::Input("this UNet takes no added conditions (it is not an SDXL UNet)".into())),
            (None, None) => {}
        }
        ops::activation(gpu, &emb, Activation::Silu)
    }
}

/// `UNet2DConditionModel`.
pub struct UNet2DConditionModel {
    pub config: UNet2DConditionConfig,
    embeddings: UNetEmbeddings,
    body: UNetBody,
}

impl UNet2DConditionModel {
    /// Builds the model from `config`, reading weights under `w`.
    pub async fn load(w: &W<'_, '_>, config: UNet2DConditionConfig) -> Result<Self> {
        config.validate()?;
        let embeddings = UNetEmbeddings::load(w, &config).await?;
        let body = UNetBody::load(w, &config.body_config()).await?;
        Ok(Self { config, embeddings, body })
    }

    /// Predicts noise (or v / x0, as trained) for latents `[B, C, H, W]` at `timestep`, given text
    /// embeddings `[B, L, cross_attention_dim]`.
    pub fn forward(&self, gpu: &Gpu, sample: &Tensor, timestep: f32, context: &Tensor) -> Result<Tensor> {
        self.forward_with(gpu, sample, timestep, context, &StepConditions::default())
    }

    /// [`Self::forward`] with the step's other conditions.
    pub fn forward_with(&self, gpu: &Gpu, sample: &Tensor, timestep: f32, context: &Tensor, c: &StepConditions) -> Result<Tensor> {
        let &[b, ch, h, w] = sample.shape() else { return Err(Error::Shape(format!("unet sample must be [B, C, H, W], got {:?}", sample.shape()))) };
        // Any size: levels that do not halve evenly are upsampled to their skip's size.
        if ch != self.config.in_channels || h == 0 || w == 0 {
            return Err(Error::Input(format!("latents {:?} must have {} channels", sample.shape(), self.config.in_channels)));
        }
        if context.dim(0) != b {
            return Err(Error::Shape(format!("{} text embeddings for {b} latents", context.dim(0))));
        }
        let silu_emb = self.embeddings.forward(gpu, b, timestep, sample.dtype(), c)?;
        self.body.forward(gpu, sample, &silu_emb, Some(context), c.residuals)
    }
}
