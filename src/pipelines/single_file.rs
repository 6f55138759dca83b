//! Single-file checkpoints in the original CompVis / Stability layout
//! (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`): detection, config
//! inference from tensor shapes, and renaming to diffusers' names.

use std::collections::BTreeSet;

use crate::loader::safetensors::Header;
use crate::loader::{FileSource, WeightFile, Weights};
use crate::error::{Error, Result};
use crate::models::unet_2d_condition::PerBlock;
use crate::models::{AutoencoderKLConfig, ClipTextConfig, ControlNetConfig, UNet2DConditionConfig};
use crate::tokenizer::{clip_bpe_files, ClipPad, ClipTokenizer};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP_HF: &str = "cond_stage_model.transformer.";
const CLIP_OPEN: &str = "cond_stage_model.model.";
/// SDXL (Stability's SGM layout): the base's CLIP ViT-L and OpenCLIP bigG, the refiner's bigG.
const XL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
const XL_BIGG: &str = "conditioner.embedders.1.model.";
const XL_REFINER_BIGG: &str = "conditioner.embedders.0.model.";

/// Which text encoder layout a checkpoint has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextLayout {
    /// SD 1.x: OpenAI CLIP in transformers' layout.
    HfClip,
    /// SD 2.x: OpenCLIP (fused in_proj, resblocks).
    OpenClip,
    /// SDXL base: CLIP ViT-L in transformers' layout and OpenCLIP bigG with its projection.
    Xl,
    /// SDXL refiner: OpenCLIP bigG alone.
    XlRefiner,
}

/// What [`detect`] found.
#[derive(Clone, Debug)]
pub struct Layout {
    pub text: TextLayout,
}

/// Configs inferred from a checkpoint's shapes.
pub struct InferredConfigs {
    pub text_encoder: ClipTextConfig,
    pub unet: UNet2DConditionConfig,
    pub vae: AutoencoderKLConfig,
    pub scheduler: serde_json::Value,
}

/// Checks the checkpoint is a Stable Diffusion 1.x / 2.x one and which text encoder it has.
pub fn detect(h: &Header) -> Result<Layout> {
    let has = |p: &str| h.tensors.keys().any(|k| k.starts_with(p));
    if has("conditioner.embedders") {
        if !has(UNET) || !has(VAE) {
            return Err(Error::Model("an SDXL checkpoint needs model.diffusion_model.* and first_stage_model.* tensors".into()));
        }
        return if has(XL_REFINER_BIGG) {
            Ok(Layout { text: TextLayout::XlRefiner })
        } else if has(XL_CLIP_L) && has(XL_BIGG) {
            Ok(Layout { text: TextLayout::Xl })
        } else {
            Err(Error::Model("an SDXL checkpoint whose text encoders are neither conditioner.embedders.0.transformer + .1.model (base) nor .0.model (refiner)".into()))
        };
    }
    if !has(UNET) || !has(VAE) {
        return Err(Error::Model("not a Stable Diffusion checkpoint: expected model.diffusion_model.* and first_stage_model.* tensors (a UNet-only or LoRA file cannot be used on its own)".into()));
    }
    let text = if has(CLIP_HF) {
        TextLayout::HfClip
    } else if has(CLIP_OPEN) {
        TextLayout::OpenClip
    } else {
        return Err(Error::Model("the checkpoint has no text encoder (cond_stage_model.*); use a full checkpoint or a diffusers folder".into()));
    };
    Ok(Layout { text })
}

fn shape<'h>(h: &'h Header, name: &str) -> Result<&'h [usize]> {
    h.tensors.get(name).map(|e| e.shape.as_slice()).ok_or_else(|| Error::Model(format!("cannot infer the architecture: the checkpoint has no {name}")))
}

fn count(h: &Header, prefix: &str) -> usize {
    let ids: BTreeSet<usize> = h.tensors.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok()).collect();
    ids.len()
}

/// What the contracting path of an original-layout UNet (or ControlNet) under `prefix` says
/// about its architecture.
struct DownPath {
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    context_dim: usize,
    use_linear_projection: bool,
    /// SD 2.x: 1024-wide text (or an OpenCLIP text encoder).
    sd2: bool,
    attention_head_dim: PerBlock,
}

