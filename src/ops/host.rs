//! The CPU backend: every kernel family as host code, for browsers and machines without a usable
//! GPU. Each launcher in `ops` validates its arguments as for the GPU and then, on a CPU-backend
//! device ([`Gpu::is_cpu`]), calls the function here instead of recording a kernel; the results
//! are checked against the same CPU references as the kernels (`src/suite.rs`).
//!
//! f32 throughout. Matrix products (linear layers, convolutions as im2col products, attention
//! scores and values) go through the `gemm` crate: AVX2/FMA natively on x86-64, NEON on ARM,
//! simd128 in the browser. The work is spread over threads (rayon): natively, and in the browser
//! in the `threads` build (cross-origin-isolated pages: a pool of Web Workers on shared memory);
//! otherwise it runs on the engine's worker thread. Quantised weights are dequantised when a
//! product reads them, so they stay small in memory.

use super::attention::AttentionSpec;
use super::conv2d::Conv2dSpec;
use super::matmul::{BiasAxis, MatmulSpec};
use super::Activation;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

/// The instruction set the products use, for reports. (gemm's AVX-512 kernels are left off: on
/// the machines measured they were slower than its AVX2 ones at these sizes.)
pub fn simd() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            return "AVX2+FMA";
        }
        "SSE2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(target_arch = "wasm32")]
    {
        if cfg!(target_feature = "simd128") {
            "wasm simd128"
        } else {
            "wasm scalar"
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "wasm32")))]
    {
        "scalar"
    }
}

/// Threads the host kernels use.
pub fn threads() -> usize {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    {
        rayon::current_num_threads()
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    {
        1
    }
}

/// Outputs below this many values are computed on one thread: waking the others costs more.
const PARALLEL_MIN: usize = 1 << 12;

/// Calls `f(i, chunk)` for each `len`-long chunk of `out`, in parallel where there are threads
/// and enough work.
fn for_chunks(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let len = len.max(1);
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if out.len() >= PARALLEL_MIN && out.len() > len && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        out.par_chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    out.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
}

pub(crate) fn parallelism(flops: f64) -> gemm::Parallelism {
    // Threads cost more than they give below about a million multiply-adds.
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    {
        if flops > 2e6 && rayon::current_num_threads() > 1 {
            return gemm::Parallelism::Rayon(0);
        }
    }
    let _ = flops;
    gemm::Parallelism::None
}

/// A strided matrix over host values: element (r, c) at `base + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    base: usize,
    rs: usize,
    cs: usize,
}

/// `c = alpha * a . b` for `m x n` (row-major `c`, `ldc` apart), `k` deep.
fn gemm_into(m: usize, n: usize, k: usize, a: Mat, b: Mat, alpha: f32, c: &mut [f32], ldc: usize, par: bool) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |x: &Mat, rows: usize, cols: usize| x.base + (rows - 1) * x.rs + (cols.max(1) - 1) * x.cs;
    if k > 0 && (last(&a, m, k) >= a.data.len() || last(&b, k, n) >= b.data.len()) {
        return Err(Error::Shape("a host matrix product reads past its operands".into()));
    }
    if (m - 1) * ldc + n > c.len() {
        return Err(Error::Shape("a host matrix product writes past its output".into()));
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v = 0.0);
        return Ok(());
    }
    let p = if par { parallelism(2.0 * (m * n * k) as f64) } else { gemm::Parallelism::None };
    // SAFETY: the bounds were checked above; the three regions do not overlap (c is a fresh
    // output, a and b are borrowed immutably).
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), 1, ldc as isize, false,
            a.data.as_ptr().add(a.base), a.cs as isize, a.rs as isize,
            b.data.as_ptr().add(b.base), b.cs as isize, b.rs as isize,
            0.0f32, alpha, false, false, false, p,
        );
    }
    Ok(())
}

/// A matmul operand's values: f32 as they are, a quantised weight dequantised.
fn operand_values(t: &Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
    if t.dtype().is_quantised() {
        Ok(std::borrow::Cow::Owned(t.dtype().decode(t.shape(), t.host_packed()?)))
    } else {
        Ok(std::borrow::Cow::Borrowed(t.host_f32()?))
    }
}

/// `act(v + bias) + residual` over an `m x n` output block, in place.
fn epilogue(c: &mut [f32], n: usize, row0: usize, bias: Option<(&[f32], BiasAxis)>, act: Activation, residual: Option<&[f32]>) {
    for (i, row) in c.chunks_mut(n.max(1)).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let mut x = *v;
            if let Some((b, axis)) = bias {
                x += b[if axis == BiasAxis::Col { j } else { row0 + i }];
            }
            x = act_f32(act, x);
            if let Some(r) = residual {
                x += r[(row0 + i) * n + j];
            }
            *v = x;
        }
    }
}

