//! `ldm convert`: any model ldm loads (folder or single file), written as the web format: a diffusers-layout folder whose
//! weights are quantised (q8_0, q4_0, q4_1, q5_0, q5_1) or f16 per component, tensors in each file in the
//! order the model first reads them (the order the browser fetches), and `ldm-manifest.json`.
//!
//! The model is loaded through the normal loader with a [`WeightLog`], so what is written is
//! exactly what the loader used: loading the folder gives the image quantising on the fly gives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use clap::Args;
use ldm_web::gpu::{DType, GpuOptions};
use ldm_web::loader::quantised::{describe, stored_tensors, LayerRule, QUANT_KEY_PREFIX};
use ldm_web::loader::safetensors::{serialize, FileDType, OutTensor};
use ldm_web::loader::{quantisable, WeightFile, WeightLog, WeightRecord};
use ldm_web::pipelines::single_file;
use ldm_web::models::calibration::InputRecorder;
use ldm_web::pipelines::{ComponentQuant, DiffusionModel, LoadOptions, Txt2ImgParams};
use ldm_web::loader::InputSink;
use ldm_web::bench::quality::noise_prediction;
use ldm_web::pipelines::StableDiffusionModel;
use ldm_web::quantise::{allocate_bits, encode_weighted, output_snr_db, Calibration, LayerChoices};
use ldm_web::{Error, Result};

/// Weight types per component (`ldm convert` and `ldm generate`).
#[derive(Args, Clone, Debug, Default)]
pub struct QuantArgs {
    /// Weight type of every component: q8 (q8_0), q5 (q5_0), q5_1, q4 (q4_0), q4_1 (the _1 types have a per-block minimum), f16 or f32.
    #[arg(long)]
    quant: Option<String>,
    /// Weight type of the UNet (overrides --quant).
    #[arg(long)]
    unet: Option<String>,
    /// Weight type of the text encoder (overrides --quant).
    #[arg(long)]
    text_encoder: Option<String>,
    /// Weight type of the VAE / VQ autoencoder (overrides --quant); `ldm generate` also takes a VAE folder here instead (e.g. SDXL's fp16-fix VAE).
    #[arg(long)]
    vae: Option<String>,
    /// A per-layer type, PATTERN=TYPE over `folder/tensor` names with `*` wildcards (repeat the flag; the first match wins), e.g. 'unet/conv_in.*=q8' or '*attn2.to_k*=f16'.
    #[arg(long = "layer", value_name = "PATTERN=TYPE")]
    layers: Vec<String>,
}

/// A component's weight type as given (`None` keeps what the model has), and the per-layer rules.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    pub unet: Option<DType>,
    pub text_encoder: Option<DType>,
    pub vae: Option<DType>,
    pub layer_rules: Rc<[LayerRule]>,
}

impl QuantArgs {
    /// The types given, checked.
    pub fn choice(&self) -> Result<Choice> {
        let parse = |flag: &str, v: &Option<String>| -> Result<Option<DType>> {
            v.as_deref()
                .map(|s| DType::from_name(s).ok_or_else(|| Error::Input(format!("{flag} {s}: use {} (q8, q5 and q4 name the _0 types), f16 or f32", DType::quantised_names()))))
                .transpose()
        };
        let all = parse("--quant", &self.quant)?;
        let vae = self.vae.clone().filter(|_| self.vae_folder().is_none());
        let layer_rules = self.layers.iter().map(|r| LayerRule::parse(r).map_err(|e| Error::Input(format!("--layer: {e}")))).collect::<Result<Vec<_>>>()?;
        Ok(Choice { unet: parse("--unet", &self.unet)?.or(all), text_encoder: parse("--text-encoder", &self.text_encoder)?.or(all), vae: parse("--vae", &vae)?.or(all), layer_rules: layer_rules.into() })
    }

    /// `--vae` naming a folder (an AutoencoderKL to use instead of the model's) rather than a
    /// weight type.
    pub fn vae_folder(&self) -> Option<&str> {
        self.vae.as_deref().filter(|v| DType::from_name(v).is_none())
    }
}

