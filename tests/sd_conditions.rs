//! Image-conditioned pipelines against diffusers' `output_type="np"` images
//! (tests/fixtures/ref/cond_cases.json, scripts/cond_fixtures.py): img2img with every scheduler,
//! inpainting with 9-channel UNets and by latent blending, depth-to-image, ControlNet (single,
//! multi, guess mode, guidance window); every pixel within
//! 2/255, with the images read from the PNG files as a user gives them.

mod common;

use common::{fixtures, gpu, reference};
use ldm_web::loader::DirSource;
use ldm_web::pipelines::image_input::{mask_tensor, rgb_tensor, InputImage};
use ldm_web::models::{ControlNetConfig, ControlNetModel};
use ldm_web::pipelines::{load_controlnet, load_controlnet_single_file, Control, DepthMap, ImageConditions, LoadOptions, StableDiffusionModel, Txt2ImgParams};
use ldm_web::schedulers::SchedulerKind;

/// Largest allowed per-channel difference from diffusers' image in [0, 1].
const PIXEL_TOL: f32 = 2.0 / 255.0;

#[derive(serde::Deserialize)]
struct Case {
    index: usize,
    kind: String,
    model: String,
    scheduler: Option<String>,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    steps: usize,
    guidance: f32,
    eta: f32,
    width: usize,
    height: usize,
    batch: usize,
    strength: Option<f32>,
    image: Option<String>,
    mask: Option<String>,
    mask_blur: Option<f32>,
    depth: Option<String>,
    controlnets: Vec<ControlSpec>,
    guess_mode: Option<bool>,
    control_guidance_start: Option<f32>,
    control_guidance_end: Option<f32>,
    noise_level: Option<u32>,
}

#[derive(serde::Deserialize)]
struct ControlSpec {
    folder: String,
    image: String,
    scale: f32,
    controlnet_file: Option<String>,
}

fn controlnet_config(folder: &str) -> ControlNetConfig {
    ControlNetConfig::from_json(&std::fs::read_to_string(fixtures().join(folder).join("config.json")).expect("config.json")).expect("config")
}

fn net_key(s: &ControlSpec) -> String {
    s.controlnet_file.clone().unwrap_or_else(|| s.folder.clone())
}

fn image(name: &str) -> InputImage {
    let path = fixtures().join("images").join(name);
    InputImage::from_png(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).expect("decodes")
}

/// The conditions of a case, from its files as the CLI and the page read them.
fn conditions<'m>(c: &Case, nets: &'m std::collections::HashMap<String, ControlNetModel>) -> ImageConditions<'m> {
    let (w, h) = (c.width, c.height);
    ImageConditions {
        controls: c
            .controlnets
            .iter()
            .map(|s| Control {
                model: &nets[&net_key(s)],
                image: rgb_tensor(&image(&s.image), w, h, false),
                scale: s.scale,
                start: c.control_guidance_start.unwrap_or(0.0),
                end: c.control_guidance_end.unwrap_or(1.0),
            })
            .collect(),
        guess_mode: c.guess_mode.unwrap_or(false),
        noise_level: c.noise_level,
        init_latents: None,
        // The upscaler's input is the low-resolution image at its own size.
        init: c.image.as_deref().map(|f| {
            let img = image(f);
            let (iw, ih) = if c.kind == "upscale" { (img.width, img.height) } else { (w, h) };
            rgb_tensor(&img, iw, ih, true)
        }),
        strength: c.strength,
        mask: c.mask.as_deref().map(|f| mask_tensor(&image(f), w, h, c.mask_blur.unwrap_or(0.0))),
        depth: c.depth.as_deref().map(|f| {
            let d = image(f);
            DepthMap { width: d.width, height: d.height, data: d.gray_values() }
        }),
    }
}

