//! UNet step and VAE decode benchmark (`ldm bench unet`, and `bench.html?mode=unet`: same code,
//! same JSON): a real model, or Stable Diffusion 1.5's or SDXL 1.0's architecture with made-up
//! weights, so the speed and memory of a 1.7 / 6.9 GB model can be measured without downloading it.

use super::pseudo_random;
use crate::error::{Error, Result};
use crate::gpu::{AdapterSummary, DType, Gpu, PoolStats};
use crate::loader::{component_files, read_file, FileSource, StaticSource, WeightLog, Weights};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet_2d_condition::{AddedConditions, StepConditions, UNet2DConditionConfig, UNet2DConditionModel};
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
/// Stable Diffusion 1.5's `text_encoder/config.json` (CLIP ViT-L/14).
pub const SD15_TEXT_ENCODER_CONFIG: &str = r#"{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
  "projection_dim": 768, "hidden_act": "quick_gelu"}"#;
/// Stable Diffusion XL 1.0 base's `unet/config.json` (the keys that differ from diffusers' defaults).
pub const SDXL_UNET_CONFIG: &str = r#"{"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280],
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
  "use_linear_projection": true, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "layers_per_block": 2,
  "norm_num_groups": 32, "sample_size": 128}"#;
/// Stable Diffusion XL 1.0's `vae/config.json` (SD 1.5's architecture, another scale; f32 decode).
pub const SDXL_VAE_CONFIG: &str = r#"{"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": true}"#;
/// SDXL's `text_encoder_2/config.json` (OpenCLIP ViT-bigG/14 with projection).
pub const SDXL_TEXT_ENCODER_2_CONFIG: &str = r#"{"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
  "projection_dim": 1280, "hidden_act": "gelu"}"#;

/// A published architecture benchmarked with seeded random weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Stable Diffusion 1.5 (`sd15`).
    Sd15,
    /// Stable Diffusion XL 1.0 base (`sdxl`).
    Sdxl,
}

impl Architecture {
    /// `sd15` or `sdxl`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sd15" => Some(Self::Sd15),
            "sdxl" => Some(Self::Sdxl),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sd15 => "sd15-random",
            Self::Sdxl => "sdxl-random",
        }
    }

    /// UNet, VAE and text encoder configs.
    fn configs(self) -> (&'static str, &'static str, Vec<&'static str>) {
        match self {
            Self::Sd15 => (SD15_UNET_CONFIG, SD15_VAE_CONFIG, vec![SD15_TEXT_ENCODER_CONFIG]),
            Self::Sdxl => (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, vec![SD15_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG]),
        }
    }
}

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
    /// Also load the text encoders (random architectures only) to report their bytes and count
    /// them in the peak, with this weight type (`Some(None)`: float).
    pub text_encoders: Option<Option<DType>>,
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
        Self { latent: [64, 64], batch: 2, unet_quant: None, vae_quant: None, text_encoders: None, dtype: None, runs: 3, decode: true, seq: 77, output: false }
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
    /// The text encoders' weight bytes, when they were loaded too (the whole download is this
    /// plus the UNet, the VAE decoder and some kilobytes of configs and vocabulary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_weights: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_weight_bytes: Option<u64>,
    /// The dtype the VAE decoder ran in (f32 for VAEs with `force_upcast`) and whether the decode
    /// was tiled because its activations would not fit one storage binding.
    pub vae_dtype: String,
    pub vae_tiled: bool,
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
    /// The same steps as a generation runs them (the latents on the device; the model input of
    /// both guidance halves, the UNet, guidance and an Euler step as kernels; nothing read back):
    /// time per step (the last step waits for the GPU), queue submissions and readbacks per step.
    pub loop_steps_ms: Vec<f64>,
    pub loop_step_ms: f64,
    pub loop_submissions_per_step: f64,
    pub loop_readbacks_per_step: f64,
    pub pool: PoolStats,
    /// The last step's output (only when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Vec<f32>>,
}

