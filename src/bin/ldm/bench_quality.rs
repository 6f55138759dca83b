//! `ldm bench quality`: a quantised model against the same model in f32 (JSON).

use clap::Args;
use ldm_web::bench::quality::{self, QualityCase};
use ldm_web::gpu::GpuOptions;
use ldm_web::{Error, Result};

/// Arguments of `ldm bench quality`.
#[derive(Args, Debug, Clone)]
pub struct BenchQualityArgs {
    /// The model (a diffusers folder, or `builtin`).
    #[arg(long, default_value = "builtin")]
    pub model: String,
    #[command(flatten)]
    pub quant: crate::convert::QuantArgs,
    /// Prompts of the comparison (repeat the flag).
    #[arg(long = "prompt", default_values_t = ["an astronaut riding a horse".to_string(), "a red apple on a table".to_string()])]
    pub prompts: Vec<String>,
    /// Seeds of the comparison (comma-separated).
    #[arg(long, default_value = "0,1,2", value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Denoising steps of each generation.
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    /// Guidance scale.
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// Image width and height (default: the model's).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    /// The timestep of the single-step noise-prediction comparison.
    #[arg(long, default_value_t = 500.0)]
    pub timestep: f32,
}

/// Runs `ldm bench quality`.
pub fn run(a: &BenchQualityArgs) -> Result<String> {
    let choice = a.quant.choice()?;
    if choice.unet.is_none() && choice.text_encoder.is_none() && choice.vae.is_none() {
        return Err(Error::Input("ldm bench quality compares a quantisation against f32: give --quant, --unet, --text-encoder or --vae".into()));
    }
    let recipe = choice.recipe();
    let size = match (a.width, a.height) {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        _ => return Err(Error::Input("give both --width and --height, or neither".into())),
    };
    let case = QualityCase { prompts: a.prompts.clone(), seeds: a.seeds.clone(), steps: a.steps, guidance: a.guidance, size, timestep: a.timestep };
    pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: true, ..Default::default() }).await?;
        let src: Box<dyn ldm_web::loader::FileSource> = if a.model == crate::builtin::NAME {
            Box::new(crate::builtin::source().ok_or_else(|| Error::Input("this ldm was built without the built-in model; pass --model DIR".into()))?)
        } else {
            crate::generate::open_model(&a.model)?.0
        };
        let report = quality::run(&gpu, src.as_ref(), &a.model, choice.component_quant(None), &recipe, &case).await?;
        serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))
    })
}
