//! Images a user gives (init images, masks, depth maps, condition images): decoded, converted,
//! resized and normalised as diffusers' `VaeImageProcessor` does it with PIL, so the same file
//! gives diffusers' tensor.
//!
//! PIL's arithmetic is reproduced, not approximated: `convert("RGB")` / `convert("L")` (ITU-R
//! 601 luma in 16.16 fixed point), `Image.resize` (separable filters with PIL's support, kernel
//! normalisation and 22-bit fixed-point accumulation, horizontal pass first) and `GaussianBlur`
//! (three extended box blurs). Decoding PNG is done here (8- and 16-bit, any colour type), so
//! the page and the CLI read a file the same way; other formats arrive as RGBA8 from the
//! browser or the `image` crate.

use crate::error::{Error, Result};

/// The channels of a decoded image, as PIL's modes `L`, `LA`, `RGB`, `RGBA`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channels {
    Gray,
    GrayAlpha,
    Rgb,
    Rgba,
}

impl Channels {
    /// Values per pixel.
    pub fn count(self) -> usize {
        match self {
            Channels::Gray => 1,
            Channels::GrayAlpha => 2,
            Channels::Rgb => 3,
            Channels::Rgba => 4,
        }
    }
}

/// A decoded image: `width * height * channels` values, 8- or 16-bit.
#[derive(Clone, Debug)]
pub struct InputImage {
    pub width: usize,
    pub height: usize,
    pub channels: Channels,
    pub sixteen_bit: bool,
    pub data: Vec<u16>,
}

/// The largest side accepted, in pixels (larger images are refused before any allocation).
pub const MAX_SIDE: usize = 16384;

impl InputImage {
    /// An image from its values, checked.
    pub fn new(width: usize, height: usize, channels: Channels, sixteen_bit: bool, data: Vec<u16>) -> Result<Self> {
        check_size(width, height)?;
        if data.len() != width * height * channels.count() {
            return Err(Error::Input(format!("image data has {} values, a {width}x{height} {channels:?} image has {}", data.len(), width * height * channels.count())));
        }
        Ok(Self { width, height, channels, sixteen_bit, data })
    }

    /// RGBA8 pixels, as a browser canvas gives them.
    pub fn from_rgba8(width: usize, height: usize, rgba: &[u8]) -> Result<Self> {
        Self::new(width, height, Channels::Rgba, false, rgba.iter().map(|&v| v as u16).collect())
    }

