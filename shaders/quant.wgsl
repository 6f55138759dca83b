// Block-quantised weight matrices, dequantised where the GEMM core loads them (no f32 copy of
// the weights ever exists). Layout (src/gpu/dtype.rs): rows of K values in blocks of 32 along K;
// all blocks' packed values, then all f16 scales, then (q4_1, q5_1) all f16 minimums, read as u32
// words. Constant QTYPE picks the format (the dtype table's wgsl_quant): 1 q8_0, 2 q4_0, 3 q4_1,
// 4 q5_0, 5 q5_1. A q5 block is a q4 block's 4 words of low nibbles and a fifth word whose bit e
// is element e's high bit.

struct QuantView {
    // Blocks per row, and the word offsets of the scale and minimum regions.
    blocks_per_row: u32, scales: u32, mins: u32, row0: u32,
}

@group(0) @binding(6) var<storage, read> qweight: array<u32>;

// f16 parameter `blk` of the region starting at word `region`.
fn qparam(region: u32, blk: u32) -> f32 {
    return unpack2x16float(qweight[region + blk / 2u])[blk % 2u];
}

// Weight (row, k), rows counted from q.row0; the caller keeps k < K (padding decodes to 0 anyway).
fn qweight_at(q: QuantView, row: u32, k: u32) -> f32 {
    let blk = (q.row0 + row) * q.blocks_per_row + k / 32u;
    let e = k % 32u;
    let d = qparam(q.scales, blk);
    if (QTYPE == 1u) {
        let w = qweight[blk * 8u + e / 4u];
        return f32(extractBits(bitcast<i32>(w), (e % 4u) * 8u, 8u)) * d;
    }
    if (QTYPE >= 4u) {
        let w = blk * 5u;
        let v = f32(extractBits(qweight[w + e / 8u], (e % 8u) * 4u, 4u) | (extractBits(qweight[w + 4u], e, 1u) << 4u));
        if (QTYPE == 4u) {
            return (v - 16.0) * d;
        }
        return fma(v, d, qparam(q.mins, blk));
    }
    let v = f32(extractBits(qweight[blk * 4u + e / 8u], (e % 8u) * 4u, 4u));
    if (QTYPE == 2u) {
        return (v - 8.0) * d;
    }
    return fma(v, d, qparam(q.mins, blk));
}
