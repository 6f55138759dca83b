//! Sinusoidal timestep embeddings and embedding-table gathers.

use super::{bind_range, bytes_of, check_same_dtype, elementwise_grid, max_binding_elems};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Def, Gpu, Kernel, Tensor};

const TIMESTEP_WGSL: &str = include_str!("../../shaders/timestep_embedding.wgsl");
const EMBEDDING_WGSL: &str = include_str!("../../shaders/embedding.wgsl");

/// diffusers' `get_timestep_embedding` settings.
#[derive(Clone, Copy, Debug)]
pub struct TimestepEmbedding {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
    pub scale: f32,
    pub max_period: f32,
}

impl TimestepEmbedding {
    /// Frequencies exactly as diffusers computes them in f32: exp(-ln(max_period) * i / (half - shift)).
    pub fn frequencies(&self) -> Vec<f32> {
        let half = self.dim / 2;
        let ln = -(self.max_period.ln());
        (0..half).map(|i| ((ln * i as f32) / (half as f32 - self.downscale_freq_shift)).exp()).collect()
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TimestepParams {
    n: u32,
    dim: u32,
    half_dim: u32,
    scale: f32,
}

/// Embeds f32 timesteps `[N]` into `[N, dim]` of `dtype`.
pub fn timestep_embedding(gpu: &Gpu, timesteps: &Tensor, cfg: &TimestepEmbedding, dtype: DType) -> Result<Tensor> {
    if timesteps.dtype() != DType::F32 {
        return Err(Error::Unsupported("timesteps must be an f32 tensor".into()));
    }
    if gpu.is_cpu() {
        return super::host::timestep_embedding(gpu, timesteps, cfg);
    }
    let n = timesteps.numel();
    let key = format!("timestep-freqs/{}/{}/{}", cfg.dim, cfg.downscale_freq_shift, cfg.max_period);
    // One extra zero keeps the binding non-empty when dim < 2.
    let freqs = gpu.constant(&key, &[cfg.dim / 2 + 1], DType::F32, || [cfg.frequencies(), vec![0.0]].concat())?;
    let out = gpu.empty(&[n, cfg.dim], dtype)?;
    let defs = [("FLIP", Def::Bool(cfg.flip_sin_to_cos))];
    let kernel = Kernel { family: "timestep_embedding", sources: &[TIMESTEP_WGSL], entry: "main", dtype, defs: &defs };
    let p = TimestepParams { n: n as u32, dim: cfg.dim as u32, half_dim: (cfg.dim / 2) as u32, scale: cfg.scale };
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(timesteps), Bind::whole(&freqs), Bind::whole(&out)], elementwise_grid(gpu, n * cfg.dim))?;
    Ok(out)
}

/// CPU reference (the same f32 frequencies and products, sin/cos in f64).
pub fn timestep_embedding_reference(timesteps: &[f32], cfg: &TimestepEmbedding) -> Vec<f32> {
    let freqs = cfg.frequencies();
    let half = cfg.dim / 2;
    let mut y = vec![0f32; timesteps.len() * cfg.dim];
    for (r, &t) in timesteps.iter().enumerate() {
        for (j, &f) in freqs.iter().enumerate() {
            let arg = (cfg.scale * (t * f)) as f64;
            let (s, c) = (arg.sin() as f32, arg.cos() as f32);
            let (a, b) = if cfg.flip_sin_to_cos { (c, s) } else { (s, c) };
            y[r * cfg.dim + j] = a;
            y[r * cfg.dim + half + j] = b;
        }
    }
    y
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbeddingParams {
    n: u32,
    dim: u32,
    /// The bound rows: ids `first..first + rows`, from element `base` of the binding.
    first: u32,
    rows: u32,
    base: u32,
    /// 1: rows of other ids are written as zeros (one dispatch); 0: left alone (one dispatch per
    /// part of a table larger than a binding, each writing its own ids' rows).
    zero_others: u32,
    _pad: [u32; 2],
}

/// Rows of `table` `[vocab, dim]` for each id: `[ids.., dim]`. A table larger than one storage
/// binding (CLIP's 49408 x 768 in f32: 145 MiB) is gathered a binding-sized block of rows at a
/// time.
pub fn embedding(gpu: &Gpu, ids: &[u32], table: &Tensor) -> Result<Tensor> {
    let dtype = check_same_dtype(&[table], "embedding")?;
    let &[vocab, dim] = table.shape() else {
        return Err(Error::Shape(format!("embedding table must be [vocab, dim], got {:?}", table.shape())));
    };
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::Shape(format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    if gpu.is_cpu() {
        return super::host::embedding(gpu, ids, table, dim);
    }
    let id_t = gpu.upload_u32(&[ids.len().max(1)], &if ids.is_empty() { vec![0] } else { ids.to_vec() })?;
    let out = gpu.empty(&[ids.len(), dim], dtype)?;
    let kernel = Kernel { family: "embedding", sources: &[EMBEDDING_WGSL], entry: "main", dtype, defs: &[] };
    let block = (max_binding_elems(gpu, dtype) / dim.max(1)).max(1);
    let single = block >= vocab;
    for first in (0..vocab).step_by(if single { vocab.max(1) } else { block }) {
        let rows = if single { vocab } else { block.min(vocab - first) };
        // Only the blocks some id falls in.
        if !single && !ids.iter().any(|&i| (first..first + rows).contains(&(i as usize))) {
            continue;
        }
        let (tb, base) = bind_range(gpu, table, first * dim, (first + rows) * dim);
        let p = EmbeddingParams { n: ids.len() as u32, dim: dim as u32, first: first as u32, rows: rows as u32, base, zero_others: single as u32, _pad: [0; 2] };
        gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(&id_t), tb, Bind::whole(&out)], elementwise_grid(gpu, ids.len() * dim))?;
    }
    Ok(out)
}

/// CPU reference: the rows of `table` (`dim` wide) for each id.
pub fn embedding_reference(ids: &[u32], table: &[f32], dim: usize) -> Vec<f32> {
    ids.iter().flat_map(|&i| table[i as usize * dim..(i as usize + 1) * dim].iter().copied()).collect()
}