/// Where the model comes from.
pub enum BenchModel<'a> {
    /// A published architecture's UNet and VAE decoder with seeded random weights.
    Random(Architecture),
    /// A diffusers folder's `unet/` (and `vae/` when decoding), weights as stored, quantised on the fly if asked.
    Folder { src: &'a dyn FileSource, name: String },
}

/// A `--unet` / `--vae` weight type as given: a quantised type, or float (`None`: the activation dtype).
pub fn weight_type(flag: &str, v: Option<&str>) -> Result<Option<DType>> {
    match v {
        None | Some("float") | Some("f16") | Some("f32") => Ok(None),
        Some(s) => DType::from_name(s).filter(|d| d.is_quantised()).map(Some).ok_or_else(|| Error::Input(format!("{flag} {s}: use {} or float", DType::quantised_names()))),
    }
}

/// `steps` denoising steps as the pipelines run them, from the benchmark's sample: its rows
/// are the two guidance halves when even (classifier-free guidance at 7.5), else one pass each.
/// Returns each step's time (the last one includes waiting for the GPU), and the submissions and
/// readbacks per step.
#[allow(clippy::too_many_arguments)]
async fn denoising_loop(gpu: &Gpu, unet: &UNet2DConditionModel, sample: &crate::gpu::Tensor, timestep: f32, ctx: &crate::gpu::Tensor, conditions: &StepConditions<'_>, steps: usize, now_ms: &dyn Fn() -> f64) -> Result<(Vec<f64>, f64, f64)> {
    use crate::ops::{self, Expr, ExprInput, IndexMap};
    use crate::schedulers::{self, Latent, LatentMath, SchedulerKind};
    let shape = sample.shape().to_vec();
    let rows = shape[0];
    let cfg = rows % 2 == 0;
    let b = if cfg { rows / 2 } else { rows };
    let per_row: usize = shape[1..].iter().product();
    let n = b * per_row;
    let mut scheduler = schedulers::build(SchedulerKind::Euler, &serde_json::json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}))?;
    scheduler.set_timesteps(steps)?;
    let math = LatentMath::Device(gpu);
    let mut gen = crate::rng::TorchGenerator::new(0);
    let mut latents = math.put(gen.randn(n).into_iter().map(|v| v * scheduler.init_noise_sigma()).collect())?;
    gpu.sync().await?;
    let (subs0, reads0) = (gpu.submissions(), gpu.readbacks());
    let mut times = Vec::new();
    for i in 0..steps {
        let t0 = now_ms();
        let scaled = math.tensor(&scheduler.scale_model_input(math, &latents, i)?)?;
        let x = ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: &scaled, map: IndexMap::repeat(n) }], &shape, sample.dtype())?;
        // The benchmark's fixed timestep: every step costs the same.
        let out = unet.forward_with(gpu, &x, timestep, ctx, conditions)?;
        let noise_pred = if cfg {
            crate::pipelines::stable_diffusion::guide(gpu, &out, 7.5, 0.0, b)?
        } else {
            ops::expr(gpu, &Expr::input(0), &[ExprInput { tensor: &out, map: IndexMap::same(n) }], &[n], crate::gpu::DType::F32)?
        };
        latents = scheduler.step(math, &Latent::Device(noise_pred), i, &latents, &mut gen)?;
        gpu.flush();
        if i + 1 == steps {
            gpu.sync().await?;
        }
        times.push(now_ms() - t0);
    }
    let per = |a: u64, b: u64| (b - a) as f64 / steps as f64;
    Ok((times, per(subs0, gpu.submissions()), per(reads0, gpu.readbacks())))
}

async fn read_f32_file(src: &dyn FileSource, path: &str, n: usize) -> Result<Vec<f32>> {
    let bytes = read_file(src, path).await?.ok_or_else(|| Error::Io(format!("{} does not exist", src.describe(path))))?;
    if bytes.len() != n * 4 {
        return Err(Error::Input(format!("{} has {} bytes; its shape in inputs.json needs {}", src.describe(path), bytes.len(), n * 4)));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| Error::Model(format!("{what}: {e}")))
}

