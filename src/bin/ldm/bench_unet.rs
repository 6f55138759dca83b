//! `ldm bench unet`: one UNet step (and VAE decode) of a model or of Stable Diffusion 1.5's or
//! SDXL's architecture with random weights; JSON as `bench.html?mode=unet`.

use clap::Args;
use ldm_web::bench::unet::{weight_type, Architecture, BenchModel, UNetBenchOptions};
use ldm_web::gpu::{DType, GpuOptions};
use ldm_web::loader::DirSource;
use ldm_web::{Error, Result};

/// `ldm bench unet` flags.
#[derive(Args, Clone, Debug)]
pub struct BenchUNetArgs {
    /// `sd15` or `sdxl` (Stable Diffusion 1.5's or SDXL 1.0's UNet and VAE with seeded random weights) or a diffusers folder.
    #[arg(long, default_value = "sd15")]
    model: String,
    /// Image size in pixels (the latents are 1/8 of it); `--latent` overrides.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Latent side (e.g. 8 for a fast run on a software adapter).
    #[arg(long)]
    latent: Option<usize>,
    /// Latents per step (2 = classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// UNet weights: q8, q4, q4_1, q5, q5_1 (quantised on load) or float (the activation dtype).
    #[arg(long)]
    unet: Option<String>,
    /// VAE decoder weights, as --unet.
    #[arg(long)]
    vae: Option<String>,
    /// Also load sd15's / sdxl's text encoders with these weights (q8, q4, q4_1, q5, q5_1 or float) to report their bytes.
    #[arg(long)]
    text_encoder: Option<String>,
    /// Storage bindings limited to this many bytes, as in a browser (134217728: the WebGPU default), so the VAE tiles as it would there.
    #[arg(long)]
    max_binding: Option<u64>,
    /// Activation dtype (default: f16 where the adapter has shader-f16, else f32).
    #[arg(long, value_parser = ["f32", "f16"])]
    dtype: Option<String>,
    /// Timed steps after the warm-up step.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Skip the VAE decode.
    #[arg(long)]
    no_decode: bool,
    /// A folder with inputs.json (scripts/ort_compare.py's fixed step inputs) instead of made-up inputs.
    #[arg(long)]
    inputs: Option<String>,
    /// Include the last step's output values in the JSON.
    #[arg(long)]
    output: bool,
    /// Plan memory only: allocate every tensor and check every binding as a real run would, run no kernel (peak GPU bytes of a model too slow to run here).
    #[arg(long)]
    plan: bool,
}

/// Runs the benchmark and returns its JSON.
pub fn run(a: &BenchUNetArgs) -> Result<String> {
    let latent = a.latent.unwrap_or(a.size / 8);
    if a.text_encoder.is_some() && Architecture::from_name(&a.model).is_none() {
        return Err(Error::Input("--text-encoder is for --model sd15 or sdxl (a folder's text encoders are measured by ldm bench generate)".into()));
    }
    if latent == 0 || a.batch == 0 {
        return Err(Error::Input("--size (or --latent) and --batch must be positive".into()));
    }
    let opts = UNetBenchOptions {
        latent: [latent, latent],
        batch: a.batch,
        unet_quant: weight_type("--unet", a.unet.as_deref())?,
        vae_quant: weight_type("--vae", a.vae.as_deref())?,
        text_encoders: a.text_encoder.as_deref().map(|t| weight_type("--text-encoder", Some(t))).transpose()?,
        dtype: a.dtype.as_deref().map(|d| if d == "f16" { DType::F16 } else { DType::F32 }),
        runs: a.runs,
        decode: !a.no_decode,
        output: a.output,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let now = move || start.elapsed().as_secs_f64() * 1e3;
    let dir;
    let model = if let Some(arch) = Architecture::from_name(&a.model) {
        BenchModel::Random(arch)
    } else {
        dir = DirSource::new(std::path::Path::new(&a.model));
        BenchModel::Folder { src: &dir, name: a.model.clone() }
    };
    let inputs = a.inputs.as_ref().map(|p| DirSource::new(std::path::Path::new(p)));
    let report = pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { plan_only: a.plan, max_storage_binding: a.max_binding, ..Default::default() }).await?;
        ldm_web::bench::unet::run(&gpu, model, &opts, inputs.as_ref().map(|s| s as &dyn ldm_web::loader::FileSource), &now).await
    })?;
    serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))
}
