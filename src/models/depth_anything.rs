//! Depth Anything (V1 and V2; Yang et al.; transformers' `DepthAnythingForDepthEstimation`): a
//! DINOv2 backbone, DPT's reassemble and fusion neck (fusing each level to the next one's size),
//! and a head that upsamples to the patch grid's pixel size before its last convolutions.

use serde::Deserialize;

use super::dinov2::{Dinov2Backbone, Dinov2Config};
use super::dpt::{FusionNeck, ReassembleLayer};
use super::nn::Conv2d;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, elementwise, Activation, Coordinates, Interpolation};

/// `config.json` (DepthAnythingConfig); unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DepthAnythingConfig {
    pub backbone_config: Option<serde_json::Value>,
    pub patch_size: usize,
    pub reassemble_hidden_size: usize,
    pub reassemble_factors: Vec<f64>,
    pub neck_hidden_sizes: Vec<usize>,
    pub fusion_hidden_size: usize,
    pub head_in_index: i64,
    pub head_hidden_size: usize,
    /// `relative` (ReLU output) or `metric` (sigmoid times `max_depth`).
    pub depth_estimation_type: String,
    pub max_depth: Option<f32>,
}

impl Default for DepthAnythingConfig {
    fn default() -> Self {
        Self {
            backbone_config: None, patch_size: 14, reassemble_hidden_size: 384, reassemble_factors: vec![4.0, 2.0, 1.0, 0.5], neck_hidden_sizes: vec![48, 96, 192, 384],
            fusion_hidden_size: 64, head_in_index: -1, head_hidden_size: 32, depth_estimation_type: "relative".into(), max_depth: None,
        }
    }
}

/// `DepthAnythingForDepthEstimation`.
pub struct DepthAnythingForDepthEstimation {
    pub config: DepthAnythingConfig,
    backbone: Dinov2Backbone,
    reassemble: Vec<ReassembleLayer>,
    neck: FusionNeck,
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    metric: bool,
}

impl DepthAnythingForDepthEstimation {
    /// Loads transformers' weights (`backbone...`, `neck...`, `head...`).
    pub async fn load(w: &W<'_, '_>, config: DepthAnythingConfig) -> Result<Self> {
        let bc = config.backbone_config.clone().ok_or_else(|| Error::Model("Depth Anything config has no backbone_config".into()))?;
        if bc.get("model_type").and_then(|t| t.as_str()).is_some_and(|t| t != "dinov2") {
            return Err(Error::Model(format!("Depth Anything with a {} backbone is not supported (DINOv2 is)", bc["model_type"])));
        }
        let bcfg: Dinov2Config = serde_json::from_value(bc).map_err(|e| Error::Model(format!("Depth Anything backbone_config: {e}")))?;
        let n = config.neck_hidden_sizes.len();
        if config.reassemble_factors.len() != n || bcfg.stages()?.len() != n || n == 0 {
            return Err(Error::Model(format!("Depth Anything config: {n} neck sizes, {} reassemble factors and the backbone's out_features must agree", config.reassemble_factors.len())));
        }
        if bcfg.patch_size != config.patch_size || bcfg.hidden_size != config.reassemble_hidden_size || config.fusion_hidden_size < 2 {
            return Err(Error::Model("Depth Anything config: patch_size and reassemble_hidden_size must match the backbone's".into()));
        }
        let metric = match config.depth_estimation_type.as_str() {
            "relative" => false,
            "metric" => true,
            other => return Err(Error::Model(format!("Depth Anything depth_estimation_type {other:?} is not relative or metric"))),
        };
        let backbone = Dinov2Backbone::load(&w.sub("backbone"), bcfg).await?;
        let neck = w.sub("neck");
        let mut reassemble = Vec::new();
        for (i, (&c, &f)) in config.neck_hidden_sizes.iter().zip(&config.reassemble_factors).enumerate() {
            reassemble.push(ReassembleLayer::load(&neck.sub(format!("reassemble_stage.layers.{i}")), config.reassemble_hidden_size, c, f).await?);
        }
        let f = config.fusion_hidden_size;
        let fusion = FusionNeck::load(&neck, &config.neck_hidden_sizes, f, false, true).await?;
        let h = w.sub("head");
        let mut conv2 = Conv2d::load(&h.sub("conv2"), f / 2, config.head_hidden_size, 3, 1, 1).await?;
        conv2.spec.act = Activation::Relu;
        let mut conv3 = Conv2d::load(&h.sub("conv3"), config.head_hidden_size, 1, 1, 1, 0).await?;
        if !metric {
            conv3.spec.act = Activation::Relu;
        }
        Ok(Self { conv1: Conv2d::load(&h.sub("conv1"), f, f / 2, 3, 1, 1).await?, conv2, conv3, config, backbone, reassemble, neck: fusion, metric })
    }

    /// Depth `[1, H, W]` (`predicted_depth`: relative inverse depth, or metres for metric
    /// models) for one image `[1, 3, H, W]` as the image processor makes it.
    pub fn forward(&self, gpu: &Gpu, pixel_values: &Tensor) -> Result<Tensor> {
        let states = self.backbone.forward(gpu, pixel_values)?;
        let p = self.config.patch_size;
        let (gh, gw) = (pixel_values.dim(2) / p, pixel_values.dim(3) / p);
        let d = self.config.reassemble_hidden_size;
        let maps = states
            .iter()
            .zip(&self.reassemble)
            .map(|(s, layer)| layer.forward(gpu, &ops::slice(gpu, s, d, &[1, gh * gw, d])?, gh, gw))
            .collect::<Result<Vec<_>>>()?;
        let fused = self.neck.forward(gpu, &maps, true)?;
        let i = self.config.head_in_index;
        let x = if i < 0 { fused.last() } else { fused.get(i as usize) }.ok_or_else(|| Error::Model(format!("Depth Anything head_in_index {i} is not one of its fused maps")))?;
        let x = self.conv1.forward(gpu, x, None)?;
        let x = ops::interpolate(gpu, &x, gh * p, gw * p, Interpolation::Bilinear, Coordinates::AlignCorners)?;
        let x = self.conv2.forward(gpu, &x, None)?;
        let mut x = self.conv3.forward(gpu, &x, None)?;
        let max_depth = self.config.max_depth.unwrap_or(1.0);
        if self.metric {
            // sigmoid(v) max_depth = (tanh(v / 2) + 1) max_depth / 2.
            x = elementwise::activation_affine(gpu, &x, Activation::Tanh, 0.5, 0.0)?;
            x = ops::scale(gpu, &x, 0.5 * max_depth, 0.5 * max_depth)?;
        } else if max_depth != 1.0 {
            x = ops::scale(gpu, &x, max_depth, 0.0)?;
        }
        x.reshape(&[1, x.dim(2), x.dim(3)])
    }
}
