//! Element types: one table row per dtype (ggml style), so adding a type is adding a row.
//!
//! Block-quantised types hold a weight matrix `[rows, K]` (a tensor's first dimension by the rest,
//! so a convolution `[Cout, Cin, KH, KW]` is `Cout x Cin*KH*KW`) as blocks of 32 consecutive values
//! along K, each row padded with zeros to whole blocks. Bytes are stored split rather than
//! interleaved as in ggml: first every block's packed values, then every block's f16 scale, then
//! (q4_1, q5_1) every block's f16 minimum. Each region starts on a 4-byte boundary, so a kernel reads
//! all of it as aligned `u32` words (a 34-byte interleaved q8_0 block is not word aligned).
//! Plain floats are the one-element-per-block case of the same layout: one region, no scales.

use half::f16;

use crate::error::{Error, Result};

/// Storage type of a tensor's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    /// Blocks of 32 signed bytes q and an f16 scale d: x = q d (ggml's q8_0).
    Q8_0 = 2,
    /// Blocks of 32 4-bit q and an f16 scale d: x = (q - 8) d (ggml's q4_0).
    Q4_0 = 3,
    /// Blocks of 32 4-bit q, an f16 scale d and minimum m: x = q d + m (ggml's q4_1).
    Q4_1 = 4,
    /// Blocks of 32 5-bit q and an f16 scale d: x = (q - 16) d (ggml's q5_0).
    Q5_0 = 5,
    /// Blocks of 32 5-bit q, an f16 scale d and minimum m: x = q d + m (ggml's q5_1).
    Q5_1 = 6,
}

/// What the engine needs to know about a dtype.
pub struct DTypeInfo {
    pub name: &'static str,
    /// Elements per block (1 for plain floats).
    pub block_size: usize,
    /// Bytes per block, all regions together.
    pub block_bytes: usize,
    /// Bytes of packed values per block (the rest of `block_bytes` are f16 parameters).
    pub value_bytes: usize,
    /// f16 parameters per block: 0 (floats), 1 (scale) or 2 (scale and minimum).
    pub params: usize,
    /// WGSL scalar type for activations stored in this dtype, if kernels can store it.
    pub wgsl: Option<&'static str>,
    /// Whether WGSL needs `enable f16;` to read it.
    pub needs_shader_f16: bool,
    /// Which dequantiser of shaders/quant.wgsl reads it (0: not a quantised type).
    pub wgsl_quant: u32,
    /// The integer codes of a block-quantised type (`None` for floats).
    pub codes: Option<BlockCodes>,
    /// Encodes one block of `block_size` values into its packed bytes and f16 parameters.
    encode_block: fn(&[f32], &mut [u8], &mut [f16]),
    /// Decodes one block from its packed bytes and parameters.
    decode_block: fn(&[u8], &[f16], &mut [f32]),
}

/// A block type's codes: code c in `min..=max` stands for `(c - zero) d + m` (m = 0 for the `_0`
/// types), packed into a block's value bytes by `pack`. Calibrated encoders search d and m over
/// these and write blocks through [`DType::encode_with_params`].
#[derive(Clone, Copy, Debug)]
pub struct BlockCodes {
    pub min: i32,
    pub max: i32,
    pub zero: i32,
    /// Whether the block has a minimum m (the `_1` types).
    pub has_min: bool,
    pack: fn(&[i32], &mut [u8]),
}

const Q8_CODES: BlockCodes = BlockCodes { min: -127, max: 127, zero: 0, has_min: false, pack: pack_q8 };
const Q4_0_CODES: BlockCodes = BlockCodes { min: 0, max: 15, zero: 8, has_min: false, pack: pack_codes::<4> };
const Q4_1_CODES: BlockCodes = BlockCodes { min: 0, max: 15, zero: 0, has_min: true, pack: pack_codes::<4> };
const Q5_0_CODES: BlockCodes = BlockCodes { min: 0, max: 31, zero: 16, has_min: false, pack: pack_codes::<5> };
const Q5_1_CODES: BlockCodes = BlockCodes { min: 0, max: 31, zero: 0, has_min: true, pack: pack_codes::<5> };

