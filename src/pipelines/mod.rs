//! Pipelines: models + schedulers + seeds, as diffusers' pipelines.

pub mod ldm;
pub mod canny;
pub mod conditions;
pub mod depth;
pub mod image_input;
pub mod loading;
pub mod output;
pub mod preview;
pub mod prompt;
pub mod single_file;
pub mod stable_diffusion;

pub use canny::{canny, canny_image, CannyParams};
pub use ldm::{ConcatCondition, LdmImage, LdmKind, LdmModel, LowResImage};
pub use loading::{load_tiny_vae, load_controlnet, load_controlnet_single_file, ComponentQuant, DiffusionModel, Family, LoadOptions, ModelHints, StableDiffusionModel, VaeSource};
pub use prompt::{PromptWeighting, TextEncoder, TextEncoders};
pub use conditions::{Control, DepthMap, ImageConditions, Task};
pub use stable_diffusion::{PreparedImages, UserImages, Images, Latents, StageTimes, StepProgress, Txt2ImgParams, XlConditions};
