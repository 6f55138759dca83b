//! Quantised weight operands of the GEMM core (matmul and conv2d): the parameters quant.wgsl
//! reads them with, and the checks that a weight's layout matches the matrix it stands for.
//! Their CPU reference is the float reference over `DType::decode`d weights.

use crate::error::{Error, Result};
use crate::gpu::Tensor;

pub(crate) const QUANT_WGSL: &str = include_str!("../../shaders/quant.wgsl");

/// quant.wgsl's `QuantView` (all zero for float weights).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct QuantParams {
    blocks_per_row: u32,
    scales: u32,
    mins: u32,
    row0: u32,
}

impl QuantParams {
    /// The view of quantised weight `w`, starting at its row `row0`.
    pub(crate) fn of(w: &Tensor, row0: usize) -> Self {
        // A tensor's layout was computed when its buffer was made, so it exists.
        let l = w.dtype().layout(w.shape()).unwrap_or_else(|| unreachable!("tensor {:?} has a layout", w.shape()));
        Self { blocks_per_row: l.blocks_per_row as u32, scales: (l.param_offsets[0] / 4) as u32, mins: (l.param_offsets[1] / 4) as u32, row0: row0 as u32 }
    }
}

/// Checks that quantised `w` is a `rows x k` weight matrix (its first dimension by the rest).
pub(crate) fn check_weight(w: &Tensor, rows: usize, k: usize, what: &str) -> Result<()> {
    let l = w.dtype().layout(w.shape()).ok_or_else(|| Error::Shape(format!("{what}: weight {:?} is too large", w.shape())))?;
    if l.rows != rows as u64 || l.row_len != k as u64 {
        return Err(Error::Shape(format!(
            "{what}: a {} weight {:?} is {} rows of {} values, but the product needs {rows} x {k}",
            w.dtype().name(), w.shape(), l.rows, l.row_len
        )));
    }
    Ok(())
}
