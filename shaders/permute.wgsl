// Strided copy: y (contiguous, up to 8 dims) from x read through per-output-dimension strides.
// Implements permute / transpose and making a strided view contiguous.

const WG: u32 = 256u;

struct PermuteParams {
    n: u32,
    rank: u32,
    x_base: u32,
    _pad: u32,
    dims: array<vec4<u32>, 2>,
    strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: PermuteParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n) { return; }
    var rest = i;
    var src = p.x_base;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let size = p.dims[d / 4][d % 4];
        src += (rest % size) * p.strides[d / 4][d % 4];
        rest /= size;
    }
    y[i] = x[src];
}
