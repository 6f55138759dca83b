//! The safetensors container: an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the raw data.
//!
//! Parsed here rather than with the `safetensors` crate because that crate validates a header
//! against the whole file in memory, and the browser reads a model tensor by tensor through HTTP
//! range requests: only the header and one tensor's bytes are ever held at once.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Largest header we accept; real checkpoints have headers of a few hundred KiB.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Element types that can appear in a safetensors file we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I8,
    U8,
}

impl FileDType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "F64" => Self::F64,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I8" => Self::I8,
            "U8" => Self::U8,
            _ => return None,
        })
    }
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Self::I8 | Self::U8 => 1,
            Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
            Self::F64 | Self::I64 => 8,
        }
    }
    /// Whether the values are floating point (model weights); integer tensors are metadata.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::F64)
    }
    /// Converts little-endian elements to f32 (f64 and integers rounded like `tensor.float()`).
    pub fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / self.size() as usize;
        let mut out = Vec::with_capacity(n);
        for c in bytes.chunks_exact(self.size() as usize) {
            out.push(match self {
                Self::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                Self::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                Self::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                Self::F64 => f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32,
                Self::I64 => i64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32,
                Self::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
                Self::I8 => c[0] as i8 as f32,
                Self::U8 => c[0] as f32,
            });
        }
        out
    }
}

/// Where one tensor lives in its file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub dtype: FileDType,
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file (header included).
    pub start: u64,
    pub len: u64,
}

/// A parsed safetensors header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorEntry>,
    pub metadata: BTreeMap<String, String>,
    /// Bytes before the data section (8 + JSON length).
    pub data_start: u64,
}

/// Length of the JSON header from the first 8 bytes, checked against the file size.
pub fn header_len(prefix: &[u8], file_len: u64, name: &str) -> Result<u64> {
    let bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Model(format!("{name}: too short to be a safetensors file (under 8 bytes)")))?;
    let n = u64::from_le_bytes(bytes);
    if n > MAX_HEADER_BYTES || n + 8 > file_len {
        return Err(Error::Model(format!("{name}: not a safetensors file or truncated (header of {n} bytes in a {file_len}-byte file)")));
    }
    Ok(n)
}

/// Parses and validates the JSON header: known dtypes, shapes matching byte lengths, ranges
/// inside the file and not overlapping.
pub fn parse_header(json: &[u8], file_len: u64, name: &str) -> Result<Header> {
    let bad = |why: String| Error::Model(format!("{name}: bad safetensors header: {why}; re-export the file with the safetensors library"));
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| bad(format!("not JSON ({e})")))?;
    let obj = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let data_start = 8 + json.len() as u64;
    let data_len = file_len.checked_sub(data_start).ok_or_else(|| bad("file shorter than its header".into()))?;
    let mut header = Header { data_start, ..Default::default() };
    for (key, v) in obj {
        if key == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    header.metadata.insert(k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                }
            }
            continue;
        }
        let dtype_s = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad(format!("tensor {key} has no dtype")))?;
        let dtype = FileDType::parse(dtype_s).ok_or_else(|| bad(format!("tensor {key} has dtype {dtype_s}, which ldm-web does not read (F32, F16, BF16, F64, I64, I32, I8, U8 are read)")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(format!("tensor {key} has no valid shape")))?;
        let offsets = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(format!("tensor {key} has no valid data_offsets")))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end || end > data_len {
            return Err(bad(format!("tensor {key} spans bytes {begin}..{end}, outside the {data_len}-byte data section (truncated file?)")));
        }
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        if numel.and_then(|n| n.checked_mul(dtype.size())) != Some(end - begin) {
            return Err(bad(format!("tensor {key} of shape {shape:?} {dtype_s} does not fill its {} bytes", end - begin)));
        }
        header.tensors.insert(key.clone(), TensorEntry { dtype, shape, start: data_start + begin, len: end - begin });
    }
    let mut ranges: Vec<(u64, u64, &str)> = header.tensors.iter().filter(|(_, e)| e.len > 0).map(|(k, e)| (e.start, e.start + e.len, k.as_str())).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("tensors {} and {} overlap", w[0].2, w[1].2)));
        }
    }
    Ok(header)
}

impl FileDType {
    /// The name safetensors headers use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I8 => "I8",
            Self::U8 => "U8",
        }
    }
}

/// A tensor to write: name, element type, shape and little-endian bytes.
pub struct OutTensor {
    pub name: String,
    pub dtype: FileDType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// A safetensors file holding `tensors` in the order given (data offsets follow that order, so
/// a reader fetching the file front to back gets them in that order) and `metadata`.
pub fn serialize(tensors: &[OutTensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(|e| Error::Io(e.to_string()))?);
    }
    let mut offset = 0u64;
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        if (numel as u64) * t.dtype.size() != t.bytes.len() as u64 {
            return Err(Error::Shape(format!("tensor {}: {} bytes for a {:?} {} tensor", t.name, t.bytes.len(), t.shape, t.dtype.name())));
        }
        let end = offset + t.bytes.len() as u64;
        header.insert(t.name.clone(), serde_json::json!({ "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| Error::Io(e.to_string()))?;
    // The format pads the header with spaces so the data starts 8-byte aligned.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset as usize);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        let n = header_len(bytes, bytes.len() as u64, "t")?;
        parse_header(&bytes[8..8 + n as usize], bytes.len() as u64, "t")
    }

    #[test]
    fn serialized_files_parse_back_in_order() {
        let t = |name: &str, dtype, shape: Vec<usize>, n: usize| OutTensor { name: name.into(), dtype, shape, bytes: (0..n).map(|i| i as u8).collect() };
        let tensors = [t("z.first", FileDType::F16, vec![3], 6), t("a.second", FileDType::U8, vec![2, 5], 10)];
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes = serialize(&tensors, &meta).unwrap();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.metadata["k"], "v");
        assert!(h.data_start % 8 == 0);
        assert!(h.tensors["z.first"].start < h.tensors["a.second"].start);
        let e = &h.tensors["a.second"];
        assert_eq!(&bytes[e.start as usize..(e.start + e.len) as usize], &tensors[1].bytes[..]);
        assert!(serialize(&[t("bad", FileDType::F32, vec![2], 7)], &meta).is_err());
    }

    #[test]
    fn valid_and_malformed_headers() {
        let ok = file(r#"{"a":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"BF16","shape":[],"data_offsets":[12,14]},"__metadata__":{"format":"pt"}}"#, 14);
        let h = parse(&ok).expect("valid");
        assert_eq!(h.tensors["a"].shape, vec![2, 3]);
        assert_eq!(h.tensors["b"].start, h.data_start + 12);
        assert_eq!(h.metadata["format"], "pt");
        for (header, data, why) in [
            ("{not json", 0, "not JSON"),
            (r#"{"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#, 1, "does not read"),
            (r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8, "outside"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12, "overlap"),
            (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "does not fill"),
            (r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#, 8, "shape"),
        ] {
            let err = parse(&file(header, data)).expect_err(why).to_string();
            assert!(err.contains(why), "{err} should mention {why}");
        }
        let mut huge = file("{}", 0);
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(parse(&huge).is_err());
        assert!(parse(&[1, 2, 3]).is_err());
    }

    #[test]
    fn converts_float_formats() {
        let v = [1.5f32, -2.25];
        let f16: Vec<u8> = v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let bf16: Vec<u8> = v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        assert_eq!(FileDType::F16.to_f32(&f16), v);
        assert_eq!(FileDType::BF16.to_f32(&bf16), v);
    }
}