/// An activation in f32 (the kernels' activations.wgsl, not the f64 reference).
pub(crate) fn act_f32(act: Activation, x: f32) -> f32 {
    let sigmoid = |v: f32| 1.0 / (1.0 + (-v).exp());
    match act {
        Activation::None => x,
        Activation::Silu => x * sigmoid(x),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
        Activation::QuickGelu => x * sigmoid(1.702 * x),
        Activation::Relu => x.max(0.0),
        Activation::Tanh => x.tanh(),
    }
}

/// [`MatmulSpec`] on the host (validated by the launcher).
pub(crate) fn matmul(gpu: &Gpu, s: &MatmulSpec) -> Result<Tensor> {
    let (a, b) = (operand_values(s.a.tensor)?, operand_values(s.b.tensor)?);
    let bias = match s.bias {
        Some((t, axis)) => Some((t.host_f32()?, axis)),
        None => None,
    };
    let residual = s.residual.map(Tensor::host_f32).transpose()?;
    let (m, n) = (s.m, s.n);
    let mut out = vec![0f32; s.batch * m * n];
    for (bt, c) in out.chunks_mut((m * n).max(1)).enumerate().take(s.batch) {
        let am = Mat { data: &a, base: s.a.base + bt * s.a.batch_stride, rs: s.a.row_stride, cs: s.a.col_stride };
        let bm = Mat { data: &b, base: s.b.base + bt * s.b.batch_stride, rs: s.b.row_stride, cs: s.b.col_stride };
        gemm_into(m, n, s.k, am, bm, s.alpha, c, n, true)?;
        let res = residual.map(|r| &r[bt * m * n..(bt + 1) * m * n]);
        let act = s.act;
        if bias.is_some() || act != Activation::None || res.is_some() {
            for_chunks(c, 64 * n.max(1), |i, block| epilogue(block, n, i * 64, bias, act, res));
        }
    }
    gpu.host_tensor(&[s.batch, m, n], out)
}

/// A convolution on the host: im2col of each image, then one product with the weight.
pub(crate) fn conv2d(gpu: &Gpu, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: &Conv2dSpec, residual: Option<&Tensor>) -> Result<Tensor> {
    let (&[b, cin, h, w], &[cout, _, kh, kw]) = (x.shape(), weight.shape()) else {
        return Err(Error::Shape("conv2d shapes were checked by the launcher".into()));
    };
    let (ho, wo) = spec.output_size(h, w, kh, kw).ok_or_else(|| Error::Shape("conv2d output size".into()))?;
    let xv = x.host_f32()?;
    let wv = operand_values(weight)?;
    let bias = bias.map(Tensor::host_f32).transpose()?;
    let residual = residual.map(Tensor::host_f32).transpose()?;
    let (k, n) = (cin * kh * kw, ho * wo);
    let mut out = vec![0f32; b * cout * n];
    let mut cols = vec![0f32; k * n];
    for img in 0..b {
        let xi = &xv[img * cin * h * w..(img + 1) * cin * h * w];
        // cols[(ci, ky, kx), (oy, ox)]: the input under each tap, zero in the padding.
        for_chunks(&mut cols, n, |row, dst| {
            let (ci, ky, kx) = (row / (kh * kw), (row / kw) % kh, row % kw);
            for oy in 0..ho {
                let iy = (oy * spec.stride.0 + ky * spec.dilation.0) as isize - spec.padding.0 as isize;
                let line = &mut dst[oy * wo..(oy + 1) * wo];
                if iy < 0 || iy >= h as isize {
                    line.iter_mut().for_each(|v| *v = 0.0);
                    continue;
                }
                let src = &xi[(ci * h + iy as usize) * w..(ci * h + iy as usize + 1) * w];
                for (ox, v) in line.iter_mut().enumerate() {
                    let ix = (ox * spec.stride.1 + kx * spec.dilation.1) as isize - spec.padding.1 as isize;
                    *v = if ix < 0 || ix >= w as isize { 0.0 } else { src[ix as usize] };
                }
            }
        });
        let c = &mut out[img * cout * n..(img + 1) * cout * n];
        gemm_into(cout, n, k, Mat { data: &wv, base: 0, rs: k, cs: 1 }, Mat { data: &cols, base: 0, rs: n, cs: 1 }, 1.0, c, n, true)?;
        let res = residual.map(|r| &r[img * cout * n..(img + 1) * cout * n]);
        let bias = bias.map(|bs| (bs, BiasAxis::Row));
        if bias.is_some() || spec.act != Activation::None || res.is_some() {
            for_chunks(c, n, |i, row| epilogue(row, n, i, bias, spec.act, res));
        }
    }
    gpu.host_tensor(&[b, cout, ho, wo], out)
}