#[test]
fn image_pipelines_match_diffusers_images() {
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("ref/cond_cases.json")).expect("cond_cases.json")).expect("parses");
    let cases: Vec<Case> = serde_json::from_value(file["cases"].clone()).expect("cases");
    let only = std::env::var("LDM_CASE").ok().and_then(|v| v.parse::<usize>().ok());
    let gpu = gpu();
    let opts = LoadOptions { vae_encoder: true, ..Default::default() };
    let mut models: std::collections::HashMap<String, StableDiffusionModel> = Default::default();
    let mut nets: std::collections::HashMap<String, ControlNetModel> = Default::default();
    let (mut failures, mut ran) = (Vec::new(), 0);
    for c in cases.iter().filter(|c| only.is_none_or(|o| o == c.index)) {
        if !matches!(c.kind.as_str(), "img2img" | "inpaint" | "depth2img" | "controlnet" | "upscale") {
            continue;
        }
        for s in &c.controlnets {
            if !nets.contains_key(&net_key(s)) {
                let src = DirSource::new(fixtures());
                let net = pollster::block_on(async {
                    match &s.controlnet_file {
                        // As diffusers' from_single_file(config=folder).
                        Some(file) => load_controlnet_single_file(&gpu, &src, file, Some(controlnet_config(&s.folder)), &LoadOptions::default()).await,
                        None => load_controlnet(&gpu, &src, &s.folder, &LoadOptions::default()).await,
                    }
                })
                .unwrap_or_else(|e| panic!("loading {}: {e}", net_key(s)));
                nets.insert(net_key(s), net);
            }
        }
        let model = models.entry(c.model.clone()).or_insert_with(|| {
            pollster::block_on(StableDiffusionModel::load(&gpu, &DirSource::new(fixtures().join(&c.model)), &c.model, &opts)).unwrap_or_else(|e| panic!("loading {}: {e}", c.model))
        });
        let p = Txt2ImgParams {
            prompt: c.prompt.clone(), negative_prompt: c.negative_prompt.clone(), seed: c.seed, steps: c.steps,
            guidance_scale: c.guidance, guidance_rescale: 0.0, width: c.width, height: c.height,
            scheduler: c.scheduler.as_deref().map(|s| s.parse::<SchedulerKind>().expect("known scheduler")),
            eta: c.eta, clip_skip: 0, batch: c.batch,
            ..Default::default()
        };
        let (images, _) = match pollster::block_on(model.generate(&gpu, &p, &conditions(c, &nets), &|| 0.0, &mut |_| Ok(()))) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("case {} ({}): {e}", c.index, c.kind));
                continue;
            }
        };
        let want = &reference(&format!("cond_{}.safetensors", c.index))["image"];
        assert_eq!(want.0, vec![c.batch, c.height, c.width, 3], "case {} shape", c.index);
        let (d, _) = common::max_diff(&images.data, &want.1);
        let mean = images.data.iter().zip(&want.1).map(|(a, b)| (a - b).abs()).sum::<f32>() / want.1.len() as f32;
        println!(
            "case {:>2} {:<13} {:<12} {:<20} strength {:<4} batch {}: max |diff| {:.4}/255, mean {:.5}/255",
            c.index, c.kind, c.model, c.scheduler.as_deref().unwrap_or("(default)"), c.strength.map_or("-".into(), |s| s.to_string()), c.batch, d * 255.0, mean * 255.0
        );
        if d > PIXEL_TOL {
            failures.push(format!("case {} ({} {} {:?}): max pixel difference {:.2}/255", c.index, c.kind, c.model, c.scheduler, d * 255.0));
        }
        ran += 1;
    }
    assert!(ran > 0 || only.is_some(), "no cases ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An original-layout ControlNet file's architecture is inferred from its shapes as the folder
/// has it (all but norm groups and heads, which no checkpoint stores).
#[test]
fn controlnet_single_file_config_is_inferred() {
    use ldm_web::loader::WeightFile;
    let wf = pollster::block_on(WeightFile::open(&DirSource::new(fixtures()), "controlnet-a.safetensors")).expect("header");
    let got = ldm_web::pipelines::single_file::infer_controlnet_config(&wf.header).expect("inferred");
    let want = controlnet_config("controlnet-a");
    assert_eq!(got.conditioning_embedding_out_channels, want.conditioning_embedding_out_channels);
    let (g, w) = (&got.unet, &want.unet);
    assert_eq!((&g.block_out_channels, &g.layers_per_block, &g.down_block_types, &g.cross_attention_dim, g.in_channels), (&w.block_out_channels, &w.layers_per_block, &w.down_block_types, &w.cross_attention_dim, w.in_channels));
}

/// Depth estimators against transformers (scripts/depth_fixtures.py): DPT-Hybrid (BiT, "SAME"
/// padding, batch norms folded), DPT (position embeddings resized), Depth Anything (DINOv2, layer
/// scale, bicubic position embeddings, fusion to the next level's size) on RGB, RGBA, gray and
/// odd-sized photos: `pixel_values` within 1e-5, `predicted_depth` within 1e-4 relative, the
/// depth-estimation pipeline's 8-bit image within one level (it truncates).
#[test]
fn depth_estimators_match_transformers() {
    use ldm_web::gpu::DType;
    use ldm_web::pipelines::depth::{depth_to_image, DepthEstimator};
    #[derive(serde::Deserialize)]
    struct DepthCase {
        key: String,
        model: String,
        image: String,
    }
    let cases: Vec<DepthCase> = serde_json::from_slice(&std::fs::read(fixtures().join("ref/depth_cases.json")).expect("depth_cases.json")).expect("parses");
    let want = reference("depth.safetensors");
    let gpu = gpu();
    let mut models: std::collections::HashMap<String, DepthEstimator> = Default::default();
    for c in &cases {
        let est = models.entry(c.model.clone()).or_insert_with(|| {
            let src = DirSource::new(fixtures().join("depth").join(&c.model));
            pollster::block_on(DepthEstimator::load(&gpu, &src, "", "", DType::F32)).unwrap_or_else(|e| panic!("{}: {e}", c.model))
        });
        let img = if c.image == "gray" { InputImage::from_png(&std::fs::read(fixtures().join("depth/gray.png")).expect("gray.png")).expect("png") } else { image(&c.image) };
        let (pixels, _, _) = est.processor.preprocess(&img).expect("preprocess");
        let (d, _) = common::max_diff(&pixels, &want[&format!("{}.pixel_values", c.key)].1);
        assert!(d <= 1e-5, "{}: pixel_values differ by {d:e}", c.key);
        let depth = pollster::block_on(est.predict(&gpu, &img)).unwrap_or_else(|e| panic!("{}: {e}", c.key));
        let (ws, wd) = &want[&format!("{}.predicted_depth", c.key)];
        assert_eq!(vec![depth.height, depth.width], *ws, "{} depth shape", c.key);
        common::assert_close(&format!("{} predicted_depth", c.key), &depth.data, wd, 1e-4);
        let image8 = depth_to_image(&depth, img.width, img.height).expect("depth image");
        let (_, want8) = &want[&format!("{}.depth_image", c.key)];
        let off: Vec<f32> = image8.data.iter().zip(want8).map(|(&a, &b)| (a as f32 - b).abs()).collect();
        let (max, n) = (off.iter().copied().fold(0.0, f32::max), off.iter().filter(|&&v| v > 0.0).count());
        println!("{}: depth image {}x{}: {n} of {} levels off by at most {max}", c.key, img.width, img.height, off.len());
        assert!(max <= 1.0 && n * 100 <= off.len(), "{}: depth image off by {max} at {n} pixels", c.key);
    }
    assert_eq!(cases.len(), 12);
}

/// `StableDiffusionDepth2ImgPipeline` without a depth map: the folder's depth_estimator/ and
/// feature_extractor/ make it (scripts/depth_fixtures.py); images within 2/255.
#[test]
fn depth2img_estimates_depth_as_diffusers() {
    use ldm_web::pipelines::UserImages;
    #[derive(serde::Deserialize)]
    struct D2iCase {
        key: String,
        image: String,
        prompt: String,
        steps: usize,
        strength: f32,
        seed: u64,
    }
    let cases: Vec<D2iCase> = serde_json::from_slice(&std::fs::read(fixtures().join("ref/depth2img_cases.json")).expect("depth2img_cases.json")).expect("parses");
    let want = reference("depth2img.safetensors");
    let gpu = gpu();
    let src = DirSource::new(fixtures().join("sd2-depth-estimator"));
    let model = pollster::block_on(StableDiffusionModel::load(&gpu, &src, "sd2-depth-estimator", &LoadOptions { vae_encoder: true, ..Default::default() })).expect("loads");
    assert!(model.bundled_depth_estimator);
    for c in &cases {
        let mut user = UserImages { init: Some(image(&c.image)), strength: Some(c.strength), ..Default::default() };
        assert!(model.needs_depth_estimate(&user));
        let init = user.init.clone().expect("init");
        user.depth_prediction = Some(pollster::block_on(model.estimate_depth(&gpu, &src, &init)).expect("estimates"));
        let prepared = model.prepare_images(user, None, None).expect("prepares");
        let p = Txt2ImgParams { prompt: c.prompt.clone(), seed: c.seed, steps: c.steps, guidance_scale: 7.5, width: prepared.width, height: prepared.height, ..Default::default() };
        let (images, _) = pollster::block_on(model.generate(&gpu, &p, &prepared.conditions, &|| 0.0, &mut |_| Ok(()))).unwrap_or_else(|e| panic!("{}: {e}", c.key));
        let (shape, pixels) = &want[&c.key];
        assert_eq!(vec![images.batch, images.height, images.width, 3], *shape, "{} shape", c.key);
        let (d, _) = common::max_diff(&images.data, pixels);
        println!("{}: depth-to-image with its own estimator, {}x{}: max |diff| {:.4}/255", c.key, images.width, images.height, d * 255.0);
        assert!(d <= PIXEL_TOL, "{}: max pixel difference {:.2}/255", c.key, d * 255.0);
    }
    // Without an estimator of its own, a depth model asks for a depth map.
    let plain = pollster::block_on(StableDiffusionModel::load(&gpu, &DirSource::new(fixtures().join("sd2-depth")), "sd2-depth", &LoadOptions { vae_encoder: true, ..Default::default() })).expect("loads");
    let e = pollster::block_on(plain.estimate_depth(&gpu, &DirSource::new(fixtures().join("sd2-depth")), &image("init.png"))).err().expect("refused").to_string();
    assert!(e.contains("depth map"), "{e}");
}

/// ControlNets fed by the preprocessors against diffusers fed by OpenCV's `cv2.Canny` and
/// transformers' depth-estimation pipeline (scripts/depth_fixtures.py; a 100x70 photo, the
/// condition resized to 96x64 by the pipeline): within 2/255.
#[test]
fn controlnets_fed_by_the_preprocessors_match_diffusers() {
    use ldm_web::gpu::DType;
    use ldm_web::pipelines::canny::{canny_image, CannyParams};
    use ldm_web::pipelines::depth::DepthEstimator;
    use ldm_web::pipelines::UserImages;
    #[derive(serde::Deserialize)]
    struct PcCase {
        key: String,
        preprocess: String,
        photo: String,
        prompt: String,
        steps: usize,
        guidance: f32,
        width: usize,
        height: usize,
        seed: u64,
        depth_model: String,
    }
    let cases: Vec<PcCase> = serde_json::from_slice(&std::fs::read(fixtures().join("ref/preprocessed_controls.json")).expect("cases")).expect("parses");
    let want = reference("preprocessed_controls.safetensors");
    let gpu = gpu();
    let model = pollster::block_on(StableDiffusionModel::load(&gpu, &DirSource::new(fixtures().join("sd1")), "sd1", &LoadOptions::default())).expect("sd1");
    let net = pollster::block_on(load_controlnet(&gpu, &DirSource::new(fixtures()), "controlnet-a", &LoadOptions::default())).expect("controlnet-a");
    for c in &cases {
        let photo = image(&c.photo);
        let condition = match c.preprocess.as_str() {
            "canny" => canny_image(&photo, CannyParams::default()).expect("canny"),
            _ => {
                let est = pollster::block_on(DepthEstimator::load(&gpu, &DirSource::new(fixtures().join("depth").join(&c.depth_model)), "", "", DType::F32)).expect("estimator");
                pollster::block_on(est.depth_image(&gpu, &photo)).expect("depth image")
            }
        };
        let user = UserImages { controls: vec![(&net, condition, 1.0)], ..Default::default() };
        let prepared = model.prepare_images(user, Some(c.width), Some(c.height)).expect("prepares");
        let p = Txt2ImgParams { prompt: c.prompt.clone(), seed: c.seed, steps: c.steps, guidance_scale: c.guidance, width: c.width, height: c.height, ..Default::default() };
        let (images, _) = pollster::block_on(model.generate(&gpu, &p, &prepared.conditions, &|| 0.0, &mut |_| Ok(()))).unwrap_or_else(|e| panic!("{}: {e}", c.key));
        let (d, _) = common::max_diff(&images.data, &want[&c.key].1);
        println!("{}: a ControlNet fed by --control-preprocess {}: max |diff| {:.4}/255", c.key, c.preprocess, d * 255.0);
        assert!(d <= PIXEL_TOL, "{}: {:.2}/255", c.key, d * 255.0);
    }
    assert_eq!(cases.len(), 2);
}
