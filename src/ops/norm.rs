//! Normalisations and softmax: group norm (+ fused SiLU), layer norm, softmax over the last dim,
//! and the row standard deviation guidance rescale needs.

use super::{bind_range, bytes_of, check_same_dtype, dummy, max_binding_elems, reduce_source, ACTIVATIONS_WGSL, REDUCE_WG};
use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Def, Gpu, Kernel, Tensor};

const GROUP_NORM_WGSL: &str = include_str!("../../shaders/group_norm.wgsl");
const LAYER_NORM_WGSL: &str = include_str!("../../shaders/layer_norm.wgsl");
const SOFTMAX_WGSL: &str = include_str!("../../shaders/softmax.wgsl");
const ROW_STD_WGSL: &str = include_str!("../../shaders/row_std.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GroupNormParams {
    groups: u32,
    channels_per_group: u32,
    hw: u32,
    units: u32,
    unit0: u32,
    x_base: u32,
    y_base: u32,
    eps: f32,
}

/// GroupNorm of x `[B, C, ...]` with per-channel gamma/beta, then SiLU if `silu`.
pub fn group_norm(gpu: &Gpu, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x, gamma, beta], "group_norm")?;
    let (b, c) = match x.shape() {
        [b, c, ..] => (*b, *c),
        s => return Err(Error::Shape(format!("group_norm needs [B, C, ...], got {s:?}"))),
    };
    if groups == 0 || c % groups != 0 || gamma.numel() != c || beta.numel() != c {
        return Err(Error::Shape(format!("group_norm: {c} channels in {groups} groups with gamma/beta of {}/{}", gamma.numel(), beta.numel())));
    }
    if gpu.is_cpu() {
        return super::host::group_norm(gpu, x, b, c, groups, gamma, beta, eps, silu);
    }
    let hw = x.numel() / (b * c).max(1);
    let len = c / groups * hw;
    let out = gpu.empty(x.shape(), dtype)?;
    let (reduce, enable) = reduce_source(gpu);
    let defs: Vec<_> = [("RWG", Def::U32(REDUCE_WG)), ("SILU", Def::Bool(silu))].into_iter().chain(enable).collect();
    let kernel = Kernel { family: "group_norm", sources: &[ACTIVATIONS_WGSL, reduce, GROUP_NORM_WGSL], entry: "main", dtype, defs: &defs };
    // Each (image, group) is one contiguous span: split the dispatch between spans when the
    // tensor is larger than one storage binding (Firefox allows 128 MiB).
    let units = b * groups;
    let per = (max_binding_elems(gpu, dtype) / len.max(1)).max(1);
    for u0 in (0..units).step_by(per) {
        let u1 = (u0 + per).min(units);
        let (xb, x_base) = bind_range(gpu, x, u0 * len, u1 * len);
        let (yb, y_base) = bind_range(gpu, &out, u0 * len, u1 * len);
        let p = GroupNormParams {
            groups: groups as u32, channels_per_group: (c / groups) as u32, hw: hw as u32,
            units: (u1 - u0) as u32, unit0: u0 as u32, x_base, y_base, eps,
        };
        let g = grid((u1 - u0) as u32, gpu.limits().max_compute_workgroups_per_dimension);
        gpu.dispatch(&kernel, bytes_of(&p), &[xb, Bind::whole(gamma), Bind::whole(beta), yb], g)?;
    }
    Ok(out)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RowParams {
    rows: u32,
    cols: u32,
    value: f32,
}

/// LayerNorm over the last dimension; gamma and beta are applied when given.
pub fn layer_norm(gpu: &Gpu, x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f32) -> Result<Tensor> {
    let mut ts = vec![x];
    if let Some((g, b)) = affine {
        ts.extend([g, b]);
    }
    let dtype = check_same_dtype(&ts, "layer_norm")?;
    let cols = *x.shape().last().ok_or_else(|| Error::Shape("layer_norm of a scalar".into()))?;
    if affine.is_some_and(|(g, b)| g.numel() != cols || b.numel() != cols) {
        return Err(Error::Shape(format!("layer_norm gamma/beta must have {cols} values")));
    }
    if gpu.is_cpu() {
        return super::host::layer_norm(gpu, x, cols, affine, eps);
    }
    let rows = x.numel() / cols.max(1);
    let out = gpu.empty(x.shape(), dtype)?;
    let spare = dummy(gpu, dtype)?;
    let (reduce, enable) = reduce_source(gpu);
    let defs: Vec<_> = [("RWG", Def::U32(REDUCE_WG)), ("AFFINE", Def::Bool(affine.is_some()))].into_iter().chain(enable).collect();
    let kernel = Kernel { family: "layer_norm", sources: &[reduce, LAYER_NORM_WGSL], entry: "main", dtype, defs: &defs };
    let (g, b) = affine.unwrap_or((&spare, &spare));
    let p = RowParams { rows: rows as u32, cols: cols as u32, value: eps };
    let grid = grid(rows as u32, gpu.limits().max_compute_workgroups_per_dimension);
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(g), Bind::whole(b), Bind::whole(&out)], grid)?;
    Ok(out)
}

