//! BiT (transformers' `BitBackbone`; Kolesnikov et al., "Big Transfer"): a ResNet with
//! weight-standardised convolutions and group norms, the convolutional half of DPT-Hybrid.
//! TensorFlow's "SAME" padding is computed per input size, as transformers' dynamic padding does,
//! and the weights are standardised once at load (per output channel: zero mean, unit variance).

use serde::Deserialize;

use super::nn::{Conv2d, GroupNorm};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, Activation, Conv2dSpec, PoolSpec};

/// `backbone_config` of a DPT-Hybrid `config.json` (BitConfig); unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct BitConfig {
    pub num_channels: usize,
    pub embedding_size: usize,
    pub hidden_sizes: Vec<usize>,
    pub depths: Vec<usize>,
    pub layer_type: String,
    pub hidden_act: String,
    pub global_padding: Option<String>,
    pub num_groups: usize,
    pub embedding_dynamic_padding: bool,
    pub output_stride: usize,
    pub width_factor: usize,
    pub out_features: Vec<String>,
}

impl Default for BitConfig {
    fn default() -> Self {
        Self {
            num_channels: 3, embedding_size: 64, hidden_sizes: vec![256, 512, 1024, 2048], depths: vec![3, 4, 6, 3], layer_type: "preactivation".into(),
            hidden_act: "relu".into(), global_padding: None, num_groups: 32, embedding_dynamic_padding: false, output_stride: 32, width_factor: 1,
            out_features: Vec::new(),
        }
    }
}

