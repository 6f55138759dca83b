//! Kernel benchmarks (`ldm bench kernels`, and `bench.html` in the browser: same code, same JSON).

pub mod depth;
pub mod quality;
pub mod train;
pub mod unet;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, GpuOptions, KernelProfile, PoolStats, Tensor};
use crate::ops::{self, conv2d::Conv2dSpec, Activation, AttentionSpec, HeadView};

/// One kernel at one shape.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub kernel: String,
    pub shape: String,
    pub dtype: String,
    pub profile: KernelProfile,
    /// Floating-point operations of one run (0 for memory-bound kernels).
    pub flops: f64,
    /// Bytes one run must read and write at least.
    pub bytes: f64,
    /// Mean wall time of one run, GPU work included (ms).
    pub ms: f64,
    pub runs: u32,
    pub gflops: f64,
    pub gbps: f64,
}

/// Everything one `bench kernels` run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub adapter: crate::gpu::AdapterSummary,
    pub shapes: String,
    pub results: Vec<BenchResult>,
    pub pool: PoolStats,
    pub submissions: u64,
}

/// Benchmark settings.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// "small" (fast on software adapters) or "sd" (Stable Diffusion 1.5 at 512x512).
    pub shapes: String,
    /// Only kernels whose name contains this.
    pub filter: String,
    /// Activation dtype; the adapter's preferred one when `None`.
    pub dtype: Option<DType>,
    pub profile: Option<KernelProfile>,
    /// Keep repeating a kernel until this much time has passed (at least one run).
    pub min_ms: f64,
    /// On the CPU backend instead of the WebGPU adapter.
    pub cpu: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { shapes: "small".into(), filter: String::new(), dtype: None, profile: None, min_ms: 500.0, cpu: false }
    }
}

enum Work {
    Conv { b: usize, cin: usize, cout: usize, hw: usize, k: usize, q: Option<DType> },
    Attention { heads: usize, nq: usize, nk: usize, d: usize },
    Linear { m: usize, k: usize, n: usize, q: Option<DType> },
    GroupNormSilu { c: usize, hw: usize },
    LayerNorm { rows: usize, cols: usize },
    Geglu { rows: usize, d: usize },
    Add { n: usize },
    Upsample { c: usize, hw: usize },
}