impl DownPath {
    fn infer(h: &Header, prefix: &str, levels: usize, lpb: usize, open_clip: bool) -> Result<Self> {
        let mut block_out_channels = Vec::new();
        let mut down_block_types = Vec::new();
        for l in 0..levels {
            let k = 1 + l * (lpb + 1);
            block_out_channels.push(shape(h, &format!("{prefix}input_blocks.{k}.0.out_layers.3.weight"))?[0]);
            let attn = h.tensors.contains_key(&format!("{prefix}input_blocks.{k}.1.norm.weight"));
            down_block_types.push(if attn { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string());
        }
        let attn_key = h.tensors.keys().find(|k| k.starts_with(prefix) && k.ends_with("attn2.to_k.weight")).ok_or_else(|| Error::Model("the UNet has no cross-attention".into()))?;
        let context_dim = shape(h, attn_key)?[1];
        let proj_in = h.tensors.keys().find(|k| k.starts_with(prefix) && k.ends_with("proj_in.weight")).map(|k| shape(h, k)).transpose()?;
        let sd2 = context_dim == 1024 || open_clip;
        // Head counts are not in the weights: SD 1.x uses 8 heads, SD 2.x heads of 64 channels.
        let attention_head_dim = if sd2 { PerBlock::Each(block_out_channels.iter().map(|c| (c / 64).max(1)).collect()) } else { PerBlock::One(8) };
        Ok(Self { block_out_channels, down_block_types, context_dim, use_linear_projection: proj_in.is_some_and(|s| s.len() == 2), sd2, attention_head_dim })
    }
}

/// Infers configs the way diffusers' single-file loader picks them: architecture from shapes,
/// the rest from the official SD 1.5 (context 768) or SD 2.1-v (context 1024) configs.
pub fn infer_configs(h: &Header, layout: &Layout) -> Result<InferredConfigs> {
    if matches!(layout.text, TextLayout::Xl | TextLayout::XlRefiner) {
        return Err(Error::Model("this is an SDXL checkpoint (see infer_xl_configs)".into()));
    }
    let (unet, sd2) = infer_unet(h, layout.text == TextLayout::OpenClip)?;
    let vae = infer_vae(h, if sd2 { 768 } else { 512 })?;
    // Text encoder.
    let text_encoder = match layout.text {
        TextLayout::HfClip => {
            let p = hf_prefix(h);
            let tok = shape(h, &format!("{p}embeddings.token_embedding.weight"))?;
            ClipTextConfig {
                vocab_size: tok[0], hidden_size: tok[1], intermediate_size: shape(h, &format!("{p}encoder.layers.0.mlp.fc1.weight"))?[0],
                num_hidden_layers: count(h, &format!("{p}encoder.layers.")), num_attention_heads: (tok[1] / 64).max(1),
                max_position_embeddings: shape(h, &format!("{p}embeddings.position_embedding.weight"))?[0], hidden_act: "quick_gelu".into(),
                ..Default::default()
            }
        }
        TextLayout::OpenClip => {
            let tok = shape(h, &format!("{CLIP_OPEN}token_embedding.weight"))?;
            // SD 2.x conditions on the penultimate layer; diffusers' converted text encoder simply
            // has one layer fewer.
            ClipTextConfig {
                vocab_size: tok[0], hidden_size: tok[1], intermediate_size: shape(h, &format!("{CLIP_OPEN}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
                num_hidden_layers: count(h, &format!("{CLIP_OPEN}transformer.resblocks.")).saturating_sub(1).max(1), num_attention_heads: (tok[1] / 64).max(1),
                max_position_embeddings: shape(h, &format!("{CLIP_OPEN}positional_embedding"))?[0], hidden_act: "gelu".into(),
                ..Default::default()
            }
        }
        TextLayout::Xl | TextLayout::XlRefiner => return Err(Error::Model("this is an SDXL checkpoint (see infer_xl_configs)".into())),
    };
    let scheduler = serde_json::json!({
        "_class_name": if sd2 { "DDIMScheduler" } else { "PNDMScheduler" },
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "skip_prk_steps": true,
        "prediction_type": if sd2 { "v_prediction" } else { "epsilon" },
    });
    Ok(InferredConfigs { text_encoder, unet, vae, scheduler })
}

/// The UNet's config from an original-layout checkpoint's shapes (and whether it is SD 2.x-like:
/// heads of 64 channels); `heads_of_64` for OpenCLIP-conditioned models.
fn infer_unet(h: &Header, heads_of_64: bool) -> Result<(UNet2DConditionConfig, bool)> {
    let in_channels = shape(h, &format!("{UNET}input_blocks.0.0.weight"))?[1];
    let n_input = count(h, &format!("{UNET}input_blocks."));
    // input_blocks: conv_in, then per level `lpb` resnets and (all but the last level) a downsampler.
    let n_out = count(h, &format!("{UNET}output_blocks."));
    let levels_lpb = (1..=4).flat_map(|l| (1..=4).map(move |p| (l, p))).find(|&(l, p)| 1 + l * p + (l - 1) == n_input && l * (p + 1) == n_out);
    let (levels, lpb) = levels_lpb.ok_or_else(|| Error::Model(format!("cannot infer the UNet layout from {n_input} input and {n_out} output blocks")))?;
    let DownPath { block_out_channels, down_block_types: down, context_dim, use_linear_projection, sd2, attention_head_dim } = DownPath::infer(h, UNET, levels, lpb, heads_of_64)?;
    let up: Vec<String> = down.iter().rev().map(|d| d.replace("Down", "Up")).collect();
    let unet = UNet2DConditionConfig {
        sample_size: Some(if sd2 { 96 } else { 64 }), in_channels, out_channels: shape(h, &format!("{UNET}out.2.weight"))?[0],
        down_block_types: down, up_block_types: up, block_out_channels, layers_per_block: PerBlock::One(lpb),
        cross_attention_dim: PerBlock::One(context_dim), attention_head_dim, use_linear_projection,
        upcast_attention: sd2, ..Default::default()
    };
    Ok((unet, sd2))
}

/// The VAE's config from an original-layout checkpoint's shapes.
fn infer_vae(h: &Header, sample_size: usize) -> Result<AutoencoderKLConfig> {
    let v_levels = count(h, &format!("{VAE}encoder.down."));
    let mut vae_ch = Vec::new();
    for l in 0..v_levels {
        vae_ch.push(shape(h, &format!("{VAE}encoder.down.{l}.block.0.conv1.weight"))?[0]);
    }
    Ok(AutoencoderKLConfig {
        down_block_types: vec!["DownEncoderBlock2D".into(); v_levels], up_block_types: vec!["UpDecoderBlock2D".into(); v_levels],
        block_out_channels: vae_ch, layers_per_block: count(h, &format!("{VAE}encoder.down.0.block.")),
        latent_channels: shape(h, &format!("{VAE}post_quant_conv.weight"))?[0], sample_size,
        ..Default::default()
    })
}

/// Configs inferred from an SDXL checkpoint (base or refiner).
pub struct InferredXl {
    /// CLIP ViT-L (the base only).
    pub text_encoder: Option<ClipTextConfig>,
    /// OpenCLIP bigG with projection.
    pub text_encoder_2: ClipTextConfig,
    pub unet: UNet2DConditionConfig,
    pub vae: AutoencoderKLConfig,
    pub scheduler: serde_json::Value,
    pub refiner: bool,
}

/// The bigG prefix of an SDXL layout.
fn bigg_prefix(layout: &Layout) -> &'static str {
    if layout.text == TextLayout::XlRefiner { XL_REFINER_BIGG } else { XL_BIGG }
}

/// An OpenCLIP text tower's config; `all_layers`: SDXL conditions on its penultimate layer
/// through transformers' hidden states, SD 2.x through a converted model one layer shorter.
fn open_clip_config(h: &Header, p: &str, all_layers: bool, hidden_act: &str) -> Result<ClipTextConfig> {
    let tok = shape(h, &format!("{p}token_embedding.weight"))?;
    let layers = count(h, &format!("{p}transformer.resblocks."));
    let projection_dim = h.tensors.get(&format!("{p}text_projection")).map_or(tok[1], |e| e.shape.get(1).copied().unwrap_or(tok[1]));
    Ok(ClipTextConfig {
        vocab_size: tok[0], hidden_size: tok[1], intermediate_size: shape(h, &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
        num_hidden_layers: if all_layers { layers } else { layers.saturating_sub(1).max(1) }, num_attention_heads: (tok[1] / 64).max(1),
        max_position_embeddings: shape(h, &format!("{p}positional_embedding"))?[0], hidden_act: hidden_act.into(), projection_dim,
        // SDXL's configs carry the legacy value: the pooled state sits at the largest token id.
        eos_token_id: Some(2),
        ..Default::default()
    })
}

/// Infers an SDXL base or refiner's configs as diffusers' single-file loader does: shapes, and
/// the official base / refiner configs for the rest (heads of 64 channels, Euler, 0.13025).
pub fn infer_xl_configs(h: &Header, layout: &Layout) -> Result<InferredXl> {
    let refiner = layout.text == TextLayout::XlRefiner;
    let (mut unet, _) = infer_unet(h, true)?;
    let bigg = bigg_prefix(layout);
    let text_encoder_2 = open_clip_config(h, bigg, true, "gelu")?;
    // label_emb: [temb, projection + k * dim], k = 6 size conditions (5 for the refiner).
    let label = shape(h, &format!("{UNET}label_emb.0.0.weight"))?;
    let k = if refiner { 5 } else { 6 };
    let proj = text_encoder_2.projection_dim;
    if label.len() != 2 || label[1] <= proj || (label[1] - proj) % k != 0 {
        return Err(Error::Model(format!("the SDXL UNet's label_emb takes {} values, which is not {proj} plus {k} size conditions", label.get(1).copied().unwrap_or(0))));
    }
    unet.addition_embed_type = Some("text_time".into());
    unet.addition_time_embed_dim = Some((label[1] - proj) / k);
    unet.projection_class_embeddings_input_dim = Some(label[1]);
    unet.upcast_attention = false;
    unet.sample_size = Some(128);
    // Transformer depth per level: SDXL's 1, 2, 10 (the refiner's 4 everywhere).
    let lpb = unet.layers_per_block.get(0);
    let depths: Vec<usize> = (0..unet.block_out_channels.len())
        .map(|l| count(h, &format!("{UNET}input_blocks.{}.1.transformer_blocks.", 1 + l * (lpb + 1))).max(1))
        .collect();
    unet.transformer_layers_per_block = PerBlock::Each(depths);
    let text_encoder = if refiner {
        None
    } else {
        let p = format!("{XL_CLIP_L}text_model.");
        let tok = shape(h, &format!("{p}embeddings.token_embedding.weight"))?;
        Some(ClipTextConfig {
            vocab_size: tok[0], hidden_size: tok[1], intermediate_size: shape(h, &format!("{p}encoder.layers.0.mlp.fc1.weight"))?[0],
            num_hidden_layers: count(h, &format!("{p}encoder.layers.")), num_attention_heads: (tok[1] / 64).max(1),
            max_position_embeddings: shape(h, &format!("{p}embeddings.position_embedding.weight"))?[0], hidden_act: "quick_gelu".into(),
            ..Default::default()
        })
    };
    let vae = AutoencoderKLConfig { scaling_factor: 0.13025, force_upcast: true, ..infer_vae(h, 1024)? };
    let scheduler = serde_json::json!({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
        "use_karras_sigmas": false, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
        "skip_prk_steps": true, "clip_sample": false,
    });
    Ok(InferredXl { text_encoder, text_encoder_2, unet, vae, scheduler, refiner })
}

/// An SDXL checkpoint's text encoders under transformers' names: CLIP ViT-L (`second` false)
/// or OpenCLIP bigG with its projection (`second` true).
pub fn xl_text_weights<'s>(src: &'s dyn FileSource, files: Vec<WeightFile>, layout: &Layout, second: bool, cfg: &ClipTextConfig) -> Result<Weights<'s>> {
    if !second {
        let h = files[0].header.clone();
        let mut w = Weights::renamed(src, files);
        for k in h.tensors.keys() {
            if let Some(rest) = k.strip_prefix(XL_CLIP_L) {
                w.alias(rest, k, None)?;
            }
        }
        return Ok(w);
    }
    let mut w = Weights::renamed(src, files);
    open_clip_aliases(&mut w, bigg_prefix(layout), cfg)?;
    w.alias_transposed("text_projection.weight", &format!("{}text_projection", bigg_prefix(layout)))?;
    Ok(w)
}

/// OpenCLIP's text tower under transformers' `text_model.` names (q, k, v split from `in_proj`).
fn open_clip_aliases(w: &mut Weights, o: &str, cfg: &ClipTextConfig) -> Result<()> {
    let d = cfg.hidden_size;
    w.alias("text_model.embeddings.token_embedding.weight", &format!("{o}token_embedding.weight"), None)?;
    w.alias("text_model.embeddings.position_embedding.weight", &format!("{o}positional_embedding"), None)?;
    w.alias("text_model.final_layer_norm.weight", &format!("{o}ln_final.weight"), None)?;
    w.alias("text_model.final_layer_norm.bias", &format!("{o}ln_final.bias"), None)?;
    for i in 0..cfg.num_hidden_layers {
        let (src_p, dst) = (format!("{o}transformer.resblocks.{i}."), format!("text_model.encoder.layers.{i}."));
        for (from, to) in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")] {
            for s in ["weight", "bias"] {
                w.alias(&format!("{dst}{to}.{s}"), &format!("{src_p}{from}.{s}"), None)?;
            }
        }
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            w.alias(&format!("{dst}self_attn.{name}.weight"), &format!("{src_p}attn.in_proj_weight"), Some((j * d, (j + 1) * d)))?;
            w.alias(&format!("{dst}self_attn.{name}.bias"), &format!("{src_p}attn.in_proj_bias"), Some((j * d, (j + 1) * d)))?;
        }
    }
    Ok(())
}

