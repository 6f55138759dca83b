//! Batched strided matmul with fused bias, activation and residual (on the GEMM core).

use super::quant::{check_weight, QuantParams, QUANT_WGSL};
use super::{bind_range, bytes_of, check_same_dtype, dummy, Activation, ACTIVATIONS_WGSL};
use crate::error::{Error, Result};
use crate::gpu::{Def, Gpu, KernelProfile, Kernel, Tensor};

pub(crate) const GEMM_WGSL: &str = include_str!("../../shaders/gemm.wgsl");
const MATMUL_WGSL: &str = include_str!("../../shaders/matmul.wgsl");

/// A matrix operand: a tensor read at `base + b*batch_stride + r*row_stride + c*col_stride`.
#[derive(Clone, Copy)]
pub struct MatView<'a> {
    pub tensor: &'a Tensor,
    pub base: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatView<'a> {
    /// Row-major `rows x cols` matrices packed one after another.
    pub fn packed(tensor: &'a Tensor, rows: usize, cols: usize) -> Self {
        Self { tensor, base: 0, batch_stride: rows * cols, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of a packed `cols x rows` matrix (e.g. a Linear weight [out, in] read as [in, out]).
    pub fn transposed(tensor: &'a Tensor, rows: usize, cols: usize) -> Self {
        Self { tensor, base: 0, batch_stride: rows * cols, row_stride: 1, col_stride: rows }
    }
    /// The same matrix for every batch.
    pub fn broadcast(mut self) -> Self {
        self.batch_stride = 0;
        self
    }
    /// Elements `[start, end)` this view touches for batches `b0..b1`, rows `r0..r1`, `cols` columns.
    fn extent(&self, b0: usize, b1: usize, r0: usize, r1: usize, cols: usize) -> (usize, usize) {
        let start = self.base + b0 * self.batch_stride + r0 * self.row_stride;
        let end = self.base + (b1 - 1) * self.batch_stride + (r1 - 1) * self.row_stride + (cols - 1) * self.col_stride + 1;
        (start, end)
    }
}

/// Which axis a bias vector runs along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasAxis {
    /// One value per output column (Linear layers).
    Col = 1,
    /// One value per output row (convolutions as GEMM: one per output channel).
    Row = 2,
}

/// `C[b] = act(alpha * A[b] . B[b] + bias) + residual[b]` for `b < batch`. One of A and B may be
/// a quantised weight matrix: A as `packed(w, m, k)` or B as `transposed(w, k, n)`, broadcast.
pub struct MatmulSpec<'a> {
    pub a: MatView<'a>,
    pub b: MatView<'a>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub alpha: f32,
    pub bias: Option<(&'a Tensor, BiasAxis)>,
    pub act: Activation,
    /// Added after the activation; laid out like C (packed `m x n` per batch).
    pub residual: Option<&'a Tensor>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32, n: u32, k: u32, _p0: u32,
    a_base: u32, a_bs: u32, a_rs: u32, a_cs: u32,
    b_base: u32, b_bs: u32, b_rs: u32, b_cs: u32,
    c_base: u32, c_bs: u32, c_rs: u32, bias_base: u32,
    r_base: u32, r_bs: u32, r_rs: u32, alpha: f32,
    q: QuantParams,
}

/// A GEMM tiling: workgroup WX x WY invocations, each computing TM x TN outputs; BK is the k
/// depth of a workgroup-memory tile (tiled profile only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GemmTile {
    pub wx: u32,
    pub wy: u32,
    pub tm: u32,
    pub tn: u32,
    pub bk: u32,
}

impl GemmTile {
    const fn new(wx: u32, wy: u32, tm: u32, tn: u32) -> Self {
        Self { wx, wy, tm, tn, bk: 16 }
    }
    const fn with_bk(self, bk: u32) -> Self {
        Self { bk, ..self }
    }
    fn block(&self) -> (usize, usize) {
        ((self.wy * self.tm) as usize, (self.wx * self.tn) as usize)
    }
    /// Padded output area over the real one.
    fn waste(&self, m: usize, n: usize) -> f64 {
        let (bm, bn) = self.block();
        (m.div_ceil(bm) * bm * n.div_ceil(bn) * bn) as f64 / (m * n).max(1) as f64
    }
}