impl BlockCodes {
    /// The code of value `x` with scale `d` (its inverse `id`) and minimum `m`, as the encoders
    /// round it.
    pub fn code(&self, x: f32, id: f32, m: f32) -> i32 {
        ((x - m) * id + self.zero as f32).round().clamp(self.min as f32, self.max as f32) as i32
    }
    /// The value code `c` stands for.
    pub fn value(&self, c: i32, d: f32, m: f32) -> f32 {
        ((c - self.zero) as f32).mul_add(d, m)
    }
}

fn pack_q8(q: &[i32], out: &mut [u8]) {
    for (o, &c) in out.iter_mut().zip(q) {
        *o = c as i8 as u8;
    }
}
fn pack_codes<const BITS: u32>(q: &[i32], out: &mut [u8]) {
    pack_bits::<BITS>(out, |e| q[e] as u8);
}

const TABLE: [DTypeInfo; 7] = [
    DTypeInfo { name: "f32", block_size: 1, block_bytes: 4, value_bytes: 4, params: 0, wgsl: Some("f32"), needs_shader_f16: false, wgsl_quant: 0, codes: None, encode_block: encode_f32, decode_block: decode_f32 },
    DTypeInfo { name: "f16", block_size: 1, block_bytes: 2, value_bytes: 2, params: 0, wgsl: Some("f16"), needs_shader_f16: true, wgsl_quant: 0, codes: None, encode_block: encode_f16, decode_block: decode_f16 },
    DTypeInfo { name: "q8_0", block_size: 32, block_bytes: 34, value_bytes: 32, params: 1, wgsl: None, needs_shader_f16: false, wgsl_quant: 1, codes: Some(Q8_CODES), encode_block: encode_q8_0, decode_block: decode_q8_0 },
    DTypeInfo { name: "q4_0", block_size: 32, block_bytes: 18, value_bytes: 16, params: 1, wgsl: None, needs_shader_f16: false, wgsl_quant: 2, codes: Some(Q4_0_CODES), encode_block: encode_signed::<4>, decode_block: decode_signed::<4> },
    DTypeInfo { name: "q4_1", block_size: 32, block_bytes: 20, value_bytes: 16, params: 2, wgsl: None, needs_shader_f16: false, wgsl_quant: 3, codes: Some(Q4_1_CODES), encode_block: encode_min::<4>, decode_block: decode_min::<4> },
    DTypeInfo { name: "q5_0", block_size: 32, block_bytes: 22, value_bytes: 20, params: 1, wgsl: None, needs_shader_f16: false, wgsl_quant: 4, codes: Some(Q5_0_CODES), encode_block: encode_signed::<5>, decode_block: decode_signed::<5> },
    DTypeInfo { name: "q5_1", block_size: 32, block_bytes: 24, value_bytes: 20, params: 2, wgsl: None, needs_shader_f16: false, wgsl_quant: 5, codes: Some(Q5_1_CODES), encode_block: encode_min::<5>, decode_block: decode_min::<5> },
];

/// Where a tensor's regions lie in its bytes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Rows: the first dimension (1 for a scalar).
    pub rows: u64,
    /// Values per row.
    pub row_len: u64,
    /// Blocks per row, the last one zero padded.
    pub blocks_per_row: u64,
    /// Byte offset of each f16 parameter region (scales, then minimums).
    pub param_offsets: [u64; 2],
    /// Bytes in all, a multiple of 4 for quantised types.
    pub bytes: u64,
}

impl Layout {
    /// Blocks in all.
    pub fn blocks(&self) -> u64 {
        self.rows * self.blocks_per_row
    }
}

impl DType {
    /// Every dtype, in table order.
    pub const ALL: [DType; 7] = [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1];

