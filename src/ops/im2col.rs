//! Convolution columns (`im2col`) and their adjoint (`col2im`): the pieces of a convolution's
//! gradients (weight gradient = output gradient · columnsᵀ; input gradient = col2im(weightᵀ ·
//! output gradient)). Forward convolutions never materialise columns (see conv2d).

use super::conv2d::Conv2dSpec;
use super::{bytes_of, check_same_dtype, elementwise_grid};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Gpu, Kernel, Tensor};

const IM2COL_WGSL: &str = include_str!("../../shaders/im2col.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ColParams {
    b: u32, c: u32, h: u32, w: u32,
    kh: u32, kw: u32, oh: u32, ow: u32,
    sy: u32, sx: u32, py: u32, px: u32,
    dy: u32, dx: u32, n: u32, _pad: u32,
}

/// The geometry both directions share: input `[b, c, h, w]`, kernel `kh x kw`, output `oh x ow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColGeometry {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ColGeometry {
    /// The geometry of a convolution of `x_shape` by a `kh x kw` kernel with `spec`.
    pub fn new(x_shape: &[usize], kh: usize, kw: usize, spec: &Conv2dSpec) -> Result<Self> {
        let &[b, c, h, w] = x_shape else {
            return Err(Error::Shape(format!("convolution columns need x [B, C, H, W], got {x_shape:?}")));
        };
        let (oh, ow) = spec.output_size(h, w, kh, kw).ok_or_else(|| Error::Shape(format!("a {kh}x{kw} kernel does not fit {x_shape:?} with {spec:?}")))?;
        if spec.stride.0 == 0 || spec.stride.1 == 0 || spec.dilation.0 == 0 || spec.dilation.1 == 0 {
            return Err(Error::Shape(format!("zero stride or dilation in {spec:?}")));
        }
        Ok(Self { b, c, h, w, kh, kw, oh, ow })
    }

    /// `[b, c * kh * kw, oh * ow]`.
    pub fn cols_shape(&self) -> [usize; 3] {
        [self.b, self.c * self.kh * self.kw, self.oh * self.ow]
    }

    fn params(&self, spec: &Conv2dSpec, n: usize) -> Result<ColParams> {
        let u = |v: usize| u32::try_from(v).map_err(|_| Error::Unsupported(format!("convolution columns of {n} elements (at most 2^32)")));
        Ok(ColParams {
            b: u(self.b)?, c: u(self.c)?, h: u(self.h)?, w: u(self.w)?, kh: u(self.kh)?, kw: u(self.kw)?, oh: u(self.oh)?, ow: u(self.ow)?,
            sy: u(spec.stride.0)?, sx: u(spec.stride.1)?, py: u(spec.padding.0)?, px: u(spec.padding.1)?,
            dy: u(spec.dilation.0)?, dx: u(spec.dilation.1)?, n: u(n)?, _pad: 0,
        })
    }
}

fn launch(gpu: &Gpu, entry: &'static str, src: &Tensor, out_shape: &[usize], g: &ColGeometry, spec: &Conv2dSpec) -> Result<Tensor> {
    let dtype = check_same_dtype(&[src], "convolution columns")?;
    let out = gpu.empty(out_shape, dtype)?;
    let p = g.params(spec, out.numel())?;
    let kernel = Kernel { family: "im2col", sources: &[IM2COL_WGSL], entry, dtype, defs: &[] };
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(src), Bind::whole(&out)], elementwise_grid(gpu, out.numel()))?;
    Ok(out)
}

/// The columns of `x` [B, C, H, W] for a `kh x kw` kernel with `spec`: `[B, C*KH*KW, OH*OW]`.
pub fn im2col(gpu: &Gpu, x: &Tensor, kh: usize, kw: usize, spec: &Conv2dSpec) -> Result<Tensor> {
    let g = ColGeometry::new(x.shape(), kh, kw, spec)?;
    if gpu.is_cpu() {
        return gpu.host_tensor(&g.cols_shape(), im2col_reference(x.host_f32()?, &g, spec));
    }
    launch(gpu, "im2col", x, &g.cols_shape(), &g, spec)
}

/// The adjoint of [`im2col`]: columns `[B, C*KH*KW, OH*OW]` summed back onto `x_shape`.
pub fn col2im(gpu: &Gpu, cols: &Tensor, x_shape: &[usize], kh: usize, kw: usize, spec: &Conv2dSpec) -> Result<Tensor> {
    let g = ColGeometry::new(x_shape, kh, kw, spec)?;
    if cols.shape() != g.cols_shape() {
        return Err(Error::Shape(format!("col2im of {:?} onto {x_shape:?} needs columns {:?}", cols.shape(), g.cols_shape())));
    }
    if gpu.is_cpu() {
        return gpu.host_tensor(x_shape, col2im_reference(cols.host_f32()?, &g, spec));
    }
    launch(gpu, "col2im", cols, x_shape, &g, spec)
}

/// The input pixel kernel tap (ky, kx) reads at output (oy, ox), if inside the input.
fn tap(g: &ColGeometry, spec: &Conv2dSpec, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
    let iy = (oy * spec.stride.0 + ky * spec.dilation.0).checked_sub(spec.padding.0)?;
    let ix = (ox * spec.stride.1 + kx * spec.dilation.1).checked_sub(spec.padding.1)?;
    (iy < g.h && ix < g.w).then_some((iy, ix))
}

/// Visits every (column element, input element) pair a convolution reads, in the kernels'
/// order (images, channels, taps by row then column, outputs), as flat indices.
fn for_each_tap(g: &ColGeometry, spec: &Conv2dSpec, mut f: impl FnMut(usize, usize)) {
    let [_, rows, cols] = g.cols_shape();
    for n in 0..g.b {
        for c in 0..g.c {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = (c * g.kh + ky) * g.kw + kx;
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            if let Some((iy, ix)) = tap(g, spec, oy, ox, ky, kx) {
                                f((n * rows + row) * cols + oy * g.ow + ox, ((n * g.c + c) * g.h + iy) * g.w + ix);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// CPU reference of [`im2col`].
pub fn im2col_reference(x: &[f32], g: &ColGeometry, spec: &Conv2dSpec) -> Vec<f32> {
    let [_, rows, cols] = g.cols_shape();
    let mut out = vec![0.0; g.b * rows * cols];
    for_each_tap(g, spec, |col, pixel| out[col] = x[pixel]);
    out
}

/// CPU reference of [`col2im`]: the sum, in the kernel's order (taps by row, then column), of
/// every column entry that read each pixel.
pub fn col2im_reference(cols_data: &[f32], g: &ColGeometry, spec: &Conv2dSpec) -> Vec<f32> {
    let mut x = vec![0.0f32; g.b * g.c * g.h * g.w];
    for_each_tap(g, spec, |col, pixel| x[pixel] += cols_data[col]);
    x
}
