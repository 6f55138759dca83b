//! CLIP text encoder (transformers' `CLIPTextModel`, and `CLIPTextModelWithProjection` as
//! SDXL's second encoder): token + position embeddings, pre-norm transformer layers with a causal
//! mask, final layer norm; with projection, the end-of-text token's state projected (`text_embeds`).

use serde::{Deserialize, Serialize};

use super::nn::{multi_head_attention, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation};

/// `text_encoder/config.json` (CLIPTextConfig); unknown keys are ignored.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f32,
    pub projection_dim: usize,
    /// Where the pooled state is taken: the first `eos_token_id`, or (the legacy value 2 that
    /// SDXL's configs carry) the largest token id, as transformers does.
    pub eos_token_id: Option<i64>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408, hidden_size: 512, intermediate_size: 2048, num_hidden_layers: 12,
            num_attention_heads: 8, max_position_embeddings: 77, hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5, projection_dim: 512, eos_token_id: None,
        }
    }
}

impl ClipTextConfig {
    fn activation(&self) -> Result<Activation> {
        Ok(match self.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => return Err(Error::Model(format!("text encoder hidden_act {other:?} is not supported (quick_gelu, gelu, gelu_new are)"))),
        })
    }
    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) || self.hidden_size == 0 {
            return Err(Error::Model(format!("text encoder hidden_size {} is not divisible into {} heads", self.hidden_size, self.num_attention_heads)));
        }
        Ok(())
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    qkv: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// `CLIPTextModel`.
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias).
    text_projection: Option<Linear>,
    act: Activation,
}

