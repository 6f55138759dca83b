// Nearest-neighbour resizing of NCHW planes as torch's interpolate(mode="nearest"): output
// pixel (oy, ox) reads input (min(floor(oy * sh), h - 1), min(floor(ox * sw), w - 1)) with the
// scales in f32 as torch computes them (0.5 for diffusers' Upsample2D, in / out for a size).

const WG: u32 = 256u;

struct UpsampleParams {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    sh: f32,
    sw: f32,
}

@group(0) @binding(0) var<uniform> p: UpsampleParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let plane = p.oh * p.ow;
    if (i >= p.planes * plane) { return; }
    let c = i / plane;
    let r = i % plane;
    let sy = min(u32(floor(f32(r / p.ow) * p.sh)), p.h - 1u);
    let sx = min(u32(floor(f32(r % p.ow) * p.sw)), p.w - 1u);
    y[i] = x[c * p.h * p.w + sy * p.w + sx];
}
