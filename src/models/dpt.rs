//! DPT (Ranftl et al., "Vision Transformers for Dense Prediction"; transformers'
//! `DPTForDepthEstimation`): a ViT, or for DPT-Hybrid a BiT ResNet feeding a ViT, whose hidden
//! states are reassembled into four feature maps at 1/4 to 1/32 of the image (readout token
//! projected in, transposed convolutions up, a strided one down), fused coarse to fine with
//! residual convolution units and 2x bilinear upsampling, and decoded by a small convolutional
//! head into relative inverse depth. The neck is shared with Depth Anything.

use serde::Deserialize;

use super::bit::{BitBackbone, BitConfig};
use super::nn::{Conv2d, Linear, PatchConvTranspose2d};
use super::vit::{activation, VitDims, VitLayer, VitNaming};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, layout, Activation, Conv2dSpec, Coordinates, Interpolation};

/// A size given as one number or as `[height, width]`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    Pair([usize; 2]),
}

impl Size2 {
    /// `(height, width)`.
    pub fn hw(self) -> (usize, usize) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::Pair([h, w]) => (h, w),
        }
    }
}

/// `config.json` of a `DPTForDepthEstimation` (DPTConfig); unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DPTConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f32,
    pub image_size: Size2,
    pub patch_size: usize,
    pub num_channels: usize,
    pub is_hybrid: bool,
    pub qkv_bias: bool,
    pub backbone_out_indices: Vec<usize>,
    pub readout_type: String,
    pub reassemble_factors: Vec<f64>,
    pub neck_hidden_sizes: Vec<usize>,
    pub fusion_hidden_size: usize,
    pub head_in_index: i64,
    pub use_batch_norm_in_fusion_residual: bool,
    pub use_bias_in_fusion_residual: Option<bool>,
    pub add_projection: bool,
    pub neck_ignore_stages: Vec<usize>,
    pub backbone_config: Option<serde_json::Value>,
}

impl Default for DPTConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072, hidden_act: "gelu".into(), layer_norm_eps: 1e-12,
            image_size: Size2::Square(384), patch_size: 16, num_channels: 3, is_hybrid: false, qkv_bias: true, backbone_out_indices: vec![2, 5, 8, 11],
            readout_type: "project".into(), reassemble_factors: vec![4.0, 2.0, 1.0, 0.5], neck_hidden_sizes: vec![96, 192, 384, 768], fusion_hidden_size: 256,
            head_in_index: -1, use_batch_norm_in_fusion_residual: false, use_bias_in_fusion_residual: None, add_projection: false, neck_ignore_stages: vec![0, 1],
            backbone_config: None,
        }
    }
}

/// How the readout (class) token enters the reassembled maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readout {
    Ignore,
    Add,
    Project,
}

impl Readout {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "ignore" => Ok(Self::Ignore),
            "add" => Ok(Self::Add),
            "project" => Ok(Self::Project),
            other => Err(Error::Model(format!("DPT readout_type {other:?} is not one of ignore, add, project"))),
        }
    }
}

/// `DPTReassembleLayer`: a 1x1 projection (read from tokens), then the resize to its level.
pub(crate) struct ReassembleLayer {
    projection: Linear,
    resize: Resize,
}

enum Resize {
    Up(PatchConvTranspose2d),
    Same,
    Down(Conv2d),
}

impl ReassembleLayer {
    pub(crate) async fn load(w: &W<'_, '_>, hidden: usize, channels: usize, factor: f64) -> Result<Self> {
        // The 1x1 convolution as a linear on tokens: [channels, hidden, 1, 1] read as [channels, hidden].
        let p = w.sub("projection");
        let weight = p.read_f32("weight", &[channels, hidden, 1, 1]).await?;
        let bias = p.read_f32("bias", &[channels]).await?;
        let projection = Linear { weight: w.gpu.upload(&[channels, hidden], w.dtype, &weight)?, bias: Some(w.gpu.upload(&[channels], w.dtype, &bias)?), in_features: hidden, out_features: channels, lora: None, probe: None };
        let resize = if factor > 1.0 && factor.fract() == 0.0 {
            Resize::Up(PatchConvTranspose2d::load(&w.sub("resize"), channels, channels, factor as usize).await?)
        } else if factor == 1.0 {
            Resize::Same
        } else if factor > 0.0 && factor < 1.0 && (1.0 / factor).fract() == 0.0 {
            Resize::Down(Conv2d::load(&w.sub("resize"), channels, channels, 3, (1.0 / factor) as usize, 1).await?)
        } else {
            return Err(Error::Model(format!("DPT reassemble factor {factor} is not a whole number or its inverse")));
        };
        Ok(Self { projection, resize })
    }

