//! `ldm manifest`: the integrity list the browser checks downloads against (`ldm-manifest.json` at
//! the model's root): every file's size and sha256, and the sha256 of each fixed-size chunk, the
//! unit the page fetches and caches, so a torn or altered piece is caught before it is cached.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Args;
use ldm_web::{Error, Result};
use sha2::{Digest, Sha256};

/// The manifest's file name at the model's root.
pub const MANIFEST: &str = "ldm-manifest.json";

/// `ldm manifest` flags.
#[derive(Args, Clone, Debug)]
pub struct ManifestArgs {
    /// The model folder; the manifest is written inside it.
    dir: PathBuf,
    /// Bytes per checked chunk (a multiple of 4096).
    #[arg(long, default_value_t = 1 << 20)]
    chunk_size: u64,
}

impl ManifestArgs {
    /// The default chunk size for `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, chunk_size: 1 << 20 }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `dir` except the manifest and hidden files.
pub fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Io(format!("cannot list {}: {e}", dir.display())))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::Io(format!("cannot list {}: {e}", dir.display())))?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.file_name().is_some_and(|n| n != MANIFEST && !n.to_string_lossy().starts_with('.')) {
            out.push(path);
        }
    }
    Ok(())
}

/// Writes `DIR/ldm-manifest.json`; returns what was written.
pub fn run(a: &ManifestArgs) -> Result<String> {
    if a.chunk_size < 4096 || !a.chunk_size.is_multiple_of(4096) {
        return Err(Error::Input(format!("--chunk-size must be a multiple of 4096, got {}", a.chunk_size)));
    }
    let mut files = Vec::new();
    walk(&a.dir, &mut files)?;
    files.sort();
    let mut listed = serde_json::Map::new();
    for path in &files {
        let rel = path.strip_prefix(&a.dir).map_err(|e| Error::Io(e.to_string()))?.to_string_lossy().replace('\\', "/");
        let io = |e: std::io::Error| Error::Io(format!("cannot read {}: {e}", path.display()));
        let mut f = std::fs::File::open(path).map_err(io)?;
        let (mut whole, mut chunks, mut size) = (Sha256::new(), Vec::new(), 0u64);
        let mut buf = vec![0u8; a.chunk_size as usize];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = f.read(&mut buf[filled..]).map_err(io)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            whole.update(&buf[..filled]);
            chunks.push(hex(&Sha256::digest(&buf[..filled])));
            size += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        listed.insert(rel, serde_json::json!({ "size": size, "sha256": hex(&whole.finalize()), "chunks": chunks }));
    }
    let manifest = serde_json::json!({ "format": "ldm-manifest", "version": 1, "chunk_size": a.chunk_size, "files": listed });
    let out = a.dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Io(e.to_string()))?;
    std::fs::write(&out, text + "\n").map_err(|e| Error::Io(format!("cannot write {}: {e}", out.display())))?;
    Ok(format!("wrote {} ({} files)", out.display(), files.len()))
}
