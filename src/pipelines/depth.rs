//! Depth from a photo: transformers' `DPTImageProcessor` (resizing as PIL does, rescale,
//! normalise), a DPT or Depth Anything estimator, and what is made of its prediction: the
//! depth-estimation pipeline's 8-bit image (bicubic to the photo's size, min-max to 0..255) for
//! depth ControlNets and `ldm depth`, or the raw prediction for depth-to-image, which normalises
//! it itself as diffusers' `prepare_depth_map` does.

use serde::Deserialize;

use super::conditions::DepthMap;
use super::image_input::{resize_u8, InputImage, Resample};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::loader::{component_files, join_path, read_json, FileSource, Weights, W};
use crate::models::{DPTForDepthEstimation, DepthAnythingForDepthEstimation};
use crate::ops::layout::{interpolate_reference, Coordinates, Interpolation};

/// `preprocessor_config.json` of a `DPTImageProcessor`; unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DptImageProcessorConfig {
    pub do_resize: bool,
    pub size: ProcessorSize,
    pub keep_aspect_ratio: bool,
    pub ensure_multiple_of: usize,
    /// PIL's filter number (1 Lanczos, 2 bilinear, 3 bicubic).
    pub resample: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    pub do_pad: bool,
    pub size_divisor: Option<usize>,
}

/// `size`: `{height, width}` (or one number for both).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
pub enum ProcessorSize {
    HeightWidth { height: usize, width: usize },
    Square(usize),
}

impl Default for DptImageProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true, size: ProcessorSize::HeightWidth { height: 384, width: 384 }, keep_aspect_ratio: false, ensure_multiple_of: 1, resample: 3,
            do_rescale: true, rescale_factor: 1.0 / 255.0, do_normalize: true, image_mean: vec![0.5; 3], image_std: vec![0.5; 3], do_pad: false, size_divisor: None,
        }
    }
}

impl DptImageProcessorConfig {
    /// transformers' `get_resize_output_image_size`: both sides scaled (by the one nearer 1 when
    /// keeping the aspect ratio), rounded half-even to a multiple of `ensure_multiple_of`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        if !self.do_resize {
            return (height, width);
        }
        let (th, tw) = match self.size {
            ProcessorSize::HeightWidth { height, width } => (height, width),
            ProcessorSize::Square(s) => (s, s),
        };
        let (mut sh, mut sw) = (th as f64 / height as f64, tw as f64 / width as f64);
        if self.keep_aspect_ratio {
            if (1.0 - sw).abs() < (1.0 - sh).abs() {
                sh = sw;
            } else {
                sw = sh;
            }
        }
        let m = self.ensure_multiple_of.max(1) as f64;
        let fit = |v: f64| {
            let x = (v / m).round_ties_even() * m;
            (if x < 0.0 { (v / m).ceil() * m } else { x }) as usize
        };
        (fit(sh * height as f64), fit(sw * width as f64))
    }

    fn filter(&self) -> Result<Resample> {
        match self.resample {
            1 => Ok(Resample::Lanczos),
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            r => Err(Error::Model(format!("image processor resample {r} is not supported (1 Lanczos, 2 bilinear, 3 bicubic are)"))),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.do_pad && self.size_divisor.is_some_and(|d| d > 1) {
            return Err(Error::Model("image processor do_pad with a size_divisor is not supported".into()));
        }
        if self.do_normalize && (self.image_mean.len() != 3 || self.image_std.len() != 3 || self.image_std.contains(&0.0)) {
            return Err(Error::Model("image processor image_mean and image_std must have 3 values, std not 0".into()));
        }
        self.filter().map(|_| ())
    }

    /// `pixel_values` `[3, H, W]` of an image (its RGB, as `load_image` gives) and their size.
    pub fn preprocess(&self, img: &InputImage) -> Result<(Vec<f32>, usize, usize)> {
        self.validate()?;
        let (h, w) = self.output_size(img.height, img.width);
        if h == 0 || w == 0 {
            return Err(Error::Input(format!("a {}x{} image resizes to nothing for this depth estimator", img.width, img.height)));
        }
        let rgb = img.rgb8();
        let rgb = if (img.width, img.height) == (w, h) { rgb } else { resize_u8(&rgb, img.width, img.height, 3, w, h, self.filter()?) };
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                // np_rescale multiplies in f64 and stores f32; normalising runs in f32.
                let mut v = if self.do_rescale { (px[c] as f64 * self.rescale_factor) as f32 } else { px[c] as f32 };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                out[c * h * w + i] = v;
            }
        }
        Ok((out, h, w))
    }
}

/// A monocular depth estimator.
pub enum DepthModel {
    Dpt(Box<DPTForDepthEstimation>),
    DepthAnything(Box<DepthAnythingForDepthEstimation>),
}

/// A depth estimator with its image processor.
pub struct DepthEstimator {
    pub model: DepthModel,
    pub processor: DptImageProcessorConfig,
    /// What it computes in.
    pub dtype: DType,
}