/// Workgroup-memory tilings for real GPUs, largest first, one per shape class: 128x128 blocks
/// (256 invocations with 8x8 outputs each: twice the reuse of every loaded value, 8 KiB of tiles
/// at BK 8), 64x64 (256 x 4x4) and 32x32 (64 x 4x4) for outputs too small to fill a GPU
/// otherwise. Chosen by `gemm_tile`; every one is tested at odd sizes (suite cases
/// `matmul/tiled_tiling*`). Not yet timed on a GPU: the choice's thresholds are estimates.
const TILED: [GemmTile; 3] = [GemmTile::new(16, 16, 8, 8).with_bk(8), GemmTile::new(16, 16, 4, 4), GemmTile::new(8, 8, 4, 4)];

/// Workgroups a GPU needs to keep busy (about one per multiprocessor of a large one).
const GPU_WORKGROUPS: usize = 128;

/// Register tiles for software adapters. Each k step costs TM + TN loads for TM x TN FMAs, and
/// loads dominate there: on llvmpipe a 320->320 3x3 convolution at 64x64 ran at 0.4 / 1.0 / 3.2 /
/// 4.0 GFLOP/s with 4x4 / 8x8 / 16x16 / 16x32 tiles.
const REGISTER: [GemmTile; 5] = [
    GemmTile::new(8, 2, 16, 32),
    GemmTile::new(8, 4, 16, 16),
    GemmTile::new(8, 4, 16, 8),
    GemmTile::new(8, 4, 8, 8),
    GemmTile::new(8, 8, 4, 4),
];

/// The tiling for an `m x n` output. For software adapters: the register tile with the best
/// FMAs-per-load ratio after discounting the padding it computes for nothing, among those that
/// still give every CPU thread work (small problems take the smallest tile: they are cheap anyway,
/// and a large unrolled tile costs seconds to compile there).
pub(crate) fn gemm_tile(profile: KernelProfile, m: usize, n: usize) -> GemmTile {
    const MIN_WORKGROUPS: usize = 16;
    let groups = |t: &GemmTile| {
        let (bm, bn) = t.block();
        m.div_ceil(bm) * n.div_ceil(bn)
    };
    let score = |t: &GemmTile| (t.tm * t.tn) as f64 / (t.tm + t.tn) as f64 / t.waste(m, n);
    match profile {
        // The largest block that still fills the GPU without much padding.
        KernelProfile::Tiled => TILED.iter().find(|t| groups(t) >= GPU_WORKGROUPS && t.waste(m, n) <= 1.15).copied().unwrap_or(TILED[TILED.len() - 1]),
        KernelProfile::Register => REGISTER
            .iter()
            .rev()
            .filter(|t| groups(t) >= MIN_WORKGROUPS)
            // max_by keeps the last of equals: reversed, ties go to the larger tile.
            .max_by(|a, b| score(a).total_cmp(&score(b)))
            .copied()
            .unwrap_or(REGISTER[REGISTER.len() - 1]),
    }
}

/// The 4x4 register tile unless the shape-based choice is already that small (see conv2d).
pub(crate) fn small_register_tile(m: usize, n: usize) -> GemmTile {
    let t = gemm_tile(KernelProfile::Register, m, n);
    if t.tm * t.tn <= 16 { t } else { REGISTER[4] }
}

