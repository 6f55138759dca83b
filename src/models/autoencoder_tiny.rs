//! `AutoencoderTiny` (TAESD / TAESDXL, Bohan Ollin Boer's tiny distilled autoencoders): plain
//! conv + ReLU residual blocks, stride-2 convolutions down, nearest 2x up, a soft clamp
//! `3 tanh(z / 3)` on the latents. Cheap enough to decode a preview after every step.

use serde::{Deserialize, Serialize};

use super::nn::Conv2d;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::W;
use crate::ops::{self, elementwise, Activation, Conv2dSpec};

/// `config.json` of an `AutoencoderTiny` (diffusers' keys; unknown ones ignored).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub act_fn: String,
    pub upsample_fn: String,
    pub latent_channels: usize,
    pub upsampling_scaling_factor: usize,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub scaling_factor: f32,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self {
            in_channels: 3, out_channels: 3, encoder_block_out_channels: vec![64; 4], decoder_block_out_channels: vec![64; 4], act_fn: "relu".into(),
            upsample_fn: "nearest".into(), latent_channels: 4, upsampling_scaling_factor: 2, num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1], scaling_factor: 1.0,
        }
    }
}

impl AutoencoderTinyConfig {
    /// Refuses what this implementation does not run.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Model(format!("AutoencoderTiny config: {why}")));
        if self.act_fn != "relu" || self.upsample_fn != "nearest" || self.upsampling_scaling_factor != 2 {
            return bad(format!("act_fn {:?}, upsample_fn {:?}, upsampling_scaling_factor {} (relu, nearest, 2 are supported)", self.act_fn, self.upsample_fn, self.upsampling_scaling_factor));
        }
        let (e, d) = (&self.encoder_block_out_channels, &self.decoder_block_out_channels);
        if e.is_empty() || e.len() != self.num_encoder_blocks.len() || d.is_empty() || d.len() != self.num_decoder_blocks.len() {
            return bad("block channel and block count lists must be non-empty and of equal length".into());
        }
        // diffusers' encoder applies each level's stride-2 conv to the level's own width.
        if e.windows(2).any(|w| w[0] != w[1]) {
            return bad(format!("encoder_block_out_channels {e:?} must all be equal"));
        }
        Ok(())
    }
    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        1 << (self.decoder_block_out_channels.len() - 1)
    }
}

/// `AutoencoderTinyBlock`: `relu(conv(relu(conv(relu(conv(x))))) + skip(x))`.
struct TinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
}

impl TinyBlock {
    async fn load(w: &W<'_, '_>, cin: usize, cout: usize) -> Result<Self> {
        let c = w.sub("conv");
        let relu = Conv2dSpec { act: Activation::Relu, ..Conv2dSpec::new(1, 1) };
        let mut c0 = Conv2d::load(&c.sub("0"), cin, cout, 3, 1, 1).await?;
        c0.spec = relu;
        let mut c2 = Conv2d::load(&c.sub("2"), cout, cout, 3, 1, 1).await?;
        c2.spec = relu;
        let c4 = Conv2d::load(&c.sub("4"), cout, cout, 3, 1, 1).await?;
        let skip = if cin != cout { Some(Conv2d::load(&w.sub("skip"), cin, cout, 1, 1, 0).await?) } else { None };
        Ok(Self { convs: [c0, c2, c4], skip })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let skip = match &self.skip {
            Some(s) => s.forward(gpu, x, None)?,
            None => x.clone(),
        };
        let h = self.convs[0].forward(gpu, x, None)?;
        let h = self.convs[1].forward(gpu, &h, None)?;
        ops::activation(gpu, &self.convs[2].forward(gpu, &h, Some(&skip))?, Activation::Relu)
    }
}

enum Layer {
    Conv(Conv2d),
    Block(TinyBlock),
    Upsample,
}

