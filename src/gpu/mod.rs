//! The runtime under everything: device, dtypes, buffers, pipelines and tensors.

mod device;
mod dtype;
mod pipeline;
mod pool;
mod tensor;

pub use device::{AdapterSummary, Gpu, GpuOptions, KernelProfile};
pub(crate) use device::Bind;
pub use dtype::{BlockCodes, DType, DTypeInfo};
pub(crate) use pipeline::{grid, Def, Kernel};
pub use pool::PoolStats;
pub use tensor::Tensor;

/// The devices unit tests run on: the CPU backend, and the native adapter where there is one.
#[cfg(test)]
pub(crate) fn test_devices() -> Vec<Gpu> {
    let mut out = vec![pollster::block_on(Gpu::new(GpuOptions { cpu: true, ..Default::default() })).expect("the CPU backend")];
    if let Ok(gpu) = pollster::block_on(Gpu::new(GpuOptions::default())) {
        out.push(gpu);
    }
    out
}