/// Sources of the GEMM core for a tiling: the core, the caller's loaders and, for software
/// adapters, the generated register-tiled entry point.
pub(crate) fn gemm_sources(loaders: &'static str, profile: KernelProfile, tile: GemmTile) -> [&'static str; 5] {
    let generated = match profile {
        KernelProfile::Tiled => "",
        KernelProfile::Register => super::unrolled::cached("gemm", tile.tm, tile.tn, || super::unrolled::gemm_register(tile.tm, tile.tn)),
    };
    [ACTIVATIONS_WGSL, QUANT_WGSL, GEMM_WGSL, loaders, generated]
}

/// The GEMM-core kernel for a tiling, with the caller's sources and constants.
pub(crate) fn gemm_kernel<'a>(
    family: &'static str,
    sources: &'a [&'static str],
    profile: KernelProfile,
    tile: GemmTile,
    dtype: crate::gpu::DType,
    defs: &'a mut Vec<(&'static str, Def)>,
) -> Kernel<'a> {
    defs.extend([("WX", Def::U32(tile.wx)), ("WY", Def::U32(tile.wy)), ("TM", Def::U32(tile.tm)), ("TN", Def::U32(tile.tn)), ("BK", Def::U32(tile.bk))]);
    let entry = match profile {
        KernelProfile::Tiled => "gemm_tiled",
        KernelProfile::Register => "gemm_register",
    };
    Kernel { family, sources, entry, dtype, defs }
}

/// Workgroups covering an `m x n` output.
pub(crate) fn gemm_groups(tile: GemmTile, m: usize, n: usize, batch: usize) -> [u32; 3] {
    let (bm, bn) = tile.block();
    [n.div_ceil(bn) as u32, m.div_ceil(bm) as u32, batch as u32]
}

/// Runs a [`MatmulSpec`] into a new `[batch, m, n]` tensor.
pub fn matmul_spec(gpu: &Gpu, s: &MatmulSpec) -> Result<Tensor> {
    matmul_spec_with(gpu, s, gpu.profile())
}

/// As [`matmul_spec`] with an explicit kernel profile (tests run both on every adapter).
pub fn matmul_spec_with(gpu: &Gpu, s: &MatmulSpec, profile: KernelProfile) -> Result<Tensor> {
    matmul_spec_tile(gpu, s, profile, gemm_tile(profile, s.m, s.n))
}

/// Number of register tilings, for [`matmul_register_tile`].
pub const REGISTER_TILINGS: usize = REGISTER.len();
/// Number of workgroup-memory tilings, for [`matmul_tiled_tile`].
pub const TILED_TILINGS: usize = TILED.len();

/// As [`matmul_spec`] with the tiled profile and tiling `index` whatever the shape (tests).
pub fn matmul_tiled_tile(gpu: &Gpu, s: &MatmulSpec, index: usize) -> Result<Tensor> {
    let tile = *TILED.get(index).ok_or_else(|| Error::Unsupported(format!("no tiled tiling {index}")))?;
    matmul_spec_tile(gpu, s, KernelProfile::Tiled, tile)
}

/// As [`matmul_spec`] with the register profile and register tiling `index` whatever the shape,
/// so tests can cover every generated kernel at small sizes.
pub fn matmul_register_tile(gpu: &Gpu, s: &MatmulSpec, index: usize) -> Result<Tensor> {
    let tile = *REGISTER.get(index).ok_or_else(|| Error::Unsupported(format!("no register tiling {index}")))?;
    matmul_spec_tile(gpu, s, KernelProfile::Register, tile)
}