    /// Decodes a PNG file (any bit depth and colour type; palettes expanded, as PIL shows them).
    pub fn from_png(bytes: &[u8]) -> Result<Self> {
        let bad = |e: png::DecodingError| Error::Input(format!("cannot read the PNG image: {e}"));
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND);
        let header = decoder.read_header_info().map_err(bad)?;
        check_size(header.width as usize, header.height as usize)?;
        let mut reader = decoder.read_info().map_err(bad)?;
        let size = reader.output_buffer_size().ok_or_else(|| Error::Input("the PNG image is too large".into()))?;
        let mut buf = vec![0u8; size];
        let orientation = reader.info().exif_metadata.as_deref().and_then(exif_orientation).unwrap_or(1);
        let info = reader.next_frame(&mut buf).map_err(bad)?;
        let channels = match info.color_type {
            png::ColorType::Grayscale => Channels::Gray,
            png::ColorType::GrayscaleAlpha => Channels::GrayAlpha,
            png::ColorType::Rgb => Channels::Rgb,
            png::ColorType::Rgba => Channels::Rgba,
            png::ColorType::Indexed => return Err(Error::Input("the PNG palette could not be expanded".into())),
        };
        let (w, h) = (info.width as usize, info.height as usize);
        let row = w * channels.count();
        let sixteen_bit = info.bit_depth == png::BitDepth::Sixteen;
        let mut data = Vec::with_capacity(row * h);
        for y in 0..h {
            let line = &buf[y * info.line_size..];
            if sixteen_bit {
                data.extend((0..row).map(|i| u16::from_be_bytes([line[2 * i], line[2 * i + 1]])));
            } else {
                data.extend(line[..row].iter().map(|&v| v as u16));
            }
        }
        Ok(Self::new(w, h, channels, sixteen_bit, data)?.apply_exif_orientation(orientation))
    }

    /// The image turned upright as its EXIF orientation (1 to 8) says, as PIL's
    /// `ImageOps.exif_transpose` does in diffusers' `load_image`.
    pub fn apply_exif_orientation(self, orientation: u8) -> Self {
        let (w, h, n) = (self.width, self.height, self.channels.count());
        // The source pixel of output (x, y), and the output's size.
        let (ow, oh, src): (usize, usize, &dyn Fn(usize, usize) -> (usize, usize)) = match orientation {
            2 => (w, h, &|x, y| (w - 1 - x, y)),
            3 => (w, h, &|x, y| (w - 1 - x, h - 1 - y)),
            4 => (w, h, &|x, y| (x, h - 1 - y)),
            5 => (h, w, &|x, y| (y, x)),
            6 => (h, w, &|x, y| (y, h - 1 - x)),
            7 => (h, w, &|x, y| (w - 1 - y, h - 1 - x)),
            8 => (h, w, &|x, y| (w - 1 - y, x)),
            _ => return self,
        };
        let mut data = Vec::with_capacity(self.data.len());
        for y in 0..oh {
            for x in 0..ow {
                let (sx, sy) = src(x, y);
                data.extend_from_slice(&self.data[(sy * w + sx) * n..(sy * w + sx + 1) * n]);
            }
        }
        Self { width: ow, height: oh, data, ..self }
    }

    /// 8-bit values as PIL gives them: it opens 16-bit colour (and gray + alpha) PNGs as 8-bit
    /// by their high byte, but a 16-bit gray PNG as `I;16`, which `convert("RGB")` and
    /// `convert("L")` clip to 255.
    fn value8(&self, v: u16) -> u8 {
        match (self.sixteen_bit, self.channels) {
            (false, _) => v as u8,
            (true, Channels::Gray) => v.min(255) as u8,
            (true, _) => (v >> 8) as u8,
        }
    }

    /// RGB8 pixels as PIL's `convert("RGB")`: gray repeated, alpha dropped (not composited).
    pub fn rgb8(&self) -> Vec<u8> {
        let n = self.channels.count();
        let mut out = Vec::with_capacity(self.width * self.height * 3);
        for px in self.data.chunks_exact(n) {
            match self.channels {
                Channels::Gray | Channels::GrayAlpha => out.extend([self.value8(px[0]); 3]),
                Channels::Rgb | Channels::Rgba => out.extend(px[..3].iter().map(|&v| self.value8(v))),
            }
        }
        out
    }

    /// Gray8 pixels as PIL's `convert("L")`: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
    pub fn luma8(&self) -> Vec<u8> {
        let n = self.channels.count();
        self.data
            .chunks_exact(n)
            .map(|px| match self.channels {
                Channels::Gray | Channels::GrayAlpha => self.value8(px[0]),
                Channels::Rgb | Channels::Rgba => {
                    let [r, g, b] = [px[0], px[1], px[2]].map(|v| self.value8(v) as u32);
                    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
                }
            })
            .collect()
    }

    /// Gray values at full precision (a 16-bit gray PNG's raw values, as `np.asarray` of PIL's
    /// `I;16` image), colour images as their 8-bit luma: what a depth map is read as.
    pub fn gray_values(&self) -> Vec<f32> {
        match self.channels {
            Channels::Gray | Channels::GrayAlpha => self.data.iter().step_by(self.channels.count()).map(|&v| v as f32).collect(),
            Channels::Rgb | Channels::Rgba => self.luma8().into_iter().map(|v| v as f32).collect(),
        }
    }
}

