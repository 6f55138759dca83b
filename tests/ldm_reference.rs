//! The latent diffusion paper's own model family against diffusers, from the fixtures of
//! `scripts/ldm_fixtures.py`: `VQModel` (codebook choices exactly, decoded images within 1e-4
//! relative), `UNet2DModel` (self-attention blocks, scale-shift resnets, the three class
//! embeddings) and `LDMBertModel` within 1e-4 relative, `BertTokenizer` ids exactly, and the three
//! pipelines (`LDMPipeline`, `LDMSuperResolutionPipeline`, `LDMTextToImagePipeline`): every
//! pixel within 2/255 of diffusers' `output_type="np"` images.

mod common;

use common::{assert_close, fixtures, gpu, max_diff, reference};
use ldm_web::gpu::{DType, Gpu};
use ldm_web::loader::{component_files, read_json, DirSource, Weights};
use ldm_web::models::{LdmBertConfig, LdmBertModel, UNet2DConfig, UNet2DModel, VQModel, VQModelConfig};
use ldm_web::pipelines::ldm::load_bert_tokenizer;
use ldm_web::pipelines::image_input::InputImage;
use ldm_web::pipelines::{DiffusionModel, LdmImage, LdmKind, LdmModel, LoadOptions, LowResImage, Txt2ImgParams};
use ldm_web::schedulers::SchedulerKind;

/// Largest allowed per-channel difference from diffusers' image in [0, 1].
const PIXEL_TOL: f32 = 2.0 / 255.0;

fn load_unet(gpu: &Gpu, folder: &str) -> UNet2DModel {
    let src = DirSource::new(fixtures().join("ldm"));
    pollster::block_on(async {
        let config: UNet2DConfig = read_json(&src, &format!("{folder}/config.json")).await?.expect("config");
        let w = Weights::new(&src, component_files(&src, folder, "diffusion_pytorch_model", false).await?);
        UNet2DModel::load(&w.at(gpu, DType::F32, ""), config).await
    })
    .unwrap_or_else(|e| panic!("{folder}: {e}"))
}

#[test]
fn unet_2d_matches_diffusers() {
    let gpu = gpu();
    let r = reference("ldm_models.safetensors");
    let (xs, x) = &r["unet2d_sample"];
    let sample = gpu.upload(xs, DType::F32, x).expect("upload");
    let read = |t| pollster::block_on(gpu.read(&t)).expect("read");
    let out = load_unet(&gpu, "uncond/unet").forward(&gpu, &sample, 500.0, None).expect("forward");
    assert_close("UNet2DModel (attention blocks) t=500", &read(out), &r["unet2d_out"].1, 1e-4);
    for name in ["unet_class_timestep", "unet_class_table", "unet_class_identity"] {
        let unet = load_unet(&gpu, name);
        let labels = &r[&format!("{name}_labels")].1;
        let out = unet.forward(&gpu, &sample, 250.0, Some(labels)).expect("forward");
        assert_close(&format!("UNet2DModel {name} t=250"), &read(out), &r[&format!("{name}_out")].1, 1e-4);
        assert!(unet.forward(&gpu, &sample, 250.0, None).is_err(), "{name} must refuse a run without class labels");
    }
}

