// Embedding gather: y[i, :] = table[ids[i], :] (token and position embeddings). Out-of-range ids give zeros.

const WG: u32 = 256u;

struct EmbeddingParams {
    n: u32,
    dim: u32,
    vocab: u32,
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
    var v = T(0.0);
    if (id < p.vocab) { v = table[id * p.dim + i % p.dim]; }
    y[i] = v;
}
