//! Live previews while denoising: a cheap affine map from latent channels to RGB, seen at latent
//! resolution, instead of a VAE decode per preview.
//!
//! The map is fitted per model by least squares on the model's own finished images (their VAE
//! decode, average-pooled to latent resolution, against the final latents), so it needs no
//! constants from elsewhere and follows whatever VAE the model has. Before the first image of a
//! model is finished, channels are shown as normalised false colour.

use super::stable_diffusion::{Images, Latents};

/// Ridge term of the least-squares fit: keeps the normal equations solvable for flat images.
const RIDGE: f64 = 1e-3;

/// A model's latent-to-RGB approximation.
#[derive(Clone, Debug, Default)]
pub struct LatentPreview {
    /// `[channels + 1][3]`: one row per latent channel, then the bias.
    map: Option<Vec<[f64; 3]>>,
}

impl LatentPreview {
    /// Whether a fitted map is in use (rather than false colour).
    pub fn fitted(&self) -> bool {
        self.map.is_some()
    }

    /// Fits the map on image 0 of a finished generation.
    pub fn fit(&mut self, latents: &Latents, images: &Images) {
        let [_, c, h, w] = latents.shape;
        if h == 0 || w == 0 || !images.width.is_multiple_of(w) || !images.height.is_multiple_of(h) {
            return;
        }
        let f = images.width / w;
        let k = c + 1;
        let mut ata = vec![0f64; k * k];
        let mut aty = vec![[0f64; 3]; k];
        let mut row = vec![0f64; k];
        for y in 0..h {
            for x in 0..w {
                for (ch, r) in row.iter_mut().enumerate().take(c) {
                    *r = latents.data[(ch * h + y) * w + x] as f64;
                }
                row[c] = 1.0;
                let mut rgb = [0f64; 3];
                for dy in 0..f {
                    for dx in 0..f {
                        let p = ((y * f + dy) * images.width + x * f + dx) * 3;
                        for (o, v) in rgb.iter_mut().enumerate() {
                            *v += images.data[p + o] as f64;
                        }
                    }
                }
                rgb.iter_mut().for_each(|v| *v /= (f * f) as f64);
                for i in 0..k {
                    for j in 0..k {
                        ata[i * k + j] += row[i] * row[j];
                    }
                    for o in 0..3 {
                        aty[i][o] += row[i] * rgb[o];
                    }
                }
            }
        }
        for i in 0..c {
            ata[i * k + i] += RIDGE * (h * w) as f64;
        }
        self.map = solve(&mut ata, &mut aty, k);
    }

    /// Image 0 of `latents` (`[batch, channels, h, w]`) as RGBA8 at latent resolution.
    pub fn render(&self, latents: &[f32], shape: [usize; 4]) -> Vec<u8> {
        let [_, c, h, w] = shape;
        let n = h * w;
        let mut out = vec![255u8; n * 4];
        let to8 = |v: f64| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        match &self.map {
            Some(map) => {
                for p in 0..n {
                    let mut rgb = map[c];
                    for (ch, m) in map.iter().enumerate().take(c) {
                        let v = latents[ch * n + p] as f64;
                        rgb.iter_mut().zip(m).for_each(|(o, k)| *o += v * k);
                    }
                    for o in 0..3 {
                        out[p * 4 + o] = to8(rgb[o]);
                    }
                }
            }
            None => {
                // Each of the first three channels stretched over mean ± 2 standard deviations.
                for ch in 0..c.min(3) {
                    let xs = &latents[ch * n..(ch + 1) * n];
                    let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
                    let sd = (xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64).sqrt().max(1e-6);
                    for (p, &v) in xs.iter().enumerate() {
                        out[p * 4 + ch] = to8(0.5 + (v as f64 - mean) / (4.0 * sd));
                    }
                }
            }
        }
        out
    }
}

/// Solves `a x = b` (`k x k`, three right-hand sides) by Gaussian elimination with pivoting.
fn solve(a: &mut [f64], b: &mut [[f64; 3]], k: usize) -> Option<Vec<[f64; 3]>> {
    for col in 0..k {
        let pivot = (col..k).max_by(|&i, &j| a[i * k + col].abs().total_cmp(&a[j * k + col].abs()))?;
        if a[pivot * k + col].abs() < 1e-12 {
            return None;
        }
        if pivot != col {
            for j in 0..k {
                a.swap(pivot * k + j, col * k + j);
            }
            b.swap(pivot, col);
        }
        for i in col + 1..k {
            let f = a[i * k + col] / a[col * k + col];
            for j in col..k {
                a[i * k + j] -= f * a[col * k + j];
            }
            let bc = b[col];
            b[i].iter_mut().zip(bc).for_each(|(v, c)| *v -= f * c);
        }
    }
    let mut x = vec![[0f64; 3]; k];
    for i in (0..k).rev() {
        let mut acc = b[i];
        for j in i + 1..k {
            acc.iter_mut().zip(x[j]).for_each(|(v, xj)| *v -= a[i * k + j] * xj);
        }
        x[i] = acc.map(|v| v / a[i * k + i]);
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_an_affine_map() {
        // Images made from latents by a known affine map (upsampled x2) give that map back.
        let (c, h, w, f) = (4, 5, 7, 2);
        let latents: Vec<f32> = (0..c * h * w).map(|i| ((i * 37 % 23) as f32 / 11.0) - 1.0).collect();
        let truth = [[0.2, -0.1, 0.05], [0.1, 0.3, -0.2], [-0.05, 0.1, 0.25], [0.0, -0.2, 0.1], [0.5, 0.45, 0.4]];
        let (iw, ih) = (w * f, h * f);
        let mut data = vec![0f32; iw * ih * 3];
        for y in 0..ih {
            for x in 0..iw {
                for o in 0..3 {
                    let mut v = truth[c][o];
                    for ch in 0..c {
                        v += latents[(ch * h + y / f) * w + x / f] as f64 * truth[ch][o];
                    }
                    data[(y * iw + x) * 3 + o] = v as f32;
                }
            }
        }
        let mut p = LatentPreview::default();
        p.fit(&Latents { data: latents.clone(), shape: [1, c, h, w] }, &Images { batch: 1, width: iw, height: ih, data });
        let map = p.map.clone().expect("fitted");
        for (row, want) in map.iter().zip(truth) {
            for o in 0..3 {
                assert!((row[o] - want[o]).abs() < 0.02, "{map:?}");
            }
        }
        let rgba = p.render(&latents, [1, c, h, w]);
        assert_eq!(rgba.len(), h * w * 4);
    }

    #[test]
    fn false_colour_before_a_fit() {
        let rgba = LatentPreview::default().render(&[0.0, 1.0, -1.0, 0.5], [1, 1, 2, 2]);
        assert_eq!(rgba.len(), 16);
        assert!(rgba[4] > rgba[0] && rgba[0] > rgba[8]);
        assert_eq!(rgba[3], 255);
    }
}
