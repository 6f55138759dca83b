//! The engine as the page's Web Worker drives it: one GPU device, the loaded model, generations
//! with progress, previews and cancellation. After the device is lost or runs out of memory the
//! state is dropped, and the next call opens a fresh device and reloads the model (from the
//! worker's weight cache, so without the network).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use wasm_bindgen::prelude::*;

use super::source::JsSource;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, GpuOptions};
use crate::pipelines::output::{encode_png, parameters_text_with, GenerateBench};
use crate::pipelines::preview::LatentPreview;
use crate::models::ControlNetModel;
use crate::pipelines::canny::{canny_image, CannyParams};
use crate::pipelines::depth::DepthEstimator;
use crate::pipelines::image_input::{default_size, InputImage};
use crate::loader::lora::AdapterSet;
use crate::pipelines::prompt::Embedding;
use crate::pipelines::{DiffusionModel, ImageConditions, LdmImage, LdmKind, LdmModel, LoadOptions, StableDiffusionModel, StepProgress, Txt2ImgParams, UserImages, VaeSource};
use crate::schedulers::{self, SchedulerKind};

struct Loaded {
    key: String,
    model: DiffusionModel,
    preview: RefCell<LatentPreview>,
}

#[derive(Default)]
struct Engine {
    gpu: Option<Gpu>,
    model: Option<Rc<Loaded>>,
    /// The ControlNets of the last generation that used any, by URL and dtype.
    controlnets: Vec<(String, Rc<ControlNetModel>)>,
}

thread_local! {
    static ENGINE: RefCell<Engine> = RefCell::default();
    /// The depth estimator `preprocess_condition` loaded last, by URL.
    static ESTIMATOR: RefCell<Option<(String, Rc<DepthEstimator>)>> = RefCell::default();
    static CANCEL: Cell<bool> = const { Cell::new(false) };
    /// The CPU backend instead of the browser's WebGPU adapter (see [`set_device`]).
    static USE_CPU: Cell<bool> = const { Cell::new(false) };
}

/// Chooses where the next jobs compute: the CPU backend (`cpu`) or the browser's WebGPU
/// adapter. The worker decides (no WebGPU, or a fallback adapter, means the CPU unless the user
/// asked for the GPU); a change drops the device and the model on it.
#[wasm_bindgen]
pub fn set_device(cpu: bool) {
    if USE_CPU.get() != cpu {
        USE_CPU.set(cpu);
        reset_engine();
    }
}

/// The generation settings the page sends (JSON), named as the URL parameters.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    /// Empty (or missing) for unconditional models.
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    seed: u64,
    /// Default: the model's `ldm-web.json`, else 25.
    #[serde(default)]
    steps: Option<usize>,
    /// Default: the model's `ldm-web.json`, else 7.5.
    #[serde(default)]
    guidance: Option<f32>,
    #[serde(default)]
    width: Option<usize>,
    #[serde(default)]
    height: Option<usize>,
    #[serde(default)]
    scheduler: Option<String>,
    /// "auto" (f16 where the adapter has shader-f16), "f32" or "f16".
    #[serde(default)]
    precision: Option<String>,
    /// A preview every this many steps (0: none).
    #[serde(default = "default_preview_every")]
    preview_every: usize,
    /// img2img / inpainting / depth-to-image: where on the schedule to start (default: the
    /// pipeline's).
    #[serde(default)]
    strength: Option<f32>,
    #[serde(default)]
    mask_blur: f32,
    /// Upscalers.
    #[serde(default)]
    noise_level: Option<u32>,
    #[serde(default)]
    guess_mode: bool,
    #[serde(default)]
    control_start: Option<f32>,
    #[serde(default)]
    control_end: Option<f32>,
    /// SDXL's second encoder's prompts.
    #[serde(default)]
    prompt_2: Option<String>,
    #[serde(default)]
    negative_prompt_2: Option<String>,
    /// "none" (diffusers' plain text) or "a1111" (weights, BREAK, long prompts).
    #[serde(default)]
    prompt_weighting: Option<String>,
}

/// A file the page names by URL, with the weight store that reads its folder.
struct PageFile {
    url: String,
    store: JsValue,
    /// The file's name in the store's folder (empty for a folder).
    file: String,
}

/// What the page sends with a generation besides the settings: `{init?, mask?, depth?: PNG
/// bytes, controls?: [{url, store, image, scale}], loras?: [{url, store, file, scale}],
/// lora_merge?, embeddings?: [{url, store, file, token?}], vae?: {url, store}, tiny_vae?: {url,
/// store}}`.
struct PageImages {
    init: Option<InputImage>,
    mask: Option<InputImage>,
    depth: Option<InputImage>,
    controls: Vec<(String, JsValue, InputImage, f32)>,
    loras: Vec<(PageFile, f32)>,
    lora_merge: bool,
    embeddings: Vec<(PageFile, Option<String>)>,
    vae: Option<PageFile>,
    tiny_vae: Option<PageFile>,
    /// Decode the final image with the tiny autoencoder too.
    tiny_decode: bool,
}

fn page_file(v: &JsValue, what: &str) -> Result<PageFile> {
    let url = field(v, "url").and_then(|u| u.as_string()).ok_or_else(|| Error::Input(format!("the {what} has no URL")))?;
    let store = field(v, "store").ok_or_else(|| Error::Input(format!("the {what} {url} has no weight store")))?;
    let file = field(v, "file").and_then(|f| f.as_string()).unwrap_or_default();
    Ok(PageFile { url, store, file })
}

