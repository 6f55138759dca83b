//! The schedulers against diffusers 0.42.1 reference trajectories
//! (`tests/fixtures/schedulers/`, made by `scripts/scheduler_fixtures.py`).
//!
//! Each case builds a scheduler from a model's `scheduler_config.json` exactly as the CLI does,
//! runs the denoising loop with the fixtures' fake model (`0.8 * scaled + noise_i`) and a
//! `TorchGenerator::new(3)` for the step noise, and compares every value diffusers produced.
//! Errors are measured as `|rust - diffusers| / (1 + |diffusers|)`, maximised over a case.
//!
//! The differences left come from torch's float32 `sqrt` / `log` / `exp` / `expm1` on the CPU
//! (MKL, up to 0.75 ulp, not correctly rounded): a `sigma` can differ in its last bit, and the
//! solvers amplify that. Tolerances: 2e-6 for timesteps, sigmas, alphas_cumprod and
//! init_noise_sigma; 1e-5 for trajectories (measured: <= 5e-6); 1e-4 for LMS (scipy.quad
//! coefficients, reproduced with QUADPACK's 21-point Gauss-Kronrod rule), Karras, cosine and
//! third-order runs (measured: <= 5e-5); 2e-3 for Euler / Euler ancestral with zero terminal
//! SNR, whose first step cancels a sample of size 4096 down to ~5 (measured: 1e-3).

use std::collections::HashMap;
use std::path::PathBuf;

use ldm_web::gpu::{Gpu, GpuOptions};
use ldm_web::rng::TorchGenerator;
use ldm_web::schedulers::{self, Latent, LatentMath, Scheduler, SchedulerHost, SchedulerKind};
use serde_json::Value;

const N: usize = 120;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

/// A minimal safetensors reader (float32 tensors only).
struct Tensors {
    map: HashMap<String, Vec<f32>>,
}

impl Tensors {
    fn load(path: &PathBuf) -> Tensors {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + hlen]).expect("safetensors header");
        let data = &bytes[8 + hlen..];
        let mut map = HashMap::new();
        for (name, info) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            assert_eq!(info["dtype"], "F32", "{name}");
            let off = info["data_offsets"].as_array().unwrap();
            let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
            let v = data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            map.insert(name.clone(), v);
        }
        Tensors { map }
    }

    fn get(&self, name: &str) -> Option<&[f32]> {
        self.map.get(name).map(|v| v.as_slice())
    }
}

fn load() -> (Value, Tensors) {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
    (serde_json::from_str(&text).unwrap(), Tensors::load(&dir.join("trajectories.safetensors")))
}

/// max |a - b| / (1 + |b|). Where diffusers produced NaN (UniPC bh1's last step with a zero
/// final sigma computes `-inf * 0`; we return the x0 prediction there) the value is skipped.
fn err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if y.is_nan() {
                return 0.0;
            }
            let d = (x as f64 - y as f64).abs() / (1.0 + (y as f64).abs());
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn build(case: &Value) -> Box<dyn Scheduler> {
    let kind = case["kind"].as_str().unwrap();
    let config = &case["config"];
    let mut s = if kind == "default" {
        schedulers::build_default(config).unwrap()
    } else {
        schedulers::build(kind.parse::<SchedulerKind>().unwrap(), config).unwrap()
    };
    let eta = case["eta"].as_f64().unwrap();
    if eta != 0.0 {
        s.set_eta(eta as f32);
    }
    s
}

fn tolerance(case: &Value) -> f64 {
    let name = case["name"].as_str().unwrap();
    let class = case["class"].as_str().unwrap();
    let sigma_based_ode = class.starts_with("Euler");
    if name.contains("zsnr") && sigma_based_ode {
        // zero terminal SNR: sigma_max = 4096 and the first step cancels x ~ 4096 down to ~5,
        // so the one-ulp differences of torch's sqrt in the sigmas show up at ~1e-4..1e-3.
        2e-3
    } else if class == "LMSDiscreteScheduler"
        || name.contains("karras")
        || name.contains("cosine")
        || name.contains("order3")
        || name.contains("dpm3")
    {
        // order 3/4 coefficients in f32 cancel (UniPC's h_phi_k, LMS's quadrature weights)
        1e-4
    } else {
        1e-5
    }
}

