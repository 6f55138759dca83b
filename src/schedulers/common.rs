//! Shared pieces of the schedulers: config enums, config parsing, and the numerics of the
//! torch / numpy calls diffusers makes, reproduced operation by operation.
//!
//! Conventions (they are what makes the results match diffusers to the last bit or two):
//! * torch float32 tensor arithmetic is done in `f32`, in the same order as the Python source;
//!   `x ** 0.5` is `sqrt`, `x ** 2` is `x * x`, a Python float scalar is rounded to `f32` first.
//! * numpy float64 arithmetic (timesteps, interpolated sigmas, Karras sigmas) is done in `f64`
//!   and rounded to `f32` where diffusers casts.
//! * torch's own float32 `sqrt`/`log`/`exp` on CPU go through MKL and may differ from the
//!   correctly rounded result by one ulp; that is the one difference that remains.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// diffusers' `beta_schedule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// DDPM only.
    #[serde(rename = "sigmoid")]
    Sigmoid,
    /// DDPM only.
    #[serde(rename = "laplace")]
    Laplace,
    /// Heun only.
    #[serde(rename = "exp")]
    Exp,
}

/// diffusers' `prediction_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
    #[serde(rename = "sample", alias = "original_sample")]
    Sample,
    /// Flow-matching models; no scheduler here supports it (rejected with a clear error).
    #[serde(rename = "flow_prediction")]
    FlowPrediction,
}

/// diffusers' `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "trailing")]
    Trailing,
    #[serde(rename = "linspace")]
    Linspace,
}

/// diffusers' `final_sigmas_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum FinalSigmasType {
    #[serde(rename = "zero")]
    Zero,
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// The beta-related keys every scheduler config has.
#[derive(Clone, Debug)]
pub(crate) struct BetaConfig<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

/// Parses a diffusers scheduler config the way `SchedulerClass.from_config(config, **overrides)`
/// does: keys the target does not know are ignored, its defaults fill the rest. `null` values
/// count as absent, as do keys listed in `_use_default_values` and private `_` keys.
pub(crate) fn parse_config<T: DeserializeOwned>(class: &str, json: &Value, overrides: &[(&str, Value)]) -> Result<T> {
    let obj = match json {
        Value::Object(m) => m,
        Value::Null => &Map::new(),
        _ => return Err(Error::Model(format!("{class}: the scheduler config must be a JSON object"))),
    };
    let defaulted: Vec<String> = match obj.get("_use_default_values") {
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    let mut clean = Map::new();
    for (k, v) in obj {
        if k.starts_with('_') || v.is_null() || defaulted.iter().any(|d| d == k) {
            continue;
        }
        clean.insert(k.clone(), v.clone());
    }
    for (k, v) in overrides {
        clean.insert((*k).to_string(), v.clone());
    }
    serde_json::from_value(Value::Object(clean))
        .map_err(|e| Error::Model(format!("{class}: bad scheduler config: {e}")))
}

/// `sigma_min` / `sigma_max` as diffusers' `_convert_to_karras` sees them: `hasattr(self.config,
/// ...)` also finds keys of the original config that the target class does not take.
pub(crate) fn config_sigma_bounds(json: &Value) -> (Option<f64>, Option<f64>) {
    let get = |k: &str| json.get(k).and_then(Value::as_f64);
    (get("sigma_min"), get("sigma_max"))
}

/// A sanity bound on `num_train_timesteps` (diffusion models use 1000).
pub(crate) const MAX_TRAIN_TIMESTEPS: usize = 10_000;

/// `steps_offset` must keep timesteps near the training range.
pub(crate) fn check_offset(class: &str, steps_offset: i64, num_train_timesteps: usize) -> Result<()> {
    if steps_offset.unsigned_abs() > num_train_timesteps as u64 {
        return Err(Error::Model(format!(
            "{class}: steps_offset {steps_offset} is outside the {num_train_timesteps} training timesteps"
        )));
    }
    Ok(())
}

pub(crate) fn check_steps(class: &str, n: usize, num_train_timesteps: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Input(format!("{class}: the number of inference steps must be at least 1")));
    }
    if n > num_train_timesteps {
        return Err(Error::Input(format!(
            "{class}: {n} inference steps is more than the {num_train_timesteps} timesteps the model was trained with"
        )));
    }
    Ok(())
}

pub(crate) fn check_len(class: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!("{class}: {what} has {got} values, the sample has {want}")));
    }
    Ok(())
}

pub(crate) fn not_set(class: &str) -> Error {
    Error::Input(format!("{class}: call set_timesteps before step"))
}

