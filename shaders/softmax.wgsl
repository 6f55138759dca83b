// Softmax over the last dimension of scale * x, one workgroup per row. Needs reduce.wgsl.

struct SoftmaxParams {
    rows: u32,
    cols: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: SoftmaxParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(RWG)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var m = -3.0e38;
    for (var i = tid; i < p.cols; i += RWG) { m = max(m, p.scale * f32(x[base + i])); }
    let mx = workgroup_max(m, tid);
    var s = 0.0;
    for (var i = tid; i < p.cols; i += RWG) { s += exp(p.scale * f32(x[base + i]) - mx); }
    let inv = 1.0 / workgroup_sum(s, tid);
    for (var i = tid; i < p.cols; i += RWG) { y[base + i] = T(exp(p.scale * f32(x[base + i]) - mx) * inv); }
}
