//! `ldm depth`: a depth map from a photo with a DPT or Depth Anything estimator; `ldm bench
//! depth`: its time.

use std::path::Path;

use clap::Args;
use ldm_web::gpu::{DType, Gpu, GpuOptions};
use ldm_web::loader::DirSource;
use ldm_web::pipelines::depth::DepthEstimator;
use ldm_web::bench::depth::{random_estimator, synthetic_photo, DEPTH_ARCHITECTURES};
use ldm_web::pipelines::image_input::InputImage;
use ldm_web::{Error, Result};

/// Arguments of `ldm depth`.
#[derive(Args, Debug)]
pub struct DepthArgs {
    /// A transformers depth-estimation folder (DPT, DPT-Hybrid, Depth Anything V1/V2: config.json, model.safetensors, preprocessor_config.json); for `ldm bench depth` also depth-anything-v2-small or dpt-hybrid-midas (the published architectures with random weights).
    #[arg(long)]
    pub model: String,
    /// The photo (PNG, JPEG or WebP, any size and mode); `ldm bench depth` defaults to a 512x512 one.
    #[arg(long)]
    pub image: Option<String>,
    /// Where to write the depth map: a 16-bit gray PNG at the photo's size, larger = nearer, min-max normalised.
    #[arg(long, default_value = "depth.png")]
    pub out: String,
    /// 8 for the 8-bit image transformers' depth-estimation pipeline gives (what depth ControlNets were trained with), 16 for more levels.
    #[arg(long, default_value = "16", value_parser = ["8", "16"])]
    pub bits: String,
    /// Compute in f16 (default f32).
    #[arg(long)]
    pub f16: bool,
}

/// Loads an estimator folder.
pub async fn load_estimator(gpu: &Gpu, dir: &str, dtype: DType) -> Result<DepthEstimator> {
    let path = Path::new(dir);
    if !path.join("config.json").is_file() {
        return Err(Error::Input(format!("{dir}: not a depth estimator folder (no config.json)")));
    }
    DepthEstimator::load(gpu, &DirSource::new(path), "", "", dtype).await
}

/// Runs `ldm depth` (or `ldm bench depth`, which prints the times as JSON).
pub fn run(a: &DepthArgs, bench: bool) -> Result<String> {
    let img = match (&a.image, bench) {
        (Some(path), _) => crate::generate::read_image(path, "image")?,
        (None, true) => synthetic_photo(512, 512)?,
        (None, false) => return Err(Error::Input("ldm depth needs --image FILE (the photo)".into())),
    };
    pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: !a.f16, ..Default::default() }).await?;
        let dtype = gpu.activation_dtype();
        if bench {
            let start = std::time::Instant::now();
            let now_ms = || start.elapsed().as_secs_f64() * 1e3;
            let load = async {
                if DEPTH_ARCHITECTURES.contains(&a.model.as_str()) { random_estimator(&gpu, &a.model, dtype).await } else { load_estimator(&gpu, &a.model, dtype).await }
            };
            let report = ldm_web::bench::depth::run(&gpu, &a.model, load, &img, &now_ms).await?;
            return serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()));
        }
        let depth = load_estimator(&gpu, &a.model, dtype).await?.predict(&gpu, &img).await?;
        let png = if a.bits == "8" {
            encode_gray(&ldm_web::pipelines::depth::depth_to_image(&depth, img.width, img.height)?, false)?
        } else {
            encode_gray(&ldm_web::pipelines::depth::depth_to_image16(&depth, img.width, img.height)?, true)?
        };
        std::fs::write(&a.out, png).map_err(|e| Error::Io(format!("cannot write {}: {e}", a.out)))?;
        Ok(format!("wrote {} ({}x{}, {}-bit)", a.out, img.width, img.height, a.bits))
    })
}

fn encode_gray(img: &InputImage, sixteen: bool) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(if sixteen { png::BitDepth::Sixteen } else { png::BitDepth::Eight });
        let data: Vec<u8> = if sixteen { img.data.iter().flat_map(|v| v.to_be_bytes()).collect() } else { img.data.iter().map(|&v| v as u8).collect() };
        let bad = |e: png::EncodingError| Error::Io(format!("PNG encoding: {e}"));
        enc.write_header().map_err(bad)?.write_image_data(&data).map_err(bad)?;
    }
    Ok(out)
}
