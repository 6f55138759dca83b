//! Stable Diffusion parts and whole pipelines against diffusers' outputs (tests/fixtures/ref,
//! made by scripts/fixtures.sh). Tolerances are stated per test; all compute runs in f32.

mod common;

use common::{assert_close, fixtures, gpu, reference};
use ldm_web::gpu::DType;
use ldm_web::loader::{DirSource, Weights};
use ldm_web::models::{AutoencoderKL, ClipTextModel, UNet2DConditionModel};
use ldm_web::loader::component_files;

fn config<T: serde::de::DeserializeOwned>(model: &str, path: &str) -> T {
    let p = fixtures().join(model).join(path);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("config parses")
}

/// One UNet forward on random latents / embeddings, for both model styles: 1e-4 relative.
#[test]
fn unet_matches_diffusers() {
    let gpu = gpu();
    for (model, prefer_fp16, key) in [("sd1", false, "out"), ("sd2", false, "out"), ("sd2", true, "out_fp16_variant")] {
        let r = reference(&format!("unet_{model}.safetensors"));
        let Some(want) = r.get(key) else { continue };
        let src = DirSource::new(fixtures().join(model));
        let unet = pollster::block_on(async {
            let files = component_files(&src, "unet", "diffusion_pytorch_model", prefer_fp16).await?;
            let w = Weights::new(&src, files);
            UNet2DConditionModel::load(&w.at(&gpu, DType::F32, ""), config(model, "unet/config.json")).await
        })
        .expect("unet loads");
        let (ss, s) = &r["sample"];
        let (cs, c) = &r["encoder_hidden_states"];
        let t = r["timestep"].1[0];
        let x = gpu.upload(ss, DType::F32, s).expect("upload");
        let ctx = gpu.upload(cs, DType::F32, c).expect("upload");
        let out = unet.forward(&gpu, &x, t, &ctx).expect("forward");
        let got = pollster::block_on(gpu.read(&out)).expect("read");
        assert_close(&format!("{model} unet ({key})"), &got, &want.1, 1e-4);
    }
}

/// VAE decode and encode (mean, log-variance, a seeded sample): 1e-4 relative.
#[test]
fn vae_matches_diffusers() {
    let gpu = gpu();
    for model in ["sd1", "sd2"] {
        let r = reference(&format!("vae_{model}.safetensors"));
        let src = DirSource::new(fixtures().join(model));
        let vae = pollster::block_on(async {
            let w = Weights::new(&src, component_files(&src, "vae", "diffusion_pytorch_model", false).await?);
            AutoencoderKL::load(&w.at(&gpu, DType::F32, ""), config(model, "vae/config.json"), true).await
        })
        .expect("vae loads");
        let (zs, z) = &r["latents"];
        let out = vae.decode(&gpu, &gpu.upload(zs, DType::F32, z).expect("upload")).expect("decode");
        assert_close(&format!("{model} vae decode"), &pollster::block_on(gpu.read(&out)).expect("read"), &r["decoded"].1, 1e-4);
        let (is, i) = &r["image"];
        let dist = pollster::block_on(vae.encode(&gpu, &gpu.upload(is, DType::F32, i).expect("upload"))).expect("encode");
        assert_close(&format!("{model} vae encode mean"), dist.mode(), &r["mean"].1, 1e-4);
        assert_close(&format!("{model} vae encode logvar"), &dist.logvar, &r["logvar"].1, 1e-4);
        let sampled = dist.sample(&mut ldm_web::rng::TorchGenerator::new(7));
        assert_close(&format!("{model} vae encode sampled (seed 7)"), &sampled, &r["sampled"].1, 1e-4);
    }
}

/// Text embeddings (last layer, clip skip 1 and 2 as diffusers counts it): 1e-4 relative.
#[test]
fn text_encoder_matches_diffusers() {
    let gpu = gpu();
    for model in ["sd1", "sd2"] {
        let r = reference(&format!("text_encoder_{model}.safetensors"));
        let src = DirSource::new(fixtures().join(model));
        let te = pollster::block_on(async {
            let w = Weights::new(&src, component_files(&src, "text_encoder", "model", false).await?);
            ClipTextModel::load(&w.at(&gpu, DType::F32, ""), config(model, "text_encoder/config.json")).await
        })
        .expect("text encoder loads");
        let mut checked = 0;
        for i in 0..8 {
            let Some((_, ids)) = r.get(&format!("ids_{i}")) else { continue };
            let ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
            for (key, skip) in [(format!("hidden_{i}"), 0), (format!("skip1_{i}"), 1), (format!("skip2_{i}"), 2)] {
                let out = te.forward(&gpu, std::slice::from_ref(&ids), skip).expect("forward");
                assert_close(&format!("{model} text encoder {key}"), &pollster::block_on(gpu.read(&out)).expect("read"), &r[&key].1, 1e-4);
                checked += 1;
            }
        }
        assert!(checked >= 2, "no text encoder references for {model}");
    }
}

