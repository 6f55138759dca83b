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
    families_on(&gpu(), "");
}

/// The same 29 cases on the CPU backend (SDXL, Turbo, LCM, LoRAs beside q4 weights, embeddings,
/// TAESD, single files, ControlNet): every op the pipelines use, against diffusers.
#[test]
fn families_match_diffusers_images_on_the_cpu_backend() {
    let cpu = pollster::block_on(Gpu::new(ldm_web::gpu::GpuOptions { cpu: true, ..Default::default() })).expect("the CPU backend");
    families_on(&cpu, "cpu ");
}

fn families_on(gpu: &Gpu, label: &str) {
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("ref/family_cases.json")).expect("family_cases.json")).expect("parses");
    let cases: Vec<Case> = serde_json::from_value(file["cases"].clone()).expect("cases");
    let only: Option<Vec<usize>> = std::env::var("LDM_CASE").ok().map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect());
    let mut nets = HashMap::new();
    let (mut failures, mut ran) = (Vec::new(), 0);
    for c in cases.iter().filter(|c| only.as_ref().is_none_or(|o| o.contains(&c.index))) {
        let got = run(gpu, c, &mut nets);
        let want = &reference(&format!("family_{}.safetensors", c.index))["image"];
        assert_eq!(got.len(), want.1.len(), "case {} shape {:?}", c.index, want.0);
        let (d, _) = common::max_diff(&got, &want.1);
        let mean = got.iter().zip(&want.1).map(|(a, b)| (a - b).abs()).sum::<f32>() / want.1.len() as f32;
        println!("{label}case {:>2} {:<13} {:<26} {:<10} {}x{} batch {}: max |diff| {:.4}/255, mean {:.5}/255", c.index, c.kind, c.model, c.scheduler.as_deref().unwrap_or("(default)"), c.width, c.height, c.batch, d * 255.0, mean * 255.0);
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

fn family_json() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("ref/family_cases.json")).expect("family_cases.json")).expect("parses")
}

/// A1111 prompt weighting: the parsed (text, weight) runs, the 77-token chunks and their
/// multipliers, and the emphasised embeddings (sd1, and SDXL's two encoders with the pooled
/// output of the first chunk) as the fixture's reimplementation of A1111 gives them.
#[test]
fn a1111_prompt_weighting_matches_its_reference() {
    use ldm_web::pipelines::prompt::{a1111, PromptText};
    let file = family_json();
    let gpu = gpu();
    let r = reference("family_prompt_weighting.safetensors");
    let no_case = Case { index: 0, kind: "sd".into(), model: String::new(), components: HashMap::new(), scheduler: None, prompt: None, prompt_2: None, negative_prompt: None, negative_prompt_2: None, seed: 0, steps: 1, guidance: None, width: 64, height: 64, batch: 1, eta: 0.0, image: None, mask: None, controlnet: None, loras: vec![], embeddings: vec![], q4_weights: None, a1111: None, args: None, stages: None };
    for (family, model) in [("sd1", "sd1"), ("sdxl", "sdxl")] {
        let m = load_sd(&gpu, &no_case, model, false);
        for e in file["prompt_weighting"][family].as_array().expect("list") {
            let prompt = e["prompt"].as_str().expect("prompt");
            let key = e["key"].as_str().expect("key");
            // Per encoder: what A1111's parser and chunker make of the prompt.
            let expected: Vec<&serde_json::Value> = match e.get("encoders") {
                Some(list) => list.as_array().expect("encoders").iter().collect(),
                None => vec![e],
            };
            for (enc, want) in m.text.encoders().iter().zip(expected) {
                let parsed: Vec<(String, f64)> = serde_json::from_value(want["parsed"].clone()).expect("parsed");
                let got = a1111::parse(prompt);
                assert!(got.len() == parsed.len() && got.iter().zip(&parsed).all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-12), "{key}: parsed {got:?}, want {parsed:?}");
                if let Some(chunks) = want["chunks"].as_array().filter(|c| c.first().is_some_and(|x| x.is_object())) {
                    let got = a1111::chunks(enc, prompt);
                    assert_eq!(got.len(), chunks.len(), "{key}: chunk count");
                    for (g, w) in got.iter().zip(chunks) {
                        let tokens: Vec<u32> = serde_json::from_value(w["tokens"].clone()).expect("tokens");
                        let mults: Vec<f32> = serde_json::from_value(w["multipliers"].clone()).expect("multipliers");
                        assert_eq!(g.tokens, tokens, "{key}: tokens");
                        assert!(g.multipliers.iter().zip(&mults).all(|(a, b)| (a - b).abs() < 1e-6), "{key}: multipliers");
                    }
                }
            }
            let text = PromptText { prompt, prompt_2: None, clip_skip: 0 };
            let emb = pollster::block_on(m.text.encode(&gpu, &text, PromptWeighting::A1111, false)).unwrap_or_else(|err| panic!("{key}: {err}"));
            let got = pollster::block_on(gpu.read(&emb.context)).expect("read");
            common::assert_close(&format!("{key} embeddings {:?}", emb.context.shape()), &got, &r[key].1, 1e-4);
            if let Some(pk) = e.get("pooled_key").and_then(|k| k.as_str()) {
                let pooled = pollster::block_on(gpu.read(emb.pooled.as_ref().expect("pooled"))).expect("read");
                common::assert_close(&format!("{pk}"), &pooled, &r[pk].1, 1e-4);
            }
        }
    }
    // Hand-derived: nesting multiplies, brackets divide, escapes are text, unbalanced brackets
    // still weigh what follows them.
    let close = |a: &[(String, f64)], b: &[(&str, f64)]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() < 1e-12);
    assert!(close(&a1111::parse("((a)) [b] (c:0.5)"), &[("a", 1.21), (" ", 1.0), ("b", 1.0 / 1.1), (" ", 1.0), ("c", 0.5)]));
    assert!(close(&a1111::parse("\\(x\\) \\\\ y"), &[("(x) \\ y", 1.0)]));
    assert!(close(&a1111::parse("(open [close"), &[("open ", 1.1), ("close", 1.0)]));
    assert!(close(&a1111::parse("a BREAK b BREAKfast"), &[("a", 1.0), ("BREAK", -1.0), ("b BREAKfast", 1.0)]));
    assert!(close(&a1111::parse(""), &[("", 1.0)]));
}

