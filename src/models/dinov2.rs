//! DINOv2 as a backbone (transformers' `Dinov2Backbone`; Oquab et al.): patch embeddings, a class
//! token, position embeddings resized bicubically to the image's grid, pre-norm layers with layer
//! scale, and the chosen layers' states through the final layer norm.

use serde::Deserialize;

use super::dpt::resize_position_embeddings;
use super::nn::{Conv2d, LayerNorm};
use super::vit::{activation, VitDims, VitLayer, VitNaming};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Interpolation};

/// `backbone_config` (Dinov2Config); unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub mlp_ratio: f64,
    pub hidden_act: String,
    pub layer_norm_eps: f32,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
    pub use_swiglu_ffn: bool,
    pub apply_layernorm: bool,
    pub reshape_hidden_states: bool,
    /// The stages whose states are taken (`stage1` is the first layer's output).
    pub out_indices: Option<Vec<usize>>,
    pub out_features: Option<Vec<String>>,
}

impl Default for Dinov2Config {
    fn default() -> Self {
        Self {
            hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, mlp_ratio: 4.0, hidden_act: "gelu".into(), layer_norm_eps: 1e-6, image_size: 224,
            patch_size: 14, num_channels: 3, qkv_bias: true, use_swiglu_ffn: false, apply_layernorm: true, reshape_hidden_states: true, out_indices: None, out_features: None,
        }
    }
}

impl Dinov2Config {
    /// The layer counts after which states are taken (1-based), from `out_indices` or `out_features`.
    pub fn stages(&self) -> Result<Vec<usize>> {
        let stages = match (&self.out_indices, &self.out_features) {
            (Some(i), _) => i.clone(),
            (None, Some(f)) => f.iter().map(|s| s.strip_prefix("stage").and_then(|n| n.parse().ok()).ok_or_else(|| Error::Model(format!("DINOv2 out_features entry {s:?} is not stageN")))).collect::<Result<_>>()?,
            (None, None) => vec![self.num_hidden_layers],
        };
        if stages.iter().any(|&s| s == 0 || s > self.num_hidden_layers) {
            return Err(Error::Model(format!("DINOv2 stages {stages:?} are not among its {} layers", self.num_hidden_layers)));
        }
        Ok(stages)
    }
}

/// `Dinov2Backbone`.
pub struct Dinov2Backbone {
    pub config: Dinov2Config,
    patch: Conv2d,
    cls_token: Tensor,
    position_embeddings: Vec<f32>,
    layers: Vec<VitLayer>,
    layernorm: LayerNorm,
    stages: Vec<usize>,
}

impl Dinov2Backbone {
    /// Loads `w` (`embeddings...`, `encoder.layer.N...`, `layernorm`).
    pub async fn load(w: &W<'_, '_>, config: Dinov2Config) -> Result<Self> {
        if config.use_swiglu_ffn {
            return Err(Error::Model("DINOv2 with SwiGLU feed-forward layers (the giant model) is not supported".into()));
        }
        let stages = config.stages()?;
        let (d, p) = (config.hidden_size, config.patch_size);
        let e = w.sub("embeddings");
        let patch = Conv2d::load(&e.sub("patch_embeddings.projection"), config.num_channels, d, p, p, 0).await?;
        let cls_token = e.get("cls_token", &[1, 1, d]).await?;
        let grid = (config.image_size / p).pow(2);
        let position_embeddings = e.read_f32("position_embeddings", &[1, grid + 1, d]).await?;
        let mlp = (d as f64 * config.mlp_ratio) as usize;
        let act = activation(&config.hidden_act)?;
        let dims = VitDims { hidden: d, heads: config.num_attention_heads, mlp, eps: config.layer_norm_eps, act, qkv_bias: config.qkv_bias };
        let mut layers = Vec::new();
        for i in 0..stages.iter().copied().max().unwrap_or(0) {
            layers.push(VitLayer::load(&w.sub(format!("encoder.layer.{i}")), VitNaming::Dinov2, dims).await?);
        }
        let layernorm = LayerNorm::load(&w.sub("layernorm"), d, config.layer_norm_eps).await?;
        Ok(Self { config, patch, cls_token, position_embeddings, layers, layernorm, stages })
    }

    /// The chosen stages' states `[1, 1 + n, d]` (class token first) for one image `[1, C, H, W]`.
    pub fn forward(&self, gpu: &Gpu, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let (d, p) = (self.config.hidden_size, self.config.patch_size);
        let &[1, _, h, w] = pixel_values.shape() else {
            return Err(Error::Shape(format!("DINOv2 takes one image [1, C, H, W], got {:?}", pixel_values.shape())));
        };
        let (gh, gw) = (h / p, w / p);
        if gh == 0 || gw == 0 {
            return Err(Error::Input(format!("DINOv2 needs images of at least {p}x{p} pixels, got {w}x{h}")));
        }
        let x = self.patch.forward(gpu, pixel_values, None)?.reshape(&[1, d, gh * gw])?;
        let tokens = ops::permute(gpu, &x, &[0, 2, 1])?;
        // transformers keeps the embeddings as they are for a square image of the training grid.
        let n = self.position_embeddings.len() / d - 1;
        let pos = if n == gh * gw && h == w { self.position_embeddings.clone() } else { resize_position_embeddings(&self.position_embeddings, d, gh, gw, Interpolation::Bicubic)? };
        let pos = gpu.upload(&[1, 1 + gh * gw, d], tokens.dtype(), &pos)?;
        let mut hidden = ops::add(gpu, &ops::concat(gpu, &[&self.cls_token, &tokens], 1)?, &pos)?;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            hidden = layer.forward(gpu, &hidden)?;
            if self.stages.contains(&(i + 1)) {
                out.push(if self.config.apply_layernorm { self.layernorm.forward(gpu, &hidden)? } else { hidden.clone() });
            }
        }
        Ok(out)
    }
}
