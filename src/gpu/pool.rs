//! Pooled GPU buffers: a tensor's buffer goes back to the pool when the last tensor using it drops,
//! so steady-state work (every diffusion step) allocates nothing. The CPU backend's tensors hold
//! host memory instead, counted in the same figures.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

/// Usage of every tensor buffer: kernels read and write it, and it can be uploaded and read back.
pub(crate) const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Free buffers by size class, and byte counts for reports.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    /// Bytes in buffers held by tensors.
    live: u64,
    /// Bytes in free buffers kept for reuse.
    idle: u64,
    /// Highest `live + idle` seen.
    peak: u64,
    /// Buffers created so far (a steady-state step should create none).
    created: u64,
}

/// Rounds a request up to one of four size classes per power of two (at most 25% waste).
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let p = bytes.next_power_of_two();
    if p == bytes {
        return p;
    }
    let step = p / 8;
    bytes.div_ceil(step) * step
}

/// Memory figures of the pool, in bytes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PoolStats {
    pub live_bytes: u64,
    pub idle_bytes: u64,
    pub peak_bytes: u64,
    /// Buffers the pool has created (not reused).
    pub buffers_created: u64,
}

impl BufferPool {
    pub(crate) fn take(&mut self, device: &wgpu::Device, class: u64) -> wgpu::Buffer {
        let buf = match self.free.get_mut(&class).and_then(Vec::pop) {
            Some(b) => {
                self.idle -= class;
                b
            }
            None => {
                self.created += 1;
                device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tensor"),
                size: class,
                usage: TENSOR_USAGE,
                mapped_at_creation: false,
                })
            }
        };
        self.live += class;
        self.peak = self.peak.max(self.live + self.idle);
        buf
    }

    /// Counts host memory a CPU-backend tensor took.
    fn add_host(&mut self, bytes: u64) {
        self.live += bytes;
        self.peak = self.peak.max(self.live + self.idle);
    }

    fn give_back(&mut self, buf: wgpu::Buffer) {
        let class = buf.size();
        self.live -= class;
        self.idle += class;
        self.free.entry(class).or_default().push(buf);
    }

    /// Frees every idle buffer.
    pub(crate) fn trim(&mut self) {
        self.free.clear();
        self.idle = 0;
    }

    /// Starts peak tracking afresh from what is held now.
    pub(crate) fn reset_peak(&mut self) {
        self.peak = self.live + self.idle;
    }

    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats { live_bytes: self.live, idle_bytes: self.idle, peak_bytes: self.peak, buffers_created: self.created }
    }
}

/// A CPU-backend tensor's values: f32 for float tensors, the dtype's packed bytes for quantised ones.
#[derive(Debug)]
pub(crate) enum HostData {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

impl HostData {
    fn bytes(&self) -> u64 {
        match self {
            HostData::F32(v) => 4 * v.len() as u64,
            HostData::Bytes(b) => b.len() as u64,
        }
    }
}

enum Backing {
    Gpu(Option<wgpu::Buffer>),
    Host(HostData),
}

/// A tensor's memory: a buffer on loan from the pool (returned on drop), or host memory on the
/// CPU backend.
pub struct PooledBuffer {
    backing: Backing,
    pool: Weak<RefCell<BufferPool>>,
}

impl PooledBuffer {
    pub(crate) fn new(buffer: wgpu::Buffer, pool: &Rc<RefCell<BufferPool>>) -> Self {
        Self { backing: Backing::Gpu(Some(buffer)), pool: Rc::downgrade(pool) }
    }
    /// Host memory, counted in `pool`'s figures while it lives.
    pub(crate) fn host(data: HostData, pool: &Rc<RefCell<BufferPool>>) -> Self {
        pool.borrow_mut().add_host(data.bytes());
        Self { backing: Backing::Host(data), pool: Rc::downgrade(pool) }
    }
    /// The underlying wgpu buffer. Only GPU tensors reach the kernels: every launcher hands a
    /// CPU-backend device's work to its host implementation first.
    pub fn raw(&self) -> &wgpu::Buffer {
        match &self.backing {
            Backing::Gpu(Some(b)) => b,
            _ => panic!("a CPU-backend tensor was bound to a GPU kernel (a bug in ldm-web)"),
        }
    }
    /// The values of a CPU-backend tensor.
    pub(crate) fn host_data(&self) -> Option<&HostData> {
        match &self.backing {
            Backing::Host(d) => Some(d),
            Backing::Gpu(_) => None,
        }
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else { return };
        match &mut self.backing {
            Backing::Gpu(buf) => {
                if let Some(buf) = buf.take() {
                    pool.borrow_mut().give_back(buf);
                }
            }
            Backing::Host(d) => pool.borrow_mut().live -= d.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_bound_waste() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(1024), 1024);
        assert_eq!(size_class(1025), 1280);
        for n in [300u64, 5000, 123_457, 10_000_001] {
            let c = size_class(n);
            assert!(c >= n && c <= n + n / 4 + 1, "{n} -> {c}");
        }
    }
}
