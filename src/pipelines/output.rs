//! What leaves a pipeline: PNG files carrying their generation settings in the `parameters` text
//! chunk AUTOMATIC1111 and ComfyUI read, the same natively and in the browser.

use super::stable_diffusion::Txt2ImgParams;
use crate::error::{Error, Result};
use crate::schedulers::SchedulerKind;

/// A1111's sampler names, so the PNG reads as users of those tools expect.
pub fn sampler_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "DDIM",
        SchedulerKind::Pndm => "PLMS",
        SchedulerKind::Ddpm => "DDPM",
        SchedulerKind::Euler => "Euler",
        SchedulerKind::EulerAncestral => "Euler a",
        SchedulerKind::Heun => "Heun",
        SchedulerKind::Lms => "LMS",
        SchedulerKind::DpmPp2m => "DPM++ 2M",
        SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        SchedulerKind::DpmPp2mSdeKarras => "DPM++ 2M SDE Karras",
        SchedulerKind::UniPc => "UniPC",
        SchedulerKind::Lcm => "LCM",
    }
}

/// The `parameters` text of image `index` of a batch.
pub fn parameters_text(p: &Txt2ImgParams, kind: SchedulerKind, model: &str, index: usize) -> String {
    parameters_text_with(p, kind, model, index, &[], None)
}

/// [`parameters_text`] with the LoRAs applied (A1111's `<lora:NAME:SCALE>` prompt tags) and an
/// SDXL refiner with its switch point.
pub fn parameters_text_with(p: &Txt2ImgParams, kind: SchedulerKind, model: &str, index: usize, loras: &[(String, f32)], refiner: Option<(&str, f32)>) -> String {
    let mut s = p.prompt.clone();
    for (name, scale) in loras {
        let stem = name.rsplit('/').next().unwrap_or(name);
        let stem = stem.rsplit_once('.').map_or(stem, |(a, _)| a);
        s.push_str(&format!(" <lora:{stem}:{scale}>"));
    }
    if let Some(n) = &p.negative_prompt {
        s.push_str(&format!("\nNegative prompt: {n}"));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        p.steps, sampler_name(kind), p.guidance_scale, p.seed, p.width, p.height, model
    ));
    if p.eta != 0.0 {
        s.push_str(&format!(", Eta: {}", p.eta));
    }
    if p.clip_skip > 0 {
        s.push_str(&format!(", Clip skip: {}", p.clip_skip + 1));
    }
    if p.batch > 1 {
        s.push_str(&format!(", Batch size: {}, Batch pos: {index}", p.batch));
    }
    if let Some((name, at)) = refiner {
        s.push_str(&format!(", Refiner: {name}, Refiner switch at: {at}"));
    }
    if p.prompt_weighting == super::prompt::PromptWeighting::None {
        // A1111 parses (x:1.2) in prompts; say that these were read as plain text.
        s.push_str(", Emphasis: None");
    }
    s
}

/// An 8-bit RGB PNG with a `parameters` text chunk.
pub fn encode_png(width: usize, height: usize, rgb: &[u8], parameters: &str) -> Result<Vec<u8>> {
    let err = |e: &dyn std::fmt::Display| Error::Io(format!("cannot encode the PNG: {e}"));
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // tEXt is Latin-1; A1111 writes prompts with other characters as iTXt.
    if parameters.chars().all(|c| (c as u32) < 256) {
        enc.add_text_chunk("parameters".into(), parameters.into()).map_err(|e| err(&e))?;
    } else {
        enc.add_itxt_chunk("parameters".into(), parameters.into()).map_err(|e| err(&e))?;
    }
    let mut w = enc.write_header().map_err(|e| err(&e))?;
    w.write_image_data(rgb).map_err(|e| err(&e))?;
    w.finish().map_err(|e| err(&e))?;
    Ok(out)
}

/// One measured generation, as `ldm bench generate` prints it and `bench.html?mode=generate` shows
/// it: one schema for both.
pub struct GenerateBench<'a> {
    pub model: &'a str,
    pub adapter: &'a crate::gpu::AdapterSummary,
    pub params: &'a Txt2ImgParams,
    pub scheduler: SchedulerKind,
    pub load_ms: f64,
    pub warmup_ms: f64,
    pub times: &'a super::StageTimes,
    pub peak_gpu_bytes: u64,
}

impl GenerateBench<'_> {
    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let (p, steps) = (self.params, &self.times.unet_steps_ms);
        serde_json::json!({
            "model": self.model, "adapter": self.adapter, "width": p.width, "height": p.height, "steps": p.steps, "batch": p.batch,
            "scheduler": sampler_name(self.scheduler),
            "load_ms": self.load_ms,
            "warmup_ms": self.warmup_ms,
            "text_encoder_ms": self.times.text_encoder_ms,
            "unet_step_ms": { "mean": steps.iter().sum::<f64>() / steps.len().max(1) as f64, "min": steps.iter().copied().fold(f64::INFINITY, f64::min), "each": steps },
            "vae_decode_ms": self.times.vae_decode_ms,
            "peak_gpu_bytes": self.peak_gpu_bytes,
        })
    }
}
