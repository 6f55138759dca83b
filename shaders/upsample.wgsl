// Nearest-neighbour 2x upsampling of NCHW planes (diffusers' Upsample2D interpolate(scale=2)).

const WG: u32 = 256u;

struct UpsampleParams {
    planes: u32,
    h: u32,
    w: u32,
}

@group(0) @binding(0) var<uniform> p: UpsampleParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let w2 = 2u * p.w;
    let plane = 4u * p.h * p.w;
    if (i >= p.planes * plane) { return; }
    let c = i / plane;
    let r = i % plane;
    y[i] = x[c * p.h * p.w + (r / w2 / 2u) * p.w + (r % w2) / 2u];
}
