//! Calibrated quantisation of weight matrices: block scales and minimums chosen to minimise the
//! error the layer's *output* sees, and Hessian-aware rounding (GPTQ, Frantar et al. 2022).
//!
//! A layer `y = W x` with inputs of second moment `H = E[x x^T]` has output error
//! `E|ΔW x|² = tr(ΔW H ΔW^T)`. With only the diagonal of H (per-input-column mean of x²) that
//! is a weighted squared error per block, minimised by a search over each block's scale and
//! minimum ([`encode_weighted`]). With the whole of H, GPTQ rounds one column at a time and
//! spreads each rounding error over the columns not yet rounded ([`encode_gptq`]); its blocks
//! of 32 along K are its groups, their parameters chosen when the sweep reaches them.

use half::f16;

use crate::error::{Error, Result};
use crate::gpu::{BlockCodes, DType};

/// Second moments of a layer's inputs over a calibration run, for a weight `[rows, K]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InputStats {
    /// Mean of x_k² per input column k (length K).
    pub diag: Vec<f64>,
    /// Mean of x x^T (K x K, row-major), where it was recorded.
    pub gram: Option<Vec<f64>>,
    /// Input vectors the means are over.
    pub samples: u64,
}

/// Input statistics per weight, keyed `folder/tensor` (`unet/conv_in.weight`).
pub type Calibration = std::collections::HashMap<String, InputStats>;

/// The f16 scale a block stores for `d`, and its inverse for rounding (as `gpu::dtype`).
fn stored(d: f32) -> (f32, f32) {
    let d = f16::from_f32(d).to_f32();
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// Weighted squared error of block `x` coded with scale `d` and minimum `m`.
fn block_error(c: &BlockCodes, x: &[f32], w: &[f32], d: f32, m: f32) -> f64 {
    let (d, id) = stored(d);
    let m = if c.has_min { f16::from_f32(m).to_f32() } else { 0.0 };
    x.iter().zip(w).map(|(&v, &wt)| (wt * (v - c.value(c.code(v, id, m), d, m)).powi(2)) as f64).sum()
}

/// The least-squares scale (and minimum) for fixed codes: `argmin Σ w (x - (c - z) d - m)²`.
fn refit(c: &BlockCodes, x: &[f32], w: &[f32], d: f32, m: f32) -> (f32, f32) {
    let (_, id) = stored(d);
    let m0 = if c.has_min { f16::from_f32(m).to_f32() } else { 0.0 };
    let (mut sw, mut sq, mut sqq, mut sx, mut sqx) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&v, &wt) in x.iter().zip(w) {
        let q = (c.code(v, id, m0) - c.zero) as f64;
        let (wt, v) = (wt as f64, v as f64);
        sw += wt;
        sq += wt * q;
        sqq += wt * q * q;
        sx += wt * v;
        sqx += wt * q * v;
    }
    if c.has_min {
        let det = sw * sqq - sq * sq;
        if det.abs() < 1e-30 {
            return (d, m);
        }
        (((sw * sqx - sq * sx) / det) as f32, ((sqq * sx - sq * sqx) / det) as f32)
    } else if sqq > 0.0 {
        ((sqx / sqq) as f32, 0.0)
    } else {
        (d, m)
    }
}

/// The scale and minimum of one block minimising its weighted error: a grid of clipped ranges
/// around the plain encoder's choice, each refined by least squares on its codes.
pub fn search_block(c: &BlockCodes, x: &[f32], w: &[f32]) -> [f32; 2] {
    let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    if !lo.is_finite() || lo == hi && lo == 0.0 {
        return [0.0, 0.0];
    }
    let levels = (c.max - c.min) as f32;
    let mut candidates = Vec::new();
    if c.has_min {
        // Codes min..max over [lo', hi'], the range clipped from either end.
        let span = hi - lo;
        for a in 0..6 {
            for b in 0..6 {
                let (l, h) = (lo + 0.04 * a as f32 * span, hi - 0.04 * b as f32 * span);
                if h > l {
                    let d = (h - l) / levels;
                    candidates.push((d, l - (c.min - c.zero) as f32 * d));
                }
            }
        }
    } else {
        // Symmetric codes (c - z) d: the extreme value on either end of the code range, shrunk.
        let amax = lo.abs().max(hi.abs());
        let (neg, pos) = ((c.zero - c.min) as f32, (c.max - c.zero) as f32);
        for s in 0..12 {
            let f = 1.0 - 0.025 * s as f32;
            for reach in [neg, pos] {
                let d = amax * f / reach;
                candidates.push((d, 0.0));
                candidates.push((-d, 0.0));
            }
        }
    }
    let mut best = (f64::INFINITY, 0.0, 0.0);
    for (d, m) in candidates {
        let (mut d, mut m) = (d, m);
        for _ in 0..3 {
            let e = block_error(c, x, w, d, m);
            if e < best.0 {
                best = (e, d, m);
            }
            let (d2, m2) = refit(c, x, w, d, m);
            if !(d2.is_finite() && m2.is_finite()) || d2 == 0.0 {
                break;
            }
            (d, m) = (d2, m2);
        }
        let e = block_error(c, x, w, d, m);
        if e < best.0 {
            best = (e, d, m);
        }
    }
    [best.1, best.2]
}

