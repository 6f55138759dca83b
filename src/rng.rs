//! A bit-exact reimplementation of PyTorch's CPU random generator, so that a seed gives the same
//! initial latents as diffusers (`torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(shape, generator=g, dtype=torch.float32)`).
//!
//! What is reproduced (checked bit for bit against PyTorch 2.15 on x86-64 with AVX2; machines with
//! AVX-512 run the same AVX2 kernel for this):
//! - the engine: MT19937 seeded with the low 32 bits of the seed (`at::mt19937`); `random()` is one
//!   32-bit output, `random64()` is two outputs, the first in the high half;
//! - float uniforms: 24 random bits times 2^-24 (`uniform_real_distribution<float>`); double
//!   uniforms: 53 bits of `random64()` times 2^-53;
//! - `randn` with 16 or more elements (`normal_fill_AVX2`): all elements are first filled with
//!   float uniforms, then every block of 16 is turned into normals by Box-Muller (`u1 = 1 - data[j]`,
//!   `u2 = data[j + 8]`, `r = sqrt(-2 ln u1)`, `cos` into `data[j]`, `sin` into `data[j + 8]`) with
//!   the single-precision `log256_ps` / `sincos256_ps` polynomials of `avx_mathfun.h`, evaluated
//!   with the fused multiply-adds that GCC contracted them into (found by comparing against torch:
//!   every multiply whose only use is an add is fused); when the size is not a multiple of 16,
//!   the last 16 elements are refilled with fresh uniforms and transformed again;
//! - `randn` with fewer than 16 elements: one `at::normal_distribution<double>` draw per element,
//!   Box-Muller in double (`u1`, `u2` double uniforms, `r = sqrt(-2 log1p(-u2))`,
//!   `theta = 2 pi u1`, returns `r cos theta` and caches `r sin theta` in the generator for the
//!   next such draw; the cache is only consumed by later small draws and is cleared by seeding);
//! - `rand`: one float uniform per element.
//!
//! Not reproduced: PyTorch on aarch64 (Apple silicon) or x86 without AVX2, where draws of 16 or
//! more use scalar `logf`/`cosf`/`sinf` and differ in the last bits; and `dtype=torch.float16`
//! (diffusers draws latents in the pipeline's dtype, so an fp16 pipeline's latents come from
//! 11-bit uniforms and half-precision Box-Muller, not from these values).

/// PyTorch's CPU generator (`torch.Generator("cpu")`): MT19937 plus the cached second value of
/// the double-precision Box-Muller transform.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; MT_N],
    next: usize,
    seed: u64,
    next_double_normal: Option<f64>,
}

const MT_N: usize = 624;
const MT_M: usize = 397;

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .field("next", &self.next)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`. Like PyTorch, only the low 32 bits of the seed
    /// reach the engine (seeds 5 and 2**40 + 5 give the same numbers). A negative Python seed
    /// `s` corresponds to `s as u64` (two's complement).
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        TorchGenerator { state, next: MT_N, seed, next_double_normal: None }
    }

    /// The seed this generator was created with (`g.initial_seed()`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % MT_N] & LOWER);
            let mut v = self.state[(i + MT_M) % MT_N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= MATRIX_A;
            }
            self.state[i] = v;
        }
        self.next = 0;
    }

    /// One 32-bit engine output (`CPUGeneratorImpl::random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Two engine outputs, the first in the high half (`CPUGeneratorImpl::random64()`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// A float uniform in [0, 1): 24 random bits (`uniform_real_distribution<float>(0, 1)`).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A double uniform in [0, 1): 53 random bits (`uniform_real_distribution<double>(0, 1)`).
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One standard normal from `at::normal_distribution<double>`, using and refilling the
    /// generator's cached second Box-Muller value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = libm::sqrt(-2.0 * libm::log1p(-u2));
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * libm::sin(theta));
        r * libm::cos(theta)
    }

    /// `torch.randn(n, generator=g, dtype=torch.float32)`: `n` standard normals, advancing the
    /// state exactly as torch does, so a sequence of calls matches the same sequence of
    /// `torch.randn` calls on one generator. For a tensor of shape S, pass its element count and
    /// read the result in row-major order.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n];
        self.randn_into(&mut out);
        out
    }

    /// [`randn`](Self::randn) into a caller's buffer (the buffer's length is the element count).
    pub fn randn_into(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        for block in out.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if n & 15 != 0 {
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
    }

    /// `torch.rand(n, generator=g, dtype=torch.float32)`: `n` uniforms in [0, 1).
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n];
        self.rand_into(&mut out);
        out
    }

    /// [`rand`](Self::rand) into a caller's buffer.
    pub fn rand_into(&mut self, out: &mut [f32]) {
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
    }
}

