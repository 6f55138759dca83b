//! Pooled GPU buffers: a tensor's buffer goes back to the pool when the last tensor using it drops,
//! so steady-state work (every diffusion step) allocates nothing.

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

/// A buffer on loan from the pool; returns itself on drop.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    pool: Weak<RefCell<BufferPool>>,
}

impl PooledBuffer {
    pub(crate) fn new(buffer: wgpu::Buffer, pool: &Rc<RefCell<BufferPool>>) -> Self {
        Self { buffer: Some(buffer), pool: Rc::downgrade(pool) }
    }
    /// The underlying wgpu buffer.
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer is only taken on drop")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (self.buffer.take(), self.pool.upgrade()) {
            pool.borrow_mut().give_back(buf);
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
