//! Quantised weights in safetensors files (what `ldm convert` writes). A q8_0 / q4_0 / q4_1
//! weight `W` of logical shape `S` is stored as plain safetensors tensors that any reader can
//! list, plus one metadata entry that says how to read them back:
//!
//! - `W`: the packed values, `[rows, blocks_per_row * value_bytes]` (I8 for q8_0, U8 for q4),
//! - `W.scales`: one f16 scale per block, `[rows, blocks_per_row]`,
//! - `W.mins`: one f16 minimum per block (q4_1 only), same shape,
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
    let dtype = DType::from_name(dt).filter(|d| d.is_quantised()).ok_or_else(|| bad(format!("unknown quantised type {dt:?} (q8_0, q4_0 and q4_1 are read)")))?;
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
