//! `LDMBertModel`: the text encoder τθ of the latent diffusion paper's text-to-image model
//! (CompVis' `ldm-text2im-large-256`), as diffusers defines it in `pipeline_latent_diffusion.py`:
//! token + learned position embeddings, pre-norm transformer layers (bidirectional, no
//! attention mask: padding is attended to, as the pipeline calls it), a final layer norm.

use serde::Deserialize;

use super::nn::{multi_head_attention, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation};

/// `bert/config.json` (`LDMBertConfig`); unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LdmBertConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub encoder_layers: usize,
    pub encoder_ffn_dim: usize,
    pub encoder_attention_heads: usize,
    pub head_dim: usize,
    pub activation_function: String,
    pub d_model: usize,
    pub pad_token_id: u32,
}

impl Default for LdmBertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522, max_position_embeddings: 77, encoder_layers: 32, encoder_ffn_dim: 5120, encoder_attention_heads: 8,
            head_dim: 64, activation_function: "gelu".into(), d_model: 1280, pad_token_id: 0,
        }
    }
}

impl LdmBertConfig {
    fn activation(&self) -> Result<Activation> {
        Ok(match self.activation_function.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            other => return Err(Error::Model(format!("bert config: activation_function {other:?} is not supported (gelu, gelu_new, quick_gelu, silu are)"))),
        })
    }
}

struct EncoderLayer {
    self_attn_layer_norm: LayerNorm,
    /// q, k, v (no biases), fused.
    qkv: Linear,
    out_proj: Linear,
    final_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// `LDMBertModel` (its encoder; the `to_logits` head is not used by the pipeline).
pub struct LdmBertModel {
    pub config: LdmBertConfig,
    embed_tokens: Tensor,
    embed_positions: Tensor,
    layers: Vec<EncoderLayer>,
    layer_norm: LayerNorm,
    act: Activation,
}

impl LdmBertModel {
    /// Loads the weights under `w` (`model.embed_tokens.weight`, `model.layers.N...`).
    pub async fn load(w: &W<'_, '_>, config: LdmBertConfig) -> Result<Self> {
        let act = config.activation()?;
        let (d, f, heads, hd) = (config.d_model, config.encoder_ffn_dim, config.encoder_attention_heads, config.head_dim);
        if d == 0 || heads == 0 || hd == 0 || config.encoder_layers == 0 {
            return Err(Error::Model("bert config: d_model, encoder_attention_heads, head_dim and encoder_layers must be positive".into()));
        }
        let inner = heads * hd;
        let m = w.sub("model");
        let embed_tokens = m.get("embed_tokens.weight", &[config.vocab_size, d]).await?;
        let embed_positions = m.get("embed_positions.weight", &[config.max_position_embeddings, d]).await?;
        let mut layers = Vec::new();
        for i in 0..config.encoder_layers {
            let l = m.sub(format!("layers.{i}"));
            let a = l.sub("self_attn");
            layers.push(EncoderLayer {
                self_attn_layer_norm: LayerNorm::load(&l.sub("self_attn_layer_norm"), d, 1e-5).await?,
                qkv: Linear::load_fused(&[a.sub("q_proj"), a.sub("k_proj"), a.sub("v_proj")], d, inner, false).await?,
                out_proj: Linear::load(&a.sub("out_proj"), inner, d, true).await?,
                final_layer_norm: LayerNorm::load(&l.sub("final_layer_norm"), d, 1e-5).await?,
                fc1: Linear::load(&l.sub("fc1"), d, f, true).await?,
                fc2: Linear::load(&l.sub("fc2"), f, d, true).await?,
            });
        }
        let layer_norm = LayerNorm::load(&m.sub("layer_norm"), d, 1e-5).await?;
        Ok(Self { config, embed_tokens, embed_positions, layers, layer_norm, act })
    }

    /// `last_hidden_state` `[B, N, d_model]` for token ids `[B][N]`.
    pub fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>]) -> Result<Tensor> {
        let (b, n) = (ids.len(), ids.first().map_or(0, Vec::len));
        let c = &self.config;
        let (d, heads, hd) = (c.d_model, c.encoder_attention_heads, c.head_dim);
        if b == 0 || n == 0 || ids.iter().any(|r| r.len() != n) || n > c.max_position_embeddings {
            return Err(Error::Input(format!("LDMBert needs {b} equal rows of at most {} tokens", c.max_position_embeddings)));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tokens = ops::embedding(gpu, &flat, &self.embed_tokens)?.reshape(&[b, n, d])?;
        let positions: Vec<u32> = (0..n as u32).collect();
        let pos = ops::embedding(gpu, &positions, &self.embed_positions)?.reshape(&[1, n, d])?;
        let mut h = ops::add(gpu, &tokens, &pos)?;
        let inner = heads * hd;
        for layer in &self.layers {
            let x = layer.self_attn_layer_norm.forward(gpu, &h)?;
            let qkv = layer.qkv.forward(gpu, &x, Activation::None)?;
            let attn = multi_head_attention(gpu, (&qkv, 0, 3 * inner), (&qkv, inner, 3 * inner), (&qkv, 2 * inner, 3 * inner), b, n, n, heads, hd, false)?;
            h = layer.out_proj.forward_residual(gpu, &attn, &h)?;
            let x = layer.final_layer_norm.forward(gpu, &h)?;
            let x = layer.fc1.forward(gpu, &x, self.act)?;
            h = layer.fc2.forward_residual(gpu, &x, &h)?;
        }
        self.layer_norm.forward(gpu, &h)
    }
}
