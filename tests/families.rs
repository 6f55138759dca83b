//! The model families people have, against diffusers (tests/fixtures/ref/family_cases.json,
//! scripts/family_fixtures.py): SDXL (base, refiner hand-over, img2img, inpainting, ControlNet,
//! Turbo, single files), SD-Turbo, LCM, LoRA (kohya, PEFT, several, on q4 weights, LCM-LoRA),
//! textual inversion, the tiny autoencoder, A1111 prompt weighting, scheduler switches and LDM
//! sizes; every pixel within 2/255 of diffusers' `output_type="np"` image.

mod common;

use std::collections::HashMap;
use std::rc::Rc;

use common::{fixtures, gpu, reference};
use ldm_web::gpu::{DType, Gpu};
use ldm_web::loader::lora::AdapterSet;
use ldm_web::loader::DirSource;
use ldm_web::models::ControlNetModel;
use ldm_web::pipelines::image_input::{mask_tensor, rgb_tensor, InputImage};
use ldm_web::pipelines::prompt::Embedding;
use ldm_web::pipelines::{Control, DiffusionModel, VaeSource, ImageConditions, LoadOptions, PromptWeighting, StableDiffusionModel, Txt2ImgParams, XlConditions};
use ldm_web::schedulers::SchedulerKind;

/// Largest allowed per-channel difference from diffusers' image in [0, 1].
const PIXEL_TOL: f32 = 2.0 / 255.0;

#[derive(serde::Deserialize, Clone)]
struct Case {
    index: usize,
    kind: String,
    model: String,
    #[serde(default)]
    components: HashMap<String, String>,
    scheduler: Option<String>,
    prompt: Option<String>,
    prompt_2: Option<String>,
    negative_prompt: Option<String>,
    negative_prompt_2: Option<String>,
    seed: u64,
    steps: usize,
    guidance: Option<f32>,
    width: usize,
    height: usize,
    batch: usize,
    eta: f32,
    image: Option<String>,
    mask: Option<String>,
    controlnet: Option<ControlSpec>,
    #[serde(default)]
    loras: Vec<LoraSpec>,
    #[serde(default)]
    embeddings: Vec<EmbeddingSpec>,
    q4_weights: Option<usize>,
    a1111: Option<A1111Spec>,
    args: Option<serde_json::Value>,
    stages: Option<Vec<serde_json::Value>>,
}

#[derive(serde::Deserialize, Clone)]
struct ControlSpec {
    folder: String,
    image: String,
    scale: f32,
    guess_mode: bool,
    control_guidance_start: f32,
    control_guidance_end: f32,
}

#[derive(serde::Deserialize, Clone)]
struct LoraSpec {
    file: String,
    scale: f32,
}

#[derive(serde::Deserialize, Clone)]
struct EmbeddingSpec {
    file: String,
    token: String,
}

#[derive(serde::Deserialize, Clone)]
struct A1111Spec {
    prompt: String,
    negative_prompt: Option<String>,
}

fn image(name: &str) -> InputImage {
    let path = fixtures().join("images").join(name);
    InputImage::from_png(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).expect("decodes")
}

/// A `(height, width)` pair from the call's arguments.
fn pair(args: &serde_json::Value, key: &str) -> Option<(usize, usize)> {
    let v = args.get(key)?.as_array()?;
    Some((v.first()?.as_u64()? as usize, v.get(1)?.as_u64()? as usize))
}

/// SDXL's micro-conditions exactly as the call passed them (unset ones take the defaults).
fn xl_conditions(args: &serde_json::Value) -> XlConditions {
    let d = XlConditions::default();
    XlConditions {
        original_size: pair(args, "original_size"),
        crops_coords_top_left: pair(args, "crops_coords_top_left").unwrap_or(d.crops_coords_top_left),
        target_size: pair(args, "target_size"),
        negative_original_size: pair(args, "negative_original_size"),
        negative_crops_coords_top_left: pair(args, "negative_crops_coords_top_left").unwrap_or(d.negative_crops_coords_top_left),
        negative_target_size: pair(args, "negative_target_size"),
        aesthetic_score: args.get("aesthetic_score").and_then(|v| v.as_f64()).map_or(d.aesthetic_score, |v| v as f32),
        negative_aesthetic_score: args.get("negative_aesthetic_score").and_then(|v| v.as_f64()).map_or(d.negative_aesthetic_score, |v| v as f32),
    }
}

async fn adapters(c: &Case) -> Option<Rc<AdapterSet>> {
    if c.loras.is_empty() {
        return None;
    }
    let mut set = AdapterSet::new();
    for l in &c.loras {
        set.add(Box::new(DirSource::new(fixtures())), &l.file, &l.file, l.scale).await.unwrap_or_else(|e| panic!("case {}: {e}", c.index));
    }
    Some(Rc::new(set))
}

