//! The images that steer a Stable Diffusion generation besides the prompt, and the task they
//! make of it: img2img (SDEdit), inpainting with a dedicated 9-channel UNet or by latent
//! blending, depth-to-image (5-channel UNets). Each is diffusers' pipeline of the same name.

use crate::error::{Error, Result};
use crate::models::ControlNetModel;

/// A depth map as the user gave it: any size, any scale (min-max normalised by the pipeline).
#[derive(Clone, Debug)]
pub struct DepthMap {
    pub width: usize,
    pub height: usize,
    /// `height * width` values.
    pub data: Vec<f32>,
}

/// One ControlNet and its condition image (diffusers' `StableDiffusionControlNetPipeline`
/// arguments for it).
#[derive(Clone)]
pub struct Control<'m> {
    pub model: &'m ControlNetModel,
    /// `[3, H, W]` RGB in [0, 1] at the output size.
    pub image: Vec<f32>,
    /// `controlnet_conditioning_scale`.
    pub scale: f32,
    /// `control_guidance_start` / `control_guidance_end`: the part of the schedule it acts on.
    pub start: f32,
    pub end: f32,
}

/// Images steering a generation, already at the output size (see `image_input`).
#[derive(Clone, Default)]
pub struct ImageConditions<'m> {
    /// img2img, inpainting, depth-to-image: `[3, H, W]` in `[-1, 1]`.
    pub init: Option<Vec<f32>>,
    /// Where on the schedule to start, 0 to 1 (`None`: the pipeline's default, 0.8 for img2img
    /// and depth-to-image, 1 for inpainting, as diffusers).
    pub strength: Option<f32>,
    /// Inpainting: `[H, W]` of 0 (keep) and 1 (repaint).
    pub mask: Option<Vec<f32>>,
    /// Depth-to-image.
    pub depth: Option<DepthMap>,
    /// ControlNets, their residuals summed (diffusers' `MultiControlNetModel`).
    pub controls: Vec<Control<'m>>,
    /// Guess mode: the ControlNets see only the conditional half of guidance, their residuals
    /// weighted from 0.1 (first skip) to 1 (mid block).
    pub guess_mode: bool,
    /// x4 upscaling: how much noise is added to the low-resolution image (`init`, at the
    /// latent size), 0 to the model's `max_noise_level` (`None`: 20, as diffusers).
    pub noise_level: Option<u32>,
    /// SDXL img2img from latents instead of an image (`[B or 1, z, h, w]`, scaled as the UNet
    /// sees them): the base model's result handed to the refiner.
    pub init_latents: Option<Vec<f32>>,
}

impl Control<'_> {
    /// diffusers' `controlnet_keep` for step `i` of `n`: 1 inside `[start, end]`, else 0.
    pub fn keep(&self, i: usize, n: usize) -> f32 {
        let (a, b) = (i as f32 / n as f32, (i + 1) as f32 / n as f32);
        if a < self.start || b > self.end { 0.0 } else { 1.0 }
    }
}

/// What a generation is, from the UNet's input channels and the images given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    TextToImage,
    ImageToImage,
    /// `unet_mask`: the UNet takes the mask and masked image (9 channels); else latents are
    /// blended under the mask after every step.
    Inpaint { unet_mask: bool },
    Depth,
    /// `StableDiffusionUpscalePipeline`: the UNet takes the noised low-resolution image (3
    /// more channels) and its noise level as class label.
    Upscale,
}

impl Task {
    /// The task for a UNet of `in_channels` (and `latent_channels` latents) given `c`, or why
    /// the inputs do not fit the model.
    pub fn choose(in_channels: usize, latent_channels: usize, c: &ImageConditions) -> Result<Self> {
        let (init, mask, depth) = (c.init.is_some() || c.init_latents.is_some(), c.mask.is_some(), c.depth.is_some());
        let z = latent_channels;
        let task = if in_channels == 2 * z + 1 {
            if !init || !mask {
                return Err(Error::Input("this is an inpainting model: give an init image and a mask (white = repaint)".into()));
            }
            Task::Inpaint { unet_mask: true }
        } else if in_channels == z + 3 {
            if !init || mask || depth {
                return Err(Error::Input("this is an upscaling model: give the low-resolution image as the init image (no mask or depth map)".into()));
            }
            Task::Upscale
        } else if in_channels == z + 1 {
            if !init || !depth {
                return Err(Error::Input("this is a depth-to-image model: give an init image and a depth map (or a folder with its own depth_estimator/ estimates one)".into()));
            }
            Task::Depth
        } else if in_channels == z {
            match (init, mask) {
                (true, true) => Task::Inpaint { unet_mask: false },
                (true, false) => Task::ImageToImage,
                (false, true) => return Err(Error::Input("a mask needs an init image to repaint".into())),
                (false, false) => Task::TextToImage,
            }
        } else {
            return Err(Error::Model(format!("a UNet with {in_channels} input channels is not a Stable Diffusion model ldm-web runs ({z}, {}, {} or {})", z + 1, z + 3, 2 * z + 1)));
        };
        if depth && task != Task::Depth {
            return Err(Error::Input("a depth map needs a depth-to-image model (a UNet with 5 input channels, like stable-diffusion-2-depth)".into()));
        }
        if mask && !matches!(task, Task::Inpaint { .. }) {
            return Err(Error::Input("this model does not inpaint with a mask".into()));
        }
        for ctl in &c.controls {
            if !(0.0..=1.0).contains(&ctl.start) || !(ctl.start..=1.0).contains(&ctl.end) || !ctl.scale.is_finite() {
                return Err(Error::Input(format!("ControlNet start {} and end {} must satisfy 0 <= start <= end <= 1, and its scale {} be finite", ctl.start, ctl.end, ctl.scale)));
            }
        }
        if let Some(s) = c.strength {
            if matches!(task, Task::TextToImage | Task::Upscale) {
                return Err(Error::Input("strength needs an init image to start from (img2img, inpainting, depth-to-image)".into()));
            }
            if !(0.0..=1.0).contains(&s) {
                return Err(Error::Input(format!("strength must be between 0 and 1, got {s}")));
            }
        }
        if c.noise_level.is_some() && task != Task::Upscale {
            return Err(Error::Input("a noise level is for upscaling models (a UNet with 7 input channels, like stable-diffusion-x4-upscaler)".into()));
        }
        Ok(task)
    }

