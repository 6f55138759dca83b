// GEMM core shared by matmul.wgsl and conv2d.wgsl: C[batch] (M x N) = A (M x K) . B (K x N).
// The including file supplies the operand access:
//   fn gemm_dims() -> vec3<u32>                       M, N, K
//   fn a_load(batch: u32, m: u32, k: u32) -> f32      0 outside
//   fn b_col(batch: u32, n: u32) -> vec4<i32>         per-column context, computed once per column
//   fn b_row(k: u32) -> vec4<i32>                     per-k context, shared by all columns
//   fn b_load(col: vec4<i32>, row: vec4<i32>) -> f32  0 outside
//   fn c_store(batch: u32, m: u32, n: u32, acc: f32)  epilogue
// Constants: WX, WY (workgroup shape), TM, TN (outputs per thread), BK (k tile of gemm_tiled).
// Each thread owns TM x TN outputs strided by WY / WX, so neighbouring invocations touch
// neighbouring addresses (coalesced on GPUs, contiguous SIMD lanes on CPU adapters).

const BM: u32 = WY * TM;
const BN: u32 = WX * TN;
const NT: u32 = WX * WY;

// The software-adapter variant, gemm_register, is generated unrolled by src/ops/unrolled.rs.

// Real GPUs: BM x BK and BK x BN tiles staged in workgroup memory, shared by NT threads.
var<workgroup> a_tile: array<f32, BK * BM>;
var<workgroup> b_tile: array<f32, BK * BN>;

@compute @workgroup_size(WX, WY)
fn gemm_tiled(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(local_invocation_index) tid: u32) {
    let dims = gemm_dims();
    let batch = wid.z;
    let m_base = wid.y * BM;
    let n_base = wid.x * BN;
    // B tile loads: element e = tid + r * NT is (k = e / BN, n = e % BN); NT % BN == 0 keeps n fixed.
    let b_n = tid % BN;
    let col = b_col(batch, n_base + b_n);
    // A tile loads: consecutive threads read consecutive k (row-major A is contiguous in k).
    let a_k = tid % BK;
    var acc: array<array<f32, TN>, TM>;
    for (var k0 = 0u; k0 < dims.z; k0 += BK) {
        for (var e = tid / BK; e < BM; e += NT / BK) {
            a_tile[a_k * BM + e] = a_load(batch, m_base + e, k0 + a_k);
        }
        for (var kk = tid / BN; kk < BK; kk += NT / BN) {
            b_tile[kk * BN + b_n] = b_load(col, b_row(k0 + kk));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var av: array<f32, TM>;
            var bv: array<f32, TN>;
            for (var i = 0u; i < TM; i++) { av[i] = a_tile[kk * BM + lid.y + i * WY]; }
            for (var j = 0u; j < TN; j++) { bv[j] = b_tile[kk * BN + lid.x + j * WX]; }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i][j] = fma(av[i], bv[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        for (var j = 0u; j < TN; j++) {
            let m = m_base + lid.y + i * WY;
            let n = n_base + lid.x + j * WX;
            if (m < dims.x && n < dims.y) { c_store(batch, m, n, acc[i][j]); }
        }
    }
}
