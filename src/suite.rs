//! The kernel test suite: every kernel against its CPU reference on random data at odd sizes,
//! in f32 and (where the adapter has `shader-f16`) f16, with both kernel profiles where a kernel
//! has two. The same code runs natively (`tests/kernels.rs`) and in browsers (`web`).
//!
//! Error measure: `max_i |gpu_i - ref_i| / max(|ref_i|, 1)`: relative for values of magnitude
//! one and above, absolute below (NumPy's `allclose` with rtol = atol).

use std::future::Future;
use std::pin::Pin;

use half::f16;

use crate::error::Result;
use crate::gpu::{DType, Gpu, GpuOptions, KernelProfile, Tensor};
use crate::ops::{self, attention, conv2d, elementwise, embedding, layout, matmul, norm, Activation, BiasAxis, HeadView, MatView};

/// Outcome of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    pub name: String,
    pub dtype: String,
    /// "pass", "fail" or "unsupported" (an f16 case on an adapter without `shader-f16`).
    pub status: String,
    pub max_err: Option<f64>,
    pub tol: Option<f64>,
    pub message: String,
}

/// All results of a run with the adapter they ran on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SuiteReport {
    pub adapter: crate::gpu::AdapterSummary,
    pub results: Vec<CaseResult>,
    pub passed: usize,
    pub failed: usize,
    pub unsupported: usize,
}

/// Tolerance classes (see the module docs for the error measure).
#[derive(Clone, Copy)]
enum Tol {
    /// Elementwise kernels and norms.
    Elementwise,
    /// Reductions, matmul, convolution, attention.
    Reduction,
}

impl Tol {
    fn value(self, dtype: DType) -> f64 {
        match (dtype, self) {
            (DType::F32, Tol::Elementwise) => 1e-5,
            (DType::F32, Tol::Reduction) => 1e-4,
            // f16 storage rounds every output by up to 2^-11 relative; accumulation is f32.
            _ => 2e-3,
        }
    }
}

/// Deterministic xorshift generator (no dependency, same numbers on every platform).
struct Rng(u64);

impl Rng {
    fn new(name: &str) -> Self {
        Rng(name.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3)) | 1)
    }
    fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
    /// Approximately standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u = self.uniform().max(1e-7);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

struct Ctx<'a> {
    gpu: &'a Gpu,
    dtype: DType,
    rng: Rng,
}

impl Ctx<'_> {
    /// Random normal data scaled by `s`, rounded to the case's dtype so GPU and CPU see the same values.
    fn data(&mut self, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| { let v = self.rng.normal() * s; self.round(v) }).collect()
    }
    fn round(&self, v: f32) -> f32 {
        if self.dtype == DType::F16 { f16::from_f32(v).to_f32() } else { v }
    }
    fn tensor(&mut self, shape: &[usize], s: f32) -> Result<(Vec<f32>, Tensor)> {
        let d = self.data(shape.iter().product(), s);
        let t = self.gpu.upload(shape, self.dtype, &d)?;
        Ok((d, t))
    }
    /// A random weight quantised to `q`: the values the kernels see (decoded) and the tensor.
    fn quantised(&mut self, shape: &[usize], s: f32, q: DType) -> Result<(Vec<f32>, Tensor)> {
        let d = self.data(shape.iter().product(), s);
        let t = self.gpu.upload(shape, q, &d)?;
        Ok((q.decode(shape, &q.encode(shape, &d)), t))
    }
    async fn compare(&self, t: &Tensor, reference: &[f32], tol: Tol) -> Result<(f64, f64)> {
        let got = self.gpu.read(t).await?;
        if got.len() != reference.len() {
            return Err(crate::Error::Shape(format!("result has {} values, reference {}", got.len(), reference.len())));
        }
        let err = got.iter().zip(reference).fold(0f64, |m, (&g, &r)| {
            let e = (g as f64 - r as f64).abs() / (r as f64).abs().max(1.0);
            if e.is_nan() { f64::INFINITY } else { m.max(e) }
        });
        Ok((err, tol.value(self.dtype)))
    }
}

type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<(f64, f64)>> + 'a>>;

const QUANT_TYPES: [DType; 5] = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1];

const PROFILES: [(KernelProfile, &str); 2] = [(KernelProfile::Tiled, "tiled"), (KernelProfile::Register, "register")];

