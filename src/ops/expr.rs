//! Elementwise expressions over a few tensors: the schedulers' step arithmetic, classifier-free
//! guidance and latent blending, each a short formula such as `(x - c0 * e) / c1`.
//!
//! An [`Expr`] is written with the ordinary operators on inputs and `f32` constants. On the GPU
//! one kernel is generated per expression *shape* (constants are parameters, so every step of a
//! schedule reuses it); [`Expr::eval`] is the CPU reference, evaluating the same f32 operations in
//! the same order, which is what the schedulers' host path runs.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

use super::{bytes_of, elementwise_grid};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Def, Gpu, Kernel, Tensor};

/// Most inputs one expression reads (storage bindings: inputs and the output within WebGPU's 8).
pub const MAX_INPUTS: usize = 6;
/// Most constants one expression holds.
pub const MAX_CONSTS: usize = 32;

/// An elementwise formula in f32.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// Input `k`'s element (see [`ExprInput`] for which).
    Input(usize),
    Const(f32),
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    /// `min(max(x, lo), hi)` (torch's `clamp`).
    Clamp(Box<Expr>, f32, f32),
    /// `e^x` (sigmoids in gradients).
    Exp(Box<Expr>),
    /// `sqrt(x)` (Adam's denominator).
    Sqrt(Box<Expr>),
    /// The error function (GELU's gradient); the kernel's is Abramowitz & Stegun 7.1.26
    /// (|error| < 1.5e-7), the CPU reference libm's.
    Erf(Box<Expr>),
}

impl Expr {
    /// Input `k`.
    pub fn input(k: usize) -> Expr {
        Expr::Input(k)
    }

    /// `self.clamp(lo, hi)`.
    pub fn clamp(self, lo: f32, hi: f32) -> Expr {
        Expr::Clamp(Box::new(self), lo, hi)
    }

    /// `e^self`.
    pub fn exp(self) -> Expr {
        Expr::Exp(Box::new(self))
    }

    /// `sqrt(self)`.
    pub fn sqrt(self) -> Expr {
        Expr::Sqrt(Box::new(self))
    }

    /// `erf(self)`.
    pub fn erf(self) -> Expr {
        Expr::Erf(Box::new(self))
    }

    /// `1 / (1 + e^-self)`.
    pub fn sigmoid(self) -> Expr {
        1.0 / (1.0 + (-self).exp())
    }

    /// `c0 * x0 + c1 * x1 + ...`, left to right as torch evaluates the sum.
    pub fn lincomb(terms: Vec<(f32, Expr)>) -> Expr {
        let mut it = terms.into_iter();
        let Some((c, x)) = it.next() else { return Expr::Const(0.0) };
        it.fold(c * x, |acc, (c, x)| acc + c * x)
    }

    /// How many inputs it reads (one past the largest index).
    pub fn inputs(&self) -> usize {
        match self {
            Expr::Input(k) => k + 1,
            Expr::Const(_) => 0,
            Expr::Neg(a) | Expr::Clamp(a, ..) | Expr::Exp(a) | Expr::Sqrt(a) | Expr::Erf(a) => a.inputs(),
            Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => a.inputs().max(b.inputs()),
        }
    }

    /// The value at one element, given its inputs' values (the CPU reference).
    pub fn at(&self, x: &[f32]) -> f32 {
        match self {
            Expr::Input(k) => x[*k],
            Expr::Const(c) => *c,
            Expr::Neg(a) => -a.at(x),
            Expr::Add(a, b) => a.at(x) + b.at(x),
            Expr::Sub(a, b) => a.at(x) - b.at(x),
            Expr::Mul(a, b) => a.at(x) * b.at(x),
            Expr::Div(a, b) => a.at(x) / b.at(x),
            Expr::Clamp(a, lo, hi) => a.at(x).max(*lo).min(*hi),
            Expr::Exp(a) => a.at(x).exp(),
            Expr::Sqrt(a) => a.at(x).sqrt(),
            Expr::Erf(a) => libm::erff(a.at(x)),
        }
    }

    /// Evaluates `n` elements on the CPU; input `k` is `inputs[k]` read through its index map.
    pub fn eval(&self, n: usize, inputs: &[(&[f32], IndexMap)]) -> Result<Vec<f32>> {
        self.check(inputs.len())?;
        for (k, (data, map)) in inputs.iter().enumerate() {
            map.check(n, data.len(), k)?;
        }
        let mut x = vec![0.0; inputs.len()];
        Ok((0..n)
            .map(|i| {
                for (v, (data, map)) in x.iter_mut().zip(inputs) {
                    *v = data[map.at(i)];
                }
                self.at(&x)
            })
            .collect())
    }