fn matmul_spec_tile(gpu: &Gpu, s: &MatmulSpec, profile: KernelProfile, tile: GemmTile) -> Result<Tensor> {
    let (qa, qb) = (s.a.tensor.dtype().is_quantised(), s.b.tensor.dtype().is_quantised());
    if qa && qb {
        return Err(Error::Unsupported("matmul: only one operand may be a quantised weight".into()));
    }
    let mut ts = Vec::new();
    ts.extend((!qa).then_some(s.a.tensor));
    ts.extend((!qb).then_some(s.b.tensor));
    ts.extend(s.bias.map(|b| b.0));
    ts.extend(s.residual);
    let dtype = check_same_dtype(&ts, "matmul")?;
    let quant = if qa { Some(s.a.tensor) } else if qb { Some(s.b.tensor) } else { None };
    if let Some(w) = quant {
        let v = if qa { &s.a } else { &s.b };
        let (rows, along_k, across) = if qa { (s.m, v.col_stride, v.row_stride) } else { (s.n, v.row_stride, v.col_stride) };
        if v.base != 0 || (v.batch_stride != 0 && s.batch > 1) || along_k != 1 || across != s.k {
            return Err(Error::Unsupported(format!("matmul: a quantised {} operand must be a whole weight matrix read along its rows", if qa { "A" } else { "B" })));
        }
        check_weight(w, rows, s.k, "matmul")?;
    }
    if s.m == 0 || s.n == 0 || s.batch == 0 {
        return gpu.empty(&[s.batch, s.m, s.n], dtype);
    }
    let fits = |v: &MatView, rows: usize, cols: usize| v.tensor.dtype().is_quantised() || v.extent(0, s.batch, 0, rows, cols).1 <= v.tensor.numel();
    if s.k > 0 && (!fits(&s.a, s.m, s.k) || !fits(&s.b, s.k, s.n)) {
        return Err(Error::Shape(format!("matmul operands {:?} x {:?} are too small for [{}] x {}x{}x{}", s.a.tensor.shape(), s.b.tensor.shape(), s.batch, s.m, s.k, s.n)));
    }
    if let Some((bias, axis)) = s.bias {
        let want = if axis == BiasAxis::Col { s.n } else { s.m };
        if bias.numel() != want {
            return Err(Error::Shape(format!("matmul bias has {} values, {want} needed", bias.numel())));
        }
    }
    if let Some(r) = s.residual {
        if r.numel() != s.batch * s.m * s.n {
            return Err(Error::Shape(format!("matmul residual {:?} does not match output [{}, {}, {}]", r.shape(), s.batch, s.m, s.n)));
        }
    }
    if gpu.is_cpu() {
        return super::host::matmul(gpu, s);
    }
    let out = gpu.empty(&[s.batch, s.m, s.n], dtype)?;
    let mut defs = vec![
        ("BIAS", crate::gpu::Def::U32(s.bias.map_or(0, |b| b.1 as u32))),
        ("ACT", crate::gpu::Def::U32(s.act.code())),
        ("RESIDUAL", crate::gpu::Def::Bool(s.residual.is_some())),
        ("QA", crate::gpu::Def::Bool(qa)),
        ("QB", crate::gpu::Def::Bool(qb)),
        ("QTYPE", crate::gpu::Def::U32(quant.map_or(0, |w| w.dtype().info().wgsl_quant))),
    ];
    let sources = gemm_sources(MATMUL_WGSL, profile, tile);
    let kernel = gemm_kernel("matmul", &sources, profile, tile, dtype, &mut defs);
    let spare = dummy(gpu, dtype)?;
    let c_view = MatView::packed(&out, s.m, s.n);
    let limit = super::max_binding_elems(gpu, dtype);

    // One dispatch when everything fits one binding each; otherwise per batch, then per row band.
    let big = |b0: usize, b1: usize, r0: usize, r1: usize| {
        let a = if qa { (0, 0) } else { s.a.extent(b0, b1, r0, r1, s.k.max(1)) };
        let c = c_view.extent(b0, b1, r0, r1, s.n);
        a.1 - a.0 > limit || c.1 - c.0 > limit
    };
    let per_batch = big(0, s.batch, 0, s.m);
    let mut rows = s.m;
    while per_batch && rows > 1 && big(0, 1, 0, rows) {
        rows = rows.div_ceil(2);
    }
    // Bounded work per dispatch (`Gpu::max_dispatch_flops`), in whole row blocks.
    let bm = (tile.wy * tile.tm) as usize;
    let batch_per = if per_batch { 1 } else { s.batch };
    let work_rows = (gpu.max_dispatch_flops() / (2.0 * (s.n * s.k.max(1) * batch_per) as f64)) as usize / bm * bm;
    rows = rows.min(work_rows.max(bm));
    let batches: Vec<(usize, usize)> = if per_batch { (0..s.batch).map(|b| (b, b + 1)).collect() } else { vec![(0, s.batch)] };
    for &(b0, b1) in &batches {
        for r0 in (0..s.m).step_by(rows) {
            let r1 = (r0 + rows).min(s.m);
            // A quantised operand is bound whole at quant.wgsl's binding; its slot gets the spare.
            let (ab, a_base) = if qa { (crate::gpu::Bind::whole(&spare), 0) } else { range(gpu, &s.a, b0, b1, r0, r1, s.k.max(1)) };
            let (bb, b_base) = if qb { (crate::gpu::Bind::whole(&spare), 0) } else { range(gpu, &s.b, b0, b1, 0, s.k.max(1), s.n) };
            let qbind = crate::gpu::Bind::whole(quant.unwrap_or(&spare));
            let q = quant.map_or(QuantParams::default(), |w| QuantParams::of(w, if qa { r0 } else { 0 }));
            let (b_bs, b_rs, b_cs) = if qb { (0, 1, 1) } else { (s.b.batch_stride as u32, s.b.row_stride as u32, s.b.col_stride as u32) };
            let (cb, c_base) = range(gpu, &c_view, b0, b1, r0, r1, s.n);
            let bias_bind = s.bias.map_or(crate::gpu::Bind::whole(&spare), |b| crate::gpu::Bind::whole(b.0));
            let (rb, r_base) = match s.residual {
                Some(r) => range(gpu, &MatView::packed(r, s.m, s.n), b0, b1, r0, r1, s.n),
                None => (crate::gpu::Bind::whole(&spare), 0),
            };
            let row_bias = s.bias.is_some_and(|b| b.1 == BiasAxis::Row);
            let p = Params {
                m: (r1 - r0) as u32, n: s.n as u32, k: s.k as u32, _p0: 0,
                a_base, a_bs: s.a.batch_stride as u32, a_rs: s.a.row_stride as u32, a_cs: s.a.col_stride as u32,
                b_base, b_bs, b_rs, b_cs,
                c_base, c_bs: (s.m * s.n) as u32, c_rs: s.n as u32, bias_base: if row_bias { r0 as u32 } else { 0 },
                r_base, r_bs: (s.m * s.n) as u32, r_rs: s.n as u32, alpha: s.alpha, q,
            };
            gpu.dispatch(&kernel, bytes_of(&p), &[ab, bb, cb, bias_bind, rb, qbind], gemm_groups(tile, r1 - r0, s.n, b1 - b0))?;
            gpu.add_work(2.0 * ((r1 - r0) * s.n * s.k * (b1 - b0)) as f64);
        }
    }
    Ok(out)
}