#[test]
fn ldm_bert_and_tokenizer_match_transformers() {
    let gpu = gpu();
    let src = DirSource::new(fixtures().join("ldm/text2im"));
    let tokenizer = pollster::block_on(load_bert_tokenizer(&src, "tokenizer")).expect("tokenizer");
    #[derive(serde::Deserialize)]
    struct Case {
        prompt: String,
        ids: Vec<u32>,
    }
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(fixtures().join("ref/bert_tokens.json")).expect("bert_tokens.json")).expect("parses");
    for c in &cases {
        assert_eq!(tokenizer.encode(&c.prompt, 77), c.ids, "BertTokenizer ids of {:?}", c.prompt);
    }
    println!("bert tokenizer: {} prompts, ids identical to transformers'", cases.len());
    let r = reference("ldm_models.safetensors");
    let bert = pollster::block_on(async {
        let config: LdmBertConfig = read_json(&src, "bert/config.json").await?.expect("config");
        let w = Weights::new(&src, component_files(&src, "bert", "model", false).await?);
        LdmBertModel::load(&w.at(&gpu, DType::F32, ""), config).await
    })
    .expect("LDMBert loads");
    let (shape, ids) = &r["bert_ids"];
    let rows: Vec<Vec<u32>> = ids.chunks(shape[1]).map(|row| row.iter().map(|&v| v as u32).collect()).collect();
    assert_eq!(rows[0], tokenizer.encode("A painting of a squirrel eating a burger", 77));
    let out = bert.forward(&gpu, &rows).expect("forward");
    assert_close("LDMBert last_hidden_state", &pollster::block_on(gpu.read(&out)).expect("read"), &r["bert_hidden"].1, 1e-4);
}

#[derive(serde::Deserialize)]
struct PipelineCase {
    key: String,
    model: String,
    #[serde(default)]
    prompt: String,
    scheduler: String,
    steps: usize,
    #[serde(default = "one")]
    guidance: f32,
    eta: f32,
    #[serde(default)]
    width: usize,
    #[serde(default)]
    height: usize,
    batch: usize,
    seed: u64,
    image: Option<String>,
}

fn one() -> f32 {
    1.0
}

/// The fixture's low-resolution PNG as the pipeline takes it (diffusers' `preprocess`: no resize
/// at a multiple of 32, then `2 x - 1`).
fn low_res(name: &str) -> LowResImage {
    let img = image::open(fixtures().join("ldm").join(name)).expect("lowres.png").to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = 2.0 * (p.0[c] as f32 / 255.0) - 1.0;
        }
    }
    LowResImage { width: w, height: h, data }
}