fn workloads(shapes: &str) -> Result<Vec<(&'static str, Work)>> {
    use Work::*;
    Ok(match shapes {
        "sd" => vec![
            ("conv2d_3x3", Conv { b: 1, cin: 320, cout: 320, hw: 64, k: 3, q: None }),
            ("conv2d_3x3", Conv { b: 1, cin: 1280, cout: 1280, hw: 8, k: 3, q: None }),
            ("conv2d_1x1", Conv { b: 1, cin: 640, cout: 320, hw: 64, k: 1, q: None }),
            ("attention_self", Attention { heads: 8, nq: 4096, nk: 4096, d: 40 }),
            ("attention_cross", Attention { heads: 8, nq: 4096, nk: 77, d: 40 }),
            ("attention_self", Attention { heads: 8, nq: 64, nk: 64, d: 160 }),
            ("linear", Linear { m: 4096, k: 320, n: 1280, q: None }),
            ("linear", Linear { m: 4096, k: 1280, n: 320, q: None }),
            // Quantised weights dequantised in the kernel: large-M (compute-bound) and the small-M
            // shapes of cross-attention keys and the time embedding (bound by weight reads).
            ("conv2d_3x3_q4_0", Conv { b: 1, cin: 1280, cout: 1280, hw: 8, k: 3, q: Some(DType::Q4_0) }),
            ("conv2d_3x3_q8_0", Conv { b: 1, cin: 1280, cout: 1280, hw: 8, k: 3, q: Some(DType::Q8_0) }),
            ("conv2d_3x3_q4_1", Conv { b: 1, cin: 1280, cout: 1280, hw: 8, k: 3, q: Some(DType::Q4_1) }),
            ("conv2d_3x3_q5_0", Conv { b: 1, cin: 1280, cout: 1280, hw: 8, k: 3, q: Some(DType::Q5_0) }),
            ("conv2d_3x3_q5_1", Conv { b: 1, cin: 1280, cout: 1280, hw: 8, k: 3, q: Some(DType::Q5_1) }),
            ("linear_q4_0", Linear { m: 4096, k: 320, n: 1280, q: Some(DType::Q4_0) }),
            ("linear_q4_1", Linear { m: 4096, k: 320, n: 1280, q: Some(DType::Q4_1) }),
            ("linear_q5_1", Linear { m: 4096, k: 320, n: 1280, q: Some(DType::Q5_1) }),
            ("linear_q8_0", Linear { m: 4096, k: 320, n: 1280, q: Some(DType::Q8_0) }),
            ("linear", Linear { m: 154, k: 768, n: 1280, q: None }),
            ("linear_q4_0", Linear { m: 154, k: 768, n: 1280, q: Some(DType::Q4_0) }),
            ("linear_q4_1", Linear { m: 154, k: 768, n: 1280, q: Some(DType::Q4_1) }),
            ("linear_q5_0", Linear { m: 154, k: 768, n: 1280, q: Some(DType::Q5_0) }),
            ("linear_q5_1", Linear { m: 154, k: 768, n: 1280, q: Some(DType::Q5_1) }),
            ("linear_q8_0", Linear { m: 154, k: 768, n: 1280, q: Some(DType::Q8_0) }),
            ("group_norm_silu", GroupNormSilu { c: 320, hw: 64 }),
            ("layer_norm", LayerNorm { rows: 4096, cols: 320 }),
            ("geglu", Geglu { rows: 4096, d: 1280 }),
            ("add", Add { n: 320 * 64 * 64 }),
            ("upsample_nearest2x", Upsample { c: 640, hw: 32 }),
        ],
        "small" => vec![
            ("conv2d_3x3", Conv { b: 1, cin: 64, cout: 64, hw: 32, k: 3, q: None }),
            ("conv2d_1x1", Conv { b: 1, cin: 128, cout: 64, hw: 32, k: 1, q: None }),
            ("attention_self", Attention { heads: 2, nq: 1024, nk: 1024, d: 40 }),
            ("attention_cross", Attention { heads: 2, nq: 1024, nk: 77, d: 64 }),
            ("linear", Linear { m: 1024, k: 320, n: 320, q: None }),
            ("conv2d_3x3_q4_0", Conv { b: 1, cin: 64, cout: 64, hw: 32, k: 3, q: Some(DType::Q4_0) }),
            ("linear_q4_0", Linear { m: 1024, k: 320, n: 320, q: Some(DType::Q4_0) }),
            ("linear_q8_0", Linear { m: 1024, k: 320, n: 320, q: Some(DType::Q8_0) }),
            ("linear", Linear { m: 154, k: 768, n: 320, q: None }),
            ("linear_q4_0", Linear { m: 154, k: 768, n: 320, q: Some(DType::Q4_0) }),
            ("linear_q4_1", Linear { m: 154, k: 768, n: 320, q: Some(DType::Q4_1) }),
            ("linear_q5_1", Linear { m: 154, k: 768, n: 320, q: Some(DType::Q5_1) }),
            ("group_norm_silu", GroupNormSilu { c: 64, hw: 32 }),
            ("layer_norm", LayerNorm { rows: 1024, cols: 320 }),
            ("geglu", Geglu { rows: 1024, d: 640 }),
            ("add", Add { n: 64 * 32 * 32 }),
            ("upsample_nearest2x", Upsample { c: 64, hw: 16 }),
        ],
        other => return Err(Error::Unsupported(format!("unknown benchmark shapes '{other}': use small or sd"))),
    })
}

/// Cheap deterministic values in [-1, 1): benchmarks only need finite, non-constant data.
pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32) - 1.0).collect()
}

fn random(gpu: &Gpu, shape: &[usize], dtype: DType, seed: u32) -> Result<Tensor> {
    gpu.upload(shape, dtype, &pseudo_random(shape.iter().product(), seed))
}

