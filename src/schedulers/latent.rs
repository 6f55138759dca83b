//! The latents a scheduler steps, where they live, and where its arithmetic runs.
//!
//! A scheduler writes each update as one [`Expr`] over the latents it combines (the sample, the
//! model output, earlier outputs, noise) with its coefficients as constants. [`LatentMath::Host`]
//! evaluates it on the CPU (f32, in the order written: the arithmetic diffusers' tests pin down);
//! [`LatentMath::Device`] runs it as one kernel, so the denoising loop never reads latents back.

use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::{self, Expr, ExprInput, IndexMap};

/// Latent values: on the CPU, or an f32 tensor on the device.
#[derive(Clone, Debug)]
pub enum Latent {
    Host(Rc<Vec<f32>>),
    Device(Tensor),
}

impl Latent {
    /// Values on the CPU.
    pub fn host(values: Vec<f32>) -> Latent {
        Latent::Host(Rc::new(values))
    }

    /// How many values.
    pub fn len(&self) -> usize {
        match self {
            Latent::Host(v) => v.len(),
            Latent::Device(t) => t.numel(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of a host latent (a device latent must be read back by its caller).
    pub fn into_host(self) -> Result<Vec<f32>> {
        match self {
            Latent::Host(v) => Ok(Rc::try_unwrap(v).unwrap_or_else(|v| (*v).clone())),
            Latent::Device(_) => Err(Error::Unsupported("latents on the device read as host values; read the tensor back first".into())),
        }
    }

    fn same(&self, other: &Latent) -> bool {
        match (self, other) {
            (Latent::Host(a), Latent::Host(b)) => Rc::ptr_eq(a, b),
            (Latent::Device(a), Latent::Device(b)) => a.same_storage(b) && a.shape() == b.shape(),
            _ => false,
        }
    }
}

/// The latents one expression reads: [`Inputs::add`] gives each its [`Expr::Input`].
#[derive(Default)]
pub struct Inputs<'a>(Vec<&'a Latent>);

impl<'a> Inputs<'a> {
    pub fn new() -> Self {
        Inputs(Vec::new())
    }

    /// The input standing for `latent` (the same one again for the same latent).
    pub fn add(&mut self, latent: &'a Latent) -> Expr {
        if let Some(k) = self.0.iter().position(|l| l.same(latent)) {
            return Expr::input(k);
        }
        self.0.push(latent);
        Expr::input(self.0.len() - 1)
    }
}

/// Where scheduler arithmetic runs.
#[derive(Clone, Copy)]
pub enum LatentMath<'a> {
    /// On the CPU, on host latents.
    Host,
    /// As kernels on `gpu`; host latents given to it (noise drawn on the CPU) are uploaded.
    Device(&'a Gpu),
}

impl LatentMath<'_> {
    /// `e` over `inputs`, all as long as the result.
    pub fn eval(&self, e: &Expr, inputs: &Inputs) -> Result<Latent> {
        let n = inputs.0.first().map_or(0, |l| l.len());
        if let Some(l) = inputs.0.iter().find(|l| l.len() != n) {
            return Err(Error::Shape(format!("scheduler arithmetic on latents of {n} and {} values", l.len())));
        }
        match self {
            LatentMath::Host => {
                let data: Vec<(&[f32], IndexMap)> = inputs
                    .0
                    .iter()
                    .map(|l| match l {
                        Latent::Host(v) => Ok((v.as_slice(), IndexMap::same(n))),
                        Latent::Device(_) => Err(Error::Unsupported("host scheduler arithmetic on device latents".into())),
                    })
                    .collect::<Result<_>>()?;
                Ok(Latent::host(e.eval(n, &data)?))
            }
            LatentMath::Device(gpu) => {
                let tensors: Vec<Tensor> = inputs.0.iter().map(|l| self.tensor(l)).collect::<Result<_>>()?;
                let ins: Vec<ExprInput> = tensors.iter().map(|t| ExprInput { tensor: t, map: IndexMap::same(n) }).collect();
                Ok(Latent::Device(ops::expr(gpu, e, &ins, &[n], DType::F32)?))
            }
        }
    }

    /// `latent` as a flat tensor on the device (uploaded when it is on the host).
    pub fn tensor(&self, latent: &Latent) -> Result<Tensor> {
        match (self, latent) {
            (_, Latent::Device(t)) => t.reshape(&[t.numel()]),
            (LatentMath::Device(gpu), Latent::Host(v)) => gpu.upload(&[v.len()], DType::F32, v),
            (LatentMath::Host, Latent::Host(_)) => Err(Error::Unsupported("host latents have no tensor".into())),
        }
    }

    /// Values drawn on the CPU (noise) where this math keeps latents.
    pub fn put(&self, values: Vec<f32>) -> Result<Latent> {
        match self {
            LatentMath::Host => Ok(Latent::host(values)),
            LatentMath::Device(gpu) => Ok(Latent::Device(gpu.upload(&[values.len()], DType::F32, &values)?)),
        }
    }
}
