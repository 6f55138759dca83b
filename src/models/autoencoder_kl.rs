//! `AutoencoderKL`: the VAE that maps images to Stable Diffusion's latents and back.

use serde::Deserialize;

use super::nn::{multi_head_attention, Conv2d, GroupNorm, Linear};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;

/// `vae/config.json`; unknown keys ignored, missing ones take diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f32,
    pub shift_factor: Option<f32>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3, out_channels: 3, down_block_types: vec!["DownEncoderBlock2D".into()], up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64], layers_per_block: 1, act_fn: "silu".into(), latent_channels: 4, norm_num_groups: 32,
            sample_size: 32, scaling_factor: 0.18215, shift_factor: None, use_quant_conv: true, use_post_quant_conv: true, mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Refuses configs the decoder cannot run.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Model(format!("vae config has {n} block_out_channels, {} down and {} up block types; they must match", self.down_block_types.len(), self.up_block_types.len())));
        }
        if self.down_block_types.iter().any(|t| t != "DownEncoderBlock2D") || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") || self.act_fn != "silu" {
            return Err(Error::Model("vae config: only DownEncoderBlock2D / UpDecoderBlock2D with silu are supported".into()));
        }
        if self.norm_num_groups == 0 || self.block_out_channels.iter().any(|c| c % self.norm_num_groups != 0) || self.layers_per_block == 0 {
            return Err(Error::Model(format!("vae config: channels {:?} do not divide into {} groups", self.block_out_channels, self.norm_num_groups)));
        }
        Ok(())
    }
    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The single-head self-attention in the VAE's mid block, on a `[B, C, H, W]` map.
struct VaeAttention {
    group_norm: GroupNorm,
    qkv: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    async fn load(w: &W<'_, '_>, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(&w.sub("group_norm"), groups, channels, 1e-6).await?,
            qkv: Linear::load_fused(&[w.sub("to_q"), w.sub("to_k"), w.sub("to_v")], channels, channels, true).await?,
            to_out: Linear::load(&w.sub("to_out.0"), channels, channels, true).await?,
            channels,
        })
    }
    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else { return Err(Error::Shape(format!("vae attention input {:?}", x.shape()))) };
        let n = self.group_norm.forward(gpu, x, false)?.reshape(&[b, c, h * w])?;
        let qkv = self.qkv.forward_channels_first(gpu, &n)?;
        let d = self.channels;
        let a = multi_head_attention(gpu, (&qkv, 0, 3 * d), (&qkv, d, 3 * d), (&qkv, 2 * d, 3 * d), b, h * w, h * w, 1, d, false)?;
        let residual = x.reshape(&[b, c, h * w])?;
        self.to_out.forward_to_channels_first(gpu, &a, Some(&residual))?.reshape(&[b, c, h, w])
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
struct VaeMidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl VaeMidBlock {
    async fn load(w: &W<'_, '_>, c: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock2D::load(&w.sub("resnets.0"), c, c, None, groups, 1e-6).await?,
            attention: if attention { Some(VaeAttention::load(&w.sub("attentions.0"), c, groups).await?) } else { None },
            resnet1: ResnetBlock2D::load(&w.sub("resnets.1"), c, c, None, groups, 1e-6).await?,
        })
    }
    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(gpu, x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(gpu, &h)?;
        }
        self.resnet1.forward(gpu, &h, None)
    }
}

struct CoderBlock {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

impl CoderBlock {
    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(gpu, &h, None)?;
        }
        if let Some(d) = &self.down {
            h = d.forward(gpu, &h)?;
        }
        if let Some(u) = &self.up {
            h = u.forward(gpu, &h)?;
        }
        Ok(h)
    }
}