/// Tiled decoding (diffusers' `enable_tiling`): sd1's VAE has 32-pixel tiles, so 10x14 latents
/// make a 4x5 grid of blended tiles, edge tiles smaller; batch 2. 1e-4 relative, as decode.
#[test]
fn vae_tiled_decode_matches_diffusers() {
    let gpu = gpu();
    let r = reference("vae_tiled.safetensors");
    let src = DirSource::new(fixtures().join("sd1"));
    let vae = pollster::block_on(async {
        let w = Weights::new(&src, component_files(&src, "vae", "diffusion_pytorch_model", false).await?);
        AutoencoderKL::load(&w.at(&gpu, DType::F32, ""), config("sd1", "vae/config.json"), false).await
    })
    .expect("vae loads");
    let (zs, z) = &r["latents"];
    let shape: [usize; 4] = zs.as_slice().try_into().expect("4-d latents");
    let tiled = pollster::block_on(vae.decode_tiled(&gpu, z, shape, DType::F32, vae.config.sample_size)).expect("tiled decode");
    assert_close("sd1 vae tiled decode", &tiled, &r["tiled"].1, 1e-4);
}

/// Single-file checkpoints: architecture inferred from shapes matches the diffusers folder (all
/// but head counts, which no checkpoint stores), and the renamed weights (OpenCLIP's fused q/k/v
/// split by rows for SD2) reproduce the folder model's outputs: 1e-4 relative.
#[test]
fn single_file_checkpoints_match_folders() {
    use ldm_web::loader::WeightFile;
    use ldm_web::pipelines::single_file;
    let gpu = gpu();
    let src = DirSource::new(fixtures());
    for model in ["sd1", "sd2"] {
        let file = format!("{model}.safetensors");
        let wf = pollster::block_on(WeightFile::open(&src, &file)).expect("header");
        let layout = single_file::detect(&wf.header).expect("detected");
        let inferred = single_file::infer_configs(&wf.header, &layout).expect("inferred");
        let unet_cfg: ldm_web::models::UNet2DConditionConfig = config(model, "unet/config.json");
        let te_cfg: ldm_web::models::ClipTextConfig = config(model, "text_encoder/config.json");
        let vae_cfg: ldm_web::models::AutoencoderKLConfig = config(model, "vae/config.json");
        let u = &inferred.unet;
        assert_eq!((&u.block_out_channels, &u.layers_per_block, &u.down_block_types, &u.up_block_types), (&unet_cfg.block_out_channels, &unet_cfg.layers_per_block, &unet_cfg.down_block_types, &unet_cfg.up_block_types), "{model} unet");
        assert_eq!((&u.cross_attention_dim, u.use_linear_projection, u.in_channels, u.out_channels), (&unet_cfg.cross_attention_dim, unet_cfg.use_linear_projection, unet_cfg.in_channels, unet_cfg.out_channels), "{model} unet");
        let v = &inferred.vae;
        assert_eq!((&v.block_out_channels, v.layers_per_block, v.latent_channels), (&vae_cfg.block_out_channels, vae_cfg.layers_per_block, vae_cfg.latent_channels), "{model} vae");
        let t = &inferred.text_encoder;
        assert_eq!((t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, &t.hidden_act), (te_cfg.vocab_size, te_cfg.hidden_size, te_cfg.intermediate_size, te_cfg.num_hidden_layers, &te_cfg.hidden_act), "{model} text encoder");

        let r = reference(&format!("unet_{model}.safetensors"));
        let unet = pollster::block_on(async {
            let w = single_file::unet_weights(&src, vec![wf.clone()], &unet_cfg)?;
            UNet2DConditionModel::load(&w.at(&gpu, DType::F32, ""), unet_cfg.clone()).await
        })
        .expect("single-file unet loads");
        let x = gpu.upload(&r["sample"].0, DType::F32, &r["sample"].1).expect("upload");
        let ctx = gpu.upload(&r["encoder_hidden_states"].0, DType::F32, &r["encoder_hidden_states"].1).expect("upload");
        let out = unet.forward(&gpu, &x, r["timestep"].1[0], &ctx).expect("forward");
        assert_close(&format!("{model}.safetensors unet"), &pollster::block_on(gpu.read(&out)).expect("read"), &r["out"].1, 1e-4);

        let r = reference(&format!("text_encoder_{model}.safetensors"));
        let te = pollster::block_on(async {
            let w = single_file::text_encoder_weights(&src, vec![wf.clone()], &layout, &te_cfg)?;
            ClipTextModel::load(&w.at(&gpu, DType::F32, ""), te_cfg.clone()).await
        })
        .expect("single-file text encoder loads");
        let ids: Vec<u32> = r["ids_1"].1.iter().map(|&v| v as u32).collect();
        let out = te.forward(&gpu, &[ids], 0).expect("forward");
        assert_close(&format!("{model}.safetensors text encoder"), &pollster::block_on(gpu.read(&out)).expect("read"), &r["hidden_1"].1, 1e-4);

        let r = reference(&format!("vae_{model}.safetensors"));
        let vae = pollster::block_on(async {
            let w = single_file::vae_weights(&src, vec![wf.clone()], &vae_cfg)?;
            AutoencoderKL::load(&w.at(&gpu, DType::F32, ""), vae_cfg.clone(), true).await
        })
        .expect("single-file vae loads");
        let out = vae.decode(&gpu, &gpu.upload(&r["latents"].0, DType::F32, &r["latents"].1).expect("upload")).expect("decode");
        assert_close(&format!("{model}.safetensors vae decode"), &pollster::block_on(gpu.read(&out)).expect("read"), &r["decoded"].1, 1e-4);
    }
}