impl Choice {
    /// The quantisation the loader applies (float choices quantise nothing).
    pub fn component_quant(&self, log: Option<WeightLog>) -> ComponentQuant {
        let q = |d: Option<DType>| d.filter(|d| d.is_quantised());
        ComponentQuant { unet: q(self.unet), text_encoder: q(self.text_encoder), vae: q(self.vae), layer_rules: self.layer_rules.clone(), log, ..Default::default() }
    }
    /// The recipe as one line: `unet=q4_1,text_encoder=q8_0,vae=q8_0` and the layer rules after `;`.
    pub fn recipe(&self) -> String {
        let name = |d: Option<DType>| d.map_or("as stored".to_string(), |d| d.name().to_string());
        let mut s = format!("unet={},text_encoder={},vae={}", name(self.unet), name(self.text_encoder), name(self.vae));
        for r in self.layer_rules.iter() {
            s.push_str(&format!(";{r}"));
        }
        s
    }
    fn for_folder(&self, folder: &str) -> Option<DType> {
        match folder {
            "unet" => self.unet,
            "text_encoder" | "text_encoder_2" | "bert" => self.text_encoder,
            _ => self.vae,
        }
    }
}

/// `ldm convert` flags.
#[derive(Args, Clone, Debug)]
pub struct ConvertArgs {
    /// The model: a diffusers folder (any pipeline ldm runs), a single-file SD 1.x / 2.x
    /// `.safetensors` checkpoint, or `builtin`.
    #[arg(long, default_value = crate::builtin::NAME)]
    model: String,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// For a single-file checkpoint: a diffusers folder whose configs and tokenizer to use (and write) instead of inferring them.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantArgs,
    /// Calibrate on this many prompts first: every Linear / Conv2d records its inputs (both guidance halves, all steps) and quantised weights are chosen to minimise the output error (GPTQ where the layer has at most 4096 inputs, a weighted scale search otherwise).
    #[arg(long, default_value_t = 0)]
    calibrate: usize,
    /// Calibration prompts (repeat the flag; default: the model's example prompts, else a built-in list), used in turn with seeds 0, 1, ...
    #[arg(long = "calibration-prompt")]
    calibration_prompts: Vec<String>,
    /// Denoising steps of each calibration generation (default: the model's, else 20).
    #[arg(long)]
    calibration_steps: Option<usize>,
    /// With --calibrate: choose each UNet layer's type (q4_0, q4_1, q5_0, q5_1 or q8_0) for this many bits per quantised weight on average (e.g. 4.5, 5, 6), from a sensitivity scan that quantises one layer at a time.
    #[arg(long)]
    bits: Option<f64>,
}

/// The types `--bits` chooses from, smallest first.
const BIT_CHOICES: [DType; 5] = [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0];

/// Layers with at most this many inputs per output record their full input second moments
/// (K x K f32 on the device) for GPTQ; wider ones per-column statistics.
const GRAM_MAX_K: usize = 4096;

/// Prompts for models that suggest none (varied subjects, styles and compositions).
const CALIBRATION_PROMPTS: [&str; 8] = [
    "a photograph of a red fox in the snow", "an oil painting of a harbour at sunset", "a bowl of fruit on a wooden table, studio light",
    "a city street at night in the rain", "a cartoon robot waving", "a portrait of an old man with a beard", "a mountain lake with pine trees", "a bright abstract pattern of circles",
];

/// The calibration prompts: given, else the model's examples, else the built-in list.
fn calibration_prompts(a: &ConvertArgs, model: &StableDiffusionModel) -> Vec<String> {
    if !a.calibration_prompts.is_empty() {
        a.calibration_prompts.clone()
    } else if !model.hints.example_prompts.is_empty() {
        model.hints.example_prompts.clone()
    } else {
        CALIBRATION_PROMPTS.iter().map(|p| p.to_string()).collect()
    }
}

