//! `ldm serve`: the app at `/`, model folders at `/models/`, range requests, CORS, caching headers,
//! and `ldm generate` reading a model from it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

use common::fixtures;

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("www");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["serve", "--port", "0", "--root", root.to_str().expect("utf-8"), "--models", fixtures().to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ldm serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("first line");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("URL printed").to_string();
    Server { child, url }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().new_agent()
}

fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.call().expect("request");
    let status = resp.status().as_u16();
    let hs = resp.headers().iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let body = resp.body_mut().with_config().limit(1 << 30).read_to_vec().unwrap_or_default();
    (status, hs, body)
}

fn h<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[test]
fn serves_app_and_models_with_ranges() {
    let s = start();
    let (status, hs, body) = get(&s.url, &[]);
    assert_eq!(status, 200);
    assert!(h(&hs, "content-type").is_some_and(|t| t.starts_with("text/html")), "{hs:?}");
    assert_eq!(h(&hs, "cross-origin-opener-policy"), Some("same-origin"));
    assert!(String::from_utf8_lossy(&body).contains("<html") || String::from_utf8_lossy(&body).contains("<!doctype"), "index.html served");

    let file = fixtures().join("sd1/unet/diffusion_pytorch_model.safetensors");
    let data = std::fs::read(&file).expect("fixture");
    let url = format!("{}models/sd1/unet/diffusion_pytorch_model.safetensors", s.url);
    let (status, hs, body) = get(&url, &[("Range", "bytes=8-107")]);
    assert_eq!(status, 206);
    assert_eq!(body, data[8..108]);
    assert_eq!(h(&hs, "content-range"), Some(format!("bytes 8-107/{}", data.len()).as_str()));
    assert_eq!(h(&hs, "access-control-allow-origin"), Some("*"));
    assert!(h(&hs, "access-control-expose-headers").is_some_and(|v| v.contains("Content-Range")));
    assert_eq!(h(&hs, "content-type"), Some("application/octet-stream"));
    let (status, _, body) = get(&url, &[("Range", "bytes=-16")]);
    assert_eq!((status, body.as_slice()), (206, &data[data.len() - 16..]));
    let (status, hs, _) = get(&url, &[("Range", &format!("bytes={}-", data.len()))]);
    assert_eq!(status, 416);
    assert_eq!(h(&hs, "content-range"), Some(format!("bytes */{}", data.len()).as_str()));
    let (status, hs, body) = get(&url, &[]);
    assert_eq!((status, body.len()), (200, data.len()));
    let etag = h(&hs, "etag").expect("etag").to_string();
    assert_eq!(h(&hs, "cache-control"), Some("public, max-age=86400"));
    let (status, _, _) = get(&url, &[("If-None-Match", &etag)]);
    assert_eq!(status, 304);
    let (status, hs, _) = get(&format!("{}models/sd1/model_index.json", s.url), &[]);
    assert_eq!(status, 200);
    assert!(h(&hs, "content-type").is_some_and(|t| t.starts_with("application/json")));
    let resp = agent().head(&url).call().expect("HEAD");
    assert_eq!(resp.headers().get("content-length").and_then(|v| v.to_str().ok()), Some(data.len().to_string().as_str()));
    let (status, _, _) = get(&format!("{}models/sd1/nope.json", s.url), &[]);
    assert_eq!(status, 404);
    let resp = agent().options(&url).call().expect("OPTIONS");
    assert_eq!(resp.status().as_u16(), 204);

    // A raw request that climbs out of the models folder (clients would normalise the path).
    let addr = s.url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut tcp = std::net::TcpStream::connect(&addr).expect("connect");
    write!(tcp, "GET /models/../../Cargo.toml HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).expect("read");
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}

#[test]
fn generate_reads_a_served_model() {
    let s = start();
    let dir = std::env::temp_dir().join(format!("ldm-serve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let out = dir.join("served.png");
    let model = format!("{}models/sd1/", s.url);
    let status = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["generate", "--model", &model, "--prompt", "a photo of an astronaut riding a horse on mars", "--seed", "0", "--steps", "5", "--width", "64", "--height", "64", "--out", out.to_str().expect("utf-8")])
        .env("XDG_RUNTIME_DIR", "/tmp")
        .status()
        .expect("ldm generate runs");
    assert!(status.success());
    let dec = png::Decoder::new(BufReader::new(std::fs::File::open(&out).expect("png")));
    let mut r = dec.read_info().expect("header");
    let mut px = vec![0; r.output_buffer_size().expect("size")];
    r.next_frame(&mut px).expect("data");
    let want = &common::reference("pipeline_0.safetensors")["image"].1;
    let worst = px.iter().zip(want).map(|(&p, &w)| (p as f32 - (w * 255.0).round()).abs()).fold(0.0, f32::max);
    assert!(worst <= 2.0, "served model image differs by {worst}/255");
}