/// softmax(scale * x) over the last dimension.
pub fn softmax(gpu: &Gpu, x: &Tensor, scale: f32) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "softmax")?;
    let cols = *x.shape().last().ok_or_else(|| Error::Shape("softmax of a scalar".into()))?;
    if gpu.is_cpu() {
        return super::host::softmax(gpu, x, cols, scale);
    }
    let rows = x.numel() / cols.max(1);
    let out = gpu.empty(x.shape(), dtype)?;
    let (reduce, enable) = reduce_source(gpu);
    let defs: Vec<_> = [("RWG", Def::U32(REDUCE_WG))].into_iter().chain(enable).collect();
    let kernel = Kernel { family: "softmax", sources: &[reduce, SOFTMAX_WGSL], entry: "main", dtype, defs: &defs };
    let p = RowParams { rows: rows as u32, cols: cols as u32, value: scale };
    let grid = grid(rows as u32, gpu.limits().max_compute_workgroups_per_dimension);
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(&out)], grid)?;
    Ok(out)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RowStdParams {
    rows: u32,
    cols: u32,
}

/// The unbiased standard deviation of each row of `cols` values (torch's `x.std(dim)`), as an f32
/// tensor `[rows]` (guidance rescale's statistics).
pub fn row_std(gpu: &Gpu, x: &Tensor, cols: usize) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "row_std")?;
    if cols == 0 || x.numel() % cols != 0 {
        return Err(Error::Shape(format!("row_std: {} values are not rows of {cols}", x.numel())));
    }
    if gpu.is_cpu() {
        return super::host::row_std(gpu, x, cols);
    }
    let rows = x.numel() / cols;
    let out = gpu.empty(&[rows], crate::gpu::DType::F32)?;
    let (reduce, enable) = reduce_source(gpu);
    let defs: Vec<_> = [("RWG", Def::U32(REDUCE_WG))].into_iter().chain(enable).collect();
    let kernel = Kernel { family: "row_std", sources: &[reduce, ROW_STD_WGSL], entry: "main", dtype, defs: &defs };
    let p = RowStdParams { rows: rows as u32, cols: cols as u32 };
    let grid = grid(rows as u32, gpu.limits().max_compute_workgroups_per_dimension);
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(&out)], grid)?;
    Ok(out)
}

/// CPU reference of [`row_std`] (two-pass, f64).
pub fn row_std_reference(x: &[f32], cols: usize) -> Vec<f32> {
    x.chunks(cols)
        .map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            var.sqrt() as f32
        })
        .collect()
}

/// CPU reference of [`group_norm`] (two-pass, f64).
pub fn group_norm_reference(x: &[f32], b: usize, c: usize, groups: usize, gamma: &[f32], beta: &[f32], eps: f32, silu: bool) -> Vec<f32> {
    let hw = x.len() / (b * c);
    let cpg = c / groups;
    let mut y = vec![0f32; x.len()];
    for (u, (xs, ys)) in x.chunks(cpg * hw).zip(y.chunks_mut(cpg * hw)).enumerate() {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (i, (o, &v)) in ys.iter_mut().zip(xs).enumerate() {
            let ch = (u % groups) * cpg + i / hw;
            let mut r = (v as f64 - mean) * rstd * gamma[ch] as f64 + beta[ch] as f64;
            if silu {
                r = super::Activation::Silu.apply(r);
            }
            *o = r as f32;
        }
    }
    y
}

/// CPU reference of [`layer_norm`].
pub fn layer_norm_reference(x: &[f32], cols: usize, affine: Option<(&[f32], &[f32])>, eps: f32) -> Vec<f32> {
    x.chunks(cols)
        .flat_map(|row| {
            let n = cols as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            row.iter().enumerate().map(move |(i, &v)| {
                let r = (v as f64 - mean) * rstd;
                (match affine {
                    Some((g, b)) => r * g[i] as f64 + b[i] as f64,
                    None => r,
                }) as f32
            })
        })
        .collect()
}

/// CPU reference of [`softmax`].
pub fn softmax_reference(x: &[f32], cols: usize, scale: f32) -> Vec<f32> {
    x.chunks(cols)
        .flat_map(|row| {
            let m = row.iter().map(|&v| scale as f64 * v as f64).fold(f64::MIN, f64::max);
            let e: Vec<f64> = row.iter().map(|&v| (scale as f64 * v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |v| (v / s) as f32)
        })
        .collect()
}
