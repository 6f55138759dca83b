//! Memory-efficient multi-head attention with online softmax (no Nq x Nk score matrix).

use super::{bytes_of, check_same_dtype};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Def, Gpu, KernelProfile, Kernel, Tensor};

const ATTENTION_PARAMS_WGSL: &str = include_str!("../../shaders/attention_params.wgsl");
const ATTENTION_WGSL: &str = include_str!("../../shaders/attention.wgsl");
const ATTENTION_SCALAR_WGSL: &str = include_str!("../../shaders/attention_scalar.wgsl");
/// Invocations per workgroup: tiled kernels share a K/V tile among 64 queries; register kernels
/// use small workgroups so that even one dispatch's slice of a head spreads over the CPU threads.
const WGQ_TILED: u32 = 64;
const WGQ_REGISTER: u32 = 16;

/// Element (b, h, n, d) of a tensor at `base + b*batch_stride + h*head_stride + n*row_stride + d`.
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    pub tensor: &'a Tensor,
    pub base: usize,
    pub batch_stride: usize,
    pub head_stride: usize,
    pub row_stride: usize,
}

impl<'a> HeadView<'a> {
    /// diffusers' hidden-state layout `[B, N, H*D]`.
    pub fn bnhd(tensor: &'a Tensor, rows: usize, heads: usize, head_dim: usize) -> Self {
        Self { tensor, base: 0, batch_stride: rows * heads * head_dim, head_stride: head_dim, row_stride: heads * head_dim }
    }
    /// Heads-first layout `[B, H, N, D]`.
    pub fn bhnd(tensor: &'a Tensor, rows: usize, heads: usize, head_dim: usize) -> Self {
        Self { tensor, base: 0, batch_stride: heads * rows * head_dim, head_stride: rows * head_dim, row_stride: head_dim }
    }
    fn last(&self, batch: usize, heads: usize, rows: usize, d: usize) -> usize {
        self.base + (batch - 1) * self.batch_stride + (heads - 1) * self.head_stride + (rows - 1) * self.row_stride + d
    }
}

/// softmax(scale * Q K^T) V per (batch, head); `causal` masks keys after the query (CLIP).
pub struct AttentionSpec<'a> {
    pub q: HeadView<'a>,
    pub k: HeadView<'a>,
    pub v: HeadView<'a>,
    pub batch: usize,
    pub heads: usize,
    pub nq: usize,
    pub nk: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    nq: u32, nk: u32, heads: u32, causal: u32,
    q: [u32; 4],
    k: [u32; 4],
    v: [u32; 4],
    o: [u32; 4],
    scale_log2e: f32,
    q_off: u32,
    bh_off: u32,
}

/// Attention output in `[B, Nq, H*D]` layout.
pub fn attention(gpu: &Gpu, s: &AttentionSpec) -> Result<Tensor> {
    attention_with(gpu, s, gpu.profile())
}

