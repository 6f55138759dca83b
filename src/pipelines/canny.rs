//! Canny edge maps as OpenCV's `cv2.Canny(image, low, high[, L2gradient])` computes them with its
//! default 3x3 aperture, the preprocessor canny ControlNets were trained with: the same image and
//! thresholds give OpenCV's map pixel for pixel.
//!
//! OpenCV's arithmetic, reproduced: Sobel derivatives with replicated borders in integers; the
//! L1 magnitude `|dx| + |dy|` (or `dx² + dy²` with thresholds squared); on colour images, per
//! pixel, the channel with the largest magnitude (the first on ties); non-maximum suppression
//! with the gradient direction binned by `tan 22.5°` in 15-bit fixed point, strict on one side
//! and not on the other as OpenCV is, against zero magnitude outside the image; thresholds
//! floored to integers; hysteresis over 8-connected neighbours.

use super::image_input::{Channels, InputImage};
use crate::error::{Error, Result};

/// `cv2.Canny` thresholds (`threshold1`, `threshold2`) and its `L2gradient` flag.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CannyParams {
    pub low: f64,
    pub high: f64,
    pub l2_gradient: bool,
}

impl Default for CannyParams {
    /// The thresholds of diffusers' canny ControlNet examples (100, 200).
    fn default() -> Self {
        Self { low: 100.0, high: 200.0, l2_gradient: false }
    }
}

/// `round(tan(22.5°) · 2^15)`, OpenCV's fixed-point direction boundary.
const TAN_22_5: i64 = 13573;
const SHIFT: u32 = 15;

/// Edge map of an 8-bit image with `channels` interleaved values per pixel: 255 on edges, 0 elsewhere.
pub fn canny(pixels: &[u8], width: usize, height: usize, channels: usize, p: CannyParams) -> Result<Vec<u8>> {
    if width == 0 || height == 0 || channels == 0 || pixels.len() != width * height * channels {
        return Err(Error::Input(format!("canny: {} values do not make a {width}x{height} image of {channels} channels", pixels.len())));
    }
    if !(p.low.is_finite() && p.high.is_finite()) {
        return Err(Error::Input("canny: thresholds must be finite numbers".into()));
    }
    let (mut low, mut high) = (p.low, p.high);
    if low > high {
        std::mem::swap(&mut low, &mut high);
    }
    if p.l2_gradient {
        low = low.min(32767.0);
        high = high.min(32767.0);
        if low > 0.0 {
            low *= low;
        }
        if high > 0.0 {
            high *= high;
        }
    }
    let (low, high) = (low.floor() as i64, high.floor() as i64);

    // Magnitudes (and the derivatives they came from) on a grid with a zero border, so the
    // suppression reads neighbours outside the image as OpenCV's padded buffer does.
    let (pw, ph) = (width + 2, height + 2);
    let mut mag = vec![0i64; pw * ph];
    let mut grad = vec![(0i32, 0i32); width * height];
    let at = |x: isize, y: isize, c: usize| -> i32 {
        let x = x.clamp(0, width as isize - 1) as usize;
        let y = y.clamp(0, height as isize - 1) as usize;
        pixels[(y * width + x) * channels + c] as i32
    };
    for y in 0..height as isize {
        for x in 0..width as isize {
            let mut best: Option<(i64, i32, i32)> = None;
            for c in 0..channels {
                let dx = at(x + 1, y - 1, c) + 2 * at(x + 1, y, c) + at(x + 1, y + 1, c) - at(x - 1, y - 1, c) - 2 * at(x - 1, y, c) - at(x - 1, y + 1, c);
                let dy = at(x - 1, y + 1, c) + 2 * at(x, y + 1, c) + at(x + 1, y + 1, c) - at(x - 1, y - 1, c) - 2 * at(x, y - 1, c) - at(x + 1, y - 1, c);
                let m = if p.l2_gradient { (dx as i64).pow(2) + (dy as i64).pow(2) } else { (dx.abs() + dy.abs()) as i64 };
                if best.is_none_or(|(b, _, _)| m > b) {
                    best = Some((m, dx, dy));
                }
            }
            let (m, dx, dy) = best.unwrap_or_default();
            let (x, y) = (x as usize, y as usize);
            mag[(y + 1) * pw + x + 1] = m;
            grad[y * width + x] = (dx, dy);
        }
    }

    // 0: a weak candidate, 1: not an edge, 2: an edge.
    let mut map = vec![1u8; pw * ph];
    let mut stack = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let i = (y + 1) * pw + x + 1;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = grad[y * width + x];
            let ax = xs.unsigned_abs() as i64;
            let ay = (ys.unsigned_abs() as i64) << SHIFT;
            let tg22 = ax * TAN_22_5;
            let maximum = if ay < tg22 {
                m > mag[i - 1] && m >= mag[i + 1]
            } else if ay > tg22 + (ax << (SHIFT + 1)) {
                m > mag[i - pw] && m >= mag[i + pw]
            } else {
                // The diagonal the gradient points along: up-left to down-right when dx and dy
                // have the same sign (y grows downwards).
                let (up, down) = if (xs ^ ys) < 0 { (i - pw + 1, i + pw - 1) } else { (i - pw - 1, i + pw + 1) };
                m > mag[up] && m > mag[down]
            };
            if maximum {
                if m > high {
                    map[i] = 2;
                    stack.push(i);
                } else {
                    map[i] = 0;
                }
            }
        }
    }
    while let Some(i) = stack.pop() {
        for n in [i - pw - 1, i - pw, i - pw + 1, i - 1, i + 1, i + pw - 1, i + pw, i + pw + 1] {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        out.extend(map[(y + 1) * pw + 1..(y + 1) * pw + 1 + width].iter().map(|&v| if v == 2 { 255 } else { 0 }));
    }
    Ok(out)
}