/// Box-Muller on 16 uniforms in place, as `normal_fill_16_AVX2` with mean 0 and std 1.
fn normal_fill_16(data: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let (sin, cos) = sincos_ps(two_pi * u2);
        // `_mm256_fmadd_ps(n, std = 1, mean = 0)`: exact, except that -0 becomes +0.
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

/// `log256_ps` of avx_mathfun.h (cephes `logf`) for one lane, with GCC's FMA contractions.
/// Only called with `x` in [2^-24, 1].
#[allow(clippy::excessive_precision)] // cephes' decimal constants, as in the C source
fn log_ps(x_in: f32) -> f32 {
    const P: [f32; 9] = [
        7.037_683_629_2e-2,
        -1.151_461_031_0e-1,
        1.167_699_874_0e-1,
        -1.242_014_084_6e-1,
        1.424_932_278_7e-1,
        -1.666_805_766_5e-1,
        2.000_071_476_5e-1,
        -2.499_999_399_3e-1,
        3.333_333_117_4e-1,
    ];
    const Q1: f32 = -2.121_944_40e-4;
    const Q2: f32 = 0.693_359_375;
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    if x_in.is_nan() || x_in <= 0.0 {
        return f32::NAN;
    }
    let mut x = x_in.max(f32::from_bits(0x0080_0000));
    let exponent = (x.to_bits() >> 23) as i32 - 0x7f;
    x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let small = x < SQRTHF;
    let tmp = if small { x } else { 0.0 };
    x -= 1.0;
    e -= if small { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    e.mul_add(Q2, x + y)
}

/// `sincos256_ps` of avx_mathfun.h (cephes `sinf`/`cosf`) for one lane, with GCC's FMA
/// contractions. Returns (sin, cos). Accurate for |x| < 8192; called with x in [0, 2 pi).
#[allow(clippy::excessive_precision)]
fn sincos_ps(x_in: f32) -> (f32, f32) {
    const FOPI: f32 = 1.273_239_544_735_16; // 4 / pi
    const MINUS_DP1: f32 = -0.785_156_25;
    const MINUS_DP2: f32 = -2.418_756_484_985_351_562_5e-4;
    const MINUS_DP3: f32 = -3.774_894_977_445_941_08e-8;
    const SINCOF: [f32; 3] = [-1.951_529_589_1e-4, 8.332_160_873_6e-3, -1.666_665_461_1e-1];
    const COSCOF: [f32; 3] = [2.443_315_711_809_948e-5, -1.388_731_625_493_765e-3, 4.166_664_568_298_827e-2];
    let mut sign_sin = x_in.to_bits() & 0x8000_0000;
    let mut x = x_in.abs();
    // `_mm256_cvttps_epi32`: truncation; out-of-range and NaN lanes give i32::MIN.
    let scaled = x * FOPI;
    let mut j = if scaled < 2_147_483_648.0 { scaled as i32 } else { i32::MIN };
    j = j.wrapping_add(1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_is_sin = (j & 2) == 0;
    x = y.mul_add(MINUS_DP1, x);
    x = y.mul_add(MINUS_DP2, x);
    x = y.mul_add(MINUS_DP3, x);
    let sign_cos = ((!j.wrapping_sub(2) & 4) as u32) << 29;
    sign_sin ^= swap_sign_sin;

    let z = x * x;
    let mut yc = COSCOF[0].mul_add(z, COSCOF[1]);
    yc = yc.mul_add(z, COSCOF[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;

    let mut ys = SINCOF[0].mul_add(z, SINCOF[1]);
    ys = ys.mul_add(z, SINCOF[2]);
    ys *= z;
    ys = ys.mul_add(x, x);

    // Select the polynomials with masks, as the vector code does (including its signed zeros).
    let ysin2 = if poly_is_sin { ys } else { 0.0 };
    let ysin1 = if poly_is_sin { 0.0 } else { yc };
    let s = ysin1 + ysin2;
    let c = (yc - ysin1) + (ys - ysin2);
    (f32::from_bits(s.to_bits() ^ sign_sin), f32::from_bits(c.to_bits() ^ sign_cos))
}

#[cfg(test)]
mod tests {
    use super::TorchGenerator;

    fn check(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "element {i}: got {g}, torch gives {w}");
        }
    }

    #[test]
    fn randn_16_seed_0_matches_torch() {
        // torch.randn(16, generator=torch.Generator().manual_seed(0))[:5]
        let v = TorchGenerator::new(0).randn(16);
        check(&v[..5], &[-1.125_839_8, -1.152_360_2, -0.250_578_58, -0.433_878_8, 0.848_710_36]);
    }

    #[test]
    fn randn_3_seed_0_matches_torch() {
        // torch.randn(3, generator=torch.Generator().manual_seed(0)): the double-precision path
        let v = TorchGenerator::new(0).randn(3);
        check(&v, &[1.540_996_1, -0.293_428_9, -2.178_789_4]);
    }

    #[test]
    fn randn_17_seed_42_tail_matches_torch() {
        // torch.randn(17, generator=torch.Generator().manual_seed(42))[-3:]: the recomputed tail
        let v = TorchGenerator::new(42).randn(17);
        check(&v[14..], &[-0.251_575_3, 0.859_858_5, -0.309_726_77]);
    }

    #[test]
    fn rand_seed_0_matches_torch() {
        // torch.rand(4, generator=torch.Generator().manual_seed(0))
        let v = TorchGenerator::new(0).rand(4);
        check(&v, &[0.496_256_6, 0.768_221_8, 0.088_477_43, 0.132_030_49]);
    }

    #[test]
    fn only_low_32_bits_of_the_seed_count() {
        let a = TorchGenerator::new(5).randn(20);
        let b = TorchGenerator::new((1u64 << 40) + 5).randn(20);
        check(&a, &b);
    }

    /// `tests/fixtures/ref/randn.safetensors` (torch.randn dumps, see the fixtures README).
    #[test]
    fn matches_randn_fixture() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ref/randn.safetensors");
        let bytes = std::fs::read(path).expect("randn fixture");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("header length")) as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
        let data = &bytes[8 + header_len..];
        let tensor = |name: &str| -> Vec<f32> {
            let entry = &header[name];
            let offsets = entry["data_offsets"].as_array().expect("offsets");
            let (a, b) = (offsets[0].as_u64().unwrap_or(0) as usize, offsets[1].as_u64().unwrap_or(0) as usize);
            data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        let mut checked = 0;
        for name in header.keys().filter(|k| k.starts_with("seed")) {
            // seed{s}_shape{d1}x{d2}...
            let rest = &name[4..];
            let (seed, shape) = rest.split_once("_shape").expect("name");
            let seed: u64 = seed.parse().expect("seed");
            let numel: usize = shape.split('x').map(|d| d.parse::<usize>().expect("dim")).product();
            check(&TorchGenerator::new(seed).randn(numel), &tensor(name));
            checked += 1;
        }
        assert_eq!(checked, 8);
        // seq_0/1/2: one generator seeded 5 drawing [2,3], [1,4,4,4], [5].
        let mut g = TorchGenerator::new(5);
        for (name, n) in [("seq_0", 6), ("seq_1", 64), ("seq_2", 5)] {
            check(&g.randn(n), &tensor(name));
        }
    }

    #[test]
    fn empty_draw_leaves_state_alone() {
        let mut g = TorchGenerator::new(3);
        assert!(g.randn(0).is_empty());
        check(&g.randn(16), &TorchGenerator::new(3).randn(16));
    }
}