/// `--bits`: a type per UNet layer. The sensitivity scan quantises one layer at a time
/// (the smallest type, calibrated) and measures how far the single-step noise prediction moves
/// (its MSE against f32, first calibration prompt, seed 0, timestep 500); the layer's error at
/// another type is that scaled by the ratio of its output errors on the calibration statistics.
/// [`allocate_bits`] then spends the budget where it removes the most error per bit.
async fn allocate(gpu: &ldm_web::gpu::Gpu, a: &ConvertArgs, stats: &Rc<Calibration>, bits: f64) -> Result<Vec<LayerRule>> {
    let src: Box<dyn ldm_web::loader::FileSource> = if a.model == crate::builtin::NAME {
        Box::new(crate::builtin::source().ok_or_else(|| Error::Input("this ldm was built without the built-in model".into()))?)
    } else {
        match crate::generate::open_model(&a.model)? {
            (src, None) => src,
            (_, Some(_)) => return Err(Error::Input(format!("{}: --bits scans a diffusers folder; convert the single file to one first (ldm convert --quant f32)", a.model))),
        }
    };
    let log = WeightLog::default();
    let opts = LoadOptions { quant: ComponentQuant { log: Some(log.clone()), ..Default::default() }, ..Default::default() };
    let DiffusionModel::StableDiffusion(mut model) = DiffusionModel::load(gpu, src.as_ref(), "model", &opts).await? else {
        return Err(Error::Input(format!("{}: --bits needs a text-to-image model", a.model)));
    };
    let prompt = calibration_prompts(a, &model).remove(0);
    let side = model.unet.config.sample_size.unwrap_or(64) * model.vae_config.scale_factor();
    let reference = noise_prediction(gpu, &model, &prompt, 0, (side, side), 500.0).await?;
    let layers: Vec<_> = log.records().into_iter().filter(|r| r.folder == "unet" && quantisable(&r.shape) && stats.contains_key(&format!("unet/{}", r.name))).collect();
    let start = std::time::Instant::now();
    let mut choices = Vec::new();
    for (i, r) in layers.iter().enumerate() {
        let key = format!("unet/{}", r.name);
        let st = &stats[&key];
        let w = r.dtype.decode(&r.shape, &r.bytes);
        // Output error relative to output energy, per type (the weighted search: a fast proxy
        // for how the types compare on this layer).
        let rel = |dt: DType| -> Result<f64> {
            let q = dt.decode(&r.shape, &encode_weighted(dt, &r.shape, &w, &st.diag)?);
            Ok(10f64.powf(-output_snr_db(&w, &q, st) / 10.0))
        };
        let rules: Rc<[LayerRule]> = vec![LayerRule { pattern: key.clone(), dtype: BIT_CHOICES[0] }].into();
        let scan = LoadOptions { quant: ComponentQuant { layer_rules: rules, calibration: Some(stats.clone()), ..Default::default() }, ..Default::default() };
        model.unet = model.load_unet(gpu, src.as_ref(), &scan).await?;
        let got = noise_prediction(gpu, &model, &prompt, 0, (side, side), 500.0).await?;
        let mse = got.iter().zip(&reference).map(|(g, r)| ((g - r) as f64).powi(2)).sum::<f64>() / reference.len().max(1) as f64;
        let base = rel(BIT_CHOICES[0])?;
        let mut options = Vec::new();
        for dt in BIT_CHOICES {
            options.push((dt, 8.0 * dt.bytes_for(&r.shape) as f64, if base > 0.0 { mse * rel(dt)? / base } else { 0.0 }));
        }
        choices.push(LayerChoices { name: key, parameters: r.shape.iter().product::<usize>() as u64, options });
        if (i + 1) % 20 == 0 || i + 1 == layers.len() {
            eprintln!("sensitivity scan {}/{} layers ({:.1} s)", i + 1, layers.len(), start.elapsed().as_secs_f64());
        }
    }
    let types = allocate_bits(&choices, bits)?;
    Ok(choices.iter().zip(types).map(|(c, dtype)| LayerRule { pattern: c.name.clone(), dtype }).collect())
}