pub(crate) fn bad_index(class: &str, index: usize, len: usize) -> Error {
    Error::Input(format!("{class}: step index {index} is out of range for {len} timesteps"))
}

pub(crate) fn reject_thresholding(class: &str, thresholding: bool) -> Result<()> {
    if thresholding {
        return Err(Error::Input(format!(
            "{class}: thresholding (dynamic thresholding) is not supported; set \"thresholding\": false"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// torch emulation

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit: torch
/// computes `start + step * i` for the first half and `end - step * (steps - 1 - i)` for the
/// second, with the multiply-add fused.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let s = start as f32;
    let e = end as f32;
    match steps {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| if i < half { step.mul_add(i as f32, s) } else { (-step).mul_add((steps - i - 1) as f32, e) })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 tensor on the CPU: accumulated in double, each output rounded.
pub(crate) fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (float64 maths, then a float32 tensor).
fn betas_for_alpha_bar(n: usize, transform: BetaSchedule) -> Vec<f32> {
    let alpha_bar = |t: f64| -> f64 {
        match transform {
            BetaSchedule::Laplace => {
                let lmb = -0.5 * (0.5 - t).signum_py() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lmb.exp();
                (snr / (1.0 + snr)).sqrt()
            }
            BetaSchedule::Exp => (t * -12.0).exp(),
            _ => {
                let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
                c * c
            }
        }
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            let b = 1.0 - alpha_bar(t2) / alpha_bar(t1);
            (if b < 0.999 { b } else { 0.999 }) as f32
        })
        .collect()
}

trait SignumPy {
    fn signum_py(self) -> f64;
}
impl SignumPy for f64 {
    /// `math.copysign(1, x)`.
    fn signum_py(self) -> f64 {
        1.0f64.copysign(self)
    }
}

/// diffusers' `rescale_zero_terminal_snr`, in float32 tensor arithmetic.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let cp = torch_cumprod_f32(&alphas);
    let mut s: Vec<f32> = cp.iter().map(|v| v.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else { return Vec::new() };
    for v in &mut s {
        *v -= st;
    }
    let scale = s0 / (s0 - st);
    for v in &mut s {
        *v *= scale;
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The float32 betas of a config, as each diffusers scheduler's `__init__` makes them.
pub(crate) fn make_betas(class: &str, cfg: &BetaConfig, allowed_extra: &[BetaSchedule]) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    if !(2..=MAX_TRAIN_TIMESTEPS).contains(&n) {
        return Err(Error::Model(format!(
            "{class}: num_train_timesteps must be between 2 and {MAX_TRAIN_TIMESTEPS}, got {n}"
        )));
    }
    let betas = if let Some(tb) = cfg.trained_betas {
        if tb.len() != n {
            return Err(Error::Model(format!(
                "{class}: trained_betas has {} values but num_train_timesteps is {n}",
                tb.len()
            )));
        }
        tb.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => torch_linspace_f32(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n)
                .into_iter()
                .map(|v| v * v)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n, BetaSchedule::SquaredcosCapV2),
            other if allowed_extra.contains(&other) => match other {
                BetaSchedule::Sigmoid => {
                    let range = (cfg.beta_end - cfg.beta_start) as f32;
                    let start = cfg.beta_start as f32;
                    torch_linspace_f32(-6.0, 6.0, n)
                        .into_iter()
                        .map(|x| (1.0 / (1.0 + (-x).exp())) * range + start)
                        .collect()
                }
                _ => betas_for_alpha_bar(n, other),
            },
            other => {
                return Err(Error::Model(format!(
                    "{class}: beta_schedule {other:?} is not implemented for this scheduler"
                )))
            }
        }
    };
    Ok(if cfg.rescale_betas_zero_snr { rescale_zero_terminal_snr(&betas) } else { betas })
}

/// `alphas_cumprod = cumprod(1 - betas)`.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    torch_cumprod_f32(&alphas)
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` as a float32 tensor.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.log` of a float32 array.
pub(crate) fn log_f32(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| (v as f64).ln() as f32).collect()
}

/// Python-style index: negative counts from the end.
pub(crate) fn py_index(len: usize, i: i64) -> Option<usize> {
    let j = if i < 0 { i + len as i64 } else { i };
    if j >= 0 && (j as u64) < len as u64 {
        Some(j as usize)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// numpy emulation

/// `np.linspace(start, stop, num, endpoint)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with a float step: the length is `ceil((stop - start) / step)`,
/// element 1 is `start + step`, element i >= 2 is `start + i * (element1 - start)`.
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 || !len.is_finite() {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let next = start + step;
        out.push(next);
        let delta = next - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// `np.round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` with float32 `fp`.
pub(crate) fn np_interp_arange(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    if x.is_nan() {
        return x;
    }
    let last = (n - 1) as f64;
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x > last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize; // xp = 0, 1, 2, ...: the binary search lands here
    if j >= n - 1 {
        return fp[n - 1] as f64;
    }
    let xj = j as f64;
    if xj == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    let r = slope * (x - xj) + fp[j] as f64;
    if r.is_nan() {
        slope * (x - (xj + 1.0)) + fp[j + 1] as f64
    } else {
        r
    }
}

/// diffusers' `_sigma_to_t(sigma, log_sigmas)` with float32 `log_sigmas`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = (if sigma > 1e-10 { sigma } else { 1e-10 }).ln();
    // argmax of cumsum(dists >= 0): the last index where log_sigma >= log_sigmas[i], else 0.
    let mut low = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let lo = log_sigmas[low];
    let hi = log_sigmas[high];
    let w = (lo as f64 - log_sigma) / ((lo - hi) as f64);
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// diffusers' `_convert_to_karras` (rho = 7) in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let ramp = np_linspace(0.0, 1.0, n, true);
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    ramp.iter().map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

/// diffusers' `_convert_to_exponential` in float64.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n, true).into_iter().map(f64::exp).collect()
}

/// Timesteps of the `leading` / `trailing` / `linspace` spacings shared by most schedulers,
/// before any cast (float64 values, descending).
///
/// `count` is the number of points diffusers asks numpy for; `drop_last` drops the final
/// point (the multistep solvers ask for `n + 1` points and drop the last).
pub(crate) enum Spacing {
    /// `np.linspace(0, last, count).round()[::-1]`
    Linspace { last: f64, count: usize, round: bool },
    /// `(np.arange(0, count) * (total // count)).round()[::-1] + offset`
    Leading { total: usize, count: usize, offset: i64 },
    /// `np.arange(start, 0, -(total / n)).round() - 1`
    Trailing { start: f64, total: usize, n: usize, round: bool },
}

pub(crate) fn spaced_timesteps(spacing: Spacing) -> Vec<f64> {
    match spacing {
        Spacing::Linspace { last, count, round } => {
            let mut v = np_linspace(0.0, last, count, true);
            if round {
                v.iter_mut().for_each(|x| *x = np_round(*x));
            }
            v.reverse();
            v
        }
        Spacing::Leading { total, count, offset } => {
            let ratio = total / count.max(1);
            (0..count).rev().map(|i| (i * ratio) as f64 + offset as f64).collect()
        }
        Spacing::Trailing { start, total, n, round } => {
            let ratio = total as f64 / n as f64;
            np_arange_f64(start, 0.0, -ratio)
                .into_iter()
                .map(|x| if round { np_round(x) - 1.0 } else { x - 1.0 })
                .collect()
        }
    }
}

/// `x.to(int64)` of numpy float timesteps (truncation toward zero).
pub(crate) fn to_i64(x: f64) -> i64 {
    x as i64
}

/// Solve `a x = b` (row-major `n x n`) in float32 with partial pivoting, as LAPACK `sgesv`.
pub(crate) fn solve_f32(a: &[f32], b: &[f32], n: usize) -> Option<Vec<f32>> {
    let mut m = a.to_vec();
    let mut x = b.to_vec();
    if m.len() != n * n || x.len() != n {
        return None;
    }
    for k in 0..n {
        let mut p = k;
        for i in k + 1..n {
            if m[i * n + k].abs() > m[p * n + k].abs() {
                p = i;
            }
        }
        if m[p * n + k] == 0.0 {
            return None;
        }
        if p != k {
            for j in 0..n {
                m.swap(k * n + j, p * n + j);
            }
            x.swap(k, p);
        }
        let piv = m[k * n + k];
        for i in k + 1..n {
            let l = m[i * n + k] / piv;
            m[i * n + k] = l;
            for j in k + 1..n {
                m[i * n + j] -= l * m[k * n + j];
            }
            x[i] -= l * x[k];
        }
    }
    for k in (0..n).rev() {
        let mut s = x[k];
        for j in k + 1..n {
            s -= m[k * n + j] * x[j];
        }
        x[k] = s / m[k * n + k];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_len_quirk() {
        // numpy gives 62 points for np.arange(1000, 0, -1000/61)
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 50.0).len(), 50);
    }

    #[test]
    fn linspace_endpoints() {
        let v = np_linspace(0.0, 999.0, 4, true);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 1.0, 1, true), vec![0.0]);
    }
}
