//! LoRA adapter files: kohya / A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*` / `lora_te2_*`,
//! `.lora_down` / `.lora_up` / `.alpha`, conv LoRA "LoCon", SDXL's SGM block names), diffusers /
//! PEFT (`unet.*.lora_A` / `lora_B`, the `lora_adapter_metadata` alphas) and diffusers' older
//! attention-processor names (`processor.to_q_lora.down`).
//!
//! A file is read as a list of modules, each named the way a model names its layers (the
//! diffusers module path with `.` written `_`, which is how kohya names them), with the tensor
//! names of its down (A) and up (B) projections and its scale. Models ask for the factors of
//! each layer as they load it ([`AdapterSet::factors`]); the factors of every adapter targeting a
//! layer are stacked along the rank, each adapter's scale (multiplier x alpha / rank) folded into
//! its up projection, so several LoRAs cost one extra low-rank branch per layer. Tensors are read
//! one module at a time, never the whole file.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};

use super::{FileSource, WeightFile, Weights};
use crate::error::{Error, Result};

/// Which model component an adapter module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdapterTarget {
    Unet,
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG).
    TextEncoder2,
}

impl AdapterTarget {
    /// The component folder's name in a diffusers model.
    pub fn folder(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
    /// The target of a component folder (`None` for components adapters never touch).
    pub fn from_folder(folder: &str) -> Option<Self> {
        match folder {
            "unet" => Some(Self::Unet),
            "text_encoder" => Some(Self::TextEncoder),
            "text_encoder_2" => Some(Self::TextEncoder2),
            _ => None,
        }
    }
}

/// One module of an adapter file: which layer it changes and where its factors are.
#[derive(Clone, Debug)]
struct Module {
    target: AdapterTarget,
    /// The layer, as a diffusers module path with `.` written `_` (text encoders without a
    /// leading `text_model_`), e.g. `down_blocks_0_attentions_0_proj_in`.
    key: String,
    /// The name in the file, for messages.
    original: String,
    down: String,
    up: String,
    /// `alpha / rank` comes from this tensor (kohya) or the file's metadata (PEFT), else 1.
    alpha_tensor: Option<String>,
    alpha: Option<f32>,
}

/// One adapter file with its multiplier.
struct AdapterFile {
    name: String,
    src: Box<dyn FileSource>,
    file: WeightFile,
    multiplier: f32,
    /// Renamed in place once the UNet's layout is known ([`AdapterSet::resolve_unet_names`]).
    modules: RefCell<Vec<Module>>,
}

/// Low-rank factors for one layer: `delta W = up . down`, every adapter's scale folded into `up`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRankFactors {
    /// Summed rank of all adapters on this layer.
    pub rank: usize,
    /// `[rank, in]` for linear layers, `[rank, cin, kh, kw]` for convolutions (a conv LoRA's down
    /// projection is a convolution with the layer's kernel, stride and padding).
    pub down: Vec<f32>,
    pub down_shape: Vec<usize>,
    /// `[out, rank]`.
    pub up: Vec<f32>,
}

impl LowRankFactors {
    /// `up . down` as a `[out, in...]` weight delta.
    pub fn delta(&self) -> Vec<f32> {
        let k: usize = self.down_shape[1..].iter().product();
        let out = self.up.len() / self.rank.max(1);
        let mut d = vec![0f32; out * k];
        for o in 0..out {
            for r in 0..self.rank {
                let u = self.up[o * self.rank + r];
                if u == 0.0 {
                    continue;
                }
                let row = &self.down[r * k..(r + 1) * k];
                for (x, &a) in d[o * k..(o + 1) * k].iter_mut().zip(row) {
                    *x += u * a;
                }
            }
        }
        d
    }
}

/// The adapters applied to one model, read lazily.
#[derive(Default)]
pub struct AdapterSet {
    files: Vec<AdapterFile>,
    /// Add the adapters into the float weights at load instead of running them beside them.
    pub merge: bool,
    used: RefCell<HashSet<(usize, usize)>>,
    /// (target, key) -> (file, module), built on first use.
    index: RefCell<Option<std::collections::HashMap<(AdapterTarget, String), Vec<(usize, usize)>>>>,
}

impl std::fmt::Debug for AdapterSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.files.iter().map(|a| format!("{} x {}", a.name, a.multiplier)).collect();
        f.debug_struct("AdapterSet").field("files", &names).field("merge", &self.merge).finish()
    }
}

