// Broadcasting binary ops over up to 4 dimensions: y = a OP b (OP: 0 add, 1 mul), then ACT.
// Needs activations.wgsl. A broadcast dimension has stride 0.

const WG: u32 = 256u;

struct BinaryParams {
    n: u32,
    a_base: u32,
    b_base: u32,
    y_base: u32,
    dims: vec4<u32>,
    a_strides: vec4<u32>,
    b_strides: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: BinaryParams;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n) { return; }
    var rest = i;
    var ia = p.a_base;
    var ib = p.b_base;
    for (var d = 3; d >= 0; d--) {
        let c = rest % p.dims[d];
        rest = rest / p.dims[d];
        ia += c * p.a_strides[d];
        ib += c * p.b_strides[d];
    }
    let va = f32(a[ia]);
    let vb = f32(b[ib]);
    var r: f32;
    if (OP == 0u) { r = va + vb; } else { r = va * vb; }
    y[p.y_base + i] = T(activate(r, ACT));
}
