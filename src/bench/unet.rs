//! UNet step and VAE decode benchmark (`ldm bench unet`, and `bench.html?mode=unet`: same code,
//! same JSON): a real model, or Stable Diffusion 1.5's architecture with made-up weights, so the
//! speed and memory of a 1.7 GB model can be measured without downloading it.

use super::pseudo_random;
use crate::error::{Error, Result};
use crate::gpu::{AdapterSummary, DType, Gpu, PoolStats};
use crate::loader::{component_files, read_file, FileSource, StaticSource, WeightLog, Weights};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipelines::loading::config;
use crate::pipelines::ComponentQuant;

/// Stable Diffusion 1.5's `unet/config.json` (the keys that differ from diffusers' defaults).
pub const SD15_UNET_CONFIG: &str = r#"{"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280],
  "cross_attention_dim": 768, "attention_head_dim": 8, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 64}"#;
/// Stable Diffusion 1.5's `vae/config.json`.
pub const SD15_VAE_CONFIG: &str = r#"{"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}"#;

/// Fixed inputs for one UNet step (from `scripts/ort_compare.py`'s `inputs.json`), so outputs
/// can be compared with another runtime's.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct StepInputsFile {
    /// `[B, C, H, W]`.
    pub sample: Vec<usize>,
    /// `[B, L, D]`.
    pub encoder_hidden_states: Vec<usize>,
    pub timestep: f32,
    /// File names (relative to the folder of `inputs.json`) of raw little-endian f32 data.
    pub files: StepInputFiles,
}

/// See [`StepInputsFile`].
#[derive(Clone, Debug, serde::Deserialize)]
pub struct StepInputFiles {
    pub sample: String,
    pub encoder_hidden_states: String,
}

/// What to benchmark.
#[derive(Clone, Debug)]
pub struct UNetBenchOptions {
    /// Latent height and width (image size / 8 for Stable Diffusion).
    pub latent: [usize; 2],
    /// Latents per step (2: classifier-free guidance's conditional and unconditional halves).
    pub batch: usize,
    /// Quantised weight type for the UNet's Linear and Conv2d weights (`None`, or a float type: the activation dtype).
    pub unet_quant: Option<DType>,
    /// The same for the VAE decoder.
    pub vae_quant: Option<DType>,
    /// Activation dtype; the adapter's preferred one when `None`.
    pub dtype: Option<DType>,
    /// Timed steps after the warm-up step.
    pub runs: u32,
    /// Also time one VAE decode of the latents.
    pub decode: bool,
    /// Text embedding length (77 for CLIP).
    pub seq: usize,
    /// Include the last step's output values in the report (to compare with another runtime).
    pub output: bool,
}

impl Default for UNetBenchOptions {
    fn default() -> Self {
        Self { latent: [64, 64], batch: 2, unet_quant: None, vae_quant: None, dtype: None, runs: 3, decode: true, seq: 77, output: false }
    }
}

/// One `bench unet` run; field names are the JSON's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UNetBenchReport {
    pub adapter: AdapterSummary,
    pub model: String,
    /// Memory planning only: allocations as a real run, no kernel run, times meaningless.
    pub plan_only: bool,
    pub dtype: String,
    pub unet_weights: String,
    pub vae_weights: String,
    /// `[B, C, H, W]` of the latents.
    pub sample: Vec<usize>,
    /// Bytes of weights uploaded: what a browser downloads for the UNet (and VAE decoder) in this format.
    pub unet_weight_bytes: u64,
    pub vae_weight_bytes: u64,
    pub load_ms: f64,
    /// The first step (compiles every kernel).
    pub warmup_ms: f64,
    /// Each timed step, output read back.
    pub unet_steps_ms: Vec<f64>,
    pub unet_step_ms: f64,
    /// The first decode (compiles the decoder's kernels), then a timed one.
    pub vae_decode_warmup_ms: Option<f64>,
    pub vae_decode_ms: Option<f64>,
    /// Highest GPU bytes held by the engine's pool (weights, activations, free buffers kept for reuse).
    pub peak_gpu_bytes: u64,
    /// Buffers created and queue submissions during the timed steps: 0 buffers means every
    /// step ran in reused memory.
    pub buffers_created_per_step: f64,
    pub submissions_per_step: f64,
    pub readbacks_per_step: f64,
    pub pool: PoolStats,
    /// The last step's output (only when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Vec<f32>>,
}