/// As [`attention`] with an explicit kernel profile.
pub fn attention_with(gpu: &Gpu, s: &AttentionSpec, profile: KernelProfile) -> Result<Tensor> {
    let dtype = check_same_dtype(&[s.q.tensor, s.k.tensor, s.v.tensor], "attention")?;
    let d = s.head_dim;
    let views = [&s.q, &s.k, &s.v];
    // The fast kernels load vec4s: every offset and stride must be a multiple of 4 elements;
    // anything else (head dims like 6 or 72 / 4 = 18 are fine, 6 is not) takes the scalar kernel.
    let aligned = d.is_multiple_of(4) && views.iter().all(|v| [v.base, v.batch_stride, v.head_stride, v.row_stride].iter().all(|x| x % 4 == 0));
    if s.batch == 0 || s.heads == 0 || s.nq == 0 {
        return gpu.empty(&[s.batch, s.nq, s.heads * d], dtype);
    }
    for (v, rows) in [(&s.q, s.nq), (&s.k, s.nk), (&s.v, s.nk)] {
        if rows > 0 && v.last(s.batch, s.heads, rows, d) > v.tensor.numel() {
            return Err(Error::Shape(format!("attention operand {:?} is too small for {} x {} heads x {rows} rows x {d}", v.tensor.shape(), s.batch, s.heads)));
        }
    }
    if gpu.is_cpu() {
        return super::host::attention(gpu, s);
    }
    let out = gpu.empty(&[s.batch, s.nq, s.heads * d], dtype)?;
    let o = HeadView::bnhd(&out, s.nq, s.heads, d);
    let unit = if aligned { 4 } else { 1 };
    let quad = |v: &HeadView| [v.base as u32 / unit, v.batch_stride as u32 / unit, v.head_stride as u32 / unit, v.row_stride as u32 / unit];
    let mut p = Params {
        q_off: 0,
        bh_off: 0,
        nq: s.nq as u32, nk: s.nk as u32, heads: s.heads as u32, causal: s.causal as u32,
        q: quad(&s.q), k: quad(&s.k), v: quad(&s.v), o: quad(&o),
        scale_log2e: s.scale * std::f32::consts::LOG2_E,
    };
    // Key tile: as many keys as fit twice (K and V, f32) in workgroup memory, at most 64.
    let storage = gpu.limits().max_compute_workgroup_storage_size as usize;
    let mut bkv = 64;
    while bkv > 1 && bkv * d * 8 > storage {
        bkv /= 2;
    }
    let d4 = d as u32 / 4;
    let scalar_defs = [("D", Def::U32(d as u32)), ("WGQ", Def::U32(WGQ_REGISTER))];
    let (entry, wgq, qb, generated) = match profile {
        _ if !aligned => ("attention_scalar", WGQ_REGISTER, 1, ""),
        KernelProfile::Tiled => ("attention_tiled", WGQ_TILED, 1, ""),
        KernelProfile::Register => {
            // More query rows per invocation share each K/V load (measured on llvmpipe at SD shapes:
            // 2.1, 3.7, 5.2, 6.2 GFLOP/s for 4, 8, 16, 24 rows of head dim 40), but the unrolled
            // shader grows with rows x head dim and so does its compile time: cap at 160 vec4s,
            // and use no more rows than the queries fill.
            let qb = (160 / d4).clamp(1, 16).min((s.nq as u32).div_ceil(WGQ_REGISTER));
            ("attention_register", WGQ_REGISTER, qb, super::unrolled::cached("attention", qb, d4, || super::unrolled::attention_register(qb, d4)))
        }
    };
    let defs = [("D4", Def::U32(d4)), ("WGQ", Def::U32(wgq)), ("BKV", Def::U32(bkv as u32)), ("QB", Def::U32(qb))];
    let kernel = if aligned {
        Kernel { family: "attention", sources: &[ATTENTION_PARAMS_WGSL, ATTENTION_WGSL, generated], entry, dtype, defs: &defs }
    } else {
        Kernel { family: "attention", sources: &[ATTENTION_PARAMS_WGSL, ATTENTION_SCALAR_WGSL], entry, dtype, defs: &scalar_defs }
    };
    // Split into dispatches of bounded work (see `gpu::max_dispatch_flops`): whole heads first,
    // then query blocks.
    let per_query = 4.0 * (s.nk * d) as f64;
    let block = (wgq * qb) as usize;
    let budget = gpu.max_dispatch_flops();
    let heads_per = ((budget / (per_query * s.nq as f64)) as usize).clamp(1, s.batch * s.heads);
    let queries_per = if heads_per > 1 { s.nq } else { (((budget / per_query) as usize) / block).max(1) * block };
    let binds = [Bind::whole(s.q.tensor), Bind::whole(s.k.tensor), Bind::whole(s.v.tensor), Bind::whole(&out)];
    for bh0 in (0..s.batch * s.heads).step_by(heads_per) {
        let bh1 = (bh0 + heads_per).min(s.batch * s.heads);
        for q0 in (0..s.nq).step_by(queries_per) {
            let q1 = (q0 + queries_per).min(s.nq);
            p.q_off = q0 as u32;
            p.bh_off = bh0 as u32;
            gpu.dispatch(&kernel, bytes_of(&p), &binds, [((q1 - q0) as u32).div_ceil(wgq * qb), (bh1 - bh0) as u32, 1])?;
            gpu.add_work(per_query * ((q1 - q0) * (bh1 - bh0)) as f64);
        }
    }
    Ok(out)
}

/// CPU reference (full score matrix, f64), output `[B, Nq, H*D]`.
#[allow(clippy::too_many_arguments)]
pub fn reference(q: &[f32], k: &[f32], v: &[f32], views: [(usize, usize, usize, usize); 3], batch: usize, heads: usize, nq: usize, nk: usize, d: usize, scale: f32, causal: bool) -> Vec<f32> {
    let at = |x: &[f32], vw: (usize, usize, usize, usize), b: usize, h: usize, n: usize, e: usize| x[vw.0 + b * vw.1 + h * vw.2 + n * vw.3 + e] as f64;
    let mut out = vec![0f32; batch * nq * heads * d];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..nq {
                let end = if causal { nk.min(i + 1) } else { nk };
                let scores: Vec<f64> = (0..end).map(|j| (0..d).map(|e| at(q, views[0], b, h, i, e) * at(k, views[1], b, h, j, e)).sum::<f64>() * scale as f64).collect();
                let m = scores.iter().copied().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = w.iter().sum();
                for e in 0..d {
                    let acc: f64 = (0..end).map(|j| w[j] * at(v, views[2], b, h, j, e)).sum();
                    out[(b * nq + i) * heads * d + h * d + e] = if sum > 0.0 { (acc / sum) as f32 } else { 0.0 };
                }
            }
        }
    }
    out
}
