//! The GPU device: adapter choice, features and limits, batched command recording, uploads and
//! asynchronous readback. Errors the GPU reports (validation, out of memory, device loss) are
//! captured and returned by the next call that can fail, never panicked on.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use super::dtype::DType;
use super::pipeline::{Kernel, PipelineCache};
use super::pool::{size_class, BufferPool, HostData, PoolStats, PooledBuffer};
use super::tensor::Tensor;
use crate::error::{Error, Result};

/// Which kernel variants suit the adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelProfile {
    /// Real GPUs: workgroup-memory tiles shared by many threads.
    Tiled,
    /// Software adapters (llvmpipe, SwiftShader): each invocation keeps its tile in registers,
    /// because workgroup barriers cost 5-10x there.
    Register,
}

/// How to open the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Use f32 kernels even when the adapter has `shader-f16`.
    pub force_f32: bool,
    /// Kernel variants; chosen from the adapter when `None`.
    pub profile: Option<KernelProfile>,
    /// Treat storage bindings as limited to this many bytes even if the adapter allows more, so
    /// the code that splits large tensors across bindings can be tested on any adapter.
    pub max_storage_binding: Option<u64>,
    /// Override [`Gpu::max_dispatch_flops`] (tests use a tiny value to exercise splitting).
    pub max_dispatch_flops: Option<f64>,
    /// Memory planning: every tensor is allocated and every binding checked against the limits
    /// as in a real run, but no kernel runs (results are garbage; `ldm bench unet --plan`).
    pub plan_only: bool,
    /// The CPU backend instead of a WebGPU adapter: the same operations as host code (SIMD
    /// GEMM, threads where the platform has them), f32 throughout.
    pub cpu: bool,
}

/// What the adapter is and can do.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamp_query: bool,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub profile: KernelProfile,
}

/// Dispatches recorded before the encoder is submitted. Large enough for a whole denoising step
/// of SD 1.5 or SDXL, so a step is one submission (the pipelines flush at each step's end, and
/// software adapters in browsers also at their FLOP budget, see `add_work`); the CPU records the
/// next step while the GPU runs this one.
const BATCH_DISPATCHES: u32 = 4096;
/// Uploads up to this size recorded into the pending encoder (a copy from a staging buffer)
/// rather than submitting the pending work first.
const STAGED_UPLOAD_BYTES: usize = 4 << 20;
/// Bytes of uniform parameters each dispatch may have.
pub(crate) const MAX_PARAMS: usize = 256;

struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    /// Parameters of this batch's dispatches, written to `uniforms` just before submission.
    params: Vec<u8>,
    uniforms: wgpu::Buffer,
    dispatches: u32,
}

/// What only a WebGPU device has.
struct Wgpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipelines: PipelineCache,
    batch: RefCell<Batch>,
}

struct GpuInner {
    /// `None` on the CPU backend.
    wgpu: Option<Wgpu>,
    summary: AdapterSummary,
    limits: wgpu::Limits,
    pool: Rc<RefCell<BufferPool>>,
    /// First error the GPU reported asynchronously; returned by the next fallible call.
    error: Arc<Mutex<Option<Error>>>,
    submissions: std::cell::Cell<u64>,
    readbacks: std::cell::Cell<u64>,
    f16_kernels: bool,
    /// Running on a browser's WebGPU (rather than a native driver).
    in_browser: bool,
    max_dispatch_flops: Option<f64>,
    plan_only: bool,
    /// FLOPs recorded since the last submission (see `add_work`).
    pending_flops: std::cell::Cell<f64>,
    /// Small tensors that never change (frequency tables, placeholder bindings), made once.
    constants: RefCell<std::collections::HashMap<String, Tensor>>,
}

/// Handle to the GPU device; cheap to clone.
#[derive(Clone)]
pub struct Gpu {
    inner: Rc<GpuInner>,
}

