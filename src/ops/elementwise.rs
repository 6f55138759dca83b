//! Elementwise kernels: activations, scale/shift, broadcasting add and mul, GEGLU.

use super::{bind_range, bytes_of, check_same_dtype, elementwise_grid, max_binding_elems, Activation, ACTIVATIONS_WGSL};
use crate::error::{Error, Result};
use crate::gpu::{Bind, Def, Gpu, Kernel, Tensor};

const ELEMENTWISE_WGSL: &str = include_str!("../../shaders/elementwise.wgsl");
const BINARY_WGSL: &str = include_str!("../../shaders/binary.wgsl");
const GEGLU_WGSL: &str = include_str!("../../shaders/geglu.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct UnaryParams {
    n: u32,
    x_base: u32,
    y_base: u32,
    _pad: u32,
    alpha: f32,
    beta: f32,
}

/// `act(alpha * x + beta)` elementwise, split into several dispatches when x exceeds one binding.
fn unary(gpu: &Gpu, x: &Tensor, act: Activation, alpha: f32, beta: f32) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "elementwise")?;
    if gpu.is_cpu() {
        return super::host::unary(gpu, x, act, alpha, beta);
    }
    let out = gpu.empty(x.shape(), dtype)?;
    let defs = [("ACT", Def::U32(act.code()))];
    let kernel = Kernel { family: "elementwise", sources: &[ACTIVATIONS_WGSL, ELEMENTWISE_WGSL], entry: "unary", dtype, defs: &defs };
    let n = x.numel();
    let chunk = max_binding_elems(gpu, dtype);
    for s in (0..n).step_by(chunk.max(1)) {
        let e = (s + chunk).min(n);
        let (xb, x_base) = bind_range(gpu, x, s, e);
        let (yb, y_base) = bind_range(gpu, &out, s, e);
        let p = UnaryParams { n: (e - s) as u32, x_base, y_base, _pad: 0, alpha, beta };
        gpu.dispatch(&kernel, bytes_of(&p), &[xb, yb], elementwise_grid(gpu, e - s))?;
    }
    Ok(out)
}

/// Elements `[start, start + len)` of `x` as a tensor of `shape` (rows of a batch: the
/// elementwise copy kernel over a sub-range).
pub fn slice(gpu: &Gpu, x: &Tensor, start: usize, shape: &[usize]) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "slice")?;
    let len: usize = shape.iter().product();
    if start.checked_add(len).is_none_or(|e| e > x.numel()) {
        return Err(Error::Shape(format!("slice {start}..{} of a tensor of {} elements", start.saturating_add(len), x.numel())));
    }
    if gpu.is_cpu() {
        return super::host::slice(gpu, x, start, shape);
    }
    let out = gpu.empty(shape, dtype)?;
    let defs = [("ACT", Def::U32(Activation::None.code()))];
    let kernel = Kernel { family: "elementwise", sources: &[ACTIVATIONS_WGSL, ELEMENTWISE_WGSL], entry: "unary", dtype, defs: &defs };
    let chunk = max_binding_elems(gpu, dtype).max(1);
    for s in (0..len).step_by(chunk) {
        let e = (s + chunk).min(len);
        let (xb, x_base) = bind_range(gpu, x, start + s, start + e);
        let (yb, y_base) = bind_range(gpu, &out, s, e);
        let p = UnaryParams { n: (e - s) as u32, x_base, y_base, _pad: 0, alpha: 1.0, beta: 0.0 };
        gpu.dispatch(&kernel, bytes_of(&p), &[xb, yb], elementwise_grid(gpu, e - s))?;
    }
    Ok(out)
}

/// An activation applied elementwise.
pub fn activation(gpu: &Gpu, x: &Tensor, act: Activation) -> Result<Tensor> {
    unary(gpu, x, act, 1.0, 0.0)
}

/// `act(alpha * x + beta)` elementwise.
pub fn activation_affine(gpu: &Gpu, x: &Tensor, act: Activation, alpha: f32, beta: f32) -> Result<Tensor> {
    unary(gpu, x, act, alpha, beta)
}

/// `alpha * x + beta`.
pub fn scale(gpu: &Gpu, x: &Tensor, alpha: f32, beta: f32) -> Result<Tensor> {
    unary(gpu, x, Activation::None, alpha, beta)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BinaryParams {
    n: u32,
    a_base: u32,
    b_base: u32,
    y_base: u32,
    dims: [u32; 4],
    a_strides: [u32; 4],
    b_strides: [u32; 4],
}

/// Broadcast shape of two shapes (NumPy rules), or `None`.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// Strides of `shape` (contiguous) as seen from a broadcast `out` shape, padded to 4 dims.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> [u32; 4] {
    let mut strides = [0u32; 4];
    let mut s = 1usize;
    for i in (0..out.len()).rev() {
        let j = i as isize - (out.len() - shape.len()) as isize;
        let d = if j >= 0 { shape[j as usize] } else { 1 };
        if d != 1 {
            strides[4 - out.len() + i] = s as u32;
        }
        s *= d;
    }
    strides
}