    /// Tokens `[1, gh * gw, hidden]` to the level's map `[1, channels, H, W]`.
    pub(crate) fn forward(&self, gpu: &Gpu, tokens: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let map = self.projection.forward_to_channels_first(gpu, tokens, None)?.reshape(&[1, self.projection.out_features, gh, gw])?;
        match &self.resize {
            Resize::Up(t) => t.forward(gpu, &map),
            Resize::Same => Ok(map),
            Resize::Down(c) => c.forward(gpu, &map, None),
        }
    }
}

/// `DPTPreActResidualLayer`: `x + conv2(relu(conv1(relu(x))))`, batch norms folded into the convolutions.
struct ResidualUnit {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ResidualUnit {
    async fn load(w: &W<'_, '_>, f: usize, batch_norm: bool, bias: bool) -> Result<Self> {
        let load = |conv: &'static str, bn: &'static str, act: Activation| {
            let (c, n) = (w.sub(conv), w.sub(bn));
            async move {
                let spec = Conv2dSpec { act, ..Conv2dSpec::new(1, 1) };
                if batch_norm {
                    Conv2d::load_with_batch_norm(&c, &n, f, f, 3, spec, 1e-5).await
                } else {
                    let mut conv = Conv2d::load(&c, f, f, 3, 1, 1).await?;
                    if bias != conv.bias.is_some() {
                        return Err(Error::Model(format!("{}: the fusion convolution's bias does not match use_bias_in_fusion_residual", c.describe())));
                    }
                    conv.spec = spec;
                    Ok(conv)
                }
            }
        };
        Ok(Self { conv1: load("convolution1", "batch_norm1", Activation::Relu).await?, conv2: load("convolution2", "batch_norm2", Activation::None).await? })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let h = ops::activation(gpu, x, Activation::Relu)?;
        let h = self.conv1.forward(gpu, &h, None)?;
        self.conv2.forward(gpu, &h, Some(x))
    }
}

/// `DPTFeatureFusionLayer`: the finer map's residual unit added (resized to match when the
/// sizes differ), a second unit, bilinear upsampling with aligned corners, a 1x1 projection.
pub(crate) struct FusionLayer {
    residual1: ResidualUnit,
    residual2: ResidualUnit,
    projection: Conv2d,
}

impl FusionLayer {
    pub(crate) async fn load(w: &W<'_, '_>, f: usize, batch_norm: bool, bias: bool) -> Result<Self> {
        Ok(Self {
            residual1: ResidualUnit::load(&w.sub("residual_layer1"), f, batch_norm, bias).await?,
            residual2: ResidualUnit::load(&w.sub("residual_layer2"), f, batch_norm, bias).await?,
            projection: Conv2d::load(&w.sub("projection"), f, f, 1, 1, 0).await?,
        })
    }