/// The VAE's dtype as the pipelines choose it: SDXL's VAEs with `force_upcast` decode in f32.
fn vae_dtype_for(unet: &UNet2DConditionConfig, vae: &AutoencoderKLConfig, dtype: DType) -> DType {
    if unet.addition_embed_type.as_deref() == Some("text_time") && vae.force_upcast {
        DType::F32
    } else {
        dtype
    }
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
    let quant = ComponentQuant { unet: opts.unet_quant, text_encoder: opts.text_encoders.flatten(), vae: opts.vae_quant, log: Some(log.clone()), ..Default::default() };
    let t0 = now_ms();
    let empty = StaticSource::new("random", &[]);
    let mut text_encoder_bytes = None;
    let mut text_encoders = Vec::new();
    let (name, unet, vae, vae_dtype) = match model {
        BenchModel::Random(arch) => {
            let (u, v, texts) = arch.configs();
            let ucfg: UNet2DConditionConfig = parse("unet config", u)?;
            let vcfg: AutoencoderKLConfig = parse("vae config", v)?;
            let weights = Weights::random(&empty, 0);
            if opts.text_encoders.is_some() {
                // Held for the whole run, as a loaded model holds them: the peak counts them.
                for (t, folder) in texts.iter().zip(["text_encoder", "text_encoder_2"]) {
                    let cfg: ClipTextConfig = parse("text encoder config", t)?;
                    text_encoders.push(ClipTextModel::load(&quant.apply(weights.at(gpu, dtype, ""), folder), cfg).await?);
                }
                text_encoder_bytes = Some(log.bytes("text_encoder") + log.bytes("text_encoder_2"));
                // One prompt and its negative through each, so a plan checks their bindings too.
                let ids = vec![(0..77u32).map(|i| i * 641 % 49408).collect::<Vec<_>>(); 2];
                for t in &text_encoders {
                    let e = t.encode(gpu, &ids, t.num_layers(), true, t.has_projection())?;
                    gpu.read(&e.hidden).await?;
                }
            }
            let vae_dtype = vae_dtype_for(&ucfg, &vcfg, dtype);
            let unet = UNet2DConditionModel::load(&quant.apply(weights.at(gpu, dtype, ""), "unet"), ucfg).await?;
            let vae = if opts.decode { Some(AutoencoderKL::load(&quant.apply(weights.at(gpu, vae_dtype, ""), "vae"), vcfg, false).await?) } else { None };
            (arch.name().to_string(), unet, vae, vae_dtype)
        }
        BenchModel::Folder { src, name } => {
            // Only unet/ (and vae/ when decoding): a folder may hold nothing else.
            let ucfg: UNet2DConditionConfig = config(src, "unet/config.json").await?;
            let uw = Weights::new(src, component_files(src, "unet", "diffusion_pytorch_model", false).await?);
            let (vae, vae_dtype) = if opts.decode {
                let vcfg: AutoencoderKLConfig = config(src, "vae/config.json").await?;
                let vae_dtype = vae_dtype_for(&ucfg, &vcfg, dtype);
                let vw = Weights::new(src, component_files(src, "vae", "diffusion_pytorch_model", false).await?);
                (Some(AutoencoderKL::load(&quant.apply(vw.at(gpu, vae_dtype, ""), "vae"), vcfg, false).await?), vae_dtype)
            } else {
                (None, dtype)
            };
            let unet = UNet2DConditionModel::load(&quant.apply(uw.at(gpu, dtype, ""), "unet"), ucfg).await?;
            (name, unet, vae, vae_dtype)
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
    let rows = sample_shape[0];
    // SDXL's pooled text and size conditions: the add_embedding input splits into the pooled
    // width and six size values (a refiner's five plus a wider pooled state cost the same).
    let added = match (unet.config.addition_embed_type.as_deref(), unet.config.projection_class_embeddings_input_dim, unet.config.addition_time_embed_dim) {
        (Some("text_time"), Some(input), Some(t)) if input > 6 * t => {
            let pooled = input - 6 * t;
            let [h, w] = [sample_shape[2] * 8, sample_shape[3] * 8].map(|v| v as f32);
            let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
            Some(AddedConditions { text_embeds: gpu.upload(&[rows, pooled], dtype, &pseudo_random(rows * pooled, 4))?, time_ids: ids })
        }
        _ => None,
    };
    // LCM UNets: the guidance-scale embedding.
    let timestep_cond = unet.config.time_cond_proj_dim.map(|d| gpu.upload(&[rows, d], dtype, &pseudo_random(rows * d, 5))).transpose()?;
    let conditions = StepConditions { added: added.as_ref(), timestep_cond: timestep_cond.as_ref(), ..Default::default() };

    let t = now_ms();
    let out = unet.forward_with(gpu, &sample, timestep, &ctx, &conditions)?;
    gpu.read(&out).await?;
    let warmup_ms = now_ms() - t;
    drop(out);

    let (pool0, subs0, reads0) = (gpu.pool_stats(), gpu.submissions(), gpu.readbacks());
    let mut steps = Vec::new();
    let mut last = Vec::new();
    for _ in 0..opts.runs.max(1) {
        let t = now_ms();
        let out = unet.forward_with(gpu, &sample, timestep, &ctx, &conditions)?;
        // Reading the output back is part of a step's cost for a fair comparison with runtimes
        // that return host arrays (a real generation keeps latents on the GPU).
        last = gpu.read(&out).await?;
        steps.push(now_ms() - t);
    }
    let n = steps.len() as f64;
    let pool1 = gpu.pool_stats();
    let per = |a: u64, b: u64| (b - a) as f64 / n;
    let (buffers, subs, reads) = (per(pool0.buffers_created, pool1.buffers_created), per(subs0, gpu.submissions()), per(reads0, gpu.readbacks()));
    let (loop_steps_ms, loop_subs, loop_reads) = denoising_loop(gpu, &unet, &sample, timestep, &ctx, &conditions, opts.runs.max(1) as usize, now_ms).await?;

    // The first decode compiles the decoder's kernels; the second is timed.
    let (mut vae_decode_warmup_ms, mut vae_decode_ms) = (None, None);
    let mut vae_tiled = false;
    if let Some(v) = &vae {
        // As the pipelines do: the steps' idle buffers are freed before decoding, in f32 for
        // VAEs that overflow in f16, tiled when the activations exceed a binding.
        drop((sample, ctx, added, timestep_cond));
        gpu.trim_pool();
        let shape = [1, sample_shape[1], sample_shape[2], sample_shape[3]];
        let z = pseudo_random(sample_shape[1..].iter().product(), 3);
        let limit = gpu.summary().max_storage_buffer_binding_size;
        vae_tiled = v.config.decode_peak_bytes(1, shape[2], shape[3], vae_dtype) > limit;
        for slot in [&mut vae_decode_warmup_ms, &mut vae_decode_ms] {
            let t = now_ms();
            if vae_tiled {
                v.decode_tiled(gpu, &z, shape, vae_dtype, v.config.tile_sample_size(1, vae_dtype, limit)).await?;
            } else {
                let img = v.decode(gpu, &gpu.upload(&shape, vae_dtype, &z)?)?;
                gpu.read(&img).await?;
            }
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
        vae_weights: opts.vae_quant.map_or_else(|| vae_dtype.name().to_string(), |q| q.name().to_string()),
        sample: sample_shape,
        unet_weight_bytes: log.bytes("unet"),
        vae_weight_bytes: log.bytes("vae"),
        text_encoder_weights: opts.text_encoders.map(name_of),
        text_encoder_weight_bytes: text_encoder_bytes,
        vae_dtype: vae_dtype.name().into(),
        vae_tiled,
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
        loop_step_ms: loop_steps_ms.iter().sum::<f64>() / loop_steps_ms.len().max(1) as f64,
        loop_steps_ms,
        loop_submissions_per_step: loop_subs,
        loop_readbacks_per_step: loop_reads,
        pool: gpu.pool_stats(),
        output: opts.output.then_some(last),
    })
}