    fn check(&self, given: usize) -> Result<()> {
        if self.inputs() > given {
            return Err(Error::Shape(format!("an expression reads {} inputs, {given} given", self.inputs())));
        }
        if given > MAX_INPUTS {
            return Err(Error::Unsupported(format!("an expression of {given} inputs (at most {MAX_INPUTS})")));
        }
        Ok(())
    }

    /// Marks the inputs it reads.
    fn mark_inputs(&self, used: &mut [bool]) {
        match self {
            Expr::Input(k) => used[*k] = true,
            Expr::Const(_) => {}
            Expr::Neg(a) | Expr::Clamp(a, ..) | Expr::Exp(a) | Expr::Sqrt(a) | Expr::Erf(a) => a.mark_inputs(used),
            Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                a.mark_inputs(used);
                b.mark_inputs(used);
            }
        }
    }

    /// WGSL for the value, constants numbered in visiting order into `consts`; input `k` is
    /// binding `slot[k]`.
    fn wgsl(&self, out: &mut String, consts: &mut Vec<f32>, slot: &[usize]) {
        let bin = |a: &Expr, op: &str, b: &Expr, out: &mut String, consts: &mut Vec<f32>| {
            out.push('(');
            a.wgsl(out, consts, slot);
            let _ = write!(out, " {op} ");
            b.wgsl(out, consts, slot);
            out.push(')');
        };
        match self {
            Expr::Input(k) => {
                let _ = write!(out, "x{}(i)", slot[*k]);
            }
            Expr::Const(c) => {
                let k = consts.len();
                consts.push(*c);
                let _ = write!(out, "p.c[{}][{}]", k / 4, k % 4);
            }
            Expr::Neg(a) => {
                out.push_str("(-");
                a.wgsl(out, consts, slot);
                out.push(')');
            }
            Expr::Add(a, b) => bin(a, "+", b, out, consts),
            Expr::Sub(a, b) => bin(a, "-", b, out, consts),
            Expr::Mul(a, b) => bin(a, "*", b, out, consts),
            Expr::Div(a, b) => bin(a, "/", b, out, consts),
            Expr::Clamp(a, lo, hi) => {
                // min(max()) as torch's clamp (WGSL's clamp leaves lo > hi undefined).
                out.push_str("min(max(");
                a.wgsl(out, consts, slot);
                let k = consts.len();
                consts.extend([*lo, *hi]);
                let _ = write!(out, ", p.c[{}][{}]), p.c[{}][{}])", k / 4, k % 4, (k + 1) / 4, (k + 1) % 4);
            }
            Expr::Exp(a) | Expr::Sqrt(a) | Expr::Erf(a) => {
                out.push_str(match self {
                    Expr::Exp(_) => "exp(",
                    Expr::Sqrt(_) => "sqrt(",
                    _ => "erf_f32(",
                });
                a.wgsl(out, consts, slot);
                out.push(')');
            }
        }
    }
}

macro_rules! binary {
    ($trait:ident, $method:ident, $variant:ident) => {
        impl std::ops::$trait for Expr {
            type Output = Expr;
            fn $method(self, rhs: Expr) -> Expr {
                Expr::$variant(Box::new(self), Box::new(rhs))
            }
        }
        impl std::ops::$trait<f32> for Expr {
            type Output = Expr;
            fn $method(self, rhs: f32) -> Expr {
                Expr::$variant(Box::new(self), Box::new(Expr::Const(rhs)))
            }
        }
        impl std::ops::$trait<Expr> for f32 {
            type Output = Expr;
            fn $method(self, rhs: Expr) -> Expr {
                Expr::$variant(Box::new(Expr::Const(self)), Box::new(rhs))
            }
        }
        impl std::ops::$trait<&Expr> for &Expr {
            type Output = Expr;
            fn $method(self, rhs: &Expr) -> Expr {
                Expr::$variant(Box::new(self.clone()), Box::new(rhs.clone()))
            }
        }
    };
}
binary!(Add, add, Add);
binary!(Sub, sub, Sub);
binary!(Mul, mul, Mul);
binary!(Div, div, Div);

impl std::ops::Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        Expr::Neg(Box::new(self))
    }
}

/// Which element of an input output element `i` reads: `offset + (i / div) % modulo`. The
/// default (`div` 1, `modulo` = the output's length) reads element `i`; `modulo` smaller than the
/// output repeats the input (a mask over every latent channel), `div` > 1 holds one value for a
/// run of outputs (a value per row), `offset` starts further in (the second half of a batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexMap {
    pub offset: usize,
    pub div: usize,
    pub modulo: usize,
}