    /// Fuses `residual` (the next finer level) into `hidden`, then upsamples to `size`
    /// (`None`: twice the size, as `interpolate(scale_factor=2)`).
    pub(crate) fn forward(&self, gpu: &Gpu, hidden: &Tensor, residual: Option<&Tensor>, size: Option<(usize, usize)>) -> Result<Tensor> {
        let hidden = match residual {
            Some(r) => {
                let r = if r.shape() == hidden.shape() { r.clone() } else { ops::interpolate(gpu, r, hidden.dim(2), hidden.dim(3), Interpolation::Bilinear, Coordinates::HalfPixel)? };
                ops::add(gpu, hidden, &self.residual1.forward(gpu, &r)?)?
            }
            None => hidden.clone(),
        };
        let h = self.residual2.forward(gpu, &hidden)?;
        let (oh, ow) = size.unwrap_or((2 * h.dim(2), 2 * h.dim(3)));
        let h = ops::interpolate(gpu, &h, oh, ow, Interpolation::Bilinear, Coordinates::AlignCorners)?;
        self.projection.forward(gpu, &h, None)
    }
}

/// The neck's 3x3 convolutions to the fusion width and the fusion stage, shared by DPT and
/// Depth Anything (which fuses to the next level's size rather than twice the size).
pub(crate) struct FusionNeck {
    convs: Vec<Conv2d>,
    layers: Vec<FusionLayer>,
}

impl FusionNeck {
    pub(crate) async fn load(neck: &W<'_, '_>, sizes: &[usize], f: usize, batch_norm: bool, bias: bool) -> Result<Self> {
        let mut convs = Vec::new();
        let mut layers = Vec::new();
        for (i, &c) in sizes.iter().enumerate() {
            convs.push(Conv2d::load(&neck.sub(format!("convs.{i}")), c, f, 3, 1, 1).await?);
            layers.push(FusionLayer::load(&neck.sub(format!("fusion_stage.layers.{i}")), f, batch_norm, bias).await?);
        }
        Ok(Self { convs, layers })
    }