/// Module keys of kohya's SDXL (SGM) UNet names, translated to diffusers' for a UNet of
/// `layers_per_block` resnets per down block (as diffusers' `_maybe_map_sgm_blocks_to_diffusers`).
fn sgm_to_diffusers(key: &str, layers_per_block: usize, up_has_attention: &dyn Fn(usize) -> bool) -> Option<String> {
    let map_part = |rest: &str| -> String {
        // Resnet parts in the SGM names; attention parts are named as in diffusers.
        let mut r = rest.to_string();
        for (a, b) in [("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut")] {
            if r == a || r.starts_with(&format!("{a}_")) {
                r = format!("{b}{}", &r[a.len()..]);
            }
        }
        r
    };
    let direct = [("input_blocks_0_0", "conv_in"), ("out_2", "conv_out"), ("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"), ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2")];
    if let Some((_, to)) = direct.iter().find(|(from, _)| key == *from) {
        return Some(to.to_string());
    }
    let l1 = layers_per_block + 1;
    let split = |prefix: &str| -> Option<(usize, usize, String)> {
        let rest = key.strip_prefix(prefix)?;
        let mut it = rest.splitn(3, '_');
        let block: usize = it.next()?.parse().ok()?;
        let inner: usize = it.next()?.parse().ok()?;
        Some((block, inner, it.next().unwrap_or("").to_string()))
    };
    if let Some((i, inner, rest)) = split("input_blocks_") {
        if i == 0 {
            return None;
        }
        let (b, j) = ((i - 1) / l1, (i - 1) % l1);
        if rest == "op" || rest.starts_with("op_") {
            return Some(format!("down_blocks_{b}_downsamplers_0_conv{}", &rest[2..]));
        }
        return match inner {
            0 => Some(format!("down_blocks_{b}_resnets_{j}_{}", map_part(&rest))),
            1 => Some(format!("down_blocks_{b}_attentions_{j}_{rest}")),
            _ => None,
        };
    }
    if let Some(full) = key.strip_prefix("middle_block_") {
        let (i, tail) = full.split_once('_')?;
        return match i {
            "0" => Some(format!("mid_block_resnets_0_{}", map_part(tail))),
            "1" => Some(format!("mid_block_attentions_0_{tail}")),
            "2" => Some(format!("mid_block_resnets_1_{}", map_part(tail))),
            _ => None,
        };
    }
    if let Some((i, inner, rest)) = split("output_blocks_") {
        let (b, j) = (i / l1, i % l1);
        let upsampler = if up_has_attention(b) { 2 } else { 1 };
        return match inner {
            0 => Some(format!("up_blocks_{b}_resnets_{j}_{}", map_part(&rest))),
            n if n == upsampler => Some(format!("up_blocks_{b}_upsamplers_0_{rest}")),
            1 => Some(format!("up_blocks_{b}_attentions_{j}_{rest}")),
            _ => None,
        };
    }
    None
}

/// What a file's key says, if it is the down projection of a module: (target, flat key, up
/// tensor, alpha tensor).
fn classify(name: &str) -> Option<(AdapterTarget, String, String, Option<String>)> {
    // kohya / A1111.
    if let Some(base) = name.strip_suffix(".lora_down.weight") {
        let (target, flat) = if let Some(r) = base.strip_prefix("lora_unet_") {
            (AdapterTarget::Unet, r)
        } else if let Some(r) = base.strip_prefix("lora_te1_").or_else(|| base.strip_prefix("lora_te_")) {
            (AdapterTarget::TextEncoder, r)
        } else if let Some(r) = base.strip_prefix("lora_te2_") {
            (AdapterTarget::TextEncoder2, r)
        } else {
            return None;
        };
        return Some((target, flat.to_string(), format!("{base}.lora_up.weight"), Some(format!("{base}.alpha"))));
    }
    // PEFT (diffusers' current format) and diffusers' older processor format.
    let (base, up) = if let Some(b) = name.strip_suffix(".lora_A.weight") {
        (b.to_string(), format!("{b}.lora_B.weight"))
    } else if let Some(b) = name.strip_suffix(".lora_A.default.weight") {
        (b.to_string(), format!("{b}.lora_B.default.weight"))
    } else if let Some(b) = name.strip_suffix(".down.weight") {
        (b.to_string(), format!("{b}.up.weight"))
    } else {
        return None;
    };
    let (target, path) = if let Some(r) = base.strip_prefix("unet.").or_else(|| base.strip_prefix("base_model.model.")) {
        (AdapterTarget::Unet, r)
    } else if let Some(r) = base.strip_prefix("text_encoder_2.") {
        (AdapterTarget::TextEncoder2, r)
    } else if let Some(r) = base.strip_prefix("text_encoder.") {
        (AdapterTarget::TextEncoder, r)
    } else {
        return None;
    };
    // diffusers' older names: `attn1.processor.to_q_lora`, `self_attn.to_q_lora`, `mlp.fc1.lora_linear_layer`.
    let mut p = path.replace(".processor.", ".");
    for (from, to) in [
        (".lora_linear_layer", ""), (".to_q_lora", ".to_q"), (".to_k_lora", ".to_k"), (".to_v_lora", ".to_v"), (".to_out_lora", ".to_out.0"), (".lora", ""),
    ] {
        if let Some(stem) = p.strip_suffix(from) {
            p = format!("{stem}{to}");
        }
    }
    if target != AdapterTarget::Unet {
        for (from, to) in [(".to_q", ".q_proj"), (".to_k", ".k_proj"), (".to_v", ".v_proj"), (".to_out.0", ".out_proj")] {
            if let Some(stem) = p.strip_suffix(from) {
                p = format!("{stem}{to}");
            }
        }
    }
    let alpha = format!("{base}.alpha");
    Some((target, p.replace('.', "_"), up, Some(alpha)))
}

/// A text encoder's module key without the `text_model_` its names may start with.
fn text_key(key: &str) -> &str {
    key.strip_prefix("text_model_").unwrap_or(key)
}

/// The adapter kinds we do not run, recognised by their tensor names.
fn refused_kind(name: &str) -> Option<&'static str> {
    if name.contains("hada_w1") || name.contains("hada_w2") {
        Some("LoHa (LyCORIS Hadamard product)")
    } else if name.contains("lokr_w1") || name.contains("lokr_w2") {
        Some("LoKr (LyCORIS Kronecker product)")
    } else if name.ends_with("dora_scale") || name.contains("lora_magnitude_vector") {
        Some("DoRA (weight-decomposed LoRA)")
    } else if name.contains("lora_mid") {
        Some("LoCon with a Tucker-decomposed middle (lora_mid)")
    } else if name.ends_with(".diff") || name.ends_with(".diff_b") {
        Some("full weight differences (.diff)")
    } else {
        None
    }
}

