//! Optimisers over engine tensors: AdamW with torch's maths, and gradient clipping by global norm
//! (`torch.nn.utils.clip_grad_norm_`). Each update is a few elementwise expressions on the
//! device; [`adamw_reference`] is the CPU reference.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::{self, Activation, Expr, ExprInput, IndexMap, MatView, MatmulSpec};

/// AdamW's settings, named and defaulted as `torch.optim.AdamW`'s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub betas: (f32, f32),
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// The scalars of step `t` (from 1): decay factor, step size and √(bias correction 2), computed
/// as torch computes them (in f64 on the host, then used as f32).
fn step_scalars(c: &AdamWConfig, t: u32) -> (f32, f32, f32) {
    let bc1 = 1.0 - (c.betas.0 as f64).powi(t as i32);
    let bc2 = 1.0 - (c.betas.1 as f64).powi(t as i32);
    (1.0 - c.lr * c.weight_decay, (c.lr as f64 / bc1) as f32, bc2.sqrt() as f32)
}

/// AdamW (decoupled weight decay) over a list of parameters, with its moment estimates.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken.
    pub steps: u32,
    /// Per parameter: first and second moment (absent until its first gradient).
    moments: Vec<Option<(Tensor, Tensor)>>,
}

impl AdamW {
    /// An optimiser for `params` parameters.
    pub fn new(config: AdamWConfig, params: usize) -> Self {
        Self { config, steps: 0, moments: vec![None; params] }
    }

    /// Per parameter: the first and second moment estimates (absent before its first gradient).
    pub fn moments(&self) -> &[Option<(Tensor, Tensor)>] {
        &self.moments
    }

    /// Restores a saved state (resuming a run): steps taken and the moments.
    pub fn restore(&mut self, steps: u32, moments: Vec<Option<(Tensor, Tensor)>>) -> Result<()> {
        if moments.len() != self.moments.len() {
            return Err(Error::Shape(format!("AdamW state for {} parameters restored into one for {}", moments.len(), self.moments.len())));
        }
        (self.steps, self.moments) = (steps, moments);
        Ok(())
    }

    /// One step: each parameter with a gradient is replaced by its update (torch's order: decay,
    /// moments, then `p - step_size * m / (√v / √bc2 + eps)`); parameters without one stay.
    pub fn step(&mut self, gpu: &Gpu, params: &mut [Tensor], grads: &[Option<&Tensor>]) -> Result<()> {
        if params.len() != self.moments.len() || grads.len() != params.len() {
            return Err(Error::Shape(format!("AdamW made for {} parameters was given {} and {} gradients", self.moments.len(), params.len(), grads.len())));
        }
        self.steps += 1;
        let c = self.config;
        let (decay, step_size, bc2_sqrt) = step_scalars(&c, self.steps);
        let (b1, b2) = c.betas;
        for ((p, g), state) in params.iter_mut().zip(grads).zip(&mut self.moments) {
            let Some(g) = g else { continue };
            if g.shape() != p.shape() {
                return Err(Error::Shape(format!("a gradient of shape {:?} for a parameter of shape {:?}", g.shape(), p.shape())));
            }
            let n = p.numel();
            let (m, v) = match state.take() {
                Some(mv) => mv,
                None => (gpu.upload(p.shape(), DType::F32, &vec![0.0; n])?, gpu.upload(p.shape(), DType::F32, &vec![0.0; n])?),
            };
            let same = IndexMap::same(n);
            let on = |f: &Expr, xs: &[&Tensor]| -> Result<Tensor> {
                let ins: Vec<ExprInput> = xs.iter().map(|t| ExprInput { tensor: t, map: same }).collect();
                ops::expr(gpu, f, &ins, p.shape(), DType::F32)
            };
            let (x0, x1, x2) = (Expr::input(0), Expr::input(1), Expr::input(2));
            // m.lerp_(g, 1 - b1); v.mul_(b2).addcmul_(g, g, value = 1 - b2)
            let m = on(&(x0.clone() + (1.0 - b1) * (x1.clone() - x0.clone())), &[&m, g])?;
            let v = on(&(x0.clone() * b2 + (1.0 - b2) * x1.clone() * x1.clone()), &[&v, g])?;
            // p.mul_(1 - lr wd); p.addcdiv_(m, √v / √bc2 + eps, value = -step_size)
            let update = x0 * decay + -step_size * (x1 / (x2.sqrt() / bc2_sqrt + c.eps));
            *p = on(&update, &[p, &m, &v])?;
            *state = Some((m, v));
        }
        Ok(())
    }
}

/// CPU reference of one AdamW step on slices (the same f32 operations in the same order).
pub fn adamw_reference(c: &AdamWConfig, t: u32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let (decay, step_size, bc2_sqrt) = step_scalars(c, t);
    let (b1, b2) = c.betas;
    for i in 0..p.len() {
        m[i] += (1.0 - b1) * (g[i] - m[i]);
        v[i] = v[i] * b2 + (1.0 - b2) * g[i] * g[i];
        p[i] = p[i] * decay + -step_size * (m[i] / (v[i].sqrt() / bc2_sqrt + c.eps));
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm`, as
/// `clip_grad_norm_` does (`g * min(1, max_norm / (norm + 1e-6))`), without reading the norm back:
/// it stays on the device as a one-element tensor, which is returned.
pub fn clip_grad_norm(gpu: &Gpu, grads: &mut [Tensor], max_norm: f32) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for g in grads.iter() {
        let n = g.numel();
        let flat = g.reshape(&[n, 1])?;
        // Σ g² as g^T g, added onto the running total as the product's residual.
        let sum = ops::matmul_spec(gpu, &MatmulSpec {
            a: MatView::transposed(&flat, 1, n), b: MatView::packed(&flat, n, 1), m: 1, n: 1, k: n, batch: 1,
            alpha: 1.0, bias: None, act: Activation::None, residual: total.as_ref(),
        })?;
        total = Some(sum);
    }
    let Some(total) = total else { return gpu.upload(&[1], DType::F32, &[0.0]) };
    let norm = ops::expr(gpu, &Expr::input(0).sqrt(), &[ExprInput { tensor: &total, map: IndexMap::same(1) }], &[1], DType::F32)?;
    let coef = (max_norm / (Expr::input(1) + 1e-6)).clamp(f32::MIN, 1.0);
    for g in grads.iter_mut() {
        let n = g.numel();
        let ins = [ExprInput { tensor: g, map: IndexMap::same(n) }, ExprInput { tensor: &norm, map: IndexMap::repeat(1) }];
        *g = ops::expr(gpu, &(Expr::input(0) * coef.clone()), &ins, g.shape(), DType::F32)?;
    }
    Ok(norm)
}