    /// The fused maps, coarsest first; `to_next_size` upsamples each to the next finer map's
    /// size (Depth Anything) instead of doubling it (DPT).
    pub(crate) fn forward(&self, gpu: &Gpu, maps: &[Tensor], to_next_size: bool) -> Result<Vec<Tensor>> {
        let features: Vec<Tensor> = maps.iter().zip(&self.convs).map(|(m, c)| c.forward(gpu, m, None)).collect::<Result<_>>()?;
        let reversed: Vec<&Tensor> = features.iter().rev().collect();
        let mut fused: Vec<Tensor> = Vec::new();
        for (i, (h, layer)) in reversed.iter().zip(&self.layers).enumerate() {
            let size = if to_next_size { reversed.get(i + 1).map(|n| (n.dim(2), n.dim(3))) } else { None };
            let out = match fused.last() {
                None => layer.forward(gpu, h, None, size)?,
                Some(prev) => layer.forward(gpu, prev, Some(h), size)?,
            };
            fused.push(out);
        }
        Ok(fused)
    }
}

/// The position embeddings' grid resized to `gh x gw` (the class token's row kept first), on
/// the CPU: `interpolate(grid, size, mode)` of each channel.
pub(crate) fn resize_position_embeddings(pos: &[f32], d: usize, gh: usize, gw: usize, mode: Interpolation) -> Result<Vec<f32>> {
    let n = pos.len() / d - 1;
    let g = (n as f64).sqrt().round() as usize;
    if g * g != n {
        return Err(Error::Model(format!("{n} position embeddings do not make a square grid")));
    }
    if (g, g) == (gh, gw) {
        return Ok(pos.to_vec());
    }
    // [g*g, d] rows to d planes, resized, back to rows.
    let planes: Vec<f32> = (0..d).flat_map(|c| (0..n).map(move |i| pos[(1 + i) * d + c])).collect();
    let resized = layout::interpolate_reference(&planes, d, (g, g), (gh, gw), mode, Coordinates::HalfPixel);
    let mut out = pos[..d].to_vec();
    for i in 0..gh * gw {
        out.extend((0..d).map(|c| resized[c * gh * gw + i]));
    }
    Ok(out)
}

enum Embeddings {
    Patches(Conv2d),
    Hybrid { backbone: Box<BitBackbone>, projection: Linear },
}

/// `DPTForDepthEstimation`.
pub struct DPTForDepthEstimation {
    pub config: DPTConfig,
    embeddings: Embeddings,
    cls_token: Tensor,
    position_embeddings: Vec<f32>,
    layers: Vec<VitLayer>,
    readout: Readout,
    /// `readout_projects`: the linear's token and class-token halves (`project` readout).
    readout_projects: Vec<Option<(Linear, Linear)>>,
    reassemble: Vec<Option<ReassembleLayer>>,
    neck: FusionNeck,
    head_projection: Option<Conv2d>,
    head: [Conv2d; 3],
    act: Activation,
}

impl DPTConfig {
    fn validate(&self) -> Result<()> {
        let n = self.neck_hidden_sizes.len();
        if n == 0 || self.reassemble_factors.len() != n || self.backbone_out_indices.len() != n {
            return Err(Error::Model(format!("DPT config: {n} neck sizes, {} reassemble factors, {} backbone_out_indices must agree", self.reassemble_factors.len(), self.backbone_out_indices.len())));
        }
        if self.backbone_out_indices.iter().any(|&i| i >= self.num_hidden_layers) {
            return Err(Error::Model(format!("DPT config: backbone_out_indices {:?} reach past its {} layers", self.backbone_out_indices, self.num_hidden_layers)));
        }
        if self.backbone_config.is_some() && !self.is_hybrid {
            return Err(Error::Model("DPT with a separate backbone (BEiT, Swin, DINOv2) is not supported; DPT's own ViT and DPT-Hybrid are".into()));
        }
        if self.is_hybrid && (n < 2 || self.readout_type != "project" || self.neck_ignore_stages != [0, 1]) {
            return Err(Error::Model("DPT-Hybrid needs at least two neck levels, readout_type \"project\" and neck_ignore_stages [0, 1] (its first two levels are BiT's stages)".into()));
        }
        if self.head_in_index != -1 && self.head_in_index as usize >= n {
            return Err(Error::Model(format!("DPT config: head_in_index {} is not one of its {n} fused maps", self.head_in_index)));
        }
        if self.fusion_hidden_size < 2 || self.num_channels == 0 || self.patch_size == 0 {
            return Err(Error::Model("DPT config: fusion_hidden_size, num_channels and patch_size must be positive".into()));
        }
        if self.add_projection && self.fusion_hidden_size != 256 {
            return Err(Error::Model("DPT config: add_projection is a 256-channel convolution; fusion_hidden_size must be 256".into()));
        }
        Ok(())
    }
}

impl DPTForDepthEstimation {
    /// Loads transformers' weights (`dpt.embeddings...`, `dpt.encoder.layer.N...`, `neck...`, `head...`).
    pub async fn load(w: &W<'_, '_>, config: DPTConfig) -> Result<Self> {
        config.validate()?;
        let (d, heads) = (config.hidden_size, config.num_attention_heads);
        let e = w.sub("dpt.embeddings");
        let embeddings = if config.is_hybrid {
            let bit: BitConfig = serde_json::from_value(config.backbone_config.clone().unwrap_or_default()).map_err(|err| Error::Model(format!("DPT-Hybrid backbone_config: {err}")))?;
            let last = bit.stage_channels(bit.depths.len() - 1);
            let backbone = BitBackbone::load(&e.sub("backbone.bit"), bit).await?;
            let p = e.sub("projection");
            let weight = p.read_f32("weight", &[d, last, 1, 1]).await?;
            let projection = Linear { weight: w.gpu.upload(&[d, last], w.dtype, &weight)?, bias: Some(p.get("bias", &[d]).await?), in_features: last, out_features: d, lora: None, probe: None };
            Embeddings::Hybrid { backbone: Box::new(backbone), projection }
        } else {
            Embeddings::Patches(Conv2d::load(&e.sub("patch_embeddings.projection"), config.num_channels, d, config.patch_size, config.patch_size, 0).await?)
        };
        let cls_token = e.get("cls_token", &[1, 1, d]).await?;
        let (ih, iw) = config.image_size.hw();
        let grid = (ih / config.patch_size) * (iw / config.patch_size);
        let position_embeddings = e.read_f32("position_embeddings", &[1, grid + 1, d]).await?;
        let act = activation(&config.hidden_act)?;
        let dims = VitDims { hidden: d, heads, mlp: config.intermediate_size, eps: config.layer_norm_eps, act, qkv_bias: config.qkv_bias };
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            layers.push(VitLayer::load(&w.sub(format!("dpt.encoder.layer.{i}")), VitNaming::Vit, dims).await?);
        }
        let readout = Readout::parse(&config.readout_type)?;
        let neck = w.sub("neck");
        let (mut readout_projects, mut reassemble) = (Vec::new(), Vec::new());
        for (i, (&c, &f)) in config.neck_hidden_sizes.iter().zip(&config.reassemble_factors).enumerate() {
            let from_backbone = config.is_hybrid && config.neck_ignore_stages.contains(&i);
            if from_backbone {
                readout_projects.push(None);
                reassemble.push(None);
                continue;
            }
            readout_projects.push(if readout == Readout::Project { Some(load_readout(&neck.sub(format!("reassemble_stage.readout_projects.{i}.0")), d).await?) } else { None });
            reassemble.push(Some(ReassembleLayer::load(&neck.sub(format!("reassemble_stage.layers.{i}")), d, c, f).await?));
        }
        let bias = config.use_bias_in_fusion_residual.unwrap_or(!config.use_batch_norm_in_fusion_residual);
        let f = config.fusion_hidden_size;
        let fusion = FusionNeck::load(&neck, &config.neck_hidden_sizes, f, config.use_batch_norm_in_fusion_residual, bias).await?;
        let h = w.sub("head");
        let head_projection = if config.add_projection { Some(Conv2d::load(&h.sub("projection"), 256, 256, 3, 1, 1).await?) } else { None };
        let relu = |mut c: Conv2d| {
            c.spec.act = Activation::Relu;
            c
        };
        let head = [
            Conv2d::load(&h.sub("head.0"), f, f / 2, 3, 1, 1).await?,
            relu(Conv2d::load(&h.sub("head.2"), f / 2, 32, 3, 1, 1).await?),
            relu(Conv2d::load(&h.sub("head.4"), 32, 1, 1, 1, 0).await?),
        ];
        Ok(Self { config, embeddings, cls_token, position_embeddings, layers, readout, readout_projects, reassemble, neck: fusion, head_projection, head, act })
    }