struct Coder {
    conv_in: Conv2d,
    blocks: Vec<CoderBlock>,
    mid: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Coder {
    fn forward(&self, gpu: &Gpu, x: &Tensor, mid_first: bool) -> Result<Tensor> {
        let mut h = self.conv_in.forward(gpu, x, None)?;
        if mid_first {
            h = self.mid.forward(gpu, &h)?;
        }
        for b in &self.blocks {
            h = b.forward(gpu, &h)?;
        }
        if !mid_first {
            h = self.mid.forward(gpu, &h)?;
        }
        let h = self.conv_norm_out.forward(gpu, &h, true)?;
        self.conv_out.forward(gpu, &h, None)
    }
}

/// The encoder's diagonal Gaussian over latents (diffusers' `DiagonalGaussianDistribution`).
pub struct LatentDist {
    /// `[B, latent_channels, h, w]`
    pub shape: Vec<usize>,
    pub mean: Vec<f32>,
    /// Log-variance clamped to [-30, 20], as diffusers.
    pub logvar: Vec<f32>,
}

impl LatentDist {
    /// The distribution's mode (its mean): `latent_dist.mode()`.
    pub fn mode(&self) -> &[f32] {
        &self.mean
    }
    /// `latent_dist.sample(generator)`: mean + exp(logvar / 2) * randn, drawn as diffusers does.
    pub fn sample(&self, gen: &mut crate::rng::TorchGenerator) -> Vec<f32> {
        let noise = gen.randn(self.mean.len());
        self.mean.iter().zip(&self.logvar).zip(noise).map(|((&m, &lv), n)| m + (0.5 * lv).exp() * n).collect()
    }
}

/// `AutoencoderKL`.
pub struct AutoencoderKL {
    pub config: AutoencoderKLConfig,
    encoder: Option<Coder>,
    quant_conv: Option<Conv2d>,
    decoder: Coder,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Loads the decoder, and the encoder when `with_encoder` (text-to-image needs no encoder).
    pub async fn load(w: &W<'_, '_>, config: AutoencoderKLConfig, with_encoder: bool) -> Result<Self> {
        config.validate()?;
        let ch = &config.block_out_channels;
        let (n, g, l, z) = (ch.len(), config.norm_num_groups, config.layers_per_block, config.latent_channels);
        let encoder = if with_encoder {
            let e = w.sub("encoder");
            let mut blocks = Vec::new();
            let mut cout = ch[0];
            for (i, &c) in ch.iter().enumerate() {
                let cin = cout;
                cout = c;
                let b = e.sub(format!("down_blocks.{i}"));
                let mut resnets = Vec::new();
                for j in 0..l {
                    resnets.push(ResnetBlock2D::load(&b.sub(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, None, g, 1e-6).await?);
                }
                let down = if i + 1 < n { Some(Downsample2D::load(&b.sub("downsamplers.0"), cout, true).await?) } else { None };
                blocks.push(CoderBlock { resnets, down, up: None });
            }
            Some(Coder {
                conv_in: Conv2d::load(&e.sub("conv_in"), config.in_channels, ch[0], 3, 1, 1).await?,
                blocks,
                mid: VaeMidBlock::load(&e.sub("mid_block"), ch[n - 1], g, config.mid_block_add_attention).await?,
                conv_norm_out: GroupNorm::load(&e.sub("conv_norm_out"), g, ch[n - 1], 1e-6).await?,
                conv_out: Conv2d::load(&e.sub("conv_out"), ch[n - 1], 2 * z, 3, 1, 1).await?,
            })
        } else {
            None
        };
        let quant_conv = if with_encoder && config.use_quant_conv { Some(Conv2d::load(&w.sub("quant_conv"), 2 * z, 2 * z, 1, 1, 0).await?) } else { None };
        let post_quant_conv = if config.use_post_quant_conv { Some(Conv2d::load(&w.sub("post_quant_conv"), z, z, 1, 1, 0).await?) } else { None };
        let d = w.sub("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut cout = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let cin = cout;
            cout = c;
            let b = d.sub(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..=l {
                resnets.push(ResnetBlock2D::load(&b.sub(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, None, g, 1e-6).await?);
            }
            let up = if i + 1 < n { Some(Upsample2D::load(&b.sub("upsamplers.0"), cout).await?) } else { None };
            blocks.push(CoderBlock { resnets, down: None, up });
        }
        let decoder = Coder {
            conv_in: Conv2d::load(&d.sub("conv_in"), z, rev[0], 3, 1, 1).await?,
            blocks,
            mid: VaeMidBlock::load(&d.sub("mid_block"), rev[0], g, config.mid_block_add_attention).await?,
            conv_norm_out: GroupNorm::load(&d.sub("conv_norm_out"), g, ch[0], 1e-6).await?,
            conv_out: Conv2d::load(&d.sub("conv_out"), ch[0], config.out_channels, 3, 1, 1).await?,
        };
        Ok(Self { config, encoder, quant_conv, decoder, post_quant_conv })
    }

    /// Decodes latents `z` (already divided by `scaling_factor`) into images in [-1, 1].
    pub fn decode(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(gpu, z, None)?,
            None => z.clone(),
        };
        self.decoder.forward(gpu, &z, true)
    }

    /// Encodes images in [-1, 1] `[B, 3, H, W]` into the latent distribution.
    pub async fn encode(&self, gpu: &Gpu, x: &Tensor) -> Result<LatentDist> {
        let enc = self.encoder.as_ref().ok_or_else(|| Error::Unsupported("this VAE was loaded without its encoder".into()))?;
        let f = self.config.scale_factor();
        if x.shape().len() != 4 || !x.dim(2).is_multiple_of(f) || !x.dim(3).is_multiple_of(f) {
            return Err(Error::Input(format!("image {:?} must be [B, 3, H, W] with sides divisible by {f}", x.shape())));
        }
        let h = enc.forward(gpu, x, false)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(gpu, &h, None)?,
            None => h,
        };
        let &[b, c2, hh, ww] = moments.shape() else { return Err(Error::Shape("vae moments".into())) };
        let z = c2 / 2;
        let all = gpu.read(&moments).await?;
        let plane = z * hh * ww;
        let (mut mean, mut logvar) = (Vec::with_capacity(b * plane), Vec::with_capacity(b * plane));
        for i in 0..b {
            mean.extend_from_slice(&all[i * 2 * plane..i * 2 * plane + plane]);
            logvar.extend(all[i * 2 * plane + plane..(i + 1) * 2 * plane].iter().map(|v| v.clamp(-30.0, 20.0)));
        }
        Ok(LatentDist { shape: vec![b, z, hh, ww], mean, logvar })
    }
}