impl PageImages {
    /// A key for the model's extras: a model loaded with other adapters, embeddings or VAEs is
    /// another model.
    fn model_key(&self) -> String {
        let mut k = String::new();
        for (f, s) in &self.loras {
            k.push_str(&format!("|lora:{}:{s}", f.url));
        }
        if self.lora_merge {
            k.push_str("|merge");
        }
        for (f, t) in &self.embeddings {
            k.push_str(&format!("|emb:{}:{}", f.url, t.as_deref().unwrap_or("")));
        }
        for (what, f) in [("vae", &self.vae), ("tiny", &self.tiny_vae)] {
            if let Some(f) = f {
                k.push_str(&format!("|{what}:{}", f.url));
            }
        }
        if self.tiny_decode {
            k.push_str("|tiny-decode");
        }
        k
    }
}

fn field(obj: &JsValue, key: &str) -> Option<JsValue> {
    js_sys::Reflect::get(obj, &JsValue::from_str(key)).ok().filter(|v| !v.is_undefined() && !v.is_null())
}

fn png_field(obj: &JsValue, key: &str, what: &str) -> Result<Option<InputImage>> {
    let Some(v) = field(obj, key) else { return Ok(None) };
    let bytes = v.dyn_into::<js_sys::Uint8Array>().map_err(|_| Error::Input(format!("the {what} must be the bytes of a PNG file")))?;
    InputImage::from_png(&bytes.to_vec()).map(Some).map_err(|e| Error::Input(format!("the {what}: {e}")))
}

impl PageImages {
    fn read(inputs: &JsValue) -> Result<Self> {
        if inputs.is_undefined() || inputs.is_null() {
            return Ok(Self { init: None, mask: None, depth: None, controls: Vec::new(), loras: Vec::new(), lora_merge: false, embeddings: Vec::new(), vae: None, tiny_vae: None, tiny_decode: false });
        }
        let list = |key: &str| field(inputs, key).map(|l| js_sys::Array::from(&l).iter().collect::<Vec<_>>()).unwrap_or_default();
        let mut loras = Vec::new();
        for l in list("loras") {
            let f = page_file(&l, "LoRA")?;
            let scale = field(&l, "scale").and_then(|s| s.as_f64()).unwrap_or(1.0) as f32;
            if !scale.is_finite() {
                return Err(Error::Input(format!("LoRA {}: the scale must be a finite number", f.url)));
            }
            loras.push((f, scale));
        }
        let mut embeddings = Vec::new();
        for e in list("embeddings") {
            let token = field(&e, "token").and_then(|t| t.as_string()).filter(|t| !t.trim().is_empty());
            embeddings.push((page_file(&e, "embedding")?, token));
        }
        let vae = field(inputs, "vae").map(|v| page_file(&v, "VAE")).transpose()?;
        let tiny_vae = field(inputs, "tiny_vae").map(|v| page_file(&v, "tiny autoencoder")).transpose()?;
        let tiny_decode = field(inputs, "tiny_vae").and_then(|v| field(&v, "decode")).and_then(|d| d.as_bool()).unwrap_or(false);
        let lora_merge = field(inputs, "lora_merge").and_then(|v| v.as_bool()).unwrap_or(false);
        let mut controls = Vec::new();
        if let Some(list) = field(inputs, "controls") {
            for (i, c) in js_sys::Array::from(&list).iter().enumerate() {
                let url = field(&c, "url").and_then(|u| u.as_string()).ok_or_else(|| Error::Input(format!("ControlNet {}: no URL", i + 1)))?;
                let store = field(&c, "store").ok_or_else(|| Error::Input(format!("ControlNet {url}: no weight store")))?;
                let image = png_field(&c, "image", "condition image")?.ok_or_else(|| Error::Input(format!("ControlNet {url} needs a condition image")))?;
                let scale = field(&c, "scale").and_then(|s| s.as_f64()).unwrap_or(1.0) as f32;
                controls.push((url, store, image, scale));
            }
        }
        Ok(Self { init: png_field(inputs, "init", "init image")?, mask: png_field(inputs, "mask", "mask")?, depth: png_field(inputs, "depth", "depth map")?, controls, loras, lora_merge, embeddings, vae, tiny_vae, tiny_decode })
    }
}

/// The ControlNet at `url` in `dtype`, loaded through `store` unless the last generation used it.
async fn controlnet(gpu: &Gpu, url: &str, store: &JsValue, dtype: DType) -> Result<Rc<ControlNetModel>> {
    let key = format!("{url}#{}", dtype.name());
    if let Some(m) = ENGINE.with_borrow(|e| e.controlnets.iter().find(|(k, _)| *k == key).map(|(_, m)| m.clone())) {
        return Ok(m);
    }
    let src = JsSource::new(store.clone(), url.to_string());
    let opts = LoadOptions { prefer_fp16: dtype == DType::F16, dtype: Some(dtype), ..Default::default() };
    let net = Rc::new(crate::pipelines::load_controlnet(gpu, &src, "", &opts).await.map_err(|e| match e {
        Error::Model(m) => Error::Model(format!("ControlNet {url}: {m}")),
        other => other,
    })?);
    ENGINE.with_borrow_mut(|e| e.controlnets.push((key, net.clone())));
    Ok(net)
}

