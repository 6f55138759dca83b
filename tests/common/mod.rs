//! Shared helpers of the reference tests: fixtures, a device, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ldm_web::gpu::{Gpu, GpuOptions};
use ldm_web::loader::{DirSource, WeightFile, Weights};

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A native f32 device (lavapipe here).
pub fn gpu() -> Gpu {
    std::env::set_var("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()));
    pollster::block_on(Gpu::new(GpuOptions { force_f32: true, ..Default::default() })).expect("a Vulkan adapter (lavapipe: apt-get install mesa-vulkan-drivers)")
}

/// Every tensor of a reference file `tests/fixtures/ref/<name>` as (shape, f32 values).
pub fn reference(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let src = DirSource::new(fixtures().join("ref"));
    pollster::block_on(async {
        let file = WeightFile::open(&src, name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let w = Weights::new(&src, vec![file]);
        let names: Vec<String> = w.names().map(String::from).collect();
        let mut out = HashMap::new();
        for n in names {
            let v = w.read_f32(&n).await.expect("reads");
            out.insert(n, v);
        }
        out
    })
}

/// Largest absolute difference, and the largest |reference| (for relative tolerances).
pub fn max_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let m = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
    (d, m)
}

/// Asserts `max |got - want| <= tol * max(1, max |want|)` and prints the error.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let (d, m) = max_diff(got, want);
    let rel = d / m.max(1.0);
    println!("{what}: max abs diff {d:.3e} (max |ref| {m:.3}), relative {rel:.3e}, tolerance {tol:.1e}");
    assert!(rel <= tol && got.iter().all(|v| v.is_finite()), "{what}: relative error {rel:.3e} exceeds {tol:.1e}");
}
