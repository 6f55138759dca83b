//! `ldm serve`: the web app and model folders over HTTP, with range requests, CORS and caching
//! headers, as a CDN would serve them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use ldm_web::{Error, Result};

/// `ldm serve` flags.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to bind; anything but loopback exposes the files to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The built web app, served at `/`.
    #[arg(long, default_value = "www")]
    root: PathBuf,
    /// A folder of models: each path under it is served at `/models/<path>`.
    #[arg(long)]
    models: Option<PathBuf>,
    /// Testing: the first GET of a path containing this text sends half its body, then drops the
    /// connection, as a flaky network would.
    #[arg(long, hide = true)]
    inject_fault: Option<String>,
}

/// Sends the first `half` bytes of a range response, then breaks the chunked framing, so the
/// client sees the connection fail mid-body and closes it (tiny_http cannot close a socket itself).
fn tear(req: tiny_http::Request, headers: Vec<tiny_http::Header>, mut f: File, half: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut body = vec![0u8; half as usize];
    f.read_exact(&mut body)?;
    let mut w = req.into_writer();
    write!(w, "HTTP/1.1 206 Partial Content\r\n")?;
    for h in &headers {
        write!(w, "{}: {}\r\n", h.field, h.value)?;
    }
    write!(w, "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n", body.len())?;
    w.write_all(&body)?;
    w.write_all(b"\r\n")?;
    w.flush()?;
    // Let the client take in what arrived before the break, as it would on a real network.
    std::thread::sleep(std::time::Duration::from_millis(300));
    w.write_all(b"not-a-chunk-size\r\n")?;
    w.flush()
}

/// The one fault `--inject-fault` asks for, taken by the first matching request.
struct Fault {
    pattern: Option<String>,
    fired: std::sync::atomic::AtomicBool,
}

