//! ldm-web: latent diffusion models on WebGPU, natively and in the browser.
//!
//! Layers, each using only those above it in this list: [`gpu`] (device, buffers, pipelines,
//! tensors) → [`ops`] (kernel launchers and their CPU references) → [`suite`] / [`bench`]
//! (kernel tests and benchmarks shared by the native and browser runners) → `web` (wasm API).

pub mod autograd;
pub mod bench;
pub mod error;
pub mod gpu;
pub mod loader;
pub mod models;
pub mod pipelines;
pub mod quantise;
pub mod rng;
pub mod schedulers;
pub mod tokenizer;
pub mod training;
pub mod ops;
pub mod suite;
#[cfg(target_arch = "wasm32")]
pub mod web;

pub use error::{Error, Result};