/// Where the model comes from.
pub enum BenchModel<'a> {
    /// Stable Diffusion 1.5's UNet and VAE decoder with seeded random weights.
    Sd15Random,
    /// A diffusers folder's `unet/` (and `vae/` when decoding), weights as stored, quantised on the fly if asked.
    Folder { src: &'a dyn FileSource, name: String },
}

/// A `--unet` / `--vae` weight type as given: q8, q4, q4_1, or float (`None`: the activation dtype).
pub fn weight_type(flag: &str, v: Option<&str>) -> Result<Option<DType>> {
    match v {
        None | Some("float") | Some("f16") | Some("f32") => Ok(None),
        Some(s) => DType::from_name(s).filter(|d| d.is_quantised()).map(Some).ok_or_else(|| Error::Input(format!("{flag} {s}: use q8, q4, q4_1 or float"))),
    }
}

async fn read_f32_file(src: &dyn FileSource, path: &str, n: usize) -> Result<Vec<f32>> {
    let bytes = read_file(src, path).await?.ok_or_else(|| Error::Io(format!("{} does not exist", src.describe(path))))?;
    if bytes.len() != n * 4 {
        return Err(Error::Input(format!("{} has {} bytes; its shape in inputs.json needs {}", src.describe(path), bytes.len(), n * 4)));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Loads the model, runs a warm-up step, `opts.runs` timed steps and (optionally) one VAE decode.
/// `inputs` is a folder holding `inputs.json` (fixed step inputs); without it inputs are made up.
pub async fn run(gpu: &Gpu, model: BenchModel<'_>, opts: &UNetBenchOptions, inputs: Option<&dyn FileSource>, now_ms: &dyn Fn() -> f64) -> Result<UNetBenchReport> {
    let dtype = opts.dtype.unwrap_or_else(|| gpu.activation_dtype());
    if !gpu.supports(dtype) {
        return Err(Error::Unsupported(format!("this adapter cannot run {} kernels", dtype.name())));
    }
    gpu.reset_pool_peak();
    let log = WeightLog::default();
    let quant = ComponentQuant { unet: opts.unet_quant, text_encoder: None, vae: opts.vae_quant, log: Some(log.clone()) };
    let t0 = now_ms();
    let empty = StaticSource::new("random", &[]);
    let (name, unet, vae) = match model {
        BenchModel::Sd15Random => {
            let ucfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG).map_err(|e| Error::Model(e.to_string()))?;
            let vcfg: AutoencoderKLConfig = serde_json::from_str(SD15_VAE_CONFIG).map_err(|e| Error::Model(e.to_string()))?;
            let weights = Weights::random(&empty, 0);
            let unet = UNet2DConditionModel::load(&quant.apply(weights.at(gpu, dtype, ""), "unet"), ucfg).await?;
            let vae = if opts.decode { Some(AutoencoderKL::load(&quant.apply(weights.at(gpu, dtype, ""), "vae"), vcfg, false).await?) } else { None };
            ("sd15-random".to_string(), unet, vae)
        }
        BenchModel::Folder { src, name } => {
            // Only unet/ (and vae/ when decoding): a folder may hold nothing else.
            let ucfg: UNet2DConditionConfig = config(src, "unet/config.json").await?;
            let uw = Weights::new(src, component_files(src, "unet", "diffusion_pytorch_model", false).await?);
            let unet = UNet2DConditionModel::load(&quant.apply(uw.at(gpu, dtype, ""), "unet"), ucfg).await?;
            let vae = if opts.decode {
                let vcfg: AutoencoderKLConfig = config(src, "vae/config.json").await?;
                let vw = Weights::new(src, component_files(src, "vae", "diffusion_pytorch_model", false).await?);
                Some(AutoencoderKL::load(&quant.apply(vw.at(gpu, dtype, ""), "vae"), vcfg, false).await?)
            } else {
                None
            };
            (name, unet, vae)
        }
    };
    let cross_dim = unet.config.cross_attention_dim.get(0);
    gpu.sync().await?;
    let load_ms = now_ms() - t0;

    let (sample_shape, ctx_shape, timestep, sample, ctx) = match inputs {
        Some(src) => {
            let bytes = read_file(src, "inputs.json").await?.ok_or_else(|| Error::Io(format!("{} does not exist", src.describe("inputs.json"))))?;
            let f: StepInputsFile = serde_json::from_slice(&bytes).map_err(|e| Error::Input(format!("{}: {e}", src.describe("inputs.json"))))?;
            let s = read_f32_file(src, &f.files.sample, f.sample.iter().product()).await?;
            let c = read_f32_file(src, &f.files.encoder_hidden_states, f.encoder_hidden_states.iter().product()).await?;
            (f.sample, f.encoder_hidden_states, f.timestep, s, c)
        }
        None => {
            let s = [opts.batch, unet.config.in_channels, opts.latent[0], opts.latent[1]];
            let c = [opts.batch, opts.seq, cross_dim];
            (s.to_vec(), c.to_vec(), 500.0, pseudo_random(s.iter().product(), 1), pseudo_random(c.iter().product(), 2))
        }
    };
    let sample = gpu.upload(&sample_shape, dtype, &sample)?;
    let ctx = gpu.upload(&ctx_shape, dtype, &ctx)?;

    let t = now_ms();
    let out = unet.forward(gpu, &sample, timestep, &ctx)?;
    gpu.read(&out).await?;
    let warmup_ms = now_ms() - t;
    drop(out);

    let (pool0, subs0, reads0) = (gpu.pool_stats(), gpu.submissions(), gpu.readbacks());
    let mut steps = Vec::new();
    let mut last = Vec::new();
    for _ in 0..opts.runs.max(1) {
        let t = now_ms();
        let out = unet.forward(gpu, &sample, timestep, &ctx)?;
        // Reading the output back is part of a step's cost for a fair comparison with runtimes
        // that return host arrays (a real generation keeps latents on the GPU).
        last = gpu.read(&out).await?;
        steps.push(now_ms() - t);
    }
    let n = steps.len() as f64;
    let pool1 = gpu.pool_stats();
    let per = |a: u64, b: u64| (b - a) as f64 / n;
    let (buffers, subs, reads) = (per(pool0.buffers_created, pool1.buffers_created), per(subs0, gpu.submissions()), per(reads0, gpu.readbacks()));

    // The first decode compiles the decoder's kernels; the second is timed.
    let (mut vae_decode_warmup_ms, mut vae_decode_ms) = (None, None);
    if let Some(v) = &vae {
        // As the pipelines do: the steps' idle buffers are freed before decoding.
        gpu.trim_pool();
        let z = gpu.upload(&[1, sample_shape[1], sample_shape[2], sample_shape[3]], dtype, &pseudo_random(sample_shape[1..].iter().product(), 3))?;
        for slot in [&mut vae_decode_warmup_ms, &mut vae_decode_ms] {
            let t = now_ms();
            let img = v.decode(gpu, &z)?;
            gpu.read(&img).await?;
            *slot = Some(now_ms() - t);
        }
    }
    let name_of = |q: Option<DType>| q.map_or_else(|| dtype.name().to_string(), |q| q.name().to_string());
    Ok(UNetBenchReport {
        adapter: gpu.summary().clone(),
        model: name,
        plan_only: gpu.plan_only(),
        dtype: dtype.name().into(),
        unet_weights: name_of(opts.unet_quant),
        vae_weights: name_of(opts.vae_quant),
        sample: sample_shape,
        unet_weight_bytes: log.bytes("unet"),
        vae_weight_bytes: log.bytes("vae"),
        load_ms,
        warmup_ms,
        unet_step_ms: steps.iter().sum::<f64>() / n,
        unet_steps_ms: steps,
        vae_decode_warmup_ms,
        vae_decode_ms,
        peak_gpu_bytes: gpu.pool_stats().peak_bytes,
        buffers_created_per_step: buffers,
        submissions_per_step: subs,
        readbacks_per_step: reads,
        pool: gpu.pool_stats(),
        output: opts.output.then_some(last),
    })
}
