//! Reading models from what users have: diffusers folders, single-file checkpoints, by path or URL.
//!
//! Everything goes through [`FileSource`], which reads byte ranges of files relative to a model
//! root, so the same loader runs on a local folder natively and on HTTP range requests in the
//! browser. Weights are read tensor by tensor; no file is ever copied whole into memory.

pub mod lora;
pub mod pickle;
pub mod quantised;
pub mod safetensors;
mod weights;

use std::future::Future;
use std::pin::Pin;

pub use weights::{quantisable, InputLayout, InputProbe, InputSink, WeightFile, WeightLog, WeightRecord, Weights, W};

use crate::error::{Error, Result};

/// A boxed future that need not be `Send` (browser futures are not).
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Read access to the files of a model, by paths relative to its root (`unet/config.json`).
pub trait FileSource {
    /// Where `path` is, for messages.
    fn describe(&self, path: &str) -> String;
    /// Size in bytes, or `None` when the file does not exist.
    fn size<'a>(&'a self, path: &'a str) -> LocalFuture<'a, Result<Option<u64>>>;
    /// Bytes `start .. start + len` of `path`.
    fn read_range<'a>(&'a self, path: &'a str, start: u64, len: u64) -> LocalFuture<'a, Result<Vec<u8>>>;
}

/// A model compiled into the program: `(path, bytes)` pairs (the CLI's built-in model).
pub struct StaticSource {
    name: &'static str,
    files: &'static [(&'static str, &'static [u8])],
}

impl StaticSource {
    /// Files of the model called `name` (for messages).
    pub const fn new(name: &'static str, files: &'static [(&'static str, &'static [u8])]) -> Self {
        Self { name, files }
    }
    /// Paths of every file.
    pub fn paths(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.files.iter().map(|(p, _)| *p)
    }
    fn file(&self, path: &str) -> Option<&'static [u8]> {
        self.files.iter().find(|(p, _)| *p == path).map(|(_, b)| *b)
    }
}

impl FileSource for StaticSource {
    fn describe(&self, path: &str) -> String {
        format!("{path} of the built-in model {}", self.name)
    }
    fn size<'a>(&'a self, path: &'a str) -> LocalFuture<'a, Result<Option<u64>>> {
        Box::pin(async move { Ok(self.file(path).map(|b| b.len() as u64)) })
    }
    fn read_range<'a>(&'a self, path: &'a str, start: u64, len: u64) -> LocalFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move { byte_range(self.file(path), &self.describe(path), start, len) })
    }
}

/// Bytes `start .. start + len` of an in-memory file (`None`: it does not exist).
fn byte_range(bytes: Option<&[u8]>, what: &str, start: u64, len: u64) -> Result<Vec<u8>> {
    let bytes = bytes.ok_or_else(|| Error::Io(format!("{what} does not exist")))?;
    let end = start.checked_add(len).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| Error::Io(format!("{what} has {} bytes, not {}", bytes.len(), start.saturating_add(len))))?;
    Ok(bytes[start as usize..end as usize].to_vec())
}

/// A model held in memory: `(path, bytes)` pairs (a model just trained, before it is saved).
pub struct MemorySource {
    name: String,
    files: std::collections::BTreeMap<String, Vec<u8>>,
}

impl MemorySource {
    /// The files of the model called `name` (for messages).
    pub fn new(name: &str, files: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self { name: name.to_string(), files: files.into_iter().collect() }
    }
}

impl FileSource for MemorySource {
    fn describe(&self, path: &str) -> String {
        format!("{path} of {}", self.name)
    }
    fn size<'a>(&'a self, path: &'a str) -> LocalFuture<'a, Result<Option<u64>>> {
        Box::pin(async move { Ok(self.files.get(path).map(|b| b.len() as u64)) })
    }
    fn read_range<'a>(&'a self, path: &'a str, start: u64, len: u64) -> LocalFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move { byte_range(self.files.get(path).map(Vec::as_slice), &self.describe(path), start, len) })
    }
}

/// Reads a whole (small) file: configs, tokenizer files, headers.
pub async fn read_file(src: &dyn FileSource, path: &str) -> Result<Option<Vec<u8>>> {
    match src.size(path).await? {
        None => Ok(None),
        Some(n) => src.read_range(path, 0, n).await.map(Some),
    }
}

/// Reads a JSON file into `T`; `None` when it does not exist.
pub async fn read_json<T: serde::de::DeserializeOwned>(src: &dyn FileSource, path: &str) -> Result<Option<T>> {
    let Some(bytes) = read_file(src, path).await? else { return Ok(None) };
    parse_config_json(&bytes).map(Some).map_err(|e| Error::Model(format!("{} is not valid: {e}", src.describe(path))))
}