fn binary(gpu: &Gpu, a: &Tensor, b: &Tensor, op: u32, act: Activation) -> Result<Tensor> {
    let dtype = check_same_dtype(&[a, b], "add/mul")?;
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| Error::Shape(format!("cannot broadcast {:?} with {:?}", a.shape(), b.shape())))?;
    if gpu.is_cpu() {
        return super::host::binary(gpu, a, b, &shape, op == 1);
    }
    // Merge leading dims so any rank fits the kernel's four: everything before the last three
    // must then be the same in a, b and the output.
    let mut dims = shape.clone();
    while dims.len() > 4 {
        let lead = dims.remove(0);
        dims[0] *= lead;
    }
    let squeeze = |s: &[usize]| -> Option<Vec<usize>> {
        let full: Vec<usize> = std::iter::repeat_n(1, shape.len() - s.len()).chain(s.iter().copied()).collect();
        if shape.len() <= 4 {
            return Some(full);
        }
        let k = shape.len() - 3;
        let lead: usize = full[..k].iter().product();
        (lead == 1 || full[..k] == shape[..k]).then(|| std::iter::once(lead).chain(full[k..].iter().copied()).collect())
    };
    let (Some(sa), Some(sb)) = (squeeze(a.shape()), squeeze(b.shape())) else {
        return Err(Error::Unsupported(format!("broadcasting {:?} with {:?} over more than 4 dimensions", a.shape(), b.shape())));
    };
    let out = gpu.empty(&shape, dtype)?;
    let mut d4 = [1u32; 4];
    for (i, &d) in dims.iter().enumerate() {
        d4[4 - dims.len() + i] = d as u32;
    }
    let defs = [("OP", Def::U32(op)), ("ACT", Def::U32(act.code()))];
    let kernel = Kernel { family: "binary", sources: &[ACTIVATIONS_WGSL, BINARY_WGSL], entry: "main", dtype, defs: &defs };
    let n = out.numel();
    let same = a.numel() == n && b.numel() == n;
    // Same-shape operands split like unary kernels when larger than a binding.
    let chunk = if same { max_binding_elems(gpu, dtype).max(1) } else { n.max(1) };
    for s in (0..n).step_by(chunk) {
        let e = (s + chunk).min(n);
        let ((ab, a_base), (bb, b_base)) = if same {
            (bind_range(gpu, a, s, e), bind_range(gpu, b, s, e))
        } else {
            ((Bind::whole(a), 0), (Bind::whole(b), 0))
        };
        let (yb, y_base) = bind_range(gpu, &out, s, e);
        let (dims, a_strides, b_strides) = if same {
            ([1, 1, 1, (e - s) as u32], [0, 0, 0, 1], [0, 0, 0, 1])
        } else {
            (d4, broadcast_strides(&sa, &dims), broadcast_strides(&sb, &dims))
        };
        let p = BinaryParams { n: (e - s) as u32, a_base, b_base, y_base, dims, a_strides, b_strides };
        gpu.dispatch(&kernel, bytes_of(&p), &[ab, bb, yb], elementwise_grid(gpu, e - s))?;
    }
    Ok(out)
}

/// `a + b` with broadcasting.
pub fn add(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(gpu, a, b, 0, Activation::None)
}

/// `a * b` with broadcasting.
pub fn mul(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(gpu, a, b, 1, Activation::None)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GegluParams {
    rows: u32,
    d: u32,
}

/// GEGLU on a projection output `[.., 2d]`: first half times GELU(second half) -> `[.., d]`.
pub fn geglu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let dtype = check_same_dtype(&[x], "geglu")?;
    let two_d = *x.shape().last().ok_or_else(|| Error::Shape("geglu of a scalar".into()))?;
    if two_d % 2 != 0 {
        return Err(Error::Shape(format!("geglu needs an even last dim, got {:?}", x.shape())));
    }
    let d = two_d / 2;
    let rows = x.numel() / two_d.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("non-empty") = d;
    if gpu.is_cpu() {
        return super::host::geglu(gpu, x, &shape);
    }
    let out = gpu.empty(&shape, dtype)?;
    let kernel = Kernel { family: "geglu", sources: &[ACTIVATIONS_WGSL, GEGLU_WGSL], entry: "main", dtype, defs: &[] };
    let p = GegluParams { rows: rows as u32, d: d as u32 };
    gpu.dispatch(&kernel, bytes_of(&p), &[Bind::whole(x), Bind::whole(&out)], elementwise_grid(gpu, rows * d))?;
    Ok(out)
}

/// CPU reference of broadcasting binary ops.
pub fn binary_reference(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize], f: impl Fn(f64, f64) -> f64) -> (Vec<f32>, Vec<usize>) {
    let shape = broadcast_shape(sa, sb).expect("broadcastable");
    let n: usize = shape.iter().product();
    let index = |s: &[usize], mut i: usize| {
        let mut off = 0;
        let mut stride = 1;
        for k in (0..shape.len()).rev() {
            let c = i % shape[k];
            i /= shape[k];
            let j = k as isize - (shape.len() - s.len()) as isize;
            if j >= 0 && s[j as usize] != 1 {
                off += c * stride;
            }
            if j >= 0 {
                stride *= s[j as usize];
            }
        }
        off
    };
    ((0..n).map(|i| f(a[index(sa, i)] as f64, b[index(sb, i)] as f64) as f32).collect(), shape)
}

/// CPU reference of [`geglu`].
pub fn geglu_reference(x: &[f32], two_d: usize) -> Vec<f32> {
    let d = two_d / 2;
    x.chunks(two_d).flat_map(|r| (0..d).map(move |j| (r[j] as f64 * Activation::Gelu.apply(r[d + j] as f64)) as f32)).collect()
}
