//! Any bytes as a LoRA file (safetensors or a PyTorch checkpoint): classified into adapter
//! modules or refused with a message.
#![no_main]

#[path = "memory_source.rs"]
mod memory_source;

use ldm_web::loader::lora::AdapterSet;
use libfuzzer_sys::fuzz_target;
use memory_source::MemorySource;

fuzz_target!(|data: &[u8]| {
    let mut set = AdapterSet::new();
    let src = MemorySource { name: "lora.safetensors", data: data.to_vec() };
    let _ = pollster::block_on(set.add(Box::new(src), "lora.safetensors", "fuzz", 0.8));
});