impl Fault {
    fn take(&self, url: &str, len: u64) -> bool {
        let hit = self.pattern.as_deref().is_some_and(|p| url.contains(p)) && len > 1;
        hit && !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Content types of the files the app and models are made of.
fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json; charset=utf-8",
        Some("webmanifest") => "application/manifest+json",
        Some("css") => "text/css; charset=utf-8",
        Some("txt" | "wgsl" | "md") => "text/plain; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes: `Ok(None)` serves the
/// whole file (no range, or several ranges, which RFC 9110 lets a server ignore), `Err(())` is
/// unsatisfiable.
pub fn parse_range(header: Option<&str>, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else { return Ok(None) };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (None, Some(n)) if a.is_empty() => {
            if n == 0 || size == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size - 1)
        }
        (Some(s), None) if b.is_empty() => (s, size.saturating_sub(1)),
        (Some(s), Some(e)) if s <= e => (s, e.min(size.saturating_sub(1))),
        _ => return Ok(None),
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// The file for a URL path under `root`, refusing anything that climbs out of it.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(url_path)?;
    let rel = Path::new(decoded.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let mut p = root.join(rel);
    if p.is_dir() {
        p = p.join("index.html");
    }
    Some(p)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The response headers the app asks for in `_headers` in its folder (the file Netlify and
/// Cloudflare Pages read): the lines of its `/*` section, `Name: value`, indented. Other path
/// sections are ignored: the app has only the one. No file: no headers.
fn app_headers(root: &Path) -> Result<Vec<(String, String)>> {
    let path = root.join("_headers");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io(format!("cannot read {}: {e}", path.display()))),
    };
    parse_headers_file(&text).map_err(|line| Error::Io(format!("{}: line {line} is not `Name: value` under a path; see https://docs.netlify.com/routing/headers/", path.display())))
}

/// The `/*` section of a `_headers` file; Err(line number) for a line that is not understood.
fn parse_headers_file(text: &str) -> std::result::Result<Vec<(String, String)>, usize> {
    let mut out = Vec::new();
    let mut section: Option<bool> = None; // Some(whether the section is `/*`)
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            section = Some(trimmed == "/*");
            continue;
        }
        let (Some(in_root), Some((name, value))) = (section, trimmed.split_once(':')) else { return Err(i + 1) };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || !value.is_ascii() {
            return Err(i + 1);
        }
        if in_root {
            out.push((name.to_string(), value.to_string()));
        }
    }
    Ok(out)
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

fn respond(req: tiny_http::Request, app_root: &Path, models: Option<&Path>, fault: &Fault, app: &[(String, String)]) {
    let url = req.url().split(['?', '#']).next().unwrap_or("/").to_string();
    let method = req.method().clone();
    let range_h = req.headers().iter().find(|h| h.field.equiv("Range")).map(|h| h.value.as_str().to_string());
    let if_none_match = req.headers().iter().find(|h| h.field.equiv("If-None-Match")).map(|h| h.value.as_str().to_string());
    let (root, rel, is_model) = match (url.strip_prefix("/models/"), models) {
        (Some(rest), Some(m)) => (m, rest.to_string(), true),
        _ => (app_root, url.clone(), false),
    };
    let mut headers = vec![
        header("Access-Control-Allow-Origin", "*"),
        header("Access-Control-Allow-Headers", "Range, If-None-Match"),
        header("Access-Control-Expose-Headers", "Content-Length, Content-Range, Accept-Ranges, ETag"),
        // Cross-origin isolation for the app (precise timers, SharedArrayBuffer).
        header("Cross-Origin-Opener-Policy", "same-origin"),
        header("Cross-Origin-Embedder-Policy", "require-corp"),
        header("Cross-Origin-Resource-Policy", "cross-origin"),
        header("Accept-Ranges", "bytes"),
    ];
    for (name, value) in app {
        headers.retain(|h| !h.field.to_string().eq_ignore_ascii_case(name));
        headers.push(header(name, value));
    }
    let log = |status: u16, bytes: u64, range: &Option<String>| {
        eprintln!("{method} {url} {status} {bytes}{}", range.as_ref().map(|r| format!(" range={r}")).unwrap_or_default());
    };
    let result = match method {
        tiny_http::Method::Options => {
            log(204, 0, &None);
            req.respond(tiny_http::Response::empty(204).with_header(header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")))
        }
        tiny_http::Method::Get | tiny_http::Method::Head => {
            let file = resolve(root, &rel).and_then(|p| File::open(&p).ok().map(|f| (p, f)));
            let Some((path, mut f)) = file.filter(|(_, f)| f.metadata().is_ok_and(|m| m.is_file())) else {
                log(404, 0, &range_h);
                let _ = req.respond(tiny_http::Response::from_string("not found").with_status_code(404).with_header(header("Access-Control-Allow-Origin", "*")));
                return;
            };
            let meta = f.metadata().ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta.and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
            let etag = format!("\"{size:x}-{mtime:x}\"");
            headers.push(header("Content-Type", content_type(&path)));
            headers.push(header("ETag", &etag));
            // Model files are large and change rarely: cache, but revalidate by ETag after a day.
            // The app shell always revalidates so an update shows on the next load.
            headers.push(header("Cache-Control", if is_model { "public, max-age=86400" } else { "no-cache" }));
            if if_none_match.as_deref() == Some(etag.as_str()) {
                log(304, 0, &range_h);
                let mut r = tiny_http::Response::empty(304);
                for h in headers {
                    r.add_header(h);
                }
                let _ = req.respond(r);
                return;
            }
            match parse_range(range_h.as_deref(), size) {
                Err(()) => {
                    log(416, 0, &range_h);
                    headers.push(header("Content-Range", &format!("bytes */{size}")));
                    req.respond(tiny_http::Response::new(tiny_http::StatusCode(416), headers, std::io::empty(), Some(0), None))
                }
                Ok(Some((start, end))) => {
                    let len = end - start + 1;
                    if f.seek(SeekFrom::Start(start)).is_err() {
                        return;
                    }
                    headers.push(header("Content-Range", &format!("bytes {start}-{end}/{size}")));
                    if method == tiny_http::Method::Get && fault.take(&url, len) {
                        log(206, len / 2, &range_h.as_ref().map(|r| format!("{r} fault=dropped-after-{}", len / 2)));
                        tear(req, headers, f, len / 2)
                    } else {
                        log(206, len, &range_h);
                        req.respond(tiny_http::Response::new(tiny_http::StatusCode(206), headers, f.take(len), Some(len as usize), None).with_chunked_threshold(usize::MAX))
                    }
                }
                Ok(None) => {
                    log(200, size, &range_h);
                    // Always a Content-Length (tiny_http would go chunked above 32 KiB): download progress
                    // and HEAD size checks depend on it.
                    req.respond(tiny_http::Response::new(tiny_http::StatusCode(200), headers, f, Some(size as usize), None).with_chunked_threshold(usize::MAX))
                }
            }
        }
        _ => {
            log(405, 0, &None);
            req.respond(tiny_http::Response::empty(405).with_header(header("Allow", "GET, HEAD, OPTIONS")))
        }
    };
    if let Err(e) = result {
        eprintln!("ldm serve: {url}: {e}");
    }
}

/// Runs the server until killed; prints its URL first.
pub fn run(a: &ServeArgs) -> Result<String> {
    if !a.root.is_dir() {
        return Err(Error::Io(format!("{} is not a folder; build the app first (./build.sh build) or pass --root", a.root.display())));
    }
    if let Some(m) = &a.models {
        if !m.is_dir() {
            return Err(Error::Io(format!("--models {} is not a folder", m.display())));
        }
    }
    let server = tiny_http::Server::http((a.host.as_str(), a.port)).map_err(|e| Error::Io(format!("cannot listen on {}:{}: {e}", a.host, a.port)))?;
    let port = server.server_addr().to_ip().map_or(a.port, |s| s.port());
    println!("serving {} on http://{}:{port}/{}", a.root.display(), a.host, a.models.as_ref().map(|m| format!(" (models from {} at /models/)", m.display())).unwrap_or_default());
    let server = Arc::new(server);
    let (root, models) = (Arc::new(a.root.clone()), Arc::new(a.models.clone()));
    let fault = Arc::new(Fault { pattern: a.inject_fault.clone(), fired: Default::default() });
    let app = Arc::new(app_headers(&a.root)?);
    // A handful of threads: a browser opens several connections for range requests.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (server, root, models, fault, app) = (server.clone(), root.clone(), models.clone(), fault.clone(), app.clone());
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    respond(req, &root, models.as_deref(), &fault, &app);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_file() {
        let h = parse_headers_file("# c\n/*\n  A-B: x; y 'z'\n/other\n  C: d\n/*\n\tE: f\n").expect("parses");
        assert_eq!(h, vec![("A-B".to_string(), "x; y 'z'".to_string()), ("E".to_string(), "f".to_string())]);
        assert_eq!(parse_headers_file("/*\n  no colon\n"), Err(2));
        assert_eq!(parse_headers_file("  A: b\n"), Err(1));
    }

    /// The app's Content-Security-Policy: `_headers` sends it, index.html's meta repeats it for
    /// hosts that cannot send headers, and the two must not drift apart.
    #[test]
    fn app_policy_in_headers_and_page() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("www");
        let h = app_headers(&root).expect("www/_headers parses");
        let csp = h.iter().find(|(n, _)| n == "Content-Security-Policy").map(|(_, v)| v.clone()).expect("www/_headers has a Content-Security-Policy");
        assert!(!csp.contains("'unsafe-eval'") && !csp.contains("'unsafe-inline'") && csp.contains("'wasm-unsafe-eval'"), "{csp}");
        let page = std::fs::read_to_string(root.join("index.html")).expect("www/index.html");
        assert!(page.contains(&format!("<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">")), "index.html's meta differs from _headers: {csp}");
        for name in ["Cross-Origin-Opener-Policy", "Cross-Origin-Embedder-Policy"] {
            assert!(h.iter().any(|(n, _)| n == name), "www/_headers lacks {name}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=2-5"), 10), Ok(Some((2, 5))));
        assert_eq!(parse_range(Some("bytes=2-"), 10), Ok(Some((2, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
    }

    #[test]
    fn paths_stay_inside_the_root() {
        let root = Path::new("/srv");
        assert_eq!(resolve(root, "/a/b.json"), Some(PathBuf::from("/srv/a/b.json")));
        assert_eq!(resolve(root, "/a%20b.json"), Some(PathBuf::from("/srv/a b.json")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/%2e%2e/%2e%2e/etc"), None);
        assert_eq!(resolve(root, "/%zz"), None);
    }
}