    /// Relative inverse depth `[1, H', W']` (`predicted_depth`) for one image `[1, 3, H, W]` as
    /// the image processor makes it.
    pub fn forward(&self, gpu: &Gpu, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let &[1, ch, h, w] = pixel_values.shape() else {
            return Err(Error::Shape(format!("DPT takes one image [1, {}, H, W], got {:?}", c.num_channels, pixel_values.shape())));
        };
        let p = c.patch_size;
        if ch != c.num_channels || h < p || w < p {
            return Err(Error::Input(format!("DPT takes images of {} channels and at least {p}x{p} pixels, got {ch}x{h}x{w}", c.num_channels)));
        }
        if c.is_hybrid && (h, w) != c.image_size.hw() {
            return Err(Error::Input(format!("DPT-Hybrid runs at its image_size {:?}; the image is {w}x{h}", c.image_size.hw())));
        }
        let d = c.hidden_size;
        let (gh, gw) = (h / p, w / p);
        let (tokens, mut maps) = match &self.embeddings {
            Embeddings::Patches(conv) => {
                let x = conv.forward(gpu, pixel_values, None)?.reshape(&[1, d, gh * gw])?;
                (ops::permute(gpu, &x, &[0, 2, 1])?, Vec::new())
            }
            Embeddings::Hybrid { backbone, projection } => {
                let stages = backbone.forward(gpu, pixel_values)?;
                let last = stages.last().ok_or_else(|| Error::Shape("BiT stages".into()))?;
                if (last.dim(2), last.dim(3)) != (gh, gw) {
                    return Err(Error::Model(format!("BiT's last stage is {}x{}, the ViT expects a {gw}x{gh} grid", last.dim(3), last.dim(2))));
                }
                let x = last.reshape(&[1, last.dim(1), gh * gw])?;
                // residual_feature_map_index: the first two stages go to the neck as they are.
                (projection.forward_channels_first(gpu, &x)?, stages[..2].to_vec())
            }
        };
        let pos = resize_position_embeddings(&self.position_embeddings, d, gh, gw, Interpolation::Bilinear)?;
        let pos = gpu.upload(&[1, 1 + gh * gw, d], tokens.dtype(), &pos)?;
        let mut hidden = ops::add(gpu, &ops::concat(gpu, &[&self.cls_token, &tokens], 1)?, &pos)?;
        let wanted: Vec<usize> = if c.is_hybrid { c.backbone_out_indices[2..].to_vec() } else { c.backbone_out_indices.clone() };
        let mut taps = Vec::new();
        for (i, layer) in self.layers.iter().enumerate().take(wanted.iter().max().map_or(0, |m| m + 1)) {
            hidden = layer.forward(gpu, &hidden)?;
            if wanted.contains(&i) {
                taps.push(hidden.clone());
            }
        }
        for state in &taps {
            let level = maps.len();
            let (Some(layer), readout) = (&self.reassemble[level], &self.readout_projects[level]) else {
                return Err(Error::Model(format!("DPT neck level {level} has no reassemble layer")));
            };
            let tokens = readout_tokens(gpu, self.readout, readout.as_ref(), self.act, state, gh * gw, d)?;
            maps.push(layer.forward(gpu, &tokens, gh, gw)?);
        }
        let fused = self.neck.forward(gpu, &maps, false)?;
        let mut x = if c.head_in_index < 0 { fused.last().cloned() } else { fused.get(c.head_in_index as usize).cloned() }.ok_or_else(|| Error::Shape("DPT fused maps".into()))?;
        if let Some(proj) = &self.head_projection {
            x = ops::activation(gpu, &proj.forward(gpu, &x, None)?, Activation::Relu)?;
        }
        let x = self.head[0].forward(gpu, &x, None)?;
        let x = ops::interpolate(gpu, &x, 2 * x.dim(2), 2 * x.dim(3), Interpolation::Bilinear, Coordinates::AlignCorners)?;
        let x = self.head[1].forward(gpu, &x, None)?;
        let x = self.head[2].forward(gpu, &x, None)?;
        x.reshape(&[1, x.dim(2), x.dim(3)])
    }
}

