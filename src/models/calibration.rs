//! The input statistics a calibration run collects (`ldm convert --calibrate`): for every probed
//! Linear and Conv2d, the second moments of the vectors its weight multiplies, summed on the
//! device as the model runs and read back once at the end.
//!
//! A layer with K inputs per output accumulates `X^T X` (K x K) when K is at most
//! [`InputRecorder::gram_max_k`] (what GPTQ needs), else the sum of x² per input column; a
//! convolution's vectors are its patches (im2col), or for a large K its input channels' x²
//! spread over the kernel positions. Guidance batches both halves, so both are in.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::loader::{InputLayout, InputSink};
use crate::ops::{self, Conv2dSpec, MatView, MatmulSpec};
use crate::quantise::{Calibration, InputStats};

/// What one layer has accumulated: device sums by shape (batch sizes may differ between calls).
struct Accumulated {
    names: Vec<String>,
    k: usize,
    /// Gram matrices `[.., K, K]`, or column sums of squares `[.., K]` (`kernel` > 1: per input
    /// channel, to spread over `kernel` positions).
    sums: Vec<Tensor>,
    gram: bool,
    kernel: usize,
    samples: u64,
}

impl std::fmt::Debug for InputRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InputRecorder {{ {} layers }}", self.layers.borrow().len())
    }
}

/// One call's sums for a layer of `k` inputs over `samples` vectors (see [`Accumulated`]).
struct Moments {
    k: usize,
    gram: bool,
    kernel: usize,
    samples: u64,
    sum: Tensor,
}

/// Collects layer inputs during a calibration run (an [`InputSink`]).
pub struct InputRecorder {
    layers: RefCell<HashMap<String, Accumulated>>,
    /// Layers with more inputs than this get per-column statistics only.
    pub gram_max_k: usize,
    /// The component folders recorded (others cost nothing: a VAE decoder's full-resolution
    /// patches are the costliest inputs there are).
    folders: Vec<String>,
}

impl InputRecorder {
    /// A recorder of the layers in component `folders`, keeping Gram matrices up to
    /// `gram_max_k` inputs.
    pub fn new(gram_max_k: usize, folders: &[&str]) -> Self {
        Self { layers: RefCell::new(HashMap::new()), gram_max_k, folders: folders.iter().map(|f| format!("{f}/")).collect() }
    }

    fn add(&self, gpu: &Gpu, names: &[String], m: Moments) -> Result<()> {
        let mut layers = self.layers.borrow_mut();
        let acc = layers.entry(names[0].clone()).or_insert_with(|| Accumulated { names: names.to_vec(), k: m.k, sums: Vec::new(), gram: m.gram, kernel: m.kernel, samples: 0 });
        acc.samples += m.samples;
        match acc.sums.iter_mut().find(|s| s.shape() == m.sum.shape()) {
            Some(s) => *s = ops::add(gpu, s, &m.sum)?,
            None => acc.sums.push(m.sum),
        }
        Ok(())
    }

    /// The means of what was recorded, per weight name (the recorder starts over empty).
    pub async fn finish(&self, gpu: &Gpu) -> Result<Calibration> {
        let mut out = Calibration::new();
        for acc in self.layers.take().values() {
            let per = if acc.gram { acc.k * acc.k } else { acc.k / acc.kernel };
            let mut total = vec![0f64; per];
            for s in &acc.sums {
                for chunk in gpu.read(s).await?.chunks(per) {
                    for (t, v) in total.iter_mut().zip(chunk) {
                        *t += *v as f64;
                    }
                }
            }
            let n = acc.samples.max(1) as f64;
            total.iter_mut().for_each(|v| *v /= n);
            let (diag, gram) = if acc.gram {
                ((0..acc.k).map(|i| total[i * acc.k + i]).collect(), Some(total))
            } else {
                (total.iter().flat_map(|&v| std::iter::repeat_n(v, acc.kernel)).collect(), None)
            };
            for name in &acc.names {
                out.insert(name.clone(), InputStats { diag: Vec::clone(&diag), gram: gram.clone(), samples: acc.samples });
            }
        }
        Ok(out)
    }
}

