//! Reverse-mode gradients over the engine's ops, for training on the user's device.
//!
//! A [`Tape`] records each operation on [`Var`]s together with the rule that turns the gradient
//! of its output into gradients of its inputs; [`Tape::backward`] replays the tape in reverse and
//! sums the gradients of values used more than once. Values and gradients are engine tensors, and
//! every rule is written with the forward ops (matrix products over transposed views, elementwise
//! expressions), so gradients run on WebGPU and on the CPU backend alike and each piece has the
//! CPU reference its op already has. A rule computes in its values' dtype: f32, or f16 under
//! mixed precision ([`Tape::with_compute`]).

pub mod optim;

use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::{self, Activation, ColGeometry, Conv2dSpec, Expr, ExprInput, IndexMap, MatView, MatmulSpec};

/// Ops that record themselves on a tape from their inputs ([`Tape::checkpoint`]'s block).
pub type Recorded = Rc<dyn Fn(&mut Tape, &[Var]) -> Result<Var>>;

/// A value on a [`Tape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(usize);

/// Gradients of an op's inputs (in input order; `None` for one that needs none) from its output's.
type Rule = Box<dyn Fn(&Gpu, &Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    value: Tensor,
    inputs: Vec<Var>,
    rule: Option<Rule>,
    needs_grad: bool,
}

/// The operations of one forward pass, in order.
pub struct Tape<'g> {
    gpu: &'g Gpu,
    nodes: Vec<Node>,
    /// What the layers run in ([`Tape::autocast`]): f32, or f16 for mixed precision.
    compute: DType,
}

/// The gradients [`Tape::backward`] found, by variable.
pub struct Grads {
    grads: Vec<Option<Tensor>>,
}

impl Grads {
    /// The gradient of the loss with respect to `v` (`None` where the loss does not depend on it
    /// or `v` needs no gradient).
    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.grads.get(v.0).and_then(Option::as_ref)
    }
}

fn check_float(t: &Tensor, what: &str) -> Result<()> {
    if !matches!(t.dtype(), DType::F32 | DType::F16) {
        return Err(Error::Unsupported(format!("training computes in f32 or f16; {what} is {}", t.dtype().name())));
    }
    Ok(())
}

/// `1 x n` ones of `dtype` (sums as matrix products).
fn ones(gpu: &Gpu, n: usize, dtype: DType) -> Result<Tensor> {
    gpu.constant(&format!("autograd/ones/{n}/{}", dtype.name()), &[1, n], dtype, || vec![1.0; n])
}

/// Column sums of a row-major `rows x cols` matrix: `[cols]`.
fn column_sums(gpu: &Gpu, x: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    let one = ones(gpu, rows, x.dtype())?;
    let spec = MatmulSpec {
        a: MatView::packed(&one, 1, rows), b: MatView::packed(x, rows, cols), m: 1, n: cols, k: rows, batch: 1,
        alpha: 1.0, bias: None, act: Activation::None, residual: None,
    };
    ops::matmul_spec(gpu, &spec)?.reshape(&[cols])
}

/// `a · b` for `batch` matrix pairs: `[batch, m, n]`.
fn batched_product(gpu: &Gpu, batch: usize, a: MatView, b: MatView, m: usize, n: usize, k: usize) -> Result<Tensor> {
    ops::matmul_spec(gpu, &MatmulSpec { a, b, m, n, k, batch, alpha: 1.0, bias: None, act: Activation::None, residual: None })?.reshape(&[batch, m, n])
}

/// Image `n` of a `[B, rows, cols]` tensor as a matrix.
fn image_view(t: &Tensor, n: usize, rows: usize, cols: usize) -> MatView<'_> {
    MatView { tensor: t, base: n * rows * cols, batch_stride: 0, row_stride: cols, col_stride: 1 }
}

/// Row sums of a row-major `rows x cols` matrix times `scale`: `[rows]`.
fn row_sums(gpu: &Gpu, x: &Tensor, rows: usize, cols: usize, scale: f32) -> Result<Tensor> {
    let one = ones(gpu, cols, x.dtype())?;
    let spec = MatmulSpec {
        a: MatView::packed(x, rows, cols), b: MatView::packed(&one, cols, 1), m: rows, n: 1, k: cols, batch: 1,
        alpha: scale, bias: None, act: Activation::None, residual: None,
    };
    ops::matmul_spec(gpu, &spec)?.reshape(&[rows])
}

/// x̂ = (x - mean) / sqrt(var + eps) over `units` contiguous runs of `len` values, and the
/// per-run 1 / sqrt(var + eps) (`[units]`), as the normalisation kernels compute them.
fn normalized(gpu: &Gpu, x: &Tensor, units: usize, len: usize, eps: f32) -> Result<(Tensor, Tensor)> {
    let e = |k: usize| Expr::input(k);
    let (same, per_unit) = (IndexMap::same(x.numel()), IndexMap::per(len, units));
    let on = |f: &Expr, ins: &[(&Tensor, IndexMap)]| -> Result<Tensor> {
        let ins: Vec<ExprInput> = ins.iter().map(|(t, map)| ExprInput { tensor: t, map: *map }).collect();
        ops::expr(gpu, f, &ins, x.shape(), x.dtype())
    };
    let mean = row_sums(gpu, x, units, len, 1.0 / len as f32)?;
    let centred = on(&(e(0) - e(1)), &[(x, same), (&mean, per_unit)])?;
    let sq = on(&(e(0) * e(0)), &[(&centred, same)])?;
    let var = row_sums(gpu, &sq, units, len, 1.0 / len as f32)?;
    let rstd = ops::expr(gpu, &(1.0 / (e(0) + eps).sqrt()), &[ExprInput { tensor: &var, map: IndexMap::same(units) }], &[units], x.dtype())?;
    let xhat = on(&(e(0) * e(1)), &[(&centred, same), (&rstd, per_unit)])?;
    Ok((xhat, rstd))
}

/// The input gradient of a normalisation from the gradient of x̂:
/// dx = rstd (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)), means per run.
fn normalized_input_grad(gpu: &Gpu, dxhat: &Tensor, xhat: &Tensor, rstd: &Tensor, units: usize, len: usize) -> Result<Tensor> {
    let e = |k: usize| Expr::input(k);
    let (same, per_unit) = (IndexMap::same(xhat.numel()), IndexMap::per(len, units));
    let m1 = row_sums(gpu, dxhat, units, len, 1.0 / len as f32)?;
    let dxx = elementwise(gpu, &(e(0) * e(1)), &[dxhat, xhat])?;
    let m2 = row_sums(gpu, &dxx, units, len, 1.0 / len as f32)?;
    let ins = [
        ExprInput { tensor: dxhat, map: same }, ExprInput { tensor: xhat, map: same },
        ExprInput { tensor: &m1, map: per_unit }, ExprInput { tensor: &m2, map: per_unit }, ExprInput { tensor: rstd, map: per_unit },
    ];
    ops::expr(gpu, &(e(4) * (e(0) - e(2) - e(1) * e(3))), &ins, xhat.shape(), xhat.dtype())
}

/// `t` in `dtype` (itself when it already is).
fn to_dtype(gpu: &Gpu, t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: t, map: IndexMap::same(t.numel()) }], t.shape(), dtype)
}

/// An elementwise expression over same-sized tensors, shaped and typed like the first.
fn elementwise(gpu: &Gpu, f: &Expr, xs: &[&Tensor]) -> Result<Tensor> {
    let n = xs[0].numel();
    let ins: Vec<ExprInput> = xs.iter().map(|t| ExprInput { tensor: t, map: IndexMap::same(n) }).collect();
    ops::expr(gpu, f, &ins, xs[0].shape(), xs[0].dtype())
}

impl<'g> Tape<'g> {
    /// An empty tape on `gpu`, computing in f32.
    pub fn new(gpu: &'g Gpu) -> Self {
        Self { gpu, nodes: Vec::new(), compute: DType::F32 }
    }