/// A storage binding: a byte range of a buffer.
#[derive(Clone, Copy)]
pub(crate) struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Bind<'a> {
    /// All of a tensor's bytes.
    pub fn whole(t: &'a Tensor) -> Self {
        Self { buffer: t.buf.raw(), offset: 0, size: t.nbytes().next_multiple_of(4) }
    }
}

fn is_software(info: &wgpu::AdapterInfo) -> bool {
    let text = format!("{} {} {}", info.name, info.driver, info.driver_info).to_lowercase();
    info.device_type == wgpu::DeviceType::Cpu
        || ["llvmpipe", "lavapipe", "swiftshader", "softpipe", "warp"].iter().any(|s| text.contains(s))
}

impl Gpu {
    /// Opens the best adapter: a discrete GPU over an integrated one over a software one; or the
    /// CPU backend when `opts.cpu`.
    pub async fn new(opts: GpuOptions) -> Result<Gpu> {
        if opts.cpu {
            return Ok(Self::cpu());
        }
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if cfg!(not(target_arch = "wasm32")) && desc.backends == wgpu::Backends::all() {
            // Compute needs Vulkan/Metal/DX12; the GL backend has no storage-buffer compute worth using.
            desc.backends = wgpu::Backends::PRIMARY;
        }
        let instance = wgpu::Instance::new(desc);
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            })
            .await
            .map_err(|e| Error::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let features = adapter.features();
        let shader_f16 = features.contains(wgpu::Features::SHADER_F16);
        let subgroups = features.contains(wgpu::Features::SUBGROUP);
        let timestamp_query = features.contains(wgpu::Features::TIMESTAMP_QUERY);
        let mut required = wgpu::Features::empty();
        for (have, f) in [(shader_f16, wgpu::Features::SHADER_F16), (subgroups, wgpu::Features::SUBGROUP), (timestamp_query, wgpu::Features::TIMESTAMP_QUERY)] {
            if have {
                required |= f;
            }
        }
        // Ask for everything the adapter offers: the defaults (128 MiB bindings, 256 MiB buffers)
        // are far below what a UNet needs on real GPUs.
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("ldm-web"),
                required_features: required,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let mut limits = device.limits();
        if let Some(cap) = opts.max_storage_binding {
            // Only split decisions read this copy; validation uses the device's real limit.
            let cap = cap.max(1024) / 256 * 256;
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
        }

        let error: Arc<Mutex<Option<Error>>> = Arc::default();
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let err = match e {
                wgpu::Error::OutOfMemory { .. } => Error::OutOfMemory(e.to_string()),
                other => Error::Validation(other.to_string()),
            };
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(err);
        }));
        let sink = error.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(Error::DeviceLost(format!("{reason:?}: {msg}")));
            }
        });

        let profile = opts.profile.unwrap_or(if is_software(&info) { KernelProfile::Register } else { KernelProfile::Tiled });
        let summary = AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            shader_f16,
            subgroups,
            timestamp_query,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            profile,
        };
        let uniforms = new_uniform_buffer(&device);
        let batch = RefCell::new(Batch { encoder: None, params: Vec::new(), uniforms, dispatches: 0 });
        Ok(Gpu {
            inner: Rc::new(GpuInner {
                wgpu: Some(Wgpu { device, queue, pipelines: PipelineCache::default(), batch }),
                pool: Rc::default(),
                error,
                submissions: Default::default(),
                readbacks: Default::default(),
                max_dispatch_flops: opts.max_dispatch_flops,
                plan_only: opts.plan_only,
                in_browser: info.backend == wgpu::Backend::BrowserWebGpu,
                pending_flops: Default::default(),
                constants: Default::default(),
                f16_kernels: shader_f16 && !opts.force_f32,
                summary,
                limits,
            }),
        })
    }

    /// The CPU backend: no adapter, no limits that split work, f32 tensors in host memory.
    fn cpu() -> Gpu {
        let big = 1u64 << 40;
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: big,
            max_buffer_size: big,
            min_storage_buffer_offset_alignment: 4,
            max_compute_workgroups_per_dimension: u32::MAX,
            ..wgpu::Limits::default()
        };
        let summary = AdapterSummary {
            name: format!("CPU ({} threads, {})", crate::ops::host::threads(), crate::ops::host::simd()),
            backend: "Cpu".into(),
            device_type: "Cpu".into(),
            driver: "ldm-web host kernels".into(),
            shader_f16: false,
            subgroups: false,
            timestamp_query: false,
            max_storage_buffer_binding_size: big,
            max_buffer_size: big,
            max_compute_workgroup_storage_size: 0,
            profile: KernelProfile::Register,
        };
        Gpu {
            inner: Rc::new(GpuInner {
                wgpu: None,
                pool: Rc::default(),
                error: Arc::default(),
                submissions: Default::default(),
                readbacks: Default::default(),
                max_dispatch_flops: None,
                plan_only: false,
                in_browser: cfg!(target_arch = "wasm32"),
                pending_flops: Default::default(),
                constants: Default::default(),
                f16_kernels: false,
                summary,
                limits,
            }),
        }
    }

    /// Whether this is the CPU backend (the op launchers run host code instead of kernels).
    pub fn is_cpu(&self) -> bool {
        self.inner.wgpu.is_none()
    }

    /// The WebGPU device. Only called on paths the CPU backend never takes (each public entry
    /// point checks [`Gpu::is_cpu`] first).
    fn w(&self) -> &Wgpu {
        self.inner.wgpu.as_ref().expect("a WebGPU-only path taken on the CPU backend (a bug in ldm-web)")
    }

    /// A CPU-backend tensor of f32 `values` (what the host kernels return).
    pub(crate) fn host_tensor(&self, shape: &[usize], values: Vec<f32>) -> Result<Tensor> {
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::Shape(format!("{} values for shape {shape:?}", values.len())));
        }
        Ok(Tensor::from_parts(Rc::new(PooledBuffer::host(HostData::F32(values), &self.inner.pool)), shape.to_vec(), DType::F32))
    }

    /// The adapter's description, features and limits.
    pub fn summary(&self) -> &AdapterSummary {
        &self.inner.summary
    }
    /// Kernel variants in use.
    pub fn profile(&self) -> KernelProfile {
        self.inner.summary.profile
    }
    /// Most floating-point work one dispatch should carry. Software adapters run a big dispatch
    /// for seconds, and browsers reset a device whose GPU work stalls that long (Chromium's
    /// watchdog took down SwiftShader on a single 7.5 GFLOP convolution), so launchers split big
    /// problems there. Natively nothing watches, and every split costs a little parallelism.
    pub fn max_dispatch_flops(&self) -> f64 {
        if let Some(f) = self.inner.max_dispatch_flops {
            return f;
        }
        match self.profile() {
            KernelProfile::Register if self.inner.in_browser => 2.5e8,
            _ => 2e11,
        }
    }

    /// Whether this device is a browser's WebGPU.
    pub fn in_browser(&self) -> bool {
        self.inner.in_browser
    }

    /// The activation dtype kernels should use: f16 with `shader-f16`, f32 otherwise.
    pub fn activation_dtype(&self) -> DType {
        if self.inner.f16_kernels {
            DType::F16
        } else {
            DType::F32
        }
    }
    /// Whether kernels can store `dtype`.
    pub fn supports(&self, dtype: DType) -> bool {
        let i = dtype.info();
        i.wgsl.is_some() && (!i.needs_shader_f16 || self.inner.summary.shader_f16)
    }
    pub(crate) fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }
    /// Buffer pool memory figures.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.borrow().stats()
    }
    /// Frees the pool's idle buffers and restarts its peak from what tensors hold now (benchmarks).
    pub fn reset_pool_peak(&self) {
        let mut pool = self.inner.pool.borrow_mut();
        pool.trim();
        pool.reset_peak();
    }
    /// Frees the pool's idle buffers.
    pub fn trim_pool(&self) {
        self.inner.pool.borrow_mut().trim();
    }
    /// Number of queue submissions so far (batching makes this far smaller than the dispatch count).
    pub fn submissions(&self) -> u64 {
        self.inner.submissions.get()
    }
    /// Whether this device only plans memory (see [`GpuOptions::plan_only`]).
    pub fn plan_only(&self) -> bool {
        self.inner.plan_only
    }
    /// Number of reads back to the CPU so far (each one waits for the GPU).
    pub fn readbacks(&self) -> u64 {
        self.inner.readbacks.get()
    }

    /// Returns (and clears) the first error the GPU reported asynchronously; a lost device stays lost.
    pub fn check(&self) -> Result<()> {
        let mut slot = self.inner.error.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Error::DeviceLost(m)) = &*slot {
            return Err(Error::DeviceLost(m.clone()));
        }
        match slot.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Records `error` as if the GPU had reported it asynchronously (tests the recovery paths).
    pub fn inject_error(&self, error: Error) {
        self.inner.error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(error);
    }

    /// Destroys the device and records it as lost, as a driver reset would (tests recovery).
    pub fn lose_device(&self, why: &str) {
        self.inner.error.lock().unwrap_or_else(|p| p.into_inner()).replace(Error::DeviceLost(why.to_string()));
        if let Some(w) = &self.inner.wgpu {
            w.device.destroy();
        }
    }

    /// An uninitialised tensor from the pool.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        // In u64 with overflow checks: on wasm32 a usize product of a user-given shape can wrap.
        let bytes = dtype.layout(shape).map_or(u64::MAX, |l| l.bytes.next_multiple_of(4));
        if bytes > self.inner.limits.max_buffer_size {
            return Err(Error::BufferTooLarge { what: format!("a {shape:?} {} tensor", dtype.name()), bytes, limit: self.inner.limits.max_buffer_size });
        }
        if self.is_cpu() {
            let n: usize = shape.iter().product();
            if dtype.is_quantised() {
                return self.host_bytes(shape, dtype, vec![0; bytes as usize]);
            }
            return self.host_tensor(shape, vec![0.0; n]);
        }
        let buf = self.inner.pool.borrow_mut().take(&self.w().device, size_class(bytes));
        Ok(Tensor::from_parts(Rc::new(PooledBuffer::new(buf, &self.inner.pool)), shape.to_vec(), dtype))
    }

    /// A tensor holding `data` converted to `dtype`.
    pub fn upload(&self, shape: &[usize], dtype: DType, data: &[f32]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape(format!("{} values given for shape {shape:?}", data.len())));
        }
        if self.is_cpu() && !dtype.is_quantised() {
            // The CPU backend keeps every float tensor in f32.
            return self.host_tensor(shape, data.to_vec());
        }
        self.upload_bytes(shape, dtype, &dtype.encode(shape, data))
    }

    /// A CPU-backend tensor from bytes in `dtype`'s layout: float values become f32, quantised
    /// ones stay packed (the host GEMM dequantises them).
    fn host_bytes(&self, shape: &[usize], dtype: DType, bytes: Vec<u8>) -> Result<Tensor> {
        if dtype.is_quantised() {
            return Ok(Tensor::from_parts(Rc::new(PooledBuffer::host(HostData::Bytes(bytes), &self.inner.pool)), shape.to_vec(), dtype));
        }
        self.host_tensor(shape, dtype.decode(shape, &bytes))
    }

    /// A tensor from bytes already in `dtype`'s layout (weights straight from a file).
    pub fn upload_bytes(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        if self.is_cpu() {
            let want = dtype.bytes_for(shape);
            if bytes.len() as u64 != want {
                return Err(Error::Shape(format!("{} bytes given for a {shape:?} {} tensor ({want} expected)", bytes.len(), dtype.name())));
            }
            return self.host_bytes(shape, dtype, bytes.to_vec());
        }
        let t = self.empty(shape, dtype)?;
        if bytes.len() as u64 != t.nbytes() {
            return Err(Error::Shape(format!("{} bytes given for a {shape:?} {} tensor ({} expected)", bytes.len(), dtype.name(), t.nbytes())));
        }
        self.write(&t, bytes);
        Ok(t)
    }

    /// A constant tensor, uploaded on first use under `key` and shared afterwards.
    pub fn constant(&self, key: &str, shape: &[usize], dtype: DType, make: impl FnOnce() -> Vec<f32>) -> Result<Tensor> {
        if let Some(t) = self.inner.constants.borrow().get(key) {
            return Ok(t.clone());
        }
        let t = self.upload(shape, dtype, &make())?;
        self.inner.constants.borrow_mut().insert(key.to_string(), t.clone());
        Ok(t)
    }

    /// A u32 tensor (indices); stored as f32-sized words, read by kernels as `array<u32>`.
    pub fn upload_u32(&self, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape(format!("{} indices given for shape {shape:?}", data.len())));
        }
        self.upload_bytes(shape, DType::F32, bytemuck::cast_slice(data))
    }

    fn write(&self, t: &Tensor, bytes: &[u8]) {
        // A pooled buffer may still be read by recorded but unsubmitted dispatches, and queue
        // writes land before the pending encoder would: small uploads become a copy recorded
        // after those dispatches; large ones (weights) submit the pending work first.
        if self.w().batch.borrow().dispatches > 0 {
            if bytes.len() <= STAGED_UPLOAD_BYTES && !self.inner.plan_only && self.record_upload(t, bytes) {
                return;
            }
            self.flush();
        }
        let whole = bytes.len() / 4 * 4;
        self.w().queue.write_buffer(t.buf.raw(), 0, &bytes[..whole]);
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.w().queue.write_buffer(t.buf.raw(), whole as u64, &tail);
        }
    }

    /// `bytes` into `t` by a copy recorded in the pending encoder, from a staging buffer; false
    /// when the staging buffer could not be written.
    fn record_upload(&self, t: &Tensor, bytes: &[u8]) -> bool {
        let size = (bytes.len() as u64).next_multiple_of(4);
        if size == 0 {
            return true;
        }
        let staging = self.w().device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("upload"),
            size,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::MAP_WRITE,
            mapped_at_creation: true,
        });
        match staging.get_mapped_range_mut(..) {
            Ok(mut view) => view.slice(..bytes.len()).copy_from_slice(bytes),
            Err(_) => return false,
        }
        staging.unmap();
        let mut batch = self.w().batch.borrow_mut();
        let device = &self.w().device;
        let enc = batch.encoder.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
        enc.copy_buffer_to_buffer(&staging, 0, t.buf.raw(), 0, size);
        true
    }

    /// Records one dispatch: `params` go to binding 0 as a uniform block, `binds` to 1, 2, ...
    pub(crate) fn dispatch(&self, kernel: &Kernel, params: &[u8], binds: &[Bind], groups: [u32; 3]) -> Result<()> {
        if self.is_cpu() {
            return Err(Error::Unsupported(format!("{} has no CPU-backend implementation (a bug in ldm-web)", kernel.name())));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let max = self.inner.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Unsupported(format!("{} needs {groups:?} workgroups; the adapter allows {max} per dimension", kernel.name())));
        }
        assert!(params.len() <= MAX_PARAMS, "{}: params too large", kernel.name());
        let limit = self.inner.limits.max_storage_buffer_binding_size;
        for b in binds {
            if b.size > limit {
                return Err(Error::BindingTooLarge { what: kernel.name(), bytes: b.size, limit });
            }
        }
        if self.inner.plan_only {
            return Ok(());
        }
        let pipeline = self.w().pipelines.get(&self.w().device, kernel);
        let align = self.inner.limits.min_uniform_buffer_offset_alignment as usize;
        let mut batch = self.w().batch.borrow_mut();
        let offset = batch.params.len().next_multiple_of(align);
        let size = params.len().next_multiple_of(16).max(16);
        batch.params.resize(offset + size, 0);
        batch.params[offset..offset + params.len()].copy_from_slice(params);

        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &batch.uniforms,
                offset: offset as u64,
                size: wgpu::BufferSize::new(size as u64),
            }),
        }];
        for (i, b) in binds.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: b.buffer, offset: b.offset, size: wgpu::BufferSize::new(b.size) }),
            });
        }
        let bind_group = self.w().device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.layout,
            entries: &entries,
        });
        let device = &self.w().device;
        let encoder = batch.encoder.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        batch.dispatches += 1;
        let full = batch.dispatches >= BATCH_DISPATCHES || batch.params.len() + MAX_PARAMS + align > UNIFORM_BYTES as usize;
        drop(batch);
        if full {
            self.flush();
        }
        Ok(())
    }

    /// Counts the FLOPs of the dispatch just recorded; submits once a dispatch budget's worth is
    /// pending, since a browser runs one submission as one task and its watchdog times tasks.
    pub(crate) fn add_work(&self, flops: f64) {
        let total = self.inner.pending_flops.get() + flops;
        self.inner.pending_flops.set(total);
        if total >= self.max_dispatch_flops() {
            self.flush();
        }
    }

    /// Submits everything recorded so far.
    pub fn flush(&self) {
        self.inner.pending_flops.set(0.0);
        let Some(w) = &self.inner.wgpu else { return };
        let mut batch = w.batch.borrow_mut();
        let Some(encoder) = batch.encoder.take() else { return };
        w.queue.write_buffer(&batch.uniforms, 0, &batch.params);
        batch.params.clear();
        batch.dispatches = 0;
        w.queue.submit([encoder.finish()]);
        self.inner.submissions.set(self.inner.submissions.get() + 1);
    }

    /// Waits until the GPU has finished all submitted work.
    pub async fn sync(&self) -> Result<()> {
        if self.is_cpu() {
            return self.check();
        }
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        self.w().queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        self.wait_native()?;
        rx.await.map_err(|_| Error::DeviceLost("the queue stopped before the work finished".into()))?;
        self.check()
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn wait_native(&self) -> Result<()> {
        self.w()
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::DeviceLost(e.to_string()))
    }
    #[cfg(target_arch = "wasm32")]
    fn wait_native(&self) -> Result<()> {
        Ok(())
    }

    /// Copies a tensor's bytes back to the CPU (flushes pending work first).
    pub async fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        self.check()?;
        self.inner.readbacks.set(self.inner.readbacks.get() + 1);
        if let Some(d) = t.buf.host_data() {
            return Ok(match d {
                HostData::F32(v) => t.dtype().encode(t.shape(), v),
                HostData::Bytes(b) => b.clone(),
            });
        }
        let size = t.nbytes().next_multiple_of(4);
        let staging = self.w().device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut batch = self.w().batch.borrow_mut();
            let device = &self.w().device;
            let enc = batch.encoder.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
            enc.copy_buffer_to_buffer(t.buf.raw(), 0, &staging, 0, size);
            // Counts as a dispatch so that uploads into reused buffers flush it first.
            batch.dispatches += 1;
        }
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait_native()?;
        let mapped = rx.await.map_err(|_| Error::DeviceLost("the map request was dropped".into()))?;
        self.check()?;
        mapped.map_err(|e| Error::Readback(e.to_string()))?;
        let mut out = staging.get_mapped_range(..).map_err(|e| Error::Readback(e.to_string()))?.to_vec();
        staging.unmap();
        out.truncate(t.nbytes() as usize);
        Ok(out)
    }

    /// Reads a tensor back as f32 values.
    pub async fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        if let Some(HostData::F32(v)) = t.buf.host_data() {
            self.check()?;
            self.inner.readbacks.set(self.inner.readbacks.get() + 1);
            return Ok(v.clone());
        }
        let bytes = self.read_bytes(t).await?;
        Ok(t.dtype().decode(t.shape(), &bytes))
    }
}

// Every dispatch's parameters take at least the uniform offset alignment (256 bytes on most adapters).
const UNIFORM_BYTES: u64 = BATCH_DISPATCHES as u64 * 256;

fn new_uniform_buffer(device: &wgpu::Device) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("dispatch params"),
        size: UNIFORM_BYTES,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}
