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
    /// The f32 model to compare against when --model is already quantised (an `ldm convert` folder): its source.
    #[arg(long)]
    pub reference: Option<String>,
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
    if choice.unet.is_none() && choice.text_encoder.is_none() && choice.vae.is_none() && a.reference.is_none() {
        return Err(Error::Input("ldm bench quality compares a quantisation against f32: give --quant, --unet, --text-encoder or --vae, or --reference F32_MODEL for a converted --model".into()));
    }
    let open = |model: &str| -> Result<Box<dyn ldm_web::loader::FileSource>> {
        if model == crate::builtin::NAME {
            return Ok(Box::new(crate::builtin::source().ok_or_else(|| Error::Input("this ldm was built without the built-in model; pass --model DIR".into()))?));
        }
        Ok(crate::generate::open_model(model)?.0)
    };
    let recipe = match &a.reference {
        // A converted folder says how it was made.
        Some(_) => {
            let hints = std::fs::read(std::path::Path::new(&a.model).join("ldm-web.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            let stored = hints.as_ref().and_then(|h| h["quantisation"]["recipe"].as_str()).unwrap_or("as stored").to_string();
            if choice.unet.is_none() && choice.text_encoder.is_none() && choice.vae.is_none() { stored } else { format!("{stored};then {}", choice.recipe()) }
        }
        None => choice.recipe(),
    };
    let size = match (a.width, a.height) {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        _ => return Err(Error::Input("give both --width and --height, or neither".into())),
    };
    let case = QualityCase { prompts: a.prompts.clone(), seeds: a.seeds.clone(), steps: a.steps, guidance: a.guidance, size, timestep: a.timestep };
    pollster::block_on(async {
        let gpu = crate::open_device(GpuOptions { force_f32: true, ..Default::default() }).await?;
        let src = open(&a.model)?;
        let reference = a.reference.as_deref().map(open).transpose()?;
        let report = quality::run(&gpu, src.as_ref(), reference.as_deref(), &a.model, choice.component_quant(None), &recipe, &case).await?;
        serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))
    })
}
