// Attention for any head dimension and any strides (attention.wgsl needs both in vec4s): the
// same online softmax, one invocation per query row, scalar loads. Used for head dims that are
// not a multiple of 4 (and views that are not vec4-aligned), which real models rarely have.
// Constants: D (head dim), WGQ (invocations per workgroup).

@group(0) @binding(1) var<storage, read> q: array<T>;
@group(0) @binding(2) var<storage, read> k: array<T>;
@group(0) @binding(3) var<storage, read> v: array<T>;
@group(0) @binding(4) var<storage, read_write> o: array<T>;

@compute @workgroup_size(WGQ)
fn attention_scalar(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let qi = p.q_off + wid.x * WGQ + lid.x;
    if (qi >= p.nq) { return; }
    let b = (p.bh_off + wid.y) / p.heads;
    let h = (p.bh_off + wid.y) % p.heads;
    var qv: array<f32, D>;
    var acc: array<f32, D>;
    let qb = p.q_base + b * p.q_bs + h * p.q_hs + qi * p.q_ns;
    for (var d = 0u; d < D; d++) {
        qv[d] = f32(q[qb + d]) * p.scale_log2e;
        acc[d] = 0.0;
    }
    let kb = p.k_base + b * p.k_bs + h * p.k_hs;
    let vb = p.v_base + b * p.v_bs + h * p.v_hs;
    let end = select(p.nk, min(p.nk, qi + 1u), p.causal != 0u);
    var mx = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j < end; j++) {
        var s = 0.0;
        for (var d = 0u; d < D; d++) { s = fma(qv[d], f32(k[kb + j * p.k_ns + d]), s); }
        if (s > mx) {
            let corr = exp2(mx - s);
            l *= corr;
            for (var d = 0u; d < D; d++) { acc[d] *= corr; }
            mx = s;
        }
        let pr = exp2(s - mx);
        l += pr;
        for (var d = 0u; d < D; d++) { acc[d] = fma(f32(v[vb + j * p.v_ns + d]), pr, acc[d]); }
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let ob = p.o_base + b * p.o_bs + h * p.o_hs + qi * p.o_ns;
    for (var d = 0u; d < D; d++) { o[ob + d] = T(acc[d] * inv); }
}
