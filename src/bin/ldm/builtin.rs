//! The built-in model (`assets/builtin/emoji`, trained by this project: see its README.md),
//! compiled into the binary: `ldm generate` without `--model` uses it, offline.

use ldm_web::loader::StaticSource;

/// What `--model builtin` and a missing `--model` mean.
pub const NAME: &str = "builtin";

/// The built-in model's files as (path, bytes); empty when built without them.
pub const FILES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/builtin_files.rs"));

/// The built-in model's files, or `None` when this binary was built without them.
pub fn source() -> Option<StaticSource> {
    (!FILES.is_empty()).then(|| StaticSource::new("emoji", FILES))
}