/// Runs the kernel benchmarks; `now_ms` is the platform's clock.
pub async fn run(opts: &BenchOptions, now_ms: &dyn Fn() -> f64) -> Result<BenchReport> {
    let gpu = Gpu::new(GpuOptions { profile: opts.profile, cpu: opts.cpu, ..Default::default() }).await?;
    let dtype = opts.dtype.unwrap_or_else(|| gpu.activation_dtype());
    if !gpu.supports(dtype) {
        return Err(Error::Unsupported(format!("this adapter cannot run {} kernels", dtype.name())));
    }
    let es = dtype.info().block_bytes as f64;
    let mut results = Vec::new();
    for (name, w) in workloads(&opts.shapes)? {
        if !name.contains(opts.filter.as_str()) {
            continue;
        }
        // Inputs, then a closure that records one run.
        let weight_dtype = match &w {
            Work::Conv { q, .. } | Work::Linear { q, .. } => *q,
            _ => None,
        };
        let (shape, flops, bytes, run): (String, f64, f64, Box<dyn Fn() -> Result<Tensor>>) = match w {
            Work::Conv { b, cin, cout, hw, k, q } => {
                let x = random(&gpu, &[b, cin, hw, hw], dtype, 1)?;
                let wdt = q.unwrap_or(dtype);
                let wt = random(&gpu, &[cout, cin, k, k], wdt, 2)?;
                let bias = random(&gpu, &[cout], dtype, 3)?;
                let g = gpu.clone();
                let spec = Conv2dSpec::new(1, k / 2);
                (
                    format!("{b}x{cin}x{hw}x{hw} -> {cout}, {k}x{k}"),
                    2.0 * (b * cout * cin * k * k * hw * hw) as f64,
                    es * (b * (cin + cout) * hw * hw) as f64 + wdt.bytes_for(&[cout, cin, k, k]) as f64,
                    Box::new(move || ops::conv2d(&g, &x, &wt, Some(&bias), &spec, None)),
                )
            }
            Work::Attention { heads, nq, nk, d } => {
                let q = random(&gpu, &[1, nq, heads * d], dtype, 4)?;
                let kv = random(&gpu, &[1, nk, heads * d], dtype, 5)?;
                let g = gpu.clone();
                (
                    format!("{heads} heads x {nq} q x {nk} k x {d}"),
                    4.0 * (heads * nq * nk * d) as f64,
                    es * (heads * d * (2 * nq + 2 * nk)) as f64,
                    Box::new(move || {
                        let spec = AttentionSpec {
                            q: HeadView::bnhd(&q, nq, heads, d),
                            k: HeadView::bnhd(&kv, nk, heads, d),
                            v: HeadView::bnhd(&kv, nk, heads, d),
                            batch: 1, heads, nq, nk, head_dim: d, scale: 1.0 / (d as f32).sqrt(), causal: false,
                        };
                        ops::attention(&g, &spec)
                    }),
                )
            }
            Work::Linear { m, k, n, q } => {
                let x = random(&gpu, &[m, k], dtype, 6)?;
                let wdt = q.unwrap_or(dtype);
                let wt = random(&gpu, &[n, k], wdt, 7)?;
                let bias = random(&gpu, &[n], dtype, 8)?;
                let g = gpu.clone();
                let bytes = es * (m * k + m * n) as f64 + wdt.bytes_for(&[n, k]) as f64;
                (format!("{m}x{k}x{n}"), 2.0 * (m * k * n) as f64, bytes, Box::new(move || ops::linear(&g, &x, &wt, Some(&bias), Activation::None)))
            }
            Work::GroupNormSilu { c, hw } => {
                let x = random(&gpu, &[1, c, hw, hw], dtype, 9)?;
                let gm = random(&gpu, &[c], dtype, 10)?;
                let bt = random(&gpu, &[c], dtype, 11)?;
                let g = gpu.clone();
                // Three reads (mean, variance, normalise) and one write.
                (format!("1x{c}x{hw}x{hw}, 32 groups"), 0.0, es * 4.0 * (c * hw * hw) as f64, Box::new(move || ops::group_norm(&g, &x, 32, &gm, &bt, 1e-5, true)))
            }
            Work::LayerNorm { rows, cols } => {
                let x = random(&gpu, &[rows, cols], dtype, 12)?;
                let gm = random(&gpu, &[cols], dtype, 13)?;
                let bt = random(&gpu, &[cols], dtype, 14)?;
                let g = gpu.clone();
                (format!("{rows}x{cols}"), 0.0, es * 4.0 * (rows * cols) as f64, Box::new(move || ops::layer_norm(&g, &x, Some((&gm, &bt)), 1e-5)))
            }
            Work::Geglu { rows, d } => {
                let x = random(&gpu, &[rows, 2 * d], dtype, 15)?;
                let g = gpu.clone();
                (format!("{rows}x{} -> {d}", 2 * d), 0.0, es * 3.0 * (rows * d) as f64, Box::new(move || ops::geglu(&g, &x)))
            }
            Work::Add { n } => {
                let a = random(&gpu, &[n], dtype, 16)?;
                let b = random(&gpu, &[n], dtype, 17)?;
                let g = gpu.clone();
                (format!("{n}"), 0.0, es * 3.0 * n as f64, Box::new(move || ops::add(&g, &a, &b)))
            }
            Work::Upsample { c, hw } => {
                let x = random(&gpu, &[1, c, hw, hw], dtype, 18)?;
                let g = gpu.clone();
                (format!("1x{c}x{hw}x{hw}"), 0.0, es * 5.0 * (c * hw * hw) as f64, Box::new(move || ops::upsample_nearest2x(&g, &x)))
            }
        };
        // Warm-up: compiles the pipeline and touches the buffers.
        drop(run()?);
        gpu.sync().await?;
        let start = now_ms();
        let mut runs = 0u32;
        loop {
            drop(run()?);
            runs += 1;
            gpu.sync().await?;
            if now_ms() - start >= opts.min_ms || runs >= 1000 {
                break;
            }
        }
        let ms = (now_ms() - start) / runs as f64;
        results.push(BenchResult {
            kernel: name.into(),
            shape,
            dtype: weight_dtype.map_or_else(|| dtype.name().to_string(), |q| format!("{} (weights {})", dtype.name(), q.name())),
            profile: gpu.profile(),
            flops,
            bytes,
            ms,
            runs,
            gflops: flops / ms / 1e6,
            gbps: bytes / ms / 1e6,
        });
    }
    Ok(BenchReport { adapter: gpu.summary().clone(), shapes: opts.shapes.clone(), pool: gpu.pool_stats(), submissions: gpu.submissions(), results })
}
