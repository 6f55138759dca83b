//! `UNet2DConditionModel` on a [`Tape`], optionally with LoRA adapters: the text-to-image UNet of
//! [`crate::models::unet_2d_condition`], built from the same `config.json` with diffusers'
//! parameter names, recorded so that gradients can be taken (of the adapters alone when the base
//! weights are frozen, as LoRA fine-tuning does).
//!
//! eps = body(x_t, silu(time_embedding(t)), text): diffusers' `CrossAttnDownBlock2D` /
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`, each attention a
//! `Transformer2DModel` (self-attention, cross-attention to the text, GEGLU feed-forward).

use super::layers::{LoraConfig, Registry, TimestepMlp};
use super::unet_body::UNetBodyTrainable;
use super::ParamSpec;
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::models::unet_2d_condition::UNet2DConditionConfig;

/// `UNet2DConditionModel` recorded on a tape; parameters are indices into [`Self::params`].
pub struct UNet2DConditionTrainable {
    pub config: UNet2DConditionConfig,
    pub lora: Option<LoraConfig>,
    params: Vec<ParamSpec>,
    adapters: Vec<usize>,
    time_embedding: TimestepMlp,
    body: UNetBodyTrainable,
}

impl UNet2DConditionTrainable {
    /// The network `config` describes (Stable Diffusion 1.x / 2.x UNets; SDXL's added
    /// conditions, class embeddings and LCM's guidance embedding are not trained yet), with the
    /// adapters `lora` asks for.
    pub fn new(config: UNet2DConditionConfig, lora: Option<LoraConfig>) -> Result<Self> {
        config.validate()?;
        if config.addition_embed_type.is_some() || config.num_class_embeds.is_some() || config.time_cond_proj_dim.is_some() {
            return Err(Error::Unsupported(
                "training a UNet with added conditions (SDXL), a class embedding (the x4 upscaler) or a guidance embedding (LCM) is not supported yet; Stable Diffusion 1.x and 2.x UNets are".into(),
            ));
        }
        if let Some(l) = &lora {
            l.validate()?;
        }
        let mut r = Registry::new(lora.clone());
        let ch0 = config.block_out_channels[0];
        let time_embedding = r.timestep_mlp(ch0, config.temb_channels(), config.flip_sin_to_cos, config.freq_shift);
        let body = UNetBodyTrainable::build(&mut r, &config.body_config(), config.use_linear_projection)?;
        r.check_adapters()?;
        Ok(Self { config, lora, params: r.specs, adapters: r.adapters, time_embedding, body })
    }

    /// Whether block activations are recomputed in the backward pass.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.body.gradient_checkpointing = on;
    }

    /// Every parameter (base weights and adapters) in diffusers' / PEFT's names and shapes, in
    /// the order [`Self::forward`] takes them.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Indices of the LoRA factors in [`Self::params`] (`...lora_A.weight`, `...lora_B.weight`).
    pub fn adapters(&self) -> &[usize] {
        &self.adapters
    }

    /// The prediction for `sample` `[B, C, H, W]` with one timestep per item, attending to
    /// `context` `[B, L, cross_attention_dim]`.
    pub fn forward(&self, tape: &mut Tape, p: &[Var], sample: Var, timesteps: &[f32], context: Var) -> Result<Var> {
        if p.len() != self.params.len() {
            return Err(Error::Shape(format!("{} parameter variables for a UNet of {}", p.len(), self.params.len())));
        }
        let shape = tape.value(sample).shape().to_vec();
        let f = self.config.downsample_factor();
        match shape[..] {
            [b, c, h, w] if b == timesteps.len() && c == self.config.in_channels && h % f == 0 && w % f == 0 && h > 0 && w > 0 => {}
            _ => return Err(Error::Input(format!("UNet training input {shape:?} must be [B, {}, H, W] with H and W divisible by {f} and one timestep per item", self.config.in_channels))),
        }
        let cross = self.config.cross_attention_dim.get(0);
        match tape.value(context).shape() {
            &[b, _, d] if b == shape[0] && d == cross => {}
            other => return Err(Error::Input(format!("text embeddings {other:?} must be [{}, L, {cross}]", shape[0]))),
        }
        let temb = self.time_embedding.forward(tape, p, timesteps)?;
        self.body.forward(tape, p, sample, temb, Some(context))
    }
}
