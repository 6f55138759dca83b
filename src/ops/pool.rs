//! Max pooling (BiT's stem).

use super::{bytes_of, check_same_dtype, elementwise_grid};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Gpu, Kernel, Tensor};

const POOL_WGSL: &str = include_str!("../../shaders/pool.wgsl");

/// Pooling window, stride and placement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolSpec {
    pub kernel: usize,
    pub stride: usize,
    /// Rows and columns of padding before the input (after it: whatever the output size needs).
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// What taps outside the input read.
    pub pad_value: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PoolParams {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    k: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    pad_value: f32,
    _pad: [u32; 2],
}

/// `max_pool2d` of `[B, C, H, W]` as `spec` places it.
pub fn max_pool2d(gpu: &Gpu, x: &Tensor, spec: &PoolSpec) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "max_pool2d")?;
    let &[b, c, h, w] = x.shape() else {
        return Err(Error::Shape(format!("max_pool2d needs [B, C, H, W], got {:?}", x.shape())));
    };
    if spec.kernel == 0 || spec.stride == 0 || spec.out_h == 0 || spec.out_w == 0 || h == 0 || w == 0 {
        return Err(Error::Shape(format!("max_pool2d of {:?} with {spec:?}", x.shape())));
    }
    if gpu.is_cpu() {
        return super::host::max_pool2d(gpu, x, spec);
    }
    let out = gpu.empty(&[b, c, spec.out_h, spec.out_w], dtype)?;
    let kernel = Kernel { family: "pool", sources: &[POOL_WGSL], entry: "main", dtype, defs: &[] };
    let p = PoolParams {
        planes: (b * c) as u32, h: h as u32, w: w as u32, oh: spec.out_h as u32, ow: spec.out_w as u32, k: spec.kernel as u32,
        stride: spec.stride as u32, pad_top: spec.pad_top as u32, pad_left: spec.pad_left as u32, pad_value: spec.pad_value, _pad: [0; 2],
    };
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(&out)], elementwise_grid(gpu, out.numel()))?;
    Ok(out)
}

/// CPU reference of [`max_pool2d`] for `planes` planes of `h x w`.
pub fn max_pool2d_reference(x: &[f32], planes: usize, h: usize, w: usize, spec: &PoolSpec) -> Vec<f32> {
    let mut out = Vec::with_capacity(planes * spec.out_h * spec.out_w);
    for plane in x.chunks(h * w).take(planes) {
        for oy in 0..spec.out_h {
            for ox in 0..spec.out_w {
                let mut m = f32::NEG_INFINITY;
                for ky in 0..spec.kernel {
                    for kx in 0..spec.kernel {
                        let iy = (oy * spec.stride + ky) as isize - spec.pad_top as isize;
                        let ix = (ox * spec.stride + kx) as isize - spec.pad_left as isize;
                        let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                        m = m.max(if inside { plane[iy as usize * w + ix as usize] } else { spec.pad_value });
                    }
                }
                out.push(m);
            }
        }
    }
    out
}