impl IndexMap {
    /// Element `i` of an input as long as the output.
    pub fn same(n: usize) -> Self {
        IndexMap { offset: 0, div: 1, modulo: n.max(1) }
    }

    /// Elements `offset..offset + n`.
    pub fn from(offset: usize, n: usize) -> Self {
        IndexMap { offset, div: 1, modulo: n.max(1) }
    }

    /// Element `i % period` (one input broadcast along the output).
    pub fn repeat(period: usize) -> Self {
        IndexMap { offset: 0, div: 1, modulo: period.max(1) }
    }

    /// Element `i / run` (one input value for each run of `run` outputs), of `count` values.
    pub fn per(run: usize, count: usize) -> Self {
        IndexMap { offset: 0, div: run.max(1), modulo: count.max(1) }
    }

    pub fn at(&self, i: usize) -> usize {
        self.offset + (i / self.div) % self.modulo
    }

    fn check(&self, n: usize, len: usize, k: usize) -> Result<()> {
        if self.div == 0 || self.modulo == 0 {
            return Err(Error::Shape(format!("expression input {k}: zero div or modulo")));
        }
        let last = if n == 0 { 0 } else { self.offset + ((n - 1) / self.div).min(self.modulo - 1) };
        if n > 0 && last >= len {
            return Err(Error::Shape(format!("expression input {k} has {len} elements; element {last} is read")));
        }
        if [self.offset, self.div, self.modulo, n].iter().any(|&v| v > u32::MAX as usize) {
            return Err(Error::Unsupported(format!("expression input {k}: sizes past 2^32")));
        }
        Ok(())
    }
}

/// One input of [`expr`]: a float tensor read through an [`IndexMap`].
pub struct ExprInput<'a> {
    pub tensor: &'a Tensor,
    pub map: IndexMap,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ExprParams {
    n: u32,
    _pad: [u32; 3],
    /// Per input: offset, div, modulo, unused.
    maps: [[u32; 4]; MAX_INPUTS],
    c: [[f32; 4]; MAX_CONSTS / 4],
}

