// Copies x, viewed as [outer, dim_in, inner], into y, viewed as [outer, dim_out, inner], at
// offset `offset` of the middle dimension: one dispatch per input of a concatenation.

const WG: u32 = 256u;

struct ConcatParams {
    outer: u32,
    dim_in: u32,
    inner: u32,
    dim_out: u32,
    offset: u32,
}

@group(0) @binding(0) var<uniform> p: ConcatParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let slab = p.dim_in * p.inner;
    if (i >= p.outer * slab) { return; }
    let o = i / slab;
    let r = i % slab;
    y[o * p.dim_out * p.inner + p.offset * p.inner + r] = x[i];
}