/// Runs `n` generations through the model with every Linear / Conv2d reporting its inputs, and
/// returns their statistics.
async fn calibrate(gpu: &ldm_web::gpu::Gpu, a: &ConvertArgs, choice: &Choice) -> Result<Calibration> {
    // The components something quantises (a layer rule may name any).
    let ruled = choice.layer_rules.iter().any(|r| r.dtype.is_quantised());
    let q = |d: Option<DType>| ruled || d.is_some_and(|d| d.is_quantised());
    let mut folders = Vec::new();
    if q(choice.unet) {
        folders.extend(["unet", "controlnet"]);
    }
    if q(choice.text_encoder) {
        folders.extend(["text_encoder", "text_encoder_2", "bert"]);
    }
    if q(choice.vae) {
        folders.extend(["vae", "vqvae"]);
    }
    let recorder = Rc::new(InputRecorder::new(GRAM_MAX_K, &folders));
    let sink: Rc<dyn InputSink> = recorder.clone();
    let opts = LoadOptions { quant: ComponentQuant { inputs: Some(sink), ..Default::default() }, ..Default::default() };
    let DiffusionModel::StableDiffusion(model) = crate::generate::load_model(gpu, &a.model, a.config.as_deref(), &opts).await? else {
        return Err(Error::Input(format!("{}: --calibrate runs text-to-image generations; convert this model without it", a.model)));
    };
    let prompts = calibration_prompts(a, &model);
    let steps = a.calibration_steps.or(model.hints.steps).unwrap_or(20);
    let guidance = model.hints.guidance.unwrap_or(7.5);
    // At the size the model was made for (its UNet's sample size).
    let side = model.unet.config.sample_size.unwrap_or(64) * model.vae_config.scale_factor();
    let start = std::time::Instant::now();
    for i in 0..a.calibrate {
        let p = Txt2ImgParams { prompt: prompts[i % prompts.len()].clone(), seed: i as u64, steps, guidance_scale: guidance, width: side, height: side, batch: 1, ..Default::default() };
        model.txt2img(gpu, &p, &|| 0.0, &mut |_| Ok(())).await?;
        eprintln!("calibration {}/{}: {:?}", i + 1, a.calibrate, p.prompt);
    }
    let stats = recorder.finish(gpu).await?;
    let gram = stats.values().filter(|s| s.gram.is_some()).count();
    eprintln!("calibrated {} layers ({gram} with full input second moments: GPTQ; the rest a weighted search) in {:.1} s", stats.len(), start.elapsed().as_secs_f64());
    Ok(stats)
}

/// The folder's own settings file, where the recipe is recorded.
const HINTS_FILE: &str = "ldm-web.json";

/// Weight files of a component folder, by the stem diffusers gives them.
fn weight_stem(folder: &str) -> &'static str {
    if matches!(folder, "text_encoder" | "text_encoder_2" | "bert") { "model" } else { "diffusion_pytorch_model" }
}

fn is_weight_file(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    [".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx"].iter().any(|e| p.ends_with(e))
}

/// The file tensors of one record: a quantised weight as its values and parameter arrays, a
/// float one in f16 when `f16`, else f32.
fn out_tensors(r: &WeightRecord, f16: bool, metadata: &mut BTreeMap<String, String>) -> Result<Vec<OutTensor>> {
    if r.dtype.is_quantised() {
        let names = stored_tensors(&r.name, r.dtype, &r.shape).ok_or_else(|| Error::Shape(format!("tensor {} is too large", r.name)))?;
        let (values, params) = r.dtype.split(&r.shape, &r.bytes);
        metadata.insert(format!("{QUANT_KEY_PREFIX}{}", r.name), describe(r.dtype, &r.shape));
        let parts = std::iter::once(values).chain(params);
        return Ok(names.into_iter().zip(parts).map(|((name, dtype, shape), b)| OutTensor { name, dtype, shape, bytes: b.to_vec() }).collect());
    }
    let data = r.dtype.decode(&r.shape, &r.bytes);
    let (dt, ft) = if f16 { (DType::F16, FileDType::F16) } else { (DType::F32, FileDType::F32) };
    Ok(vec![OutTensor { name: r.name.clone(), dtype: ft, shape: r.shape.clone(), bytes: dt.encode(&r.shape, &data) }])
}

