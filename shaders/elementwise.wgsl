// Elementwise kernels: activations with scale/shift, broadcasting add/mul, GEGLU.
// Needs activations.wgsl. Constants: ACT (activation code), OP (0 add, 1 mul).

const WG: u32 = 256u;

struct UnaryParams {
    n: u32,
    x_base: u32,
    y_base: u32,
    _pad: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> up: UnaryParams;
@group(0) @binding(1) var<storage, read> ux: array<T>;
@group(0) @binding(2) var<storage, read_write> uy: array<T>;

// y = act(alpha * x + beta)
@compute @workgroup_size(256)
fn unary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= up.n) { return; }
    uy[up.y_base + i] = T(activate(up.alpha * f32(ux[up.x_base + i]) + up.beta, ACT));
}