#[test]
fn ldm_pipelines_match_diffusers_images() {
    let cases: Vec<PipelineCase> = serde_json::from_slice(&std::fs::read(fixtures().join("ref/ldm_cases.json")).expect("ldm_cases.json")).expect("parses");
    let want = reference("ldm_pipelines.safetensors");
    let gpu = gpu();
    let mut models: std::collections::HashMap<String, LdmModel> = Default::default();
    let mut failures = Vec::new();
    for c in &cases {
        let model = models.entry(c.model.clone()).or_insert_with(|| load_ldm(&gpu, &fixtures().join("ldm").join(&c.model), &c.model));
        // Cases without a size run at the model's own (its sample size).
        let (dw, dh) = model.default_size();
        let (width, height) = if c.width > 0 { (c.width, c.height) } else { (dw, dh) };
        let p = Txt2ImgParams {
            prompt: c.prompt.clone(), seed: c.seed, steps: c.steps, guidance_scale: c.guidance, width, height,
            scheduler: Some(c.scheduler.parse::<SchedulerKind>().expect("scheduler")), eta: c.eta, batch: c.batch, ..Default::default()
        };
        let img = c.image.as_deref().map(|n| LdmImage::LowRes(low_res(n)));
        let (images, _) = pollster::block_on(model.generate(&gpu, &p, img.as_ref(), &|| 0.0, &mut |_| Ok(()))).unwrap_or_else(|e| panic!("{}: {e}", c.key));
        let (shape, pixels) = &want[&c.key];
        assert_eq!(vec![images.batch, images.height, images.width, 3], *shape, "{} shape", c.key);
        let (d, _) = max_diff(&images.data, pixels);
        let mean = images.data.iter().zip(pixels).map(|(a, b)| (a - b).abs()).sum::<f32>() / pixels.len() as f32;
        println!("{:<11} {:<8} {} steps, eta {}, cfg {}, {}x{} batch {}: max |diff| {:.4}/255, mean {:.5}/255",
            c.key, c.scheduler, c.steps, c.eta, c.guidance, images.width, images.height, c.batch, d * 255.0, mean * 255.0);
        if d > PIXEL_TOL {
            failures.push(format!("{}: max pixel difference {:.2}/255", c.key, d * 255.0));
        }
    }
    assert!(!cases.is_empty(), "no LDM pipeline cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn load_ldm(gpu: &Gpu, dir: &std::path::Path, name: &str) -> LdmModel {
    match pollster::block_on(DiffusionModel::load(gpu, &DirSource::new(dir), name, &LoadOptions::default())) {
        Ok(DiffusionModel::Ldm(m)) => m,
        Ok(_) => panic!("{name}: loaded as Stable Diffusion, not an LDM pipeline"),
        Err(e) => panic!("{name}: {e}"),
    }
}

/// Concatenation-conditioned LDMs (scripts/concat_fixtures.py): tiny CompVis-layout checkpoints
/// converted by scripts/convert_compvis_concat.py, against a PyTorch sampler written from
/// CompVis' DDIM maths. Condition tensors (PIL resize, torch interpolate, a VQ or KL encoder)
/// within 1e-4, images within 2/255.
#[test]
fn concat_conditioned_ldms_match_the_compvis_sampler() {
    #[derive(serde::Deserialize)]
    struct Case {
        key: String,
        model: String,
        image: String,
        steps: usize,
        eta: f32,
        width: usize,
        height: usize,
        batch: usize,
        seed: u64,
    }
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(fixtures().join("ref/concat_cases.json")).expect("concat_cases.json")).expect("parses");
    let want = reference("concat.safetensors");
    let gpu = gpu();
    let mut models: std::collections::HashMap<String, LdmModel> = Default::default();
    let mut failures = Vec::new();
    for c in &cases {
        let model = models.entry(c.model.clone()).or_insert_with(|| load_ldm(&gpu, &fixtures().join("concat").join(&c.model), &c.model));
        assert_eq!(model.kind, LdmKind::Concat, "{}", c.model);
        let img = InputImage::from_png(&std::fs::read(fixtures().join("images").join(&c.image)).expect("image")).expect("png");
        let concat = model.concat.as_ref().expect("concat entry");
        let cond = pollster::block_on(concat.prepare(&gpu, &model.first_stage, &img, c.width, c.height, DType::F32)).expect("condition");
        assert_close(&format!("{} condition ({:?})", c.key, concat.stage), &cond, &want[&format!("{}_condition", c.key)].1, 1e-4);
        // CompVis' sampler runs these without guidance (1.0: no unconditional half).
        let p = Txt2ImgParams { seed: c.seed, steps: c.steps, width: c.width, height: c.height, eta: c.eta, batch: c.batch, guidance_scale: 1.0, ..Default::default() };
        let (images, _) = pollster::block_on(model.generate(&gpu, &p, Some(&LdmImage::Condition(img)), &|| 0.0, &mut |_| Ok(()))).unwrap_or_else(|e| panic!("{}: {e}", c.key));
        let (shape, pixels) = &want[&c.key];
        assert_eq!(vec![images.batch, images.height, images.width, 3], *shape, "{} shape", c.key);
        let (d, _) = max_diff(&images.data, pixels);
        println!("concat {:<7} {:<15} {} steps, eta {}, {}x{} batch {}: max |diff| {:.4}/255", c.key, c.model, c.steps, c.eta, c.width, c.height, c.batch, d * 255.0);
        if d > PIXEL_TOL {
            failures.push(format!("{}: max pixel difference {:.2}/255", c.key, d * 255.0));
        }
    }
    assert_eq!(cases.len(), 5);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Without its condition, or at a size the rescaler does not map onto the latent grid.
    let m = &models["rescale"];
    let p = Txt2ImgParams { steps: 2, width: 32, height: 32, ..Default::default() };
    let e = pollster::block_on(m.generate(&gpu, &p, None, &|| 0.0, &mut |_| Ok(()))).err().expect("needs its condition").to_string();
    assert!(e.contains("condition image"), "{e}");
    let img = LdmImage::Condition(InputImage::from_png(&std::fs::read(fixtures().join("images/init.png")).expect("image")).expect("png"));
    assert!(pollster::block_on(m.generate(&gpu, &Txt2ImgParams { width: 34, ..p.clone() }, Some(&img), &|| 0.0, &mut |_| Ok(()))).is_err());
}

