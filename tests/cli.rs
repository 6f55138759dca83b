//! `ldm generate` end to end: PNG pixels and metadata, batches, models over HTTP, and a clear
//! one-line error (never a panic) for every kind of bad input.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures, reference};

fn ldm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ldm")).args(args).env("XDG_RUNTIME_DIR", "/tmp").output().expect("ldm runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ldm-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let p = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).expect("copy");
        }
    }
}

/// Decodes an RGB PNG and returns (pixels, text chunks).
fn read_png(path: &Path) -> (Vec<u8>, u32, u32, Vec<(String, String)>) {
    let dec = png::Decoder::new(BufReader::new(std::fs::File::open(path).expect("png exists")));
    let mut r = dec.read_info().expect("png header");
    let mut buf = vec![0; r.output_buffer_size().expect("size")];
    let info = r.next_frame(&mut buf).expect("png data");
    buf.truncate(info.buffer_size());
    let meta = r.info();
    let mut texts: Vec<(String, String)> = meta.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    texts.extend(meta.utf8_text.iter().map(|t| (t.keyword.clone(), t.get_text().unwrap_or_default())));
    (buf, info.width, info.height, texts)
}

const CASE0: &[&str] = &["--prompt", "a photo of an astronaut riding a horse on mars", "--seed", "0", "--steps", "5", "--guidance", "7.5", "--width", "64", "--height", "64"];

/// Pipeline case 0 through the CLI: pixels within 2/255 of diffusers (after 8-bit rounding) and
/// A1111-style parameters.
#[test]
fn generate_writes_diffusers_pixels_and_parameters() {
    let dir = tmp("generate");
    let out = dir.join("img.png");
    let model = fixtures().join("sd1");
    let mut args = vec!["generate", "--model", model.to_str().expect("utf-8"), "--out", out.to_str().expect("utf-8")];
    args.extend_from_slice(CASE0);
    let (ok, stdout, stderr) = ldm(&args);
    assert!(ok, "ldm failed: {stderr}");
    assert!(stdout.contains("img.png"), "{stdout}");
    let (px, w, h, texts) = read_png(&out);
    assert_eq!((w, h), (64, 64));
    let want = &reference("pipeline_0.safetensors")["image"].1;
    let worst = px.iter().zip(want).map(|(&p, &r)| (p as f32 - (r * 255.0).round()).abs()).fold(0.0, f32::max);
    println!("CLI image vs diffusers: max {worst}/255");
    assert!(worst <= 2.0, "pixels differ by {worst}/255");
    let params = texts.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).expect("parameters chunk");
    // "Emphasis: None": A1111 reading these parameters treats (x:1.2) as plain text, as we did.
    assert_eq!(params, "a photo of an astronaut riding a horse on mars\nSteps: 5, Sampler: PLMS, CFG scale: 7.5, Seed: 0, Size: 64x64, Model: sd1, Emphasis: None");
}

