// Workgroup reductions used by the normalisation and softmax kernels (RWG threads). Files that
// include this declare the input `x: array<T>`.

var<workgroup> red: array<f32, RWG>;

// Sum of `v` over the workgroup; every invocation gets the result. Must be called in uniform control flow.
fn workgroup_sum(v: f32, tid: u32) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = RWG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) { red[tid] += red[tid + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn workgroup_max(v: f32, tid: u32) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = RWG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) { red[tid] = max(red[tid], red[tid + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Mean and 1/sqrt(variance + eps) of x[base .. base + len), two-pass (mean, then centred
// variance) for accuracy. Must be called in uniform control flow.
fn mean_rstd(base: u32, len: u32, eps: f32, tid: u32) -> vec2<f32> {
    var s = 0.0;
    for (var i = tid; i < len; i += RWG) { s += f32(x[base + i]); }
    let mean = workgroup_sum(s, tid) / f32(len);
    var s2 = 0.0;
    for (var i = tid; i < len; i += RWG) {
        let d = f32(x[base + i]) - mean;
        s2 += d * d;
    }
    return vec2<f32>(mean, inverseSqrt(workgroup_sum(s2, tid) / f32(len) + eps));
}