impl DepthEstimator {
    /// Loads the estimator in `dir` of `src` (`config.json` naming `dpt` or `depth_anything`,
    /// `model.safetensors`) and the image processor in `processor_dir`.
    pub async fn load(gpu: &Gpu, src: &dyn FileSource, dir: &str, processor_dir: &str, dtype: DType) -> Result<Self> {
        let cfg_path = join_path(dir, "config.json");
        let cfg: serde_json::Value = read_json(src, &cfg_path).await?.ok_or_else(|| Error::Model(format!("{} is missing; is this a transformers depth-estimation folder?", src.describe(&cfg_path))))?;
        let proc_path = join_path(processor_dir, "preprocessor_config.json");
        let processor: DptImageProcessorConfig = read_json(src, &proc_path).await?.ok_or_else(|| Error::Model(format!("{} is missing (the depth estimator's image processor)", src.describe(&proc_path))))?;
        processor.validate()?;
        let weights = Weights::new(src, component_files(src, dir, "model", false).await?);
        Self::from_config(&weights.at(gpu, dtype, ""), &cfg, processor).await.map_err(|e| match e {
            Error::Model(m) => Error::Model(format!("depth estimator {}: {m}", src.describe(dir))),
            other => other,
        })
    }

    /// The estimator `config` (a transformers `config.json`) describes, weights from `w`.
    pub async fn from_config(w: &W<'_, '_>, config: &serde_json::Value, processor: DptImageProcessorConfig) -> Result<Self> {
        processor.validate()?;
        let bad = |what: &str, e: serde_json::Error| Error::Model(format!("not a {what} config.json: {e}"));
        let model = match config.get("model_type").and_then(|t| t.as_str()) {
            Some("dpt") => DepthModel::Dpt(Box::new(DPTForDepthEstimation::load(w, serde_json::from_value(config.clone()).map_err(|e| bad("DPT", e))?).await?)),
            Some("depth_anything") => {
                DepthModel::DepthAnything(Box::new(DepthAnythingForDepthEstimation::load(w, serde_json::from_value(config.clone()).map_err(|e| bad("Depth Anything", e))?).await?))
            }
            other => return Err(Error::Model(format!("model_type {other:?} is not a supported depth estimator (dpt, depth_anything)"))),
        };
        Ok(Self { model, processor, dtype: w.dtype })
    }

    /// `predicted_depth` for `img`: larger is nearer (relative inverse depth), at the model's
    /// output size.
    pub async fn predict(&self, gpu: &Gpu, img: &InputImage) -> Result<DepthMap> {
        let (pixels, h, w) = self.processor.preprocess(img)?;
        let x = gpu.upload(&[1, 3, h, w], self.dtype, &pixels)?;
        let depth = match &self.model {
            DepthModel::Dpt(m) => m.forward(gpu, &x)?,
            DepthModel::DepthAnything(m) => m.forward(gpu, &x)?,
        };
        let (dh, dw) = (depth.dim(1), depth.dim(2));
        Ok(DepthMap { width: dw, height: dh, data: gpu.read(&depth).await? })
    }

    /// transformers' `pipeline("depth-estimation")(img)["depth"]`: the prediction bicubically
    /// resized to the image's size, min-max normalised, times 255, truncated to 8 bits.
    pub async fn depth_image(&self, gpu: &Gpu, img: &InputImage) -> Result<InputImage> {
        let d = self.predict(gpu, img).await?;
        depth_to_image(&d, img.width, img.height)
    }
}

/// The depth-estimation pipeline's post-processing of a prediction, as an 8-bit gray image.
pub fn depth_to_image(d: &DepthMap, width: usize, height: usize) -> Result<InputImage> {
    let px = normalised(d, width, height).iter().map(|&n| (n * 255.0) as u16).collect();
    InputImage::new(width, height, super::image_input::Channels::Gray, false, px)
}

/// The same map in 16 bits (rounded): what `ldm depth` writes by default.
pub fn depth_to_image16(d: &DepthMap, width: usize, height: usize) -> Result<InputImage> {
    let px = normalised(d, width, height).iter().map(|&n| (n * 65535.0).round() as u16).collect();
    InputImage::new(width, height, super::image_input::Channels::Gray, true, px)
}

/// The prediction bicubically resized to `width x height` and min-max normalised to [0, 1].
fn normalised(d: &DepthMap, width: usize, height: usize) -> Vec<f32> {
    let v = interpolate_reference(&d.data, 1, (d.height, d.width), (height, width), Interpolation::Bicubic, Coordinates::HalfPixel);
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    // A flat prediction divides 0 by 0 in transformers (NaN, cast to 0); it is all black here too.
    let range = hi - lo;
    v.iter().map(|&x| if range > 0.0 { (x - lo) / range } else { 0.0 }).collect()
}