    /// An empty tape whose layers run in `compute` (f16: mixed precision, as torch's autocast
    /// with f16 activations: the layers cast their inputs and f32 master weights with
    /// [`Self::autocast`]; normalisation and softmax kernels and their gradients take their
    /// statistics in f32, and the loss is computed in f32).
    pub fn with_compute(gpu: &'g Gpu, compute: DType) -> Result<Self> {
        if compute == DType::F16 && !gpu.supports(DType::F16) {
            return Err(Error::Unsupported(format!("mixed precision needs f16 kernels (shader-f16), which {} does not have; train in f32", gpu.summary().name)));
        }
        if !matches!(compute, DType::F32 | DType::F16) {
            return Err(Error::Unsupported(format!("training computes in f32 or f16, not {}", compute.name())));
        }
        Ok(Self { gpu, nodes: Vec::new(), compute })
    }

    /// The dtype the layers run in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// `x` in `dtype` (itself when it already is); the gradient is cast back to `x`'s dtype.
    pub fn cast(&mut self, x: Var, dtype: DType) -> Result<Var> {
        let from = self.value(x).dtype();
        if from == dtype {
            return Ok(x);
        }
        let y = to_dtype(self.gpu, self.value(x), dtype)?;
        Ok(self.push(y, vec![x], Box::new(move |gpu, g| Ok(vec![Some(to_dtype(gpu, g, from)?)]))))
    }

    /// `x` in the tape's compute dtype (a layer's input or weight).
    pub fn autocast(&mut self, x: Var) -> Result<Var> {
        self.cast(x, self.compute)
    }

    fn push(&mut self, value: Tensor, inputs: Vec<Var>, rule: Rule) -> Var {
        let needs_grad = inputs.iter().any(|v| self.nodes[v.0].needs_grad);
        self.nodes.push(Node { value, inputs, rule: needs_grad.then_some(rule), needs_grad });
        Var(self.nodes.len() - 1)
    }

    fn leaf(&mut self, value: Tensor, needs_grad: bool) -> Result<Var> {
        check_float(&value, "a tape input")?;
        self.nodes.push(Node { value, inputs: Vec::new(), rule: None, needs_grad });
        Ok(Var(self.nodes.len() - 1))
    }

    fn needs_grad(&self, v: Var) -> bool {
        self.nodes[v.0].needs_grad
    }

    /// A value the loss is differentiated with respect to (a parameter).
    pub fn param(&mut self, value: Tensor) -> Result<Var> {
        self.leaf(value, true)
    }

    /// A value that needs no gradient (data, targets, frozen weights).
    pub fn constant(&mut self, value: Tensor) -> Result<Var> {
        self.leaf(value, false)
    }

    /// The device the tape records on.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// The value of `v`.
    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    fn same_shape(&self, a: Var, b: Var, op: &str) -> Result<()> {
        let (sa, sb) = (self.value(a).shape(), self.value(b).shape());
        if sa != sb {
            return Err(Error::Shape(format!("{op} of {sa:?} and {sb:?}: the shapes must be equal")));
        }
        Ok(())
    }