/// Names of all cases (each runs in f32 and f16).
pub fn case_names() -> Vec<String> {
    let mut names = Vec::new();
    for (_, p) in PROFILES {
        for c in ["matmul/batched_37x53x29", "matmul/linear_bias_silu_k67", "matmul/transposed_a_rowbias_residual", "matmul/multi_tile_130x71x257", "matmul/gelu_tanh_k1", "conv2d/3x3_pad1_bias", "conv2d/3x3_stride2_downsample", "conv2d/1x1_residual", "conv2d/3x3_dilation2_silu_nobias", "conv2d/5x3_rect_pad21", "conv2d/7x7_stride2_same", "attention/self_d40", "attention/cross_d64_mixed_layouts", "attention/causal_d64_clip", "attention/d80", "attention/d160", "attention/fused_qkv_d40", "attention/fused_qkv_d6", "attention/causal_d3"] {
            names.push(format!("{c}/{p}"));
        }
        // Quantised weights read by the GEMM core: as B (Linear), as A (convolutions, 1x1 ones via
        // matmul, and tokens back to channels), K never a multiple of the 32-value block.
        for q in QUANT_TYPES {
            for c in ["linear_k83_bias_gelu", "conv3x3_k45_residual", "conv1x1_k9", "tokens_to_channels_k70"] {
                names.push(format!("quant/{}/{c}/{p}", q.name()));
            }
        }
    }
    names.extend(
        [
            "group_norm/silu", "group_norm/plain_eps1e-6", "layer_norm/affine_77", "layer_norm/plain_300", "softmax/rows9_cols333", "row_std/rows7_cols143",
            "expr/scheduler_step_1001", "expr/guidance_halves_per_row", "expr/exp_sqrt_erf_sigmoid_77",
            "im2col/3x3_s2_p1_2x3x9x7", "im2col/5x3_dil2_uneven_1x2x8x11", "col2im/3x3_s2_p1_2x3x9x7", "col2im/5x3_dil2_uneven_1x2x8x11",
            "elementwise/silu", "elementwise/gelu", "elementwise/gelu_tanh", "elementwise/quick_gelu", "elementwise/scale", "elementwise/relu", "elementwise/tanh_third",
            "elementwise/add_broadcast", "elementwise/mul_broadcast_last", "elementwise/add_same_shape", "elementwise/add_rank5", "elementwise/geglu",
            "layout/upsample_nearest2x", "layout/upsample_to_3x5", "layout/bilinear_align_corners_2x", "layout/bilinear_half_pixel_5x7_to_3x4", "pool/max_3x3_s2_same", "layout/slice_rows", "layout/concat_channels", "layout/concat_last", "layout/permute_0213", "layout/permute_201",
            "embedding/timestep_flip_320", "embedding/timestep_odd_shift1", "embedding/gather",
            "split/matmul_rows", "split/embedding_rows", "split/unary_chunks", "split/add_chunks", "split/group_norm_units",
            "split/conv2d_columns", "split/matmul_work_rows", "split/attention_heads_queries", "split/quant_matmul_work_rows",
            "errors/binding_too_large", "errors/buffer_too_large", "errors/shape_mismatch", "errors/quant_strided_view", "errors/quant_wrong_rows",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    // Every generated register tiling at an odd size (shape-based choice would pick small ones).
    names.extend((0..matmul::REGISTER_TILINGS).map(|i| format!("matmul/register_tiling{i}_37x45x291")));
    names.extend((0..matmul::TILED_TILINGS).map(|i| format!("matmul/tiled_tiling{i}_37x45x291")));
    names
}

/// The suite's devices: a normal one, one that pretends storage bindings hold 1 KiB, and one
/// that allows only 2,000 FLOPs per dispatch (to exercise the splitting code on any adapter).
struct Devices<'a> {
    gpu: &'a Gpu,
    split_gpu: &'a Gpu,
    short_gpu: &'a Gpu,
}

fn run_case<'a>(devices: &'a Devices<'a>, name: &'a str, dtype: DType) -> CaseFuture<'a> {
    Box::pin(async move {
        let Devices { gpu, split_gpu, short_gpu } = *devices;
        let mut c = Ctx { gpu, dtype, rng: Rng::new(name) };
        let profile = if name.ends_with("/register") { KernelProfile::Register } else { KernelProfile::Tiled };
        let base = name.rsplit_once('/').map_or(name, |(b, p)| if p == "tiled" || p == "register" { b } else { name });
        match base {
            "matmul/batched_37x53x29" => {
                let (m, k, n, b) = (37, 53, 29, 3);
                let (a, at) = c.tensor(&[b, m, k], 1.0)?;
                let (bb, bt) = c.tensor(&[b, k, n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::packed(&at, m, k), b: MatView::packed(&bt, k, n), m, n, k, batch: b, alpha: 1.0, bias: None, act: Activation::None, residual: None };
                let y = matmul::matmul_spec_with(gpu, &spec, profile)?;
                let r = matmul::reference(&a, (0, m * k, k, 1), &bb, (0, k * n, n, 1), m, n, k, b, 1.0, None, Activation::None, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            "matmul/linear_bias_silu_k67" => {
                let (rows, k, n) = (35, 67, 33);
                let (x, xt) = c.tensor(&[5, 7, k], 1.0)?;
                let (w, wt) = c.tensor(&[n, k], 0.3)?;
                let (bias, biast) = c.tensor(&[n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::packed(&xt, rows, k), b: MatView::transposed(&wt, k, n).broadcast(), m: rows, n, k, batch: 1, alpha: 1.0, bias: Some((&biast, BiasAxis::Col)), act: Activation::Silu, residual: None };
                let y = matmul::matmul_spec_with(gpu, &spec, profile)?;
                let r = matmul::reference(&x, (0, 0, k, 1), &w, (0, 0, 1, k), rows, n, k, 1, 1.0, Some((&bias, BiasAxis::Col)), Activation::Silu, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            "matmul/transposed_a_rowbias_residual" => {
                let (m, k, n, b) = (19, 41, 23, 2);
                let (a, at) = c.tensor(&[b, k, m], 1.0)?;
                let (bb, bt) = c.tensor(&[k, n], 1.0)?;
                let (bias, biast) = c.tensor(&[m], 1.0)?;
                let (res, rest) = c.tensor(&[b, m, n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::transposed(&at, m, k), b: MatView::packed(&bt, k, n).broadcast(), m, n, k, batch: b, alpha: 0.5, bias: Some((&biast, BiasAxis::Row)), act: Activation::Gelu, residual: Some(&rest) };
                let y = matmul::matmul_spec_with(gpu, &spec, profile)?;
                let r = matmul::reference(&a, (0, m * k, 1, m), &bb, (0, 0, n, 1), m, n, k, b, 0.5, Some((&bias, BiasAxis::Row)), Activation::Gelu, Some(&res));
                c.compare(&y, &r, Tol::Reduction).await
            }
            "matmul/multi_tile_130x71x257" => {
                let (m, k, n) = (130, 257, 71);
                let (a, at) = c.tensor(&[m, k], 1.0)?;
                let (bb, bt) = c.tensor(&[k, n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::packed(&at, m, k), b: MatView::packed(&bt, k, n), m, n, k, batch: 1, alpha: 1.0, bias: None, act: Activation::None, residual: None };
                let y = matmul::matmul_spec_with(gpu, &spec, profile)?;
                let r = matmul::reference(&a, (0, 0, k, 1), &bb, (0, 0, n, 1), m, n, k, 1, 1.0, None, Activation::None, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            b if b.starts_with("matmul/register_tiling") || b.starts_with("matmul/tiled_tiling") => {
                let tiled = b.starts_with("matmul/tiled_tiling");
                let prefix = if tiled { "matmul/tiled_tiling" } else { "matmul/register_tiling" };
                let index: usize = b[prefix.len()..].split('_').next().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
                let (m, k, n, bt) = (37, 45, 291, 2);
                let (a, at) = c.tensor(&[bt, m, k], 1.0)?;
                let (bb, btt) = c.tensor(&[k, n], 1.0)?;
                let (bias, biast) = c.tensor(&[n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::packed(&at, m, k), b: MatView::packed(&btt, k, n).broadcast(), m, n, k, batch: bt, alpha: 1.0, bias: Some((&biast, BiasAxis::Col)), act: Activation::Silu, residual: None };
                let y = if tiled { matmul::matmul_tiled_tile(gpu, &spec, index)? } else { matmul::matmul_register_tile(gpu, &spec, index)? };
                let r = matmul::reference(&a, (0, m * k, k, 1), &bb, (0, 0, n, 1), m, n, k, bt, 1.0, Some((&bias, BiasAxis::Col)), Activation::Silu, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            "matmul/gelu_tanh_k1" => {
                let (m, k, n) = (3, 1, 70);
                let (a, at) = c.tensor(&[m, k], 1.0)?;
                let (bb, bt) = c.tensor(&[k, n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::packed(&at, m, k), b: MatView::packed(&bt, k, n), m, n, k, batch: 1, alpha: 2.0, bias: None, act: Activation::GeluTanh, residual: None };
                let y = matmul::matmul_spec_with(gpu, &spec, profile)?;
                let r = matmul::reference(&a, (0, 0, k, 1), &bb, (0, 0, n, 1), m, n, k, 1, 2.0, None, Activation::GeluTanh, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            b if b.starts_with("quant/") => {
                let mut parts = b.split('/').skip(1);
                let q = parts.next().and_then(DType::from_name).unwrap_or(DType::F32);
                match parts.next().unwrap_or("") {
                    "linear_k83_bias_gelu" => {
                        let (rows, k, n) = (15, 83, 37);
                        let (x, xt) = c.tensor(&[3, 5, k], 1.0)?;
                        let (w, wt) = c.quantised(&[n, k], 0.3, q)?;
                        let (bias, biast) = c.tensor(&[n], 1.0)?;
                        let spec = ops::MatmulSpec { a: MatView::packed(&xt, rows, k), b: MatView::transposed(&wt, k, n).broadcast(), m: rows, n, k, batch: 1, alpha: 1.0, bias: Some((&biast, BiasAxis::Col)), act: Activation::Gelu, residual: None };
                        let y = matmul::matmul_spec_with(gpu, &spec, profile)?;
                        let r = matmul::reference(&x, (0, 0, k, 1), &w, (0, 0, 1, k), rows, n, k, 1, 1.0, Some((&bias, BiasAxis::Col)), Activation::Gelu, None);
                        c.compare(&y, &r, Tol::Reduction).await
                    }
                    "conv3x3_k45_residual" | "conv1x1_k9" => {
                        let three = b.ends_with("conv3x3_k45_residual");
                        let (xs, ws, spec) = if three { ([2, 5, 9, 7], [6, 5, 3, 3], conv2d::Conv2dSpec::new(1, 1)) } else { ([2, 9, 5, 7], [11, 9, 1, 1], conv2d::Conv2dSpec::default()) };
                        let (ho, wo) = spec.output_size(xs[2], xs[3], ws[2], ws[3]).expect("valid test shape");
                        let (x, xt) = c.tensor(&xs, 1.0)?;
                        let (w, wt) = c.quantised(&ws, 0.3, q)?;
                        let (bias, biast) = c.tensor(&[ws[0]], 1.0)?;
                        let (res, rest) = c.tensor(&[xs[0], ws[0], ho, wo], 1.0)?;
                        let y = conv2d::conv2d_with(gpu, &xt, &wt, Some(&biast), &spec, three.then_some(&rest), profile)?;
                        let r = conv2d::reference(&x, xs, &w, ws, Some(&bias), &spec, three.then_some(&res[..]));
                        c.compare(&y, &r, Tol::Reduction).await
                    }
                    _ => {
                        // Linear::forward_to_channels_first: W [out, in] . x[b]^T, x tokens [B, N, in].
                        let (out, k, n, bt) = (13, 70, 19, 2);
                        let (w, wt) = c.quantised(&[out, k], 0.3, q)?;
                        let (x, xt) = c.tensor(&[bt, n, k], 1.0)?;
                        let (bias, biast) = c.tensor(&[out], 1.0)?;
                        let xv = MatView { tensor: &xt, base: 0, batch_stride: n * k, row_stride: 1, col_stride: k };
                        let spec = ops::MatmulSpec { a: MatView::packed(&wt, out, k).broadcast(), b: xv, m: out, n, k, batch: bt, alpha: 1.0, bias: Some((&biast, BiasAxis::Row)), act: Activation::None, residual: None };
                        let y = matmul::matmul_spec_with(gpu, &spec, profile)?;
                        let r = matmul::reference(&w, (0, 0, k, 1), &x, (0, n * k, 1, k), out, n, k, bt, 1.0, Some((&bias, BiasAxis::Row)), Activation::None, None);
                        c.compare(&y, &r, Tol::Reduction).await
                    }
                }
            }
            b if b.starts_with("conv2d/") => {
                // (batch, cin, h, w, cout, kh, kw, spec, bias, residual)
                let (xs, ws, spec, has_bias, has_res) = match b {
                    "conv2d/3x3_pad1_bias" => ([2, 5, 9, 11], [7, 5, 3, 3], conv2d::Conv2dSpec::new(1, 1), true, false),
                    "conv2d/3x3_stride2_downsample" => ([1, 6, 10, 7], [5, 6, 3, 3], conv2d::Conv2dSpec::new(2, 1), true, false),
                    "conv2d/1x1_residual" => ([2, 9, 5, 7], [11, 9, 1, 1], conv2d::Conv2dSpec::default(), true, true),
                    "conv2d/3x3_dilation2_silu_nobias" => ([1, 3, 12, 13], [4, 3, 3, 3], conv2d::Conv2dSpec { dilation: (2, 2), padding: (2, 2), act: Activation::Silu, ..Default::default() }, false, false),
                    // BiT's stem: TF "SAME" padding, two columns before and three after.
                    "conv2d/7x7_stride2_same" => ([1, 3, 11, 12], [5, 3, 7, 7], conv2d::Conv2dSpec::same(7, 2, 11, 12), false, false),
                    _ => ([2, 4, 8, 9], [3, 4, 5, 3], conv2d::Conv2dSpec { padding: (2, 1), ..Default::default() }, true, true),
                };
                let (ho, wo) = spec.output_size(xs[2], xs[3], ws[2], ws[3]).expect("valid test shape");
                let (x, xt) = c.tensor(&xs, 1.0)?;
                let (w, wt) = c.tensor(&ws, 0.3)?;
                let (bias, biast) = c.tensor(&[ws[0]], 1.0)?;
                let (res, rest) = c.tensor(&[xs[0], ws[0], ho, wo], 1.0)?;
                let y = conv2d::conv2d_with(gpu, &xt, &wt, has_bias.then_some(&biast), &spec, has_res.then_some(&rest), profile)?;
                let r = conv2d::reference(&x, xs, &w, ws, has_bias.then_some(&bias[..]), &spec, has_res.then_some(&res[..]));
                c.compare(&y, &r, Tol::Reduction).await
            }
            b if b.starts_with("attention/") => {
                let (batch, heads, nq, nk, d, causal) = match b {
                    "attention/self_d40" => (2, 2, 67, 67, 40, false),
                    "attention/cross_d64_mixed_layouts" => (2, 3, 50, 77, 64, false),
                    "attention/causal_d64_clip" => (1, 2, 77, 77, 64, true),
                    "attention/d80" => (1, 2, 33, 19, 80, false),
                    "attention/d160" => (1, 1, 21, 45, 160, false),
                    // Head dims that are not a multiple of 4 (the scalar kernel).
                    "attention/fused_qkv_d6" => (2, 3, 23, 23, 6, false),
                    "attention/causal_d3" => (1, 2, 19, 19, 3, true),
                    _ => (2, 2, 29, 29, 40, false),
                };
                let scale = 1.0 / (d as f32).sqrt();
                let hd = heads * d;
                if b.starts_with("attention/fused_qkv") {
                    // One [B, N, 3*H*D] projection output; q, k, v are views at offsets 0, HD, 2HD.
                    let (qkv, t) = c.tensor(&[batch, nq, 3 * hd], 1.0)?;
                    let view = |i: usize| HeadView { tensor: &t, base: i * hd, batch_stride: nq * 3 * hd, head_stride: d, row_stride: 3 * hd };
                    let spec = ops::AttentionSpec { q: view(0), k: view(1), v: view(2), batch, heads, nq, nk, head_dim: d, scale, causal };
                    let y = attention::attention_with(gpu, &spec, profile)?;
                    let vw = |i: usize| (i * hd, nq * 3 * hd, d, 3 * hd);
                    let r = attention::reference(&qkv, &qkv, &qkv, [vw(0), vw(1), vw(2)], batch, heads, nq, nk, d, scale, causal);
                    return c.compare(&y, &r, Tol::Reduction).await;
                }
                let (q, qt) = c.tensor(&[batch, nq, hd], 1.0)?;
                let (k, kt) = c.tensor(&[batch, nk, hd], 1.0)?;
                let (v, vt) = c.tensor(&[batch, nk, hd], 1.0)?;
                let mixed = b == "attention/cross_d64_mixed_layouts";
                // In the mixed case k and v are read as [B, H, N, D] (the same data, another layout).
                let kv_view = |t| if mixed { HeadView::bhnd(t, nk, heads, d) } else { HeadView::bnhd(t, nk, heads, d) };
                let spec = ops::AttentionSpec { q: HeadView::bnhd(&qt, nq, heads, d), k: kv_view(&kt), v: kv_view(&vt), batch, heads, nq, nk, head_dim: d, scale, causal };
                let y = attention::attention_with(gpu, &spec, profile)?;
                let qv = (0, nq * hd, d, hd);
                let kvv = if mixed { (0, heads * nk * d, nk * d, d) } else { (0, nk * hd, d, hd) };
                let r = attention::reference(&q, &k, &v, [qv, kvv, kvv], batch, heads, nq, nk, d, scale, causal);
                c.compare(&y, &r, Tol::Reduction).await
            }
            "group_norm/silu" | "group_norm/plain_eps1e-6" => {
                let silu = base == "group_norm/silu";
                let (b, ch, g, eps) = if silu { (2, 12, 4, 1e-5) } else { (1, 10, 5, 1e-6) };
                let (x, xt) = c.tensor(&[b, ch, 5, 7], 2.0)?;
                let x: Vec<f32> = x.iter().map(|v| c.round(v + 0.5)).collect();
                let xt2 = gpu.upload(xt.shape(), dtype, &x)?;
                let (gm, gmt) = c.tensor(&[ch], 1.0)?;
                let (bt, btt) = c.tensor(&[ch], 1.0)?;
                let y = norm::group_norm(gpu, &xt2, g, &gmt, &btt, eps, silu)?;
                c.compare(&y, &norm::group_norm_reference(&x, b, ch, g, &gm, &bt, eps, silu), Tol::Elementwise).await
            }
            "layer_norm/affine_77" => {
                let (x, xt) = c.tensor(&[13, 77], 3.0)?;
                let (g, gt) = c.tensor(&[77], 1.0)?;
                let (b, bt) = c.tensor(&[77], 1.0)?;
                let y = norm::layer_norm(gpu, &xt, Some((&gt, &bt)), 1e-5)?;
                c.compare(&y, &norm::layer_norm_reference(&x, 77, Some((&g, &b)), 1e-5), Tol::Elementwise).await
            }
            "layer_norm/plain_300" => {
                let (x, xt) = c.tensor(&[3, 300], 0.5)?;
                let y = norm::layer_norm(gpu, &xt, None, 1e-6)?;
                c.compare(&y, &norm::layer_norm_reference(&x, 300, None, 1e-6), Tol::Elementwise).await
            }
            "row_std/rows7_cols143" => {
                let (x, xt) = c.tensor(&[7, 143], 2.0)?;
                let y = norm::row_std(gpu, &xt, 143)?;
                c.compare(&y, &norm::row_std_reference(&x, 143), Tol::Reduction).await
            }
            // A scheduler-like update over four inputs (one unread, so not bound), with clamp,
            // negation and division; inputs and output in the case's dtype, one input f32.
            "expr/scheduler_step_1001" => {
                use ops::{Expr, ExprInput, IndexMap};
                let n = 1001;
                let (x, xt) = c.tensor(&[n], 1.0)?;
                let (e, et) = c.tensor(&[n], 1.0)?;
                let z: Vec<f32> = c.data(n, 1.0);
                let zt = gpu.upload(&[n], DType::F32, &z)?;
                let (x0, e0, _unused, z0) = (Expr::input(0), Expr::input(1), Expr::input(2), Expr::input(3));
                let pred = ((x0.clone() - 0.3 * e0.clone()) / 1.7).clamp(-1.5, 1.5);
                let f = 0.9 * pred + -(0.2 * e0) + z0 * 0.05 - x0 / 3.0;
                let same = IndexMap::same(n);
                let ins = [ExprInput { tensor: &xt, map: same }, ExprInput { tensor: &et, map: same }, ExprInput { tensor: &xt, map: same }, ExprInput { tensor: &zt, map: same }];
                let y = ops::expr(gpu, &f, &ins, &[n], dtype)?;
                let r: Vec<f32> = f.eval(n, &[(&x, same), (&e, same), (&x, same), (&z, same)])?.into_iter().map(|v| c.round(v)).collect();
                c.compare(&y, &r, Tol::Elementwise).await
            }
            // Guidance's reads: two halves of one tensor by offset, a value per row, a mask
            // repeated over channels.
            "expr/guidance_halves_per_row" => {
                use ops::{Expr, ExprInput, IndexMap};
                let (rows, per, plane) = (3, 5 * 7 * 3, 7 * 3);
                let half = rows * per;
                let (out, outt) = c.tensor(&[2 * half], 1.0)?;
                let (s, st) = c.tensor(&[rows], 1.0)?;
                let (m, mt) = c.tensor(&[plane], 1.0)?;
                let (u, t, sr, mk) = (Expr::input(0), Expr::input(1), Expr::input(2), Expr::input(3));
                let f = (u.clone() + 7.5 * (t - u)) * sr + mk;
                let maps = [IndexMap::from(0, half), IndexMap::from(half, half), IndexMap::per(per, rows), IndexMap::repeat(plane)];
                let ins = [ExprInput { tensor: &outt, map: maps[0] }, ExprInput { tensor: &outt, map: maps[1] }, ExprInput { tensor: &st, map: maps[2] }, ExprInput { tensor: &mt, map: maps[3] }];
                let y = ops::expr(gpu, &f, &ins, &[half], dtype)?;
                let r: Vec<f32> = f.eval(half, &[(&out, maps[0]), (&out, maps[1]), (&s, maps[2]), (&m, maps[3])])?.into_iter().map(|v| c.round(v)).collect();
                c.compare(&y, &r, Tol::Elementwise).await
            }
            // The transcendental forms gradients and optimisers use: a SiLU derivative through
            // sigmoid (exp), GELU's through erf, and Adam's update (sqrt).
            "expr/exp_sqrt_erf_sigmoid_77" => {
                use ops::{Expr, ExprInput, IndexMap};
                let n = 77;
                let (x, xt) = c.tensor(&[n], 3.0)?;
                let (g, gt) = c.tensor(&[n], 1.0)?;
                let (x0, g0) = (Expr::input(0), Expr::input(1));
                let s = x0.clone().sigmoid();
                let silu_grad = g0.clone() * s.clone() * (1.0 + x0.clone() * (1.0 - s));
                let f = silu_grad - 0.01 * g0.clone() / ((g0.clone() * g0).sqrt() + 1e-3) + 0.1 * (0.5 * x0.clone()).exp() + 0.5 * (0.7 * x0).erf();
                let same = IndexMap::same(n);
                let ins = [ExprInput { tensor: &xt, map: same }, ExprInput { tensor: &gt, map: same }];
                let y = ops::expr(gpu, &f, &ins, &[n], dtype)?;
                let r: Vec<f32> = f.eval(n, &[(&x, same), (&g, same)])?.into_iter().map(|v| c.round(v)).collect();
                c.compare(&y, &r, Tol::Elementwise).await
            }
            // Convolution columns and their adjoint (convolution gradients): a strided, padded
            // 3x3 kernel, and a dilated 5x3 one with uneven strides and padding.
            "im2col/3x3_s2_p1_2x3x9x7" | "im2col/5x3_dil2_uneven_1x2x8x11" | "col2im/3x3_s2_p1_2x3x9x7" | "col2im/5x3_dil2_uneven_1x2x8x11" => {
                use ops::im2col::{col2im_reference, im2col_reference};
                let (x_shape, (kh, kw), spec) = if base.ends_with("2x3x9x7") {
                    ([2, 3, 9, 7], (3, 3), ops::Conv2dSpec::new(2, 1))
                } else {
                    let s = ops::Conv2dSpec { stride: (1, 2), padding: (3, 1), padding_after: Some((4, 2)), dilation: (2, 2), act: Activation::None };
                    ([1, 2, 8, 11], (5, 3), s)
                };
                let g = ops::ColGeometry::new(&x_shape, kh, kw, &spec)?;
                if base.starts_with("im2col") {
                    let (x, xt) = c.tensor(&x_shape, 1.0)?;
                    let y = ops::im2col(gpu, &xt, kh, kw, &spec)?;
                    c.compare(&y, &im2col_reference(&x, &g, &spec), Tol::Elementwise).await
                } else {
                    let (cols, ct) = c.tensor(&g.cols_shape(), 1.0)?;
                    let y = ops::col2im(gpu, &ct, &x_shape, kh, kw, &spec)?;
                    let r: Vec<f32> = col2im_reference(&cols, &g, &spec).into_iter().map(|v| c.round(v)).collect();
                    c.compare(&y, &r, Tol::Reduction).await
                }
            }
            "softmax/rows9_cols333" => {
                let (x, xt) = c.tensor(&[9, 333], 3.0)?;
                let y = norm::softmax(gpu, &xt, 0.7)?;
                c.compare(&y, &norm::softmax_reference(&x, 333, 0.7), Tol::Reduction).await
            }
            "elementwise/silu" | "elementwise/gelu" | "elementwise/gelu_tanh" | "elementwise/quick_gelu" | "elementwise/scale" | "elementwise/relu" | "elementwise/tanh_third" => {
                let (x, xt) = c.tensor(&[7, 11, 13], 3.0)?;
                let (act, alpha, beta) = match base {
                    "elementwise/silu" => (Activation::Silu, 1.0, 0.0),
                    "elementwise/gelu" => (Activation::Gelu, 1.0, 0.0),
                    "elementwise/gelu_tanh" => (Activation::GeluTanh, 1.0, 0.0),
                    "elementwise/quick_gelu" => (Activation::QuickGelu, 1.0, 0.0),
                    "elementwise/relu" => (Activation::Relu, 1.0, 0.0),
                    "elementwise/tanh_third" => (Activation::Tanh, 1.0 / 3.0, 0.25),
                    _ => (Activation::None, 0.18215, -0.5),
                };
                let y = match act {
                    Activation::None => ops::scale(gpu, &xt, alpha, beta)?,
                    Activation::Tanh => elementwise::activation_affine(gpu, &xt, act, alpha, beta)?,
                    _ => ops::activation(gpu, &xt, act)?,
                };
                let r: Vec<f32> = x.iter().map(|&v| act.apply(alpha as f64 * v as f64 + beta as f64) as f32).collect();
                c.compare(&y, &r, Tol::Elementwise).await
            }
            "layout/upsample_to_3x5" => {
                // 2x3 planes to 3x5 (a UNet level of odd size: diffusers' upsample_size).
                let (x, xt) = c.tensor(&[2, 3, 2, 3], 1.0)?;
                let y = layout::upsample_nearest(gpu, &xt, 3, 5)?;
                c.compare(&y, &layout::resize_reference(&x, 6, 2, 3, 3, 5), Tol::Elementwise).await
            }
            "layout/bilinear_align_corners_2x" | "layout/bilinear_half_pixel_5x7_to_3x4" => {
                // DPT's fusion upsampling (2x, corners aligned) and its residual resize (any size,
                // half-pixel), odd sizes both.
                let corners = base == "layout/bilinear_align_corners_2x";
                let (x, xt) = c.tensor(&[2, 3, 5, 7], 1.0)?;
                let (oh, ow, coords) = if corners { (10, 14, ops::Coordinates::AlignCorners) } else { (3, 4, ops::Coordinates::HalfPixel) };
                let y = ops::interpolate(gpu, &xt, oh, ow, ops::Interpolation::Bilinear, coords)?;
                c.compare(&y, &layout::interpolate_reference(&x, 6, (5, 7), (oh, ow), ops::Interpolation::Bilinear, coords), Tol::Elementwise).await
            }
            "pool/max_3x3_s2_same" => {
                // BiT's stem pool: 3x3, stride 2, TF "SAME" padding of 0 after a ReLU; an odd side.
                let (x, xt) = c.tensor(&[2, 3, 9, 8], 1.0)?;
                let spec = ops::PoolSpec { kernel: 3, stride: 2, pad_top: 1, pad_left: 0, out_h: 5, out_w: 4, pad_value: 0.0 };
                let y = ops::max_pool2d(gpu, &xt, &spec)?;
                c.compare(&y, &crate::ops::pool::max_pool2d_reference(&x, 6, 9, 8, &spec), Tol::Elementwise).await
            }
            "layout/slice_rows" => {
                // Rows 3..7 of a [9, 5, 7] batch.
                let (x, xt) = c.tensor(&[9, 5, 7], 1.0)?;
                let y = ops::slice(gpu, &xt, 3 * 35, &[4, 5, 7])?;
                c.compare(&y, &x[3 * 35..7 * 35], Tol::Elementwise).await
            }
            "elementwise/add_broadcast" | "elementwise/mul_broadcast_last" | "elementwise/add_same_shape" | "elementwise/add_rank5" => {
                let (sa, sb): (&[usize], &[usize]) = match base {
                    "elementwise/add_broadcast" => (&[2, 3, 5, 7], &[3, 1, 1]),
                    "elementwise/mul_broadcast_last" => (&[2, 3, 5, 7], &[7]),
                    "elementwise/add_same_shape" => (&[3, 333], &[3, 333]),
                    _ => (&[2, 3, 4, 5, 6], &[2, 3, 1, 5, 1]),
                };
                let (a, at) = c.tensor(sa, 1.0)?;
                let (b, bt) = c.tensor(sb, 1.0)?;
                let is_mul = base == "elementwise/mul_broadcast_last";
                let y = if is_mul { ops::mul(gpu, &at, &bt)? } else { ops::add(gpu, &at, &bt)? };
                let (r, _) = elementwise::binary_reference(&a, sa, &b, sb, |x, y| if is_mul { x * y } else { x + y });
                c.compare(&y, &r, Tol::Elementwise).await
            }
            "elementwise/geglu" => {
                let (x, xt) = c.tensor(&[3, 5, 74], 2.0)?;
                let y = ops::geglu(gpu, &xt)?;
                c.compare(&y, &elementwise::geglu_reference(&x, 74), Tol::Elementwise).await
            }
            "layout/upsample_nearest2x" => {
                let (x, xt) = c.tensor(&[2, 3, 5, 7], 1.0)?;
                let y = ops::upsample_nearest2x(gpu, &xt)?;
                c.compare(&y, &layout::upsample_reference(&x, 6, 5, 7), Tol::Elementwise).await
            }
            "layout/concat_channels" | "layout/concat_last" => {
                let last = base == "layout/concat_last";
                let (s1, s2, s3): ([usize; 4], [usize; 4], [usize; 4]) = if last { ([2, 3, 4, 5], [2, 3, 4, 1], [2, 3, 4, 7]) } else { ([2, 3, 4, 5], [2, 2, 4, 5], [2, 1, 4, 5]) };
                let dim = if last { 3 } else { 1 };
                let (x1, t1) = c.tensor(&s1, 1.0)?;
                let (x2, t2) = c.tensor(&s2, 1.0)?;
                let (x3, t3) = c.tensor(&s3, 1.0)?;
                let y = ops::concat(gpu, &[&t1, &t2, &t3], dim)?;
                let outer: usize = s1[..dim].iter().product();
                let inner: usize = s1[dim + 1..].iter().product();
                let r = layout::concat_reference(&[(&x1, s1[dim]), (&x2, s2[dim]), (&x3, s3[dim])], outer, inner);
                c.compare(&y, &r, Tol::Elementwise).await
            }
            "layout/permute_0213" | "layout/permute_201" => {
                let (shape, perm): (&[usize], &[usize]) = if base == "layout/permute_0213" { (&[2, 3, 5, 7], &[0, 2, 1, 3]) } else { (&[3, 4, 5], &[2, 0, 1]) };
                let (x, xt) = c.tensor(shape, 1.0)?;
                let y = ops::permute(gpu, &xt, perm)?;
                c.compare(&y, &layout::permute_reference(&x, shape, perm), Tol::Elementwise).await
            }
            "embedding/timestep_flip_320" | "embedding/timestep_odd_shift1" => {
                let flip = base == "embedding/timestep_flip_320";
                let cfg = embedding::TimestepEmbedding { dim: if flip { 320 } else { 33 }, flip_sin_to_cos: flip, downscale_freq_shift: if flip { 0.0 } else { 1.0 }, scale: 1.0, max_period: 10000.0 };
                let ts = [0.0f32, 1.0, 21.0, 499.5, 981.0, 999.0];
                let tt = gpu.upload(&[ts.len()], DType::F32, &ts)?;
                let y = ops::timestep_embedding(gpu, &tt, &cfg, dtype)?;
                c.compare(&y, &embedding::timestep_embedding_reference(&ts, &cfg), Tol::Elementwise).await
            }
            "embedding/gather" => {
                let (table, tt) = c.tensor(&[100, 37], 1.0)?;
                let ids: Vec<u32> = (0..77).map(|_| c.rng.next_u32() % 100).collect();
                let y = ops::embedding(gpu, &ids, &tt)?;
                c.compare(&y, &embedding::embedding_reference(&ids, &table, 37), Tol::Elementwise).await
            }
            // A table of 401 rows of 5 (8 KiB in f32) gathered some 38 rows per binding, ids
            // repeated and in most blocks, the first and last rows included.
            "split/embedding_rows" => {
                let mut c = Ctx { gpu: split_gpu, dtype, rng: Rng::new(name) };
                let (table, tt) = c.tensor(&[401, 5], 1.0)?;
                let mut ids: Vec<u32> = (0..44).map(|_| c.rng.next_u32() % 401).collect();
                ids.extend([0, 400, 400, 0]);
                let y = ops::embedding(split_gpu, &ids, &tt)?;
                c.compare(&y, &embedding::embedding_reference(&ids, &table, 5), Tol::Elementwise).await
            }
            // Tensors larger than one storage binding (a device told bindings hold 1 KiB).
            "split/matmul_rows" => {
                let mut c = Ctx { gpu: split_gpu, dtype, rng: Rng::new(name) };
                let (m, k, n, b) = (45, 12, 15, 2);
                let (a, at) = c.tensor(&[b, m, k], 1.0)?;
                let (bb, bt) = c.tensor(&[k, n], 1.0)?;
                let (res, rest) = c.tensor(&[b, m, n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::packed(&at, m, k), b: MatView::packed(&bt, k, n).broadcast(), m, n, k, batch: b, alpha: 1.0, bias: None, act: Activation::None, residual: Some(&rest) };
                let y = ops::matmul_spec(split_gpu, &spec)?;
                let r = matmul::reference(&a, (0, m * k, k, 1), &bb, (0, 0, n, 1), m, n, k, b, 1.0, None, Activation::None, Some(&res));
                c.compare(&y, &r, Tol::Reduction).await
            }
            // Dispatches of bounded work: short_gpu allows 2,000 FLOPs per dispatch.
            "split/conv2d_columns" => {
                let mut c = Ctx { gpu: short_gpu, dtype, rng: Rng::new(name) };
                let spec = conv2d::Conv2dSpec::new(1, 1);
                let (x, xt) = c.tensor(&[2, 3, 9, 7], 1.0)?;
                let (w, wt) = c.tensor(&[5, 3, 3, 3], 0.5)?;
                let (bias, biast) = c.tensor(&[5], 1.0)?;
                let y = conv2d::conv2d(short_gpu, &xt, &wt, Some(&biast), &spec, None)?;
                let r = conv2d::reference(&x, [2, 3, 9, 7], &w, [5, 3, 3, 3], Some(&bias), &spec, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            "split/matmul_work_rows" => {
                let mut c = Ctx { gpu: short_gpu, dtype, rng: Rng::new(name) };
                let (m, k, n) = (150, 7, 9);
                let (a, at) = c.tensor(&[m, k], 1.0)?;
                let (bb, bt) = c.tensor(&[k, n], 1.0)?;
                let y = ops::matmul(short_gpu, &at, &bt)?;
                let r = matmul::reference(&a, (0, 0, k, 1), &bb, (0, 0, n, 1), m, n, k, 1, 1.0, None, Activation::None, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            // Row bands of a quantised A: each dispatch starts at its own weight row.
            "split/quant_matmul_work_rows" => {
                let mut c = Ctx { gpu: short_gpu, dtype, rng: Rng::new(name) };
                let (m, k, n) = (150, 40, 9);
                let (a, at) = c.quantised(&[m, k], 1.0, DType::Q4_1)?;
                let (bb, bt) = c.tensor(&[k, n], 1.0)?;
                let spec = ops::MatmulSpec { a: MatView::packed(&at, m, k), b: MatView::packed(&bt, k, n), m, n, k, batch: 1, alpha: 1.0, bias: None, act: Activation::None, residual: None };
                let y = ops::matmul_spec(short_gpu, &spec)?;
                let r = matmul::reference(&a, (0, 0, k, 1), &bb, (0, 0, n, 1), m, n, k, 1, 1.0, None, Activation::None, None);
                c.compare(&y, &r, Tol::Reduction).await
            }
            "split/attention_heads_queries" => {
                let mut c = Ctx { gpu: short_gpu, dtype, rng: Rng::new(name) };
                let (batch, heads, n, d) = (2, 2, 140, 8);
                let (q, qt) = c.tensor(&[batch, n, heads * d], 1.0)?;
                let (k, kt) = c.tensor(&[batch, n, heads * d], 1.0)?;
                let (v, vt) = c.tensor(&[batch, n, heads * d], 1.0)?;
                let view = |t| HeadView::bnhd(t, n, heads, d);
                let spec = ops::AttentionSpec { q: view(&qt), k: view(&kt), v: view(&vt), batch, heads, nq: n, nk: n, head_dim: d, scale: 0.35, causal: true };
                let vw = (0, n * heads * d, d, heads * d);
                let r = attention::reference(&q, &k, &v, [vw, vw, vw], batch, heads, n, n, d, 0.35, true);
                // Register blocks cover all 140 queries (so it splits by head); tiled ones are 64 wide.
                let mut worst = (0.0, 0.0);
                for (profile, _) in PROFILES {
                    let y = attention::attention_with(short_gpu, &spec, profile)?;
                    let e = c.compare(&y, &r, Tol::Reduction).await?;
                    if e.0 >= worst.0 {
                        worst = e;
                    }
                }
                Ok(worst)
            }
            "split/unary_chunks" => {
                let mut c = Ctx { gpu: split_gpu, dtype, rng: Rng::new(name) };
                let (x, xt) = c.tensor(&[3001], 2.0)?;
                let y = ops::activation(split_gpu, &xt, Activation::Silu)?;
                let r: Vec<f32> = x.iter().map(|&v| Activation::Silu.apply(v as f64) as f32).collect();
                c.compare(&y, &r, Tol::Elementwise).await
            }
            "split/add_chunks" => {
                let mut c = Ctx { gpu: split_gpu, dtype, rng: Rng::new(name) };
                let (a, at) = c.tensor(&[7, 433], 1.0)?;
                let (b, bt) = c.tensor(&[7, 433], 1.0)?;
                let y = ops::add(split_gpu, &at, &bt)?;
                let r: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (*x as f64 + *y as f64) as f32).collect();
                c.compare(&y, &r, Tol::Elementwise).await
            }
            "split/group_norm_units" => {
                let mut c = Ctx { gpu: split_gpu, dtype, rng: Rng::new(name) };
                let (x, xt) = c.tensor(&[2, 8, 6, 5], 1.0)?;
                let (g, gt) = c.tensor(&[8], 1.0)?;
                let (bb, bt) = c.tensor(&[8], 1.0)?;
                let y = norm::group_norm(split_gpu, &xt, 4, &gt, &bt, 1e-5, true)?;
                c.compare(&y, &norm::group_norm_reference(&x, 2, 8, 4, &g, &bb, 1e-5, true), Tol::Elementwise).await
            }
            // Misuse must come back as the right error, not a panic or a GPU validation failure.
            "errors/binding_too_large" | "errors/buffer_too_large" | "errors/shape_mismatch" | "errors/quant_strided_view" | "errors/quant_wrong_rows" => {
                let got = match base {
                    "errors/binding_too_large" => {
                        // A convolution input larger than one binding (1 KiB on split_gpu) cannot be split.
                        let x = split_gpu.upload(&[1, 4, 12, 12], dtype, &[0.5; 576])?;
                        let w = split_gpu.upload(&[2, 4, 3, 3], dtype, &[0.1; 72])?;
                        conv2d::conv2d(split_gpu, &x, &w, None, &conv2d::Conv2dSpec::new(1, 1), None).map(|_| ())
                    }
                    "errors/buffer_too_large" => gpu.empty(&[1 << 20, 1 << 20, 1 << 10], dtype).map(|_| ()),
                    "errors/quant_strided_view" | "errors/quant_wrong_rows" => {
                        // A quantised weight is only read whole, along its rows, with its own shape.
                        let x = gpu.upload(&[4, 64], dtype, &[0.5; 256])?;
                        let w = gpu.upload(&[8, 64], DType::Q8_0, &[0.1; 512])?;
                        let b = if base == "errors/quant_strided_view" { MatView::packed(&w, 64, 8) } else { MatView::transposed(&w, 64, 6).broadcast() };
                        let n = if base == "errors/quant_strided_view" { 8 } else { 6 };
                        let spec = ops::MatmulSpec { a: MatView::packed(&x, 4, 64), b, m: 4, n, k: 64, batch: 1, alpha: 1.0, bias: None, act: Activation::None, residual: None };
                        ops::matmul_spec(gpu, &spec).map(|_| ())
                    }
                    _ => {
                        let a = gpu.upload(&[2, 3], dtype, &[1.0; 6])?;
                        let b = gpu.upload(&[4, 5], dtype, &[1.0; 20])?;
                        ops::matmul(gpu, &a, &b).map(|_| ())
                    }
                };
                let expected = match (&got, base) {
                    (Err(crate::Error::BindingTooLarge { .. }), "errors/binding_too_large") => true,
                    (Err(crate::Error::BufferTooLarge { .. }), "errors/buffer_too_large") => true,
                    (Err(crate::Error::Shape(_)), "errors/shape_mismatch" | "errors/quant_wrong_rows") => true,
                    (Err(crate::Error::Unsupported(_)), "errors/quant_strided_view") => true,
                    _ => false,
                };
                // The device must still be healthy afterwards.
                gpu.check()?;
                split_gpu.check()?;
                if expected {
                    Ok((0.0, 0.0))
                } else {
                    Err(crate::Error::Unsupported(format!("expected the {base} error, got {got:?}")))
                }
            }
            other => Err(crate::Error::Unsupported(format!("unknown test case {other}"))),
        }
    })
}

/// Runs every case whose name contains `filter` (all when empty), calling `log` after each.
pub async fn run(filter: &str, log: &dyn Fn(&CaseResult)) -> Result<SuiteReport> {
    run_on(filter, false, log).await
}

/// [`run`] on the WebGPU adapter, or (`cpu`) on the CPU backend: the same cases against the same
/// references, f16 cases unsupported and the binding-limit case without meaning there.
pub async fn run_on(filter: &str, cpu: bool, log: &dyn Fn(&CaseResult)) -> Result<SuiteReport> {
    let gpu = Gpu::new(GpuOptions { cpu, ..Default::default() }).await?;
    let split_gpu = Gpu::new(GpuOptions { cpu, max_storage_binding: Some(1024), ..Default::default() }).await?;
    let short_gpu = Gpu::new(GpuOptions { cpu, max_dispatch_flops: Some(2e3), ..Default::default() }).await?;
    let devices = Devices { gpu: &gpu, split_gpu: &split_gpu, short_gpu: &short_gpu };
    let mut results = Vec::new();
    for name in case_names().iter().filter(|n| n.contains(filter)) {
        for dtype in [DType::F32, DType::F16] {
            let r = if !gpu.supports(dtype) {
                let why = if cpu { "the CPU backend computes in f32" } else { "adapter has no shader-f16" };
                CaseResult { name: name.clone(), dtype: dtype.name().into(), status: "unsupported".into(), max_err: None, tol: None, message: why.into() }
            } else if cpu && name == "errors/binding_too_large" {
                CaseResult { name: name.clone(), dtype: dtype.name().into(), status: "unsupported".into(), max_err: None, tol: None, message: "the CPU backend has no storage bindings".into() }
            } else {
                match run_case(&devices, name, dtype).await {
                    Ok((err, tol)) => CaseResult {
                        name: name.clone(),
                        dtype: dtype.name().into(),
                        status: if err <= tol { "pass" } else { "fail" }.into(),
                        max_err: Some(err),
                        tol: Some(tol),
                        message: String::new(),
                    },
                    Err(e) => CaseResult { name: name.clone(), dtype: dtype.name().into(), status: "fail".into(), max_err: None, tol: None, message: e.to_string() },
                }
            };
            log(&r);
            results.push(r);
        }
    }
    let count = |s: &str| results.iter().filter(|r| r.status == s).count();
    Ok(SuiteReport { adapter: gpu.summary().clone(), passed: count("pass"), failed: count("fail"), unsupported: count("unsupported"), results })
}
