// Workgroup reductions with subgroup operations, for adapters that have them (the kernel header
// then enables `subgroups`): each subgroup reduces in registers, its first invocation leaves the
// result in its own slot, and every invocation adds the slots in order, so the result is the same
// on every run (no atomics, no order that depends on scheduling). Two barriers where reduce.wgsl's
// tree takes two per halving. Same functions as reduce.wgsl; files that include this declare the
// input `x: array<T>`.

var<workgroup> red: array<f32, RWG>;

// Sum of `v` over the workgroup; every invocation gets the result. Must be called in uniform control flow.
fn workgroup_sum(v: f32, tid: u32) -> f32 {
    let partial = subgroupAdd(v);
    red[tid] = select(0.0, partial, subgroupBroadcastFirst(tid) == tid);
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < RWG; i++) { t += red[i]; }
    workgroupBarrier();
    return t;
}

fn workgroup_max(v: f32, tid: u32) -> f32 {
    let partial = subgroupMax(v);
    red[tid] = select(-3.0e38, partial, subgroupBroadcastFirst(tid) == tid);
    workgroupBarrier();
    var t = -3.0e38;
    for (var i = 0u; i < RWG; i++) { t = max(t, red[i]); }
    workgroupBarrier();
    return t;
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