fn default_preview_every() -> usize {
    2
}

/// What the page gets back besides the PNG.
#[derive(serde::Serialize)]
struct GenerateInfo {
    model: String,
    width: usize,
    height: usize,
    steps: usize,
    seed: u64,
    scheduler: String,
    precision: &'static str,
    /// "gpu" (WebGPU) or "cpu" (the CPU backend), and what it is.
    device: &'static str,
    device_name: String,
    parameters: String,
    text_encoder_ms: f64,
    unet_steps_ms: Vec<f64>,
    vae_decode_ms: f64,
    load_ms: f64,
    total_ms: f64,
    peak_gpu_bytes: u64,
}

/// A JS `Error` whose `kind` tells the worker what to do: `cancelled`, `device-lost`,
/// `out-of-memory`, `input`, `model`, `io` or `gpu`.
pub fn to_js(e: &Error) -> JsValue {
    let kind = match e {
        Error::Cancelled => "cancelled",
        Error::DeviceLost(_) => "device-lost",
        Error::OutOfMemory(_) => "out-of-memory",
        Error::Input(_) | Error::BindingTooLarge { .. } | Error::BufferTooLarge { .. } => "input",
        Error::Model(_) => "model",
        Error::Io(_) => "io",
        _ => "gpu",
    };
    let err = js_sys::Error::new(&e.to_string());
    let _ = js_sys::Reflect::set(&err, &JsValue::from_str("kind"), &JsValue::from_str(kind));
    err.into()
}

/// Errors after which the device cannot be trusted: drop it, and everything on it.
pub(super) fn poisons_device(e: &Error) -> bool {
    matches!(e, Error::DeviceLost(_) | Error::OutOfMemory(_) | Error::Validation(_) | Error::Readback(_))
}

pub(super) fn now_ms() -> f64 {
    js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("performance"))
        .ok()
        .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
        .map_or_else(js_sys::Date::now, |p| p.now())
}

pub(super) async fn gpu() -> Result<Gpu> {
    if let Some(g) = ENGINE.with_borrow(|e| e.gpu.clone()) {
        g.check()?;
        return Ok(g);
    }
    let g = Gpu::new(GpuOptions { cpu: USE_CPU.get(), ..Default::default() }).await?;
    ENGINE.with_borrow_mut(|e| e.gpu = Some(g.clone()));
    Ok(g)
}

/// Drops the generation model (its weights leave the device); the next generation loads it again.
pub(crate) fn release_model(gpu: &Gpu) {
    ENGINE.with_borrow_mut(|e| e.model = None);
    gpu.trim_pool();
}

/// Drops the device and the model on it; the next call starts afresh.
#[wasm_bindgen]
pub fn reset_engine() {
    ENGINE.with_borrow_mut(|e| *e = Engine::default());
    ESTIMATOR.set(None);
}

/// The page's condition from a photo (a PNG): `kind` "canny" (`options_json` `{low, high, l2}`,
/// OpenCV's cv2.Canny) or "depth" (the depth-estimation pipeline's image from the estimator folder
/// at `estimator_url`, fetched through `store` like any model, kept for the next photo). Resolves
/// to the condition as PNG bytes at the photo's size.
#[wasm_bindgen]
pub async fn preprocess_condition(photo_png: Vec<u8>, kind: String, options_json: String, estimator_url: Option<String>, store: JsValue) -> Result<Vec<u8>, JsValue> {
    run_preprocess(&photo_png, &kind, &options_json, estimator_url, store).await.map_err(|e| to_js(&e))
}

async fn run_preprocess(photo_png: &[u8], kind: &str, options_json: &str, estimator_url: Option<String>, store: JsValue) -> Result<Vec<u8>> {
    #[derive(serde::Deserialize)]
    #[serde(default)]
    struct CannyOptions {
        low: f64,
        high: f64,
        l2: bool,
    }
    impl Default for CannyOptions {
        fn default() -> Self {
            let p = CannyParams::default();
            Self { low: p.low, high: p.high, l2: p.l2_gradient }
        }
    }
    let photo = InputImage::from_png(photo_png)?;
    let condition = match kind {
        "canny" => {
            let o: CannyOptions = serde_json::from_str(options_json).map_err(|e| Error::Input(format!("canny settings: {e}")))?;
            canny_image(&photo, CannyParams { low: o.low, high: o.high, l2_gradient: o.l2 })?
        }
        "depth" => {
            let url = estimator_url.ok_or_else(|| Error::Input("depth needs the URL of a depth estimator folder (Depth Anything V2, DPT)".into()))?;
            let cached = ESTIMATOR.with_borrow(|e| e.as_ref().filter(|(u, _)| *u == url).map(|(_, m)| m.clone()));
            let gpu = gpu().await?;
            let est = match cached {
                Some(e) => e,
                None => {
                    let e = Rc::new(DepthEstimator::load(&gpu, &JsSource::new(store, url.clone()), "", "", DType::F32).await?);
                    ESTIMATOR.set(Some((url, e.clone())));
                    e
                }
            };
            est.depth_image(&gpu, &photo).await?
        }
        other => return Err(Error::Input(format!("unknown condition kind {other:?} (canny or depth)"))),
    };
    encode_png(condition.width, condition.height, &condition.rgb8(), "")
}