/// The edge map of a user's image as `cv2.Canny(np.array(load_image(path)), low, high)`: on its
/// RGB pixels (PIL's `convert("RGB")`), as a gray image.
pub fn canny_image(img: &InputImage, p: CannyParams) -> Result<InputImage> {
    let edges = canny(&img.rgb8(), img.width, img.height, 3, p)?;
    InputImage::new(img.width, img.height, Channels::Gray, false, edges.into_iter().map(u16::from).collect())
}

/// Parses `LOW,HIGH` (as `cv2.Canny`'s two thresholds), optionally followed by `,l2`.
pub fn parse_canny_thresholds(spec: &str) -> Result<CannyParams> {
    let bad = || Error::Input(format!("canny thresholds `{spec}`: expected LOW,HIGH (two numbers, e.g. 100,200), optionally followed by ,l2"));
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let (nums, l2) = match parts.as_slice() {
        [a, b] => ([*a, *b], false),
        [a, b, "l2"] => ([*a, *b], true),
        _ => return Err(bad()),
    };
    let [low, high] = nums.map(|s| s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0));
    match (low, high) {
        (Some(low), Some(high)) => Ok(CannyParams { low, high, l2_gradient: l2 }),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_edge_is_one_pixel_wide() {
        let (w, h) = (9, 7);
        let img: Vec<u8> = (0..w * h).map(|i| if i % w < 4 { 0 } else { 200 }).collect();
        let e = canny(&img, w, h, 1, CannyParams::default()).unwrap();
        for y in 0..h {
            let row: Vec<u8> = e[y * w..(y + 1) * w].to_vec();
            // dx is 800 at columns 3 and 4; the suppression keeps the left one (strict > left, >= right).
            assert_eq!(row, [0, 0, 0, 255, 0, 0, 0, 0, 0], "row {y}");
        }
    }

    #[test]
    fn weak_edges_survive_only_when_connected() {
        let (w, h) = (12, 12);
        // A vertical step of 40 (dx = 160) gives no strong edge for high = 200.
        let img: Vec<u8> = (0..w * h).map(|i| if i % w < 6 { 0 } else { 40 }).collect();
        assert!(canny(&img, w, h, 1, CannyParams { low: 100.0, high: 200.0, l2_gradient: false }).unwrap().iter().all(|&v| v == 0));
        assert!(canny(&img, w, h, 1, CannyParams { low: 100.0, high: 150.0, l2_gradient: false }).unwrap().contains(&255));
    }

    /// Pixel for pixel against OpenCV 4.12's cv2.Canny (scripts/preprocess_fixtures.py): colour
    /// and gray images, odd and degenerate sizes, swapped, fractional and zero thresholds, L2.
    #[test]
    fn matches_opencv() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let read = |p: &str| InputImage::from_png(&std::fs::read(format!("{dir}/{p}")).expect(p)).expect(p);
        let cases: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(format!("{dir}/edges/cases.json")).expect("cases.json")).expect("json");
        let mut failures = Vec::new();
        for c in &cases {
            let name = c["name"].as_str().expect("name");
            let img = read(c["input"].as_str().expect("input"));
            let p = CannyParams { low: c["low"].as_f64().expect("low"), high: c["high"].as_f64().expect("high"), l2_gradient: c["l2"].as_bool().expect("l2") };
            let got = if c["channels"] == "gray" { canny(&img.luma8(), img.width, img.height, 1, p).expect(name) } else { canny_image(&img, p).expect(name).luma8() };
            let want = read(&format!("edges/{}", c["output"].as_str().expect("output"))).luma8();
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            if got.len() != want.len() || diff > 0 {
                failures.push(format!("{name}: {diff} of {} pixels differ from OpenCV", want.len()));
            }
            assert_eq!(want.iter().filter(|&&v| v == 255).count() as u64, c["edge_pixels"].as_u64().expect("count"), "{name}");
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert_eq!(cases.len(), 19);
    }

    #[test]
    fn bad_sizes_and_thresholds_are_refused() {
        assert!(canny(&[0; 5], 2, 2, 1, CannyParams::default()).is_err());
        assert!(canny(&[0; 4], 2, 2, 1, CannyParams { low: f64::NAN, ..Default::default() }).is_err());
        assert_eq!(parse_canny_thresholds("50, 150").unwrap(), CannyParams { low: 50.0, high: 150.0, l2_gradient: false });
        assert!(parse_canny_thresholds("50,150,l2").unwrap().l2_gradient);
        for bad in ["", "50", "a,b", "1,2,3", "-1,5", "inf,2"] {
            assert!(parse_canny_thresholds(bad).is_err(), "{bad}");
        }
    }
}