/// timm's `make_div`: `v` rounded to a multiple of 8, never below 90% of it.
fn make_div(v: f64) -> usize {
    let d = 8.0f64;
    let mut n = d.max(((v + d / 2.0) / d).floor() * d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

impl BitConfig {
    fn validate(&self) -> Result<()> {
        let refuse = |what: String| Err(Error::Model(format!("BiT backbone: {what}; DPT-Hybrid's (bottleneck layers, \"SAME\" padding, ReLU) is supported")));
        if self.layer_type != "bottleneck" {
            return refuse(format!("layer_type {:?}", self.layer_type));
        }
        if !self.global_padding.as_deref().is_some_and(|p| p.eq_ignore_ascii_case("same")) || !self.embedding_dynamic_padding {
            return refuse(format!("global_padding {:?} with embedding_dynamic_padding {}", self.global_padding, self.embedding_dynamic_padding));
        }
        if self.hidden_act != "relu" || self.width_factor != 1 {
            return refuse(format!("hidden_act {:?}, width_factor {}", self.hidden_act, self.width_factor));
        }
        // Stages pair depths with hidden sizes (DPT-Hybrid lists four sizes for three stages).
        if self.depths.len() > self.hidden_sizes.len() || self.depths.is_empty() || 4 << (self.depths.len() - 1) > self.output_stride {
            return refuse(format!("{} stages for an output stride of {}", self.depths.len(), self.output_stride));
        }
        let groups_fit = |c: usize| self.num_groups > 0 && c.is_multiple_of(self.num_groups);
        if !groups_fit(self.embedding_size) || self.hidden_sizes[..self.depths.len()].iter().any(|&h| !groups_fit(make_div(h as f64)) || !groups_fit(make_div(make_div(h as f64) as f64 * 0.25))) {
            return refuse(format!("{} groups do not divide its channels", self.num_groups));
        }
        Ok(())
    }

    /// Output channels of stage `i`.
    pub fn stage_channels(&self, i: usize) -> usize {
        make_div(self.hidden_sizes[i] as f64)
    }
}

/// `WeightStandardizedConv2d` with "SAME" padding (eps 1e-8, as BiT's layers use).
struct WsConv {
    conv: Conv2d,
    k: usize,
    stride: usize,
}

impl WsConv {
    async fn load(w: &W<'_, '_>, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Self> {
        let shape = [cout, cin, k, k];
        let mut weight = w.read_f32("weight", &shape).await?;
        let fan = cin * k * k;
        // torch's batch_norm over each output channel's weights (training mode: biased variance).
        for row in weight.chunks_mut(fan) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / fan as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / fan as f64;
            let inv = 1.0 / (var + 1e-8).sqrt();
            row.iter_mut().for_each(|v| *v = ((*v as f64 - mean) * inv) as f32);
        }
        Ok(Self { conv: Conv2d::from_f32(w, shape, &weight, None, Conv2dSpec::default())?, k, stride })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let spec = Conv2dSpec::same(self.k, self.stride, x.dim(2), x.dim(3));
        ops::conv2d(gpu, x, &self.conv.weight, None, &spec, None)
    }
}

/// `BitGroupNormActivation`: group norm, then ReLU unless it precedes a residual sum.
fn norm(gpu: &Gpu, n: &GroupNorm, x: &Tensor, relu: bool) -> Result<Tensor> {
    let y = n.forward(gpu, x, false)?;
    if relu { ops::activation(gpu, &y, Activation::Relu) } else { Ok(y) }
}

/// `BitBottleneckLayer` (non-pre-activation, ResNet v1.5 style).
struct Bottleneck {
    downsample: Option<(WsConv, GroupNorm)>,
    conv1: WsConv,
    norm1: GroupNorm,
    conv2: WsConv,
    norm2: GroupNorm,
    conv3: WsConv,
    norm3: GroupNorm,
}

impl Bottleneck {
    async fn load(w: &W<'_, '_>, groups: usize, cin: usize, cout: usize, stride: usize, first: bool) -> Result<Self> {
        let mid = make_div(cout as f64 * 0.25);
        let downsample = if first { Some((WsConv::load(&w.sub("downsample.conv"), cin, cout, 1, stride).await?, GroupNorm::load(&w.sub("downsample.norm"), groups, cout, 1e-5).await?)) } else { None };
        Ok(Self {
            downsample,
            conv1: WsConv::load(&w.sub("conv1"), cin, mid, 1, 1).await?,
            norm1: GroupNorm::load(&w.sub("norm1"), groups, mid, 1e-5).await?,
            conv2: WsConv::load(&w.sub("conv2"), mid, mid, 3, stride).await?,
            norm2: GroupNorm::load(&w.sub("norm2"), groups, mid, 1e-5).await?,
            conv3: WsConv::load(&w.sub("conv3"), mid, cout, 1, 1).await?,
            norm3: GroupNorm::load(&w.sub("norm3"), groups, cout, 1e-5).await?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, n)) => norm(gpu, n, &conv.forward(gpu, x)?, false)?,
            None => x.clone(),
        };
        let h = norm(gpu, &self.norm1, &self.conv1.forward(gpu, x)?, true)?;
        let h = norm(gpu, &self.norm2, &self.conv2.forward(gpu, &h)?, true)?;
        let h = norm(gpu, &self.norm3, &self.conv3.forward(gpu, &h)?, false)?;
        ops::activation(gpu, &ops::add(gpu, &h, &shortcut)?, Activation::Relu)
    }
}

/// `BitBackbone`: the stem and the stages; [`BitBackbone::forward`] gives every stage's output.
pub struct BitBackbone {
    pub config: BitConfig,
    stem: WsConv,
    stem_norm: GroupNorm,
    stages: Vec<Vec<Bottleneck>>,
}

impl BitBackbone {
    /// Loads `w` (`bit.embedder...`, `bit.encoder.stages...`).
    pub async fn load(w: &W<'_, '_>, config: BitConfig) -> Result<Self> {
        config.validate()?;
        let g = config.num_groups;
        let stem = WsConv::load(&w.sub("embedder.convolution"), config.num_channels, config.embedding_size, 7, 2).await?;
        let stem_norm = GroupNorm::load(&w.sub("embedder.norm"), g, config.embedding_size, 1e-5).await?;
        let mut stages = Vec::new();
        let mut cin = config.embedding_size;
        for (i, &depth) in config.depths.iter().enumerate() {
            let cout = config.stage_channels(i);
            let mut layers = Vec::new();
            for j in 0..depth {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                layers.push(Bottleneck::load(&w.sub(format!("encoder.stages.{i}.layers.{j}")), g, if j == 0 { cin } else { cout }, cout, stride, j == 0).await?);
            }
            stages.push(layers);
            cin = cout;
        }
        Ok(Self { config, stem, stem_norm, stages })
    }

    /// The output of each stage (`stage1`, `stage2`, ...) for images `[B, C, H, W]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Vec<Tensor>> {
        let h = norm(gpu, &self.stem_norm, &self.stem.forward(gpu, x)?, true)?;
        // BitMaxPool2d with dynamic "SAME" padding of zeros (after a ReLU, as good as -inf).
        let (ih, iw) = (h.dim(2), h.dim(3));
        let (oh, ow) = (ih.div_ceil(2), iw.div_ceil(2));
        let pad = |i: usize, o: usize| ((o - 1) * 2 + 3).saturating_sub(i) / 2;
        let mut h = ops::max_pool2d(gpu, &h, &PoolSpec { kernel: 3, stride: 2, pad_top: pad(ih, oh), pad_left: pad(iw, ow), out_h: oh, out_w: ow, pad_value: 0.0 })?;
        let mut outs = Vec::new();
        for stage in &self.stages {
            for layer in stage {
                h = layer.forward(gpu, &h)?;
            }
            outs.push(h.clone());
        }
        Ok(outs)
    }
}