    /// This dtype's table row.
    pub fn info(self) -> &'static DTypeInfo {
        &TABLE[self as usize]
    }
    /// Short name as used in file formats and reports.
    pub fn name(self) -> &'static str {
        self.info().name
    }
    /// The dtype called `name` (as in `--quant q8`; `q8`, `q5` and `q4` name q8_0, q5_0 and q4_0).
    pub fn from_name(name: &str) -> Option<DType> {
        let name = match name {
            "q8" => "q8_0",
            "q5" => "q5_0",
            "q4" => "q4_0",
            n => n,
        };
        DType::ALL.into_iter().find(|d| d.name() == name)
    }
    /// The quantised types' names, for messages (`q8_0, q4_0, ...`).
    pub fn quantised_names() -> String {
        DType::ALL.iter().filter(|d| d.is_quantised()).map(|d| d.name()).collect::<Vec<_>>().join(", ")
    }
    /// Whether this is a block-quantised type (only weights use these).
    pub fn is_quantised(self) -> bool {
        self.info().params > 0
    }
    /// The byte layout of a tensor of this dtype and shape; `None` if it overflows 64 bits.
    pub fn layout(self, shape: &[usize]) -> Option<Layout> {
        let i = self.info();
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
        let (rows, row_len) = match shape.first() {
            Some(&r) if r > 0 => (r as u64, numel / r as u64),
            Some(_) => (0, 0),
            None => (1, numel),
        };
        let bpr = row_len.div_ceil(i.block_size as u64);
        let blocks = rows.checked_mul(bpr)?;
        let values = blocks.checked_mul(i.value_bytes as u64)?;
        if i.params == 0 {
            return Some(Layout { rows, row_len, blocks_per_row: bpr, param_offsets: [values; 2], bytes: values });
        }
        let region = (blocks * 2).next_multiple_of(4);
        let first = values.next_multiple_of(4);
        let second = first + region;
        Some(Layout { rows, row_len, blocks_per_row: bpr, param_offsets: [first, second], bytes: first + region * i.params as u64 })
    }
    /// Bytes a tensor of this shape occupies (see [`DType::layout`]).
    pub fn bytes_for(self, shape: &[usize]) -> u64 {
        self.layout(shape).map_or(u64::MAX, |l| l.bytes)
    }
    /// Encodes f32 values of a tensor of `shape` into this dtype's bytes (round to nearest).
    pub fn encode(self, shape: &[usize], data: &[f32]) -> Vec<u8> {
        let i = self.info();
        let l = self.layout(shape).expect("a tensor that fits in memory");
        let (bs, bpr, row_len) = (i.block_size, l.blocks_per_row as usize, l.row_len as usize);
        let mut out = vec![0u8; l.bytes as usize];
        let (values, params) = out.split_at_mut(l.param_offsets[0] as usize);
        let mut p = vec![f16::ZERO; i.params * l.blocks() as usize];
        let mut block = vec![0f32; bs];
        for r in 0..l.rows as usize {
            for b in 0..bpr {
                let start = (r * row_len + b * bs).min(data.len());
                let end = (r * row_len + ((b + 1) * bs).min(row_len)).min(data.len());
                block.fill(0.0);
                block[..end - start].copy_from_slice(&data[start..end]);
                let blk = r * bpr + b;
                let mut bp = [f16::ZERO; 2];
                (i.encode_block)(&block, &mut values[blk * i.value_bytes..(blk + 1) * i.value_bytes], &mut bp[..i.params]);
                for (j, v) in bp[..i.params].iter().enumerate() {
                    p[j * l.blocks() as usize + blk] = *v;
                }
            }
        }
        let blocks = l.blocks() as usize;
        for j in 0..i.params {
            let off = (l.param_offsets[j] - l.param_offsets[0]) as usize;
            for (k, v) in p[j * blocks..(j + 1) * blocks].iter().enumerate() {
                params[off + 2 * k..off + 2 * k + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        out
    }
    /// Encodes a tensor of `shape` whose block `(row, block)` has the scale and minimum `params`
    /// gives it (`[d, m]`, m ignored by the `_0` types) instead of the default ones; the codes
    /// are rounded as [`BlockCodes::code`] does. For calibrated encoders.
    pub fn encode_with_params(self, shape: &[usize], data: &[f32], params: impl Fn(usize, usize, &[f32]) -> [f32; 2]) -> Vec<u8> {
        let i = self.info();
        let codes = i.codes.expect("a block-quantised type");
        let l = self.layout(shape).expect("a tensor that fits in memory");
        let (bs, bpr, row_len) = (i.block_size, l.blocks_per_row as usize, l.row_len as usize);
        let mut out = vec![0u8; l.bytes as usize];
        let mut block = vec![0f32; bs];
        let mut q = vec![0i32; bs];
        for r in 0..l.rows as usize {
            for b in 0..bpr {
                let start = r * row_len + b * bs;
                let n = bs.min(row_len - b * bs);
                block.fill(0.0);
                block[..n].copy_from_slice(&data[start..start + n]);
                let [d, m] = params(r, b, &block);
                let (d, id) = scale(d);
                let m = if codes.has_min { f16::from_f32(m) } else { f16::ZERO };
                for (c, &x) in q.iter_mut().zip(&block) {
                    *c = codes.code(x, id, m.to_f32());
                }
                let blk = r * bpr + b;
                (codes.pack)(&q, &mut out[blk * i.value_bytes..(blk + 1) * i.value_bytes]);
                let at = l.param_offsets[0] as usize + 2 * blk;
                out[at..at + 2].copy_from_slice(&d.to_le_bytes());
                if codes.has_min {
                    let at = l.param_offsets[1] as usize + 2 * blk;
                    out[at..at + 2].copy_from_slice(&m.to_le_bytes());
                }
            }
        }
        out
    }
    /// Decodes a tensor of `shape` from this dtype's bytes (row padding dropped).
    pub fn decode(self, shape: &[usize], bytes: &[u8]) -> Vec<f32> {
        let i = self.info();
        let l = self.layout(shape).expect("a tensor that fits in memory");
        let (bs, bpr, row_len) = (i.block_size, l.blocks_per_row as usize, l.row_len as usize);
        let mut out = vec![0f32; l.rows as usize * row_len];
        let mut block = vec![0f32; bs];
        for r in 0..l.rows as usize {
            for b in 0..bpr {
                let blk = r * bpr + b;
                let mut bp = [f16::ZERO; 2];
                for (j, v) in bp[..i.params].iter_mut().enumerate() {
                    let at = l.param_offsets[j] as usize + 2 * blk;
                    *v = f16::from_le_bytes([bytes[at], bytes[at + 1]]);
                }
                (i.decode_block)(&bytes[blk * i.value_bytes..(blk + 1) * i.value_bytes], &bp[..i.params], &mut block);
                let start = r * row_len + b * bs;
                let n = bs.min(row_len - b * bs);
                out[start..start + n].copy_from_slice(&block[..n]);
            }
        }
        out
    }
    /// A tensor's bytes cut into its regions: packed values, then each f16 parameter array
    /// (without the region padding).
    pub fn split<'b>(self, shape: &[usize], bytes: &'b [u8]) -> (&'b [u8], Vec<&'b [u8]>) {
        let i = self.info();
        let l = self.layout(shape).expect("a tensor that fits in memory");
        let values = &bytes[..(l.blocks() * i.value_bytes as u64) as usize];
        let params = (0..i.params).map(|j| &bytes[l.param_offsets[j] as usize..(l.param_offsets[j] + 2 * l.blocks()) as usize]).collect();
        (values, params)
    }
    /// The bytes of a tensor of `shape` from its regions (the inverse of [`DType::split`]);
    /// `what` names it when the regions do not match the shape.
    pub fn join(self, shape: &[usize], values: &[u8], params: &[&[u8]], what: &str) -> Result<Vec<u8>> {
        let i = self.info();
        let l = self.layout(shape).ok_or_else(|| Error::Model(format!("{what}: shape {shape:?} is too large")))?;
        let want_values = l.blocks() * i.value_bytes as u64;
        if values.len() as u64 != want_values {
            return Err(Error::Model(format!("{what}: {} bytes of packed {} values, but {shape:?} in blocks of {} needs {want_values} ({} rows of {} blocks)", values.len(), self.name(), i.block_size, l.rows, l.blocks_per_row)));
        }
        if params.len() != i.params {
            return Err(Error::Model(format!("{what}: {} has {} parameter arrays per block, {} given", self.name(), i.params, params.len())));
        }
        let mut out = vec![0u8; l.bytes as usize];
        out[..values.len()].copy_from_slice(values);
        for (j, p) in params.iter().enumerate() {
            if p.len() as u64 != 2 * l.blocks() {
                let kind = ["scales", "minimums"][j];
                return Err(Error::Model(format!("{what}: {} bytes of {kind}, but {} blocks need {} (one f16 each)", p.len(), l.blocks(), 2 * l.blocks())));
            }
            let at = l.param_offsets[j] as usize;
            out[at..at + p.len()].copy_from_slice(p);
        }
        Ok(out)
    }
    /// Rows `rows` of a tensor of `shape`, as a tensor of their own (exact, no re-quantising).
    pub fn select_rows(self, shape: &[usize], bytes: &[u8], rows: std::ops::Range<usize>) -> Vec<u8> {
        let i = self.info();
        let l = self.layout(shape).expect("a tensor that fits in memory");
        let (v, p) = self.split(shape, bytes);
        let mut sub = shape.to_vec();
        sub[0] = rows.len();
        let per = |unit: usize| (l.blocks_per_row as usize * unit * rows.start, l.blocks_per_row as usize * unit * rows.end);
        let (v0, v1) = per(i.value_bytes);
        let (p0, p1) = per(2);
        let params: Vec<&[u8]> = p.iter().map(|a| &a[p0..p1]).collect();
        self.join(&sub, &v[v0..v1], &params, "row selection").expect("rows of a valid tensor")
    }
    /// Tensors with equal row lengths stacked along their rows (fused projections), exactly.
    pub fn concat_rows(self, parts: &[(&[usize], &[u8])]) -> Vec<u8> {
        let i = self.info();
        let mut shape = parts[0].0.to_vec();
        shape[0] = parts.iter().map(|(s, _)| s[0]).sum();
        let mut values = Vec::new();
        let mut params = vec![Vec::new(); i.params];
        for (s, b) in parts {
            let (v, p) = self.split(s, b);
            values.extend_from_slice(v);
            for (acc, a) in params.iter_mut().zip(p) {
                acc.extend_from_slice(a);
            }
        }
        let params: Vec<&[u8]> = params.iter().map(Vec::as_slice).collect();
        self.join(&shape, &values, &params, "row concatenation").expect("parts of equal row length")
    }
    /// Checks that `bytes` hold a whole tensor of `shape` in this dtype; `what` names it.
    pub fn check_bytes(self, shape: &[usize], bytes: u64, what: &str) -> Result<()> {
        let want = self.bytes_for(shape);
        if bytes != want {
            return Err(Error::Model(format!("{what}: {bytes} bytes of {} data, but a {shape:?} tensor needs {want}", self.name())));
        }
        Ok(())
    }
}

fn encode_f32(v: &[f32], out: &mut [u8], _: &mut [f16]) {
    out.copy_from_slice(&v[0].to_le_bytes());
}
fn decode_f32(b: &[u8], _: &[f16], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}
fn encode_f16(v: &[f32], out: &mut [u8], _: &mut [f16]) {
    out.copy_from_slice(&f16::from_f32(v[0]).to_le_bytes());
}
fn decode_f16(b: &[u8], _: &[f16], out: &mut [f32]) {
    out[0] = f16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// The scale the stored (f16-rounded) value gives, and its inverse for quantising.
fn scale(d: f32) -> (f16, f32) {
    let d = f16::from_f32(d);
    let df = d.to_f32();
    (d, if df != 0.0 { 1.0 / df } else { 0.0 })
}

fn encode_q8_0(v: &[f32], out: &mut [u8], p: &mut [f16]) {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (d, id) = scale(amax / 127.0);
    p[0] = d;
    for (o, x) in out.iter_mut().zip(v) {
        *o = ((x * id).round().clamp(-127.0, 127.0) as i8) as u8;
    }
}
fn decode_q8_0(b: &[u8], p: &[f16], out: &mut [f32]) {
    let d = p[0].to_f32();
    for (o, &q) in out.iter_mut().zip(b) {
        *o = q as i8 as f32 * d;
    }
}

/// Packs 4-bit values two per byte, element 2j in the low nibble of byte j (so element e is bits
/// 4(e % 8) of word e / 8, as the kernels read it).
fn pack_nibbles(out: &mut [u8], q: impl Fn(usize) -> u8) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = q(2 * j) | (q(2 * j + 1) << 4);
    }
}
fn nibble(b: &[u8], e: usize) -> f32 {
    ((b[e / 2] >> (4 * (e % 2))) & 15) as f32
}

