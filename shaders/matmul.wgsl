// Batched strided matmul on the GEMM core: C = act(alpha * A.B + bias) + residual.
// Any strides (so transposes and head-split layouts need no copies); stride 0 broadcasts a batch.
// Constants: BIAS (0 none, 1 per column n as in Linear, 2 per row m), ACT (activations.wgsl), RESIDUAL,
// QA / QB: operand A (rows m) or B (columns n) is a quantised weight matrix read through quant.wgsl
// (the weight's rows are then A's rows or B's columns, its K values along k; a and b go unused).

struct MatmulParams {
    m: u32, n: u32, k: u32, _p0: u32,
    a_base: u32, a_bs: u32, a_rs: u32, a_cs: u32,
    b_base: u32, b_bs: u32, b_rs: u32, b_cs: u32,
    c_base: u32, c_bs: u32, c_rs: u32, bias_base: u32,
    r_base: u32, r_bs: u32, r_rs: u32, alpha: f32,
    q: QuantView,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read_write> c: array<T>;
@group(0) @binding(4) var<storage, read> bias: array<T>;
@group(0) @binding(5) var<storage, read> residual: array<T>;

fn gemm_dims() -> vec3<u32> { return vec3<u32>(p.m, p.n, p.k); }

fn a_load(batch: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
    if (QA) { return qweight_at(p.q, m, k); }
    return f32(a[p.a_base + batch * p.a_bs + m * p.a_rs + k * p.a_cs]);
}

fn b_col(batch: u32, n: u32) -> vec4<i32> {
    return vec4<i32>(i32(p.b_base + batch * p.b_bs + n * p.b_cs), 0, 0, i32(n < p.n));
}

fn b_row(k: u32) -> vec4<i32> {
    return vec4<i32>(i32(k * p.b_rs), 0, 0, i32(k < p.k));
}

fn b_load(col: vec4<i32>, row: vec4<i32>) -> f32 {
    if ((col.w & row.w) == 0) { return 0.0; }
    // Quantised B: the launcher sets unit strides and no base, so col.x is n and row.x is k.
    if (QB) { return qweight_at(p.q, u32(col.x), u32(row.x)); }
    return f32(b[col.x + row.x]);
}

fn c_store(batch: u32, m: u32, n: u32, acc: f32) {
    var v = p.alpha * acc;
    if (BIAS == 1u) { v += f32(bias[p.bias_base + n]); }
    if (BIAS == 2u) { v += f32(bias[p.bias_base + m]); }
    v = activate(v, ACT);
    if (RESIDUAL) { v += f32(residual[p.r_base + batch * p.r_bs + m * p.r_rs + n]); }
    c[p.c_base + batch * p.c_bs + m * p.c_rs + n] = T(v);
}
