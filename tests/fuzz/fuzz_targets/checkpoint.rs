//! Any bytes as a weight file: safetensors headers, PyTorch zip archives (central directory,
//! local headers, data.pkl through the restricted unpickler, storages) and legacy pickles must
//! give a header or an error, never a panic, a hang or an allocation the file does not justify.
#![no_main]

#[path = "memory_source.rs"]
mod memory_source;

use ldm_web::loader::WeightFile;
use libfuzzer_sys::fuzz_target;
use memory_source::MemorySource;

fuzz_target!(|data: &[u8]| {
    let src = MemorySource { name: "model.ckpt", data: data.to_vec() };
    let _ = pollster::block_on(WeightFile::open_any(&src, "model.ckpt"));
});