    /// diffusers' default `strength`.
    pub fn default_strength(self) -> f32 {
        match self {
            Task::Inpaint { .. } => 1.0,
            _ => 0.8,
        }
    }
}

/// diffusers' `get_timesteps`: the index of the first timestep for `strength` of `steps`
/// (times the scheduler's order), and the steps that remain.
pub fn start_for_strength(steps: usize, strength: f32, order: usize) -> (usize, usize) {
    let init = ((steps as f32 * strength) as usize).min(steps);
    let t_start = steps - init;
    (t_start * order, steps - t_start)
}

pub use crate::ops::layout::Interpolation;
use crate::ops::layout::{interpolate_reference, Coordinates};

/// `interpolate(x, size=(out_h, out_w), mode)` of an `[H, W]` plane (on the CPU).
pub fn interpolate(plane: &[f32], w: usize, h: usize, out_w: usize, out_h: usize, mode: Interpolation) -> Vec<f32> {
    interpolate_reference(plane, 1, (h, w), (out_h, out_w), mode, Coordinates::HalfPixel)
}

/// `interpolate(x, scale_factor=scale, mode)` of an `[H, W]` plane: sides `floor(side * scale)`,
/// source coordinates scaled by `1 / scale`. Returns the plane and its width and height.
pub fn interpolate_by(plane: &[f32], w: usize, h: usize, scale: f64, mode: Interpolation) -> Result<(Vec<f32>, usize, usize)> {
    let (out_w, out_h) = ((w as f64 * scale).floor() as usize, (h as f64 * scale).floor() as usize);
    if !(scale > 0.0 && scale.is_finite()) || out_w == 0 || out_h == 0 || out_w > 1 << 14 || out_h > 1 << 14 {
        return Err(Error::Input(format!("scaling a {w}x{h} condition by {scale} gives no usable size")));
    }
    Ok((interpolate_reference(plane, 1, (h, w), (out_h, out_w), mode, Coordinates::ScaleFactor(scale, scale)), out_w, out_h))
}

/// diffusers' `prepare_depth_map` for a given map: bicubic to the latent size, then min-max
/// normalised to `[-1, 1]`.
pub fn depth_latent(d: &DepthMap, out_w: usize, out_h: usize) -> Result<Vec<f32>> {
    if d.data.len() != d.width * d.height || d.data.is_empty() {
        return Err(Error::Input(format!("the depth map has {} values for {}x{}", d.data.len(), d.width, d.height)));
    }
    let v = interpolate(&d.data, d.width, d.height, out_w, out_h, Interpolation::Bicubic);
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    if !(hi > lo) {
        return Err(Error::Input("the depth map is flat (one value everywhere); give an image with near and far parts".into()));
    }
    Ok(v.iter().map(|&x| 2.0 * (x - lo) / (hi - lo) - 1.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_cuts_the_schedule_as_diffusers() {
        assert_eq!(start_for_strength(50, 0.8, 1), (10, 40));
        assert_eq!(start_for_strength(5, 0.75, 1), (2, 3));
        assert_eq!(start_for_strength(4, 0.3, 2), (6, 1));
        assert_eq!(start_for_strength(5, 1.0, 1), (0, 5));
    }

    #[test]
    fn resampling_keeps_constants_and_picks_nearest_as_torch() {
        let flat = vec![3.5f32; 7 * 5];
        for mode in [Interpolation::Nearest, Interpolation::Bilinear, Interpolation::Bicubic, Interpolation::Area] {
            assert!(interpolate(&flat, 7, 5, 12, 3, mode).iter().all(|&v| (v - 3.5).abs() < 1e-5), "{mode:?}");
        }
        let plane: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(interpolate(&plane, 4, 4, 2, 2, Interpolation::Nearest), vec![0.0, 2.0, 8.0, 10.0]);
        // Halving: bilinear and area both average each 2x2 block.
        let avg = vec![2.5, 4.5, 10.5, 12.5];
        assert_eq!(interpolate(&plane, 4, 4, 2, 2, Interpolation::Bilinear), avg);
        assert_eq!(interpolate_by(&plane, 4, 4, 0.5, Interpolation::Area).unwrap(), (avg, 2, 2));
        // Identity size: bicubic reproduces the input.
        let same = interpolate(&plane, 4, 4, 4, 4, Interpolation::Bicubic);
        assert!(same.iter().zip(&plane).all(|(a, b)| (a - b).abs() < 1e-5));
        // scale_factor on an odd side: floor(5 * 0.5) = 2 outputs sampled at ratio 2, not 2.5.
        let rows: Vec<f32> = (0..10).map(|v| (v % 5) as f32).collect();
        assert_eq!(interpolate_by(&rows, 5, 2, 0.5, Interpolation::Bilinear).unwrap(), (vec![0.5, 2.5], 2, 1));
        assert!(interpolate_by(&rows, 5, 2, 0.1, Interpolation::Bilinear).is_err());
    }
}