/// Per-column weights for a layer's blocks: the input second moments, floored at 1% of their
/// mean so no column is ignored entirely.
fn column_weights(diag: &[f64]) -> Vec<f32> {
    let mean = diag.iter().sum::<f64>() / diag.len().max(1) as f64;
    let floor = if mean > 0.0 { 0.01 * mean } else { 1.0 };
    diag.iter().map(|&v| (v.max(0.0) + floor) as f32).collect()
}

fn codes_of(dtype: DType) -> Result<BlockCodes> {
    dtype.info().codes.ok_or_else(|| Error::Input(format!("{} is not a block-quantised type", dtype.name())))
}

/// `data` (a weight of `shape`, `[rows, K]` as in `gpu::dtype`) in `dtype` with every block's
/// parameters chosen by [`search_block`] under per-column weights `diag` (length K).
pub fn encode_weighted(dtype: DType, shape: &[usize], data: &[f32], diag: &[f64]) -> Result<Vec<u8>> {
    let c = codes_of(dtype)?;
    let bs = dtype.info().block_size;
    let k = data.len() / shape.first().copied().unwrap_or(1).max(1);
    if diag.len() != k {
        return Err(Error::Shape(format!("input statistics of {} columns for a weight {shape:?} of {k}", diag.len())));
    }
    let w = column_weights(diag);
    Ok(dtype.encode_with_params(shape, data, |_, b, block| {
        let n = bs.min(k - b * bs);
        search_block(&c, &block[..n], &w[b * bs..b * bs + n])
    }))
}

/// In-place lower Cholesky factor of the symmetric positive definite `a` (n x n).
fn cholesky(a: &mut [f64], n: usize) -> Result<()> {
    for j in 0..n {
        let mut s = a[j * n + j];
        for p in 0..j {
            s -= a[j * n + p] * a[j * n + p];
        }
        if s <= 0.0 || !s.is_finite() {
            return Err(Error::Model(format!("input second moments are not positive definite (column {j}); calibrate with more prompts")));
        }
        let d = s.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for p in 0..j {
                s -= a[i * n + p] * a[j * n + p];
            }
            a[i * n + j] = s / d;
        }
        for i in 0..j {
            a[i * n + j] = 0.0;
        }
    }
    Ok(())
}

/// The upper factor U of H^-1 = U^T U that GPTQ's sweep reads, from the damped H.
fn inverse_factor(h: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut l = h.to_vec();
    cholesky(&mut l, n)?;
    // L^-1 by forward substitution, a row at a time (row i = (e_i - sum_p L_ip row p) / L_ii),
    // so every inner loop runs along contiguous rows.
    let mut li = vec![0f64; n * n];
    for i in 0..n {
        let (done, row) = li.split_at_mut(i * n);
        let row = &mut row[..n];
        for p in 0..i {
            let coef = l[i * n + p];
            if coef != 0.0 {
                for (r, &v) in row[..=p].iter_mut().zip(&done[p * n..p * n + p + 1]) {
                    *r -= coef * v;
                }
            }
        }
        row[i] = 1.0;
        let d = l[i * n + i];
        row[..=i].iter_mut().for_each(|v| *v /= d);
    }
    // H^-1 = L^-T L^-1 (a matrix product), then its Cholesky factor, transposed to upper.
    let mut hinv = vec![0f64; n * n];
    // SAFETY: all three are n x n row-major buffers of this function; hinv does not alias li.
    unsafe {
        gemm::gemm(
            n, n, n,
            hinv.as_mut_ptr(), 1, n as isize, false,
            li.as_ptr(), n as isize, 1, // L^-T: element (i, p) is li[p * n + i]
            li.as_ptr(), 1, n as isize,
            0.0, 1.0, false, false, false, crate::ops::host::parallelism(2.0 * (n * n * n) as f64),
        );
    }
    cholesky(&mut hinv, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = hinv[j * n + i];
        }
    }
    Ok(u)
}

