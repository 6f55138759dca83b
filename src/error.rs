//! The crate's one error type.

/// Everything that can go wrong in ldm-web, with messages that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no GPU adapter found ({0}). Natively, install a Vulkan driver (on Debian: apt-get install mesa-vulkan-drivers libvulkan1); in a browser, use one with WebGPU enabled (Chromium 113+, Firefox with dom.webgpu.enabled)")]
    NoAdapter(String),
    #[error("could not open the GPU device: {0}")]
    RequestDevice(String),
    #[error("the GPU ran out of memory ({0}); use a smaller image size or batch, or a quantised model")]
    OutOfMemory(String),
    #[error("the GPU device was lost ({0}); ldm-web reopens it on the next run (natively: run the command again)")]
    DeviceLost(String),
    #[error("GPU validation error (a bug in ldm-web, please report it): {0}")]
    Validation(String),
    #[error("{what} needs {bytes} bytes in one storage binding, but this adapter allows {limit} (max_storage_buffer_binding_size); use a smaller image size or batch, or for a weight a quantised model (ldm convert --quant q8 or q4)")]
    BindingTooLarge { what: String, bytes: u64, limit: u64 },
    #[error("{what} needs a {bytes}-byte buffer, but this adapter allows {limit} (max_buffer_size); use a smaller image size or batch, or for a weight a quantised model (ldm convert --quant q8 or q4)")]
    BufferTooLarge { what: String, bytes: u64, limit: u64 },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("reading a result back from the GPU failed: {0}")]
    Readback(String),
    #[error("{0}")]
    Io(String),
    #[error("the model is not usable: {0}")]
    Model(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cancelled")]
    Cancelled,
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
