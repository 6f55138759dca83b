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

/// VAE decode and encode (mean, log-variance): 1e-4 relative.
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
        assert_close(&format!("{model} vae encode mean"), &pollster::block_on(gpu.read(&dist.mean)).expect("read"), &r["mean"].1, 1e-4);
        assert_close(&format!("{model} vae encode logvar"), &dist.logvar, &r["logvar"].1, 1e-4);
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
                let out = te.forward(&gpu, &[ids.clone()], skip).expect("forward");
                assert_close(&format!("{model} text encoder {key}"), &pollster::block_on(gpu.read(&out)).expect("read"), &r[&key].1, 1e-4);
                checked += 1;
            }
        }
        assert!(checked >= 2, "no text encoder references for {model}");
    }
}