/// The other files of the model (configs, tokenizer, scheduler, model card), as (path, bytes).
fn other_files(model: &str, config: Option<&Path>, converted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let keep = |p: &str| {
        let folder = p.split('/').next().unwrap_or("");
        p != crate::manifest::MANIFEST && !(converted.contains(&folder) && is_weight_file(p))
    };
    if model == crate::builtin::NAME && !Path::new(model).exists() {
        return Ok(crate::builtin::FILES.iter().filter(|(p, _)| keep(p)).map(|(p, b)| (p.to_string(), b.to_vec())).collect());
    }
    let (src, single) = crate::generate::open_model(model)?;
    let root = match (single, config) {
        // The configs of a single file are the given folder's, all its weights left out.
        (Some(_), Some(dir)) => dir,
        (Some(file), None) => {
            let wf = pollster::block_on(WeightFile::open(src.as_ref(), &file))?;
            return single_file::folder_files(&wf.header, &crate::generate::clip_bpe()?);
        }
        (None, _) => Path::new(model),
    };
    let keep = |p: &str| keep(p) && !(config.is_some() && is_weight_file(p));
    if !root.is_dir() {
        return Err(Error::Input(format!("{model}: ldm convert reads local diffusers folders, single .safetensors checkpoints and `builtin`")));
    }
    let mut files = Vec::new();
    crate::manifest::walk(root, &mut files)?;
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).map_err(|e| Error::Io(e.to_string()))?.to_string_lossy().replace('\\', "/");
        if keep(&rel) {
            out.push((rel, std::fs::read(&f).map_err(|e| Error::Io(format!("cannot read {}: {e}", f.display())))?));
        }
    }
    Ok(out)
}