fn range<'a>(gpu: &Gpu, v: &MatView<'a>, b0: usize, b1: usize, r0: usize, r1: usize, cols: usize) -> (crate::gpu::Bind<'a>, u32) {
    let (start, end) = v.extent(b0, b1, r0, r1, cols);
    bind_range(gpu, v.tensor, start, end)
}

/// `[.., M, K] x [.., K, N] -> [.., M, N]`; `b` may be 2-D (shared by every batch).
pub fn matmul(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ra, rb) = (a.shape().len(), b.shape().len());
    if ra < 2 || rb < 2 {
        return Err(Error::Shape(format!("matmul needs matrices, got {:?} and {:?}", a.shape(), b.shape())));
    }
    let (m, k) = (a.dim(-2), a.dim(-1));
    let (k2, n) = (b.dim(-2), b.dim(-1));
    let batch = a.numel() / (m * k).max(1);
    let b_batch = b.numel() / (k2 * n).max(1);
    if k != k2 || (b_batch != 1 && b_batch != batch) {
        return Err(Error::Shape(format!("matmul {:?} x {:?}", a.shape(), b.shape())));
    }
    let bv = MatView::packed(b, k, n);
    let spec = MatmulSpec {
        a: MatView::packed(a, m, k),
        b: if b_batch == 1 { bv.broadcast() } else { bv },
        m, n, k, batch, alpha: 1.0, bias: None, act: Activation::None, residual: None,
    };
    let mut shape = a.shape()[..ra - 1].to_vec();
    shape.push(n);
    matmul_spec(gpu, &spec)?.reshape(&shape)
}