/// Parses a config written by Python's `json`, which writes `Infinity`, `-Infinity` and `NaN`
/// (diffusers' `DPMSolverMultistepScheduler` saves `"lambda_min_clipped": -Infinity`): those
/// tokens, outside strings, are read as the largest finite numbers and `null`.
pub fn parse_config_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    let strict = serde_json::from_slice(bytes);
    let Ok(text) = std::str::from_utf8(bytes) else { return strict };
    if strict.is_ok() || !(text.contains("Infinity") || text.contains("NaN")) {
        return strict;
    }
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(r) = rest.strip_prefix("Infinity") {
            out.push_str("1.7976931348623157e308");
            rest = r;
            continue;
        } else if let Some(r) = rest.strip_prefix("NaN") {
            out.push_str("null");
            rest = r;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_json_non_finite_numbers() {
        let v: serde_json::Value = super::parse_config_json(br#"{"a": -Infinity, "b": Infinity, "c": NaN, "d": "NaN -Infinity \" Infinity", "e": [1, -Infinity]}"#).expect("parses");
        assert_eq!(v["a"].as_f64(), Some(f64::MIN));
        assert_eq!(v["b"].as_f64(), Some(f64::MAX));
        assert!(v["c"].is_null());
        assert_eq!(v["d"], "NaN -Infinity \" Infinity");
        assert_eq!(v["e"][1].as_f64(), Some(f64::MIN));
        assert!(super::parse_config_json::<serde_json::Value>(b"{not json").is_err());
    }
}

/// Whether `path` names a weight file ldm-web reads: safetensors, or a PyTorch checkpoint
/// (`.ckpt`, `.pt`, `.pth`, `.bin`, read by the restricted unpickler, which runs nothing).
pub fn is_weight_file(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    [".safetensors", ".ckpt", ".pt", ".pth", ".bin"].iter().any(|e| lower.ends_with(e))
}

/// `dir/name`, or `name` for the source's root (`dir` empty).
pub fn join_path(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

/// The safetensors files holding component `dir`'s weights named `base` (`diffusion_pytorch_model`
/// or `model`): single, fp16 variant or sharded with an index; `dir` empty: the source's root.

pub async fn component_files(src: &dyn FileSource, dir: &str, base: &str, prefer_fp16: bool) -> Result<Vec<WeightFile>> {
    let at = |name: String| join_path(dir, &name);
    let single = [at(format!("{base}.safetensors")), at(format!("{base}.fp16.safetensors"))];
    let index = [at(format!("{base}.safetensors.index.json")), at(format!("{base}.safetensors.index.fp16.json"))];
    let order: [usize; 2] = if prefer_fp16 { [1, 0] } else { [0, 1] };
    for i in order {
        if src.size(&single[i]).await?.is_some() {
            return Ok(vec![WeightFile::open(src, &single[i]).await?]);
        }
        if let Some(idx) = read_json::<serde_json::Value>(src, &index[i]).await? {
            let map = idx.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Model(format!("{} has no weight_map", src.describe(&index[i]))))?;
            let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            let mut files = Vec::new();
            for s in shards {
                if s.contains("..") || s.starts_with('/') {
                    return Err(Error::Model(format!("{} names a shard outside the model folder: {s}", src.describe(&index[i]))));
                }
                if !is_weight_file(s) {
                    return Err(Error::Model(format!("{} names a shard {s} that is not a weight file", src.describe(&index[i]))));
                }
                files.push(WeightFile::open_any(src, &at(s.to_string())).await?);
            }
            return Ok(files);
        }
    }
    // PyTorch checkpoints (older folders), read without running them.
    let bins = [at(format!("{base}.bin")), at(format!("{base}.fp16.bin")), at("pytorch_model.bin".into()), at(format!("{base}.ckpt"))];
    let order: [usize; 4] = if prefer_fp16 { [1, 0, 2, 3] } else { [0, 1, 2, 3] };
    for i in order {
        if src.size(&bins[i]).await?.is_some() {
            return Ok(vec![WeightFile::open_any(src, &bins[i]).await?]);
        }
    }
    Err(Error::Model(format!("no weights found in {} (expected {base}.safetensors, {base}.fp16.safetensors, a sharded {base}.safetensors.index.json, or {base}.bin)", src.describe(dir))))
}

/// A model on the local file system: a folder, or the folder of a single file.
#[cfg(not(target_arch = "wasm32"))]
pub struct DirSource {
    root: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirSource {
    /// Files under `root`.
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        Self { root: root.into() }
    }
    fn full(&self, path: &str) -> std::path::PathBuf {
        self.root.join(path)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl FileSource for DirSource {
    fn describe(&self, path: &str) -> String {
        self.full(path).display().to_string()
    }
    fn size<'a>(&'a self, path: &'a str) -> LocalFuture<'a, Result<Option<u64>>> {
        Box::pin(async move {
            match std::fs::metadata(self.full(path)) {
                Ok(m) if m.is_file() => Ok(Some(m.len())),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::Io(format!("cannot read {}: {e}", self.describe(path)))),
            }
        })
    }
    fn read_range<'a>(&'a self, path: &'a str, start: u64, len: u64) -> LocalFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            use std::io::{Read, Seek, SeekFrom};
            let io = |e: std::io::Error| Error::Io(format!("cannot read {} (bytes {start}..{}): {e}", self.describe(path), start + len));
            let mut f = std::fs::File::open(self.full(path)).map_err(io)?;
            f.seek(SeekFrom::Start(start)).map_err(io)?;
            let len = usize::try_from(len).map_err(|_| Error::Io(format!("{} is too large to read on this platform", self.describe(path))))?;
            let mut buf = vec![0u8; len];
            f.read_exact(&mut buf).map_err(io)?;
            Ok(buf)
        })
    }
}