/// What [`ClipTextModel::encode`] gives.
pub struct TextEncoding {
    /// `[B, N, D]`: the states after the layers asked for.
    pub hidden: Tensor,
    /// `[B, projection_dim]`: the projected end-of-text state (with a projection).
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    /// Loads the weights under `w` (transformers' names: `text_model.encoder.layers.N...`).
    pub async fn load(w: &W<'_, '_>, config: ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let act = config.activation()?;
        let (d, f, eps) = (config.hidden_size, config.intermediate_size, config.layer_norm_eps);
        // Hub folders prefix names with `text_model.`; transformers 5 saves them without.
        let tm = if w.contains("text_model.embeddings.token_embedding.weight") { w.sub("text_model") } else { w.clone() };
        let emb = tm.sub("embeddings");
        let token_embedding = emb.get("token_embedding.weight", &[config.vocab_size, d]).await?;
        let position_embedding = emb.get("position_embedding.weight", &[config.max_position_embeddings, d]).await?;
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let l = tm.sub(format!("encoder.layers.{i}"));
            let a = l.sub("self_attn");
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(&l.sub("layer_norm1"), d, eps).await?,
                qkv: Linear::load_fused(&[a.sub("q_proj"), a.sub("k_proj"), a.sub("v_proj")], d, d, true).await?,
                out_proj: Linear::load(&a.sub("out_proj"), d, d, true).await?,
                layer_norm2: LayerNorm::load(&l.sub("layer_norm2"), d, eps).await?,
                fc1: Linear::load(&l.sub("mlp.fc1"), d, f, true).await?,
                fc2: Linear::load(&l.sub("mlp.fc2"), f, d, true).await?,
            });
        }
        let final_layer_norm = LayerNorm::load(&tm.sub("final_layer_norm"), d, eps).await?;
        let text_projection = if w.contains("text_projection.weight") { Some(Linear::load(&w.sub("text_projection"), d, config.projection_dim, false).await?) } else { None };
        Ok(Self { config, token_embedding, position_embedding, layers, final_layer_norm, text_projection, act })
    }

    /// Appends `rows` (`[n, hidden_size]`, textual-inversion vectors) to the token embedding
    /// table, as transformers' `resize_token_embeddings` + assignment; the new tokens get the
    /// ids from the old table size on.
    pub fn add_token_embeddings(&mut self, gpu: &Gpu, rows: &[f32]) -> Result<u32> {
        let d = self.config.hidden_size;
        if rows.is_empty() || rows.len() % d != 0 {
            return Err(Error::Input(format!("token embeddings of {} values do not make rows of this text encoder's width {d}", rows.len())));
        }
        let n = rows.len() / d;
        let first = self.token_embedding.dim(0) as u32;
        let extra = gpu.upload(&[n, d], self.token_embedding.dtype(), rows)?;
        self.token_embedding = ops::concat(gpu, &[&self.token_embedding, &extra], 0)?;
        self.config.vocab_size += n;
        Ok(first)
    }

    /// The token embedding table's rows (`vocab_size`, more after textual inversion).
    pub fn token_rows(&self) -> usize {
        self.token_embedding.dim(0)
    }

    /// Whether this is a `CLIPTextModelWithProjection` (pooled `text_embeds`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// The number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Where each row's pooled state is taken (see [`ClipTextConfig::eos_token_id`]).
    fn pool_positions(&self, ids: &[Vec<u32>]) -> Vec<u32> {
        let eos = self.config.eos_token_id.unwrap_or(2);
        ids.iter()
            .enumerate()
            .map(|(b, row)| {
                let pos = if eos == 2 {
                    // torch's argmax: the first of the largest.
                    row.iter().enumerate().fold((0, 0u32), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
                } else {
                    row.iter().position(|&v| v as i64 == eos).unwrap_or(0)
                };
                (b * row.len() + pos) as u32
            })
            .collect()
    }

    /// Hidden states `[B, N, D]` for token ids `[B][N]`, after all layers but the last
    /// `clip_skip`, then the final layer norm (diffusers' `encode_prompt` with `clip_skip`).
    pub fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>], clip_skip: usize) -> Result<Tensor> {
        if clip_skip >= self.layers.len() {
            return Err(Error::Input(format!("clip skip {clip_skip} must be less than the text encoder's {} layers", self.layers.len())));
        }
        Ok(self.encode(gpu, ids, self.layers.len() - clip_skip, true, false)?.hidden)
    }

    /// The states after the first `layers` layers (`hidden_states[layers]` in transformers),
    /// through the final layer norm when `final_norm`, and with `pooled` the projected pooled
    /// state of the last layer (all layers then run).
    pub fn encode(&self, gpu: &Gpu, ids: &[Vec<u32>], layers: usize, final_norm: bool, pooled: bool) -> Result<TextEncoding> {
        let b = ids.len();
        let n = ids.first().map_or(0, Vec::len);
        let d = self.config.hidden_size;
        if b == 0 || n == 0 || ids.iter().any(|r| r.len() != n) || n > self.config.max_position_embeddings {
            return Err(Error::Input(format!("text encoder needs {b} equal rows of at most {} tokens", self.config.max_position_embeddings)));
        }
        if layers == 0 || layers > self.layers.len() {
            return Err(Error::Input(format!("the text encoder has {} layers; its state after {layers} was asked for", self.layers.len())));
        }
        if pooled && self.text_projection.is_none() {
            return Err(Error::Model("this text encoder has no text_projection (a CLIPTextModelWithProjection is needed)".into()));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tokens = ops::embedding(gpu, &flat, &self.token_embedding)?.reshape(&[b, n, d])?;
        let positions: Vec<u32> = (0..n as u32).collect();
        let pos = ops::embedding(gpu, &positions, &self.position_embedding)?.reshape(&[1, n, d])?;
        let mut h = ops::add(gpu, &tokens, &pos)?;
        let heads = self.config.num_attention_heads;
        let run = if pooled { self.layers.len() } else { layers };
        let mut tapped = None;
        for (li, layer) in self.layers[..run].iter().enumerate() {
            let x = layer.layer_norm1.forward(gpu, &h)?;
            let qkv = layer.qkv.forward(gpu, &x, Activation::None)?;
            let attn = multi_head_attention(gpu, (&qkv, 0, 3 * d), (&qkv, d, 3 * d), (&qkv, 2 * d, 3 * d), b, n, n, heads, d / heads, true)?;
            h = layer.out_proj.forward_residual(gpu, &attn, &h)?;
            let x = layer.layer_norm2.forward(gpu, &h)?;
            let x = layer.fc1.forward(gpu, &x, self.act)?;
            h = layer.fc2.forward_residual(gpu, &x, &h)?;
            if li + 1 == layers {
                tapped = Some(h.clone());
            }
        }
        let tapped = tapped.ok_or_else(|| Error::Shape("text encoder layer count".into()))?;
        let hidden = if final_norm { self.final_layer_norm.forward(gpu, &tapped)? } else { tapped };
        let pooled = match (&self.text_projection, pooled) {
            (Some(proj), true) => {
                let last = self.final_layer_norm.forward(gpu, &h)?.reshape(&[b * n, d])?;
                let rows = ops::embedding(gpu, &self.pool_positions(ids), &last)?;
                Some(proj.forward(gpu, &rows, Activation::None)?)
            }
            _ => None,
        };
        Ok(TextEncoding { hidden, pooled })
    }
}