/// The orientation tag (0x0112) of an EXIF block (a TIFF header and its first directory).
pub fn exif_orientation(exif: &[u8]) -> Option<u8> {
    let exif = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let big = match exif.get(..4)? {
        b"MM\0*" => true,
        b"II*\0" => false,
        _ => return None,
    };
    let u16_at = |i: usize| exif.get(i..i + 2).map(|b| if big { u16::from_be_bytes([b[0], b[1]]) } else { u16::from_le_bytes([b[0], b[1]]) });
    let u32_at = |i: usize| exif.get(i..i + 4).map(|b| if big { u32::from_be_bytes([b[0], b[1], b[2], b[3]]) } else { u32::from_le_bytes([b[0], b[1], b[2], b[3]]) });
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    (0..count.min(512)).find_map(|i| {
        let e = ifd + 2 + 12 * i;
        (u16_at(e)? == 0x0112).then(|| u16_at(e + 8)).flatten().filter(|o| (1..=8).contains(o)).map(|o| o as u8)
    })
}

fn check_size(width: usize, height: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::Input(format!("the image is empty ({width}x{height})")));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::Input(format!("the image is {width}x{height}; images up to {MAX_SIDE} pixels per side are accepted")));
    }
    Ok(())
}

/// PIL's resampling filters (`Image.Resampling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    Bilinear,
    Bicubic,
    Lanczos,
}

