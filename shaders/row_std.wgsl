// Unbiased standard deviation of each row (torch's x.std(dim)), two-pass, one workgroup per row.
// Needs reduce.wgsl. The output is f32 whatever T.

struct RowStdParams {
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<uniform> p: RowStdParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(RWG)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var s = 0.0;
    for (var i = tid; i < p.cols; i += RWG) { s += f32(x[base + i]); }
    let mean = workgroup_sum(s, tid) / f32(p.cols);
    var s2 = 0.0;
    for (var i = tid; i < p.cols; i += RWG) {
        let d = f32(x[base + i]) - mean;
        s2 += d * d;
    }
    let var_sum = workgroup_sum(s2, tid);
    if (tid == 0u) { y[r] = sqrt(var_sum / f32(max(p.cols, 2u) - 1u)); }
}
