//! The wasm-bindgen API used by the page's Web Worker (`www/engine-worker.js`).

use wasm_bindgen::prelude::*;

mod engine;
mod source;
mod train;

use crate::bench::BenchOptions;

/// `initThreadPool(n)`: starts the CPU backend's rayon pool of `n` Web Workers (the `threads`
/// build, for cross-origin-isolated pages).
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

fn js_err(e: impl std::fmt::Display) -> JsValue {
    JsValue::from_str(&e.to_string())
}

fn log(line: &str) {
    web_sys::console::log_1(&JsValue::from_str(line));
}

/// Runs the kernel test suite (cases whose name contains `filter`) on the browser's WebGPU
/// adapter or (`cpu`) the CPU backend; resolves to the report as JSON.
#[wasm_bindgen]
pub async fn run_kernel_tests(filter: String, cpu: bool) -> Result<String, JsValue> {
    let report = crate::suite::run_on(&filter, cpu, &|r| {
        let err = r.max_err.map_or(String::new(), |e| format!(" err={e:.2e} tol={:.0e}", r.tol.unwrap_or(0.0)));
        log(&format!("{} {} {}{err} {}", r.status, r.name, r.dtype, r.message));
    })
    .await
    .map_err(js_err)?;
    serde_json::to_string(&report).map_err(js_err)
}

/// Runs the kernel benchmarks (`which`: "small" or "sd", optionally "sd:FILTER") on the WebGPU
/// adapter or (`cpu`) the CPU backend; resolves to JSON.
#[wasm_bindgen]
pub async fn bench_kernels(which: String, cpu: bool) -> Result<String, JsValue> {
    let (shapes, filter) = which.split_once(':').unwrap_or((which.as_str(), ""));
    let opts = BenchOptions { shapes: if shapes.is_empty() { "small".into() } else { shapes.into() }, filter: filter.into(), cpu, ..Default::default() };
    let perf = js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("performance"))
        .ok()
        .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
        .ok_or_else(|| js_err("performance.now() is not available"))?;
    let now = move || perf.now();
    let report = crate::bench::run(&opts, &now).await.map_err(js_err)?;
    serde_json::to_string(&report).map_err(js_err)
}