/// A Stable Diffusion model (folder or single file) with the case's LoRAs, quantisation and
/// embeddings.
fn load_sd(gpu: &Gpu, c: &Case, model: &str, with_adapters: bool) -> StableDiffusionModel {
    pollster::block_on(async {
        let mut opts = LoadOptions { vae_encoder: true, ..Default::default() };
        if with_adapters {
            opts.adapters = adapters(c).await;
        }
        if c.q4_weights.is_some() {
            opts.quant.unet = Some(DType::Q4_0);
        }
        // pipe.vae = AutoencoderTiny: the tiny autoencoder decodes.
        if c.components.get("vae").is_some_and(|v| v.starts_with("taesd")) {
            opts.tiny_vae = Some(VaeSource(Rc::new(DirSource::new(fixtures().join("taesd")))));
            opts.tiny_decode = true;
        }
        let mut m = if model.ends_with(".safetensors") || model.ends_with(".ckpt") {
            let stem = model.rsplit_once('.').map(|(s, _)| s).unwrap_or(model);
            let configs = DirSource::new(fixtures().join(stem));
            StableDiffusionModel::load_single_file(gpu, &DirSource::new(fixtures()), model, Some(&configs), &opts).await
        } else {
            StableDiffusionModel::load(gpu, &DirSource::new(fixtures().join(model)), model, &opts).await
        }
        .unwrap_or_else(|e| panic!("case {}: loading {model}: {e}", c.index));
        // SDXL pairs are listed once per text encoder; one file is added once (both parts).
        let mut seen = std::collections::HashSet::new();
        for e in c.embeddings.iter().filter(|e| seen.insert(e.file.clone())) {
            let emb = Embedding::read(&DirSource::new(fixtures()), &e.file).await.unwrap_or_else(|err| panic!("case {}: {}: {err}", c.index, e.file));
            m.text.add_embedding(gpu, &emb, &e.token).unwrap_or_else(|err| panic!("case {}: {}: {err}", c.index, e.file));
        }
        m
    })
}

fn params(c: &Case) -> Txt2ImgParams {
    let args = c.args.clone().unwrap_or(serde_json::Value::Null);
    let (prompt, negative, weighting) = match &c.a1111 {
        Some(a) => (a.prompt.clone(), a.negative_prompt.clone(), PromptWeighting::A1111),
        None => (c.prompt.clone().unwrap_or_default(), c.negative_prompt.clone(), PromptWeighting::None),
    };
    Txt2ImgParams {
        prompt,
        negative_prompt: negative,
        prompt_2: c.prompt_2.clone(),
        negative_prompt_2: c.negative_prompt_2.clone(),
        prompt_weighting: weighting,
        seed: c.seed,
        steps: c.steps,
        guidance_scale: c.guidance.unwrap_or(7.5),
        width: c.width,
        height: c.height,
        scheduler: c.scheduler.as_deref().map(|s| s.parse::<SchedulerKind>().expect("known scheduler")),
        eta: c.eta,
        batch: c.batch,
        xl: if c.kind.starts_with("xl") { xl_conditions(&args) } else { XlConditions::default() },
        denoising_end: args.get("denoising_end").and_then(|v| v.as_f64()).map(|v| v as f32),
        denoising_start: args.get("denoising_start").and_then(|v| v.as_f64()).map(|v| v as f32),
        ..Default::default()
    }
}

