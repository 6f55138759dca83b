//! Kernel launchers, one module per kernel family, each with the CPU reference it is tested against.

pub mod attention;
pub mod conv2d;
pub mod elementwise;
pub mod embedding;
pub mod expr;
pub mod host;
pub mod im2col;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod pool;
mod quant;
mod unrolled;

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, DType, Def, Gpu, Tensor};

pub use attention::{attention, AttentionSpec, HeadView};
pub use conv2d::{conv2d, Conv2dSpec};
pub use elementwise::{activation, add, geglu, mul, scale, slice};
pub use embedding::{embedding, timestep_embedding};
pub use expr::{expr, Expr, ExprInput, IndexMap};
pub use im2col::{col2im, im2col, ColGeometry};
pub use layout::{concat, interpolate, permute, upsample_nearest2x, Coordinates, Interpolation};
pub use pool::{max_pool2d, PoolSpec};
pub use matmul::{linear, matmul, matmul_spec, BiasAxis, MatView, MatmulSpec};
pub use norm::{group_norm, layer_norm, softmax};

/// Activation applied in an elementwise kernel or a fused epilogue (codes match activations.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None = 0,
    Silu = 1,
    /// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)).
    Gelu = 2,
    /// GELU with the tanh approximation.
    GeluTanh = 3,
    /// CLIP's x * sigmoid(1.702 x).
    QuickGelu = 4,
    /// max(x, 0) (the tiny autoencoder's).
    Relu = 5,
    /// tanh(x) (with a scale around it: the tiny autoencoder's soft clamp `3 tanh(x / 3)`).
    Tanh = 6,
}

impl Activation {
    /// CPU reference in f64.
    pub fn apply(self, x: f64) -> f64 {
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        match self {
            Activation::None => x,
            Activation::Silu => x * sigmoid(x),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Activation::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
            Activation::QuickGelu => x * sigmoid(1.702 * x),
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
        }
    }
    pub(crate) fn code(self) -> u32 {
        self as u32
    }
}

pub(crate) const ACTIVATIONS_WGSL: &str = include_str!("../../shaders/activations.wgsl");
const REDUCE_WGSL: &str = include_str!("../../shaders/reduce.wgsl");
const REDUCE_SUBGROUPS_WGSL: &str = include_str!("../../shaders/reduce_subgroups.wgsl");

/// The workgroup reductions for `gpu` (subgroup operations where the adapter has them) and the
/// constants the kernel needs with them.
pub(crate) fn reduce_source(gpu: &Gpu) -> (&'static str, Option<(&'static str, Def)>) {
    if gpu.summary().subgroups {
        (REDUCE_SUBGROUPS_WGSL, Some(("subgroups", Def::Enable)))
    } else {
        (REDUCE_WGSL, None)
    }
}

/// Threads per workgroup of the reduction kernels.
pub(crate) const REDUCE_WG: u32 = 128;

pub(crate) fn bytes_of<P: bytemuck::Pod>(p: &P) -> &[u8] {
    bytemuck::bytes_of(p)
}

/// Elements per workgroup of the one-invocation-per-element kernels.
pub(crate) const ELEMENTWISE_WG: u32 = 256;

/// Grid for `n` invocations of a 256-wide one-per-element kernel.
pub(crate) fn elementwise_grid(gpu: &Gpu, n: usize) -> [u32; 3] {
    grid((n as u32).div_ceil(ELEMENTWISE_WG), gpu.limits().max_compute_workgroups_per_dimension)
}

/// Binds elements `[start, end)` of `t`; returns the binding (its offset aligned down as the
/// adapter requires) and the index of element `start` within it.
pub(crate) fn bind_range<'a>(gpu: &Gpu, t: &'a Tensor, start: usize, end: usize) -> (Bind<'a>, u32) {
    let es = t.dtype().info().block_bytes as u64;
    let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
    let offset = (start as u64 * es) / align * align;
    let size = (end as u64 * es).next_multiple_of(4) - offset;
    let base = ((start as u64 * es - offset) / es) as u32;
    (Bind { buffer: t.buf.raw(), offset, size }, base)
}

/// Largest element count a split dispatch may bind from one tensor: the binding limit less the
/// offset alignment, since [`bind_range`] aligns a range's start down.
pub(crate) fn max_binding_elems(gpu: &Gpu, dtype: DType) -> usize {
    let per = dtype.info().block_bytes as u64;
    let limits = gpu.limits();
    let usable = limits.max_storage_buffer_binding_size.saturating_sub(limits.min_storage_buffer_offset_alignment as u64);
    ((usable / per) as usize).max(1)
}

pub(crate) fn check_float(t: &Tensor, what: &str) -> Result<()> {
    if t.dtype().info().wgsl.is_none() {
        return Err(Error::Unsupported(format!("{what} takes f32 or f16 tensors, got {}", t.dtype().name())));
    }
    Ok(())
}

pub(crate) fn check_same_dtype(tensors: &[&Tensor], what: &str) -> Result<DType> {
    let d = tensors[0].dtype();
    check_float(tensors[0], what)?;
    if let Some(t) = tensors.iter().find(|t| t.dtype() != d) {
        return Err(Error::Shape(format!("{what}: mixed dtypes {} and {}", d.name(), t.dtype().name())));
    }
    Ok(d)
}

/// A placeholder for bindings a kernel variant declares but does not read.
pub(crate) fn dummy(gpu: &Gpu, dtype: DType) -> Result<Tensor> {
    gpu.constant(&format!("unused-{}", dtype.name()), &[2], dtype, || vec![0.0; 2])
}