/// `A^T A` per batch for A `[batch, rows, k]` given as rows of a matrix view, or `ones . (A∘A)`.
fn second_moments(gpu: &Gpu, x: &Tensor, batch: usize, rows: usize, k: usize, channels_first: bool, gram: bool) -> Result<Tensor> {
    // Row-major A[b] is `rows x k`; channels-first storage is `k x rows`.
    let (row_stride, col_stride) = if channels_first { (1, rows) } else { (k, 1) };
    let a = MatView { tensor: x, base: 0, batch_stride: rows * k, row_stride, col_stride };
    let at = MatView { tensor: x, base: 0, batch_stride: rows * k, row_stride: col_stride, col_stride: row_stride };
    if gram {
        return ops::matmul_spec(gpu, &MatmulSpec { a: at, b: a, m: k, n: k, k: rows, batch, alpha: 1.0, bias: None, act: ops::Activation::None, residual: None });
    }
    let sq = ops::mul(gpu, x, x)?;
    let ones = gpu.upload(&[rows], x.dtype(), &vec![1.0; rows])?;
    let a = MatView { tensor: &sq, ..a };
    ops::matmul_spec(gpu, &MatmulSpec { a: MatView::packed(&ones, 1, rows).broadcast(), b: a, m: 1, n: k, k: rows, batch, alpha: 1.0, bias: None, act: ops::Activation::None, residual: None })
}