/// Asks the running generation (or model load, or training run) to stop at its next step.
#[wasm_bindgen]
pub fn cancel() {
    CANCEL.set(true);
}

/// Whether [`cancel`] was asked since `reset` last cleared it.
pub(super) fn cancelled(reset: bool) -> bool {
    if reset {
        CANCEL.set(false);
    }
    CANCEL.get()
}

/// Opens the GPU device; resolves to the adapter's summary as JSON.
#[wasm_bindgen]
pub async fn adapter_info() -> Result<String, JsValue> {
    let g = gpu().await.map_err(|e| to_js(&e))?;
    serde_json::to_string(g.summary()).map_err(|e| to_js(&Error::Io(e.to_string())))
}

/// Destroys the device as a driver reset would, so the page's recovery can be tested.
#[wasm_bindgen]
pub fn simulate_device_loss() {
    if let Some(g) = ENGINE.with_borrow(|e| e.gpu.clone()) {
        g.lose_device("simulated by the page");
    }
}

/// Makes the next GPU call report an out-of-memory error, so the page's recovery can be tested.
#[wasm_bindgen]
pub fn simulate_out_of_memory() {
    if let Some(g) = ENGINE.with_borrow(|e| e.gpu.clone()) {
        g.inject_error(Error::OutOfMemory("simulated by the page".into()));
    }
}

fn dtype_for(gpu: &Gpu, precision: Option<&str>) -> Result<DType> {
    match precision.unwrap_or("auto") {
        "auto" => Ok(if gpu.supports(DType::F16) { DType::F16 } else { DType::F32 }),
        "f32" => Ok(DType::F32),
        "f16" if gpu.supports(DType::F16) => Ok(DType::F16),
        "f16" if gpu.is_cpu() => Err(Error::Input("the CPU backend computes in f32; choose f32 (or auto)".into())),
        "f16" => Err(Error::Input("this adapter has no shader-f16; choose f32 (or auto)".into())),
        other => Err(Error::Input(format!("precision must be auto, f32 or f16, not {other:?}"))),
    }
}

/// The loaded model at `model_url` in `dtype` with the page's extras (LoRAs, embeddings, VAEs),
/// loading it (without its VAE) when needed. Only one model is kept, so a new one frees the
/// previous one's GPU memory first. `vae_encoder`: the VAE encoder is needed (an init image); a
/// model loaded without it is loaded again with it, so text-to-image never fetches the encoder.
#[allow(clippy::too_many_arguments)]
async fn model(gpu: &Gpu, src: &JsSource, model_url: &str, single_file: Option<&str>, clip_bpe: Option<String>, dtype: DType, vae_encoder: bool, extras: &PageImages) -> Result<Rc<Loaded>> {
    let extra_key = extras.model_key();
    let key = |enc: bool| format!("{model_url}#{}{}{extra_key}", dtype.name(), if enc { "+encoder" } else { "" });
    let wanted = [key(true), key(vae_encoder)];
    if let Some(m) = ENGINE.with_borrow(|e| e.model.clone()).filter(|m| wanted.contains(&m.key)) {
        return Ok(m);
    }
    ENGINE.with_borrow_mut(|e| e.model = None);
    gpu.trim_pool();
    let key = key(vae_encoder);
    let adapters = if extras.loras.is_empty() {
        None
    } else {
        let mut set = AdapterSet::new();
        set.merge = extras.lora_merge;
        for (f, scale) in &extras.loras {
            set.add(Box::new(JsSource::new(f.store.clone(), f.url.clone())), &f.file, &f.url, *scale).await?;
        }
        Some(Rc::new(set))
    };
    let source = |f: &PageFile| VaeSource(Rc::new(JsSource::new(f.store.clone(), f.url.clone())));
    let opts = LoadOptions {
        defer_vae: true, prefer_fp16: dtype == DType::F16, dtype: Some(dtype), clip_bpe, vae_encoder, adapters,
        vae: extras.vae.as_ref().map(source), tiny_vae: extras.tiny_vae.as_ref().map(source), tiny_decode: extras.tiny_decode, ..Default::default()
    };
    let name = model_url.trim_end_matches('/').rsplit('/').next().unwrap_or("model").to_string();
    let mut model = match single_file {
        Some(file) => DiffusionModel::StableDiffusion(StableDiffusionModel::load_single_file(gpu, src, file, None, &opts).await?),
        None => DiffusionModel::load(gpu, src, &name, &opts).await?,
    };
    if !extras.embeddings.is_empty() {
        let DiffusionModel::StableDiffusion(m) = &mut model else { return Err(Error::Input("textual-inversion embeddings are for Stable Diffusion models".into())) };
        for (f, token) in &extras.embeddings {
            let esrc = JsSource::new(f.store.clone(), f.url.clone());
            let e = Embedding::read(&esrc, &f.file).await?;
            let stem = f.file.rsplit_once('.').map_or(f.file.as_str(), |(a, _)| a).to_string();
            let token = token.clone().or(e.token.clone()).unwrap_or(stem);
            m.text.add_embedding(gpu, &e, &token)?;
        }
    }
    if matches!(model, DiffusionModel::Ldm(_)) && (!extras.loras.is_empty() || extras.vae.is_some() || extras.tiny_vae.is_some()) {
        return Err(Error::Input("LoRAs and other VAEs are for Stable Diffusion models".into()));
    }
    let loaded = Rc::new(Loaded { key, model, preview: RefCell::default() });
    ENGINE.with_borrow_mut(|e| e.model = Some(loaded.clone()));
    Ok(loaded)
}