/// ldm-web's q4_0 round trip of three UNet weights equals the one the fixture script replicates
/// (so the q4 + LoRA case compares with diffusers on the same weights).
#[test]
fn q4_round_trip_matches_the_fixtures_replica() {
    let r = reference("family_q4_check.safetensors");
    let src = DirSource::new(fixtures().join("sd1/unet"));
    let w = pollster::block_on(async {
        let f = ldm_web::loader::WeightFile::open(&src, "diffusion_pytorch_model.safetensors").await.expect("opens");
        let w = ldm_web::loader::Weights::new(&src, vec![f]);
        let mut out = HashMap::new();
        for k in r.keys() {
            out.insert(k.clone(), w.read_f32(k).await.expect("reads"));
        }
        out
    });
    for (k, (shape, want)) in &r {
        let (_, v) = &w[k];
        let q = DType::Q4_0;
        let got = q.decode(shape, &q.encode(shape, v));
        assert_eq!(&got, want, "{k}: q4_0 round trip differs from the fixture's");
    }
}

/// PyTorch checkpoints read through the restricted unpickler: the same tensors as the
/// safetensors copies, and every malformed or malicious file refused with its reason.
#[test]
fn pytorch_checkpoints_read_safely() {
    use ldm_web::loader::{WeightFile, Weights};
    let src = DirSource::new(fixtures());
    pollster::block_on(async {
        for (ckpt, safe, prefix) in [("sd1.ckpt", "sd1.safetensors", ""), ("lora/sd1-kohya.pt", "lora/sd1-kohya.safetensors", "")] {
            let a = WeightFile::open_any(&src, ckpt).await.unwrap_or_else(|e| panic!("{ckpt}: {e}"));
            let b = WeightFile::open_any(&src, safe).await.expect("safetensors");
            let keys: Vec<String> = b.header.tensors.keys().cloned().collect();
            assert_eq!(a.header.tensors.len(), keys.len(), "{ckpt}: tensor count");
            let (wa, wb) = (Weights::new(&src, vec![a]), Weights::new(&src, vec![b]));
            for k in &keys {
                let (x, y) = (wa.read_f32(&format!("{prefix}{k}")).await.unwrap_or_else(|e| panic!("{ckpt} {k}: {e}")), wb.read_f32(k).await.expect("reads"));
                assert_eq!(x, y, "{ckpt}: {k}");
            }
            println!("{ckpt}: {} tensors identical to {safe}", keys.len());
        }
        // A1111's .pt embedding: the same vectors as its .safetensors twin, token from `name`.
        let a = Embedding::read(&src, "embeddings/a1111-style.pt").await.expect("reads");
        let b = Embedding::read(&src, "embeddings/a1111-style.safetensors").await.expect("reads");
        assert_eq!(a.token.as_deref(), Some("a1111-style"));
        assert_eq!(a.parts[0].2, b.parts[0].2);
        for (bad, why) in [("bad/os_system.ckpt", "system, which a plain tensor checkpoint does not need"), ("bad/truncated.ckpt", "truncated"), ("bad/legacy.pt", "legacy format")] {
            let e = WeightFile::open_any(&src, bad).await.err().unwrap_or_else(|| panic!("{bad} must be refused")).to_string();
            println!("{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    });
}

/// LoRAs that do not fit the model are refused naming what does not fit; merged into f32
/// weights, a LoRA gives the image it gives run beside them.
#[test]
fn lora_refusals_and_merging() {
    let gpu = gpu();
    let dir = std::env::temp_dir().join(format!("ldm-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    // A LoRA whose conv_in down projection has the wrong input width.
    let bad_shape = ldm_web::loader::safetensors::serialize(
        &[
            ldm_web::loader::safetensors::OutTensor { name: "lora_unet_conv_in.lora_down.weight".into(), dtype: ldm_web::loader::safetensors::FileDType::F32, shape: vec![2, 5, 3, 3], bytes: vec![0; 2 * 5 * 9 * 4] },
            ldm_web::loader::safetensors::OutTensor { name: "lora_unet_conv_in.lora_up.weight".into(), dtype: ldm_web::loader::safetensors::FileDType::F32, shape: vec![16, 2, 1, 1], bytes: vec![0; 16 * 2 * 4] },
        ],
        &Default::default(),
    )
    .expect("serialises");
    std::fs::write(dir.join("bad-shape.safetensors"), bad_shape).expect("w");
    let loha = ldm_web::loader::safetensors::serialize(
        &[ldm_web::loader::safetensors::OutTensor { name: "lora_unet_conv_in.hada_w1_a".into(), dtype: ldm_web::loader::safetensors::FileDType::F32, shape: vec![1], bytes: vec![0; 4] }],
        &Default::default(),
    )
    .expect("serialises");
    std::fs::write(dir.join("loha.safetensors"), loha).expect("w");
    let try_load = |model: &str, lora: (&std::path::Path, &str)| -> String {
        pollster::block_on(async {
            let mut set = AdapterSet::new();
            if let Err(e) = set.add(Box::new(DirSource::new(lora.0)), lora.1, lora.1, 1.0).await {
                return e.to_string();
            }
            let opts = LoadOptions { adapters: Some(Rc::new(set)), ..Default::default() };
            match StableDiffusionModel::load(&gpu, &DirSource::new(fixtures().join(model)), model, &opts).await {
                Ok(_) => "loaded".to_string(),
                Err(e) => e.to_string(),
            }
        })
    };
    for (model, lora, file, want) in [
        ("sd1", fixtures(), "lora/sdxl-kohya.safetensors", "is it made for another model family"),
        ("sdxl", fixtures(), "lora/sd1-kohya.safetensors", "is it made for another model family"),
        ("sd1", dir.clone(), "bad-shape.safetensors", "down projection of shape [2, 5, 3, 3]"),
        ("sd1", dir.clone(), "loha.safetensors", "LoHa"),
        ("sd1", fixtures(), "embeddings/cat-toy.safetensors", "no LoRA modules"),
    ] {
        let e = try_load(model, (&lora, file));
        println!("{model} + {file}: {e}");
        assert!(e.contains(want), "{model} + {file}: {e}");
    }
    // An embedding of the wrong width.
    let emb = ldm_web::loader::safetensors::serialize(
        &[ldm_web::loader::safetensors::OutTensor { name: "<odd>".into(), dtype: ldm_web::loader::safetensors::FileDType::F32, shape: vec![1, 17], bytes: vec![0; 17 * 4] }],
        &Default::default(),
    )
    .expect("serialises");
    std::fs::write(dir.join("odd.safetensors"), emb).expect("w");
    let no_case = Case { index: 0, kind: "sd".into(), model: String::new(), components: HashMap::new(), scheduler: None, prompt: None, prompt_2: None, negative_prompt: None, negative_prompt_2: None, seed: 0, steps: 1, guidance: None, width: 64, height: 64, batch: 1, eta: 0.0, image: None, mask: None, controlnet: None, loras: vec![], embeddings: vec![], q4_weights: None, a1111: None, args: None, stages: None };
    let mut m = load_sd(&gpu, &no_case, "sd1", false);
    let e = pollster::block_on(Embedding::read(&DirSource::new(&dir), "odd.safetensors")).expect("reads");
    let err = m.text.add_embedding(&gpu, &e, "<odd>").expect_err("wrong width").to_string();
    println!("odd embedding: {err}");
    assert!(err.contains("[17]") && err.contains("768"), "{err}");

    // Merged into the f32 weights: the image of case 14 (the LoRA run beside the weights).
    let file = family_json();
    let cases: Vec<Case> = serde_json::from_value(file["cases"].clone()).expect("cases");
    let c = &cases[14];
    let merged = pollster::block_on(async {
        let mut set = AdapterSet::new();
        set.merge = true;
        set.add(Box::new(DirSource::new(fixtures())), &c.loras[0].file, "kohya", c.loras[0].scale).await.expect("adds");
        let opts = LoadOptions { adapters: Some(Rc::new(set)), ..Default::default() };
        let m = StableDiffusionModel::load(&gpu, &DirSource::new(fixtures().join("sd1")), "sd1", &opts).await.expect("loads");
        m.txt2img(&gpu, &params(c), &|| 0.0, &mut |_| Ok(())).await.expect("generates").0.data
    });
    let want = &reference("family_14.safetensors")["image"].1;
    let (d, _) = common::max_diff(&merged, want);
    println!("LoRA merged into f32 weights: max |diff| {:.4}/255 from diffusers' unfused LoRA", d * 255.0);
    assert!(d <= PIXEL_TOL, "merged LoRA: {:.2}/255", d * 255.0);
    // Merging into quantised weights is refused.
    let e = pollster::block_on(async {
        let mut set = AdapterSet::new();
        set.merge = true;
        set.add(Box::new(DirSource::new(fixtures())), &c.loras[0].file, "kohya", 1.0).await.expect("adds");
        let mut opts = LoadOptions { adapters: Some(Rc::new(set)), ..Default::default() };
        opts.quant.unet = Some(DType::Q4_0);
        StableDiffusionModel::load(&gpu, &DirSource::new(fixtures().join("sd1")), "sd1", &opts).await.err().map(|e| e.to_string())
    });
    println!("merge into q4: {e:?}");
    assert!(e.is_some_and(|e| e.contains("quantised")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// SDXL at 1024x1024 in f32 needs its feed-forward in token chunks to fit a browser's 128 MiB
/// bindings: a transformer whose GEGLU input is 128 KiB, on a device that binds 64 KiB at most,
/// gives the unchunked device's output.
#[test]
fn feed_forward_chunks_fit_small_bindings() {
    use ldm_web::gpu::GpuOptions;
    use ldm_web::loader::{StaticSource, Weights};
    use ldm_web::models::transformer_2d::Transformer2DModel;
    let run = |max_storage_binding: Option<u64>| {
        pollster::block_on(async {
            let gpu = Gpu::new(GpuOptions { force_f32: true, max_storage_binding, ..Default::default() }).await?;
            let empty = StaticSource::new("random", &[]);
            let w = Weights::random(&empty, 7);
            // 8 channels, 2 heads, one block, text width 12; 2 x 16 x 16 tokens: GEGLU input 512 x 64 f32.
            let t = Transformer2DModel::load(&w.at(&gpu, DType::F32, ""), 8, 2, 1, 12, 4, false).await?;
            let x = gpu.upload(&[2, 8, 16, 16], DType::F32, &(0..4096).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect::<Vec<_>>())?;
            let ctx = gpu.upload(&[2, 5, 12], DType::F32, &(0..120).map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0).collect::<Vec<_>>())?;
            let y = t.forward(&gpu, &x, &ctx)?;
            gpu.read(&y).await
        })
        .expect("transformer runs")
    };
    let whole = run(None);
    let chunked = run(Some(64 << 10));
    let d = whole.iter().zip(&chunked).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(d <= 1e-6, "chunked feed-forward differs by {d}");
    assert!(whole.iter().any(|v| v.abs() > 1e-3), "the transformer's output is all zeros");
}
