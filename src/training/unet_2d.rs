//! `UNet2DModel` on a [`Tape`]: the same network as [`crate::models::unet_2d`], built from the same
//! `config.json` and with diffusers' parameter names, recorded so that its gradients can be taken.
//!
//! eps = body(x, silu(linear_2(silu(linear_1(sinusoid(t)))))) per batch item, the body being
//! diffusers' `DownBlock2D` / `AttnDownBlock2D`, `UNetMidBlock2D` and `UpBlock2D` /
//! `AttnUpBlock2D` ([`super::unet_body`]); attention is the materialised softmax(q kᵀ / √d) v,
//! whose gradient is the tape's.

use super::layers::{Registry, TimestepMlp};
use super::unet_body::UNetBodyTrainable;
use super::ParamSpec;
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::models::unet_2d::UNet2DConfig;

/// `UNet2DModel` recorded on a tape; parameters are indices into [`Self::params`].
pub struct UNet2DTrainable {
    pub config: UNet2DConfig,
    params: Vec<ParamSpec>,
    time_embedding: TimestepMlp,
    body: UNetBodyTrainable,
}

impl UNet2DTrainable {
    /// The network `config` describes (what [`crate::models::unet_2d::UNet2DModel`] runs, less
    /// class embeddings and the scale-shift time norm, which training does not support yet).
    pub fn new(config: UNet2DConfig) -> Result<Self> {
        config.validate()?;
        let unsupported = |what: &str| Err(Error::Unsupported(format!("training a UNet2DModel with {what} is not supported; use a config without it")));
        if config.class_embedding()?.is_some() {
            return unsupported("a class embedding");
        }
        if config.center_input_sample {
            return unsupported("center_input_sample");
        }
        let mut r = Registry::new(None);
        let ch0 = config.block_out_channels[0];
        let time_embedding = r.timestep_mlp(ch0, config.time_embed_dim(), config.flip_sin_to_cos, config.freq_shift);
        let body = UNetBodyTrainable::build(&mut r, &config.body_config()?, false)?;
        Ok(Self { config, params: r.specs, time_embedding, body })
    }

    /// Whether block activations are recomputed in the backward pass (less memory, one more
    /// forward pass).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.body.gradient_checkpointing = on;
    }

    /// The parameters in diffusers' names and shapes, in the order [`Self::forward`] takes them.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// The prediction for `sample` `[B, C, H, W]` with one timestep per batch item; `p` holds the
    /// tape's variables of [`Self::params`], in order.
    pub fn forward(&self, tape: &mut Tape, p: &[Var], sample: Var, timesteps: &[f32]) -> Result<Var> {
        if p.len() != self.params.len() {
            return Err(Error::Shape(format!("{} parameter variables for a UNet of {}", p.len(), self.params.len())));
        }
        let shape = tape.value(sample).shape().to_vec();
        let f = self.config.downsample_factor();
        match shape[..] {
            [b, c, h, w] if b == timesteps.len() && c == self.config.in_channels && h % f == 0 && w % f == 0 && h > 0 && w > 0 => {}
            _ => return Err(Error::Input(format!("UNet2DModel training input {shape:?} must be [B, {}, H, W] with H and W divisible by {f} and one timestep per item", self.config.in_channels))),
        }
        let temb = self.time_embedding.forward(tape, p, timesteps)?;
        self.body.forward(tape, p, sample, temb, None)
    }
}
