// Memory-efficient attention (online softmax): O = softmax(scale * Q K^T [+ causal mask]) V,
// one invocation per query row, keys streamed; the Nq x Nk score matrix never exists.
// Q, K, V, O are read through strides (in vec4 units), so [B, N, H*D] and [B, H, N, D] layouts
// and slices of a fused QKV projection need no copies.
// Constants: D4 (head dim / 4), WGQ (invocations per workgroup), BKV (keys per workgroup-memory
// tile in attention_tiled).

@group(0) @binding(1) var<storage, read> q: array<T4>;
@group(0) @binding(2) var<storage, read> k: array<T4>;
@group(0) @binding(3) var<storage, read> v: array<T4>;
@group(0) @binding(4) var<storage, read_write> o: array<T4>;

// exp2 of scores pre-multiplied by log2(e): one multiply fewer per key.
struct Row {
    acc: array<vec4<f32>, D4>,
    mx: f32,
    l: f32,
}

fn load_q(qi: u32, b: u32, h: u32) -> array<vec4<f32>, D4> {
    var qv: array<vec4<f32>, D4>;
    if (qi < p.nq) {
        let base = p.q_base + b * p.q_bs + h * p.q_hs + qi * p.q_ns;
        for (var d = 0u; d < D4; d++) { qv[d] = vec4<f32>(q[base + d]) * p.scale_log2e; }
    }
    return qv;
}

// O row = acc / l (a fully masked row gives zeros).
fn store_row(row: ptr<function, Row>, qi: u32, b: u32, h: u32) {
    if (qi >= p.nq) { return; }
    let inv = select(0.0, 1.0 / (*row).l, (*row).l > 0.0);
    let base = p.o_base + b * p.o_bs + h * p.o_hs + qi * p.o_ns;
    for (var d = 0u; d < D4; d++) { o[base + d] = T4((*row).acc[d] * inv); }
}

// Adds a key with score s (log2 units) to the running softmax unless masked; returns its
// weight for the value row. The accumulator is rescaled only when the running maximum moves
// (rare after the first keys).
fn online_update(row: ptr<function, Row>, s: f32, keep: bool) -> f32 {
    if (keep && s > (*row).mx) {
        let corr = exp2((*row).mx - s);
        (*row).l *= corr;
        for (var d = 0u; d < D4; d++) { (*row).acc[d] *= corr; }
        (*row).mx = s;
    }
    let pr = select(0.0, exp2(s - (*row).mx), keep);
    (*row).l += pr;
    return pr;
}

fn key_end(qi: u32) -> u32 {
    return select(p.nk, min(p.nk, qi + 1u), p.causal != 0u);
}

// The software-adapter variant, attention_register, is generated unrolled by src/ops/unrolled.rs.

// Real GPUs: BKV keys and values at a time staged in workgroup memory for all WGQ queries.
var<workgroup> k_tile: array<vec4<f32>, BKV * D4>;
var<workgroup> v_tile: array<vec4<f32>, BKV * D4>;

@compute @workgroup_size(WGQ)
fn attention_tiled(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let qi = p.q_off + wid.x * WGQ + lid.x;
    let b = (p.bh_off + wid.y) / p.heads;
    let h = (p.bh_off + wid.y) % p.heads;
    let qv = load_q(qi, b, h);
    var row: Row;
    row.mx = -3.0e38;
    let kb = p.k_base + b * p.k_bs + h * p.k_hs;
    let vb = p.v_base + b * p.v_bs + h * p.v_hs;
    let end = select(0u, key_end(qi), qi < p.nq);
    // Uniform across the workgroup: the last key any of its queries needs.
    let wg_end = select(p.nk, min(p.nk, p.q_off + wid.x * WGQ + WGQ), p.causal != 0u);
    for (var t0 = 0u; t0 < wg_end; t0 += BKV) {
        for (var e = lid.x; e < BKV * D4; e += WGQ) {
            let j = t0 + e / D4;
            let d = e % D4;
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if (j < p.nk) {
                kv = vec4<f32>(k[kb + j * p.k_ns + d]);
                vv = vec4<f32>(v[vb + j * p.v_ns + d]);
            }
            k_tile[e] = kv;
            v_tile[e] = vv;
        }
        workgroupBarrier();
        let jn = min(BKV, wg_end - t0);
        for (var jj = 0u; jj < jn; jj++) {
            var s4 = vec4<f32>(0.0);
            for (var d = 0u; d < D4; d++) { s4 = fma(qv[d], k_tile[jj * D4 + d], s4); }
            let pr = online_update(&row, s4.x + s4.y + s4.z + s4.w, t0 + jj < end);
            for (var d = 0u; d < D4; d++) { row.acc[d] = fma(v_tile[jj * D4 + d], vec4<f32>(pr), row.acc[d]); }
        }
        workgroupBarrier();
    }
    store_row(&row, qi, b, h);
}