impl InputSink for InputRecorder {
    fn observe(&self, gpu: &Gpu, names: &[String], x: &Tensor, layout: InputLayout) -> Result<()> {
        if !self.folders.iter().any(|f| names[0].starts_with(f.as_str())) {
            return Ok(());
        }
        if x.dtype() != DType::F32 {
            return Err(Error::Input("calibration runs the model in f32".into()));
        }
        match layout {
            InputLayout::Rows => {
                let k = x.dim(-1);
                let rows = x.numel() / k.max(1);
                let gram = k <= self.gram_max_k;
                let s = second_moments(gpu, x, 1, rows, k, false, gram)?;
                self.add(gpu, names, Moments { k, gram, kernel: 1, samples: rows as u64, sum: s })
            }
            InputLayout::ChannelsFirst => {
                let (b, k) = (x.dim(0), x.dim(1));
                let n = x.numel() / (b * k).max(1);
                let gram = k <= self.gram_max_k;
                let s = second_moments(gpu, x, b, n, k, true, gram)?;
                self.add(gpu, names, Moments { k, gram, kernel: 1, samples: (b * n) as u64, sum: s })
            }
            InputLayout::Conv { kernel, stride, padding, dilation } => {
                let (b, c) = (x.dim(0), x.dim(1));
                let k = c * kernel.0 * kernel.1;
                let spec = Conv2dSpec { stride, padding, dilation, ..Default::default() };
                if k <= self.gram_max_k {
                    let cols = ops::im2col(gpu, x, kernel.0, kernel.1, &spec)?;
                    let n = cols.dim(2);
                    let s = second_moments(gpu, &cols, b, n, k, true, true)?;
                    self.add(gpu, names, Moments { k, gram: true, kernel: 1, samples: (b * n) as u64, sum: s })
                } else {
                    // Per input channel: its x² stands for each of its kernel positions (the
                    // zero padding aside).
                    let n = x.numel() / (b * c).max(1);
                    let s = second_moments(gpu, x, b, n, c, true, false)?;
                    self.add(gpu, names, Moments { k, gram: false, kernel: kernel.0 * kernel.1, samples: (b * n) as u64, sum: s })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::TorchGenerator;

    #[test]
    fn records_second_moments_of_rows_maps_and_patches() {
        for gpu in crate::gpu::test_devices() {
            records_on(&gpu);
        }
    }

    fn records_on(gpu: &Gpu) {
        let rec = InputRecorder::new(40, &["unet"]);
        let names = |n: &str| vec![n.to_string()];
        // Rows: two calls of [3, 5, 7] tokens (K = 7) -> mean x x^T over 30 vectors.
        let xs: Vec<Vec<f32>> = (0..2).map(|s| TorchGenerator::new(s).randn(105)).collect();
        for x in &xs {
            rec.observe(gpu, &names("unet/a.weight"), &gpu.upload(&[3, 5, 7], DType::F32, x).unwrap(), InputLayout::Rows).unwrap();
        }
        // Channels-first [2, 6, 4]: vectors of 6 channels at 8 positions.
        let cf = TorchGenerator::new(7).randn(48);
        rec.observe(gpu, &names("unet/b.weight"), &gpu.upload(&[2, 6, 4], DType::F32, &cf).unwrap(), InputLayout::ChannelsFirst).unwrap();
        // A 3x3 convolution on [1, 2, 4, 5], padding 1: patches of K = 18 (Gram), and the same
        // with a recorder whose limit forces per-channel statistics.
        let img = TorchGenerator::new(9).randn(40);
        let conv = InputLayout::Conv { kernel: (3, 3), stride: (1, 1), padding: (1, 1), dilation: (1, 1) };
        let x = gpu.upload(&[1, 2, 4, 5], DType::F32, &img).unwrap();
        rec.observe(gpu, &names("unet/c.weight"), &x, conv).unwrap();
        let small = InputRecorder::new(4, &["unet"]);
        small.observe(gpu, &names("unet/c.weight"), &x, conv).unwrap();
        let got = pollster::block_on(rec.finish(gpu)).unwrap();
        let per_channel = pollster::block_on(small.finish(gpu)).unwrap();

        let check = |name: &str, vectors: &[Vec<f64>]| {
            let s = &got[name];
            let k = vectors[0].len();
            assert_eq!(s.samples, vectors.len() as u64, "{name}");
            let g = s.gram.as_ref().expect("a Gram matrix");
            for i in 0..k {
                for j in 0..k {
                    let want = vectors.iter().map(|v| v[i] * v[j]).sum::<f64>() / vectors.len() as f64;
                    assert!((g[i * k + j] - want).abs() < 1e-4, "{name} ({i},{j}): {} vs {want}", g[i * k + j]);
                }
                assert_eq!(s.diag[i], g[i * k + i]);
            }
        };
        let rows: Vec<Vec<f64>> = xs.iter().flat_map(|x| x.chunks(7).map(|r| r.iter().map(|&v| v as f64).collect::<Vec<_>>()).collect::<Vec<_>>()).collect();
        check("unet/a.weight", &rows);
        let cf = &cf;
        let cfv: Vec<Vec<f64>> = (0..2).flat_map(|b| (0..4).map(move |p| (0..6).map(|c| cf[b * 24 + c * 4 + p] as f64).collect())).collect::<Vec<_>>();
        check("unet/b.weight", &cfv);
        let at = |c: usize, y: isize, x: isize| if (0..4).contains(&y) && (0..5).contains(&x) { img[c * 20 + y as usize * 5 + x as usize] as f64 } else { 0.0 };
        let patches: Vec<Vec<f64>> = (0..20).map(|p| {
            let (y, x) = ((p / 5) as isize, (p % 5) as isize);
            (0..18).map(|k| at(k / 9, y + (k % 9 / 3) as isize - 1, x + (k % 3) as isize - 1)).collect()
        }).collect();
        check("unet/c.weight", &patches);
        let pc = &per_channel["unet/c.weight"];
        assert!(pc.gram.is_none() && pc.diag.len() == 18);
        for c in 0..2 {
            let want = (0..20).map(|p| (img[c * 20 + p] as f64).powi(2)).sum::<f64>() / 20.0;
            assert!(pc.diag[c * 9..(c + 1) * 9].iter().all(|v| (v - want).abs() < 1e-5), "channel {c}");
        }
    }
}