    /// `x · wᵀ + b` over the last axis (torch's `F.linear`): x `[.., in]`, w `[out, in]`, b `[out]`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let (xt, wt) = (self.value(x).clone(), self.value(w).clone());
        let bt = b.map(|b| self.value(b).clone());
        let y = ops::linear(self.gpu, &xt, &wt, bt.as_ref(), Activation::None)?;
        let (out_f, in_f) = (wt.dim(0), wt.dim(1));
        let rows = xt.numel() / in_f;
        let has_bias = b.is_some();
        let (need_x, need_w, need_b) = (self.needs_grad(x), self.needs_grad(w), b.is_some_and(|b| self.needs_grad(b)));
        let mut inputs = vec![x, w];
        inputs.extend(b);
        let rule: Rule = Box::new(move |gpu, g| {
            // dx = g · w, dw = gᵀ · x, db = column sums of g; frozen weights (LoRA's base) and
            // data get none.
            let dx = need_x.then(|| ops::matmul_spec(gpu, &MatmulSpec {
                a: MatView::packed(g, rows, out_f), b: MatView::packed(&wt, out_f, in_f).broadcast(), m: rows, n: in_f, k: out_f,
                batch: 1, alpha: 1.0, bias: None, act: Activation::None, residual: None,
            })?.reshape(xt.shape())).transpose()?;
            let dw = need_w.then(|| ops::matmul_spec(gpu, &MatmulSpec {
                a: MatView::transposed(g, out_f, rows), b: MatView::packed(&xt, rows, in_f), m: out_f, n: in_f, k: rows,
                batch: 1, alpha: 1.0, bias: None, act: Activation::None, residual: None,
            })?.reshape(&[out_f, in_f])).transpose()?;
            let mut grads = vec![dx, dw];
            if has_bias {
                grads.push(need_b.then(|| column_sums(gpu, g, rows, out_f)).transpose()?);
            }
            Ok(grads)
        });
        Ok(self.push(y, inputs, rule))
    }

    /// A 2-D convolution (torch's `F.conv2d`): x `[B, Cin, H, W]`, w `[Cout, Cin, KH, KW]`, b
    /// `[Cout]`. The gradients go through convolution columns: dw = Σ g · colsᵀ, dx =
    /// col2im(wᵀ · g), db = Σ g.
    pub fn conv2d(&mut self, x: Var, w: Var, b: Option<Var>, spec: Conv2dSpec) -> Result<Var> {
        if spec.act != Activation::None {
            return Err(Error::Unsupported("a convolution with a fused activation on a tape: apply the activation as its own op".into()));
        }
        let (xt, wt) = (self.value(x).clone(), self.value(w).clone());
        let bt = b.map(|b| self.value(b).clone());
        let y = ops::conv2d(self.gpu, &xt, &wt, bt.as_ref(), &spec, None)?;
        let &[cout, cin, kh, kw] = wt.shape() else { return Err(Error::Shape(format!("conv2d weight {:?}", wt.shape()))) };
        let geo = ColGeometry::new(xt.shape(), kh, kw, &spec)?;
        let (batch, kk, p) = (geo.b, cin * kh * kw, geo.oh * geo.ow);
        let has_bias = b.is_some();
        let (need_x, need_w) = (self.needs_grad(x), self.needs_grad(w) || b.is_some_and(|b| self.needs_grad(b)));
        let mut inputs = vec![x, w];
        inputs.extend(b);
        let rule: Rule = Box::new(move |gpu, g| {
            let dx = if need_x {
                let dcols = ops::matmul_spec(gpu, &MatmulSpec {
                    a: MatView::transposed(&wt, kk, cout).broadcast(),
                    b: MatView { tensor: g, base: 0, batch_stride: cout * p, row_stride: p, col_stride: 1 },
                    m: kk, n: p, k: cout, batch, alpha: 1.0, bias: None, act: Activation::None, residual: None,
                })?.reshape(&geo.cols_shape())?;
                Some(ops::col2im(gpu, &dcols, xt.shape(), kh, kw, &spec)?)
            } else {
                None
            };
            // Frozen weights (LoRA's base): only the input's gradient.
            if !need_w {
                let mut grads = vec![dx, None];
                grads.extend(has_bias.then_some(None));
                return Ok(grads);
            }
            let cols = ops::im2col(gpu, &xt, kh, kw, &spec)?;
            let one = ones(gpu, p, g.dtype())?;
            let (mut dw, mut db): (Option<Tensor>, Option<Tensor>) = (None, None);
            for n in 0..batch {
                // cols[n]ᵀ: [p, kk] read from the [kk, p] block.
                let cols_t = MatView { tensor: &cols, base: n * kk * p, batch_stride: 0, row_stride: 1, col_stride: p };
                dw = Some(ops::matmul_spec(gpu, &MatmulSpec {
                    a: image_view(g, n, cout, p), b: cols_t, m: cout, n: kk, k: p, batch: 1,
                    alpha: 1.0, bias: None, act: Activation::None, residual: dw.as_ref(),
                })?);
                if has_bias {
                    db = Some(ops::matmul_spec(gpu, &MatmulSpec {
                        a: image_view(g, n, cout, p), b: MatView::packed(&one, p, 1), m: cout, n: 1, k: p, batch: 1,
                        alpha: 1.0, bias: None, act: Activation::None, residual: db.as_ref(),
                    })?);
                }
            }
            let dw = dw.ok_or_else(|| Error::Shape("conv2d of an empty batch".into()))?.reshape(&[cout, cin, kh, kw])?;
            let mut grads = vec![dx, Some(dw)];
            if let Some(db) = db {
                grads.push(Some(db.reshape(&[cout])?));
            }
            Ok(grads)
        });
        Ok(self.push(y, inputs, rule))
    }

    /// Group normalisation over `[B, C, ...]` (torch's `F.group_norm`), gamma and beta `[C]`. The
    /// value is the engine's kernel; the gradient recomputes the normalised input from group sums:
    /// dx = rstd (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)) with dx̂ = γ g, per group.
    pub fn group_norm(&mut self, x: Var, groups: usize, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        let (xt, gt, bt) = (self.value(x).clone(), self.value(gamma).clone(), self.value(beta).clone());
        let y = ops::group_norm(self.gpu, &xt, groups, &gt, &bt, eps, false)?;
        let (b, c) = (xt.dim(0), xt.dim(1));
        let hw = xt.numel() / (b * c);
        let (units, len) = (b * groups, c / groups * hw);
        let n = xt.numel();
        let rule: Rule = Box::new(move |gpu, g| {
            // In f32 whatever the values' dtype (f16 under mixed precision: the statistics need
            // the range), cast back at the end.
            let (dtype, wtype) = (xt.dtype(), gt.dtype());
            let (xt, g, gt) = (&to_dtype(gpu, &xt, DType::F32)?, &to_dtype(gpu, g, DType::F32)?, to_dtype(gpu, &gt, DType::F32)?);
            let e = |k: usize| Expr::input(k);
            let same = IndexMap::same(n);
            let (xhat, rstd) = normalized(gpu, xt, units, len, eps)?;
            // Per channel: dγ = Σ g x̂, dβ = Σ g over images and positions.
            let gx = elementwise(gpu, &(e(0) * e(1)), &[g, &xhat])?;
            let channel_sums = |t: &Tensor| -> Result<Tensor> {
                // [B, C, HW] summed over HW, then over B.
                let per_image = row_sums(gpu, t, b * c, hw, 1.0)?;
                column_sums(gpu, &per_image, b, c)
            };
            let dgamma = channel_sums(&gx)?;
            let dbeta = channel_sums(g)?;
            let ins = [ExprInput { tensor: g, map: same }, ExprInput { tensor: &gt, map: IndexMap::per(hw, c) }];
            let dxhat = ops::expr(gpu, &(e(0) * e(1)), &ins, xt.shape(), xt.dtype())?;
            let dx = normalized_input_grad(gpu, &dxhat, &xhat, &rstd, units, len)?;
            Ok(vec![Some(to_dtype(gpu, &dx, dtype)?), Some(to_dtype(gpu, &dgamma, wtype)?), Some(to_dtype(gpu, &dbeta, wtype)?)])
        });
        Ok(self.push(y, vec![x, gamma, beta], rule))
    }

    /// Layer normalisation over the last axis with gamma and beta `[cols]` (torch's
    /// `F.layer_norm` over one dimension): dx as group norm's, dγ and dβ summed over rows.
    pub fn layer_norm(&mut self, x: Var, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        let (xt, gt, bt) = (self.value(x).clone(), self.value(gamma).clone(), self.value(beta).clone());
        let y = ops::layer_norm(self.gpu, &xt, Some((&gt, &bt)), eps)?;
        let cols = *xt.shape().last().ok_or_else(|| Error::Shape("layer_norm of a scalar".into()))?;
        let rows = xt.numel() / cols.max(1);
        let rule: Rule = Box::new(move |gpu, g| {
            let (dtype, wtype) = (xt.dtype(), gt.dtype());
            let (xt, g, gt) = (&to_dtype(gpu, &xt, DType::F32)?, &to_dtype(gpu, g, DType::F32)?, to_dtype(gpu, &gt, DType::F32)?);
            let e = |k: usize| Expr::input(k);
            let (xhat, rstd) = normalized(gpu, xt, rows, cols, eps)?;
            let gx = elementwise(gpu, &(e(0) * e(1)), &[g, &xhat])?;
            let dgamma = column_sums(gpu, &gx, rows, cols)?;
            let dbeta = column_sums(gpu, g, rows, cols)?;
            let ins = [ExprInput { tensor: g, map: IndexMap::same(rows * cols) }, ExprInput { tensor: &gt, map: IndexMap::repeat(cols) }];
            let dxhat = ops::expr(gpu, &(e(0) * e(1)), &ins, xt.shape(), xt.dtype())?;
            let dx = normalized_input_grad(gpu, &dxhat, &xhat, &rstd, rows, cols)?;
            Ok(vec![Some(to_dtype(gpu, &dx, dtype)?), Some(to_dtype(gpu, &dgamma, wtype)?), Some(to_dtype(gpu, &dbeta, wtype)?)])
        });
        Ok(self.push(y, vec![x, gamma, beta], rule))
    }

    /// Nearest-neighbour 2x upsampling of `[B, C, H, W]` (a UNet's `Upsample2D`); the gradient
    /// sums each 2x2 block (as convolution columns of the gradient, summed in fours).
    pub fn upsample_nearest2x(&mut self, x: Var) -> Result<Var> {
        let xt = self.value(x).clone();
        let y = ops::upsample_nearest2x(self.gpu, &xt)?;
        let shape = xt.shape().to_vec();
        let rule: Rule = Box::new(move |gpu, g| {
            let (planes, p) = (shape[0] * shape[1], shape[2] * shape[3]);
            let cols = ops::im2col(gpu, g, 2, 2, &Conv2dSpec::new(2, 0))?;
            let one = ones(gpu, 4, g.dtype())?;
            let dx = ops::matmul_spec(gpu, &MatmulSpec {
                a: MatView::packed(&one, 1, 4).broadcast(),
                b: MatView { tensor: &cols, base: 0, batch_stride: 4 * p, row_stride: p, col_stride: 1 },
                m: 1, n: p, k: 4, batch: planes, alpha: 1.0, bias: None, act: Activation::None, residual: None,
            })?;
            Ok(vec![Some(dx.reshape(&shape)?)])
        });
        Ok(self.push(y, vec![x], rule))
    }

    /// Concatenation along `dim` (a UNet's skip connections); each input's gradient is its part of
    /// the output's.
    pub fn concat(&mut self, xs: &[Var], dim: usize) -> Result<Var> {
        let ts: Vec<Tensor> = xs.iter().map(|v| self.value(*v).clone()).collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let y = ops::concat(self.gpu, &refs, dim)?;
        let shapes: Vec<Vec<usize>> = ts.iter().map(|t| t.shape().to_vec()).collect();
        let out_shape = y.shape().to_vec();
        let rule: Rule = Box::new(move |gpu, g| {
            let outer: usize = out_shape[..dim].iter().product();
            let inner: usize = out_shape[dim + 1..].iter().product();
            let total = out_shape[dim];
            let mut offset = 0;
            let mut grads = Vec::with_capacity(shapes.len());
            for shape in &shapes {
                let d = shape[dim];
                // One contiguous run per outer index, joined back along the outer axis.
                let runs: Vec<Tensor> = (0..outer).map(|o| ops::slice(gpu, g, (o * total + offset) * inner, &[1, d * inner])).collect::<Result<_>>()?;
                let part = if runs.len() == 1 { runs[0].clone() } else { ops::concat(gpu, &runs.iter().collect::<Vec<_>>(), 0)? };
                grads.push(Some(part.reshape(shape)?));
                offset += d;
            }
            Ok(grads)
        });
        Ok(self.push(y, xs.to_vec(), rule))
    }

    /// `x + t` with t `[B, C]` added to every position of x `[B, C, ...]` (a ResNet block's
    /// timestep embedding).
    pub fn add_per_channel(&mut self, x: Var, t: Var) -> Result<Var> {
        let (xt, tt) = (self.value(x).clone(), self.value(t).clone());
        let (b, c) = match xt.shape() {
            [b, c, ..] => (*b, *c),
            s => return Err(Error::Shape(format!("add_per_channel needs x [B, C, ...], got {s:?}"))),
        };
        if tt.shape() != [b, c] {
            return Err(Error::Shape(format!("add_per_channel of x {:?} needs t [{b}, {c}], got {:?}", xt.shape(), tt.shape())));
        }
        let n = xt.numel();
        let hw = n / (b * c).max(1);
        let ins = [ExprInput { tensor: &xt, map: IndexMap::same(n) }, ExprInput { tensor: &tt, map: IndexMap::per(hw, b * c) }];
        let y = ops::expr(self.gpu, &(Expr::input(0) + Expr::input(1)), &ins, xt.shape(), xt.dtype())?;
        let rule: Rule = Box::new(move |gpu, g| Ok(vec![Some(g.clone()), Some(row_sums(gpu, g, b * c, hw, 1.0)?.reshape(&[b, c])?)]));
        Ok(self.push(y, vec![x, t], rule))
    }

    /// `alpha * x` (a block's output scale factor).
    pub fn scale(&mut self, x: Var, alpha: f32) -> Result<Var> {
        let y = ops::scale(self.gpu, self.value(x), alpha, 0.0)?;
        Ok(self.push(y, vec![x], Box::new(move |gpu, g| Ok(vec![Some(ops::scale(gpu, g, alpha, 0.0)?)]))))
    }

    /// Batched matrix product `a · b` (or `a · bᵀ` with `transpose_b`): a `[B, M, K]`, b
    /// `[B, K, N]` (`[B, N, K]` transposed) -> `[B, M, N]` (attention's scores and values).
    pub fn bmm(&mut self, a: Var, b: Var, transpose_b: bool) -> Result<Var> {
        let (at, bt) = (self.value(a).clone(), self.value(b).clone());
        let (&[batch, m, k], &[bb, b1, b2]) = (at.shape(), bt.shape()) else {
            return Err(Error::Shape(format!("bmm needs [B, M, K] and [B, K, N], got {:?} and {:?}", at.shape(), bt.shape())));
        };
        let n = if transpose_b { b1 } else { b2 };
        if bb != batch || (if transpose_b { b2 } else { b1 }) != k {
            return Err(Error::Shape(format!("bmm of {:?} and {:?} (transpose_b {transpose_b})", at.shape(), bt.shape())));
        }
        // B as a `K x N` matrix per batch, read through its layout.
        let b_view = if transpose_b { MatView { tensor: &bt, base: 0, batch_stride: n * k, row_stride: 1, col_stride: k } } else { MatView::packed(&bt, k, n) };
        let y = batched_product(self.gpu, batch, MatView::packed(&at, m, k), b_view, m, n, k)?;
        let product = move |gpu: &Gpu, a: MatView, b: MatView, m: usize, n: usize, k: usize| batched_product(gpu, batch, a, b, m, n, k);
        let rule: Rule = Box::new(move |gpu, g| {
            // da = g · Bᵀ where B is the K x N operand; dB = aᵀ · g, laid out as b is.
            let b_t = if transpose_b { MatView::packed(&bt, n, k) } else { MatView { tensor: &bt, base: 0, batch_stride: k * n, row_stride: 1, col_stride: n } };
            let da = product(gpu, MatView::packed(g, m, n), b_t, m, k, n)?;
            let db = if transpose_b {
                // (aᵀ g)ᵀ = gᵀ a: [N, K].
                let g_t = MatView { tensor: g, base: 0, batch_stride: m * n, row_stride: 1, col_stride: n };
                product(gpu, g_t, MatView::packed(&at, m, k), n, k, m)?
            } else {
                let a_t = MatView { tensor: &at, base: 0, batch_stride: m * k, row_stride: 1, col_stride: k };
                product(gpu, a_t, MatView::packed(g, m, n), k, n, m)?
            };
            Ok(vec![Some(da), Some(db)])
        });
        Ok(self.push(y, vec![a, b], rule))
    }

    /// Softmax of `scale * x` over the last axis; the gradient is `scale * y (g - Σ g y)` per row.
    pub fn softmax(&mut self, x: Var, scale: f32) -> Result<Var> {
        let xt = self.value(x).clone();
        let y = ops::softmax(self.gpu, &xt, scale)?;
        let yt = y.clone();
        let cols = *xt.shape().last().ok_or_else(|| Error::Shape("softmax of a scalar".into()))?;
        let rows = xt.numel() / cols.max(1);
        let rule: Rule = Box::new(move |gpu, g| {
            let n = rows * cols;
            let dtype = yt.dtype();
            let (g, yt) = (&to_dtype(gpu, g, DType::F32)?, to_dtype(gpu, &yt, DType::F32)?);
            let gy = elementwise(gpu, &(Expr::input(0) * Expr::input(1)), &[g, &yt])?;
            let dot = row_sums(gpu, &gy, rows, cols, 1.0)?;
            let ins = [
                ExprInput { tensor: g, map: IndexMap::same(n) },
                ExprInput { tensor: &yt, map: IndexMap::same(n) },
                ExprInput { tensor: &dot, map: IndexMap::per(cols, rows) },
            ];
            let f = scale * Expr::input(1) * (Expr::input(0) - Expr::input(2));
            Ok(vec![Some(ops::expr(gpu, &f, &ins, yt.shape(), dtype)?)])
        });
        Ok(self.push(y, vec![x], rule))
    }

    /// `f(inputs)` recorded as one op whose intermediate values are not kept: the backward pass
    /// runs `f` again on a tape of its own and takes its gradients there (gradient checkpointing:
    /// memory of a block's output instead of all its activations, for a second forward pass).
    /// `f` must compute the same values each time (the engine's ops are deterministic).
    pub fn checkpoint(&mut self, inputs: &[Var], f: Recorded) -> Result<Var> {
        let values: Vec<Tensor> = inputs.iter().map(|v| self.value(*v).clone()).collect();
        let needs: Vec<bool> = inputs.iter().map(|v| self.nodes[v.0].needs_grad).collect();
        fn leaves(tape: &mut Tape, values: &[Tensor], needs: &[bool]) -> Result<Vec<Var>> {
            values.iter().zip(needs).map(|(t, &n)| tape.leaf(t.clone(), n)).collect()
        }
        let compute = self.compute;
        let y = {
            let mut sub = Tape { gpu: self.gpu, nodes: Vec::new(), compute };
            let vars = leaves(&mut sub, &values, &needs)?;
            let out = f(&mut sub, &vars)?;
            sub.value(out).clone()
        };
        let rule: Rule = Box::new(move |gpu, g| {
            let mut sub = Tape { gpu, nodes: Vec::new(), compute };
            let vars = leaves(&mut sub, &values, &needs)?;
            let out = f(&mut sub, &vars)?;
            let grads = sub.backward_from(out, g.clone())?;
            Ok(vars.iter().map(|v| grads.get(*v).cloned()).collect())
        });
        Ok(self.push(y, inputs.to_vec(), rule))
    }

    /// The same values in another shape (free: the buffer is shared).
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let from = self.value(x).shape().to_vec();
        let y = self.value(x).reshape(shape)?;
        Ok(self.push(y, vec![x], Box::new(move |_, g| Ok(vec![Some(g.reshape(&from)?)]))))
    }

    /// Output dim `i` is input dim `perm[i]` (torch's `permute`, made contiguous); the gradient is
    /// permuted back by the inverse permutation.
    pub fn permute(&mut self, x: Var, perm: &[usize]) -> Result<Var> {
        let y = ops::permute(self.gpu, self.value(x), perm)?;
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(self.push(y, vec![x], Box::new(move |gpu, g| Ok(vec![Some(ops::permute(gpu, g, &inverse)?)]))))
    }

    /// Rows `ids` of `table` `[vocab, dim]` (torch's `F.embedding`): `[ids, dim]`. The table's
    /// gradient scatters each row's gradient back: `onehot(ids)ᵀ · g`, so repeated ids add up.
    pub fn embedding(&mut self, ids: &[u32], table: Var) -> Result<Var> {
        let tt = self.value(table).clone();
        let y = ops::embedding(self.gpu, ids, &tt)?;
        let (vocab, dim, n) = (tt.dim(0), tt.dim(1), ids.len());
        let mut onehot = vec![0f32; n * vocab];
        for (r, &i) in ids.iter().enumerate() {
            onehot[r * vocab + i as usize] = 1.0;
        }
        let rule: Rule = Box::new(move |gpu, g| {
            let onehot = gpu.upload(&[n, vocab], g.dtype(), &onehot)?;
            let dt = ops::matmul_spec(gpu, &MatmulSpec {
                a: MatView::transposed(&onehot, vocab, n), b: MatView::packed(g, n, dim), m: vocab, n: dim, k: n, batch: 1,
                alpha: 1.0, bias: None, act: Activation::None, residual: None,
            })?;
            Ok(vec![Some(dt.reshape(&[vocab, dim])?)])
        });
        Ok(self.push(y, vec![table], rule))
    }

    /// `a + b` (equal shapes).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.same_shape(a, b, "add")?;
        let y = ops::add(self.gpu, self.value(a), self.value(b))?;
        Ok(self.push(y, vec![a, b], Box::new(|_, g| Ok(vec![Some(g.clone()), Some(g.clone())]))))
    }

    /// `a * b` elementwise (equal shapes).
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.same_shape(a, b, "mul")?;
        let (at, bt) = (self.value(a).clone(), self.value(b).clone());
        let y = ops::mul(self.gpu, &at, &bt)?;
        Ok(self.push(y, vec![a, b], Box::new(move |gpu, g| Ok(vec![Some(ops::mul(gpu, g, &bt)?), Some(ops::mul(gpu, g, &at)?)]))))
    }

    /// `x · sigmoid(x)`.
    pub fn silu(&mut self, x: Var) -> Result<Var> {
        let xt = self.value(x).clone();
        let y = ops::activation(self.gpu, &xt, Activation::Silu)?;
        let rule: Rule = Box::new(move |gpu, g| {
            // d/dx x s(x) = s(x) (1 + x (1 - s(x))).
            let (xe, ge) = (Expr::input(0), Expr::input(1));
            let s = xe.clone().sigmoid();
            let f = ge * s.clone() * (1.0 + xe * (1.0 - s));
            Ok(vec![Some(elementwise(gpu, &f, &[&xt, g])?)])
        });
        Ok(self.push(y, vec![x], rule))
    }

    /// Exact GELU, `0.5 x (1 + erf(x / √2))`; its derivative is `Φ(x) + x φ(x)`.
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        let xt = self.value(x).clone();
        let y = ops::activation(self.gpu, &xt, Activation::Gelu)?;
        let rule: Rule = Box::new(move |gpu, g| {
            let (xe, ge) = (Expr::input(0), Expr::input(1));
            let cdf = 0.5 * (1.0 + (std::f32::consts::FRAC_1_SQRT_2 * xe.clone()).erf());
            let pdf = 0.398_942_3 * (-0.5 * xe.clone() * xe.clone()).exp();
            Ok(vec![Some(elementwise(gpu, &(ge * (cdf + xe * pdf)), &[&xt, g])?)])
        });
        Ok(self.push(y, vec![x], rule))
    }

    /// GEGLU (diffusers' `GEGLU` after its projection): x `[.., 2d]` is split into `h` and `gate`,
    /// `y = h · gelu(gate)`; dh = g gelu(gate), dgate = g h gelu'(gate).
    pub fn geglu(&mut self, x: Var) -> Result<Var> {
        let xt = self.value(x).clone();
        let y = ops::geglu(self.gpu, &xt)?;
        let two_d = *xt.shape().last().ok_or_else(|| Error::Shape("geglu of a scalar".into()))?;
        let (d, rows) = (two_d / 2, xt.numel() / two_d.max(1));
        let rule: Rule = Box::new(move |gpu, g| {
            // [rows, 2, d] -> [2, rows, d]: the halves become contiguous.
            let halves = ops::permute(gpu, &xt.reshape(&[rows, 2, d])?, &[1, 0, 2])?;
            let h = ops::slice(gpu, &halves, 0, &[rows, d])?;
            let gate = ops::slice(gpu, &halves, rows * d, &[rows, d])?;
            let g = g.reshape(&[rows, d])?;
            let (he, ge, ze) = (Expr::input(0), Expr::input(1), Expr::input(2));
            let cdf = 0.5 * (1.0 + (std::f32::consts::FRAC_1_SQRT_2 * ze.clone()).erf());
            let pdf = 0.398_942_3 * (-0.5 * ze.clone() * ze.clone()).exp();
            let dh = elementwise(gpu, &(ge.clone() * (ze.clone() * cdf.clone())), &[&h, &g, &gate])?;
            let dgate = elementwise(gpu, &(ge * he * (cdf + ze * pdf)), &[&h, &g, &gate])?;
            let dx = ops::concat(gpu, &[&dh.reshape(&[rows, 1, d])?, &dgate.reshape(&[rows, 1, d])?], 1)?;
            Ok(vec![Some(dx.reshape(xt.shape())?)])
        });
        Ok(self.push(y, vec![x], rule))
    }

    /// The mean of `(pred - target)²` over every element (torch's `F.mse_loss`): shape `[1]`.
    pub fn mse_loss(&mut self, pred: Var, target: Var) -> Result<Var> {
        self.same_shape(pred, target, "mse_loss")?;
        let (pt, tt) = (self.value(pred).clone(), self.value(target).clone());
        let n = pt.numel();
        let (p, t) = (Expr::input(0), Expr::input(1));
        let sq = elementwise(self.gpu, &((p.clone() - t.clone()) * (p - t)), &[&pt, &tt])?;
        let one = ones(self.gpu, n, pt.dtype())?;
        let loss = ops::matmul_spec(self.gpu, &MatmulSpec {
            a: MatView::packed(&one, 1, n), b: MatView::packed(&sq, n, 1), m: 1, n: 1, k: n, batch: 1,
            alpha: 1.0 / n as f32, bias: None, act: Activation::None, residual: None,
        })?.reshape(&[1])?;
        let rule: Rule = Box::new(move |gpu, g| {
            // d/dpred = 2 (pred - target) / n times the loss's gradient (one value for all).
            let f = Expr::input(2) * (2.0 / n as f32) * (Expr::input(0) - Expr::input(1));
            let ins = [
                ExprInput { tensor: &pt, map: IndexMap::same(n) },
                ExprInput { tensor: &tt, map: IndexMap::same(n) },
                ExprInput { tensor: g, map: IndexMap::repeat(1) },
            ];
            let dp = ops::expr(gpu, &f, &ins, pt.shape(), pt.dtype())?;
            let dt = ops::scale(gpu, &dp, -1.0, 0.0)?;
            Ok(vec![Some(dp), Some(dt)])
        });
        Ok(self.push(loss, vec![pred, target], rule))
    }

    /// Gradients of the one-element `loss` with respect to every value that needs one.
    pub fn backward(&self, loss: Var) -> Result<Grads> {
        let lt = self.value(loss);
        if lt.numel() != 1 {
            return Err(Error::Shape(format!("backward needs a one-element loss, got {:?}", lt.shape())));
        }
        self.backward_from(loss, self.gpu.upload(lt.shape(), lt.dtype(), &[1.0])?)
    }

    /// Gradients of `Σ seed · out` (the vector-Jacobian product with `seed`, shaped like `out`).
    pub fn backward_from(&self, out: Var, seed: Tensor) -> Result<Grads> {
        if seed.shape() != self.value(out).shape() {
            return Err(Error::Shape(format!("a gradient seed of shape {:?} for a value of shape {:?}", seed.shape(), self.value(out).shape())));
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; self.nodes.len()];
        grads[out.0] = Some(seed);
        let loss = out;
        for i in (0..=loss.0).rev() {
            let node = &self.nodes[i];
            let (Some(rule), Some(g)) = (&node.rule, grads[i].clone()) else { continue };
            let input_grads = rule(self.gpu, &g)?;
            for (v, dg) in node.inputs.iter().zip(input_grads) {
                let Some(dg) = dg else { continue };
                if !self.nodes[v.0].needs_grad {
                    continue;
                }
                let shape = self.value(*v).shape();
                if dg.shape() != shape {
                    return Err(Error::Shape(format!("gradient of shape {:?} for a value of shape {shape:?} (a bug in ldm-web, please report it)", dg.shape())));
                }
                grads[v.0] = Some(match grads[v.0].take() {
                    Some(acc) => ops::add(self.gpu, &acc, &dg)?,
                    None => dg,
                });
            }
            // Intermediate gradients are not kept: only parameters' are asked for.
            if !node.inputs.is_empty() {
                grads[i] = None;
            }
        }
        Ok(Grads { grads })
    }
}

