//! The built-in emoji model (assets/builtin/emoji) against diffusers: the same images from the
//! same prompts and seeds (f32 within 2/255; f16, as browsers with shader-f16 run it, within
//! 8/255 at any pixel and 0.5/255 on average), its size budget and what ships with it (ldm-web.json, model card, licences).

mod common;

use common::{gpu, max_diff, reference};
use ldm_web::gpu::DType;
use ldm_web::loader::DirSource;
use ldm_web::pipelines::{LoadOptions, StableDiffusionModel, Txt2ImgParams};
use ldm_web::schedulers::SchedulerKind;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/builtin/emoji")
}

#[derive(serde::Deserialize)]
struct Case {
    key: String,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    steps: usize,
    guidance: f32,
    batch: usize,
    scheduler: Option<String>,
}

fn run(model: &StableDiffusionModel, c: &Case) -> Vec<f32> {
    let p = Txt2ImgParams {
        prompt: c.prompt.clone(), negative_prompt: c.negative_prompt.clone(), seed: c.seed, steps: c.steps, guidance_scale: c.guidance,
        width: 64, height: 64, batch: c.batch, scheduler: c.scheduler.as_deref().map(|s| s.parse::<SchedulerKind>().expect("scheduler")), ..Default::default()
    };
    pollster::block_on(model.txt2img(&model_gpu(), &p, &|| 0.0, &mut |_| Ok(()))).unwrap_or_else(|e| panic!("{}: {e}", c.key)).0.data
}

thread_local! {
    static GPU: ldm_web::gpu::Gpu = gpu();
}

fn model_gpu() -> ldm_web::gpu::Gpu {
    GPU.with(|g| g.clone())
}

fn load(dtype: DType) -> StableDiffusionModel {
    let opts = LoadOptions { dtype: Some(dtype), ..Default::default() };
    pollster::block_on(StableDiffusionModel::load(&model_gpu(), &DirSource::new(model_dir()), "emoji", &opts)).expect("the built-in model loads")
}

#[test]
fn builtin_model_matches_diffusers() {
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(common::fixtures().join("ref/builtin_cases.json")).expect("builtin_cases.json")).expect("parses");
    let want = reference("builtin.safetensors");
    let model = load(DType::F32);
    for c in &cases {
        let got = run(&model, c);
        let (d, _) = max_diff(&got, &want[&c.key].1);
        let mean = got.iter().zip(&want[&c.key].1).map(|(a, b)| (a - b).abs()).sum::<f32>() / got.len() as f32;
        println!("builtin {} {:?} (seed {}, {} steps, cfg {}, batch {}): max |diff| {:.4}/255, mean {:.5}/255", c.key, c.prompt, c.seed, c.steps, c.guidance, c.batch, d * 255.0, mean * 255.0);
        assert!(d <= 2.0 / 255.0, "{}: {:.2}/255", c.key, d * 255.0);
    }
    if model_gpu().supports(DType::F16) {
        let half = load(DType::F16);
        let got = run(&half, &cases[0]);
        let (d, _) = max_diff(&got, &want[&cases[0].key].1);
        let mean = got.iter().zip(&want[&cases[0].key].1).map(|(a, b)| (a - b).abs()).sum::<f32>() / got.len() as f32;
        println!("builtin {} in f16: max |diff| {:.3}/255, mean {:.4}/255", cases[0].key, d * 255.0, mean * 255.0);
        // f16 rounding, amplified by guidance over the steps, moves a few pixels of a trained
        // model by several levels (measured 4.1/255 natively and 7/255 in Firefox on the 3,500-step
        // weights, 2.5 and 2 on the 7,500-step ones) while the image as a whole stays put (0.1/255).
        assert!(d <= 8.0 / 255.0 && mean <= 0.5 / 255.0, "f16: {:.2}/255 (mean {:.3}/255)", d * 255.0, mean * 255.0);
    }
}

/// The same prompts on the CPU backend (what browsers without a usable GPU run).
#[test]
fn builtin_model_matches_diffusers_on_the_cpu_backend() {
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(common::fixtures().join("ref/builtin_cases.json")).expect("builtin_cases.json")).expect("parses");
    let want = reference("builtin.safetensors");
    let cpu = pollster::block_on(ldm_web::gpu::Gpu::new(ldm_web::gpu::GpuOptions { cpu: true, ..Default::default() })).expect("the CPU backend");
    let opts = LoadOptions { dtype: Some(DType::F32), ..Default::default() };
    let model = pollster::block_on(StableDiffusionModel::load(&cpu, &DirSource::new(model_dir()), "emoji", &opts)).expect("the built-in model loads");
    for c in &cases {
        let p = Txt2ImgParams {
            prompt: c.prompt.clone(), negative_prompt: c.negative_prompt.clone(), seed: c.seed, steps: c.steps, guidance_scale: c.guidance,
            width: 64, height: 64, batch: c.batch, scheduler: c.scheduler.as_deref().map(|s| s.parse::<SchedulerKind>().expect("scheduler")), ..Default::default()
        };
        let got = pollster::block_on(model.txt2img(&cpu, &p, &|| 0.0, &mut |_| Ok(()))).unwrap_or_else(|e| panic!("{}: {e}", c.key)).0.data;
        let (d, _) = max_diff(&got, &want[&c.key].1);
        println!("builtin on the CPU backend {} {:?}: max |diff| {:.4}/255", c.key, c.prompt, d * 255.0);
        assert!(d <= 2.0 / 255.0, "{}: {:.2}/255", c.key, d * 255.0);
    }
}

#[test]
fn builtin_tokenizer_matches_transformers() {
    #[derive(serde::Deserialize)]
    struct T {
        prompt: String,
        ids: Vec<u32>,
    }
    let cases: Vec<T> = serde_json::from_slice(&std::fs::read(common::fixtures().join("ref/builtin_tokens.json")).expect("builtin_tokens.json")).expect("parses");
    let tok = pollster::block_on(ldm_web::pipelines::loading::load_tokenizer(&DirSource::new(model_dir()), "tokenizer")).expect("tokenizer");
    for c in &cases {
        assert_eq!(tok.encode(&c.prompt), c.ids, "ids of {:?}", c.prompt);
    }
    println!("built-in tokenizer: {} prompts, ids identical to transformers'", cases.len());
}

#[test]
fn builtin_model_ships_complete_and_small() {
    let dir = model_dir();
    let mut total = 0u64;
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("model folder") {
            let p = e.expect("entry").path();
            if p.is_dir() { stack.push(p) } else { total += std::fs::metadata(&p).expect("meta").len() }
        }
    }
    println!("built-in model: {total} bytes");
    assert!(total <= 25_000_000, "the built-in model is {total} bytes; the budget is 25 MB");
    let hints: ldm_web::pipelines::ModelHints = serde_json::from_slice(&std::fs::read(dir.join("ldm-web.json")).expect("ldm-web.json")).expect("parses");
    assert!(hints.steps.is_some() && hints.guidance.is_some() && hints.example_prompts.len() >= 8, "{hints:?}");
    let card = std::fs::read_to_string(dir.join("README.md")).expect("model card");
    for needed in ["Apache", "CC BY 4.0", "PSNR", "accuracy", "train_unet.py", "train_autoencoder.py"] {
        assert!(card.contains(needed), "the model card does not mention {needed}");
    }
    for l in ["Apache-2.0.txt", "CC-BY-4.0.txt"] {
        assert!(dir.parent().expect("assets/builtin").join("LICENSES").join(l).is_file(), "missing licence text {l}");
    }
}
