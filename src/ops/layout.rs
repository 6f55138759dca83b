//! Data movement: nearest 2x upsampling, concatenation, permutation. (Reshape is
//! [`Tensor::reshape`], which copies nothing.)

use super::{bytes_of, check_same_dtype, elementwise_grid};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Gpu, Kernel, Tensor};

const UPSAMPLE_WGSL: &str = include_str!("../../shaders/upsample.wgsl");
const CONCAT_WGSL: &str = include_str!("../../shaders/concat.wgsl");
const PERMUTE_WGSL: &str = include_str!("../../shaders/permute.wgsl");

/// Largest rank [`permute`] handles.
pub const MAX_RANK: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct UpsampleParams {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    sh: f32,
    sw: f32,
    _pad: u32,
}

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]` (`interpolate(scale_factor=2)`).
pub fn upsample_nearest2x(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let &[_, _, h, w] = x.shape() else {
        return Err(Error::Shape(format!("upsample needs [B, C, H, W], got {:?}", x.shape())));
    };
    resize(gpu, x, 2 * h, 2 * w, 0.5, 0.5)
}

/// Nearest-neighbour resizing of `[B, C, H, W]` to `out_h x out_w` (`interpolate(size=...)`,
/// what diffusers' UNets do when a size does not halve evenly).
pub fn upsample_nearest(gpu: &Gpu, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let &[_, _, h, w] = x.shape() else {
        return Err(Error::Shape(format!("upsample needs [B, C, H, W], got {:?}", x.shape())));
    };
    if (out_h, out_w) == (2 * h, 2 * w) {
        return upsample_nearest2x(gpu, x);
    }
    resize(gpu, x, out_h, out_w, h as f32 / out_h.max(1) as f32, w as f32 / out_w.max(1) as f32)
}

fn resize(gpu: &Gpu, x: &Tensor, oh: usize, ow: usize, sh: f32, sw: f32) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "upsample")?;
    let &[b, c, h, w] = x.shape() else {
        return Err(Error::Shape(format!("upsample needs [B, C, H, W], got {:?}", x.shape())));
    };
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::Shape(format!("cannot resize {:?} to {oh}x{ow}", x.shape())));
    }
    let out = gpu.empty(&[b, c, oh, ow], dtype)?;
    let kernel = Kernel { family: "upsample", sources: &[UPSAMPLE_WGSL], entry: "main", dtype, defs: &[] };
    let p = UpsampleParams { planes: (b * c) as u32, h: h as u32, w: w as u32, oh: oh as u32, ow: ow as u32, sh, sw, _pad: 0 };
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(&out)], elementwise_grid(gpu, out.numel()))?;
    Ok(out)
}

/// CPU reference of [`upsample_nearest`] (torch's nearest index rule, f32 scales).
pub fn resize_reference(x: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (sh, sw) = (h as f32 / oh as f32, w as f32 / ow as f32);
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        for oy in 0..oh {
            let sy = ((oy as f32 * sh).floor() as usize).min(h - 1);
            for ox in 0..ow {
                let sx = ((ox as f32 * sw).floor() as usize).min(w - 1);
                out.push(x[p * h * w + sy * w + sx]);
            }
        }
    }
    out
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ConcatParams {
    outer: u32,
    dim_in: u32,
    inner: u32,
    dim_out: u32,
    offset: u32,
}

/// Concatenates tensors along `dim` (all other dims equal).
pub fn concat(gpu: &Gpu, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::Shape("concat of nothing".into()))?;
    let dtype = check_same_dtype(xs, "concat")?;
    let rank = first.shape().len();
    if dim >= rank {
        return Err(Error::Shape(format!("concat dim {dim} of rank-{rank} tensors")));
    }
    for t in xs {
        let ok = t.shape().len() == rank && (0..rank).all(|i| i == dim || t.shape()[i] == first.shape()[i]);
        if !ok {
            return Err(Error::Shape(format!("concat along {dim}: {:?} vs {:?}", first.shape(), t.shape())));
        }
    }
    let mut shape = first.shape().to_vec();
    shape[dim] = xs.iter().map(|t| t.shape()[dim]).sum();
    let out = gpu.empty(&shape, dtype)?;
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let kernel = Kernel { family: "concat", sources: &[CONCAT_WGSL], entry: "main", dtype, defs: &[] };
    let mut offset = 0;
    for t in xs {
        let d = t.shape()[dim];
        let p = ConcatParams { outer: outer as u32, dim_in: d as u32, inner: inner as u32, dim_out: shape[dim] as u32, offset: offset as u32 };
        gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(t), Bind::whole(&out)], elementwise_grid(gpu, t.numel()))?;
        offset += d;
    }
    Ok(out)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PermuteParams {
    n: u32,
    rank: u32,
    x_base: u32,
    _pad: u32,
    dims: [u32; 8],
    strides: [u32; 8],
}

/// Output dim `i` is input dim `perm[i]` (PyTorch's `permute`), copied contiguous.
pub fn permute(gpu: &Gpu, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "permute")?;
    let rank = x.shape().len();
    let mut seen = [false; MAX_RANK];
    if perm.len() != rank || rank > MAX_RANK || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
        return Err(Error::Shape(format!("permute {perm:?} of {:?} (rank at most {MAX_RANK})", x.shape())));
    }
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * x.shape()[i + 1];
    }
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let out = gpu.empty(&shape, dtype)?;
    let mut p = PermuteParams { n: out.numel() as u32, rank: rank as u32, x_base: 0, _pad: 0, dims: [1; 8], strides: [0; 8] };
    for (i, &pi) in perm.iter().enumerate() {
        p.dims[i] = shape[i] as u32;
        p.strides[i] = in_strides[pi] as u32;
    }
    let kernel = Kernel { family: "permute", sources: &[PERMUTE_WGSL], entry: "main", dtype, defs: &[] };
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(&out)], elementwise_grid(gpu, out.numel()))?;
    Ok(out)
}

/// CPU reference of [`permute`].
pub fn permute_reference(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let rank = shape.len();
    let mut strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    (0..x.len())
        .map(|mut i| {
            let mut src = 0;
            for d in (0..rank).rev() {
                src += (i % out_shape[d]) * strides[perm[d]];
                i /= out_shape[d];
            }
            x[src]
        })
        .collect()
}

/// CPU reference of [`upsample_nearest2x`].
pub fn upsample_reference(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0f32; planes * 4 * h * w];
    for c in 0..planes {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                y[(c * 2 * h + oy) * 2 * w + ox] = x[(c * h + oy / 2) * w + ox / 2];
            }
        }
    }
    y
}

/// CPU reference of [`concat`] for tensors viewed as `[outer, d_i, inner]`.
pub fn concat_reference(xs: &[(&[f32], usize)], outer: usize, inner: usize) -> Vec<f32> {
    let mut y = Vec::new();
    for o in 0..outer {
        for (x, d) in xs {
            y.extend_from_slice(&x[o * d * inner..(o + 1) * d * inner]);
        }
    }
    y
}