/// Alphas per module from diffusers' `lora_adapter_metadata` (PEFT `LoraConfig` fields per
/// component, `unet.lora_alpha`, `unet.alpha_pattern`, ...).
fn metadata_alpha(meta: &BTreeMap<String, String>, target: AdapterTarget, module_path: &str) -> Option<f32> {
    let raw = meta.get("lora_adapter_metadata")?;
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let prefix = target.folder();
    let patterns = v.get(format!("{prefix}.alpha_pattern")).and_then(|p| p.as_object());
    if let Some(p) = patterns {
        // PEFT matches a pattern key against the end of the module name.
        let dotted = module_path;
        if let Some((_, a)) = p.iter().filter(|(k, _)| dotted == k.as_str() || dotted.ends_with(&format!(".{k}"))).max_by_key(|(k, _)| k.len()) {
            return a.as_f64().map(|a| a as f32);
        }
    }
    v.get(format!("{prefix}.lora_alpha")).and_then(|a| a.as_f64()).map(|a| a as f32)
}

impl AdapterSet {
    /// No adapters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether there are any adapters.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Names and multipliers of the adapters, for messages and PNG metadata.
    pub fn describe(&self) -> Vec<(String, f32)> {
        self.files.iter().map(|f| (f.name.clone(), f.multiplier)).collect()
    }