/// Attention on the host: for each (image, head) and block of queries, the scores by one
/// product, a row softmax, and the values by another; the output in `[B, Nq, H*D]`.
pub(crate) fn attention(gpu: &Gpu, s: &AttentionSpec) -> Result<Tensor> {
    let (q, k, v) = (s.q.tensor.host_f32()?, s.k.tensor.host_f32()?, s.v.tensor.host_f32()?);
    let (d, nq, nk, heads) = (s.head_dim, s.nq, s.nk, s.heads);
    let hd = heads * d;
    // Query blocks keep the score matrix small (a block of 64 rows by every key).
    const QB: usize = 64;
    let blocks_per_head = nq.div_ceil(QB);
    let units = s.batch * heads * blocks_per_head;
    // Each unit computes its block into its own slot; they are scattered to [B, Nq, H*D] after.
    let mut slots = vec![0f32; units * QB * d];
    let failed = std::sync::atomic::AtomicBool::new(false);
    // (base, batch stride, head stride, row stride) of each operand, without the tensors.
    let layout = |v: &super::attention::HeadView| (v.base, v.batch_stride, v.head_stride, v.row_stride);
    let (lq, lk, lv) = (layout(&s.q), layout(&s.k), layout(&s.v));
    let (scale, causal) = (s.scale, s.causal);
    for_chunks(&mut slots, QB * d, |u, slot| {
        let (bh, qb) = (u / blocks_per_head, u % blocks_per_head);
        let (bt, hh) = (bh / heads, bh % heads);
        let q0 = qb * QB;
        let rows = QB.min(nq - q0);
        let base = |l: (usize, usize, usize, usize)| l.0 + bt * l.1 + hh * l.2;
        let qm = Mat { data: q, base: base(lq) + q0 * lq.3, rs: lq.3, cs: 1 };
        // K^T: element (c, j) is key j's component c.
        let km = Mat { data: k, base: base(lk), rs: 1, cs: lk.3 };
        let vm = Mat { data: v, base: base(lv), rs: lv.3, cs: 1 };
        let mut scores = vec![0f32; rows * nk];
        if gemm_into(rows, nk, d, qm, km, scale, &mut scores, nk, false).is_err() {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        for (i, row) in scores.chunks_mut(nk.max(1)).enumerate() {
            let valid = if causal { (q0 + i + 1).min(nk) } else { nk };
            let mx = row[..valid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in &mut row[..valid] {
                *x = (*x - mx).exp();
                sum += *x;
            }
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            row[..valid].iter_mut().for_each(|x| *x *= inv);
            row[valid..].iter_mut().for_each(|x| *x = 0.0);
        }
        if gemm_into(rows, d, nk, Mat { data: &scores, base: 0, rs: nk, cs: 1 }, vm, 1.0, slot, d, false).is_err() {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    if failed.into_inner() {
        return Err(Error::Shape("attention operands are too small for the heads and rows given".into()));
    }
    let mut out = vec![0f32; s.batch * nq * hd];
    for u in 0..units {
        let (bh, qb) = (u / blocks_per_head, u % blocks_per_head);
        let (bt, hh) = (bh / heads, bh % heads);
        let q0 = qb * QB;
        for i in 0..QB.min(nq - q0) {
            let dst = (bt * nq + q0 + i) * hd + hh * d;
            out[dst..dst + d].copy_from_slice(&slots[(u * QB + i) * d..(u * QB + i + 1) * d]);
        }
    }
    gpu.host_tensor(&[s.batch, nq, hd], out)
}

/// `act(alpha * x + beta)` elementwise.
pub(crate) fn unary(gpu: &Gpu, x: &Tensor, act: Activation, alpha: f32, beta: f32) -> Result<Tensor> {
    let xv = x.host_f32()?;
    let mut out = vec![0f32; xv.len()];
    for_chunks(&mut out, 1 << 14, |i, c| {
        let src = &xv[i << 14..(i << 14) + c.len()];
        for (o, &v) in c.iter_mut().zip(src) {
            *o = act_f32(act, alpha * v + beta);
        }
    });
    gpu.host_tensor(x.shape(), out)
}

/// Elements `[start, start + len)` as a tensor of `shape`.
pub(crate) fn slice(gpu: &Gpu, x: &Tensor, start: usize, shape: &[usize]) -> Result<Tensor> {
    let len: usize = shape.iter().product();
    gpu.host_tensor(shape, x.host_f32()?[start..start + len].to_vec())
}

/// `a (op) b` with NumPy broadcasting into `shape`: `mul` false adds.
pub(crate) fn binary(gpu: &Gpu, a: &Tensor, b: &Tensor, shape: &[usize], mul: bool) -> Result<Tensor> {
    let (av, bv) = (a.host_f32()?, b.host_f32()?);
    let n: usize = shape.iter().product();
    let f = |x: f32, y: f32| if mul { x * y } else { x + y };
    if av.len() == n && bv.len() == n {
        return gpu.host_tensor(shape, av.iter().zip(bv).map(|(&x, &y)| f(x, y)).collect());
    }
    // Strides of each operand as seen from the output (0 along broadcast dims).
    let strides = |s: &[usize]| -> Vec<usize> {
        let mut st = vec![0; shape.len()];
        let mut acc = 1;
        for i in (0..shape.len()).rev() {
            let j = i as isize - (shape.len() - s.len()) as isize;
            let d = if j >= 0 { s[j as usize] } else { 1 };
            if d != 1 {
                st[i] = acc;
            }
            acc *= d;
        }
        st
    };
    let (sa, sb) = (strides(a.shape()), strides(b.shape()));
    let inner = *shape.last().unwrap_or(&1);
    let mut out = vec![0f32; n];
    for_chunks(&mut out, inner.max(1), |row, dst| {
        // The row's start in each operand.
        let (mut oa, mut ob, mut r) = (0, 0, row);
        for i in (0..shape.len().saturating_sub(1)).rev() {
            let c = r % shape[i];
            r /= shape[i];
            oa += c * sa[i];
            ob += c * sb[i];
        }
        let (la, lb) = (sa.last().copied().unwrap_or(0), sb.last().copied().unwrap_or(0));
        for (j, o) in dst.iter_mut().enumerate() {
            *o = f(av[oa + j * la], bv[ob + j * lb]);
        }
    });
    gpu.host_tensor(shape, out)
}

/// GEGLU of rows `[.., 2d]`: the first half times GELU(the second half).
pub(crate) fn geglu(gpu: &Gpu, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let xv = x.host_f32()?;
    let d = *shape.last().unwrap_or(&0);
    let mut out = vec![0f32; xv.len() / 2];
    for_chunks(&mut out, d.max(1), |r, dst| {
        let row = &xv[r * 2 * d..(r + 1) * 2 * d];
        for (j, o) in dst.iter_mut().enumerate() {
            *o = row[j] * act_f32(Activation::Gelu, row[d + j]);
        }
    });
    gpu.host_tensor(shape, out)
}

/// GroupNorm over `[B, C, ...]` (+ SiLU).
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm(gpu: &Gpu, x: &Tensor, b: usize, c: usize, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool) -> Result<Tensor> {
    let (xv, g, bt) = (x.host_f32()?, gamma.host_f32()?, beta.host_f32()?);
    let hw = xv.len() / (b * c).max(1);
    let cpg = c / groups;
    let len = cpg * hw;
    let mut out = vec![0f32; xv.len()];
    for_chunks(&mut out, len, |u, dst| {
        let src = &xv[u * len..(u + 1) * len];
        let (mean, rstd) = mean_rstd(src, eps);
        let g0 = (u % groups) * cpg;
        for (i, (o, &v)) in dst.iter_mut().zip(src).enumerate() {
            let ch = g0 + i / hw.max(1);
            let y = (v - mean) * rstd * g[ch] + bt[ch];
            *o = if silu { act_f32(Activation::Silu, y) } else { y };
        }
    });
    gpu.host_tensor(x.shape(), out)
}

/// Mean and 1/sqrt(variance + eps), two-pass in f32 as the kernels compute them.
fn mean_rstd(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len().max(1) as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm over the last `cols` values of each row.
pub(crate) fn layer_norm(gpu: &Gpu, x: &Tensor, cols: usize, affine: Option<(&Tensor, &Tensor)>, eps: f32) -> Result<Tensor> {
    let xv = x.host_f32()?;
    let affine = match affine {
        Some((g, b)) => Some((g.host_f32()?, b.host_f32()?)),
        None => None,
    };
    let mut out = vec![0f32; xv.len()];
    for_chunks(&mut out, cols, |r, dst| {
        let src = &xv[r * cols..(r + 1) * cols];
        let (mean, rstd) = mean_rstd(src, eps);
        for (i, (o, &v)) in dst.iter_mut().zip(src).enumerate() {
            let y = (v - mean) * rstd;
            *o = match affine {
                Some((g, b)) => y * g[i] + b[i],
                None => y,
            };
        }
    });
    gpu.host_tensor(x.shape(), out)
}

/// softmax(scale * x) over each row of `cols`.
pub(crate) fn softmax(gpu: &Gpu, x: &Tensor, cols: usize, scale: f32) -> Result<Tensor> {
    let xv = x.host_f32()?;
    let mut out = vec![0f32; xv.len()];
    for_chunks(&mut out, cols, |r, dst| {
        let src = &xv[r * cols..(r + 1) * cols];
        let mx = src.iter().map(|&v| scale * v).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = (scale * v - mx).exp();
            sum += *o;
        }
        dst.iter_mut().for_each(|o| *o /= sum);
    });
    gpu.host_tensor(x.shape(), out)
}

/// The unbiased standard deviation of each row of `cols`.
pub(crate) fn row_std(gpu: &Gpu, x: &Tensor, cols: usize) -> Result<Tensor> {
    gpu.host_tensor(&[x.numel() / cols.max(1)], super::norm::row_std_reference(x.host_f32()?, cols))
}

/// Rows of `table` for each id (a quantised table dequantised row by row).
pub(crate) fn embedding(gpu: &Gpu, ids: &[u32], table: &Tensor, dim: usize) -> Result<Tensor> {
    let values = operand_values(table)?;
    gpu.host_tensor(&[ids.len(), dim], super::embedding::embedding_reference(ids, &values, dim))
}

/// diffusers' sinusoidal timestep embedding of `timesteps` into `[N, dim]`.
pub(crate) fn timestep_embedding(gpu: &Gpu, timesteps: &Tensor, cfg: &super::embedding::TimestepEmbedding) -> Result<Tensor> {
    let t = timesteps.host_f32()?;
    let freqs = cfg.frequencies();
    let half = cfg.dim / 2;
    let mut y = vec![0f32; t.len() * cfg.dim];
    for (r, &ts) in t.iter().enumerate() {
        for (j, &f) in freqs.iter().enumerate() {
            let arg = cfg.scale * (ts * f);
            let (s, c) = (arg.sin(), arg.cos());
            let (a, b) = if cfg.flip_sin_to_cos { (c, s) } else { (s, c) };
            y[r * cfg.dim + j] = a;
            y[r * cfg.dim + half + j] = b;
        }
    }
    gpu.host_tensor(&[t.len(), cfg.dim], y)
}

/// Concatenation along `dim`, tensors viewed as `[outer, d_i, inner]`.
pub(crate) fn concat(gpu: &Gpu, xs: &[&Tensor], shape: &[usize], dim: usize) -> Result<Tensor> {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let parts: Vec<(&[f32], usize)> = xs.iter().map(|t| Ok((t.host_f32()?, t.shape()[dim]))).collect::<Result<_>>()?;
    gpu.host_tensor(shape, super::layout::concat_reference(&parts, outer, inner))
}

/// `x` with its dims permuted, copied contiguous.
pub(crate) fn permute(gpu: &Gpu, x: &Tensor, perm: &[usize], shape: &[usize]) -> Result<Tensor> {
    gpu.host_tensor(shape, super::layout::permute_reference(x.host_f32()?, x.shape(), perm))
}

/// Nearest or bilinear resizing (the reference is the f32 computation the kernel does).
pub(crate) fn interpolate(gpu: &Gpu, x: &Tensor, oh: usize, ow: usize, mode: super::layout::Interpolation, coords: super::layout::Coordinates) -> Result<Tensor> {
    let &[b, c, h, w] = x.shape() else { return Err(Error::Shape("interpolate shape was checked by the launcher".into())) };
    gpu.host_tensor(&[b, c, oh, ow], super::layout::interpolate_reference(x.host_f32()?, b * c, (h, w), (oh, ow), mode, coords))
}

/// Max pooling.
pub(crate) fn max_pool2d(gpu: &Gpu, x: &Tensor, spec: &super::pool::PoolSpec) -> Result<Tensor> {
    let &[b, c, h, w] = x.shape() else { return Err(Error::Shape("max_pool2d shape was checked by the launcher".into())) };
    gpu.host_tensor(&[b, c, spec.out_h, spec.out_w], super::pool::max_pool2d_reference(x.host_f32()?, b * c, h, w, spec))
}

/// An elementwise expression over host tensors.
pub(crate) fn expr(gpu: &Gpu, e: &super::Expr, inputs: &[super::ExprInput], shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<(&[f32], super::IndexMap)> = inputs.iter().map(|x| Ok((x.tensor.host_f32()?, x.map))).collect::<Result<_>>()?;
    gpu.host_tensor(shape, e.eval(n, &data)?)
}