#[derive(Default)]
struct CaseResult {
    timesteps: f64,
    sigmas: f64,
    alphas: f64,
    init: f64,
    add_noise: f64,
    scaled: f64,
    traj: f64,
}

fn run_case(case: &Value, t: &Tensors, gpu: Option<&Gpu>) -> Result<CaseResult, String> {
    let name = case["name"].as_str().unwrap();
    let mut s = build(case);
    let steps = case["steps"].as_u64().unwrap() as usize;
    s.set_timesteps(steps).map_err(|e| format!("set_timesteps: {e}"))?;
    let mut r = CaseResult::default();

    let ts_ref = f32s(&case["timesteps"]);
    if s.timesteps().len() != ts_ref.len() {
        return Err(format!(
            "{} timesteps, diffusers has {}: {:?} vs {:?}",
            s.timesteps().len(),
            ts_ref.len(),
            s.timesteps(),
            ts_ref
        ));
    }
    r.timesteps = err(s.timesteps(), &ts_ref);
    let sig_ref = f32s(&case["sigmas"]);
    if !sig_ref.is_empty() {
        r.sigmas = err(s.sigmas(), &sig_ref);
    }
    let ac = t.get(case["alphas_cumprod"].as_str().unwrap()).unwrap();
    r.alphas = err(s.alphas_cumprod(), ac);
    let ins_ref = case["init_noise_sigma"].as_f64().unwrap() as f32;
    r.init = err(&[s.init_noise_sigma()], &[ins_ref]);
    if s.order() != case["order"].as_u64().unwrap() as usize {
        return Err(format!("order {} vs {}", s.order(), case["order"]));
    }

    let base_x = t.get("base_x").unwrap();
    let base_noise = t.get("base_noise").unwrap();
    // The same arithmetic on the host or as kernels on the device (read back to compare).
    let m = gpu.map_or(LatentMath::Host, LatentMath::Device);
    let put = |v: &[f32]| m.put(v.to_vec()).map_err(|e| e.to_string());
    let values = |l: &Latent| -> Result<Vec<f32>, String> {
        match (l, gpu) {
            (Latent::Host(v), _) => Ok(v.to_vec()),
            (Latent::Device(t), Some(g)) => pollster::block_on(g.read(t)).map_err(|e| e.to_string()),
            (Latent::Device(_), None) => Err("device latents without a device".into()),
        }
    };
    let fail = |what: &'static str| move |e: ldm_web::Error| format!("{what}: {e}");
    let (bx, bn) = (put(base_x)?, put(base_noise)?);
    if !ts_ref.is_empty() {
        let mid = case["add_noise_index"].as_u64().unwrap() as usize;
        r.add_noise = err(&values(&s.add_noise(m, &bx, &bn, mid).map_err(fail("add_noise"))?)?, t.get(&format!("{name}/add_noise")).unwrap());
    }

    let xs = t.get(&format!("{name}/x"));
    let scaled_ref = t.get(&format!("{name}/scaled"));
    let identity = case["scaled_identity"].as_bool().unwrap();
    // img2img cases start at timesteps[start] from add_noise, like diffusers' set_begin_index
    let start = case["start"].as_u64().unwrap() as usize;
    let ins = s.init_noise_sigma();
    let mut x = if start > 0 { s.add_noise(m, &bx, &bn, start).map_err(fail("add_noise"))? } else { put(&base_x.iter().map(|v| v * ins).collect::<Vec<f32>>())? };
    let mut gen = TorchGenerator::new(3);
    let c08 = 0.8f64 as f32;
    for i in start..ts_ref.len() {
        let k = i - start;
        let scaled = values(&s.scale_model_input(m, &x, i).map_err(fail("scale_model_input"))?)?;
        if identity {
            if scaled != values(&x)? {
                return Err(format!("step {i}: scale_model_input is not the identity"));
            }
        } else {
            let sr = &scaled_ref.unwrap()[k * N..(k + 1) * N];
            r.scaled = r.scaled.max(err(&scaled, sr));
        }
        let eps: Vec<f32> = (0..N).map(|j| c08 * scaled[j] + base_noise[(j + 17 * i) % N]).collect();
        x = s.step(m, &put(&eps)?, i, &x, &mut gen).map_err(|e| format!("step {i}: {e}"))?;
        let xv = values(&x)?;
        let xr = &xs.unwrap()[k * N..(k + 1) * N];
        if std::env::var("SCHED_DEBUG").is_ok_and(|v| v == name) {
            println!("{name} step {i} t={} err {:.2e}", ts_ref[i], err(&xv, xr));
        }
        r.traj = r.traj.max(err(&xv, xr));
    }
    Ok(r)
}