    /// Adds the adapter file `path` of `src` (named `name` in messages) with `multiplier`.
    pub async fn add(&mut self, src: Box<dyn FileSource>, path: &str, name: &str, multiplier: f32) -> Result<()> {
        if !multiplier.is_finite() {
            return Err(Error::Input(format!("LoRA {name}: the scale must be a finite number, got {multiplier}")));
        }
        let file = WeightFile::open_any(src.as_ref(), path).await.map_err(|e| match e {
            Error::Model(m) => Error::Model(format!("LoRA {name}: {m}")),
            other => other,
        })?;
        let bad = |m: String| Error::Model(format!("LoRA {name}: {m}"));
        let tensors = &file.header.tensors;
        if let Some((k, kind)) = tensors.keys().find_map(|k| refused_kind(k).map(|kind| (k, kind))) {
            return Err(bad(format!("it is a {kind} adapter (tensor {k}); ldm-web runs LoRA and LoCon adapters only")));
        }
        let mut modules = Vec::new();
        let mut claimed = HashSet::new();
        let peft_meta = file.header.metadata.contains_key("lora_adapter_metadata");
        for key in tensors.keys() {
            let Some((target, flat, up, alpha_tensor)) = classify(key) else { continue };
            if !tensors.contains_key(&up) {
                return Err(bad(format!("{key} has no matching up projection {up}")));
            }
            let flat = if target == AdapterTarget::Unet { flat } else { text_key(&flat).to_string() };
            let alpha_tensor = alpha_tensor.filter(|a| tensors.contains_key(a));
            // The dotted module path PEFT's patterns refer to.
            let dotted = key.split(".lora_").next().unwrap_or(key).split_once('.').map_or("", |(_, p)| p).to_string();
            let alpha = if alpha_tensor.is_none() && peft_meta { metadata_alpha(&file.header.metadata, target, &dotted) } else { None };
            claimed.insert(key.clone());
            claimed.insert(up.clone());
            if let Some(a) = &alpha_tensor {
                claimed.insert(a.clone());
            }
            modules.push(Module { target, key: flat, original: key.clone(), down: key.clone(), up, alpha_tensor, alpha });
        }
        if modules.is_empty() {
            let first: Vec<&String> = tensors.keys().take(3).collect();
            return Err(bad(format!("no LoRA modules found (expected kohya lora_down / lora_up or PEFT lora_A / lora_B tensors; the file starts with {first:?}); is this a LoRA file?")));
        }
        // Anything else in the file is not understood: say so rather than silently ignore it.
        if let Some(k) = tensors.keys().find(|k| !claimed.contains(*k) && !k.ends_with(".alpha")) {
            return Err(bad(format!("tensor {k} is not part of a LoRA module ldm-web knows (lora_down / lora_up / alpha, lora_A / lora_B)")));
        }
        self.files.push(AdapterFile { name: name.to_string(), src, file, multiplier, modules: RefCell::new(modules) });
        self.index.replace(None);
        Ok(())
    }

    /// Renames SDXL kohya modules written with SGM block names (`input_blocks_4_1_...`) to
    /// diffusers' names for a UNet with `layers_per_block` resnets per down block, whose up block
    /// `b` has attention when `up_has_attention(b)`. Call once the UNet's config is known.
    pub fn resolve_unet_names(&self, layers_per_block: usize, up_has_attention: &dyn Fn(usize) -> bool) -> Result<()> {
        for f in &self.files {
            let sgm = |k: &str| ["input_blocks_", "middle_block_", "output_blocks_"].iter().any(|p| k.starts_with(p)) || ["out_2", "time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2"].contains(&k);
            let mut modules = f.modules.borrow_mut();
            if !modules.iter().any(|m| m.target == AdapterTarget::Unet && sgm(&m.key)) {
                continue;
            }
            for m in modules.iter_mut().filter(|m| m.target == AdapterTarget::Unet) {
                if !sgm(&m.key) {
                    continue;
                }
                self.index.replace(None);
                // A name this UNet's layout has no place for stays as it is: it matches no
                // layer, and check_all_used reports it.
                if let Some(k) = sgm_to_diffusers(&m.key, layers_per_block, up_has_attention) {
                    m.key = k;
                }
            }
        }
        Ok(())
    }

    /// Whether any adapter has modules for `target`.
    pub fn targets(&self, target: AdapterTarget) -> bool {
        self.files.iter().any(|f| f.modules.borrow().iter().any(|m| m.target == target))
    }