/// The scheduler `req` asks for, or the model's own.
fn scheduler_kind(req: &GenerateRequest, config: &serde_json::Value) -> Result<SchedulerKind> {
    match req.scheduler.as_deref().filter(|s| !s.is_empty() && *s != "default") {
        Some(s) => s.parse::<SchedulerKind>(),
        None => schedulers::default_kind(config),
    }
}

/// An LDM pipeline's settings for `req` (diffusers' defaults for what is not given), validated.
fn ldm_params(m: &LdmModel, req: GenerateRequest, image: Option<&LdmImage>) -> Result<(Txt2ImgParams, SchedulerKind)> {
    let kind = scheduler_kind(&req, &m.scheduler_config)?;
    if m.kind == LdmKind::SuperResolution {
        return Err(Error::Input("the page cannot give a super-resolution model its input image yet; use ldm generate --init-image".into()));
    }
    // As ldm generate: a condition image's size (rounded down to what the model divides) unless given.
    let (w, h) = match image {
        Some(LdmImage::Condition(img)) => default_size(img, None, None, m.size_multiple()),
        _ => m.default_size(),
    };
    let text = m.kind == LdmKind::TextToImage;
    let p = Txt2ImgParams {
        prompt: if text { req.prompt } else { String::new() },
        seed: req.seed,
        steps: req.steps.unwrap_or(m.kind.default_steps()),
        // Concatenation-conditioned models guide (a zero condition as the unconditional half)
        // only when trained for it; others ignore the page's guidance, as they did before.
        guidance_scale: if text || m.learnt_unconditional { req.guidance.unwrap_or(1.0) } else { 1.0 },
        width: req.width.unwrap_or(w),
        height: req.height.unwrap_or(h),
        scheduler: Some(kind),
        latent_preview_every: req.preview_every,
        ..Default::default()
    };
    m.validate(&p, image)?;
    Ok((p, kind))
}

/// The pipeline's settings and image conditions for `req`, with the model's defaults filled in,
/// validated (the same sizing as `ldm generate`).
fn params<'m>(m: &StableDiffusionModel, req: GenerateRequest, images: UserImages<'m>) -> Result<(Txt2ImgParams, SchedulerKind, ImageConditions<'m>)> {
    let kind = scheduler_kind(&req, &m.scheduler_config)?;
    let images = UserImages { strength: req.strength, mask_blur: req.mask_blur, noise_level: req.noise_level, guess_mode: req.guess_mode, control_start: req.control_start.unwrap_or(0.0), control_end: req.control_end.unwrap_or(1.0), ..images };
    let prepared = m.prepare_images(images, req.width, req.height)?;
    let (steps, guidance) = m.default_steps_guidance(25);
    let prompt_weighting = req.prompt_weighting.as_deref().unwrap_or("none").parse()?;
    let p = Txt2ImgParams {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt.filter(|n| !n.is_empty()),
        prompt_2: req.prompt_2.filter(|n| !n.is_empty()),
        negative_prompt_2: req.negative_prompt_2.filter(|n| !n.is_empty()),
        prompt_weighting,
        // The tiny autoencoder is cheap next to a UNet step: its real-colour preview every step.
        tiny_preview_every: if m.tiny_vae.is_some() && req.preview_every > 0 { 1 } else { 0 },
        latent_preview_every: if m.tiny_vae.is_some() { 0 } else { req.preview_every },
        seed: req.seed,
        steps: req.steps.or(m.hints.steps).unwrap_or(steps),
        guidance_scale: req.guidance.or(m.hints.guidance).unwrap_or(guidance),
        width: prepared.width,
        height: prepared.height,
        scheduler: Some(kind),
        ..Default::default()
    };
    m.validate(&p)?;
    m.task(&p, &prepared.conditions)?;
    Ok((p, kind, prepared.conditions))
}

pub(super) fn event(on_event: &js_sys::Function, kind: &str, fields: &[(&str, JsValue)]) {
    let obj = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&obj, &JsValue::from_str("type"), &JsValue::from_str(kind));
    for (k, v) in fields {
        let _ = js_sys::Reflect::set(&obj, &JsValue::from_str(k), v);
    }
    // A failing listener must not abort the generation.
    let _ = on_event.call1(&JsValue::NULL, &obj);
}

/// Generates one image. `store` reads the model's files (see `JsSource`); `model_url` names the
/// model (a diffusers folder URL, or the folder of `single_file`); `clip_bpe` is CLIP's merges for
/// single files. `on_event` receives `{type: 'stage', stage}`, `{type: 'step', step, steps, ms}`
/// and `{type: 'preview', step, width, height, rgba}`. Resolves to `{png, info}` (info: JSON).
#[wasm_bindgen]
pub async fn generate(model_url: String, store: JsValue, single_file: Option<String>, clip_bpe: Option<String>, request_json: String, images: JsValue, on_event: js_sys::Function) -> Result<JsValue, JsValue> {
    CANCEL.set(false);
    let result = run_generate(&model_url, store, single_file.as_deref(), clip_bpe, &request_json, &images, &on_event).await;
    if let Err(e) = &result {
        if poisons_device(e) {
            reset_engine();
        }
    }
    result.map_err(|e| to_js(&e))
}

