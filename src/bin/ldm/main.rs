//! The `ldm` command line: the same engine natively.

mod bench_unet;
mod builtin;
mod convert;
mod depth;
mod generate;
mod http;
mod manifest;
mod serve;
mod bench_quality;
mod train;
mod train_lora;

use clap::{Parser, Subcommand};
use ldm_web::bench::{BenchOptions, BenchReport};
use ldm_web::gpu::{DType, Gpu, GpuOptions, KernelProfile};

#[derive(Parser)]
#[command(name = "ldm", version, about = "Latent diffusion on WebGPU: the ldm-web engine from the command line")]
struct Cli {
    /// Where to compute: gpu (a WebGPU adapter: Vulkan, Metal, DX12), cpu (the CPU backend: SIMD matrix products on every core), or auto (the GPU unless there is none or it is a software rasterizer).
    #[arg(long, global = true, default_value = "gpu", value_parser = ["gpu", "cpu", "auto"])]
    device: String,
    #[command(subcommand)]
    command: Command,
}

/// The `--device` flag.
static DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Opens the device `--device` names, with `opts` for a GPU.
pub async fn open_device(opts: GpuOptions) -> ldm_web::Result<Gpu> {
    match DEVICE.get().map_or("gpu", String::as_str) {
        "cpu" => Gpu::new(GpuOptions { cpu: true, ..opts }).await,
        "auto" => match Gpu::new(opts.clone()).await {
            Ok(g) if g.summary().device_type != "Cpu" => Ok(g),
            _ => Gpu::new(GpuOptions { cpu: true, ..opts }).await,
        },
        _ => Gpu::new(opts).await,
    }
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks, printed as JSON.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Describes the GPU adapter ldm would use, as JSON.
    Adapter,
    /// Writes a model as the web format: quantised (q8 / q4) or f16 weights per component, tensors in first-use order, a manifest.
    Convert(convert::ConvertArgs),
    /// A depth map from a photo (DPT, DPT-Hybrid, Depth Anything): a 16- or 8-bit gray PNG, larger = nearer.
    Depth(depth::DepthArgs),
    /// Generates images (Stable Diffusion 1.x / 2.x, the CompVis LDMs, the built-in emoji model); writes PNGs with their parameters.
    Generate(generate::GenerateArgs),
    /// Writes ldm-manifest.json (file and chunk sha256) into a model folder, for the browser's download checks.
    Manifest(manifest::ManifestArgs),
    /// Serves the web app and model folders over HTTP (range requests, CORS, caching headers).
    Serve(serve::ServeArgs),
    /// Trains an image-to-image LDM (condition image -> target image) on pairs with a frozen autoencoder; writes an LDMPipeline folder and a resumable state.
    Train(train::TrainArgs),
    /// Fine-tunes a Stable Diffusion model's UNet with LoRA on captioned images; writes pytorch_lora_weights.safetensors (for --lora) and a resumable state.
    TrainLora(train_lora::TrainLoraArgs),
}

#[derive(Subcommand)]
enum BenchWhat {
    /// A whole text-to-image run: per-stage times and peak GPU bytes, as JSON.
    Generate(generate::GenerateArgs),
    /// One UNet step and VAE decode of a model, or of Stable Diffusion 1.5 with random weights: times, weight bytes, peak GPU bytes.
    Unet(bench_unet::BenchUNetArgs),
    /// A quantised model against the same model in f32: single-step noise-prediction PSNR, PSNR and SSIM of whole generations over prompts and seeds, UNet bytes and bits per weight, as JSON.
    Quality(bench_quality::BenchQualityArgs),
    /// Depth estimation of a photo: load, first and steady-state times, peak GPU bytes.
    Depth(depth::DepthArgs),
    /// Training steps of `ldm train`'s settings on its pairs or synthetic ones (nothing saved): steps/s and peak GPU bytes, as JSON.
    Train(train::BenchTrainArgs),
    /// Every kernel at Stable Diffusion 1.5 shapes (`--shapes sd`) or small ones (`--shapes small`).
    Kernels {
        #[arg(long, default_value = "small", value_parser = ["small", "sd"])]
        shapes: String,
        /// Only kernels whose name contains this.
        #[arg(long, default_value = "")]
        filter: String,
        /// Activation dtype (default: f16 where the adapter has shader-f16, else f32).
        #[arg(long, value_parser = ["f32", "f16"])]
        dtype: Option<String>,
        /// Kernel variants (default: chosen from the adapter).
        #[arg(long, value_parser = ["tiled", "register"])]
        profile: Option<String>,
        /// Repeat each kernel for at least this many milliseconds.
        #[arg(long, default_value_t = 500.0)]
        min_ms: f64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = DEVICE.set(cli.device.clone());
    let out = match cli.command {
        Command::Adapter => pollster::block_on(open_device(Default::default())).and_then(|g| serde_json::to_string_pretty(g.summary()).map_err(|e| ldm_web::Error::Unsupported(e.to_string()))),
        Command::Generate(args) => generate::run(&args, false),
        Command::Depth(args) => depth::run(&args, false),
        Command::Bench { what: BenchWhat::Depth(args) } => depth::run(&args, true),
        Command::Convert(args) => convert::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Train(args) => train::run(&args),
        Command::TrainLora(args) => train_lora::run(&args),
        Command::Bench { what: BenchWhat::Train(args) } => train::bench(&args),
        Command::Manifest(args) => manifest::run(&args),
        Command::Bench { what: BenchWhat::Generate(args) } => generate::run(&args, true),
        Command::Bench { what: BenchWhat::Unet(args) } => bench_unet::run(&args),
        Command::Bench { what: BenchWhat::Quality(args) } => bench_quality::run(&args),
        Command::Bench { what: BenchWhat::Kernels { shapes, filter, dtype, profile, min_ms } } => {
            let opts = BenchOptions {
                shapes,
                filter,
                dtype: dtype.map(|d| if d == "f16" { DType::F16 } else { DType::F32 }),
                profile: profile.map(|p| if p == "tiled" { KernelProfile::Tiled } else { KernelProfile::Register }),
                min_ms,
                cpu: cli.device == "cpu",
            };
            let start = std::time::Instant::now();
            let now = move || start.elapsed().as_secs_f64() * 1e3;
            pollster::block_on(ldm_web::bench::run(&opts, &now)).map(|r: BenchReport| serde_json::to_string_pretty(&r).expect("report serialises"))
        }
    };
    match out {
        Ok(s) => {
            println!("{s}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ldm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
