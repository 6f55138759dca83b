// Embedding gather: y[i, :] = table[ids[i], :] (token and position embeddings), for the ids in
// the bound block of rows; other ids give zeros (zero_others) or are left to another dispatch.

const WG: u32 = 256u;

struct EmbeddingParams {
    n: u32,
    dim: u32,
    first: u32,
    rows: u32,
    base: u32,
    zero_others: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: EmbeddingParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<T>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n * p.dim) { return; }
    let id = ids[i / p.dim];
    if (id >= p.first && id - p.first < p.rows) {
        y[i] = table[p.base + (id - p.first) * p.dim + i % p.dim];
    } else if (p.zero_others == 1u) {
        y[i] = T(0.0);
    }
}
