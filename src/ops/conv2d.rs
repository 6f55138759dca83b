//! 2-D convolution (NCHW) as an implicit GEMM; 1x1 stride-1 convolutions go straight to matmul.

use super::matmul::{gemm_groups, gemm_kernel, gemm_sources, gemm_tile, matmul_spec_with, BiasAxis, MatView, MatmulSpec};
use super::quant::{check_weight, QuantParams};
use super::{bytes_of, check_same_dtype, dummy, Activation};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Def, Gpu, KernelProfile, Tensor};

const CONV2D_WGSL: &str = include_str!("../../shaders/conv2d.wgsl");

/// Convolution settings (PyTorch's Conv2d arguments).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dSpec {
    pub stride: (usize, usize),
    /// Rows and columns of zeros before the input.
    pub padding: (usize, usize),
    /// After it, when it differs (TensorFlow's "SAME" padding of even kernels or strides).
    pub padding_after: Option<(usize, usize)>,
    pub dilation: (usize, usize),
    pub act: Activation,
}

impl Default for Conv2dSpec {
    fn default() -> Self {
        Self { stride: (1, 1), padding: (0, 0), padding_after: None, dilation: (1, 1), act: Activation::None }
    }
}

impl Conv2dSpec {
    /// Stride and symmetric padding.
    pub fn new(stride: usize, padding: usize) -> Self {
        Self { stride: (stride, stride), padding: (padding, padding), ..Default::default() }
    }
    /// TensorFlow's "SAME" padding for a `k x k` kernel with `stride` on an `h x w` input
    /// (output `ceil(side / stride)`, the odd padding row and column after), as timm's and
    /// transformers' dynamic padding computes it.
    pub fn same(k: usize, stride: usize, h: usize, w: usize) -> Self {
        let total = |i: usize| ((i.div_ceil(stride) - 1) * stride + k).saturating_sub(i);
        let (th, tw) = (total(h), total(w));
        Self { stride: (stride, stride), padding: (th / 2, tw / 2), padding_after: Some((th - th / 2, tw - tw / 2)), ..Default::default() }
    }
    /// Output height and width for an `h x w` input and a `kh x kw` kernel.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let after = self.padding_after.unwrap_or(self.padding);
        let span = |i: usize, k: usize, s: usize, p: usize, q: usize, d: usize| {
            let eff = d * (k - 1) + 1;
            (i + p + q).checked_sub(eff).map(|r| r / s + 1)
        };
        Some((
            span(h, kh, self.stride.0, self.padding.0, after.0, self.dilation.0)?,
            span(w, kw, self.stride.1, self.padding.1, after.1, self.dilation.1)?,
        ))
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    cout: u32, n: u32, k: u32, cin: u32,
    h: u32, w: u32, ho: u32, wo: u32,
    kh: u32, kw: u32, stride_y: u32, stride_x: u32,
    pad_y: u32, pad_x: u32, dil_y: u32, dil_x: u32,
    alpha: f32, has_bias: u32,
    n0: u32, _p0: u32,
    q: QuantParams,
}

/// `act(conv2d(x, weight) + bias) + residual`; x `[B, Cin, H, W]`, weight `[Cout, Cin, KH, KW]`
/// (float like x, or quantised).
pub fn conv2d(gpu: &Gpu, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: &Conv2dSpec, residual: Option<&Tensor>) -> Result<Tensor> {
    conv2d_with(gpu, x, weight, bias, spec, residual, gpu.profile())
}

