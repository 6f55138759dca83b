// The attention kernels' parameters (attention.wgsl, attention_scalar.wgsl): element strides of
// Q, K, V and O per batch, head and row (in vec4 units for attention.wgsl), from a base offset.

struct AttnParams {
    nq: u32, nk: u32, heads: u32, causal: u32,
    q_base: u32, q_bs: u32, q_hs: u32, q_ns: u32,
    k_base: u32, k_bs: u32, k_hs: u32, k_ns: u32,
    v_base: u32, v_bs: u32, v_hs: u32, v_ns: u32,
    o_base: u32, o_bs: u32, o_hs: u32, o_ns: u32,
    scale_log2e: f32,
    // First query row and first (batch, head) of this dispatch: large problems are split so that
    // no single dispatch runs long enough to trip a browser's GPU watchdog on software adapters.
    q_off: u32,
    bh_off: u32,
}

@group(0) @binding(0) var<uniform> p: AttnParams;
