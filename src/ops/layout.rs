//! Data movement: resizing (torch's interpolate), concatenation, permutation. (Reshape is
//! [`Tensor::reshape`], which copies nothing.)

use super::{bytes_of, check_same_dtype, elementwise_grid};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Def, Gpu, Kernel, Tensor};

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
    align_corners: u32,
}

/// `torch.nn.functional.interpolate`'s modes (no antialiasing). The GPU runs `Nearest` and
/// `Bilinear`; the CPU reference all four (bicubic and area resize small CPU-side tensors:
/// depth maps, position embeddings, conditions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    /// Cubic convolution with A = -0.75 and clamped borders.
    Bicubic,
    /// `adaptive_avg_pool2d` to the output size.
    Area,
}

/// How output coordinates map to input ones (torch's `area_pixel_compute_source_index`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Coordinates {
    /// `align_corners=True`: corners to corners, `(in - 1) / (out - 1)` per side.
    AlignCorners,
    /// Half-pixel centres with the size ratio `in / out` (`interpolate(size=...)`).
    HalfPixel,
    /// Half-pixel centres with `1 / scale_factor` (`interpolate(scale_factor=...)`, which torch
    /// uses as given, not the ratio of the sizes it rounds to).
    ScaleFactor(f64, f64),
}

impl Coordinates {
    /// The source-per-output scale along a side of `inn -> out`, in f32 as torch computes it.
    fn scale(self, inn: usize, out: usize, axis: usize) -> f32 {
        match self {
            Coordinates::AlignCorners if out > 1 => (inn - 1) as f32 / (out - 1) as f32,
            Coordinates::AlignCorners => 0.0,
            Coordinates::HalfPixel => inn as f32 / out as f32,
            Coordinates::ScaleFactor(sy, sx) => (1.0 / if axis == 0 { sy } else { sx }) as f32,
        }
    }
}

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]` (`interpolate(scale_factor=2)`).
pub fn upsample_nearest2x(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let &[_, _, h, w] = x.shape() else {
        return Err(Error::Shape(format!("upsample needs [B, C, H, W], got {:?}", x.shape())));
    };
    interpolate(gpu, x, 2 * h, 2 * w, Interpolation::Nearest, Coordinates::ScaleFactor(2.0, 2.0))
}

/// Nearest-neighbour resizing of `[B, C, H, W]` to `out_h x out_w` (`interpolate(size=...)`,
/// what diffusers' UNets do when a size does not halve evenly).
pub fn upsample_nearest(gpu: &Gpu, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    interpolate(gpu, x, out_h, out_w, Interpolation::Nearest, Coordinates::HalfPixel)
}

/// Resizes `[B, C, H, W]` to `out_h x out_w` with `mode` (nearest or bilinear) and `coords`.
pub fn interpolate(gpu: &Gpu, x: &Tensor, oh: usize, ow: usize, mode: Interpolation, coords: Coordinates) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "upsample")?;
    let &[b, c, h, w] = x.shape() else {
        return Err(Error::Shape(format!("upsample needs [B, C, H, W], got {:?}", x.shape())));
    };
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::Shape(format!("cannot resize {:?} to {oh}x{ow}", x.shape())));
    }
    if gpu.is_cpu() {
        // Every mode: the host has the reference's bicubic and area resizing too.
        return super::host::interpolate(gpu, x, oh, ow, mode, coords);
    }
    let code = match mode {
        Interpolation::Nearest => 0,
        Interpolation::Bilinear => 1,
        other => return Err(Error::Unsupported(format!("{other:?} resizing runs on the CPU only"))),
    };
    let out = gpu.empty(&[b, c, oh, ow], dtype)?;
    let defs = [("MODE", Def::U32(code))];
    let kernel = Kernel { family: "upsample", sources: &[UPSAMPLE_WGSL], entry: "main", dtype, defs: &defs };
    let p = UpsampleParams {
        planes: (b * c) as u32, h: h as u32, w: w as u32, oh: oh as u32, ow: ow as u32,
        sh: coords.scale(h, oh, 0), sw: coords.scale(w, ow, 1), align_corners: (coords == Coordinates::AlignCorners) as u32,
    };
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(&out)], elementwise_grid(gpu, out.numel()))?;
    Ok(out)
}

/// CPU reference of [`interpolate`] for every mode: `planes` planes of `h x w` to `oh x ow`,
/// each output a weighted sum along x per source row, then along y (torch's order), in f32.
pub fn interpolate_reference(x: &[f32], planes: usize, (h, w): (usize, usize), (oh, ow): (usize, usize), mode: Interpolation, coords: Coordinates) -> Vec<f32> {
    let taps = |o: usize, inn: usize, out: usize, axis: usize| -> Vec<(usize, f32)> {
        let s = coords.scale(inn, out, axis);
        let half_pixel = |o: usize| s * (o as f32 + 0.5) - 0.5;
        match mode {
            Interpolation::Nearest => vec![(((o as f32 * s).floor() as usize).min(inn - 1), 1.0)],
            Interpolation::Bilinear => {
                let real = if coords == Coordinates::AlignCorners { s * o as f32 } else { half_pixel(o).max(0.0) };
                let i0 = (real as usize).min(inn - 1);
                let i1 = if i0 < inn - 1 { i0 + 1 } else { i0 };
                let l1 = real - i0 as f32;
                vec![(i0, 1.0 - l1), (i1, l1)]
            }
            Interpolation::Bicubic => {
                const A: f32 = -0.75;
                let c1 = |t: f32| ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
                let c2 = |t: f32| ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A;
                let real = if coords == Coordinates::AlignCorners { s * o as f32 } else { half_pixel(o) };
                let i0 = real.floor();
                let t = real - i0;
                let weights = [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)];
                (0..4).map(|k| ((i0 as i64 - 1 + k as i64).clamp(0, inn as i64 - 1) as usize, weights[k])).collect()
            }
            Interpolation::Area => {
                let (start, end) = (o * inn / out, ((o + 1) * inn).div_ceil(out));
                (start..end).map(|i| (i, 1.0 / (end - start) as f32)).collect()
            }
        }
    };
    let cols: Vec<_> = (0..ow).map(|o| taps(o, w, ow, 1)).collect();
    let rows: Vec<_> = (0..oh).map(|o| taps(o, h, oh, 0)).collect();
    let mut out = Vec::with_capacity(planes * oh * ow);
    for plane in x.chunks(h * w).take(planes) {
        for row in &rows {
            for col in &cols {
                let along_x = |r: usize| col.iter().fold(0.0f32, |a, &(i, wx)| a + plane[r * w + i] * wx);
                out.push(row.iter().fold(0.0f32, |a, &(r, wy)| a + along_x(r) * wy));
            }
        }
    }
    out
}

/// CPU reference of [`upsample_nearest`].
pub fn resize_reference(x: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    interpolate_reference(x, planes, (h, w), (oh, ow), Interpolation::Nearest, Coordinates::HalfPixel)
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
    if gpu.is_cpu() {
        return super::host::concat(gpu, xs, &shape, dim);
    }
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
    if gpu.is_cpu() {
        return super::host::permute(gpu, x, perm, &shape);
    }
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