    /// The stacked factors of every adapter on the layer at `module_path` (a diffusers module
    /// path) of `target`, for a layer with weight shape `[out, in]` or `[out, cin, kh, kw]`;
    /// `None` when no adapter changes it. Marks the modules used.
    pub async fn factors(&self, target: AdapterTarget, module_path: &str, weight_shape: &[usize]) -> Result<Option<LowRankFactors>> {
        if self.files.is_empty() {
            return Ok(None);
        }
        let flat = module_path.replace('.', "_");
        let key = if target == AdapterTarget::Unet { flat.as_str() } else { text_key(&flat) };
        let out = weight_shape[0];
        let fan_in: usize = weight_shape[1..].iter().product();
        let conv = weight_shape.len() == 4 && weight_shape[2] * weight_shape[3] > 1;
        let mut parts: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
        let found = {
            let mut index = self.index.borrow_mut();
            let index = index.get_or_insert_with(|| {
                let mut map: std::collections::HashMap<(AdapterTarget, String), Vec<(usize, usize)>> = Default::default();
                for (fi, f) in self.files.iter().enumerate() {
                    for (mi, m) in f.modules.borrow().iter().enumerate() {
                        map.entry((m.target, m.key.clone())).or_default().push((fi, mi));
                    }
                }
                map
            });
            index.get(&(target, key.to_string())).cloned().unwrap_or_default()
        };
        for (fi, mi) in found {
            let f = &self.files[fi];
            let m = f.modules.borrow()[mi].clone();
            {
                let w = Weights::new(f.src.as_ref(), vec![f.file.clone()]);
                let (ds, down) = w.read_f32(&m.down).await?;
                let (us, up) = w.read_f32(&m.up).await?;
                let rank = ds.first().copied().unwrap_or(0);
                let bad = |why: String| Error::Model(format!("LoRA {}: {} {why}; is it made for another model family (SD 1.x, SD 2.x, SDXL)?", f.name, m.original));
                // Down: [r, in] or [r, in, 1, 1] for linear layers and 1x1 convolutions, [r, cin, kh, kw] for convolutions.
                let down_ok = rank > 0
                    && ds[1..].iter().product::<usize>() == fan_in
                    && (if conv { ds.len() == 4 && ds[1..] == weight_shape[1..] } else { ds.iter().skip(2).all(|&d| d == 1) });
                if !down_ok {
                    return Err(bad(format!("has a down projection of shape {ds:?}, but the layer's weight is {weight_shape:?}")));
                }
                if us.len() < 2 || us[0] != out || us[1] != rank || us[2..].iter().any(|&d| d != 1) {
                    return Err(bad(format!("has an up projection of shape {us:?}, but the layer has {out} outputs and the adapter rank {rank}")));
                }
                let alpha = match &m.alpha_tensor {
                    Some(a) => {
                        let (_, v) = w.read_f32(a).await?;
                        Some(*v.first().ok_or_else(|| bad("has an empty alpha".into()))?)
                    }
                    None => m.alpha,
                };
                let scale = f.multiplier * alpha.map_or(1.0, |a| a / rank as f32);
                let up: Vec<f32> = up.iter().map(|v| v * scale).collect();
                parts.push((rank, down, up));
                self.used.borrow_mut().insert((fi, mi));
            }
        }
        if parts.is_empty() {
            return Ok(None);
        }
        let rank: usize = parts.iter().map(|p| p.0).sum();
        let mut down = Vec::with_capacity(rank * fan_in);
        let mut up = vec![0f32; out * rank];
        let mut r0 = 0;
        for (r, d, u) in &parts {
            down.extend_from_slice(d);
            for o in 0..out {
                up[o * rank + r0..o * rank + r0 + r].copy_from_slice(&u[o * r..(o + 1) * r]);
            }
            r0 += r;
        }
        let down_shape = if conv { vec![rank, weight_shape[1], weight_shape[2], weight_shape[3]] } else { vec![rank, fan_in] };
        Ok(Some(LowRankFactors { rank, down, down_shape, up }))
    }

