//! Quantised weights in safetensors files (what `ldm convert` writes). A block-quantised
//! weight `W` of logical shape `S` is stored as plain safetensors tensors that any reader can
//! list, plus one metadata entry that says how to read them back:
//!
//! - `W`: the packed values, `[rows, blocks_per_row * value_bytes]` (I8 for q8_0, U8 for q4),
//! - `W.scales`: one f16 scale per block, `[rows, blocks_per_row]`,
//! - `W.mins`: one f16 minimum per block (q4_1 and q5_1 only), same shape,
//! - metadata `ldm-web.quant.W` = `"q4_1:320,320,3,3"` (dtype, logical shape),
//!
//! with rows the first dimension of `S` and blocks of 32 along the rest (see `gpu::dtype`).

use super::safetensors::{FileDType, Header, TensorEntry};
use crate::error::{Error, Result};
use crate::gpu::DType;

/// Prefix of the metadata key that marks a quantised tensor.
pub const QUANT_KEY_PREFIX: &str = "ldm-web.quant.";
/// Suffixes of the companion tensors, one per f16 parameter array (scales, minimums).
pub const PARAM_SUFFIXES: [&str; 2] = [".scales", ".mins"];

/// How a quantised tensor is stored: its dtype, logical shape and the file tensors holding it.
#[derive(Clone, Debug)]
pub struct StoredQuant {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub values: TensorEntry,
    pub params: Vec<TensorEntry>,
}

/// The metadata value for a quantised tensor (`q4_1:320,320,3,3`).
pub fn describe(dtype: DType, shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("{}:{}", dtype.name(), dims.join(","))
}

/// Names of the file tensors a quantised `name` is stored as, with their element type and shape.
pub fn stored_tensors(name: &str, dtype: DType, shape: &[usize]) -> Option<Vec<(String, FileDType, Vec<usize>)>> {
    let l = dtype.layout(shape)?;
    let i = dtype.info();
    let (rows, bpr) = (l.rows as usize, l.blocks_per_row as usize);
    let value_type = if dtype == DType::Q8_0 { FileDType::I8 } else { FileDType::U8 };
    let mut out = vec![(name.to_string(), value_type, vec![rows, bpr * i.value_bytes])];
    for suffix in &PARAM_SUFFIXES[..i.params] {
        out.push((format!("{name}{suffix}"), FileDType::F16, vec![rows, bpr]));
    }
    Some(out)
}

/// Whether a file tensor is a parameter array of some quantised tensor (not a weight itself).
pub fn is_param_tensor(header: &Header, file_name: &str) -> bool {
    PARAM_SUFFIXES.iter().any(|s| file_name.strip_suffix(s).is_some_and(|base| header.metadata.contains_key(&format!("{QUANT_KEY_PREFIX}{base}"))))
}

/// Reads how `name` is stored in `header`: `None` if it is an ordinary tensor, an error naming
/// the tensor if its metadata, block counts or scale tensors do not match each other.
pub fn lookup(header: &Header, name: &str, file: &str) -> Result<Option<StoredQuant>> {
    let Some(desc) = header.metadata.get(&format!("{QUANT_KEY_PREFIX}{name}")) else { return Ok(None) };
    let bad = |why: String| Error::Model(format!("{file}: quantised tensor {name}: {why}; convert the model again with `ldm convert`"));
    let (dt, dims) = desc.split_once(':').ok_or_else(|| bad(format!("metadata {desc:?} is not `dtype:shape`")))?;
    let dtype = DType::from_name(dt).filter(|d| d.is_quantised()).ok_or_else(|| bad(format!("unknown quantised type {dt:?} ({} are read)", DType::quantised_names())))?;
    let shape = dims.split(',').map(|d| d.trim().parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>().map_err(|_| bad(format!("shape {dims:?} is not a list of sizes")))?;
    let want = stored_tensors(name, dtype, &shape).ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let mut entries = Vec::new();
    for (tname, ftype, tshape) in want {
        let e = header.tensors.get(&tname).ok_or_else(|| bad(format!("the file has no tensor {tname}")))?;
        if e.dtype != ftype || e.shape != tshape {
            let what = if tname == name { "packed values (block count per row)" } else { "scale tensor" };
            return Err(bad(format!("{tname} is {:?} {:?}, but {} of a {shape:?} {} tensor in blocks of 32 must be {ftype:?} {tshape:?}", e.dtype, e.shape, what, dtype.name())));
        }
        entries.push(e.clone());
    }
    let values = entries.remove(0);
    Ok(Some(StoredQuant { dtype, shape, values, params: entries }))
}

/// One per-layer rule: weights whose `folder/name` matches `pattern` (`*` matches any run of
/// characters) get `dtype`; a float dtype keeps them unquantised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRule {
    pub pattern: String,
    pub dtype: DType,
}

impl LayerRule {
    /// Parses `PATTERN=TYPE` (`unet/conv_in.*=q8`, `*attn2.to_k*=q8_0`, `unet/*.ff.*=f16`).
    pub fn parse(rule: &str) -> Result<Self> {
        let (pattern, ty) = rule.rsplit_once('=').ok_or_else(|| Error::Input(format!("layer rule {rule:?}: write PATTERN=TYPE, e.g. 'unet/conv_in.*=q8'")))?;
        let dtype = DType::from_name(ty.trim()).ok_or_else(|| Error::Input(format!("layer rule {rule:?}: unknown type {ty:?}; use {}, f16 or f32", DType::quantised_names())))?;
        if pattern.trim().is_empty() {
            return Err(Error::Input(format!("layer rule {rule:?}: the pattern is empty; e.g. 'unet/conv_in.*=q8'")));
        }
        Ok(Self { pattern: pattern.trim().to_string(), dtype })
    }
    /// Whether this rule names weight `name` of component `folder`.
    pub fn matches(&self, folder: &str, name: &str) -> bool {
        glob_match(&self.pattern, &format!("{folder}/{name}"))
    }
}

impl std::fmt::Display for LayerRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.pattern, self.dtype.name())
    }
}

/// The type the first rule matching `folder/name` gives, if any.
pub fn rule_for(rules: &[LayerRule], folder: &str, name: &str) -> Option<DType> {
    rules.iter().find(|r| r.matches(folder, name)).map(|r| r.dtype)
}

/// `*`-only glob matching, linear in the text for the patterns rules use.
fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod rule_tests {
    use super::*;

    #[test]
    fn layer_rules_parse_and_match_in_order() {
        let rules: Vec<LayerRule> = ["unet/conv_in.*=q8", "*attn2.to_k*=q5_1", "unet/*.ff.*=f16"].iter().map(|r| LayerRule::parse(r).unwrap()).collect();
        assert_eq!(rule_for(&rules, "unet", "conv_in.weight"), Some(DType::Q8_0));
        assert_eq!(rule_for(&rules, "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"), Some(DType::Q5_1));
        assert_eq!(rule_for(&rules, "unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"), Some(DType::F16));
        assert_eq!(rule_for(&rules, "text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight"), None);
        assert_eq!(rule_for(&rules, "unet", "conv_out.weight"), None);
        assert!(glob_match("a*b*b", "ab_b") && !glob_match("a*bb", "ab") && glob_match("*", "") && !glob_match("x", "xy"));
        assert_eq!(rules[1].to_string(), "*attn2.to_k*=q5_1");
        for bad in ["conv_in", "=q8", "unet/conv_in.*=q3"] {
            assert!(LayerRule::parse(bad).is_err(), "{bad}");
        }
    }
}