#[test]
fn ldm_models_refuse_what_they_cannot_run() {
    let bad = |json: &str| serde_json::from_str::<UNet2DConfig>(json).expect("json").validate().unwrap_err().to_string();
    assert!(bad(r#"{"down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["UpBlock2D"], "block_out_channels": [32]}"#).contains("CrossAttnDownBlock2D"));
    assert!(bad(r#"{"time_embedding_type": "fourier"}"#).contains("fourier"));
    assert!(bad(r#"{"resnet_time_scale_shift": "spatial"}"#).contains("spatial"));
    assert!(bad(r#"{"class_embed_type": "projection"}"#).contains("projection"));
    assert!(bad(r#"{"block_out_channels": [30, 60, 90, 120]}"#).contains("groups"));
    assert!(UNet2DConfig::default().validate().is_ok());
    let gpu = gpu();
    let m = match pollster::block_on(DiffusionModel::load(&gpu, &DirSource::new(fixtures().join("ldm/superres")), "superres", &LoadOptions::default())) {
        Ok(DiffusionModel::Ldm(m)) => m,
        _ => panic!("superres loads"),
    };
    let p = Txt2ImgParams { steps: 2, ..Default::default() };
    let e = pollster::block_on(m.generate(&gpu, &p, None, &|| 0.0, &mut |_| Ok(()))).err().expect("needs an image").to_string();
    assert!(e.contains("--init-image"), "{e}");
    let odd = LdmImage::LowRes(LowResImage { width: 33, height: 32, data: vec![0.0; 3 * 33 * 32] });
    assert!(pollster::block_on(m.generate(&gpu, &p, Some(&odd), &|| 0.0, &mut |_| Ok(()))).is_err());
}

#[test]
fn vq_model_matches_diffusers() {
    let gpu = gpu();
    let r = reference("vqmodel.safetensors");
    let src = DirSource::new(fixtures().join("ldm"));
    let vq = pollster::block_on(async {
        let config: VQModelConfig = read_json(&src, "vqvae/config.json").await?.expect("config");
        let w = Weights::new(&src, component_files(&src, "vqvae", "diffusion_pytorch_model", false).await?);
        VQModel::load(&w.at(&gpu, DType::F32, ""), config, false).await
    })
    .expect("VQModel loads");
    let (zs, z) = &r["latents"];
    let shape = [zs[0], zs[1], zs[2], zs[3]];
    let (_, codes) = vq.quantize(z, shape).expect("quantize");
    let want: Vec<u32> = r["codes"].1.iter().map(|&c| c as u32).collect();
    assert_eq!(codes, want, "nearest codebook entries differ from diffusers'");
    println!("vqmodel: {} latent pixels, codes identical to diffusers'", codes.len());
    for (force_not_quantize, key) in [(false, "decoded"), (true, "decoded_unquantized")] {
        let out = vq.decode(&gpu, z, shape, force_not_quantize, DType::F32).expect("decode");
        assert_eq!(out.shape(), r[key].0.as_slice());
        assert_close(&format!("vqmodel decode (force_not_quantize={force_not_quantize})"), &pollster::block_on(gpu.read(&out)).expect("read"), &r[key].1, 1e-4);
    }
}

#[test]
fn vq_model_refuses_what_it_cannot_run() {
    let spatial: VQModelConfig = serde_json::from_str(r#"{"norm_type": "spatial"}"#).expect("json");
    assert!(spatial.validate().unwrap_err().to_string().contains("spatial"));
    let groups: VQModelConfig = serde_json::from_str(r#"{"block_out_channels": [48], "norm_num_groups": 32}"#).expect("json");
    assert!(groups.validate().is_err());
    assert!(VQModelConfig::default().validate().is_ok());
}