    /// Fails, naming the first few, when modules of the `loaded` components matched no layer
    /// (an adapter for another model family, or for components this model lacks).
    pub fn check_all_used(&self, loaded: &[AdapterTarget]) -> Result<()> {
        let used = self.used.borrow();
        for (fi, f) in self.files.iter().enumerate() {
            let modules = f.modules.borrow();
            let missing: Vec<&Module> = modules.iter().enumerate().filter(|(mi, m)| !used.contains(&(fi, *mi)) && loaded.contains(&m.target)).map(|(_, m)| m).collect();
            let absent: Vec<&Module> = modules.iter().filter(|m| !loaded.contains(&m.target)).collect();
            if !missing.is_empty() {
                let first: Vec<&str> = missing.iter().take(3).map(|m| m.original.as_str()).collect();
                return Err(Error::Model(format!(
                    "LoRA {}: {} of its {} modules match no layer of this model (first: {}); is it made for another model family (SD 1.x, SD 2.x, SDXL)?",
                    f.name, missing.len(), modules.len(), first.join(", ")
                )));
            }
            if let Some(m) = absent.first() {
                return Err(Error::Model(format!("LoRA {}: it has {} modules for the {}, which this model does not have (first: {}); is it made for another model family?", f.name, absent.len(), m.target.folder(), m.original)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_peft_and_old_diffusers_names() {
        let c = |n: &str| classify(n).map(|(t, k, ..)| (t, k));
        assert_eq!(c("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"), Some((AdapterTarget::Unet, "down_blocks_0_attentions_0_proj_in".into())));
        assert_eq!(c("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"), Some((AdapterTarget::TextEncoder2, "text_model_encoder_layers_0_mlp_fc1".into())));
        assert_eq!(c("lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight").map(|x| x.0), Some(AdapterTarget::TextEncoder));
        assert_eq!(c("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight"), Some((AdapterTarget::Unet, "mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0".into())));
        assert_eq!(c("text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight"), Some((AdapterTarget::TextEncoder, "text_model_encoder_layers_0_self_attn_k_proj".into())));
        assert_eq!(c("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight"), Some((AdapterTarget::Unet, "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0".into())));
        assert_eq!(c("text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.down.weight"), Some((AdapterTarget::TextEncoder, "text_model_encoder_layers_0_self_attn_v_proj".into())));
        assert_eq!(c("text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.down.weight"), Some((AdapterTarget::TextEncoder, "text_model_encoder_layers_0_mlp_fc2".into())));
        assert_eq!(c("lora_unet_x.lora_up.weight"), None);
        assert_eq!(refused_kind("lora_unet_a.hada_w1_a"), Some("LoHa (LyCORIS Hadamard product)"));
    }

    #[test]
    fn sgm_block_names_as_diffusers_maps_them() {
        let attn = |b: usize| b < 2;
        let m = |k: &str| sgm_to_diffusers(k, 2, &attn);
        assert_eq!(m("input_blocks_4_1_transformer_blocks_0_attn1_to_q").as_deref(), Some("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"));
        assert_eq!(m("input_blocks_1_0_in_layers_2").as_deref(), Some("down_blocks_0_resnets_0_conv1"));
        assert_eq!(m("input_blocks_3_0_op").as_deref(), Some("down_blocks_0_downsamplers_0_conv"));
        assert_eq!(m("input_blocks_5_0_emb_layers_1").as_deref(), Some("down_blocks_1_resnets_1_time_emb_proj"));
        assert_eq!(m("input_blocks_4_0_skip_connection").as_deref(), Some("down_blocks_1_resnets_0_conv_shortcut"));
        assert_eq!(m("middle_block_1_proj_in").as_deref(), Some("mid_block_attentions_0_proj_in"));
        assert_eq!(m("middle_block_2_out_layers_3").as_deref(), Some("mid_block_resnets_1_conv2"));
        assert_eq!(m("output_blocks_2_2_conv").as_deref(), Some("up_blocks_0_upsamplers_0_conv"));
        assert_eq!(m("output_blocks_4_1_proj_out").as_deref(), Some("up_blocks_1_attentions_1_proj_out"));
        assert_eq!(m("output_blocks_8_0_out_layers_3").as_deref(), Some("up_blocks_2_resnets_2_conv2"));
        assert_eq!(m("input_blocks_0_0").as_deref(), Some("conv_in"));
        assert_eq!(m("label_emb_0_2").as_deref(), Some("add_embedding_linear_2"));
    }

    #[test]
    fn stacked_factors_give_the_summed_delta() {
        let f = LowRankFactors { rank: 2, down: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], down_shape: vec![2, 3], up: vec![1.0, 0.0, 0.5, 2.0] };
        assert_eq!(f.delta(), vec![1.0, 2.0, 3.0, 8.5, 11.0, 13.5]);
    }
}