/// `data` in `dtype` by GPTQ with input second moments `gram` (K x K): columns rounded in
/// order, each one's error `(w - q) / U_ii` subtracted from the later columns along `U`'s row;
/// each block's parameters searched (weighted by H's diagonal) on the updated weights when the
/// sweep reaches it. `damp` (a fraction of H's mean diagonal) keeps H invertible.
pub fn encode_gptq(dtype: DType, shape: &[usize], data: &[f32], gram: &[f64], damp: f64) -> Result<Vec<u8>> {
    let c = codes_of(dtype)?;
    let bs = dtype.info().block_size;
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let k = data.len() / rows;
    if gram.len() != k * k {
        return Err(Error::Shape(format!("input second moments of {} values for a weight {shape:?} with {k} columns", gram.len())));
    }
    let mut h = gram.to_vec();
    let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k.max(1) as f64;
    let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] <= 0.0).collect();
    for i in 0..k {
        if dead[i] {
            h[i * k + i] = 1.0;
        }
        h[i * k + i] += damp * mean.max(1e-12);
    }
    let u = inverse_factor(&h, k)?;
    let diag: Vec<f64> = (0..k).map(|i| gram[i * k + i]).collect();
    let wts = column_weights(&diag);
    let bpr = k.div_ceil(bs);
    // Per row: the values each column had when it was rounded, and each block's parameters.
    let sweep = |r: usize| -> (Vec<f32>, Vec<[f32; 2]>) {
        let mut w: Vec<f64> = data[r * k..(r + 1) * k].iter().zip(&dead).map(|(&v, &d)| if d { 0.0 } else { v as f64 }).collect();
        let mut at_rounding = vec![0f32; k];
        let mut params = vec![[0f32; 2]; bpr];
        let (mut d, mut id, mut m) = (0f32, 0f32, 0f32);
        for i in 0..k {
            if i % bs == 0 {
                let end = (i + bs).min(k);
                let block: Vec<f32> = w[i..end].iter().map(|&v| v as f32).collect();
                let p = search_block(&c, &block, &wts[i..end]);
                params[i / bs] = p;
                (d, id) = stored(p[0]);
                m = if c.has_min { f16::from_f32(p[1]).to_f32() } else { 0.0 };
            }
            let v = w[i] as f32;
            at_rounding[i] = v;
            let q = c.value(c.code(v, id, m), d, m) as f64;
            let err = (w[i] - q) / u[i * k + i];
            for j in i + 1..k {
                w[j] -= err * u[i * k + j];
            }
        }
        (at_rounding, params)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows);
    let mut results: Vec<(Vec<f32>, Vec<[f32; 2]>)> = vec![(Vec::new(), Vec::new()); rows];
    std::thread::scope(|s| {
        for (t, chunk) in results.chunks_mut(rows.div_ceil(threads)).enumerate() {
            let sweep = &sweep;
            s.spawn(move || {
                for (i, out) in chunk.iter_mut().enumerate() {
                    *out = sweep(t * rows.div_ceil(threads) + i);
                }
            });
        }
    });
    let rounded: Vec<f32> = results.iter().flat_map(|(v, _)| v.iter().copied()).collect();
    Ok(dtype.encode_with_params(shape, &rounded, |r, b, _| results[r].1[b]))
}

/// GPTQ's damping, a fraction of the mean input second moment added to H's diagonal (the
/// paper's 1%).
pub const GPTQ_DAMP: f64 = 0.01;

/// `data` in `dtype` with `stats`: GPTQ where they hold the Gram matrix, else the weighted
/// block search.
pub fn encode_calibrated(dtype: DType, shape: &[usize], data: &[f32], stats: &InputStats) -> Result<Vec<u8>> {
    match &stats.gram {
        Some(gram) => encode_gptq(dtype, shape, data, gram, GPTQ_DAMP),
        None => encode_weighted(dtype, shape, data, &stats.diag),
    }
}