fn hf_prefix(h: &Header) -> String {
    if h.tensors.keys().any(|k| k.starts_with(&format!("{CLIP_HF}text_model."))) {
        format!("{CLIP_HF}text_model.")
    } else {
        CLIP_HF.to_string()
    }
}

/// The tokenizer for a checkpoint that carries none, from CLIP's BPE merges (`bpe_text`), which
/// SD 1.x and 2.x share; they differ in the padding token.
pub fn builtin_tokenizer(layout: &Layout, bpe_text: &str) -> Result<ClipTokenizer> {
    ClipTokenizer::from_clip_bpe(bpe_text, layout.pad())
}

impl Layout {
    fn pad(&self) -> ClipPad {
        match self.text {
            TextLayout::HfClip | TextLayout::Xl => ClipPad::EndOfText,
            TextLayout::OpenClip | TextLayout::XlRefiner => ClipPad::Exclamation,
        }
    }
}

/// The files besides weights of the diffusers folder that loads as this checkpoint does with
/// inferred configs (`model_index.json`, each component's config, the scheduler's, and the
/// built-in tokenizer's), as (path, bytes): `ldm convert` writes them next to the weights.
pub fn folder_files(h: &Header, bpe_text: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let layout = detect(h)?;
    let c = infer_configs(h, &layout)?;
    let json = |v: serde_json::Value| serde_json::to_vec_pretty(&v).map_err(|e| Error::Model(format!("writing a config: {e}")));
    let value = |v: std::result::Result<serde_json::Value, serde_json::Error>| v.map_err(|e| Error::Model(format!("writing a config: {e}")));
    let with = |mut v: serde_json::Value, keys: serde_json::Value| {
        if let (Some(o), Some(k)) = (v.as_object_mut(), keys.as_object()) {
            o.extend(k.clone());
        }
        v
    };
    let scheduler_class = c.scheduler.get("_class_name").and_then(|v| v.as_str()).unwrap_or("PNDMScheduler").to_string();
    let none = serde_json::json!([null, null]);
    let mut files = vec![
        ("model_index.json".to_string(), json(serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "safety_checker": none, "feature_extractor": none,
            "requires_safety_checker": false,
        }))?),
        ("scheduler/scheduler_config.json".to_string(), json(c.scheduler.clone())?),
        ("unet/config.json".to_string(), json(with(value(serde_json::to_value(&c.unet))?, serde_json::json!({"_class_name": "UNet2DConditionModel"})))?),
        ("vae/config.json".to_string(), json(with(value(serde_json::to_value(&c.vae))?, serde_json::json!({"_class_name": "AutoencoderKL"})))?),
        ("text_encoder/config.json".to_string(), json(with(value(serde_json::to_value(&c.text_encoder))?, serde_json::json!({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"})))?),
    ];
    for (name, text) in clip_bpe_files(bpe_text, layout.pad())? {
        files.push((format!("tokenizer/{name}"), text.into_bytes()));
    }
    Ok(files)
}

/// The text encoder's tensors under transformers' names.
pub fn text_encoder_weights<'s>(src: &'s dyn FileSource, files: Vec<WeightFile>, layout: &Layout, cfg: &ClipTextConfig) -> Result<Weights<'s>> {
    let h = files[0].header.clone();
    let mut w = Weights::renamed(src, files);
    match layout.text {
        TextLayout::HfClip => {
            let p = hf_prefix(&h);
            for k in h.tensors.keys() {
                if let Some(rest) = k.strip_prefix(&p) {
                    w.alias(&format!("text_model.{rest}"), k, None)?;
                }
            }
        }
        TextLayout::OpenClip => open_clip_aliases(&mut w, CLIP_OPEN, cfg)?,
        TextLayout::Xl | TextLayout::XlRefiner => return Err(Error::Model("an SDXL checkpoint's text encoders load with xl_text_weights".into())),
    }
    Ok(w)
}

/// diffusers' name of an original UNet tensor name (without the `model.diffusion_model.` prefix).
fn unet_name(orig: &str, cfg: &UNet2DConditionConfig) -> Option<String> {
    let lpb = cfg.layers_per_block.get(0);
    let resnet = |rest: &str| -> Option<String> {
        let (layer, tail) = rest.split_once('.')?;
        let (layer, idx) = match (layer, tail.split_once('.')) {
            ("in_layers", Some(("0", t))) => ("norm1", t),
            ("in_layers", Some(("2", t))) => ("conv1", t),
            ("emb_layers", Some(("1", t))) => ("time_emb_proj", t),
            ("out_layers", Some(("0", t))) => ("norm2", t),
            ("out_layers", Some(("3", t))) => ("conv2", t),
            ("skip_connection", _) => return Some(format!("conv_shortcut.{tail}")),
            _ => return None,
        };
        Some(format!("{layer}.{idx}"))
    };
    let parts: Vec<&str> = orig.splitn(4, '.').collect();
    match parts.as_slice() {
        ["time_embed", "0", rest @ ..] => Some(format!("time_embedding.linear_1.{}", rest.join("."))),
        ["time_embed", "2", rest @ ..] => Some(format!("time_embedding.linear_2.{}", rest.join("."))),
        // SDXL's added-condition MLP.
        ["label_emb", "0", "0", rest] => Some(format!("add_embedding.linear_1.{rest}")),
        ["label_emb", "0", "2", rest] => Some(format!("add_embedding.linear_2.{rest}")),
        ["input_blocks", "0", "0", rest] => Some(format!("conv_in.{rest}")),
        ["out", "0", rest @ ..] => Some(format!("conv_norm_out.{}", rest.join("."))),
        ["out", "2", rest @ ..] => Some(format!("conv_out.{}", rest.join("."))),
        ["input_blocks", k, sub, rest] => {
            let k: usize = k.parse().ok()?;
            let (level, j) = ((k - 1) / (lpb + 1), (k - 1) % (lpb + 1));
            if j == lpb {
                let rest = rest.strip_prefix("op.")?;
                return Some(format!("down_blocks.{level}.downsamplers.0.conv.{rest}"));
            }
            match *sub {
                "0" => Some(format!("down_blocks.{level}.resnets.{j}.{}", resnet(rest)?)),
                "1" => Some(format!("down_blocks.{level}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        ["middle_block", "0", rest @ ..] => Some(format!("mid_block.resnets.0.{}", resnet(&rest.join("."))?)),
        ["middle_block", "1", rest @ ..] => Some(format!("mid_block.attentions.0.{}", rest.join("."))),
        ["middle_block", "2", rest @ ..] => Some(format!("mid_block.resnets.1.{}", resnet(&rest.join("."))?)),
        ["output_blocks", k, sub, rest] => {
            let k: usize = k.parse().ok()?;
            let (level, j) = (k / (lpb + 1), k % (lpb + 1));
            let has_attn = cfg.up_block_types.get(level)?.starts_with("CrossAttn");
            match (*sub, has_attn) {
                ("0", _) => Some(format!("up_blocks.{level}.resnets.{j}.{}", resnet(rest)?)),
                ("1", true) => Some(format!("up_blocks.{level}.attentions.{j}.{rest}")),
                ("1", false) | ("2", true) => Some(format!("up_blocks.{level}.upsamplers.0.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The UNet's tensors under diffusers' names.
pub fn unet_weights<'s>(src: &'s dyn FileSource, files: Vec<WeightFile>, cfg: &UNet2DConditionConfig) -> Result<Weights<'s>> {
    let keys: Vec<String> = files[0].header.tensors.keys().cloned().collect();
    let mut w = Weights::renamed(src, files);
    for k in keys {
        if let Some(rest) = k.strip_prefix(UNET) {
            if let Some(name) = unet_name(rest, cfg) {
                w.alias(&name, &k, None)?;
            }
        }
    }
    Ok(w)
}

/// diffusers' name of an original VAE tensor name (without `first_stage_model.`).
fn vae_name(orig: &str, levels: usize) -> Option<String> {
    let resnet = |t: &str| t.replace("nin_shortcut", "conv_shortcut");
    let attn = |t: &str| -> Option<String> {
        let (layer, s) = t.split_once('.')?;
        let to = match layer {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        Some(format!("{to}.{s}"))
    };
    let (coder, rest) = orig.split_once('.')?;
    if coder == "quant_conv" || coder == "post_quant_conv" {
        return Some(orig.to_string());
    }
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    let parts: Vec<&str> = rest.splitn(5, '.').collect();
    let mapped = match parts.as_slice() {
        ["conv_in", ..] | ["conv_out", ..] => rest.to_string(),
        ["norm_out", s] => format!("conv_norm_out.{s}"),
        ["mid", "block_1", t @ ..] => format!("mid_block.resnets.0.{}", resnet(&t.join("."))),
        ["mid", "block_2", t @ ..] => format!("mid_block.resnets.1.{}", resnet(&t.join("."))),
        ["mid", "attn_1", t @ ..] => format!("mid_block.attentions.0.{}", attn(&t.join("."))?),
        ["down", i, "block", j, t] => format!("down_blocks.{i}.resnets.{j}.{}", resnet(t)),
        ["down", i, "downsample", "conv", s] => format!("down_blocks.{i}.downsamplers.0.conv.{s}"),
        ["up", i, "block", j, t] => format!("up_blocks.{}.resnets.{j}.{}", levels.checked_sub(1 + i.parse::<usize>().ok()?)?, resnet(t)),
        ["up", i, "upsample", "conv", s] => format!("up_blocks.{}.upsamplers.0.conv.{s}", levels.checked_sub(1 + i.parse::<usize>().ok()?)?),
        _ => return None,
    };
    Some(format!("{coder}.{mapped}"))
}

/// The VAE's tensors under diffusers' names.
pub fn vae_weights<'s>(src: &'s dyn FileSource, files: Vec<WeightFile>, cfg: &AutoencoderKLConfig) -> Result<Weights<'s>> {
    let keys: Vec<String> = files[0].header.tensors.keys().cloned().collect();
    let mut w = Weights::renamed(src, files);
    for k in keys {
        if let Some(rest) = k.strip_prefix(VAE) {
            if let Some(name) = vae_name(rest, cfg.block_out_channels.len()) {
                w.alias(&name, &k, None)?;
            }
        }
    }
    Ok(w)
}

/// The key prefix of an original-layout ControlNet file (lllyasviel's `control_model.`, or none
/// as some converted files have), or why the file is not one.
fn controlnet_prefix(h: &Header) -> Result<&'static str> {
    for p in ["control_model.", ""] {
        if h.tensors.contains_key(&format!("{p}input_hint_block.0.weight")) {
            return Ok(p);
        }
    }
    Err(Error::Model("not a ControlNet checkpoint: expected control_model.input_hint_block.* tensors (original layout), or use a diffusers ControlNet folder".into()))
}

/// diffusers' name of an original ControlNet tensor (prefix removed); `hint_levels` is the
/// length of `conditioning_embedding_out_channels`.
fn controlnet_name(orig: &str, cfg: &UNet2DConditionConfig, hint_levels: usize) -> Option<String> {
    let parts: Vec<&str> = orig.splitn(3, '.').collect();
    match parts.as_slice() {
        // conv, SiLU, then (conv, SiLU, stride-2 conv, SiLU) per level, then the zero conv.
        ["input_hint_block", k, rest] => {
            let k: usize = k.parse().ok()?;
            let last = 2 + 4 * (hint_levels - 1);
            let name = match k {
                0 => "conv_in".to_string(),
                k if k == last => "conv_out".to_string(),
                k if k % 2 == 0 && k < last => format!("blocks.{}", (k - 2) / 2),
                _ => return None,
            };
            Some(format!("controlnet_cond_embedding.{name}.{rest}"))
        }
        ["zero_convs", n, rest] => Some(format!("controlnet_down_blocks.{n}.{}", rest.strip_prefix("0.")?)),
        ["middle_block_out", "0", rest] => Some(format!("controlnet_mid_block.{rest}")),
        _ => unet_name(orig, cfg),
    }
}

/// The ControlNet's tensors under diffusers' names.
pub fn controlnet_weights<'s>(src: &'s dyn FileSource, files: Vec<WeightFile>, cfg: &ControlNetConfig) -> Result<Weights<'s>> {
    let prefix = controlnet_prefix(&files[0].header)?;
    let keys: Vec<String> = files[0].header.tensors.keys().cloned().collect();
    let mut w = Weights::renamed(src, files);
    for k in keys {
        if let Some(rest) = k.strip_prefix(prefix) {
            if let Some(name) = controlnet_name(rest, &cfg.unet, cfg.conditioning_embedding_out_channels.len()) {
                w.alias(&name, &k, None)?;
            }
        }
    }
    Ok(w)
}

/// A ControlNet's config inferred from an original-layout file, with what weights do not
/// record from SD 1.x (8 heads) or SD 2.x (heads of 64 channels) by the text width.
pub fn infer_controlnet_config(h: &Header) -> Result<ControlNetConfig> {
    let p = controlnet_prefix(h)?;
    let n_input = count(h, &format!("{p}input_blocks."));
    let levels = 1 + (1..n_input).filter(|k| h.tensors.contains_key(&format!("{p}input_blocks.{k}.0.op.weight"))).count();
    let lpb = (n_input - 1 - (levels - 1)) / levels;
    if lpb == 0 || 1 + levels * lpb + levels - 1 != n_input {
        return Err(Error::Model(format!("cannot infer the ControlNet layout from {n_input} input blocks")));
    }
    let path = DownPath::infer(h, p, levels, lpb, false)?;
    let hint = (0..).map(|k| format!("{p}input_hint_block.{k}.weight")).take(64).filter(|k| h.tensors.contains_key(k)).collect::<Vec<_>>();
    // Convs: conv_in, two per level, conv_out: the embedding widths are conv_in's and each
    // stride-2 conv's output.
    let mut emb = vec![shape(h, &hint[0])?[0]];
    for pair in hint[1..hint.len().saturating_sub(1)].chunks(2) {
        if let [_, down] = pair {
            emb.push(shape(h, down)?[0]);
        }
    }
    let unet = UNet2DConditionConfig {
        in_channels: shape(h, &format!("{p}input_blocks.0.0.weight"))?[1],
        up_block_types: path.down_block_types.iter().rev().map(|d| d.replace("Down", "Up")).collect(),
        down_block_types: path.down_block_types, block_out_channels: path.block_out_channels, layers_per_block: PerBlock::One(lpb),
        cross_attention_dim: PerBlock::One(path.context_dim), attention_head_dim: path.attention_head_dim,
        use_linear_projection: path.use_linear_projection, upcast_attention: path.sd2, ..Default::default()
    };
    // Checked when the model loads.
    Ok(ControlNetConfig { unet, conditioning_channels: shape(h, &hint[0])?[1], conditioning_embedding_out_channels: emb, global_pool_conditions: false, controlnet_conditioning_channel_order: "rgb".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_original_unet_and_vae_keys() {
        let cfg = UNet2DConditionConfig::default();
        for (orig, want) in [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
            ("input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight"),
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks.4.0.skip_connection.bias", "down_blocks.1.resnets.0.conv_shortcut.bias"),
            ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.5.1.proj_out.weight", "up_blocks.1.attentions.2.proj_out.weight"),
            ("out.2.weight", "conv_out.weight"),
        ] {
            assert_eq!(unet_name(orig, &cfg).as_deref(), Some(want), "{orig}");
        }
        for (orig, want) in [
            ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
            ("decoder.up.3.block.2.conv1.bias", "decoder.up_blocks.0.resnets.2.conv1.bias"),
            ("decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight"),
            ("decoder.mid.attn_1.proj_out.weight", "decoder.mid_block.attentions.0.to_out.0.weight"),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias"),
        ] {
            assert_eq!(vae_name(orig, 4).as_deref(), Some(want), "{orig}");
        }
    }
}
