// LayerNorm over the last dimension, one workgroup per row. AFFINE applies gamma and beta.
// Needs reduce.wgsl.

struct LayerNormParams {
    rows: u32,
    cols: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: LayerNormParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> gamma: array<T>;
@group(0) @binding(3) var<storage, read> beta: array<T>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;

@compute @workgroup_size(RWG)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    let stats = mean_rstd(base, p.cols, p.eps, tid);
    let mean = stats.x;
    let rstd = stats.y;
    for (var i = tid; i < p.cols; i += RWG) {
        var v = (f32(x[base + i]) - mean) * rstd;
        if (AFFINE) { v = v * f32(gamma[i]) + f32(beta[i]); }
        y[base + i] = T(v);
    }
}
