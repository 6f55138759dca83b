//! The latent diffusion paper's own model family against diffusers: `VQModel` (codebook choices
//! exactly, decoded images within 1e-4 relative), from the fixtures of `scripts/ldm_fixtures.py`.

mod common;

use common::{assert_close, fixtures, gpu, reference};
use ldm_web::gpu::DType;
use ldm_web::loader::{component_files, read_json, DirSource, Weights};
use ldm_web::models::{VQModel, VQModelConfig};

#[test]
fn vq_model_matches_diffusers() {
    let gpu = gpu();
    let r = reference("vqmodel.safetensors");
    let src = DirSource::new(fixtures().join("ldm"));
    let vq = pollster::block_on(async {
        let config: VQModelConfig = read_json(&src, "vqvae/config.json").await?.expect("config");
        let w = Weights::new(&src, component_files(&src, "vqvae", "diffusion_pytorch_model", false).await?);
        VQModel::load(&w.at(&gpu, DType::F32, ""), config).await
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