async fn run_generate(model_url: &str, store: JsValue, single_file: Option<&str>, clip_bpe: Option<String>, request_json: &str, images: &JsValue, on_event: &js_sys::Function) -> Result<JsValue> {
    let t_start = now_ms();
    let req: GenerateRequest = serde_json::from_str(request_json).map_err(|e| Error::Input(format!("generation settings: {e}")))?;
    let page_images = PageImages::read(images)?;
    let src = JsSource::new(store, model_url.to_string());
    let gpu = gpu().await?;
    let dtype = dtype_for(&gpu, req.precision.as_deref())?;
    event(on_event, "stage", &[("stage", "load".into())]);
    let loaded = model(&gpu, &src, model_url, single_file, clip_bpe, dtype, page_images.init.is_some(), &page_images).await?;
    // ControlNets are fetched only when a generation uses them.
    let mut nets = Vec::new();
    for (url, store, _, _) in &page_images.controls {
        nets.push(controlnet(&gpu, url, store, dtype).await?);
    }
    ENGINE.with_borrow_mut(|e| e.controlnets.retain(|(k, _)| page_images.controls.iter().any(|(u, ..)| k.starts_with(&format!("{u}#")))));
    let load_ms = now_ms() - t_start;
    let preview = loaded.preview.borrow().clone();
    let mut last = now_ms();
    // Once denoising runs, the VAE's weights can download alongside it: the worker prefetches
    // the first of these files that exists (a single file holds the VAE with everything else).
    let vae_files: Vec<&str> = match (&loaded.model, single_file) {
        // A VAE of its own comes from elsewhere.
        _ if page_images.vae.is_some() => vec![],
        (DiffusionModel::StableDiffusion(m), None) if !m.vae_loaded() && dtype == DType::F16 => vec!["vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"],
        (DiffusionModel::StableDiffusion(m), None) if !m.vae_loaded() => vec!["vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"],
        _ => vec![],
    };
    let mut progress = |s: &StepProgress| -> Result<()> {
        let t = now_ms();
        event(on_event, "step", &[("step", s.step.into()), ("steps", s.steps.into()), ("ms", (t - last).into())]);
        if s.step == 1 && !vae_files.is_empty() {
            let files: js_sys::Array = vae_files.iter().map(|f| JsValue::from_str(f)).collect();
            event(on_event, "prefetch", &[("files", files.into())]);
        }
        last = t;
        if let Some(img) = s.preview {
            // The tiny autoencoder's image: the real colours, at full size.
            let rgba: Vec<u8> = img.rgb8(0).chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
            let bytes = js_sys::Uint8ClampedArray::from(rgba.as_slice());
            event(on_event, "preview", &[("step", s.step.into()), ("width", img.width.into()), ("height", img.height.into()), ("rgba", bytes.into()), ("decoder", "tiny".into())]);
        } else if let Some(latents) = s.latents {
            // The pipeline reads the latents back only at the steps preview_every asks.
            let rgba = preview.render(latents, s.shape);
            let bytes = js_sys::Uint8ClampedArray::from(rgba.as_slice());
            event(on_event, "preview", &[("step", s.step.into()), ("width", s.shape[3].into()), ("height", s.shape[2].into()), ("rgba", bytes.into())]);
        }
        if CANCEL.get() {
            return Err(Error::Cancelled);
        }
        Ok(())
    };
    let (p, kind, images, times) = match &loaded.model {
        DiffusionModel::StableDiffusion(m) => {
            let mut user = UserImages {
                controls: nets.iter().zip(page_images.controls).map(|(n, (_, _, image, scale))| (n.as_ref(), image, scale)).collect(),
                init: page_images.init,
                mask: page_images.mask,
                depth: page_images.depth,
                ..Default::default()
            };
            // Depth-to-image without a depth map: the folder's own estimator (fetched now).
            if let (true, Some(init)) = (m.needs_depth_estimate(&user), user.init.as_ref()) {
                event(on_event, "stage", &[("stage", "depth".into())]);
                user.depth_prediction = Some(m.estimate_depth(&gpu, &src, init).await?);
            }
            let (p, kind, cond) = params(m, req, user)?;
            // The encoder is part of the VAE: an init image needs it before denoising starts.
            if cond.init.is_some() && !m.vae_loaded() {
                event(on_event, "stage", &[("stage", "vae".into())]);
                m.load_vae(&gpu, &src).await?;
            }
            event(on_event, "stage", &[("stage", "denoise".into())]);
            let (latents, mut times) = m.denoise_with(&gpu, &p, &cond, &now_ms, &mut progress).await?;
            if !m.vae_loaded() {
                event(on_event, "stage", &[("stage", "vae".into())]);
                m.load_vae(&gpu, &src).await?;
            }
            event(on_event, "stage", &[("stage", "decode".into())]);
            let t0 = now_ms();
            let images = m.decode(&gpu, &latents).await?;
            times.vae_decode_ms = now_ms() - t0;
            loaded.preview.borrow_mut().fit(&latents, &images);
            (p, kind, images, times)
        }
        DiffusionModel::Ldm(m) => {
            if page_images.mask.is_some() || page_images.depth.is_some() || !page_images.controls.is_empty() {
                return Err(Error::Input(format!("{} takes no mask, depth map or ControlNet", m.kind.class_name())));
            }
            // A concatenation-conditioned model's condition is the page's init image.
            let image = page_images.init.map(LdmImage::Condition);
            let (p, kind) = ldm_params(m, req, image.as_ref())?;
            event(on_event, "stage", &[("stage", "denoise".into())]);
            let (images, times) = m.generate(&gpu, &p, image.as_ref(), &now_ms, &mut progress).await?;
            (p, kind, images, times)
        }
    };
    let name = loaded.model.name().to_string();
    let loras = match &loaded.model {
        DiffusionModel::StableDiffusion(m) => m.adapters.clone(),
        DiffusionModel::Ldm(_) => Vec::new(),
    };
    let parameters = parameters_text_with(&p, kind, &name, 0, &loras, None);
    let png = encode_png(images.width, images.height, &images.rgb8(0), &parameters)?;
    let info = GenerateInfo {
        model: name,
        width: images.width,
        height: images.height,
        steps: p.steps,
        seed: p.seed,
        scheduler: kind.name().to_string(),
        precision: dtype.name(),
        device: if gpu.is_cpu() { "cpu" } else { "gpu" },
        device_name: gpu.summary().name.clone(),
        parameters,
        text_encoder_ms: times.text_encoder_ms,
        unet_steps_ms: times.unet_steps_ms,
        vae_decode_ms: times.vae_decode_ms,
        load_ms,
        total_ms: now_ms() - t_start,
        peak_gpu_bytes: gpu.pool_stats().peak_bytes,
    };
    let out = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&out, &JsValue::from_str("png"), &js_sys::Uint8Array::from(png.as_slice()));
    let _ = js_sys::Reflect::set(&out, &JsValue::from_str("info"), &JsValue::from_str(&serde_json::to_string(&info).map_err(|e| Error::Io(e.to_string()))?));
    Ok(out.into())
}

