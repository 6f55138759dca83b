//! CLIP text encoder (transformers' `CLIPTextModel`): token + position embeddings, pre-norm
//! transformer layers with a causal mask, final layer norm.

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
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408, hidden_size: 512, intermediate_size: 2048, num_hidden_layers: 12,
            num_attention_heads: 8, max_position_embeddings: 77, hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5, projection_dim: 512,
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
    act: Activation,
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
        Ok(Self { config, token_embedding, position_embedding, layers, final_layer_norm, act })
    }

    /// Hidden states `[B, N, D]` for token ids `[B][N]`, after all layers but the last
    /// `clip_skip`, then the final layer norm (diffusers' `encode_prompt` with `clip_skip`).
    pub fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>], clip_skip: usize) -> Result<Tensor> {
        let b = ids.len();
        let n = ids.first().map_or(0, Vec::len);
        let d = self.config.hidden_size;
        if b == 0 || n == 0 || ids.iter().any(|r| r.len() != n) || n > self.config.max_position_embeddings {
            return Err(Error::Input(format!("text encoder needs {b} equal rows of at most {} tokens", self.config.max_position_embeddings)));
        }
        if clip_skip >= self.layers.len() {
            return Err(Error::Input(format!("clip skip {clip_skip} must be less than the text encoder's {} layers", self.layers.len())));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tokens = ops::embedding(gpu, &flat, &self.token_embedding)?.reshape(&[b, n, d])?;
        let positions: Vec<u32> = (0..n as u32).collect();
        let pos = ops::embedding(gpu, &positions, &self.position_embedding)?.reshape(&[1, n, d])?;
        let mut h = ops::add(gpu, &tokens, &pos)?;
        let heads = self.config.num_attention_heads;
        for layer in &self.layers[..self.layers.len() - clip_skip] {
            let x = layer.layer_norm1.forward(gpu, &h)?;
            let qkv = layer.qkv.forward(gpu, &x, Activation::None)?;
            let attn = multi_head_attention(gpu, (&qkv, 0, 3 * d), (&qkv, d, 3 * d), (&qkv, 2 * d, 3 * d), b, n, n, heads, d / heads, true)?;
            h = layer.out_proj.forward_residual(gpu, &attn, &h)?;
            let x = layer.layer_norm2.forward(gpu, &h)?;
            let x = layer.fc1.forward(gpu, &x, self.act)?;
            h = layer.fc2.forward_residual(gpu, &x, &h)?;
        }
        self.final_layer_norm.forward(gpu, &h)
    }
}