/// A Linear layer: `act(x W^T + bias)` for x `[.., in]` and weight `[out, in]` (PyTorch layout).
pub fn linear(gpu: &Gpu, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    let (out_f, in_f) = match weight.shape() {
        [o, i] => (*o, *i),
        s => return Err(Error::Shape(format!("linear weight must be [out, in], got {s:?}"))),
    };
    if x.dim(-1) != in_f {
        return Err(Error::Shape(format!("linear input {:?} does not end in {in_f}", x.shape())));
    }
    let rows = x.numel() / in_f;
    let spec = MatmulSpec {
        a: MatView::packed(x, rows, in_f),
        b: MatView::transposed(weight, in_f, out_f).broadcast(),
        m: rows, n: out_f, k: in_f, batch: 1, alpha: 1.0,
        bias: bias.map(|b| (b, BiasAxis::Col)), act, residual: None,
    };
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("x has a last dim") = out_f;
    matmul_spec(gpu, &spec)?.reshape(&shape)
}

/// CPU reference of [`MatmulSpec`] on plain slices (f64 accumulation).
#[allow(clippy::too_many_arguments)]
pub fn reference(
    a: &[f32], a_view: (usize, usize, usize, usize),
    b: &[f32], b_view: (usize, usize, usize, usize),
    m: usize, n: usize, k: usize, batch: usize, alpha: f32,
    bias: Option<(&[f32], BiasAxis)>, act: Activation, residual: Option<&[f32]>,
) -> Vec<f32> {
    let mut c = vec![0f32; batch * m * n];
    for bt in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for kk in 0..k {
                    let av = a[a_view.0 + bt * a_view.1 + i * a_view.2 + kk * a_view.3] as f64;
                    let bv = b[b_view.0 + bt * b_view.1 + kk * b_view.2 + j * b_view.3] as f64;
                    acc += av * bv;
                }
                let mut v = alpha as f64 * acc;
                if let Some((bias, axis)) = bias {
                    v += bias[if axis == BiasAxis::Col { j } else { i }] as f64;
                }
                v = act.apply(v);
                let idx = (bt * m + i) * n + j;
                if let Some(r) = residual {
                    v += r[idx] as f64;
                }
                c[idx] = v as f32;
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_tiles_follow_the_output_shape() {
        // SD's 64x64 latent: the largest tile fits exactly.
        assert_eq!(gemm_tile(KernelProfile::Register, 320, 4096), REGISTER[0]);
        // An 8x8 latent (64 pixels): a 256-wide tile would be three quarters padding.
        let t = gemm_tile(KernelProfile::Register, 1280, 64);
        assert!(t.waste(1280, 64) <= 1.0 + 1e-9, "{t:?}");
        // Real GPUs: small outputs take the small block, large ones the 128x128 one.
        assert_eq!(gemm_tile(KernelProfile::Tiled, 3, 5), TILED[2]);
        assert_eq!(gemm_tile(KernelProfile::Tiled, 4096, 1280), TILED[0]);
        // 1024x1024 in 128x128 tiles is 64 workgroups, too few for a large GPU; 64x64 gives 256.
        assert_eq!(gemm_tile(KernelProfile::Tiled, 1024, 1024), TILED[1]);
        assert_eq!(gemm_tile(KernelProfile::Tiled, 1280, 256), TILED[2]);
    }
}
