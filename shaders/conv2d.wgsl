// conv2d (NCHW, weights [Cout, Cin, KH, KW]) as an implicit GEMM on the GEMM core:
// M = Cout, N = batch * Hout * Wout (columns n0 .. n0 + n in one dispatch), K = Cin * KH * KW;
// the im2col matrix is never stored.
// Constants: ACT, RESIDUAL (add a tensor shaped like the output, e.g. a ResNet shortcut),
// QA: the weight is quantised (read through quant.wgsl; `weight` goes unused).

struct ConvParams {
    cout: u32, n: u32, k: u32, cin: u32,
    h: u32, w: u32, ho: u32, wo: u32,
    kh: u32, kw: u32, stride_y: u32, stride_x: u32,
    pad_y: u32, pad_x: u32, dil_y: u32, dil_x: u32,
    alpha: f32, has_bias: u32,
    // First output column (pixel) of this dispatch: long convolutions are split into several.
    n0: u32, _p0: u32,
    q: QuantView,
}

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> weight: array<T>;
@group(0) @binding(2) var<storage, read> x: array<T>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;
@group(0) @binding(4) var<storage, read> bias: array<T>;
@group(0) @binding(5) var<storage, read> residual: array<T>;

fn gemm_dims() -> vec3<u32> { return vec3<u32>(p.cout, p.n, p.k); }

fn a_load(batch: u32, m: u32, k: u32) -> f32 {
    if (m >= p.cout || k >= p.k) { return 0.0; }
    if (QA) { return qweight_at(p.q, m, k); }
    return f32(weight[m * p.k + k]);
}

// Column n is output pixel (image, oy, ox): where its receptive field starts in the input.
fn b_col(batch: u32, n_local: u32) -> vec4<i32> {
    let n = p.n0 + n_local;
    let hw = p.ho * p.wo;
    let img = n / hw;
    let pix = n % hw;
    let oy = pix / p.wo;
    let ox = pix % p.wo;
    return vec4<i32>(i32(img * p.cin * p.h * p.w),
                     i32(oy * p.stride_y) - i32(p.pad_y),
                     i32(ox * p.stride_x) - i32(p.pad_x),
                     i32(n_local < p.n));
}

// Row k is (input channel, ky, kx).
fn b_row(k: u32) -> vec4<i32> {
    let taps = p.kh * p.kw;
    let ci = k / taps;
    let t = k % taps;
    return vec4<i32>(i32(ci * p.h * p.w), i32((t / p.kw) * p.dil_y), i32((t % p.kw) * p.dil_x), i32(k < p.k));
}

fn b_load(col: vec4<i32>, row: vec4<i32>) -> f32 {
    let iy = col.y + row.y;
    let ix = col.z + row.z;
    if ((col.w & row.w) == 0 || iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) { return 0.0; }
    return f32(x[col.x + row.x + iy * i32(p.w) + ix]);
}

fn c_store(batch: u32, m: u32, n_local: u32, acc: f32) {
    let n = p.n0 + n_local;
    let hw = p.ho * p.wo;
    let idx = ((n / hw) * p.cout + m) * hw + n % hw;
    var v = p.alpha * acc;
    if (p.has_bias != 0u) { v += f32(bias[m]); }
    v = activate(v, ACT);
    if (RESIDUAL) { v += f32(residual[idx]); }
    y[idx] = T(v);
}