/// The UNet step benchmark in the browser: loads the model (timed), runs a one-step warm-up that
/// compiles every kernel, then the requested generation; resolves to `ldm bench generate`'s JSON.
#[wasm_bindgen]
pub async fn bench_generate(model_url: String, store: JsValue, single_file: Option<String>, clip_bpe: Option<String>, request_json: String) -> Result<String, JsValue> {
    CANCEL.set(false);
    let result = run_bench(&model_url, store, single_file.as_deref(), clip_bpe, &request_json).await;
    if let Err(e) = &result {
        if poisons_device(e) {
            reset_engine();
        }
    }
    result.map_err(|e| to_js(&e))
}

async fn run_bench(model_url: &str, store: JsValue, single_file: Option<&str>, clip_bpe: Option<String>, request_json: &str) -> Result<String> {
    let req: GenerateRequest = serde_json::from_str(request_json).map_err(|e| Error::Input(format!("benchmark settings: {e}")))?;
    let src = JsSource::new(store, model_url.to_string());
    let gpu = gpu().await?;
    let dtype = dtype_for(&gpu, req.precision.as_deref())?;
    let t = now_ms();
    let loaded = model(&gpu, &src, model_url, single_file, clip_bpe, dtype, false, &PageImages::read(&JsValue::UNDEFINED)?).await?;
    let cancel = &mut |_: &StepProgress| if CANCEL.get() { Err(Error::Cancelled) } else { Ok(()) };
    let (p, kind, load_ms, warmup_ms, times) = match &loaded.model {
        DiffusionModel::StableDiffusion(m) => {
            m.load_vae(&gpu, &src).await?;
            let load_ms = now_ms() - t;
            let (p, kind, _) = params(m, req, UserImages::default())?;
            let p = Txt2ImgParams { sync_steps: true, ..p };
            let t = now_ms();
            m.txt2img(&gpu, &Txt2ImgParams { steps: 1, ..p.clone() }, &now_ms, &mut |_| Ok(())).await?;
            let warmup_ms = now_ms() - t;
            let (_, times) = m.txt2img(&gpu, &p, &now_ms, cancel).await?;
            (p, kind, load_ms, warmup_ms, times)
        }
        DiffusionModel::Ldm(m) => {
            let load_ms = now_ms() - t;
            let (p, kind) = ldm_params(m, req, None)?;
            let p = Txt2ImgParams { sync_steps: true, ..p };
            let t = now_ms();
            m.generate(&gpu, &Txt2ImgParams { steps: 1, ..p.clone() }, None, &now_ms, &mut |_| Ok(())).await?;
            let warmup_ms = now_ms() - t;
            let (_, times) = m.generate(&gpu, &p, None, &now_ms, cancel).await?;
            (p, kind, load_ms, warmup_ms, times)
        }
    };
    let mut report = GenerateBench { model: loaded.model.name(), adapter: gpu.summary(), params: &p, scheduler: kind, load_ms, warmup_ms, times: &times, peak_gpu_bytes: gpu.pool_stats().peak_bytes }.to_json();
    report["precision"] = dtype.name().into();
    serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))
}

/// `bench.html?mode=unet`'s settings (JSON), named as `ldm bench unet`'s flags.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct UNetBenchRequest {
    /// Without a model URL: "sd15" (default) or "sdxl", the architecture with random weights.
    architecture: Option<String>,
    latent: usize,
    batch: usize,
    unet: Option<String>,
    vae: Option<String>,
    precision: Option<String>,
    runs: u32,
    decode: bool,
    output: bool,
}

