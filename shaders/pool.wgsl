// Max pooling of NCHW planes: output (oy, ox) is the largest of the k x k inputs from
// (oy * stride - pad_top, ox * stride - pad_left); taps outside the input read pad_value (torch's
// implicit padding is -inf; BiT pads explicitly with 0 first).

const WG: u32 = 256u;

struct PoolParams {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    k: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    pad_value: f32,
}

@group(0) @binding(0) var<uniform> p: PoolParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let plane = p.oh * p.ow;
    if (i >= p.planes * plane) { return; }
    let c = i / plane;
    let oy = (i % plane) / p.ow;
    let ox = i % p.ow;
    var m = -3.0e38;
    for (var ky = 0u; ky < p.k; ky++) {
        let iy = i32(oy * p.stride + ky) - i32(p.pad_top);
        for (var kx = 0u; kx < p.k; kx++) {
            let ix = i32(ox * p.stride + kx) - i32(p.pad_left);
            var v = p.pad_value;
            if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                v = f32(x[c * p.h * p.w + u32(iy) * p.w + u32(ix)]);
            }
            m = max(m, v);
        }
    }
    y[i] = T(m);
}