/// Output signal-to-noise ratio in dB of weight `w_hat` against `w` (both `[rows, K]`) for
/// inputs with these statistics: `tr(W H W^T) / tr(ΔW H ΔW^T)`, H's diagonal when no Gram.
pub fn output_snr_db(w: &[f32], w_hat: &[f32], stats: &InputStats) -> f64 {
    let k = stats.diag.len();
    let energy = |m: &dyn Fn(usize) -> f64| -> f64 {
        let rows = w.len() / k.max(1);
        let mut total = 0.0;
        for r in 0..rows {
            match &stats.gram {
                Some(g) => {
                    for i in 0..k {
                        let a = m(r * k + i);
                        if a != 0.0 {
                            total += a * (0..k).map(|j| g[i * k + j] * m(r * k + j)).sum::<f64>();
                        }
                    }
                }
                None => total += (0..k).map(|i| stats.diag[i] * m(r * k + i).powi(2)).sum::<f64>(),
            }
        }
        total
    };
    let signal = energy(&|i| w[i] as f64);
    let noise = energy(&|i| (w[i] - w_hat[i]) as f64);
    if noise <= 0.0 { f64::INFINITY } else { 10.0 * (signal / noise).log10() }
}

/// One layer's choices for [`allocate_bits`]: its weights' count and, per candidate type (in
/// order of size), the bits it would take (row padding included) and the predicted error it
/// adds to the model's output.
#[derive(Clone, Debug)]
pub struct LayerChoices {
    pub name: String,
    pub parameters: u64,
    pub options: Vec<(DType, f64, f64)>,
}

/// Bits per weight of a block-quantised type (its block bytes over its block size).
pub fn bits_of(dtype: DType) -> f64 {
    let i = dtype.info();
    8.0 * i.block_bytes as f64 / i.block_size as f64
}

