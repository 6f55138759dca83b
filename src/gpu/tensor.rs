//! `Tensor`: a shape, a dtype and a GPU buffer (shared between views of the same data).

use std::rc::Rc;

use super::dtype::DType;
use super::pool::PooledBuffer;
use crate::error::{Error, Result};

/// A dense row-major tensor living in a GPU buffer.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) buf: Rc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype.name())
    }
}

impl Tensor {
    pub(crate) fn from_parts(buf: Rc<PooledBuffer>, shape: Vec<usize>, dtype: DType) -> Self {
        Self { buf, shape, dtype }
    }
    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes the elements occupy.
    pub fn nbytes(&self) -> u64 {
        self.dtype.bytes_for(&self.shape)
    }
    /// Size of dimension `d`; negative counts from the end.
    pub fn dim(&self, d: isize) -> usize {
        let r = self.shape.len() as isize;
        self.shape[(if d < 0 { r + d } else { d }) as usize]
    }
    /// The same data under another shape with as many elements (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::Shape(format!("cannot reshape {:?} to {:?}", self.shape, shape)));
        }
        Ok(Tensor { buf: self.buf.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
    /// The values of a CPU-backend float tensor (the host kernels' input).
    pub(crate) fn host_f32(&self) -> Result<&[f32]> {
        match self.buf.host_data() {
            Some(super::pool::HostData::F32(v)) => Ok(v),
            _ => Err(Error::Unsupported(format!("a {} tensor where the CPU backend needs f32 values", self.dtype.name()))),
        }
    }
    /// The packed bytes of a CPU-backend quantised tensor.
    pub(crate) fn host_packed(&self) -> Result<&[u8]> {
        match self.buf.host_data() {
            Some(super::pool::HostData::Bytes(b)) => Ok(b),
            _ => Err(Error::Unsupported(format!("a {} tensor where the CPU backend needs packed bytes", self.dtype.name()))),
        }
    }
    /// Whether two tensors share one buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Rc::ptr_eq(&self.buf, &other.buf)
    }
}
