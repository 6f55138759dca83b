//! Models, one file per diffusers / transformers module, built from their config.json.

pub mod autoencoder_kl;
pub mod autoencoder_tiny;
pub mod bit;
pub mod calibration;
pub mod clip_text;
pub mod controlnet;
pub mod depth_anything;
pub mod dinov2;
pub mod dpt;
pub mod ldm_bert;
pub mod nn;
pub mod resnet;
pub mod spatial_attention;
pub mod transformer_2d;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
mod vae;
pub mod vit;
pub mod vq_model;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
pub use autoencoder_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
pub use clip_text::{ClipTextConfig, ClipTextModel};
pub use controlnet::{ControlNetConfig, ControlNetModel};
pub use depth_anything::{DepthAnythingConfig, DepthAnythingForDepthEstimation};
pub use dpt::{DPTConfig, DPTForDepthEstimation};
pub use ldm_bert::{LdmBertConfig, LdmBertModel};
pub use unet_2d::{UNet2DConfig, UNet2DModel};
pub use unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
pub use vq_model::{VQModel, VQModelConfig};