#[cfg(test)]
mod tests {
    use super::optim::{adamw_reference, clip_grad_norm, AdamW, AdamWConfig};
    use super::*;
    use crate::gpu::GpuOptions;
    use crate::rng::TorchGenerator;

    use crate::gpu::test_devices as devices;

    /// A two-layer network in f64 on the host, `mse(linear(silu(a) * silu(a) + silu(a)), t)` with
    /// `a = linear(x)`: the reference the tape's gradients are checked against by central
    /// differences.
    struct Net {
        rows: usize,
        d_in: usize,
        d_hid: usize,
        d_out: usize,
    }

    impl Net {
        fn loss(&self, p: &[Vec<f64>], t: &[f64]) -> f64 {
            let [x, w1, b1, w2, b2] = [&p[0], &p[1], &p[2], &p[3], &p[4]];
            let silu = |v: f64| v / (1.0 + (-v).exp());
            let mut loss = 0.0;
            for r in 0..self.rows {
                let u: Vec<f64> = (0..self.d_hid)
                    .map(|j| {
                        let a = b1[j] + (0..self.d_in).map(|k| x[r * self.d_in + k] * w1[j * self.d_in + k]).sum::<f64>();
                        silu(a) * silu(a) + silu(a)
                    })
                    .collect();
                for o in 0..self.d_out {
                    let y = b2[o] + (0..self.d_hid).map(|j| u[j] * w2[o * self.d_hid + j]).sum::<f64>();
                    loss += (y - t[r * self.d_out + o]).powi(2);
                }
            }
            loss / (self.rows * self.d_out) as f64
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        let net = Net { rows: 5, d_in: 7, d_hid: 6, d_out: 3 };
        let shapes: [Vec<usize>; 5] = [vec![net.rows, net.d_in], vec![net.d_hid, net.d_in], vec![net.d_hid], vec![net.d_out, net.d_hid], vec![net.d_out]];
        let mut rng = TorchGenerator::new(20);
        let params: Vec<Vec<f32>> = shapes.iter().map(|s| rng.randn(s.iter().product()).iter().map(|v| v * 0.7).collect()).collect();
        let target = rng.randn(net.rows * net.d_out);
        // Central differences on the f64 reference.
        let p64: Vec<Vec<f64>> = params.iter().map(|p| p.iter().map(|&v| v as f64).collect()).collect();
        let t64: Vec<f64> = target.iter().map(|&v| v as f64).collect();
        let h = 1e-5;
        let expected: Vec<Vec<f64>> = (0..p64.len())
            .map(|i| {
                (0..p64[i].len())
                    .map(|e| {
                        let mut q = p64.clone();
                        q[i][e] += h;
                        let up = net.loss(&q, &t64);
                        q[i][e] -= 2.0 * h;
                        (up - net.loss(&q, &t64)) / (2.0 * h)
                    })
                    .collect()
            })
            .collect();
        for gpu in devices() {
            let mut tape = Tape::new(&gpu);
            let vars: Vec<Var> = params.iter().zip(&shapes).map(|(p, s)| tape.param(gpu.upload(s, DType::F32, p).unwrap()).unwrap()).collect();
            let t = tape.constant(gpu.upload(&[net.rows, net.d_out], DType::F32, &target).unwrap()).unwrap();
            let a = tape.linear(vars[0], vars[1], Some(vars[2])).unwrap();
            let s = tape.silu(a).unwrap();
            let sq = tape.mul(s, s).unwrap();
            let u = tape.add(sq, s).unwrap();
            let y = tape.linear(u, vars[3], Some(vars[4])).unwrap();
            let loss = tape.mse_loss(y, t).unwrap();
            let got_loss = pollster::block_on(gpu.read(tape.value(loss))).unwrap()[0] as f64;
            let want_loss = net.loss(&p64, &t64);
            assert!((got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0), "{}: loss {got_loss} vs {want_loss}", gpu.summary().name);
            let grads = tape.backward(loss).unwrap();
            assert!(grads.get(t).is_none(), "a constant got a gradient");
            for (i, v) in vars.iter().enumerate() {
                let got = pollster::block_on(gpu.read(grads.get(*v).expect("a parameter's gradient"))).unwrap();
                let scale = expected[i].iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let err = got.iter().zip(&expected[i]).fold(0.0f64, |m, (&g, &e)| m.max((g as f64 - e).abs()));
                assert!(err <= 1e-4 * scale.max(1e-3), "{}: parameter {i} {:?}: max error {err:.3e} (gradient scale {scale:.3e})", gpu.summary().name, shapes[i]);
            }
        }
    }

