//! Element types: one table row per dtype (ggml style), so adding a type is adding a row.

use half::f16;

/// Storage type of a tensor's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    /// 32 signed bytes and one f16 scale per block (ggml's q8_0).
    Q8_0 = 2,
    /// 32 4-bit values and one f16 scale per block (ggml's q4_0).
    Q4_0 = 3,
}

/// What the engine needs to know about a dtype.
pub struct DTypeInfo {
    pub name: &'static str,
    /// Elements per block (1 for plain floats).
    pub block_size: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// WGSL scalar type for activations stored in this dtype, if kernels can store it.
    pub wgsl: Option<&'static str>,
    /// Whether WGSL needs `enable f16;` to read it.
    pub needs_shader_f16: bool,
    /// Decodes whole blocks into f32 (CPU reference and readback).
    pub dequantise: fn(&[u8], &mut [f32]),
}

const TABLE: [DTypeInfo; 4] = [
    DTypeInfo { name: "f32", block_size: 1, block_bytes: 4, wgsl: Some("f32"), needs_shader_f16: false, dequantise: dequantise_f32 },
    DTypeInfo { name: "f16", block_size: 1, block_bytes: 2, wgsl: Some("f16"), needs_shader_f16: true, dequantise: dequantise_f16 },
    DTypeInfo { name: "q8_0", block_size: 32, block_bytes: 34, wgsl: None, needs_shader_f16: false, dequantise: dequantise_q8_0 },
    DTypeInfo { name: "q4_0", block_size: 32, block_bytes: 18, wgsl: None, needs_shader_f16: false, dequantise: dequantise_q4_0 },
];

impl DType {
    /// This dtype's table row.
    pub fn info(self) -> &'static DTypeInfo {
        &TABLE[self as usize]
    }
    /// Short name as used in file formats and reports.
    pub fn name(self) -> &'static str {
        self.info().name
    }
    /// Bytes needed for `n` elements (rounded up to whole blocks).
    pub fn bytes_for(self, n: usize) -> usize {
        let i = self.info();
        n.div_ceil(i.block_size) * i.block_bytes
    }
    /// Encodes f32 values into this dtype's bytes (round to nearest for floats).
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            DType::Q8_0 => quantise_blocks(data, 34, |b, out| {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                for (o, v) in out[2..].iter_mut().zip(b) {
                    *o = ((v * id).round() as i8) as u8;
                }
            }),
            DType::Q4_0 => quantise_blocks(data, 18, |b, out| {
                // Scale from the value of largest magnitude, signed, so it maps exactly to -8.
                let max = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    out[2 + j] = q(b[j]) | (q(b[j + 16]) << 4);
                }
            }),
        }
    }
    /// Decodes `n` elements of this dtype from bytes.
    pub fn decode(self, bytes: &[u8], n: usize) -> Vec<f32> {
        let i = self.info();
        let blocks = n.div_ceil(i.block_size);
        let mut out = vec![0f32; blocks * i.block_size];
        (i.dequantise)(&bytes[..blocks * i.block_bytes], &mut out);
        out.truncate(n);
        out
    }
}

fn quantise_blocks(data: &[f32], block_bytes: usize, f: impl Fn(&[f32; 32], &mut [u8])) -> Vec<u8> {
    let mut out = vec![0u8; data.len().div_ceil(32) * block_bytes];
    for (chunk, o) in data.chunks(32).zip(out.chunks_mut(block_bytes)) {
        let mut b = [0f32; 32];
        b[..chunk.len()].copy_from_slice(chunk);
        f(&b, o);
    }
    out
}

fn dequantise_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}
fn dequantise_f16(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}
fn dequantise_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (v, &q) in o.iter_mut().zip(&b[2..]) {
            *v = q as i8 as f32 * d;
        }
    }
}
fn dequantise_q4_0(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for j in 0..16 {
            o[j] = ((b[2 + j] & 15) as i32 - 8) as f32 * d;
            o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_each_dtypes_precision() {
        let data: Vec<f32> = (0..77).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let amax = data.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (dt, tol) in [(DType::F32, 0.0), (DType::F16, 2e-3), (DType::Q8_0, amax / 127.0), (DType::Q4_0, amax / 8.0)] {
            let bytes = dt.encode(&data);
            assert_eq!(bytes.len(), dt.bytes_for(data.len()), "{}", dt.name());
            let back = dt.decode(&bytes, data.len());
            for (a, b) in data.iter().zip(&back) {
                assert!((a - b).abs() <= tol * a.abs().max(1.0), "{}: {a} vs {b}", dt.name());
            }
        }
    }
}