fn trajectories(gpu: Option<&Gpu>) {
    let (doc, t) = load();
    let cases = doc["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    let mut per_kind: Vec<(String, f64, f64)> = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tol = tolerance(case);
        match run_case(case, &t, gpu) {
            Err(e) => failures.push(format!("{name}: {e}")),
            Ok(r) => {
                println!(
                    "{name:40} traj {:.1e} scaled {:.1e} ts {:.1e} sig {:.1e} ac {:.1e} ins {:.1e} noise {:.1e}",
                    r.traj, r.scaled, r.timesteps, r.sigmas, r.alphas, r.init, r.add_noise
                );
                let sched_tol = 2e-6;
                let checks = [
                    ("trajectory", r.traj, tol),
                    ("scale_model_input", r.scaled, tol),
                    ("timesteps", r.timesteps, sched_tol),
                    ("sigmas", r.sigmas, sched_tol),
                    ("alphas_cumprod", r.alphas, sched_tol),
                    ("init_noise_sigma", r.init, sched_tol),
                    ("add_noise", r.add_noise, tol),
                ];
                for (what, e, tol) in checks {
                    if e.is_nan() || e > tol {
                        failures.push(format!("{name}: {what} error {e:.2e} > {tol:.0e}"));
                    }
                }
                let kind = case["class"].as_str().unwrap().to_string();
                match per_kind.iter_mut().find(|k| k.0 == kind) {
                    Some(k) => {
                        k.1 = k.1.max(r.traj);
                        k.2 = k.2.max(r.sigmas.max(r.timesteps));
                    }
                    None => per_kind.push((kind, r.traj, r.sigmas.max(r.timesteps))),
                }
            }
        }
    }
    println!("\nmax error per class (trajectory, schedule):");
    for (k, a, b) in &per_kind {
        println!("  {k:34} {a:.2e} {b:.2e}");
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn trajectories_match_diffusers() {
    trajectories(None);
}

/// The same cases with the latents on the device and every update a generated kernel (what the
/// pipelines run), on lavapipe here.
#[test]
fn trajectories_match_diffusers_on_the_device() {
    let gpu = pollster::block_on(Gpu::new(GpuOptions::default())).expect("a Vulkan adapter (lavapipe: apt-get install mesa-vulkan-drivers)");
    trajectories(Some(&gpu));
}

#[test]
fn generator_matches_torch() {
    let (_, t) = load();
    let draws = t.get("rng_seed3").unwrap();
    let mut g = TorchGenerator::new(3);
    for (i, want) in draws.chunks(N).enumerate() {
        assert_eq!(g.randn(N), want, "torch.randn draw {i} of seed 3");
    }
    assert_eq!(TorchGenerator::new(0).randn(N), t.get("base_x").unwrap());
}

#[test]
fn kinds_parse_and_name() {
    for k in SchedulerKind::ALL {
        assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
        assert_eq!(k.to_string(), k.name());
    }
    assert_eq!(
        SchedulerKind::names().join(" "),
        "ddim pndm ddpm euler euler-a heun lms dpmpp-2m dpmpp-2m-karras dpmpp-2m-sde-karras unipc lcm"
    );
    let e = "euler_a".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(e.contains("euler-a") && e.contains("dpmpp-2m-sde-karras"), "{e}");
    assert_eq!(SchedulerKind::from_class_name("PNDMScheduler").unwrap(), SchedulerKind::Pndm);
    assert!(SchedulerKind::from_class_name("FlowMatchEulerDiscreteScheduler").is_err());
}

#[test]
fn default_kind_from_config() {
    let sd15 = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;
    let (cfg, kind) = schedulers::parse_scheduler_config(sd15).unwrap();
    assert_eq!(kind, SchedulerKind::Pndm);
    assert_eq!(schedulers::build_default(&cfg).unwrap().class_name(), "PNDMScheduler");
    let dpm: Value = serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true,
        "algorithm_type": "sde-dpmsolver++"});
    assert_eq!(schedulers::default_kind(&dpm).unwrap(), SchedulerKind::DpmPp2mSdeKarras);
    assert!(schedulers::parse_scheduler_config("{").is_err());
    assert!(schedulers::default_kind(&serde_json::json!({})).is_err());
    // every kind builds from SD 1.5's config, and an empty config gives the class defaults
    for k in SchedulerKind::ALL {
        let mut s = schedulers::build(k, &cfg).unwrap();
        assert_eq!(s.class_name(), k.class_name());
        s.set_timesteps(10).unwrap();
        assert!(!s.timesteps().is_empty());
        schedulers::build(k, &serde_json::json!({})).unwrap();
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    use ldm_web::Error;
    let cfg = serde_json::json!({"beta_schedule": "scaled_linear"});
    let mut gen = TorchGenerator::new(0);
    for k in SchedulerKind::ALL {
        let mut s = schedulers::build(k, &cfg).unwrap();
        // stepping before set_timesteps
        assert!(s.step_host(&[0.0; 4], 0, &[0.0; 4], &mut gen).is_err(), "{k}");
        assert!(matches!(s.set_timesteps(0), Err(Error::Input(_))), "{k}: zero steps");
        assert!(matches!(s.set_timesteps(100_000), Err(Error::Input(_))), "{k}: too many steps");
        s.set_timesteps(4).unwrap();
        let n = s.timesteps().len();
        assert!(s.step_host(&[0.0; 4], n + 3, &[0.0; 4], &mut gen).is_err(), "{k}: index out of range");
        assert!(s.step_host(&[0.0; 3], 0, &[0.0; 4], &mut gen).is_err(), "{k}: length mismatch");
        // out-of-range indices in the infallible methods are clamped, not a panic
        let _ = s.scale_model_input_host(&[1.0; 4], n + 3);
        let _ = s.add_noise_host(&[1.0; 4], &[1.0; 4], n + 3);
        // a sample whose size changes between steps is an error or handled, never a panic
        s.set_timesteps(4).unwrap();
        s.step_host(&[0.5; 4], 0, &[0.5; 4], &mut gen).unwrap();
        let _ = s.step_host(&[0.5; 3], 1, &[0.5; 3], &mut gen);
    }
    // bad configs
    for bad in [
        serde_json::json!({"beta_schedule": "cubic"}),
        serde_json::json!({"prediction_type": "x0"}),
        serde_json::json!({"timestep_spacing": "even"}),
        serde_json::json!({"num_train_timesteps": 1}),
        serde_json::json!({"trained_betas": [0.1, 0.2]}),
        serde_json::json!({"num_train_timesteps": 1_000_000_000u64}),
        serde_json::json!({"steps_offset": 1_000_000_000i64}),
        serde_json::json!({"steps_offset": -1_000_000_000i64}),
        serde_json::json!("not an object"),
    ] {
        for k in SchedulerKind::ALL {
            assert!(matches!(schedulers::build(k, &bad), Err(Error::Model(_))), "{k}: {bad}");
        }
    }
    assert!(matches!(
        schedulers::build(SchedulerKind::Ddim, &serde_json::json!({"thresholding": true})),
        Err(Error::Input(_))
    ));
    let mut lcm = schedulers::build(SchedulerKind::Lcm, &serde_json::json!({})).unwrap();
    assert!(matches!(lcm.set_timesteps(51), Err(Error::Input(_))), "LCM: more steps than original_inference_steps");
}