    /// torch's run of the same network (scripts/autograd_fixtures.py).
    #[derive(serde::Deserialize)]
    struct TorchRun {
        shapes: Vec<Vec<usize>>,
        x: Vec<f32>,
        params: Vec<Vec<f32>>,
        target: Vec<f32>,
        loss: f32,
        grads: Vec<Vec<f32>>,
        train: TorchTraining,
    }

    #[derive(serde::Deserialize)]
    struct TorchTraining {
        steps: usize,
        lr: f32,
        weight_decay: f32,
        max_norm: f32,
        losses: Vec<f32>,
        grad_norms: Vec<f32>,
        #[serde(rename = "final")]
        final_params: Vec<Vec<f32>>,
    }

    fn torch_run() -> TorchRun {
        serde_json::from_str(include_str!("../../tests/fixtures/autograd/mlp.json")).expect("tests/fixtures/autograd/mlp.json")
    }

    /// Records the network on a tape: (loss, the four weights' variables).
    fn record(tape: &mut Tape, gpu: &Gpu, run: &TorchRun, x: Var, weights: &[Tensor]) -> (Var, Vec<Var>) {
        let w: Vec<Var> = weights.iter().map(|t| tape.param(t.clone()).unwrap()).collect();
        let t = tape.constant(gpu.upload(&[run.shapes[0][0], run.shapes[3][0]], DType::F32, &run.target).unwrap()).unwrap();
        let a = tape.linear(x, w[0], Some(w[1])).unwrap();
        let s = tape.silu(a).unwrap();
        let sq = tape.mul(s, s).unwrap();
        let u = tape.add(sq, s).unwrap();
        let y = tape.linear(u, w[2], Some(w[3])).unwrap();
        (tape.mse_loss(y, t).unwrap(), w)
    }

