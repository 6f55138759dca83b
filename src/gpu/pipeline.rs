//! WGSL specialisation and the compute pipeline cache.
//!
//! Every shader in `shaders/` is written once against the element type `T` (and `T4 = vec4<T>`);
//! the header generated here makes it an f32 or an f16 kernel and adds `const` values for the
//! variant (tile sizes, fused epilogues), so each variant is compiled once and cached.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write;
use std::rc::Rc;

use super::dtype::DType;

/// A compile-time value baked into a kernel variant.
#[derive(Clone, Copy, Debug)]
pub enum Def {
    U32(u32),
    Bool(bool),
    /// A WGSL extension the variant needs: `enable NAME;` (e.g. `subgroups`).
    Enable,
}

/// One kernel variant: WGSL sources (concatenated), entry point, element type and constants.
pub struct Kernel<'a> {
    /// Kernel family, for messages and cache keys.
    pub family: &'static str,
    pub sources: &'a [&'a str],
    pub entry: &'static str,
    pub dtype: DType,
    pub defs: &'a [(&'static str, Def)],
}

impl Kernel<'_> {
    pub fn name(&self) -> String {
        format!("{}::{} ({})", self.family, self.entry, self.dtype.name())
    }

    fn key(&self) -> String {
        let mut k = format!("{}/{}/{}", self.family, self.entry, self.dtype.name());
        for (n, d) in self.defs {
            let _ = write!(k, "/{n}={d:?}");
        }
        k
    }

    /// Full WGSL text of this variant.
    pub fn source(&self) -> String {
        let ty = self.dtype.info().wgsl.expect("kernels store only float dtypes");
        let mut s = String::new();
        if self.dtype == DType::F16 {
            s.push_str("enable f16;\n");
        }
        // Browsers require the directive for extensions such as subgroups; native wgpu's naga turns
        // them on with the device feature and rejects the directive as unsupported.
        if cfg!(target_arch = "wasm32") {
            for (name, d) in self.defs {
                if let Def::Enable = d {
                    let _ = writeln!(s, "enable {name};");
                }
            }
        }
        let _ = writeln!(s, "alias T = {ty};\nalias T4 = vec4<{ty}>;");
        for (name, d) in self.defs {
            let _ = match d {
                Def::U32(v) => writeln!(s, "const {name}: u32 = {v}u;"),
                Def::Bool(v) => writeln!(s, "const {name}: bool = {v};"),
                Def::Enable => Ok(()),
            };
        }
        for src in self.sources {
            s.push_str(src);
            s.push('\n');
        }
        s
    }
}

/// A compiled variant with its bind group layout (fetched once, not per dispatch).
pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// Compiled pipelines by variant.
#[derive(Default)]
pub(crate) struct PipelineCache {
    map: RefCell<HashMap<String, Rc<CachedPipeline>>>,
}

impl PipelineCache {
    pub fn get(&self, device: &wgpu::Device, k: &Kernel) -> Rc<CachedPipeline> {
        let key = k.key();
        if let Some(p) = self.map.borrow().get(&key) {
            return p.clone();
        }
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&key),
            source: wgpu::ShaderSource::Wgsl(k.source().into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: None,
            module: &module,
            entry_point: Some(k.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let pipeline = Rc::new(CachedPipeline { layout: pipeline.get_bind_group_layout(0), pipeline });
        self.map.borrow_mut().insert(key, pipeline.clone());
        pipeline
    }
}

/// Splits a workgroup count over x and y so neither exceeds the per-dimension limit.
/// Shaders recover the linear index as `wid.x + wid.y * nwg.x`.
pub(crate) fn grid(workgroups: u32, max_per_dim: u32) -> [u32; 3] {
    if workgroups <= max_per_dim {
        [workgroups, 1, 1]
    } else {
        let y = workgroups.div_ceil(max_per_dim);
        [workgroups.div_ceil(y), y, 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_variant_enables_the_extension() {
        let k = Kernel { family: "t", sources: &["fn f(x: T) -> T { return x; }"], entry: "main", dtype: DType::F16, defs: &[("TILE", Def::U32(4)), ("FUSE", Def::Bool(true))] };
        let s = k.source();
        assert!(s.starts_with("enable f16;\nalias T = f16;"));
        let sg = Kernel { defs: &[("subgroups", Def::Enable)], ..k };
        let expected = if cfg!(target_arch = "wasm32") { "enable f16;\nenable subgroups;\nalias T = f16;" } else { "enable f16;\nalias T = f16;" };
        assert!(sg.source().starts_with(expected));
        assert!(s.contains("const TILE: u32 = 4u;") && s.contains("const FUSE: bool = true;"));
        let k32 = Kernel { dtype: DType::F32, ..k };
        assert!(!k32.source().contains("enable f16"));
        assert_ne!(k32.key(), Kernel { dtype: DType::F16, ..k32 }.key());
    }

    #[test]
    fn grid_respects_the_dimension_limit() {
        assert_eq!(grid(10, 65535), [10, 1, 1]);
        let g = grid(200_000, 65535);
        assert!(g[0] <= 65535 && g[0] * g[1] >= 200_000);
    }
}