/// The folder `ldm convert` writes for a single file without `--config` reads back as the
/// inferred configs and the built-in tokenizer: the loader then sees what loading the file saw.
#[test]
fn single_file_folder_files_read_back_as_inferred() {
    use std::io::Read;
    use ldm_web::loader::WeightFile;
    use ldm_web::pipelines::single_file;
    use ldm_web::tokenizer::{ClipTokenizer, TokenizerConfig};
    let gz = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/clip/bpe_simple_vocab_16e6.txt.gz")).expect("CLIP BPE file");
    let mut bpe = String::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut bpe).expect("gunzip");
    let src = DirSource::new(fixtures());
    for model in ["sd1", "sd2"] {
        let wf = pollster::block_on(WeightFile::open(&src, &format!("{model}.safetensors"))).expect("header");
        let layout = single_file::detect(&wf.header).expect("detected");
        let inferred = single_file::infer_configs(&wf.header, &layout).expect("inferred");
        let files = single_file::folder_files(&wf.header, &bpe).expect("folder files");
        let file = |p: &str| files.iter().find(|(f, _)| f == p).map(|(_, b)| b.as_slice()).unwrap_or_else(|| panic!("{model}: no {p}"));
        let json = |p: &str| -> serde_json::Value { serde_json::from_slice(file(p)).expect("json") };
        fn again<T: serde::de::DeserializeOwned + serde::Serialize>(v: serde_json::Value) -> serde_json::Value {
            serde_json::to_value(serde_json::from_value::<T>(v).expect("parses")).expect("value")
        }
        fn value<T: serde::Serialize>(v: &T) -> serde_json::Value {
            serde_json::to_value(v).expect("value")
        }
        assert_eq!(again::<ldm_web::models::UNet2DConditionConfig>(json("unet/config.json")), value(&inferred.unet), "{model} unet");
        assert_eq!(again::<ldm_web::models::AutoencoderKLConfig>(json("vae/config.json")), value(&inferred.vae), "{model} vae");
        assert_eq!(again::<ldm_web::models::ClipTextConfig>(json("text_encoder/config.json")), value(&inferred.text_encoder), "{model} text encoder");
        assert_eq!(json("scheduler/scheduler_config.json"), inferred.scheduler, "{model} scheduler");
        let index = json("model_index.json");
        assert_eq!((index["_class_name"].as_str(), index["unet"][1].as_str()), (Some("StableDiffusionPipeline"), Some("UNet2DConditionModel")), "{model} model_index.json");
        let text = |p: &str| std::str::from_utf8(file(p)).expect("utf-8");
        let config = TokenizerConfig::from_json(text("tokenizer/tokenizer_config.json")).expect("tokenizer config");
        let read = ClipTokenizer::from_files(text("tokenizer/vocab.json"), text("tokenizer/merges.txt"), config).expect("tokenizer");
        let built = single_file::builtin_tokenizer(&layout, &bpe).expect("built-in tokenizer");
        for prompt in ["a red apple!", "an astronaut riding a horse, <|endoftext|> 4k!!"] {
            assert_eq!(read.encode(prompt), built.encode(prompt), "{model}: {prompt:?}");
        }
    }
}