/// Runs one case: its images as diffusers' `output_type="np"`.
fn run(gpu: &Gpu, c: &Case, nets: &mut HashMap<String, ControlNetModel>) -> Vec<f32> {
    let now = || 0.0;
    let fail = |e: ldm_web::Error| -> ! { panic!("case {}: {e}", c.index) };
    match c.kind.as_str() {
        "ldm" => {
            let src = DirSource::new(fixtures().join(&c.model));
            let DiffusionModel::Ldm(m) = pollster::block_on(DiffusionModel::load(gpu, &src, &c.model, &LoadOptions::default())).unwrap_or_else(|e| fail(e)) else { panic!("not an LDM") };
            let p = Txt2ImgParams { steps: c.steps, seed: c.seed, eta: c.eta, width: c.width, height: c.height, batch: c.batch, guidance_scale: 1.0, ..Default::default() };
            pollster::block_on(m.generate(gpu, &p, None, &now, &mut |_| Ok(()))).unwrap_or_else(|e| fail(e)).0.data
        }
        "xl_refine" => {
            let stages = c.stages.as_ref().expect("stages");
            let base = load_sd(gpu, c, &c.model, false);
            let mut p = params(c);
            p.denoising_end = stages[0]["args"]["denoising_end"].as_f64().map(|v| v as f32);
            let (latents, _) = pollster::block_on(base.denoise_with(gpu, &p, &ImageConditions::default(), &now, &mut |_| Ok(()))).unwrap_or_else(|e| fail(e));
            let want = &reference(&format!("family_{}.safetensors", c.index))["base_latents"].1;
            common::assert_close(&format!("case {} base latents", c.index), &latents.data, want, 1e-4);
            let refiner = load_sd(gpu, c, &c.components["refiner"], false);
            let rp = Txt2ImgParams { denoising_end: None, denoising_start: stages[1]["args"]["denoising_start"].as_f64().map(|v| v as f32), ..p };
            let cond = ImageConditions { init_latents: Some(latents.data), ..Default::default() };
            pollster::block_on(refiner.generate(gpu, &rp, &cond, &now, &mut |_| Ok(()))).unwrap_or_else(|e| fail(e)).0.data
        }
        _ => {
            let m = load_sd(gpu, c, &c.model, true);
            let (w, h) = (c.width, c.height);
            if let Some(cn) = &c.controlnet {
                if !nets.contains_key(&cn.folder) {
                    let net = pollster::block_on(ldm_web::pipelines::load_controlnet(gpu, &DirSource::new(fixtures().join(&cn.folder)), "", &LoadOptions::default())).unwrap_or_else(|e| fail(e));
                    nets.insert(cn.folder.clone(), net);
                }
            }
            let controls = c.controlnet.iter().map(|cn| Control { model: &nets[&cn.folder], image: rgb_tensor(&image(&cn.image), w, h, false), scale: cn.scale, start: cn.control_guidance_start, end: cn.control_guidance_end }).collect();
            let args = c.args.clone().unwrap_or(serde_json::Value::Null);
            let cond = ImageConditions {
                init: c.image.as_deref().map(|f| rgb_tensor(&image(f), w, h, true)),
                mask: c.mask.as_deref().map(|f| mask_tensor(&image(f), w, h, 0.0)),
                // Only a strength the call passed: the pipeline's default is part of the test.
                strength: args.get("strength").and_then(|v| v.as_f64()).map(|v| v as f32),
                controls,
                guess_mode: c.controlnet.as_ref().is_some_and(|cn| cn.guess_mode),
                ..Default::default()
            };
            pollster::block_on(m.generate(gpu, &params(c), &cond, &now, &mut |_| Ok(()))).unwrap_or_else(|e| fail(e)).0.data
        }
    }
}

#[test]
fn families_match_diffusers_images() {
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("ref/family_cases.json")).expect("family_cases.json")).expect("parses");
    let cases: Vec<Case> = serde_json::from_value(file["cases"].clone()).expect("cases");
    let only: Option<Vec<usize>> = std::env::var("LDM_CASE").ok().map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect());
    let gpu = gpu();
    let mut nets = HashMap::new();
    let (mut failures, mut ran) = (Vec::new(), 0);
    for c in cases.iter().filter(|c| only.as_ref().is_none_or(|o| o.contains(&c.index))) {
        let got = run(&gpu, c, &mut nets);
        let want = &reference(&format!("family_{}.safetensors", c.index))["image"];
        assert_eq!(got.len(), want.1.len(), "case {} shape {:?}", c.index, want.0);
        let (d, _) = common::max_diff(&got, &want.1);
        let mean = got.iter().zip(&want.1).map(|(a, b)| (a - b).abs()).sum::<f32>() / want.1.len() as f32;
        println!("case {:>2} {:<13} {:<26} {:<10} {}x{} batch {}: max |diff| {:.4}/255, mean {:.5}/255", c.index, c.kind, c.model, c.scheduler.as_deref().unwrap_or("(default)"), c.width, c.height, c.batch, d * 255.0, mean * 255.0);
        if d > PIXEL_TOL {
            failures.push(format!("case {} ({} {}): max pixel difference {:.2}/255", c.index, c.kind, c.model, d * 255.0));
        }
        ran += 1;
    }
    assert!(ran > 0, "no cases ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `AutoencoderTiny` alone: decode of seeded latents and encode of an image, as diffusers.
#[test]
fn tiny_autoencoder_matches_diffusers() {
    let gpu = gpu();
    let r = reference("family_taesd.safetensors");
    let tiny = pollster::block_on(ldm_web::pipelines::load_tiny_vae(&gpu, &DirSource::new(fixtures().join("taesd")), DType::F32, true)).expect("loads");
    let (shape, lat) = &r["latents"];
    let z = gpu.upload(shape, DType::F32, lat).expect("upload");
    let decoded = pollster::block_on(gpu.read(&tiny.decode(&gpu, &z).expect("decode"))).expect("read");
    common::assert_close("taesd decode", &decoded, &r["decoded"].1, 1e-4);
    let (shape, img) = &r["image"];
    let x = gpu.upload(shape, DType::F32, img).expect("upload");
    let encoded = pollster::block_on(gpu.read(&tiny.encode(&gpu, &x).expect("encode"))).expect("read");
    common::assert_close("taesd encode", &encoded, &r["encoded"].1, 1e-4);
}
