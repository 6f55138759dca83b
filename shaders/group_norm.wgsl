// GroupNorm over NCHW (one workgroup per (image, group) "unit"; unit0 numbers the first one of a split dispatch), optionally followed by SiLU (SILU),
// as diffusers' ResNet blocks use it.
// Needs reduce.wgsl and activations.wgsl.

struct GroupNormParams {
    groups: u32,
    channels_per_group: u32,
    hw: u32,
    units: u32,
    unit0: u32,
    x_base: u32,
    y_base: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: GroupNormParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> gamma: array<T>;
@group(0) @binding(3) var<storage, read> beta: array<T>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;

@compute @workgroup_size(RWG)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let unit = wid.x + wid.y * nwg.x;
    if (unit >= p.units) { return; }
    let len = p.channels_per_group * p.hw;
    let xs = p.x_base + unit * len;
    let ys = p.y_base + unit * len;
    let stats = mean_rstd(xs, len, p.eps, tid);
    let mean = stats.x;
    let rstd = stats.y;
    let c0 = ((p.unit0 + unit) % p.groups) * p.channels_per_group;
    for (var i = tid; i < len; i += RWG) {
        let c = c0 + i / p.hw;
        var v = (f32(x[xs + i]) - mean) * rstd * f32(gamma[c]) + f32(beta[c]);
        if (SILU) { v = activate(v, 1u); }
        y[ys + i] = T(v);
    }
}