/// Packs codes of `BITS` (4 or 5) bits into a block's value bytes: low nibbles two per byte,
/// element 2j in the low nibble of byte j (so element e is bits 4(e % 8) of word e / 8, as the
/// kernels read it); for 5 bits then one little-endian u32 whose bit e is element e's fifth bit
/// (ggml's q5 layout: a kernel reads word 4 of the block).
fn pack_bits<const BITS: u32>(out: &mut [u8], q: impl Fn(usize) -> u8) {
    pack_nibbles(&mut out[..16], |e| q(e) & 15);
    if BITS == 5 {
        let high = (0..32).fold(0u32, |h, e| h | (((q(e) >> 4) & 1) as u32) << e);
        out[16..20].copy_from_slice(&high.to_le_bytes());
    }
}
/// Code e of a block packed by [`pack_bits`].
fn code_at<const BITS: u32>(b: &[u8], e: usize) -> f32 {
    let low = nibble(b, e);
    if BITS == 4 {
        return low;
    }
    let high = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    low + 16.0 * ((high >> e) & 1) as f32
}

/// q4_0 / q5_0: x = (q - z) d with z = 2^(BITS-1); the value of largest magnitude, signed, maps
/// exactly to code 0 (-z d).
fn encode_signed<const BITS: u32>(v: &[f32], out: &mut [u8], p: &mut [f16]) {
    let (zero, top) = ((1u32 << (BITS - 1)) as f32, ((1u32 << BITS) - 1) as f32);
    let max = v.iter().fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
    let (d, id) = scale(max / -zero);
    p[0] = d;
    pack_bits::<BITS>(out, |e| (v[e] * id + zero).round().clamp(0.0, top) as u8);
}
fn decode_signed<const BITS: u32>(b: &[u8], p: &[f16], out: &mut [f32]) {
    let (zero, d) = ((1u32 << (BITS - 1)) as f32, p[0].to_f32());
    for (e, o) in out.iter_mut().enumerate() {
        *o = (code_at::<BITS>(b, e) - zero) * d;
    }
}

