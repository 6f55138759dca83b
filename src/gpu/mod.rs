//! The runtime under everything: device, dtypes, buffers, pipelines and tensors.

mod device;
mod dtype;
mod pipeline;
mod pool;
mod tensor;

pub use device::{AdapterSummary, Gpu, GpuOptions, KernelProfile};
pub(crate) use device::Bind;
pub use dtype::{DType, DTypeInfo};
pub(crate) use pipeline::{grid, Def, Kernel};
pub use pool::PoolStats;
pub use tensor::Tensor;