/// The type of each layer that keeps the summed predicted error lowest within `bits` per weight
/// on average: every layer starts at its first (smallest) option, then the upgrade with the most
/// error removed per extra bit is taken while it fits (greedy on the marginal gains).
pub fn allocate_bits(layers: &[LayerChoices], bits: f64) -> Result<Vec<DType>> {
    let total: u64 = layers.iter().map(|l| l.parameters).sum();
    let mut used: f64 = layers.iter().map(|l| l.options.first().map_or(0.0, |o| o.1)).sum();
    let budget = bits * total as f64;
    if used > budget * (1.0 + 1e-9) {
        return Err(Error::Input(format!("--bits {bits}: the smallest types already take {:.2} bits per weight", used / total.max(1) as f64)));
    }
    let mut at = vec![0usize; layers.len()];
    loop {
        let mut best: Option<(f64, usize, usize, f64)> = None;
        for (l, layer) in layers.iter().enumerate() {
            let (_, bits0, err0) = layer.options[at[l]];
            for (j, &(_, bits, err)) in layer.options.iter().enumerate().skip(at[l] + 1) {
                let cost = bits - bits0;
                if cost <= 0.0 || used + cost > budget * (1.0 + 1e-9) || err >= err0 {
                    continue;
                }
                let gain = (err0 - err) / cost;
                if best.is_none_or(|b| gain > b.0) {
                    best = Some((gain, l, j, cost));
                }
            }
        }
        let Some((_, l, j, cost)) = best else { break };
        at[l] = j;
        used += cost;
    }
    Ok(layers.iter().zip(at).map(|(l, j)| l.options[j].0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::TorchGenerator;

    /// Inputs with very uneven, correlated columns (as activations are), and a weight.
    fn problem(rows: usize, k: usize, samples: usize) -> (Vec<f32>, Vec<f32>, InputStats) {
        let w = TorchGenerator::new(3).randn(rows * k);
        let z = TorchGenerator::new(4).randn(samples * k);
        let scale: Vec<f32> = (0..k).map(|i| if i % 7 == 0 { 8.0 } else { 0.5 + (i % 5) as f32 * 0.3 }).collect();
        // x_i = s_i (z_i + 0.6 z_{i-1}): neighbouring columns correlated.
        let x: Vec<f32> = (0..samples * k).map(|n| { let i = n % k; scale[i] * (z[n] + if i > 0 { 0.6 * z[n - 1] } else { 0.0 }) }).collect();
        let mut gram = vec![0f64; k * k];
        for s in 0..samples {
            let row = &x[s * k..(s + 1) * k];
            for i in 0..k {
                for j in 0..k {
                    gram[i * k + j] += (row[i] * row[j]) as f64 / samples as f64;
                }
            }
        }
        let diag = (0..k).map(|i| gram[i * k + i]).collect();
        (w, x, InputStats { diag, gram: Some(gram), samples: samples as u64 })
    }

    #[test]
    fn calibrated_encoders_cut_the_output_error_for_every_block_type() {
        // K = 77: two whole blocks and a padded one.
        let (rows, k) = (24, 77);
        let (w, _, stats) = problem(rows, k, 400);
        let shape = [rows, k];
        let diag_only = InputStats { gram: None, ..stats.clone() };
        for dt in DType::ALL.into_iter().filter(|d| d.is_quantised()) {
            let plain = dt.decode(&shape, &dt.encode(&shape, &w));
            let weighted = dt.decode(&shape, &encode_weighted(dt, &shape, &w, &stats.diag).unwrap());
            let gptq = dt.decode(&shape, &encode_gptq(dt, &shape, &w, stats.gram.as_ref().unwrap(), 0.01).unwrap());
            let (p, wd, g) = (output_snr_db(&w, &plain, &stats), output_snr_db(&w, &weighted, &stats), output_snr_db(&w, &gptq, &stats));
            let (pd, wdd) = (output_snr_db(&w, &plain, &diag_only), output_snr_db(&w, &weighted, &diag_only));
            println!("{}: output SNR plain {p:.2} dB, weighted {wd:.2} dB (diagonal {pd:.2} -> {wdd:.2}), gptq {g:.2} dB", dt.name());
            assert!(wdd > pd + 0.3, "{}: the weighted search must lower the weighted error it minimises ({pd:.2} -> {wdd:.2} dB)", dt.name());
            assert!(g > wd + 1.0, "{}: GPTQ must beat the weighted search on correlated inputs ({wd:.2} -> {g:.2} dB)", dt.name());
        }
    }

    #[test]
    fn bits_go_where_they_remove_the_most_error() {
        let layer = |name: &str, n: u64, errs: [f64; 3]| {
            let options = [DType::Q4_0, DType::Q5_0, DType::Q8_0].into_iter().zip(errs).map(|(d, e)| (d, bits_of(d) * n as f64, e)).collect();
            LayerChoices { name: name.into(), parameters: n, options }
        };
        // A sensitive small layer, a tolerant large one.
        let layers = [layer("small", 100, [10.0, 3.0, 0.1]), layer("large", 900, [2.0, 1.0, 0.0])];
        // 4.5 bits: nothing to spend.
        assert_eq!(allocate_bits(&layers, 4.5).unwrap(), [DType::Q4_0, DType::Q4_0]);
        // 4.9 bits = 400 spare bits: q8_0 for the small layer (400 bits, 9.9 removed) beats q5_0
        // for the large one (900 bits).
        assert_eq!(allocate_bits(&layers, 4.9).unwrap(), [DType::Q8_0, DType::Q4_0]);
        assert_eq!(allocate_bits(&layers, 5.5).unwrap(), [DType::Q8_0, DType::Q4_0], "900 more bits do not fit");
        assert_eq!(allocate_bits(&layers, 5.9).unwrap(), [DType::Q8_0, DType::Q5_0]);
        assert_eq!(allocate_bits(&layers, 9.0).unwrap(), [DType::Q8_0, DType::Q8_0]);
        assert!(allocate_bits(&layers, 4.0).is_err());
        assert_eq!(bits_of(DType::Q4_1), 5.0);
    }

    #[test]
    fn cholesky_factors_invert() {
        let (_, _, stats) = problem(1, 9, 50);
        let h = stats.gram.unwrap();
        let u = inverse_factor(&h, 9).unwrap();
        // U^T U H = I.
        for i in 0..9 {
            for j in 0..9 {
                let uu = |a: usize, b: usize| (0..9).map(|p| u[p * 9 + a] * u[p * 9 + b]).sum::<f64>();
                let v: f64 = (0..9).map(|p| uu(i, p) * h[p * 9 + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8, "({i},{j}) = {v}");
            }
        }
        assert!(inverse_factor(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    }
}