/// Runs `ldm convert`; returns a summary (bytes per component).
pub fn run(a: &ConvertArgs) -> Result<String> {
    if let Some(v) = a.quant.vae_folder() {
        return Err(Error::Input(format!("--vae {v}: ldm convert takes a weight type here ({}, f16, f32), not a VAE folder", DType::quantised_names())));
    }
    let choice = a.quant.choice()?;
    let mut choice = choice;
    if let Some(bits) = a.bits {
        if a.calibrate == 0 {
            return Err(Error::Input("--bits chooses types from a calibration: give --calibrate N too".into()));
        }
        if !(4.5..=8.5).contains(&bits) {
            return Err(Error::Input(format!("--bits {bits}: give an average from 4.5 (all q4_0) to 8.5 (all q8_0)")));
        }
        choice.unet = choice.unet.or(Some(BIT_CHOICES[0]));
    }
    let quantises = [choice.unet, choice.text_encoder, choice.vae].iter().flatten().chain(choice.layer_rules.iter().map(|r| &r.dtype)).any(|d| d.is_quantised());
    if a.calibrate > 0 && !quantises {
        return Err(Error::Input("--calibrate chooses quantised weights: give a quantised type too (e.g. --unet q4_1)".into()));
    }
    if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::Input(format!("{} exists and is not empty; give a new folder to --out", a.out.display())));
    }
    let log = WeightLog::default();
    let calibrated = pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: true, ..Default::default() }).await?;
        let calibration = if a.calibrate > 0 { Some(Rc::new(calibrate(&gpu, a, &choice).await?)) } else { None };
        let calibrated = calibration.as_ref().map_or(0, |c| c.len());
        let mut quant = ComponentQuant { calibration: calibration.clone(), ..choice.component_quant(Some(log.clone())) };
        if let (Some(bits), Some(stats)) = (a.bits, &calibration) {
            // The user's own --layer rules first: the first match wins.
            let chosen = allocate(&gpu, a, stats, bits).await?;
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            chosen.iter().for_each(|r| *counts.entry(r.dtype.name()).or_default() += 1);
            eprintln!("--bits {bits}: {}", counts.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", "));
            quant.layer_rules = choice.layer_rules.iter().cloned().chain(chosen).collect::<Vec<_>>().into();
        }
        let opts = LoadOptions { vae_encoder: true, quant, ..Default::default() };
        let start = std::time::Instant::now();
        let loaded = crate::generate::load_model(&gpu, &a.model, a.config.as_deref(), &opts).await.map(|_| calibrated);
        if calibrated > 0 {
            eprintln!("quantised with the calibration in {:.1} s", start.elapsed().as_secs_f64());
        }
        loaded
    })?;
    let records = log.records();
    let mut folders: Vec<&'static str> = Vec::new();
    for r in &records {
        if !folders.contains(&r.folder) {
            folders.push(r.folder);
        }
    }
    let write = |rel: &str, bytes: &[u8]| -> Result<()> {
        let path = a.out.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::Io(format!("cannot create {}: {e}", parent.display())))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::Io(format!("cannot write {}: {e}", path.display())))
    };
    let mut hints = serde_json::Map::new();
    for (rel, bytes) in other_files(&a.model, a.config.as_deref(), &folders)? {
        if rel == HINTS_FILE {
            hints = serde_json::from_slice(&bytes).map_err(|e| Error::Model(format!("{}'s {HINTS_FILE} is not a JSON object: {e}", a.model)))?;
            continue;
        }
        write(&rel, &bytes)?;
    }
    let mut summary = Vec::new();
    let mut bits = serde_json::Map::new();
    for folder in &folders {
        let want = choice.for_folder(folder);
        let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut tensors = Vec::new();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for r in records.iter().filter(|r| r.folder == *folder) {
            // Floats stay as precise as the file had them unless f16 is asked for; f32 asks for f32.
            let f16 = match want {
                Some(DType::F16) => true,
                Some(DType::F32) => false,
                _ => r.source_f16,
            };
            *counts.entry(if r.dtype.is_quantised() { r.dtype.name() } else if f16 { "f16" } else { "f32" }).or_default() += 1;
            tensors.extend(out_tensors(r, f16, &mut metadata)?);
        }
        let stored: u64 = tensors.iter().map(|t| t.bytes.len() as u64).sum();
        let values: u64 = records.iter().filter(|r| r.folder == *folder).map(|r| r.shape.iter().product::<usize>() as u64).sum();
        bits.insert(folder.to_string(), serde_json::json!((8.0 * stored as f64 / values.max(1) as f64 * 100.0).round() / 100.0));
        let bytes = serialize(&tensors, &metadata)?;
        let rel = format!("{folder}/{}.safetensors", weight_stem(folder));
        write(&rel, &bytes)?;
        let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        summary.push(format!("{rel}: {} bytes ({} tensors: {})", bytes.len(), records.iter().filter(|r| r.folder == *folder).count(), counts.join(", ")));
    }
    // The recipe travels with the folder: the page shows it and a reader can reproduce it.
    let mut recipe = choice.recipe();
    if a.calibrate > 0 {
        recipe.push_str(&format!(";calibrated on {} prompts ({calibrated} layers)", a.calibrate));
    }
    if let Some(bits) = a.bits {
        recipe.push_str(&format!(";UNet layer types for {bits} bits per weight from a sensitivity scan"));
    }
    hints.insert("quantisation".into(), serde_json::json!({ "recipe": recipe, "bits_per_weight": bits, "by": format!("ldm convert {}", env!("CARGO_PKG_VERSION")) }));
    let text = serde_json::to_string_pretty(&hints).map_err(|e| Error::Io(e.to_string()))?;
    write(HINTS_FILE, text.as_bytes())?;
    let manifest = crate::manifest::run(&crate::manifest::ManifestArgs::new(a.out.clone()))?;
    summary.push(manifest);
    Ok(summary.join("\n"))
}