fn run(gpu: &Gpu, layers: &[Layer], mut x: Tensor) -> Result<Tensor> {
    for l in layers {
        x = match l {
            Layer::Conv(c) => c.forward(gpu, &x, None)?,
            Layer::Block(b) => b.forward(gpu, &x)?,
            Layer::Upsample => ops::upsample_nearest2x(gpu, &x)?,
        };
    }
    Ok(x)
}

/// `AutoencoderTiny`: `decode` gives images in [-1, 1] from (unscaled) latents, `encode`
/// latents from images in [-1, 1], as diffusers' `AutoencoderTiny.decode(z).sample` and
/// `encode(x).latents`.
pub struct AutoencoderTiny {
    pub config: AutoencoderTinyConfig,
    encoder: Option<Vec<Layer>>,
    decoder: Vec<Layer>,
}

impl AutoencoderTiny {
    /// Loads the decoder (and the encoder when `encoder`) under `w` (`encoder.layers.N`,
    /// `decoder.layers.N`, numbered as diffusers' `nn.Sequential`).
    pub async fn load(w: &W<'_, '_>, config: AutoencoderTinyConfig, encoder: bool) -> Result<Self> {
        config.validate()?;
        let enc = if encoder {
            let e = w.sub("encoder.layers");
            let ch = &config.encoder_block_out_channels;
            let mut layers = Vec::new();
            let mut idx = 0;
            for (i, &n) in config.num_encoder_blocks.iter().enumerate() {
                let c = ch[i];
                layers.push(Layer::Conv(if i == 0 { Conv2d::load(&e.sub(idx), config.in_channels, c, 3, 1, 1).await? } else { Conv2d::load(&e.sub(idx), c, c, 3, 2, 1).await? }));
                idx += 1;
                for _ in 0..n {
                    layers.push(Layer::Block(TinyBlock::load(&e.sub(idx), c, c).await?));
                    idx += 1;
                }
            }
            layers.push(Layer::Conv(Conv2d::load(&e.sub(idx), ch[ch.len() - 1], config.latent_channels, 3, 1, 1).await?));
            Some(layers)
        } else {
            None
        };
        let d = w.sub("decoder.layers");
        let ch = &config.decoder_block_out_channels;
        let mut conv_in = Conv2d::load(&d.sub(0), config.latent_channels, ch[0], 3, 1, 1).await?;
        conv_in.spec.act = Activation::Relu;
        let mut decoder = vec![Layer::Conv(conv_in)];
        // Index 1 is the ReLU, fused into conv_in.
        let mut idx = 2;
        let levels = config.num_decoder_blocks.len();
        for (i, &n) in config.num_decoder_blocks.iter().enumerate() {
            let c = ch[i];
            let last = i + 1 == levels;
            for _ in 0..n {
                decoder.push(Layer::Block(TinyBlock::load(&d.sub(idx), c, c).await?));
                idx += 1;
            }
            if !last {
                decoder.push(Layer::Upsample);
                idx += 1;
            }
            let out = if last { config.out_channels } else { c };
            decoder.push(Layer::Conv(Conv2d::load(&d.sub(idx), c, out, 3, 1, 1).await?));
            idx += 1;
        }
        Ok(Self { config, encoder: enc, decoder })
    }

    /// Images `[B, 3, H, W]` in [-1, 1] from latents `[B, C, h, w]`.
    pub fn decode(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        // DecoderTiny: 3 tanh(z / 3), the layers, then [0, 1] to [-1, 1].
        let t = elementwise::activation_affine(gpu, z, Activation::Tanh, 1.0 / 3.0, 0.0)?;
        let x = run(gpu, &self.decoder, ops::scale(gpu, &t, 3.0, 0.0)?)?;
        ops::scale(gpu, &x, 2.0, -1.0)
    }

    /// Latents `[B, C, h, w]` of images `[B, 3, H, W]` in [-1, 1].
    pub fn encode(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let enc = self.encoder.as_ref().ok_or_else(|| Error::Model("the tiny autoencoder was loaded without its encoder".into()))?;
        // EncoderTiny: [-1, 1] to [0, 1] first.
        run(gpu, enc, ops::scale(gpu, x, 0.5, 0.5)?)
    }
}