/// As [`conv2d`] with an explicit kernel profile.
pub fn conv2d_with(gpu: &Gpu, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: &Conv2dSpec, residual: Option<&Tensor>, profile: KernelProfile) -> Result<Tensor> {
    let (&[b, cin, h, w], &[cout, wcin, kh, kw]) = (x.shape(), weight.shape()) else {
        return Err(Error::Shape(format!("conv2d needs x [B, C, H, W] and weight [Cout, Cin, KH, KW], got {:?} and {:?}", x.shape(), weight.shape())));
    };
    if wcin != cin {
        return Err(Error::Shape(format!("conv2d weight {:?} expects {wcin} input channels, x {:?} has {cin} (grouped convolution is not supported)", weight.shape(), x.shape())));
    }
    if spec.stride.0 == 0 || spec.stride.1 == 0 || spec.dilation.0 == 0 || spec.dilation.1 == 0 {
        return Err(Error::Shape("conv2d stride and dilation must be at least 1".into()));
    }
    let Some((ho, wo)) = spec.output_size(h, w, kh, kw) else {
        return Err(Error::Shape(format!("conv2d kernel {kh}x{kw} is larger than the padded {h}x{w} input")));
    };
    if bias.is_some_and(|bs| bs.numel() != cout) {
        return Err(Error::Shape(format!("conv2d bias must have {cout} values")));
    }
    if residual.is_some_and(|r| r.shape() != [b, cout, ho, wo]) {
        return Err(Error::Shape(format!("conv2d residual must be [{b}, {cout}, {ho}, {wo}]")));
    }
    let quant = weight.dtype().is_quantised();
    let mut ts = vec![x];
    ts.extend((!quant).then_some(weight));
    ts.extend(bias);
    ts.extend(residual);
    let dtype = check_same_dtype(&ts, "conv2d")?;
    if quant {
        check_weight(weight, cout, cin * kh * kw, "conv2d")?;
    }

    if kh == 1 && kw == 1 && spec.stride == (1, 1) && spec.padding == (0, 0) && spec.padding_after.unwrap_or((0, 0)) == (0, 0) {
        // Per image: [Cout, Cin] . [Cin, H*W], the input already is the B operand.
        let mm = MatmulSpec {
            a: MatView::packed(weight, cout, cin).broadcast(),
            b: MatView::packed(x, cin, h * w),
            m: cout, n: h * w, k: cin, batch: b, alpha: 1.0,
            bias: bias.map(|t| (t, BiasAxis::Row)), act: spec.act, residual,
        };
        return matmul_spec_with(gpu, &mm, profile)?.reshape(&[b, cout, ho, wo]);
    }

    if gpu.is_cpu() {
        return super::host::conv2d(gpu, x, weight, bias, spec, residual);
    }
    let out = gpu.empty(&[b, cout, ho, wo], dtype)?;
    let mut defs = vec![
        ("ACT", Def::U32(spec.act.code())),
        ("RESIDUAL", Def::Bool(residual.is_some())),
        ("QA", Def::Bool(quant)),
        ("QTYPE", Def::U32(weight.dtype().info().wgsl_quant)),
    ];
    // SwiftShader (Chromium's fallback) loses the device on convolutions with 8x8 or larger
    // register tiles, even at 75 MFLOP, while 16x32 matmuls run; in browsers convolutions keep to
    // the 4x4 tile that every browser adapter passed.
    let tile = if gpu.in_browser() && profile == KernelProfile::Register { super::matmul::small_register_tile(cout, b * ho * wo) } else { gemm_tile(profile, cout, b * ho * wo) };
    let sources = gemm_sources(CONV2D_WGSL, profile, tile);
    let kernel = gemm_kernel("conv2d", &sources, profile, tile, dtype, &mut defs);
    let spare = dummy(gpu, dtype)?;
    let mut p = Params {
        n0: 0, _p0: 0,
        q: if quant { QuantParams::of(weight, 0) } else { QuantParams::default() },
        cout: cout as u32, n: (b * ho * wo) as u32, k: (cin * kh * kw) as u32, cin: cin as u32,
        h: h as u32, w: w as u32, ho: ho as u32, wo: wo as u32,
        kh: kh as u32, kw: kw as u32, stride_y: spec.stride.0 as u32, stride_x: spec.stride.1 as u32,
        pad_y: spec.padding.0 as u32, pad_x: spec.padding.1 as u32, dil_y: spec.dilation.0 as u32, dil_x: spec.dilation.1 as u32,
        alpha: 1.0, has_bias: bias.is_some() as u32,
    };
    let (float_weight, qweight) = if quant { (&spare, weight) } else { (weight, &spare) };
    let binds = [
        Bind::whole(float_weight),
        Bind::whole(x),
        Bind::whole(&out),
        Bind::whole(bias.unwrap_or(&spare)),
        Bind::whole(residual.unwrap_or(&spare)),
        Bind::whole(qweight),
    ];
    // Bounded work per dispatch (`Gpu::max_dispatch_flops`), in whole column blocks.
    let n_total = b * ho * wo;
    let bn = (tile.wx * tile.tn) as usize;
    let per = ((gpu.max_dispatch_flops() / (2.0 * (cout * cin * kh * kw) as f64)) as usize / bn * bn).max(bn);
    for n0 in (0..n_total).step_by(per) {
        let n1 = (n0 + per).min(n_total);
        p.n0 = n0 as u32;
        p.n = (n1 - n0) as u32;
        gpu.dispatch(&kernel, bytes_of(&p), &binds, gemm_groups(tile, cout, n1 - n0, 1))?;
        gpu.add_work(2.0 * (cout * cin * kh * kw * (n1 - n0)) as f64);
    }
    Ok(out)
}

/// CPU reference (f64 accumulation).
#[allow(clippy::too_many_arguments)]
pub fn reference(x: &[f32], xs: [usize; 4], w: &[f32], ws: [usize; 4], bias: Option<&[f32]>, spec: &Conv2dSpec, residual: Option<&[f32]>) -> Vec<f32> {
    let [b, cin, h, wd] = xs;
    let [cout, _, kh, kw] = ws;
    let (ho, wo) = spec.output_size(h, wd, kh, kw).expect("valid conv");
    let mut out = vec![0f32; b * cout * ho * wo];
    for n in 0..b {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0f64;
                    for ci in 0..cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * spec.stride.0 + ky * spec.dilation.0) as isize - spec.padding.0 as isize;
                                let ix = (ox * spec.stride.1 + kx * spec.dilation.1) as isize - spec.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((n * cin + ci) * h + iy as usize) * wd + ix as usize] as f64;
                                acc += xv * w[((co * cin + ci) * kh + ky) * kw + kx] as f64;
                            }
                        }
                    }
                    let mut v = acc + bias.map_or(0.0, |bs| bs[co] as f64);
                    v = spec.act.apply(v);
                    let idx = ((n * cout + co) * ho + oy) * wo + ox;
                    if let Some(r) = residual {
                        v += r[idx] as f64;
                    }
                    out[idx] = v as f32;
                }
            }
        }
    }
    out
}