/// The image flags end to end: files read from disk as users give them (a resized init image,
/// a blurred mask, an 8-bit depth map smaller than the output, two ControlNets, guess mode, an
/// upscaler batch), each image within 2/255 of diffusers (tests/fixtures/ref/cond_cases.json).
#[test]
fn generate_takes_init_images_masks_depth_maps_and_controlnets() {
    let dir = tmp("conditions");
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("ref/cond_cases.json")).expect("cases")).expect("json");
    let images = fixtures().join("images");
    let img = |name: &serde_json::Value| images.join(name.as_str().expect("file name")).to_string_lossy().into_owned();
    let mut failures = Vec::new();
    for index in [0, 16, 19, 22, 25, 28, 31] {
        let c = &file["cases"][index];
        let num = |k: &str| c[k].to_string();
        let out = dir.join(format!("case{index}-{{n}}.png"));
        let mut args: Vec<String> = ["generate", "--model", &fixtures().join(c["model"].as_str().expect("model")).to_string_lossy(), "--out", &out.to_string_lossy()].map(String::from).to_vec();
        args.extend(["--prompt".into(), c["prompt"].as_str().expect("prompt").into(), "--seed".into(), num("seed"), "--steps".into(), num("steps"), "--guidance".into(), num("guidance"), "--batch".into(), num("batch")]);
        if c["kind"] != "upscale" {
            args.extend(["--width".into(), num("width"), "--height".into(), num("height")]);
        }
        let flags = [("scheduler", "--scheduler"), ("negative_prompt", "--negative-prompt"), ("strength", "--strength"), ("noise_level", "--noise-level"), ("mask_blur", "--mask-blur"), ("control_guidance_start", "--control-start"), ("control_guidance_end", "--control-end")];
        for (key, flag) in flags {
            if !c[key].is_null() {
                args.extend([flag.into(), c[key].as_str().map(String::from).unwrap_or_else(|| num(key))]);
            }
        }
        for (key, flag) in [("image", "--init-image"), ("mask", "--mask"), ("depth", "--depth")] {
            if !c[key].is_null() {
                args.extend([flag.into(), img(&c[key])]);
            }
        }
        for n in c["controlnets"].as_array().expect("list") {
            args.extend(["--control".into(), format!("{}={}:{}", fixtures().join(n["folder"].as_str().expect("folder")).display(), img(&n["image"]), n["scale"])]);
        }
        if c["guess_mode"] == true {
            args.push("--guess-mode".into());
        }
        let (ok, _, stderr) = ldm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if !ok {
            failures.push(format!("case {index} ({}): {stderr}", c["kind"]));
            continue;
        }
        let want = &reference(&format!("cond_{index}.safetensors"))["image"];
        let per = want.1.len() / want.0[0];
        for b in 0..want.0[0] {
            let (px, w, h, _) = read_png(&dir.join(format!("case{index}-{b}.png")));
            assert_eq!((w as usize, h as usize), (want.0[2], want.0[1]), "case {index} size");
            let worst = px.iter().zip(&want.1[b * per..]).map(|(&p, &r)| (p as f32 - (r * 255.0).round()).abs()).fold(0.0, f32::max);
            println!("ldm generate case {index:>2} {:<10} image {b}: max {worst}/255 vs diffusers", c["kind"].as_str().unwrap_or(""));
            if worst > 2.0 {
                failures.push(format!("case {index} image {b}: {worst}/255"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // What cannot be used is refused with one line saying what to do.
    let sd1 = fixtures().join("sd1").to_string_lossy().into_owned();
    let text = dir.join("not-an-image.png");
    std::fs::write(&text, "hello").expect("write");
    let (init, mask, depth, control) = (img(&"init.png".into()), img(&"mask.png".into()), img(&"depth16.png".into()), img(&"control.png".into()));
    let f = |m: &str| fixtures().join(m).to_string_lossy().into_owned();
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases = vec![
        (sd1.clone(), v(&["--init-image", &text.to_string_lossy()]), "cannot read the init image"),
        (sd1.clone(), v(&["--init-image", "/nonexistent.png"]), "cannot read the init image"),
        (sd1.clone(), v(&["--mask", &mask]), "a mask needs an init image"),
        (sd1.clone(), v(&["--init-image", &init, "--strength", "1.5"]), "strength must be between 0 and 1"),
        (sd1.clone(), v(&["--strength", "0.5"]), "strength needs an init image"),
        (sd1.clone(), v(&["--init-image", &init, "--depth", &depth]), "depth-to-image model"),
        (f("sd1-inpaint"), v(&["--init-image", &init]), "give an init image and a mask"),
        (f("sd2-depth"), v(&["--init-image", &init]), "give a depth map"),
        (sd1.clone(), v(&["--control", &control]), "expected DIR=IMAGE"),
        (sd1.clone(), v(&["--control", &format!("{}={control}", f("sd1"))]), "not a diffusers ControlNet folder"),
        (sd1.clone(), v(&["--control", &format!("{}=/nonexistent.png", f("controlnet-a"))]), "cannot read the condition image"),
        (f("sd-x4-upscaler"), v(&["--init-image", &img(&"lowres.png".into()), "--noise-level", "400", "--width", "96", "--height", "64"]), "max_noise_level 350"),
        (f("sd-x4-upscaler"), v(&["--init-image", &img(&"lowres.png".into())]), "makes 96x64 from a 24x16 image"),
        (f("sd-x4-upscaler"), v(&[]), "upscaling model"),
        (sd1.clone(), v(&["--init-image", &init, "--mask", &mask, "--mask-blur=-1"]), "mask blur must be a radius"),
        (sd1, v(&["--noise-level", "10"]), "upscaling models"),
    ];
    expect_one_line_errors(&dir, &cases);
}

/// `--batch` with `{n}`, a negative prompt, a non-default scheduler and a unicode prompt (iTXt).
#[test]
fn generate_batch_names_and_unicode_parameters() {
    let dir = tmp("batch");
    let pattern = dir.join("b-{n}.png");
    let model = fixtures().join("sd2");
    let (ok, _, stderr) = ldm(&[
        "generate", "--model", model.to_str().expect("utf-8"), "--prompt", "東京 🚀 at night", "--negative-prompt", "blurry",
        "--steps", "2", "--width", "64", "--height", "32", "--batch", "2", "--scheduler", "euler-a", "--seed", "18446744073709551615",
        "--clip-skip", "1", "--out", pattern.to_str().expect("utf-8"),
    ]);
    assert!(ok, "ldm failed: {stderr}");
    for i in 0..2 {
        let (_, w, h, texts) = read_png(&dir.join(format!("b-{i}.png")));
        assert_eq!((w, h), (64, 32));
        let params = &texts.iter().find(|(k, _)| k == "parameters").expect("parameters").1;
        assert!(params.starts_with("東京 🚀 at night\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 18446744073709551615, Size: 64x32, Model: sd2"), "{params}");
        assert!(params.contains(&format!("Clip skip: 2, Batch size: 2, Batch pos: {i}")), "{params}");
    }
}

/// A static file server with HEAD and Range support, as a CDN would serve a model folder.
fn serve(root: PathBuf) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
                    let mut range = None;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            let (a, b) = v.trim().split_once('-').unwrap_or(("0", ""));
                            range = Some((a.parse::<u64>().unwrap_or(0), b.parse::<u64>().ok()));
                        }
                    }
                    let file = root.join(path.trim_start_matches('/'));
                    let resp = match std::fs::read(&file) {
                        Err(_) => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
                        Ok(data) => {
                            let (status, body) = match range {
                                Some((a, b)) => {
                                    let end = b.map_or(data.len() as u64, |b| b + 1).min(data.len() as u64);
                                    ("206 Partial Content", data[a as usize..end as usize].to_vec())
                                }
                                None => ("200 OK", data),
                            };
                            let mut r = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\naccept-ranges: bytes\r\n\r\n", body.len()).into_bytes();
                            if method != "HEAD" {
                                r.extend_from_slice(&body);
                            }
                            r
                        }
                    };
                    if stream.write_all(&resp).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// `--model http://…/` reads the folder with range requests and gives the same image.
#[test]
fn generate_from_http_model() {
    let port = serve(fixtures().join("sd1"));
    let dir = tmp("http");
    let out = dir.join("http.png");
    let url = format!("http://127.0.0.1:{port}/");
    let mut args = vec!["generate", "--model", url.as_str(), "--out", out.to_str().expect("utf-8")];
    args.extend_from_slice(CASE0);
    let (ok, _, stderr) = ldm(&args);
    assert!(ok, "ldm over HTTP failed: {stderr}");
    let (px, ..) = read_png(&out);
    let want = &reference("pipeline_0.safetensors")["image"].1;
    let worst = px.iter().zip(want).map(|(&p, &r)| (p as f32 - (r * 255.0).round()).abs()).fold(0.0, f32::max);
    assert!(worst <= 2.0, "HTTP image differs by {worst}/255");
    let missing = format!("http://127.0.0.1:{port}/nothing-here/");
    let (ok, _, stderr) = ldm(&["generate", "--model", missing.as_str(), "--steps", "1"]);
    assert!(!ok && stderr.contains("model_index.json"), "{stderr}");
}

/// Writes a safetensors file from a header JSON and data size.
fn safetensors(path: &Path, header: &str, data: usize) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(&(header.len() as u64).to_le_bytes()).expect("write");
    f.write_all(header.as_bytes()).expect("write");
    f.write_all(&vec![0u8; data]).expect("write");
}

/// Every malformed model and every bad setting: non-zero exit, one line on stderr starting with
/// `ldm:`, no panic.
#[test]
fn bad_input_gives_one_line_errors() {
    let root = tmp("bad");
    let sd1 = fixtures().join("sd1");
    let unet_file = "unet/diffusion_pytorch_model.safetensors";
    let variant = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let d = root.join(name);
        copy_dir(&sd1, &d);
        edit(&d);
        d.to_string_lossy().into_owned()
    };
    let mut cases: Vec<(String, Vec<String>, &str)> = Vec::new();
    let m = |s: &str| s.to_string();
    let good = sd1.to_string_lossy().into_owned();
    let with = |model: String, extra: &[&str], expect: &'static str| (model, extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(), expect);
    cases.push(with(m("/nonexistent/model"), &[], "cannot open model"));
    cases.push(with(fixtures().join("ref").to_string_lossy().into_owned(), &[], "model_index.json"));
    cases.push(with(variant("no-unet-config", &|d| std::fs::remove_file(d.join("unet/config.json")).expect("rm")), &[], "unet/config.json is missing"));
    cases.push(with(variant("bad-config", &|d| std::fs::write(d.join("unet/config.json"), "{ not json").expect("w")), &[], "config.json is not valid"));
    cases.push(with(variant("wrong-config-type", &|d| std::fs::write(d.join("unet/config.json"), r#"{"block_out_channels": "many"}"#).expect("w")), &[], "config.json is not valid"));
    cases.push(with(
        variant("shape-mismatch", &|d| {
            let p = d.join("unet/config.json");
            let s = std::fs::read_to_string(&p).expect("r").replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48");
            std::fs::write(p, s).expect("w");
        }),
        &[],
        "does config.json belong to these weights",
    ));
    cases.push(with(variant("header-json", &|d| safetensors(&d.join(unet_file), "{\"a\": nope}", 0)), &[], "not JSON"));
    cases.push(with(variant("header-range", &|d| safetensors(&d.join(unet_file), r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8)), &[], "outside"));
    cases.push(with(
        variant("header-overlap", &|d| safetensors(&d.join(unet_file), r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12)),
        &[],
        "overlap",
    ));
    cases.push(with(variant("header-dtype", &|d| safetensors(&d.join(unet_file), r#"{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#, 8)), &[], "does not read"));
    cases.push(with(
        variant("truncated", &|d| {
            let p = d.join(unet_file);
            let data = std::fs::read(&p).expect("r");
            std::fs::write(&p, &data[..data.len() / 2]).expect("w");
        }),
        &[],
        "truncated",
    ));
    cases.push(with(variant("tiny-file", &|d| std::fs::write(d.join(unet_file), b"abc").expect("w")), &[], "too short"));
    cases.push(with(
        variant("pickle", &|d| {
            std::fs::remove_file(d.join(unet_file)).expect("rm");
            std::fs::write(d.join("unet/diffusion_pytorch_model.bin"), b"pickle").expect("w");
        }),
        &[],
        "neither a PyTorch checkpoint",
    ));
    let ckpt = root.join("model.ckpt");
    std::fs::write(&ckpt, b"PK").expect("w");
    cases.push(with(ckpt.to_string_lossy().into_owned(), &[], "neither a PyTorch checkpoint"));
    // A checkpoint whose pickle calls os.system: refused naming the global, nothing run.
    cases.push(with(fixtures().join("bad/os_system.ckpt").to_string_lossy().into_owned(), &[], "posix.system"));
    cases.push(with(fixtures().join("bad/truncated.ckpt").to_string_lossy().into_owned(), &[], "truncated"));
    cases.push(with(fixtures().join("bad/legacy.pt").to_string_lossy().into_owned(), &[], "legacy format"));
    let not_sd = root.join("lora.safetensors");
    safetensors(&not_sd, r#"{"lora_unet_down.alpha":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 4);
    cases.push(with(not_sd.to_string_lossy().into_owned(), &[], "not a Stable Diffusion checkpoint"));
    // The tiny fixture's group count (8) is not the SD default a bare checkpoint implies (32).
    cases.push(with(fixtures().join("sd1.safetensors").to_string_lossy().into_owned(), &[], "groups"));
    cases.push(with(good.clone(), &["--width", "65"], "multiples of 8"));
    cases.push(with(good.clone(), &["--height", "0"], "multiples of 8"));
    cases.push(with(good.clone(), &["--width", "40", "--refiner", "/nonexistent"], "needs an SDXL base"));
    cases.push(with(good.clone(), &["--steps", "0"], "steps must be"));
    cases.push(with(good.clone(), &["--batch", "0"], "batch must be"));
    cases.push(with(good.clone(), &["--scheduler", "karras-magic"], "euler-a"));
    cases.push(with(good.clone(), &["--clip-skip", "3"], "clip skip"));
    cases.push(with(good.clone(), &["--guidance", "NaN"], "finite"));
    expect_one_line_errors(&root, &cases);
}

/// Runs `ldm generate` for each (model, extra flags, expected text) case and checks it fails with
/// one `ldm: ` line mentioning the text, and no panic.
fn expect_one_line_errors(root: &Path, cases: &[(String, Vec<String>, &str)]) {
    let mut failures = Vec::new();
    for (model, extra, expect) in cases {
        let out = root.join("never.png");
        let mut args = vec!["generate", "--model", model.as_str(), "--out", out.to_str().expect("utf-8")];
        for (flag, default) in [("--steps", "1"), ("--width", "64"), ("--height", "64")] {
            if !extra.iter().any(|e| e == flag) {
                args.extend([flag, default]);
            }
        }
        args.extend(extra.iter().map(String::as_str));
        let (ok, _, stderr) = ldm(&args);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let good_error = !ok && lines.len() == 1 && lines[0].starts_with("ldm: ") && stderr.contains(expect) && !stderr.contains("panicked");
        println!("{:<60} {extra:?}: {}", model.rsplit('/').next().unwrap_or(model), stderr.trim());
        if !good_error {
            failures.push(format!("{model} {extra:?}: ok={ok}, stderr={stderr:?}, expected one 'ldm: ' line mentioning {expect:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Prompts of any length and content are accepted (truncated to 77 tokens as diffusers).
#[test]
fn any_prompt_is_accepted() {
    let dir = tmp("prompts");
    let model = fixtures().join("sd1");
    let long = "a very long prompt ".repeat(500);
    for (i, prompt) in ["", long.as_str(), "\u{7}control\tchars\r\n\u{1b}[31m", "<|endoftext|><|startoftext|>!!!", "👩‍🚀🏳️‍🌈 ÆØÅ ǅ ﬁ ٣ 𝔘𝔫𝔦"].iter().enumerate() {
        let out = dir.join(format!("p{i}.png"));
        let (ok, _, stderr) = ldm(&["generate", "--model", model.to_str().expect("utf-8"), "--prompt", prompt, "--negative-prompt", prompt, "--steps", "1", "--width", "32", "--height", "32", "--out", out.to_str().expect("utf-8")]);
        assert!(ok, "prompt {i} failed: {stderr}");
        assert_eq!(stderr.contains("only the first 75 are used"), i == 1, "truncation warning for prompt {i}: {stderr}");
        let mut f = std::fs::File::open(&out).expect("png");
        let mut magic = [0u8; 8];
        f.read_exact(&mut magic).expect("read");
        assert_eq!(&magic[1..4], b"PNG");
    }
}

#[test]
fn manifest_lists_sizes_and_chunk_hashes() {
    use sha2::{Digest, Sha256};
    let dir = tmp("manifest");
    copy_dir(&fixtures().join("sd1"), &dir.join("sd1"));
    let model = dir.join("sd1");
    let (ok, _, err) = ldm(&["manifest", model.to_str().expect("utf-8"), "--chunk-size", "65536"]);
    assert!(ok, "{err}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("ldm-manifest.json")).expect("written")).expect("JSON");
    assert_eq!(m["chunk_size"], 65536);
    let unet = std::fs::read(model.join("unet/diffusion_pytorch_model.safetensors")).expect("unet");
    let e = &m["files"]["unet/diffusion_pytorch_model.safetensors"];
    assert_eq!(e["size"].as_u64(), Some(unet.len() as u64));
    let hex = |b: &[u8]| Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(e["sha256"].as_str(), Some(hex(&unet).as_str()));
    let chunks = e["chunks"].as_array().expect("chunks");
    assert_eq!(chunks.len(), unet.len().div_ceil(65536));
    for (i, c) in chunks.iter().enumerate() {
        let end = ((i + 1) * 65536).min(unet.len());
        assert_eq!(c.as_str(), Some(hex(&unet[i * 65536..end]).as_str()), "chunk {i}");
    }
    assert!(m["files"].get("ldm-manifest.json").is_none());
    let (ok, _, err) = ldm(&["manifest", model.to_str().expect("utf-8"), "--chunk-size", "1000"]);
    assert!(!ok && err.contains("multiple of 4096"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The latent diffusion paper's pipelines through the CLI, chosen from `model_index.json`: pixels
/// of diffusers' cases (after 8-bit rounding) and one-line errors for flags a pipeline cannot use.
#[test]
fn generate_runs_the_ldm_pipelines() {
    let dir = tmp("ldm");
    let want = reference("ldm_pipelines.safetensors");
    let ldm_dir = fixtures().join("ldm");
    let model = |name: &str| ldm_dir.join(name).to_string_lossy().into_owned();
    let lowres = ldm_dir.join("lowres.png").to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<String>, &str, usize)> = vec![
        ("uncond", vec!["--steps".into(), "4".into(), "--batch".into(), "2".into(), "--seed".into(), "1".into()], "uncond_0", 2),
        ("superres", ["--init-image", &lowres, "--steps", "3", "--eta", "1", "--seed", "4", "--scheduler", "ddim"].map(String::from).to_vec(), "superres_0", 1),
        ("text2im", ["--prompt", "A painting of a squirrel eating a burger", "--steps", "4", "--guidance", "6", "--eta", "0.3", "--seed", "6", "--width", "96", "--height", "64"].map(String::from).to_vec(), "text2im_0", 1),
    ];
    for (name, extra, key, batch) in &cases {
        let out = dir.join(format!("{name}-{{n}}.png"));
        let mut args = vec!["generate".to_string(), "--model".into(), model(name), "--out".into(), out.to_string_lossy().into_owned()];
        args.extend(extra.iter().cloned());
        let (ok, _, stderr) = ldm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{name}: {stderr}");
        let (shape, pixels) = &want[*key];
        let n = shape[1] * shape[2] * 3;
        for i in 0..*batch {
            let (png, w, h, texts) = read_png(&dir.join(format!("{name}-{i}.png")));
            assert_eq!((h as usize, w as usize), (shape[1], shape[2]), "{name} size");
            let d = png.iter().zip(&pixels[i * n..(i + 1) * n]).map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs()).fold(0.0, f32::max);
            println!("ldm generate {name} image {i}: max |diff| {d}/255 against diffusers' {key}");
            assert!(d <= 2.0, "{name} image {i}: {d}/255");
            assert!(texts.iter().any(|(k, v)| k == "parameters" && v.contains("Sampler: DDIM")), "{name}: parameters chunk");
        }
    }
    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"not an image").expect("w");
    let small = dir.join("small.png");
    image::RgbImage::new(16, 16).save(&small).expect("png");
    let errors: Vec<(&str, Vec<&str>, &str)> = vec![
        ("superres", vec![], "--init-image"),
        ("superres", vec!["--init-image", junk.to_str().expect("utf-8")], "cannot read the image"),
        ("superres", vec!["--init-image", small.to_str().expect("utf-8")], "at least 32x32"),
        ("uncond", vec!["--prompt", "a cat"], "does not use --prompt"),
        ("uncond", vec!["--width", "66"], "divisible by"),
        ("superres", vec!["--width", "64"], "does not use --width"),
        ("text2im", vec!["--init-image", lowres.as_str()], "takes no --init-image"),
        ("text2im", vec!["--negative-prompt", "x"], "does not use --negative-prompt"),
        ("text2im", vec!["--width", "72"], "divisible by 16"),
    ];
    for (name, extra, expect) in errors {
        let m = model(name);
        let mut args = vec!["generate", "--model", m.as_str(), "--steps", "1", "--out", "/nonexistent/never.png"];
        args.extend(extra.iter().copied());
        let (ok, _, stderr) = ldm(&args);
        println!("{name} {extra:?}: {}", stderr.trim());
        assert!(!ok && stderr.trim().lines().count() == 1 && stderr.starts_with("ldm: ") && stderr.contains(expect), "{name} {extra:?}: {stderr:?}, expected {expect:?}");
    }
}

/// With no `--model`, `ldm generate` draws with the built-in emoji model compiled into the
/// binary, with the model's own steps and guidance: diffusers' image of the same prompt and seed.
#[test]
fn generate_defaults_to_the_builtin_model() {
    #[derive(serde::Deserialize)]
    struct Case {
        key: String,
        prompt: String,
        seed: u64,
        steps: usize,
        guidance: f32,
        batch: usize,
        scheduler: Option<String>,
    }
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(fixtures().join("ref/builtin_cases.json")).expect("builtin_cases.json")).expect("parses");
    let want = reference("builtin.safetensors");
    let dir = tmp("builtin");
    for c in cases.iter().filter(|c| c.batch == 1 && c.scheduler.is_none()) {
        let out = dir.join(format!("{}.png", c.key));
        // The model's ldm-web.json gives the steps and guidance; only the prompt and seed are passed.
        let (ok, stdout, stderr) = ldm(&["generate", "--prompt", &c.prompt, "--seed", &c.seed.to_string(), "--out", out.to_str().expect("utf-8")]);
        assert!(ok, "{}: {stderr}", c.key);
        assert!(stdout.contains("wrote"), "{stdout}");
        let (png, w, h, texts) = read_png(&out);
        assert_eq!((w, h), (64, 64));
        let d = png.iter().zip(&want[&c.key].1).map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs()).fold(0.0, f32::max);
        println!("ldm generate (built-in) {:?} seed {}: max |diff| {d}/255 against diffusers", c.prompt, c.seed);
        assert!(d <= 2.0, "{}: {d}/255", c.key);
        let params = texts.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).unwrap_or_default();
        assert!(params.contains(&format!("Steps: {}", c.steps)) && params.contains(&format!("CFG scale: {}", c.guidance)), "{params}");
    }
}

/// Rewrites a safetensors file's header with `edit` (the data is kept as it is).
fn edit_header(path: &Path, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    edit(&mut header);
    let mut text = serde_json::to_string(&header).expect("json");
    // The data must stay 8-byte aligned; pad the header with spaces as safetensors does.
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).expect("write");
}

fn data_start(header: &serde_json::Map<String, serde_json::Value>, name: &str) -> u64 {
    header[name]["data_offsets"][0].as_u64().expect("offset")
}

/// `ldm convert` writes quantised weights that load to exactly the image quantising on the fly
/// gives (per-layer rules included), smaller files, tensors in first-use order, the recipe and a
/// manifest; q8 stays close to f32.
#[test]
fn convert_matches_on_the_fly_quantisation() {
    let root = tmp("convert");
    let sd1 = fixtures().join("sd1");
    let sd1 = sd1.to_str().expect("utf-8");
    let conv = root.join("q4");
    let flags = ["--unet", "q4_1", "--text-encoder", "q8", "--vae", "q8", "--layer", "unet/conv_out.*=q8", "--layer", "*attn2.to_k*=q5_1", "--layer", "unet/time_embedding.linear_1.*=f32"];
    let (ok, summary, err) = ldm(&[&["convert", "--model", sd1, "--out", conv.to_str().expect("utf-8")][..], &flags].concat());
    assert!(ok, "convert failed: {err}");
    println!("{summary}");
    let gen = |model: &str, extra: &[&str], name: &str| {
        let out = root.join(name);
        let (ok, _, err) = ldm(&[&["generate", "--model", model, "--steps", "3", "--prompt", "a red apple", "--out", out.to_str().expect("utf-8")][..], extra].concat());
        assert!(ok, "{name}: {err}");
        read_png(&out).0
    };
    let converted = gen(conv.to_str().expect("utf-8"), &[], "converted.png");
    let on_the_fly = gen(sd1, &flags, "on-the-fly.png");
    assert!(converted == on_the_fly, "the converted model's image differs from quantising on the fly");
    let f32_img = gen(sd1, &[], "f32.png");
    let q8 = gen(sd1, &["--quant", "q8"], "q8.png");
    let psnr = |a: &[u8], b: &[u8]| {
        let mse = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
    };
    let (p8, p4) = (psnr(&q8, &f32_img), psnr(&converted, &f32_img));
    println!("PSNR vs f32: q8 {p8:.1} dB, unet q4_1 + q8 rest {p4:.1} dB");
    // The fixture's weights are random and tiny (one block per row in places): q8 must stay within
    // issue 6's bound; q4 is looser (measured over seeds in the README).
    assert!(p8 >= 40.0, "q8 PSNR {p8:.1} dB < 40");
    assert!(p4 >= 20.0, "q4 PSNR {p4:.1} dB < 20");

    let unet_file = "unet/diffusion_pytorch_model.safetensors";
    let size = |p: &Path| std::fs::metadata(p).expect("exists").len();
    let (before, after) = (size(&fixtures().join("sd1").join(unet_file)), size(&conv.join(unet_file)));
    assert!(after * 4 < before, "q4 UNet file {after} bytes is not under a quarter of f32's {before}");
    let bytes = std::fs::read(conv.join(unet_file)).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    // First use: the time embedding and conv_in are read before the blocks, conv_out last.
    let order = ["time_embedding.linear_1.weight", "conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.resnets.0.conv1.weight", "conv_out.weight"];
    for w in order.windows(2) {
        assert!(data_start(&header, w[0]) < data_start(&header, w[1]), "{} is stored after {}", w[0], w[1]);
    }
    let meta = header["__metadata__"].as_object().expect("metadata");
    let stored = |name: &str| meta.get(&format!("ldm-web.quant.{name}")).and_then(|v| v.as_str()).map(|v| v.split(':').next().unwrap_or("").to_string());
    assert_eq!(stored("conv_in.weight").as_deref(), Some("q4_1"), "{meta:?}");
    assert_eq!(stored("conv_out.weight").as_deref(), Some("q8_0"), "the layer rule unet/conv_out.*=q8");
    assert_eq!(stored("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight").as_deref(), Some("q5_1"));
    assert_eq!(stored("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight").as_deref(), Some("q4_1"));
    assert_eq!(stored("time_embedding.linear_1.weight"), None, "a float rule keeps the weight unquantised");
    assert_eq!(header["time_embedding.linear_1.weight"]["dtype"], "F32");
    let hints: serde_json::Value = serde_json::from_slice(&std::fs::read(conv.join("ldm-web.json")).expect("ldm-web.json")).expect("json");
    assert_eq!(hints["quantisation"]["recipe"], "unet=q4_1,text_encoder=q8_0,vae=q8_0;unet/conv_out.*=q8_0;*attn2.to_k*=q5_1;unet/time_embedding.linear_1.*=f32", "{hints}");
    let unet_bits = hints["quantisation"]["bits_per_weight"]["unet"].as_f64().expect("UNet bits per weight");
    assert!((4.5..32.0).contains(&unet_bits), "UNet bits per weight {unet_bits}");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(conv.join("ldm-manifest.json")).expect("manifest")).expect("json");
    assert_eq!(manifest["files"][unet_file]["size"].as_u64(), Some(after), "manifest size of {unet_file}");

    // Quantised tensors whose descriptions and companions do not add up are refused, by name.
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| -> String {
        let d = root.join(name);
        copy_dir(&conv, &d);
        edit_header(&d.join(unet_file), edit);
        d.to_string_lossy().into_owned()
    };
    fn meta_edit(f: fn(&str) -> String) -> impl Fn(&mut serde_json::Map<String, serde_json::Value>) {
        move |h| {
            let key = "ldm-web.quant.conv_in.weight";
            let m = h.get_mut("__metadata__").and_then(|m| m.as_object_mut()).expect("metadata");
            let v = f(m[key].as_str().expect("str"));
            m.insert(key.into(), v.into());
        }
    }
    let none: Vec<String> = Vec::new();
    let cases = vec![
        // More rows than stored: the block counts disagree with the values tensor.
        (variant("block-count", &meta_edit(|v| v.replacen(":16,", ":17,", 1))), none.clone(), "conv_in.weight"),
        (variant("unknown-type", &meta_edit(|v| v.replacen("q4_1", "q3_k", 1))), none.clone(), "q3_k"),
        (variant("no-scales", &|h| {
            h.remove("conv_in.weight.scales");
        }), none.clone(), "conv_in.weight.scales"),
        (variant("scale-shape", &|h| {
            h["conv_in.weight.mins"]["shape"] = serde_json::json!([2, 16]);
        }), none.clone(), "conv_in.weight.mins"),
        (sd1.to_string(), vec!["--layer".into(), "unet/conv_in.*=q3".into()], "unknown type \"q3\""),
        (sd1.to_string(), vec!["--layer".into(), "unet/conv_in.*".into()], "PATTERN=TYPE"),
    ];
    expect_one_line_errors(&root, &cases);
}

/// A single-file checkpoint converts like a folder: with `--config` (diffusers'
/// `from_single_file(config=...)`; the fixtures' 16-channel blocks cannot be inferred) the folder
/// gives the file's own pixels, f32 and quantised alike. The inferred-config files are checked in
/// tests/sd_reference.rs.
#[test]
fn convert_reads_single_file_checkpoints() {
    let root = tmp("convert-single");
    let (file, config) = (fixtures().join("sd2.safetensors"), fixtures().join("sd2"));
    let (file, config) = (file.to_str().expect("utf-8"), config.to_str().expect("utf-8"));
    let gen = |model: &str, extra: &[&str], name: &str| {
        let out = root.join(name);
        let (ok, _, err) = ldm(&[&["generate", "--model", model, "--steps", "2", "--prompt", "a red apple!", "--width", "64", "--height", "32", "--out", out.to_str().expect("utf-8")][..], extra].concat());
        assert!(ok, "{name}: {err}");
        read_png(&out).0
    };
    for (name, flags) in [("f16", &["--quant", "f16"][..]), ("q8", &["--quant", "q8", "--unet", "q4_1"][..])] {
        let out = root.join(name);
        let (ok, summary, err) = ldm(&[&["convert", "--model", file, "--config", config, "--out", out.to_str().expect("utf-8")][..], flags].concat());
        assert!(ok, "convert {name}: {err}");
        println!("{summary}");
        assert!(out.join("tokenizer/vocab.json").is_file() && out.join("model_index.json").is_file(), "{name}: configs not written");
        let converted = gen(out.to_str().expect("utf-8"), &[], &format!("{name}-converted.png"));
        // Stored f16 rounds the f32 weights (compared loosely); quantised ones are the same bytes
        // whether converted or quantised on the fly.
        let loaded = [&["--config", config][..], if name == "f16" { &[] } else { flags }].concat();
        let direct = gen(file, &loaded, &format!("{name}-direct.png"));
        let max = converted.iter().zip(&direct).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        let bound = if name == "f16" { 3 } else { 0 };
        println!("{name}: converted vs file max {max}/255");
        assert!(max <= bound, "{name}: the converted folder differs from the file by {max}/255 (allowed {bound})");
    }
    let (ok, _, err) = ldm(&["convert", "--model", file, "--config", "/nonexistent", "--out", root.join("bad").to_str().expect("utf-8")]);
    assert!(!ok && err.contains("--config /nonexistent"), "bad --config: {err}");
    let (ok, _, err) = ldm(&["generate", "--model", config, "--config", config, "--out", root.join("bad.png").to_str().expect("utf-8")]);
    assert!(!ok && err.contains("single-file"), "--config with a folder: {err}");
}

/// `ldm bench unet`: timed steps reuse every buffer (no allocation per step) and read back once;
/// Stable Diffusion 1.5's architecture plans within issue 6's memory bound in q4.
#[test]
fn bench_unet_reuses_buffers_and_plans_sd15_memory() {
    let sd1 = fixtures().join("sd1");
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = ldm(&[&["bench", "unet"][..], args].concat());
        assert!(ok, "bench unet {args:?} failed: {err}");
        serde_json::from_str(&out).expect("JSON")
    };
    let r = json(&["--model", sd1.to_str().expect("utf-8"), "--latent", "8", "--runs", "2", "--dtype", "f32", "--no-decode", "--unet", "q8"]);
    println!("fixture: {r}");
    assert_eq!(r["buffers_created_per_step"].as_f64(), Some(0.0), "steps allocated buffers");
    assert_eq!(r["readbacks_per_step"].as_f64(), Some(1.0));
    assert!(r["submissions_per_step"].as_f64().is_some_and(|s| s <= 8.0), "too many submissions per step");
    assert!(r["unet_step_ms"].as_f64().is_some_and(|t| t > 0.0));
    // Weights of 2.28 MB of f32 in the fixture file: q8 is a bit over a quarter of the matrices.
    let q8 = r["unet_weight_bytes"].as_u64().expect("bytes");
    assert!(q8 > 400_000 && q8 < 1_000_000, "q8 fixture UNet is {q8} bytes");

    let p = json(&["--model", "sd15", "--size", "512", "--unet", "q4", "--vae", "q4", "--runs", "1", "--plan"]);
    let (unet, peak) = (p["unet_weight_bytes"].as_u64().expect("bytes"), p["peak_gpu_bytes"].as_u64().expect("peak"));
    println!("sd15 q4 plan: UNet {unet} bytes, peak {peak} bytes");
    // 859.5 M parameters, almost all in matrices: q4_0 is 18 bytes per 32 weights.
    assert!((470_000_000..500_000_000).contains(&unet), "SD 1.5 q4 UNet is {unet} bytes");
    assert!(peak <= 1_500_000_000, "SD 1.5 q4 UNet + VAE decode at 512x512 plans {peak} bytes > 1.5 GB");
}

/// The model-family flags end to end (tests/fixtures/ref/family_cases.json): SDXL, the refiner
/// hand-over, LoRA, textual inversion, A1111 prompt weighting, the tiny autoencoder and a
/// `.ckpt` single file, each within 1/255 of diffusers' 8-bit image; and one-line errors for
/// bad uses of them.
#[test]
fn generate_takes_loras_embeddings_refiners_and_weighted_prompts() {
    let dir = tmp("families");
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("ref/family_cases.json")).expect("cases")).expect("json");
    let fx = |p: &str| fixtures().join(p).to_string_lossy().into_owned();
    let case = |i: usize| &file["cases"][i];
    let base = |i: usize, model: &str| -> Vec<String> {
        let c = case(i);
        let mut a: Vec<String> = vec!["generate".into(), "--model".into(), fx(model), "--seed".into(), c["seed"].to_string(), "--steps".into(), c["steps"].to_string(), "--width".into(), c["width"].to_string(), "--height".into(), c["height"].to_string()];
        if let Some(g) = c["guidance"].as_f64() {
            a.extend(["--guidance".into(), g.to_string()]);
        }
        a
    };
    let text = |c: &serde_json::Value, key: &str, flag: &str| -> Vec<String> { c[key].as_str().map(|v| vec![flag.to_string(), v.to_string()]).unwrap_or_default() };
    let runs: Vec<(&str, usize, Vec<String>)> = vec![
        ("sdxl", 0, [base(0, "sdxl"), text(case(0), "prompt", "--prompt"), text(case(0), "negative_prompt", "--negative-prompt")].concat()),
        ("refiner hand-over", 2, [base(2, "sdxl"), text(case(2), "prompt", "--prompt"), vec!["--refiner".into(), fx("sdxl-refiner"), "--denoising-end".into(), "0.8".into()]].concat()),
        ("two LoRAs", 16, [base(16, "sd1"), text(case(16), "prompt", "--prompt"), vec!["--scheduler".into(), "dpmpp-2m".into(), "--lora".into(), format!("{}:0.7", fx("lora/sd1-kohya.safetensors")), "--lora".into(), format!("{}:-0.4", fx("lora/sd1-peft.safetensors"))]].concat()),
        ("embeddings", 20, [base(20, "sd1"), text(case(20), "prompt", "--prompt"), text(case(20), "negative_prompt", "--negative-prompt"), vec!["--embedding".into(), fx("embeddings/cat-toy.safetensors"), "--embedding".into(), format!("{}:a1111-style", fx("embeddings/a1111-style.pt"))]].concat()),
        ("A1111 weighting", 27, [base(27, "sd1"), vec!["--prompt".into(), "(red:1.3) apple, [blue] sky".into(), "--negative-prompt".into(), "blurry".into(), "--prompt-weighting".into(), "a1111".into()]].concat()),
        ("tiny VAE", 22, [base(22, "sd1"), text(case(22), "prompt", "--prompt"), vec!["--tiny-vae".into(), fx("taesd"), "--vae-decoder".into(), "tiny".into()]].concat()),
        ("SDXL single file", 26, [base(26, "sdxl.safetensors"), text(case(26), "prompt", "--prompt"), text(case(26), "negative_prompt", "--negative-prompt"), vec!["--config".into(), fx("sdxl")]].concat()),
    ];
    let mut failures = Vec::new();
    for (what, index, mut args) in runs {
        let out = dir.join(format!("case{index}.png"));
        args.extend(["--out".into(), out.to_string_lossy().into_owned()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, stderr) = ldm(&refs);
        assert!(ok, "{what}: ldm failed: {stderr}");
        let (px, _, _, texts) = read_png(&out);
        let want = &reference(&format!("family_{index}.safetensors"))["image"].1;
        let worst = px.iter().zip(want).map(|(&p, &r)| (p as f32 - (r * 255.0).round()).abs()).fold(0.0, f32::max);
        let params = texts.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).unwrap_or_default();
        println!("ldm generate {what} (family case {index}): max {worst}/255 vs diffusers; parameters: {}", params.replace('\n', " | "));
        if worst > 1.0 {
            failures.push(format!("{what}: {worst}/255"));
        }
        if what == "two LoRAs" {
            assert!(params.contains("<lora:sd1-kohya:0.7> <lora:sd1-peft:-0.4>"), "{params}");
        }
        if what == "refiner hand-over" {
            assert!(params.contains("Refiner: sdxl-refiner, Refiner switch at: 0.8"), "{params}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
    // The .ckpt copy of the SD1 single file gives its image (pipeline case 8).
    let c8 = &serde_json::from_slice::<serde_json::Value>(&std::fs::read(fixtures().join("ref/pipelines.json")).expect("json")).expect("json")[8];
    let out = dir.join("ckpt.png");
    let (ok, _, stderr) = ldm(&["generate", "--model", &fx("sd1.ckpt"), "--config", &fx("sd1"), "--prompt", c8["prompt"].as_str().expect("prompt"), "--seed", "8", "--steps", "5", "--scheduler", "dpmpp-2m-karras", "--width", "64", "--height", "64", "--out", &out.to_string_lossy()]);
    assert!(ok, "sd1.ckpt: {stderr}");
    let (px, ..) = read_png(&out);
    let want = &reference("pipeline_8.safetensors")["image"].1;
    let worst = px.iter().zip(want).map(|(&p, &r)| (p as f32 - (r * 255.0).round()).abs()).fold(0.0, f32::max);
    println!("ldm generate --model sd1.ckpt: max {worst}/255 vs diffusers (pipeline case 8)");
    assert!(worst <= 1.0);

    let (sd1, sdxl, vae, refiner, xl_lora, lora, cat) = (fx("sd1"), fx("sdxl"), fx("sd1/vae"), fx("sdxl-refiner"), fx("lora/sdxl-kohya.safetensors"), fx("lora/sd1-kohya.safetensors"), fx("embeddings/cat-toy.safetensors"));
    let bad: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", &sd1, "--lora", "/nonexistent/x.safetensors"], "no such file"),
        (vec!["--model", &sd1, "--embedding", "/nonexistent/x.pt"], "no such file"),
        (vec!["--model", &sd1, "--prompt-weighting", "comfy"], "none or a1111"),
        (vec!["--model", &sdxl, "--original-size", "1024"], "WIDTHxHEIGHT"),
        (vec!["--model", &sdxl, "--crops-coords-top-left", "a,b"], "TOP,LEFT"),
        (vec!["--model", &sdxl, "--denoising-end", "1.5"], "between 0 and 1"),
        (vec!["--model", &sd1, "--prompt-2", "x"], "for SDXL models"),
        (vec!["--model", &sd1, "--vae-decoder", "tiny"], "--tiny-vae"),
        (vec!["--model", &sd1, "--tiny-vae", &vae], "AutoencoderTiny"),
        (vec!["--model", &refiner], "refines images"),
        (vec!["--model", &sd1, "--lora", &xl_lora], "another model family"),
        (vec!["--model", &sd1, "--lora", &lora, "--lora-merge", "--unet", "q4"], "cannot merge a LoRA into the quantised"),
        (vec!["--model", &sd1, "--embedding", &cat, "--embedding", &cat], "already in the tokenizer"),
    ];
    for (extra, expect) in bad {
        let mut args = vec!["generate", "--steps", "1", "--prompt", "x", "--out", "/nonexistent/never.png"];
        args.extend(extra.iter().copied());
        let (ok, _, stderr) = ldm(&args);
        println!("{extra:?}: {}", stderr.trim());
        assert!(!ok && stderr.trim().lines().count() == 1 && stderr.starts_with("ldm: ") && stderr.contains(expect), "{extra:?}: {stderr:?}, expected {expect:?}");
    }
}

/// Photo to condition in the CLI: `ldm depth` (the depth-estimation pipeline's image), ControlNet
/// conditions made by --control-preprocess canny / depth (the same pixels as giving the edge or
/// depth image made beforehand), depth-to-image estimating its own depth, a
/// concatenation-conditioned LDM; and their bad inputs.
#[test]
fn generate_preprocesses_photos_and_runs_concat_models() {
    let dir = tmp("photo");
    let f = |p: &str| fixtures().join(p).to_string_lossy().into_owned();
    let init = f("images/init.png");
    let depth8 = dir.join("depth8.png");
    let (ok, _, stderr) = ldm(&["depth", "--model", &f("depth/depth-anything"), "--image", &init, "--out", &depth8.to_string_lossy(), "--bits", "8"]);
    assert!(ok, "{stderr}");
    let img = ldm_web::pipelines::image_input::InputImage::from_png(&std::fs::read(&depth8).expect("depth png")).expect("png");
    let want = &reference("depth.safetensors")["depth-anything/init.png.depth_image"].1;
    let off = img.luma8().iter().zip(want).filter(|(&a, &b)| (a as f32 - b).abs() > 1.0).count();
    assert_eq!((img.width, img.height, off), (96, 64, 0), "ldm depth --bits 8 against transformers' depth image");
    let depth16 = dir.join("depth16.png");
    let (ok, _, stderr) = ldm(&["depth", "--model", &f("depth/dpt-hybrid"), "--image", &init, "--out", &depth16.to_string_lossy()]);
    assert!(ok, "{stderr}");
    let d16 = ldm_web::pipelines::image_input::InputImage::from_png(&std::fs::read(&depth16).expect("png")).expect("png");
    assert!(d16.sixteen_bit && d16.data.iter().any(|&v| v == 65535) && d16.data.contains(&0), "a 16-bit map over the whole range");

    // A preprocessed condition gives the pixels of the condition image made beforehand.
    let f_sd1 = f("sd1");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.png"));
        let mut args = vec!["generate", "--model", &f_sd1, "--prompt", "a cat", "--steps", "2", "--seed", "3", "--width", "96", "--height", "64"];
        let out_s = out.to_string_lossy().into_owned();
        args.extend(["--out", &out_s]);
        args.extend(extra);
        let (ok, _, stderr) = ldm(&args);
        assert!(ok, "{name}: {stderr}");
        read_png(&out).0
    };
    let net = f("controlnet-a");
    let canny_given = run("canny-given", &["--control", &format!("{net}={}", f("edges/init_edges.png"))]);
    let canny_made = run("canny-made", &["--control", &format!("{net}={init}"), "--control-preprocess", "canny"]);
    assert!(canny_given == canny_made, "--control-preprocess canny differs from OpenCV's edge map given as the image");
    let depth_given = run("depth-given", &["--control", &format!("{net}={}", depth8.display())]);
    let depth_made = run("depth-made", &["--control", &format!("{net}={init}"), "--control-preprocess", "depth", "--depth-model", &f("depth/depth-anything")]);
    assert!(depth_given == depth_made, "--control-preprocess depth differs from ldm depth's image given as the condition");

    // Depth-to-image without --depth; a concatenation-conditioned LDM.
    for (model, extra, key, reference_file) in [
        ("sd2-depth-estimator", vec!["--init-image", init.as_str(), "--prompt", "a cat", "--steps", "4", "--strength", "0.8", "--seed", "3"], "depth2img_0", "depth2img.safetensors"),
        ("concat/rescale", vec!["--init-image", init.as_str(), "--width", "32", "--height", "32", "--steps", "10", "--seed", "3"], "case_0", "concat.safetensors"),
    ] {
        let out = dir.join("out.png");
        let m = f(model);
        let out_s = out.to_string_lossy().into_owned();
        let mut args = vec!["generate", "--model", m.as_str(), "--out", out_s.as_str()];
        args.extend(extra.iter().copied());
        let (ok, _, stderr) = ldm(&args);
        assert!(ok, "{model}: {stderr}");
        let (px, _, _, _) = read_png(&out);
        let want = &reference(reference_file)[key].1;
        let worst = px.iter().zip(want).map(|(&p, &r)| (p as f32 - (r * 255.0).round()).abs()).fold(0.0, f32::max);
        println!("ldm generate {model}: max {worst}/255 against {key}");
        assert!(worst <= 2.0, "{model}: {worst}/255");
    }

    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let control = format!("{net}={init}");
    let cases = vec![
        (f_sd1.clone(), v(&["--control", &control, "--control-preprocess", "depth"]), "needs --depth-model"),
        (f_sd1.clone(), v(&["--control", &control, "--control-preprocess", "canny:100"]), "expected LOW,HIGH"),
        (f_sd1.clone(), v(&["--control", &control, "--control-preprocess", "sobel"]), "expected none, depth, canny"),
        (f_sd1.clone(), v(&["--control", &control, "--control-preprocess", "none", "--control-preprocess", "canny", "--control-preprocess", "none"]), "give one per ControlNet"),
        (f_sd1.clone(), v(&["--control", &control, "--control-preprocess", "depth", "--depth-model", &f("sd1")]), "not a depth estimator folder"),
        (f("concat/rescale"), v(&[]), "needs its condition image"),
        (f("concat/rescale"), v(&["--init-image", &init, "--width", "34", "--height", "32"]), "divisible by"),
    ];
    expect_one_line_errors(&dir, &cases);
    let (ok, _, stderr) = ldm(&["depth", "--model", &f("sd1"), "--image", &init]);
    assert!(!ok && stderr.contains("not a depth estimator folder"), "{stderr}");
}

/// `ldm train` on the fixture pairs (CPU backend): a model folder `ldm generate` loads (with
/// guidance, the unconditional half from a zero condition), a resumed run that repeats an
/// uninterrupted one exactly, and one-line errors for bad pairs.
#[test]
fn train_writes_a_model_that_generates_and_resumes_exactly() {
    let dir = tmp("train");
    let pairs = fixtures().join("training/pairs");
    let pairs = pairs.to_str().expect("utf-8");
    let run = |out: &Path, steps: &str, extra: &[&str]| {
        let mut args = vec!["--device", "cpu", "train", "--pairs", pairs, "--resolution", "32", "--batch", "2", "--lr", "1e-3", "--channels", "32,64", "--steps", steps, "--save-every", "3", "--out", out.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = ldm(&args);
        assert!(ok, "ldm train failed: {stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).expect("a JSON report")
    };
    let whole = dir.join("whole");
    let report = run(&whole, "6", &[]);
    assert_eq!(report["steps"], 6);
    assert_eq!(report["pairs"], 4);
    for f in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vqvae/config.json", "scheduler/scheduler_config.json", "ldm-web.json", "training/state.safetensors", "samples/step-000006.png"] {
        assert!(whole.join(f).is_file(), "{f} missing");
    }
    let out = dir.join("gen.png");
    let cond = fixtures().join("training/pairs/cond/1F525.png");
    let (ok, _, stderr) = ldm(&["--device", "cpu", "generate", "--model", whole.to_str().unwrap(), "--init-image", cond.to_str().unwrap(), "--steps", "4", "--guidance", "2", "--out", out.to_str().unwrap()]);
    assert!(ok, "generate from the trained model failed: {stderr}");
    let (_, w, h, _) = read_png(&out);
    assert_eq!((w, h), (32, 32));

    let split = dir.join("split");
    run(&split, "3", &[]);
    run(&split, "6", &["--resume"]);
    let losses = |d: &Path| -> Vec<f64> {
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("training/state.json")).unwrap()).unwrap();
        state["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };
    assert_eq!(losses(&whole).len(), 6);
    assert_eq!(losses(&whole), losses(&split), "a resumed run must repeat the uninterrupted one");
    let weights = |d: &Path| std::fs::read(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(weights(&whole) == weights(&split), "resumed weights differ");

    // The same pairs listed in a CSV (paths relative to it, a header line).
    let csv = dir.join("pairs.csv");
    let mut text = String::from("condition,target\n");
    for name in ["1F34E", "1F525"] {
        text.push_str(&format!("{p}/cond/{name}.png, {p}/target/{name}.png\n", p = pairs));
    }
    std::fs::write(&csv, text).unwrap();
    let from_csv = dir.join("csv");
    let (ok, stdout, stderr) = ldm(&["--device", "cpu", "train", "--pairs", csv.to_str().unwrap(), "--resolution", "32", "--batch", "1", "--channels", "32,64", "--steps", "1", "--out", from_csv.to_str().unwrap()]);
    assert!(ok && stdout.contains("\"pairs\": 2"), "a CSV of pairs: {stderr}");

    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("cond")).unwrap();
    std::fs::create_dir_all(empty.join("target")).unwrap();
    std::fs::write(empty.join("cond/a.png"), b"not a png").unwrap();
    for (args, want) in [
        (vec!["train", "--pairs", "/nonexistent/pairs.csv"], "cannot read"),
        (vec!["train", "--pairs", empty.to_str().unwrap()], "no target image named a"),
        (vec!["train", "--pairs", pairs, "--resolution", "30"], "multiple of"),
        (vec!["train", "--pairs", pairs, "--resume", "--out", dir.join("none").to_str().unwrap()], "no training state"),
    ] {
        let mut full = vec!["--device", "cpu"];
        full.extend(args);
        let (ok, _, stderr) = ldm(&full);
        assert!(!ok && stderr.contains(want) && stderr.trim().lines().count() == 1, "{full:?}: {stderr}");
    }
}

/// `ldm train-lora` on four captioned images (captions from `.txt` files and from a
/// `metadata.jsonl`): a LoRA file `ldm generate --lora` uses, resumed runs that repeat an
/// uninterrupted one, one-line errors.
#[test]
fn train_lora_writes_a_lora_that_generates_and_resumes_exactly() {
    let dir = tmp("train-lora");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let targets = fixtures().join("training/pairs/target");
    for (name, caption) in [("1F34E", "a red apple"), ("1F525", "fire"), ("2600-FE0F", "the sun"), ("2764-FE0F", "a red heart")] {
        std::fs::copy(targets.join(format!("{name}.png")), images.join(format!("{name}.png"))).unwrap();
        if name.starts_with("1F") {
            std::fs::write(images.join(format!("{name}.txt")), format!("{caption}\n")).unwrap();
        }
    }
    std::fs::write(images.join("metadata.jsonl"), "{\"file_name\": \"2600-FE0F.png\", \"text\": \"the sun\"}\n{\"file_name\": \"2764-FE0F.png\", \"text\": \"a red heart\"}\n").unwrap();
    let model = fixtures().join("sd1");
    let (model, images) = (model.to_str().unwrap(), images.to_str().unwrap());
    let run = |out: &Path, steps: &str, extra: &[&str]| {
        let mut args = vec!["--device", "cpu", "train-lora", "--model", model, "--images", images, "--resolution", "32", "--batch", "2", "--lr", "1e-3", "--cond-dropout", "0.25", "--steps", steps, "--save-every", "3", "--sample-steps", "3", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = ldm(&args);
        assert!(ok, "ldm train-lora failed: {stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).expect("a JSON report")
    };
    let whole = dir.join("whole");
    let report = run(&whole, "6", &[]);
    assert_eq!((report["steps"].as_u64(), report["images"].as_u64()), (Some(6), Some(4)));
    for f in ["pytorch_lora_weights.safetensors", "training/lora.json", "training/state.json", "training/state.safetensors", "samples/step-000006.png"] {
        assert!(whole.join(f).is_file(), "{f} missing");
    }
    let lora = whole.join("pytorch_lora_weights.safetensors");
    let gen = |extra: &[&str], out: &Path| {
        let mut args = vec!["--device", "cpu", "generate", "--model", model, "--prompt", "a red apple", "--steps", "3", "--width", "32", "--height", "32", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = ldm(&args);
        assert!(ok, "generate failed: {stderr}");
        read_png(out).0
    };
    let with = gen(&["--lora", lora.to_str().unwrap()], &dir.join("with.png"));
    let without = gen(&[], &dir.join("without.png"));
    assert_ne!(with, without, "the trained LoRA changes nothing");

    let split = dir.join("split");
    run(&split, "3", &[]);
    run(&split, "6", &["--resume"]);
    let losses = |d: &Path| -> Vec<f64> {
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("training/state.json")).unwrap()).unwrap();
        state["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };
    assert_eq!(losses(&whole).len(), 6);
    assert_eq!(losses(&whole), losses(&split), "a resumed run must repeat the uninterrupted one");
    assert!(std::fs::read(&lora).unwrap() == std::fs::read(split.join("pytorch_lora_weights.safetensors")).unwrap(), "resumed LoRA differs");

    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(targets.join("1F34E.png"), bare.join("a.png")).unwrap();
    for (args, want) in [
        (vec!["train-lora", "--model", model, "--images", bare.to_str().unwrap()], "has no caption"),
        (vec!["train-lora", "--model", model, "--images", images, "--resolution", "40"], "multiple of 32"),
        (vec!["train-lora", "--model", model, "--images", images, "--targets", "conv1"], "only linear layers"),
        (vec!["train-lora", "--model", model, "--images", images, "--targets", "nothing"], "match no linear layer"),
        (vec!["train-lora", "--model", model, "--images", images, "--resume", "--out", dir.join("none").to_str().unwrap()], "no training state"),
    ] {
        let mut full = vec!["--device", "cpu"];
        full.extend(args);
        let (ok, _, stderr) = ldm(&full);
        assert!(!ok && stderr.contains(want) && stderr.trim().lines().count() == 1, "{full:?}: {stderr}");
    }
}

/// `ldm convert --calibrate`: the layers' recorded inputs choose the quantised blocks (GPTQ and
/// a weighted scale search), which brings the converted q4_1 UNet's noise prediction closer to
/// f32 than plain rounding; the recipe says so, and `ldm bench quality --reference` measures a
/// converted folder against its source; `--bits 5` mixes types by a sensitivity scan within the budget.
#[test]
fn convert_calibrates_quantised_weights() {
    let root = tmp("calibrate");
    let sd1 = fixtures().join("sd1");
    let sd1 = sd1.to_str().expect("utf-8");
    let out = root.join("q4-calibrated");
    let (ok, _, err) = ldm(&["--device", "cpu", "convert", "--model", sd1, "--out", out.to_str().expect("utf-8"), "--unet", "q4_1", "--calibrate", "3", "--calibration-steps", "4", "--calibration-prompt", "a red apple", "--calibration-prompt", "a blue car"]);
    assert!(ok, "convert --calibrate: {err}");
    assert!(err.contains("calibration 3/3: \"a red apple\""), "progress: {err}");
    let hints: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("ldm-web.json")).expect("ldm-web.json")).expect("json");
    let recipe = hints["quantisation"]["recipe"].as_str().expect("a recipe").to_string();
    assert!(recipe.starts_with("unet=q4_1,") && recipe.contains(";calibrated on 3 prompts ("), "{recipe}");
    let bench = |extra: &[&str]| {
        let (ok, stdout, stderr) = ldm(&[&["--device", "cpu", "bench", "quality", "--steps", "4", "--guidance", "7.5", "--seeds", "0,1"][..], extra].concat());
        assert!(ok, "bench quality {extra:?}: {stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).expect("a JSON report")
    };
    let calibrated = bench(&["--model", out.to_str().expect("utf-8"), "--reference", sd1]);
    let plain = bench(&["--model", sd1, "--unet", "q4_1"]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    println!("q4_1 noise prediction {:.1} dB plain, {:.1} dB calibrated; images {:.1} / {:.1} dB", f(&plain, "noise_prediction_psnr_db"), f(&calibrated, "noise_prediction_psnr_db"), f(&plain, "mean_psnr_db"), f(&calibrated, "mean_psnr_db"));
    assert_eq!(calibrated["recipe"].as_str(), Some(recipe.as_str()));
    assert_eq!(calibrated["unet_bytes"], plain["unet_bytes"], "the same format, the same bytes");
    assert!(f(&calibrated, "noise_prediction_psnr_db") > f(&plain, "noise_prediction_psnr_db") + 1.0, "calibration must bring the noise prediction closer to f32: {calibrated} vs {plain}");
    let (ok, _, stderr) = ldm(&["convert", "--model", sd1, "--out", root.join("never").to_str().expect("utf-8"), "--quant", "f16", "--calibrate", "2"]);
    assert!(!ok && stderr.contains("give a quantised type") && stderr.trim().lines().count() == 1, "{stderr}");

    // --bits 5: a layer type each from the sensitivity scan, within 5 bits per quantised weight
    // on average, closer to f32 than a calibrated q4_1 UNet of the same size.
    let mixed = root.join("bits5");
    let (ok, _, err) = ldm(&["--device", "cpu", "convert", "--model", sd1, "--out", mixed.to_str().expect("utf-8"), "--bits", "5", "--calibrate", "3", "--calibration-steps", "4"]);
    assert!(ok, "convert --bits 5: {err}");
    assert!(err.contains("sensitivity scan") && err.contains("--bits 5: "), "{err}");
    let m = bench(&["--model", mixed.to_str().expect("utf-8"), "--reference", sd1]);
    println!("--bits 5: {:.3} bits, noise {:.1} dB, images {:.1} dB", f(&m, "quantised_bits_per_weight"), f(&m, "noise_prediction_psnr_db"), f(&m, "mean_psnr_db"));
    assert!(f(&m, "quantised_bits_per_weight") <= 5.0 + 1e-9, "{m}");
    assert!(f(&m, "noise_prediction_psnr_db") > f(&calibrated, "noise_prediction_psnr_db"), "the scan's mix must beat calibrated q4_1: {m}");
    assert!(m["recipe"].as_str().is_some_and(|r| r.contains("5 bits per weight from a sensitivity scan")), "{m}");
    for (flags, want) in [(&["--bits", "5"][..], "give --calibrate"), (&["--bits", "3", "--calibrate", "1"][..], "from 4.5")] {
        let (ok, _, stderr) = ldm(&[&["convert", "--model", sd1, "--out", root.join("never").to_str().expect("utf-8")][..], flags].concat());
        assert!(!ok && stderr.contains(want) && stderr.trim().lines().count() == 1, "{flags:?}: {stderr}");
    }
}

/// `ldm bench quality` on the SD1 fixture: q8 stays close to f32, q4_1 is smaller and further,
/// the JSON names the recipe and sizes; without a quantisation it is an error.
#[test]
fn bench_quality_compares_quantised_with_f32() {
    let model = fixtures().join("sd1");
    let run = |q: &str| {
        let (ok, stdout, stderr) = ldm(&["--device", "cpu", "bench", "quality", "--model", model.to_str().unwrap(), "--quant", q, "--steps", "4", "--guidance", "7.5", "--seeds", "0,1"]);
        assert!(ok, "bench quality --quant {q}: {stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).expect("a JSON report")
    };
    let (q8, q4) = (run("q8"), run("q4_1"));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    println!("q8: {:.1} dB images, {:.1} dB noise, {:.2} bits; q4_1: {:.1} dB, {:.1} dB, {:.2} bits", f(&q8, "mean_psnr_db"), f(&q8, "noise_prediction_psnr_db"), f(&q8, "bits_per_weight"), f(&q4, "mean_psnr_db"), f(&q4, "noise_prediction_psnr_db"), f(&q4, "bits_per_weight"));
    assert_eq!(q8["recipe"], "unet=q8_0,text_encoder=q8_0,vae=q8_0");
    assert_eq!(q8["images"].as_array().map(Vec::len), Some(4), "2 prompts x 2 seeds");
    assert!(f(&q8, "mean_psnr_db") >= 40.0 && f(&q8, "noise_prediction_psnr_db") >= 40.0 && f(&q8, "mean_ssim") > 0.99, "q8: {q8}");
    assert!(f(&q4, "mean_psnr_db") < f(&q8, "mean_psnr_db") && f(&q4, "noise_prediction_psnr_db") < f(&q8, "noise_prediction_psnr_db"), "q4_1 should be further from f32 than q8");
    assert!(f(&q4, "unet_bytes") < f(&q8, "unet_bytes") && f(&q8, "unet_bytes") < f(&q8, "unet_bytes_f32"));
    assert!((f(&q4, "quantised_bits_per_weight") - 5.0).abs() < 0.3, "q4_1's quantised tensors: 5 bits per weight, row padding aside: {q4}");
    let bits = f(&q8, "bits_per_weight");
    assert!((8.0..10.5).contains(&bits) && (f(&q8, "unet_bytes") * 8.0 / f(&q8, "unet_parameters") - bits).abs() < 1e-9, "q8 bits per weight {bits}");
    let (ok, _, stderr) = ldm(&["--device", "cpu", "bench", "quality", "--model", model.to_str().unwrap()]);
    assert!(!ok && stderr.contains("give --quant") && stderr.trim().lines().count() == 1, "{stderr}");
}
