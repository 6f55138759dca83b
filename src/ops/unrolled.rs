//! Register-tiled kernels for software adapters (llvmpipe, SwiftShader), generated fully unrolled.
//!
//! On those adapters every storage-buffer load costs about as much as a dozen FMAs (each SIMD lane
//! loads separately), so the kernels keep large tiles in registers to reuse each load many times.
//! They name every tile element (`c3_1`, `q2_7`, ...) rather than indexing arrays, because the
//! shader compilers there put dynamically indexed arrays in per-lane memory, which costs as much
//! as the loads being saved. Generating the text keeps one source for every tile size.

use std::fmt::Write;

/// `gemm_register` for the GEMM core (gemm.wgsl's loader contract): each invocation computes
/// `tm x tn` outputs (`tn` a multiple of 4), rows strided by WY and columns by WX.
pub(crate) fn gemm_register(tm: u32, tn: u32) -> String {
    assert!(tn.is_multiple_of(4) && tm > 0);
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "@compute @workgroup_size(WX, WY)");
    let _ = writeln!(w, "fn gemm_register(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {{");
    let _ = writeln!(w, "    let dims = gemm_dims();\n    let batch = wid.z;\n    let m0 = wid.y * BM + lid.y;\n    let n0 = wid.x * BN + lid.x;");
    for j in 0..tn {
        let _ = writeln!(w, "    let col{j} = b_col(batch, n0 + {j}u * WX);");
    }
    for i in 0..tm {
        for q in 0..tn / 4 {
            let _ = writeln!(w, "    var c{i}_{q} = vec4<f32>(0.0);");
        }
    }
    let _ = writeln!(w, "    for (var k = 0u; k < dims.z; k++) {{\n        let row = b_row(k);");
    for q in 0..tn / 4 {
        let j = 4 * q;
        let _ = writeln!(w, "        let b{q} = vec4<f32>(b_load(col{j}, row), b_load(col{}, row), b_load(col{}, row), b_load(col{}, row));", j + 1, j + 2, j + 3);
    }
    for i in 0..tm {
        let _ = writeln!(w, "        let a{i} = vec4<f32>(a_load(batch, m0 + {i}u * WY, k));");
        for q in 0..tn / 4 {
            let _ = writeln!(w, "        c{i}_{q} = fma(a{i}, b{q}, c{i}_{q});");
        }
    }
    let _ = writeln!(w, "    }}");
    for i in 0..tm {
        for q in 0..tn / 4 {
            let _ = writeln!(w, "    store4(batch, m0 + {i}u * WY, n0 + {}u * WX, c{i}_{q}, dims);", 4 * q);
        }
    }
    let _ = writeln!(w, "}}\n");
    s.push_str(
        "// Stores v at row m, columns n, n + WX, n + 2 WX, n + 3 WX (those inside the output).\n\
         fn store4(batch: u32, m: u32, n: u32, v: vec4<f32>, dims: vec3<u32>) {\n\
         \x20   if (m >= dims.x) { return; }\n\
         \x20   for (var j = 0u; j < 4u; j++) {\n\
         \x20       if (n + j * WX < dims.y) { c_store(batch, m, n + j * WX, v[j]); }\n\
         \x20   }\n\
         }\n",
    );
    s
}

/// `attention_register` for attention.wgsl's parameters: each invocation owns `qb` query rows of
/// `d4` vec4s, so every key and value row it loads serves `qb` queries. The key loop bound is the
/// same for the whole workgroup (masking does the rest).
pub(crate) fn attention_register(qb: u32, d4: u32) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "@compute @workgroup_size(WGQ)");
    let _ = writeln!(w, "fn attention_register(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {{");
    let _ = writeln!(w, "    let q0 = p.q_off + (wid.x * WGQ + lid.x) * {qb}u;\n    let b = (p.bh_off + wid.y) / p.heads;\n    let h = (p.bh_off + wid.y) % p.heads;");
    for i in 0..qb {
        // Rows past the end read row nq - 1 (in bounds) and are masked out entirely.
        let _ = writeln!(w, "    let qa{i} = p.q_base + b * p.q_bs + h * p.q_hs + min(q0 + {i}u, p.nq - 1u) * p.q_ns;");
        let _ = writeln!(w, "    let e{i} = select(0u, key_end(q0 + {i}u), q0 + {i}u < p.nq);\n    var m{i} = -3.0e38;\n    var l{i} = 0.0;");
        for d in 0..d4 {
            let _ = writeln!(w, "    let q{i}_{d} = vec4<f32>(q[qa{i} + {d}u]) * p.scale_log2e;\n    var a{i}_{d} = vec4<f32>(0.0);");
        }
    }
    let _ = writeln!(w, "    let kb = p.k_base + b * p.k_bs + h * p.k_hs;\n    let vb = p.v_base + b * p.v_bs + h * p.v_hs;");
    let _ = writeln!(w, "    let wg_end = select(p.nk, min(p.nk, p.q_off + (wid.x * WGQ + WGQ) * {qb}u), p.causal != 0u);");
    let _ = writeln!(w, "    for (var j = 0u; j < wg_end; j++) {{\n        let ka = kb + j * p.k_ns;\n        let va = vb + j * p.v_ns;");
    for d in 0..d4 {
        let _ = writeln!(w, "        let k{d} = vec4<f32>(k[ka + {d}u]);");
    }
    for i in 0..qb {
        let terms: Vec<String> = (0..d4).map(|d| format!("dot(q{i}_{d}, k{d})")).collect();
        let _ = writeln!(w, "        let s{i} = {};\n        let keep{i} = j < e{i};", terms.join(" + "));
        // Rescale only when the running maximum moves (rare after the first keys).
        let _ = writeln!(w, "        if (keep{i} && s{i} > m{i}) {{\n            let corr = exp2(m{i} - s{i});\n            l{i} *= corr;");
        for d in 0..d4 {
            let _ = writeln!(w, "            a{i}_{d} *= corr;");
        }
        let _ = writeln!(w, "            m{i} = s{i};\n        }}\n        let p{i} = vec4<f32>(select(0.0, exp2(s{i} - m{i}), keep{i}));\n        l{i} += p{i}.x;");
    }
    for d in 0..d4 {
        let _ = writeln!(w, "        let v{d} = vec4<f32>(v[va + {d}u]);");
        for i in 0..qb {
            let _ = writeln!(w, "        a{i}_{d} = fma(v{d}, p{i}, a{i}_{d});");
        }
    }
    let _ = writeln!(w, "    }}");
    for i in 0..qb {
        let _ = writeln!(w, "    if (q0 + {i}u < p.nq) {{\n        let inv = select(0.0, 1.0 / l{i}, l{i} > 0.0);\n        let oa = p.o_base + b * p.o_bs + h * p.o_hs + (q0 + {i}u) * p.o_ns;");
        for d in 0..d4 {
            let _ = writeln!(w, "        o[oa + {d}u] = T4(a{i}_{d} * inv);");
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    s
}

/// Generated sources, built once per shape for the life of the process (a handful of strings).
pub(crate) fn cached(kind: &'static str, a: u32, b: u32, generate: impl FnOnce() -> String) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<(&'static str, u32, u32), &'static str>>> = OnceLock::new();
    let mut map = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    map.entry((kind, a, b)).or_insert_with(|| Box::leak(generate().into_boxed_str()))
}