/// The generated kernel of an expression shape: WGSL text and a number naming it in the
/// pipeline cache (a handful per process: one per scheduler formula).
fn kernel_source(key: String, generate: impl FnOnce() -> String) -> (&'static str, u32) {
    static CACHE: OnceLock<Mutex<HashMap<String, (&'static str, u32)>>> = OnceLock::new();
    let mut map = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let next = map.len() as u32;
    *map.entry(key).or_insert_with(|| (Box::leak(generate().into_boxed_str()), next))
}

/// Evaluates `e` for `n` elements on the GPU into a new tensor of `shape` and `dtype` (f32 or
/// f16); inputs may be f32 or f16, the arithmetic is f32.
pub fn expr(gpu: &Gpu, e: &Expr, inputs: &[ExprInput], shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    e.check(inputs.len())?;
    for (k, x) in inputs.iter().enumerate() {
        super::check_float(x.tensor, "expression")?;
        x.map.check(n, x.tensor.numel(), k)?;
    }
    if gpu.is_cpu() {
        return super::host::expr(gpu, e, inputs, shape);
    }
    let out = gpu.empty(shape, dtype)?;
    super::check_float(&out, "expression")?;
    // Only the inputs the expression reads are bound (a pipeline's layout drops unread bindings).
    let mut used = vec![false; inputs.len()];
    e.mark_inputs(&mut used);
    let inputs: Vec<&ExprInput> = inputs.iter().zip(&used).filter(|(_, &u)| u).map(|(x, _)| x).collect();
    let slot: Vec<usize> = used.iter().scan(0, |next, &u| { let s = *next; *next += u as usize; Some(s) }).collect();
    let mut body = String::new();
    let mut consts = Vec::new();
    e.wgsl(&mut body, &mut consts, &slot);
    if consts.len() > MAX_CONSTS {
        return Err(Error::Unsupported(format!("an expression with {} constants (at most {MAX_CONSTS})", consts.len())));
    }
    let ty = |d: DType| d.info().wgsl.unwrap_or("f32");
    let types: Vec<&str> = inputs.iter().map(|x| ty(x.tensor.dtype())).collect();
    let key = format!("{}|{}|{body}", types.join(","), ty(dtype));
    let (source, id) = kernel_source(key, || {
        let mut s = String::new();
        let _ = writeln!(s, "struct P {{ n: u32, pad0: u32, pad1: u32, pad2: u32, maps: array<vec4<u32>, {MAX_INPUTS}>, c: array<vec4<f32>, {}> }}", MAX_CONSTS / 4);
        s.push_str("@group(0) @binding(0) var<uniform> p: P;\n");
        for (k, t) in types.iter().enumerate() {
            let _ = writeln!(s, "@group(0) @binding({}) var<storage, read> in{k}: array<{t}>;", k + 1);
            let _ = writeln!(s, "fn x{k}(i: u32) -> f32 {{ let m = p.maps[{k}]; return f32(in{k}[m.x + (i / m.y) % m.z]); }}");
        }
        let _ = writeln!(s, "@group(0) @binding({}) var<storage, read_write> y: array<{}>;", types.len() + 1, ty(dtype));
        let _ = writeln!(s, "@compute @workgroup_size(256)");
        let _ = writeln!(s, "fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{");
        let _ = writeln!(s, "    let i = gid.x + gid.y * nwg.x * 256u;");
        let _ = writeln!(s, "    if (i >= p.n) {{ return; }}");
        let _ = writeln!(s, "    y[i] = {}({body});", ty(dtype));
        s.push_str("}\n");
        s
    });
    let mut p = ExprParams { n: n as u32, _pad: [0; 3], maps: [[0, 1, 1, 0]; MAX_INPUTS], c: [[0.0; 4]; MAX_CONSTS / 4] };
    for (k, x) in inputs.iter().enumerate() {
        p.maps[k] = [x.map.offset as u32, x.map.div as u32, x.map.modulo as u32, 0];
    }
    for (k, c) in consts.iter().enumerate() {
        p.c[k / 4][k % 4] = *c;
    }
    let defs = [("EXPR", Def::U32(id))];
    // The header's T is unused; an f16 one enables f16 for whichever binding holds it.
    let any_f16 = dtype == DType::F16 || inputs.iter().any(|x| x.tensor.dtype() == DType::F16);
    // activations.wgsl brings erf_f32.
    let kernel = Kernel { family: "expr", sources: &[super::ACTIVATIONS_WGSL, source], entry: "main", dtype: if any_f16 { DType::F16 } else { DType::F32 }, defs: &defs };
    let mut binds: Vec<Bind> = inputs.iter().map(|x| Bind::whole(x.tensor)).collect();
    binds.push(Bind::whole(&out));
    gpu.dispatch(&kernel, bytes_of(&p), &binds, elementwise_grid(gpu, n))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_build_the_tree_and_evaluate_in_order() {
        let (x, e) = (Expr::input(0), Expr::input(1));
        let f = (x.clone() - 0.5 * e.clone()) / 2.0;
        assert_eq!(f.inputs(), 2);
        assert_eq!(f.at(&[3.0, 2.0]), 1.0);
        let l = Expr::lincomb(vec![(2.0, x.clone()), (3.0, e.clone()), (-1.0, x.clone())]);
        assert_eq!(l.at(&[1.0, 1.0]), 4.0);
        assert_eq!((-x).clamp(-1.0, 1.0).at(&[5.0]), -1.0);
    }

    #[test]
    fn index_maps_read_the_documented_elements() {
        let data: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let e = Expr::input(0) + Expr::input(1) * 100.0;
        let out = e.eval(4, &[(&data, IndexMap::from(4, 4)), (&data, IndexMap::per(2, 2))]).unwrap();
        assert_eq!(out, vec![4.0, 5.0, 106.0, 107.0]);
        assert!(e.eval(4, &[(&data, IndexMap::from(6, 4)), (&data, IndexMap::same(4))]).is_err(), "reads past the end");
        assert!(e.eval(4, &[(&data, IndexMap::same(4))]).is_err(), "too few inputs");
    }

    #[test]
    fn unread_inputs_are_not_bound() {
        let e = Expr::input(2) * 2.0;
        let mut used = vec![false; 3];
        e.mark_inputs(&mut used);
        assert_eq!(used, vec![false, false, true]);
        let (mut s, mut c) = (String::new(), Vec::new());
        e.wgsl(&mut s, &mut c, &[0, 0, 0]);
        assert_eq!(s, "(x0(i) * p.c[0][0])");
    }

    #[test]
    fn wgsl_names_constants_in_order() {
        let e = (Expr::input(0) - 0.25 * Expr::input(1)).clamp(-1.0, 1.0);
        let (mut s, mut c) = (String::new(), Vec::new());
        e.wgsl(&mut s, &mut c, &[0, 1]);
        assert_eq!(c, vec![0.25, -1.0, 1.0]);
        assert_eq!(s, "min(max((x0(i) - (p.c[0][0] * x1(i))), p.c[0][1]), p.c[0][2])");
    }
}
