//! Published depth estimators with seeded random weights, for `ldm bench depth` and the page's
//! benchmark: the architectures and image processors of Depth Anything V2 Small
//! (depth-anything/Depth-Anything-V2-Small-hf, 24.8 M parameters) and DPT-Hybrid
//! (Intel/dpt-hybrid-midas, the depth-to-image estimator).

use std::future::Future;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::loader::{StaticSource, Weights};
use crate::pipelines::depth::{DepthEstimator, DptImageProcessorConfig};
use crate::pipelines::image_input::{Channels, InputImage};

/// The names [`random_estimator`] knows.
pub const DEPTH_ARCHITECTURES: [&str; 2] = ["depth-anything-v2-small", "dpt-hybrid-midas"];

const DEPTH_ANYTHING_V2_SMALL: &str = r#"{"model_type": "depth_anything", "patch_size": 14, "reassemble_hidden_size": 384,
  "reassemble_factors": [4, 2, 1, 0.5], "neck_hidden_sizes": [48, 96, 192, 384], "fusion_hidden_size": 64, "head_hidden_size": 32,
  "depth_estimation_type": "relative", "max_depth": 1,
  "backbone_config": {"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
    "patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6, "out_indices": [3, 6, 9, 12], "apply_layernorm": true, "reshape_hidden_states": false}}"#;
const DEPTH_ANYTHING_PROCESSOR: &str = r#"{"size": {"height": 518, "width": 518}, "keep_aspect_ratio": true, "ensure_multiple_of": 14, "resample": 3,
  "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}"#;
// Batch norms in the fusion units would be folded into the convolutions: the same cost without them.
const DPT_HYBRID_MIDAS: &str = r#"{"model_type": "dpt", "is_hybrid": true, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
  "intermediate_size": 3072, "image_size": 384, "patch_size": 16, "backbone_out_indices": [2, 5, 8, 11], "readout_type": "project",
  "reassemble_factors": [4, 2, 1, 0.5], "neck_hidden_sizes": [256, 512, 768, 768], "fusion_hidden_size": 256,
  "backbone_featmap_shape": [1, 1024, 24, 24],
  "backbone_config": {"model_type": "bit", "embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 9],
    "layer_type": "bottleneck", "global_padding": "same", "num_groups": 32, "embedding_dynamic_padding": true,
    "out_features": ["stage1", "stage2", "stage3"]}}"#;
const DPT_PROCESSOR: &str = r#"{"size": {"height": 384, "width": 384}, "keep_aspect_ratio": false, "ensure_multiple_of": 1, "resample": 3,
  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#;

/// A published estimator `name` (one of [`DEPTH_ARCHITECTURES`]) with seeded random weights.
pub async fn random_estimator(gpu: &Gpu, name: &str, dtype: DType) -> Result<DepthEstimator> {
    let (config, processor) = match name {
        "depth-anything-v2-small" => (DEPTH_ANYTHING_V2_SMALL, DEPTH_ANYTHING_PROCESSOR),
        "dpt-hybrid-midas" => (DPT_HYBRID_MIDAS, DPT_PROCESSOR),
        other => return Err(Error::Input(format!("unknown depth architecture {other:?} (one of {})", DEPTH_ARCHITECTURES.join(", ")))),
    };
    let bad = |what: &str, e: serde_json::Error| Error::Model(format!("built-in {what}: {e}"));
    let config: serde_json::Value = serde_json::from_str(config).map_err(|e| bad("config", e))?;
    let processor: DptImageProcessorConfig = serde_json::from_str(processor).map_err(|e| bad("image processor", e))?;
    let empty = StaticSource::new("random", &[]);
    let weights = Weights::random(&empty, 0);
    DepthEstimator::from_config(&weights.at(gpu, dtype, ""), &config, processor).await
}

/// A smooth synthetic RGB photo of `width` x `height` for the benchmark: an estimator's time
/// depends on the size only.
pub fn synthetic_photo(width: usize, height: usize) -> Result<InputImage> {
    InputImage::new(width, height, Channels::Rgb, false, (0..width * height * 3).map(|i| ((i * 7 / 3) % 251) as u16).collect())
}

/// `ldm bench depth` and `bench.html?mode=depth`: times `load` (the estimator's weights), a first
/// estimate (which compiles its kernels) and a second one on `img`; returns the JSON report.
pub async fn run(
    gpu: &Gpu,
    model: &str,
    load: impl Future<Output = Result<DepthEstimator>>,
    img: &InputImage,
    now_ms: &dyn Fn() -> f64,
) -> Result<serde_json::Value> {
    let start = now_ms();
    let est = load.await?;
    let load_ms = now_ms() - start;
    let t = now_ms();
    est.predict(gpu, img).await?;
    let first_ms = now_ms() - t;
    let t = now_ms();
    est.predict(gpu, img).await?;
    let estimate_ms = now_ms() - t;
    let (h, w) = est.processor.output_size(img.height, img.width);
    Ok(serde_json::json!({
        "model": model, "adapter": gpu.summary(), "dtype": format!("{:?}", est.dtype), "image": [img.width, img.height], "model_input": [w, h],
        "load_ms": load_ms, "first_ms": first_ms, "estimate_ms": estimate_ms, "peak_gpu_bytes": gpu.pool_stats().peak_bytes,
    }))
}
