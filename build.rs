//! Lists the built-in model's files (assets/builtin/emoji) for the `ldm` binary, which compiles
//! them in so `ldm generate` works with no model folder and no download.

use std::path::Path;

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            collect(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            // The model card and licences travel with the folder but are not model files.
            let rel = rel.to_string_lossy().replace('\\', "/");
            if !rel.ends_with(".md") {
                out.push(rel);
            }
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/builtin/emoji");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let body: String = files.iter().map(|f| format!("    ({f:?}, include_bytes!({:?})),\n", root.join(f).display().to_string())).collect();
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("builtin_files.rs");
    std::fs::write(out, format!("&[\n{body}]\n")).expect("write builtin_files.rs");
}
