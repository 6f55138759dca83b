// GEGLU (diffusers' GEGLU after its projection): x is [rows, 2d], y[r, j] = x[r, j] * gelu(x[r, d + j]).
// Needs activations.wgsl.

const WG: u32 = 256u;

struct GegluParams {
    rows: u32,
    d: u32,
}

@group(0) @binding(0) var<uniform> p: GegluParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.rows * p.d) { return; }
    let r = i / p.d;
    let j = i % p.d;
    let h = f32(x[r * 2u * p.d + j]);
    let g = f32(x[r * 2u * p.d + p.d + j]);
    y[i] = T(h * activate(g, 2u));
}