/// q4_1 / q5_1: x = q d + m over the block's range, m its minimum.
fn encode_min<const BITS: u32>(v: &[f32], out: &mut [u8], p: &mut [f16]) {
    let top = ((1u32 << BITS) - 1) as f32;
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    let (d, id) = scale((hi - lo) / top);
    let m = f16::from_f32(lo);
    p[0] = d;
    p[1] = m;
    let mf = m.to_f32();
    pack_bits::<BITS>(out, |e| ((v[e] - mf) * id).round().clamp(0.0, top) as u8);
}
fn decode_min<const BITS: u32>(b: &[u8], p: &[f16], out: &mut [f32]) {
    let (d, m) = (p[0].to_f32(), p[1].to_f32());
    for (e, o) in out.iter_mut().enumerate() {
        *o = code_at::<BITS>(b, e).mul_add(d, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 13.0).collect()
    }

    #[test]
    fn round_trips_within_each_dtypes_precision() {
        // 3 rows of 77: not a multiple of the block, so every row ends in a padded block. q4_0
        // maps the extreme of one sign to -8 d, so the other sign's extreme can be off by d.
        let shape = [3, 7, 11];
        let x = data(231, 0);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let range = 2.0 * amax;
        for (dt, tol) in [(DType::F32, 0.0), (DType::F16, 2e-3), (DType::Q8_0, 0.5 * amax / 127.0 * 1.01), (DType::Q4_0, amax / 8.0 * 1.01), (DType::Q4_1, 0.5 * range / 15.0 * 1.01), (DType::Q5_0, amax / 16.0 * 1.01), (DType::Q5_1, 0.5 * range / 31.0 * 1.01)] {
            let bytes = dt.encode(&shape, &x);
            assert_eq!(bytes.len() as u64, dt.bytes_for(&shape), "{}", dt.name());
            let back = dt.decode(&shape, &bytes);
            assert_eq!(back.len(), x.len());
            for (a, b) in x.iter().zip(&back) {
                let t = if dt == DType::F16 { tol * a.abs().max(1.0) } else { tol };
                assert!((a - b).abs() <= t, "{}: {a} vs {b} (tolerance {t})", dt.name());
            }
        }
    }

    #[test]
    fn quantised_layout_is_split_and_word_aligned() {
        // 5 rows of 40 values: 2 blocks per row.
        let l = DType::Q8_0.layout(&[5, 40]).unwrap();
        assert_eq!((l.rows, l.row_len, l.blocks_per_row), (5, 40, 2));
        assert_eq!(l.param_offsets[0], 10 * 32);
        assert_eq!(l.bytes, 320 + 20);
        let l = DType::Q4_1.layout(&[3, 32]).unwrap();
        // 3 blocks: 48 bytes of nibbles, 6 bytes of scales padded to 8, then the minimums.
        assert_eq!(l.param_offsets, [48, 56]);
        assert_eq!(l.bytes, 64);
        assert_eq!(DType::F16.layout(&[3, 5]).unwrap().bytes, 30);
        assert!(DType::F32.layout(&[usize::MAX, 4]).is_none());
    }

    #[test]
    fn block_values_land_where_the_kernels_read_them() {
        // q4_1 over 0..15 twice (scale 1, minimum 0): element e is nibble e of the packed words.
        let x: Vec<f32> = (0..32).map(|e| (e % 16) as f32).collect();
        let bytes = DType::Q4_1.encode(&[1, 32], &x);
        let words: Vec<u32> = bytes[..16].chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        for e in 0..32 {
            let q = (words[e / 8] >> (4 * (e % 8))) & 15;
            assert_eq!(q, e as u32 % 16, "element {e}");
        }
        // q8_0: byte e of the block, sign included.
        let y: Vec<f32> = (0..32).map(|e| e as f32 - 16.0).collect();
        let bytes = DType::Q8_0.encode(&[1, 32], &y);
        assert_eq!(bytes[0] as i8, -127);
        // q5_1 over 0..31 (scale 1, minimum 0): low 4 bits in the nibbles, the fifth in word 4.
        let z: Vec<f32> = (0..32).map(|e| e as f32).collect();
        let bytes = DType::Q5_1.encode(&[1, 32], &z);
        let words: Vec<u32> = bytes[..20].chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        for e in 0..32 {
            let q = ((words[e / 8] >> (4 * (e % 8))) & 15) | (((words[4] >> e) & 1) << 4);
            assert_eq!(q, e as u32, "element {e}");
        }
    }

    #[test]
    fn rows_select_and_concatenate_exactly() {
        for dt in DType::ALL {
            let (a, b) = (data(3 * 40, 1), data(2 * 40, 2));
            let (ea, eb) = (dt.encode(&[3, 40], &a), dt.encode(&[2, 40], &b));
            let both = dt.concat_rows(&[(&[3, 40], &ea), (&[2, 40], &eb)]);
            let whole: Vec<f32> = a.iter().chain(&b).copied().collect();
            assert_eq!(both, dt.encode(&[5, 40], &whole), "{}", dt.name());
            assert_eq!(dt.select_rows(&[5, 40], &both, 3..5), eb, "{}", dt.name());
            let (v, p) = dt.split(&[5, 40], &both);
            assert_eq!(dt.join(&[5, 40], v, &p, "t").unwrap(), both);
            assert!(dt.join(&[4, 40], v, &p, "t").is_err());
        }
    }

    #[test]
    fn explicit_params_reproduce_the_default_encoders() {
        // The codes table must describe what each encoder writes: the default d and m given
        // explicitly give the same bytes.
        let shape = [3, 70];
        let x = data(210, 5);
        for dt in DType::ALL.into_iter().filter(|d| d.is_quantised()) {
            let want = dt.encode(&shape, &x);
            let got = dt.encode_with_params(&shape, &x, |_, _, block| {
                let mut bytes = vec![0u8; dt.info().value_bytes];
                let mut p = [f16::ZERO; 2];
                (dt.info().encode_block)(block, &mut bytes, &mut p[..dt.info().params]);
                [p[0].to_f32(), p[1].to_f32()]
            });
            assert_eq!(got, want, "{}", dt.name());
            let c = dt.info().codes.unwrap();
            assert_eq!(c.value(c.code(1.0, 4.0, 0.0), 0.25, 0.0), 1.0, "{}", dt.name());
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!(DType::from_name("q8"), Some(DType::Q8_0));
        assert_eq!(DType::from_name("q4_1"), Some(DType::Q4_1));
        assert_eq!(DType::from_name("q5"), Some(DType::Q5_0));
        assert_eq!(DType::from_name("q5_1"), Some(DType::Q5_1));
        assert_eq!(DType::from_name("f16"), Some(DType::F16));
        assert_eq!(DType::from_name("q3"), None);
    }
}