    fn max_rel(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale
    }

    /// The gradients torch autograd gives, and 50 steps of clipped AdamW with torch's losses.
    #[test]
    fn gradients_and_training_match_torch() {
        let run = torch_run();
        for gpu in devices() {
            let name = gpu.summary().name.clone();
            let weights: Vec<Tensor> = run.params.iter().zip(&run.shapes[1..]).map(|(p, s)| gpu.upload(s, DType::F32, p).unwrap()).collect();
            let mut tape = Tape::new(&gpu);
            let x = tape.param(gpu.upload(&run.shapes[0], DType::F32, &run.x).unwrap()).unwrap();
            let (loss, w) = record(&mut tape, &gpu, &run, x, &weights);
            let got = pollster::block_on(gpu.read(tape.value(loss))).unwrap()[0];
            assert!((got - run.loss).abs() <= 1e-5 * run.loss, "{name}: loss {got} vs torch {}", run.loss);
            let grads = tape.backward(loss).unwrap();
            for (i, v) in std::iter::once(x).chain(w).enumerate() {
                let g = pollster::block_on(gpu.read(grads.get(v).unwrap())).unwrap();
                let err = max_rel(&g, &run.grads[i]);
                assert!(err <= 1e-5, "{name}: gradient {i}: max error {err:e} of its largest value");
            }

            // Training: x and the target are data.
            let tr = &run.train;
            let mut params = weights;
            let mut opt = AdamW::new(AdamWConfig { lr: tr.lr, weight_decay: tr.weight_decay, ..Default::default() }, params.len());
            let mut losses = Vec::new();
            for step in 0..tr.steps {
                let mut tape = Tape::new(&gpu);
                let x = tape.constant(gpu.upload(&run.shapes[0], DType::F32, &run.x).unwrap()).unwrap();
                let (loss, w) = record(&mut tape, &gpu, &run, x, &params);
                let grads = tape.backward(loss).unwrap();
                let mut g: Vec<Tensor> = w.iter().map(|v| grads.get(*v).unwrap().clone()).collect();
                let norm = clip_grad_norm(&gpu, &mut g, tr.max_norm).unwrap();
                let gs: Vec<Option<&Tensor>> = g.iter().map(Some).collect();
                opt.step(&gpu, &mut params, &gs).unwrap();
                let norm = pollster::block_on(gpu.read(&norm)).unwrap()[0];
                assert!((norm - tr.grad_norms[step]).abs() <= 1e-4 * tr.grad_norms[step], "{name}: step {step}: gradient norm {norm} vs torch {}", tr.grad_norms[step]);
                losses.push(pollster::block_on(gpu.read(tape.value(loss))).unwrap()[0]);
            }
            let worst = losses.iter().zip(&tr.losses).map(|(a, b)| (a - b).abs() / b).fold(0.0f32, f32::max);
            assert!(worst <= 1e-4, "{name}: loss curve off by {worst:e} (relative) from torch's: {losses:?}");
            for (i, p) in params.iter().enumerate() {
                let err = max_rel(&pollster::block_on(gpu.read(p)).unwrap(), &tr.final_params[i]);
                assert!(err <= 1e-4, "{name}: weight {i} after training: max error {err:e} of its largest value");
            }
            eprintln!("{name}: loss {:.5} -> {:.5} in {} steps, worst relative loss difference from torch {worst:.2e}", losses[0], losses[tr.steps - 1], tr.steps);
        }
    }