impl Resample {
    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }
    fn weight(self, x: f64) -> f64 {
        match self {
            Resample::Bilinear => (1.0 - x.abs()).max(0.0),
            Resample::Bicubic => {
                // PIL's cubic with a = -0.5.
                let (a, x) = (-0.5, x.abs());
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// PIL's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output position's source range and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size -> out_size`.
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let weights = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 }
                })
                .collect();
            Taps { first: xmin, weights }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize((out_w, out_h), filter)` of 8-bit `channels`-channel pixels (no
/// `reducing_gap`, as diffusers calls it). Images with alpha must be premultiplied first, as PIL
/// does; the pipelines only resize RGB and gray images.
///
/// Bit-exact with Pillow 13 when it runs the horizontal pass first, which it does for most
/// shapes; for some that get wider and shorter at once (30x20 to 47x9) it runs the vertical
/// pass first, by a rule not reproduced here, and single values can then differ by one.
pub fn resize_u8(src: &[u8], w: usize, h: usize, channels: usize, out_w: usize, out_h: usize, filter: Resample) -> Vec<u8> {
    let mut img = src.to_vec();
    let (mut cur_w, cur_h) = (w, h);
    let vert = coefficients(h, out_h, filter);
    if out_w != w {
        // Only the rows the vertical pass reads are resampled horizontally.
        let first = vert.first().map_or(0, |t| t.first);
        let last = vert.last().map_or(h, |t| t.first + t.weights.len());
        let horiz = coefficients(w, out_w, filter);
        let mut out = vec![0u8; out_w * (last - first) * channels];
        for y in first..last {
            for (x, t) in horiz.iter().enumerate() {
                for c in 0..channels {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (k, &wt) in t.weights.iter().enumerate() {
                        acc += img[(y * cur_w + t.first + k) * channels + c] as i64 * wt as i64;
                    }
                    out[((y - first) * out_w + x) * channels + c] = clip8(acc);
                }
            }
        }
        img = out;
        cur_w = out_w;
        if out_h == cur_h {
            return img;
        }
        return vertical(&img, cur_w, channels, out_h, &vert, first);
    }
    if out_h != cur_h {
        return vertical(&img, cur_w, channels, out_h, &vert, 0);
    }
    img
}

fn vertical(img: &[u8], w: usize, channels: usize, out_h: usize, taps: &[Taps], row0: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * out_h * channels];
    for (y, t) in taps.iter().enumerate() {
        for x in 0..w {
            for c in 0..channels {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (k, &wt) in t.weights.iter().enumerate() {
                    acc += img[((t.first - row0 + k) * w + x) * channels + c] as i64 * wt as i64;
                }
                out[(y * w + x) * channels + c] = clip8(acc);
            }
        }
    }
    out
}

/// PIL's `ImageFilter.GaussianBlur(radius)` of 8-bit pixels: three box blurs per axis whose
/// (fractional) radius gives the Gaussian's variance, edges extended.
pub fn gaussian_blur_u8(src: &[u8], w: usize, h: usize, channels: usize, radius: f32) -> Vec<u8> {
    if radius <= 0.0 {
        return src.to_vec();
    }
    let passes = 3;
    let sigma2 = radius * radius / passes as f32;
    let l_len = (12.0 * sigma2 + 1.0).sqrt();
    let l = ((l_len - 1.0) / 2.0).floor();
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    let box_radius = l + a;
    let mut img = src.to_vec();
    // Horizontal passes, then vertical ones (PIL transposes between them).
    for _ in 0..passes {
        img = box_blur_rows(&img, w, h, channels, box_radius);
    }
    let mut t = transpose(&img, w, h, channels);
    for _ in 0..passes {
        t = box_blur_rows(&t, h, w, channels, box_radius);
    }
    transpose(&t, h, w, channels)
}

fn transpose(img: &[u8], w: usize, h: usize, channels: usize) -> Vec<u8> {
    let mut out = vec![0u8; img.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..channels {
                out[(x * h + y) * channels + c] = img[(y * w + x) * channels + c];
            }
        }
    }
    out
}

/// PIL's `ImagingLineBoxBlur` on every row: a running sum over `2r + 1` pixels (the fractional
/// part of `r` weighting the two outer pixels), 24-bit fixed point, edges extended.
fn box_blur_rows(img: &[u8], w: usize, h: usize, channels: usize, radius: f32) -> Vec<u8> {
    let r = radius as usize;
    let ww: u32 = ((1u32 << 24) as f32 / (radius * 2.0 + 1.0)) as u32;
    let fw: u32 = ((1u32 << 24) - (r as u32 * 2 + 1) * ww) / 2;
    let last = w as i64 - 1;
    let mut out = vec![0u8; img.len()];
    for y in 0..h {
        let row = &img[y * w * channels..(y + 1) * w * channels];
        let px = |x: i64, c: usize| row[(x.clamp(0, last) as usize) * channels + c] as u32;
        for c in 0..channels {
            // The sum of the window's full pixels, then slid one pixel at a time.
            let mut acc: u32 = (-(r as i64)..=r as i64).map(|x| px(x, c)).sum();
            for x in 0..w as i64 {
                let bulk = acc * ww + (px(x - r as i64 - 1, c) + px(x + r as i64 + 1, c)) * fw;
                out[(y * w + x as usize) * channels + c] = ((bulk + (1 << 23)) >> 24) as u8;
                acc = acc + px(x + r as i64 + 1, c) - px(x - r as i64, c);
            }
        }
    }
    out
}

/// diffusers' `get_default_height_width`: the image's size unless given, rounded down to a
/// multiple of `factor`.
pub fn default_size(img: &InputImage, width: Option<usize>, height: Option<usize>, factor: usize) -> (usize, usize) {
    let (w, h) = (width.unwrap_or(img.width), height.unwrap_or(img.height));
    (w - w % factor.max(1), h - h % factor.max(1))
}

/// An image as diffusers' `VaeImageProcessor.preprocess` gives it for RGB models: converted to
/// RGB, resized to `width x height` (Lanczos, skipped at the same size), `[3, H, W]` in
/// `[-1, 1]` when `normalize` (init images) or `[0, 1]` (ControlNet condition images).
pub fn rgb_tensor(img: &InputImage, width: usize, height: usize, normalize: bool) -> Vec<f32> {
    rgb_tensor_resampled(img, width, height, normalize, Resample::Lanczos)
}

/// [`rgb_tensor`] with another resampling filter (the x4 upscaler's processor uses bicubic).
pub fn rgb_tensor_resampled(img: &InputImage, width: usize, height: usize, normalize: bool, filter: Resample) -> Vec<f32> {
    let rgb = img.rgb8();
    let rgb = if (img.width, img.height) == (width, height) { rgb } else { resize_u8(&rgb, img.width, img.height, 3, width, height, filter) };
    let mut out = vec![0f32; 3 * width * height];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = px[c] as f32 / 255.0;
            out[c * width * height + i] = if normalize { 2.0 * v - 1.0 } else { v };
        }
    }
    out
}

/// A mask as diffusers' inpainting `mask_processor` gives it: gray, optionally blurred
/// (`mask_processor.blur(mask, blur_factor)`), resized (Lanczos), then binarised at 0.5:
/// `[H, W]` of 0 (keep) and 1 (repaint).
pub fn mask_tensor(img: &InputImage, width: usize, height: usize, blur: f32) -> Vec<f32> {
    let gray = img.luma8();
    let gray = gaussian_blur_u8(&gray, img.width, img.height, 1, blur);
    let gray = if (img.width, img.height) == (width, height) { gray } else { resize_u8(&gray, img.width, img.height, 1, width, height, Resample::Lanczos) };
    gray.iter().map(|&v| if v as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_resize_is_identity_and_constant_images_stay_constant() {
        let src: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_u8(&src, 7, 5, 3, 7, 5, Resample::Lanczos), src);
        let flat = vec![200u8; 13 * 9];
        for f in [Resample::Bilinear, Resample::Bicubic, Resample::Lanczos] {
            assert!(resize_u8(&flat, 13, 9, 1, 5, 17, f).iter().all(|&v| v == 200), "{f:?}");
        }
        assert!(gaussian_blur_u8(&flat, 13, 9, 1, 4.0).iter().all(|&v| v == 200));
    }

    #[test]
    fn png_decoding_reads_every_depth_and_layout() {
        let encode = |color: png::ColorType, depth: png::BitDepth, w: u32, h: u32, data: &[u8]| {
            let mut out = Vec::new();
            {
                let mut enc = png::Encoder::new(&mut out, w, h);
                enc.set_color(color);
                enc.set_depth(depth);
                enc.write_header().expect("header").write_image_data(data).expect("data");
            }
            out
        };
        let gray16 = encode(png::ColorType::Grayscale, png::BitDepth::Sixteen, 2, 1, &[0x12, 0x34, 0xff, 0xfe]);
        let img = InputImage::from_png(&gray16).expect("16-bit gray");
        assert_eq!((img.channels, img.sixteen_bit, img.gray_values()), (Channels::Gray, true, vec![4660.0, 65534.0]));
        // Pillow 13 opens it as I;16 and clips to 8 bits; 16-bit gray + alpha keeps the high byte.
        assert_eq!(img.rgb8(), vec![0xff; 6]);
        let gray16 = encode(png::ColorType::Grayscale, png::BitDepth::Sixteen, 2, 1, &[0x00, 0x64, 0x01, 0x2c]);
        assert_eq!(InputImage::from_png(&gray16).expect("16-bit gray").luma8(), vec![100, 255]);
        let la16 = encode(png::ColorType::GrayscaleAlpha, png::BitDepth::Sixteen, 1, 1, &[0x12, 0x34, 0xff, 0xff]);
        assert_eq!(InputImage::from_png(&la16).expect("16-bit gray + alpha").rgb8(), vec![0x12; 3]);
        let rgba = encode(png::ColorType::Rgba, png::BitDepth::Eight, 1, 1, &[255, 0, 0, 7]);
        let img = InputImage::from_png(&rgba).expect("RGBA");
        assert_eq!((img.rgb8(), img.luma8()), (vec![255, 0, 0], vec![76]));
        assert!(matches!(InputImage::from_png(b"not a png"), Err(Error::Input(_))));
    }

    /// PIL's exif_transpose of a 3x2 image for every orientation (values written out by hand
    /// from PIL's transposes: 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE,
    /// 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90), and the tag read from both byte orders.
    #[test]
    fn exif_orientation_turns_images_upright() {
        // a b c
        // d e f
        let img = InputImage::new(3, 2, Channels::Gray, false, (1..=6).collect()).unwrap();
        let want: [(usize, Vec<u16>); 8] = [
            (3, vec![1, 2, 3, 4, 5, 6]),
            (3, vec![3, 2, 1, 6, 5, 4]),
            (3, vec![6, 5, 4, 3, 2, 1]),
            (3, vec![4, 5, 6, 1, 2, 3]),
            (2, vec![1, 4, 2, 5, 3, 6]),
            (2, vec![4, 1, 5, 2, 6, 3]),
            (2, vec![6, 3, 5, 2, 4, 1]),
            (2, vec![3, 6, 2, 5, 1, 4]),
        ];
        for (o, (w, data)) in want.iter().enumerate() {
            let t = img.clone().apply_exif_orientation(o as u8 + 1);
            assert_eq!((t.width, &t.data), (*w, data), "orientation {}", o + 1);
        }
        let tiff = |big: bool, o: u16| -> Vec<u8> {
            let (h16, h32): (fn(u16) -> [u8; 2], fn(u32) -> [u8; 4]) = if big { (u16::to_be_bytes, u32::to_be_bytes) } else { (u16::to_le_bytes, u32::to_le_bytes) };
            let mut v = if big { b"MM\0*".to_vec() } else { b"II*\0".to_vec() };
            v.extend(h32(8));
            v.extend(h16(2));
            v.extend(h16(0x010f).iter().chain(&h16(2)).chain(&h32(1)).chain(&h32(0)));
            v.extend(h16(0x0112).iter().chain(&h16(3)).chain(&h32(1)).chain(&h16(o)).chain(&[0, 0]));
            v
        };
        assert_eq!(exif_orientation(&tiff(true, 6)), Some(6));
        assert_eq!(exif_orientation(&tiff(false, 8)), Some(8));
        assert_eq!(exif_orientation(&tiff(false, 9)), None);
        assert_eq!(exif_orientation(b"junk"), None);
        assert_eq!(exif_orientation(&tiff(false, 3)[..20]), None);
    }

    /// Every tensor of a safetensors file of U8 tensors, by name: (shape, bytes).
    fn u8_tensors(path: &str) -> std::collections::HashMap<String, (Vec<usize>, Vec<u8>)> {
        let bytes = std::fs::read(path).expect(path);
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
        let data = &bytes[8 + n..];
        header
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, v)| {
                assert_eq!(v["dtype"], "U8", "{k}");
                let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).expect("shape");
                let [a, b]: [usize; 2] = serde_json::from_value(v["data_offsets"].clone()).expect("offsets");
                (k.clone(), (shape, data[a..b].to_vec()))
            })
            .collect()
    }

    /// Bit-exact against Pillow 13 (scripts/pil_fixtures.py): resizes with every filter, up,
    /// down and mixed, one axis only; Gaussian blurs; RGB(A) to L.
    #[test]
    fn matches_pil() {
        let t = u8_tensors(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ref/pil_images.safetensors"));
        let (mut checked, mut failures) = (0, Vec::new());
        for (name, (shape, input)) in t.iter().filter(|(k, _)| k.ends_with(".in")) {
            let case = name.trim_end_matches(".in");
            let (out_shape, want) = &t[&format!("{case}.out")];
            let (h, w, c) = (shape[0], shape[1], shape.get(2).copied().unwrap_or(1));
            let got = if let Some(radius) = case.strip_prefix("l_blur_") {
                gaussian_blur_u8(input, w, h, c, radius.parse().expect("radius"))
            } else if case.ends_with("_to_l") {
                let ch = if c == 4 { Channels::Rgba } else { Channels::Rgb };
                InputImage::new(w, h, ch, false, input.iter().map(|&v| v as u16).collect()).expect("image").luma8()
            } else {
                let filter = if case.contains("lanczos") { Resample::Lanczos } else if case.contains("bicubic") { Resample::Bicubic } else { Resample::Bilinear };
                resize_u8(input, w, h, c, out_shape[1], out_shape[0], filter)
            };
            let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
            if got.len() != want.len() || diff != 0 {
                failures.push(format!("{case}: {diff} of {} values differ from PIL", want.len()));
            }
            checked += 1;
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert_eq!(checked, 13);
    }
}