/// `readout_projects[i]`: `Linear(2 d, d)` on `[tokens, class token]`, split into the halves
/// that multiply each (so the class token's part is computed once per image).
pub(crate) async fn load_readout(w: &W<'_, '_>, d: usize) -> Result<(Linear, Linear)> {
    let weight = w.read_f32("weight", &[d, 2 * d]).await?;
    let bias = w.read_f32("bias", &[d]).await?;
    let half = |first: bool| -> Result<Linear> {
        let rows: Vec<f32> = weight.chunks(2 * d).flat_map(|r| if first { &r[..d] } else { &r[d..] }).copied().collect();
        Ok(Linear { weight: w.gpu.upload(&[d, d], w.dtype, &rows)?, bias: if first { None } else { Some(w.gpu.upload(&[d], w.dtype, &bias)?) }, in_features: d, out_features: d, lora: None, probe: None })
    };
    Ok((half(true)?, half(false)?))
}

/// The patch tokens of a hidden state `[1, 1 + n, d]` with the readout token taken in.
pub(crate) fn readout_tokens(gpu: &Gpu, readout: Readout, project: Option<&(Linear, Linear)>, act: Activation, state: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let cls = ops::slice(gpu, state, 0, &[1, 1, d])?;
    let tokens = ops::slice(gpu, state, d, &[1, n, d])?;
    match (readout, project) {
        (Readout::Ignore, _) => Ok(tokens),
        (Readout::Add, _) => ops::add(gpu, &tokens, &cls),
        (Readout::Project, Some((tok, cls_part))) => {
            let r = cls_part.forward(gpu, &cls, Activation::None)?;
            let y = ops::add(gpu, &tok.forward(gpu, &tokens, Activation::None)?, &r)?;
            ops::activation(gpu, &y, act)
        }
        (Readout::Project, None) => Err(Error::Model("DPT readout projection missing".into())),
    }
}