    /// torch's gradients of a small convolutional network (scripts/autograd_fixtures.py).
    #[derive(serde::Deserialize)]
    struct TorchConvNet {
        shapes: Vec<Vec<usize>>,
        values: Vec<Vec<f32>>,
        target_shape: Vec<usize>,
        target: Vec<f32>,
        loss: f32,
        grads: Vec<Vec<f32>>,
    }

    /// `mse(conv(silu(group_norm(conv(x)))), target)`: the loss and the seven inputs' variables.
    fn record_convnet(tape: &mut Tape, gpu: &Gpu, net: &TorchConvNet, values: &[Vec<f32>]) -> (Var, Vec<Var>) {
        let v: Vec<Var> = values.iter().zip(&net.shapes).map(|(d, s)| tape.param(gpu.upload(s, DType::F32, d).unwrap()).unwrap()).collect();
        let t = tape.constant(gpu.upload(&net.target_shape, DType::F32, &net.target).unwrap()).unwrap();
        let h = tape.conv2d(v[0], v[1], Some(v[2]), Conv2dSpec::new(1, 1)).unwrap();
        let h = tape.group_norm(h, 2, v[3], v[4], 1e-5).unwrap();
        let h = tape.silu(h).unwrap();
        let y = tape.conv2d(h, v[5], Some(v[6]), Conv2dSpec::new(2, 1)).unwrap();
        (tape.mse_loss(y, t).unwrap(), v)
    }

    /// Convolution (strided and padded) and group norm gradients against torch autograd, and
    /// against central differences of the engine's own forward pass.
    #[test]
    fn convolution_and_group_norm_gradients_match_torch() {
        let net: TorchConvNet = serde_json::from_str(include_str!("../../tests/fixtures/autograd/convnet.json")).expect("tests/fixtures/autograd/convnet.json");
        for gpu in devices() {
            let name = gpu.summary().name.clone();
            let mut tape = Tape::new(&gpu);
            let (loss, vars) = record_convnet(&mut tape, &gpu, &net, &net.values);
            let got = pollster::block_on(gpu.read(tape.value(loss))).unwrap()[0];
            assert!((got - net.loss).abs() <= 1e-5 * net.loss, "{name}: loss {got} vs torch {}", net.loss);
            let grads = tape.backward(loss).unwrap();
            let got: Vec<Vec<f32>> = vars.iter().map(|v| pollster::block_on(gpu.read(grads.get(*v).unwrap())).unwrap()).collect();
            let mut worst = 0.0f32;
            for (i, g) in got.iter().enumerate() {
                let err = max_rel(g, &net.grads[i]);
                assert!(err <= 1e-4, "{name}: gradient {i} {:?}: max error {err:e} of its largest value", net.shapes[i]);
                worst = worst.max(err);
            }
            eprintln!("{name}: conv/group-norm gradients within {worst:.2e} of torch's (relative to each one's largest value)");
            // A few elements of every input by central differences of the engine's forward (f32,
            // so a coarse step and tolerance).
            let loss_at = |values: &[Vec<f32>]| {
                let mut tape = Tape::new(&gpu);
                let (loss, _) = record_convnet(&mut tape, &gpu, &net, values);
                pollster::block_on(gpu.read(tape.value(loss))).unwrap()[0] as f64
            };
            let h = 1e-2f32;
            for (i, g) in got.iter().enumerate() {
                for e in [0, g.len() / 2, g.len() - 1] {
                    let mut v = net.values.clone();
                    v[i][e] += h;
                    let up = loss_at(&v);
                    v[i][e] -= 2.0 * h;
                    let fd = (up - loss_at(&v)) / (2.0 * h as f64);
                    let scale = got[i].iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
                    assert!((fd - g[e] as f64).abs() <= 2e-2 * scale.max(1e-2), "{name}: input {i} element {e}: central difference {fd:.5} vs gradient {}", g[e]);
                }
            }
        }
    }

    /// The fixture's inputs as parameters and its target as a constant.
    fn torch_inputs(tape: &mut Tape, gpu: &Gpu, net: &TorchConvNet) -> (Vec<Var>, Var) {
        let v = net.values.iter().zip(&net.shapes).map(|(d, s)| tape.param(gpu.upload(s, DType::F32, d).unwrap()).unwrap()).collect();
        (v, tape.constant(gpu.upload(&net.target_shape, DType::F32, &net.target).unwrap()).unwrap())
    }

    /// Asserts the loss (1e-5) and every input's gradient (1e-4 of its largest value) against
    /// torch's; returns the gradients' worst relative error.
    fn check_against_torch(tape: &Tape, gpu: &Gpu, net: &TorchConvNet, loss: Var, v: &[Var]) -> f32 {
        let name = &gpu.summary().name;
        let got = pollster::block_on(gpu.read(tape.value(loss))).unwrap()[0];
        assert!((got - net.loss).abs() <= 1e-5 * net.loss, "{name}: loss {got} vs torch {}", net.loss);
        let grads = tape.backward(loss).unwrap();
        let mut worst = 0.0f32;
        for (i, var) in v.iter().enumerate() {
            let g = pollster::block_on(gpu.read(grads.get(*var).unwrap())).unwrap();
            let err = max_rel(&g, &net.grads[i]);
            assert!(err <= 1e-4, "{name}: gradient {i} {:?}: max error {err:e} of its largest value", net.shapes[i]);
            worst = worst.max(err);
        }
        worst
    }

    /// Upsampling, channel concatenation, a per-channel timestep embedding and an output scale
    /// (a UNet's up path in small) against torch autograd.
    #[test]
    fn unet_block_gradients_match_torch() {
        let net: TorchConvNet = serde_json::from_str(include_str!("../../tests/fixtures/autograd/blocks.json")).expect("tests/fixtures/autograd/blocks.json");
        for gpu in devices() {
            let mut tape = Tape::new(&gpu);
            let (v, t) = torch_inputs(&mut tape, &gpu, &net);
            let h = tape.conv2d(v[0], v[2], Some(v[3]), Conv2dSpec::new(1, 1)).unwrap();
            let e = tape.silu(v[1]).unwrap();
            let e = tape.linear(e, v[4], None).unwrap();
            let h = tape.add_per_channel(h, e).unwrap();
            let (uh, ux) = (tape.upsample_nearest2x(h).unwrap(), tape.upsample_nearest2x(v[0]).unwrap());
            let c = tape.concat(&[uh, ux], 1).unwrap();
            let y = tape.conv2d(c, v[5], Some(v[6]), Conv2dSpec::new(1, 1)).unwrap();
            let y = tape.scale(y, 0.5).unwrap();
            let loss = tape.mse_loss(y, t).unwrap();
            let worst = check_against_torch(&tape, &gpu, &net, loss, &v);
            eprintln!("{}: up-path gradients within {worst:.2e} of torch's", gpu.summary().name);
        }
    }