impl Default for UNetBenchRequest {
    fn default() -> Self {
        let d = crate::bench::unet::UNetBenchOptions::default();
        Self { architecture: None, latent: d.latent[0], batch: d.batch, unet: None, vae: None, precision: None, runs: d.runs, decode: d.decode, output: d.output }
    }
}

/// One UNet step (and VAE decode) benchmark in the browser; `model_url` `None` is Stable
/// Diffusion 1.5's (or the request's `architecture`) with random weights; `inputs_url` a folder with `inputs.json`.
/// Resolves to `ldm bench unet`'s JSON.
#[wasm_bindgen]
pub async fn bench_unet(model_url: Option<String>, store: JsValue, inputs_url: Option<String>, inputs_store: JsValue, request_json: String) -> Result<String, JsValue> {
    CANCEL.set(false);
    let result = run_bench_unet(model_url, store, inputs_url, inputs_store, &request_json).await;
    if let Err(e) = &result {
        if poisons_device(e) {
            reset_engine();
        }
    }
    result.map_err(|e| to_js(&e))
}

async fn run_bench_unet(model_url: Option<String>, store: JsValue, inputs_url: Option<String>, inputs_store: JsValue, request_json: &str) -> Result<String> {
    use crate::bench::unet::{weight_type, Architecture, BenchModel, UNetBenchOptions};
    let req: UNetBenchRequest = serde_json::from_str(request_json).map_err(|e| Error::Input(format!("benchmark settings: {e}")))?;
    // The benchmark measures its own model's memory: drop the page's model first.
    ENGINE.with_borrow_mut(|e| e.model = None);
    let gpu = gpu().await?;
    let opts = UNetBenchOptions {
        latent: [req.latent, req.latent],
        batch: req.batch,
        unet_quant: weight_type("unet", req.unet.as_deref())?,
        vae_quant: weight_type("vae", req.vae.as_deref())?,
        dtype: Some(dtype_for(&gpu, req.precision.as_deref())?),
        runs: req.runs,
        decode: req.decode,
        output: req.output,
        ..Default::default()
    };
    let src = model_url.map(|u| (JsSource::new(store, u.clone()), u));
    let model = match &src {
        Some((s, u)) => BenchModel::Folder { src: s, name: u.clone() },
        None => {
            let name = req.architecture.as_deref().unwrap_or("sd15");
            BenchModel::Random(Architecture::from_name(name).ok_or_else(|| Error::Input(format!("architecture {name:?}: use sd15 or sdxl, or give a model URL")))?)
        }
    };
    let inputs = inputs_url.map(|u| JsSource::new(inputs_store, u));
    let report = crate::bench::unet::run(&gpu, model, &opts, inputs.as_ref().map(|s| s as &dyn crate::loader::FileSource), &now_ms).await?;
    serde_json::to_string(&report).map_err(|e| Error::Io(e.to_string()))
}

/// `bench.html?mode=depth`'s settings (JSON), as `ldm bench depth`'s.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DepthBenchRequest {
    /// Without a model URL: one of `bench::depth::DEPTH_ARCHITECTURES` with random weights.
    architecture: String,
    /// The synthetic photo's size.
    width: usize,
    height: usize,
    precision: Option<String>,
}

impl Default for DepthBenchRequest {
    fn default() -> Self {
        Self { architecture: crate::bench::depth::DEPTH_ARCHITECTURES[0].into(), width: 512, height: 512, precision: Some("f32".into()) }
    }
}

/// Depth estimation time in the browser (`ldm bench depth`'s JSON): the estimator at `model_url`
/// (a transformers folder), or the request's published architecture with random weights.
#[wasm_bindgen]
pub async fn bench_depth(model_url: Option<String>, store: JsValue, request_json: String) -> Result<String, JsValue> {
    let result = run_bench_depth(model_url, store, &request_json).await;
    if let Err(e) = &result {
        if poisons_device(e) {
            reset_engine();
        }
    }
    result.map_err(|e| to_js(&e))
}

async fn run_bench_depth(model_url: Option<String>, store: JsValue, request_json: &str) -> Result<String> {
    let req: DepthBenchRequest = serde_json::from_str(request_json).map_err(|e| Error::Input(format!("benchmark settings: {e}")))?;
    // The benchmark measures its own model's memory: drop the page's models first.
    ENGINE.with_borrow_mut(|e| e.model = None);
    ESTIMATOR.set(None);
    let gpu = gpu().await?;
    let dtype = dtype_for(&gpu, req.precision.as_deref())?;
    let img = crate::bench::depth::synthetic_photo(req.width, req.height)?;
    let report = match model_url {
        Some(url) => {
            let src = JsSource::new(store, url.clone());
            crate::bench::depth::run(&gpu, &url, DepthEstimator::load(&gpu, &src, "", "", dtype), &img, &now_ms).await?
        }
        None => crate::bench::depth::run(&gpu, &req.architecture, crate::bench::depth::random_estimator(&gpu, &req.architecture, dtype), &img, &now_ms).await?,
    };
    serde_json::to_string(&report).map_err(|e| Error::Io(e.to_string()))
}