    /// One attention head (layer norm, projections, scores q kᵀ, softmax, values, GELU, output
    /// projection) against torch autograd.
    #[test]
    fn attention_gradients_match_torch() {
        let net: TorchConvNet = serde_json::from_str(include_str!("../../tests/fixtures/autograd/attention.json")).expect("tests/fixtures/autograd/attention.json");
        for gpu in devices() {
            let mut tape = Tape::new(&gpu);
            let (v, t) = torch_inputs(&mut tape, &gpu, &net);
            let h = tape.layer_norm(v[0], v[5], v[6], 1e-5).unwrap();
            let (q, k, val) = (tape.linear(h, v[1], None).unwrap(), tape.linear(h, v[2], None).unwrap(), tape.linear(h, v[3], None).unwrap());
            let scores = tape.bmm(q, k, true).unwrap();
            let p = tape.softmax(scores, 0.5).unwrap();
            let o = tape.bmm(p, val, false).unwrap();
            let o = tape.gelu(o).unwrap();
            let y = tape.linear(o, v[4], None).unwrap();
            let loss = tape.mse_loss(y, t).unwrap();
            let worst = check_against_torch(&tape, &gpu, &net, loss, &v);
            eprintln!("{}: attention gradients within {worst:.2e} of torch's", gpu.summary().name);
        }
    }

    #[test]
    fn adamw_follows_its_reference() {
        let config = AdamWConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        let shape = [3, 41];
        let n = 123;
        let mut rng = TorchGenerator::new(21);
        let p0 = rng.randn(n);
        let gs: Vec<Vec<f32>> = (0..5).map(|_| rng.randn(n)).collect();
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
        for (t, g) in gs.iter().enumerate() {
            adamw_reference(&config, t as u32 + 1, &mut p, g, &mut m, &mut v);
        }
        for gpu in devices() {
            let mut opt = AdamW::new(config, 2);
            let mut params = vec![gpu.upload(&shape, DType::F32, &p0).unwrap(), gpu.upload(&[2], DType::F32, &[1.0, 2.0]).unwrap()];
            for g in &gs {
                let gt = gpu.upload(&shape, DType::F32, g).unwrap();
                opt.step(&gpu, &mut params, &[Some(&gt), None]).unwrap();
            }
            let got = pollster::block_on(gpu.read(&params[0])).unwrap();
            let err = got.iter().zip(&p).fold(0.0f32, |e, (a, b)| e.max((a - b).abs()));
            assert!(err <= 1e-6, "{}: max |device - reference| = {err:e}", gpu.summary().name);
            assert_eq!(pollster::block_on(gpu.read(&params[1])).unwrap(), vec![1.0, 2.0], "a parameter without a gradient moved");
            let wrong = gpu.upload(&[2, 2], DType::F32, &[0.0; 4]).unwrap();
            assert!(matches!(opt.step(&gpu, &mut params, &[Some(&wrong), None]), Err(Error::Shape(_))));
        }
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..5).map(|i| i as f32 - 2.0).collect();
        let norm = a.iter().chain(&b).map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        for gpu in devices() {
            for max_norm in [1.0f32, 100.0] {
                let mut grads = vec![gpu.upload(&[37], DType::F32, &a).unwrap(), gpu.upload(&[5], DType::F32, &b).unwrap()];
                let got_norm = pollster::block_on(gpu.read(&clip_grad_norm(&gpu, &mut grads, max_norm).unwrap())).unwrap()[0] as f64;
                assert!((got_norm - norm).abs() <= 1e-5 * norm, "norm {got_norm} vs {norm}");
                let coef = (max_norm as f64 / (norm + 1e-6)).min(1.0);
                let got = pollster::block_on(gpu.read(&grads[1])).unwrap();
                for (g, x) in got.iter().zip(&b) {
                    assert!((*g as f64 - *x as f64 * coef).abs() <= 1e-6, "{}: max_norm {max_norm}: {g} vs {}", gpu.summary().name, *x as f64 * coef);
                }
            }
        }
    }

    /// Checks `f`'s tape gradients against central differences of the engine's own forward:
    /// loss = mean((f(inputs) - t)²) evaluated in f64 on the host from the f32 outputs.
    fn check_central_differences(gpu: &Gpu, name: &str, inputs: &[Vec<usize>], f: &dyn Fn(&mut Tape, &[Var]) -> Var) {
        let mut rng = TorchGenerator::new(31);
        let values: Vec<Vec<f32>> = inputs.iter().map(|s| rng.randn(s.iter().product())).collect();
        let forward = |values: &[Vec<f32>]| -> (Vec<f32>, Vec<usize>) {
            let mut tape = Tape::new(gpu);
            let vars: Vec<Var> = values.iter().zip(inputs).map(|(v, s)| tape.param(gpu.upload(s, DType::F32, v).unwrap()).unwrap()).collect();
            let y = f(&mut tape, &vars);
            (pollster::block_on(gpu.read(tape.value(y))).unwrap(), tape.value(y).shape().to_vec())
        };
        let (y0, shape) = forward(&values);
        let target = rng.randn(y0.len());
        let loss = |y: &[f32]| y.iter().zip(&target).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / y.len() as f64;
        let mut tape = Tape::new(gpu);
        let vars: Vec<Var> = values.iter().zip(inputs).map(|(v, s)| tape.param(gpu.upload(s, DType::F32, v).unwrap()).unwrap()).collect();
        let y = f(&mut tape, &vars);
        let t = tape.constant(gpu.upload(&shape, DType::F32, &target).unwrap()).unwrap();
        let l = tape.mse_loss(y, t).unwrap();
        let grads = tape.backward(l).unwrap();
        let h = 1e-2f32;
        for (i, v) in vars.iter().enumerate() {
            let got = pollster::block_on(gpu.read(grads.get(*v).expect("an input's gradient"))).unwrap();
            for e in 0..values[i].len() {
                let mut q = values.to_vec();
                q[i][e] += h;
                let up = loss(&forward(&q).0);
                q[i][e] -= 2.0 * h;
                let want = (up - loss(&forward(&q).0)) / (2.0 * h as f64);
                assert!((got[e] as f64 - want).abs() <= 2e-3 * want.abs().max(0.05), "{}: {name} input {i} element {e}: {} vs {want}", gpu.summary().name, got[e]);
            }
        }
    }

    #[test]
    fn layout_embedding_and_geglu_gradients_match_central_differences() {
        for gpu in devices() {
            check_central_differences(&gpu, "permute", &[vec![2, 3, 5]], &|tape, v| {
                let p = tape.permute(v[0], &[2, 0, 1]).unwrap();
                let r = tape.reshape(p, &[5, 6]).unwrap();
                tape.mul(r, r).unwrap()
            });
            check_central_differences(&gpu, "embedding", &[vec![5, 3]], &|tape, v| tape.embedding(&[2, 0, 2, 4, 2], v[0]).unwrap());
            check_central_differences(&gpu, "geglu", &[vec![3, 2, 14]], &|tape, v| tape.geglu(v[0]).unwrap());
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let gpu = pollster::block_on(Gpu::new(GpuOptions { cpu: true, ..Default::default() })).unwrap();
        let mut tape = Tape::new(&gpu);
        let a = tape.param(gpu.upload(&[2, 3], DType::F32, &[0.0; 6]).unwrap()).unwrap();
        let b = tape.param(gpu.upload(&[3, 2], DType::F32, &[0.0; 6]).unwrap()).unwrap();
        assert!(matches!(tape.add(a, b), Err(Error::Shape(_))));
        assert!(matches!(tape.backward(a), Err(Error::Shape(_))), "a loss of six elements");
    }
}
