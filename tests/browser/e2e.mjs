// End-to-end tests of the web app in headless Chromium (playwright-core) and Firefox ESR
// (puppeteer-core over WebDriver BiDi), against `ldm serve` on 127.0.0.1.
//
//   node tests/browser/e2e.mjs --ldm target/release/ldm --www www --fixtures tests/fixtures
//                              [--browsers chromium,firefox] [--artifacts DIR]
//
// Per browser, with a fresh profile and a fresh server (started with --inject-fault, so the first
// UNet download breaks off mid-body):
//   builtin   a first visit (no link, empty gallery) generates an example prompt with the built-in
//             emoji model served beside the app, within 2/255 of `ldm generate` with no --model, on
//             the CPU backend (auto: these browsers' WebGPU is a software fallback);
//             the example prompts and the About box (sources, licences) are on the page
//   page      a share link generates in the page; PNG pixels within 2/255 of `ldm generate`'s;
//             the parameters chunk is there; weights came by Range requests; the first UNet step
//             began before the VAE's weights were requested; the torn download was resumed
//   again     a second generation (another seed) fetches nothing and matches the CLI
//   ldm       the latent diffusion paper's pipelines (tiny LDMTextToImagePipeline and LDMPipeline
//             fixtures) generate in the page as with `ldm generate`
//   cancel    a long generation stops when Cancel is pressed, and the page stays usable
//   oom       an out-of-memory error is reported plainly, and the next generation works
//   recover   a lost GPU device is reported and the generation still completes, exactly
//   manifest  a chunk whose sha256 disagrees with ldm-manifest.json is refused, naming the file
//   gallery   after a reload the gallery holds the images
//   share     the share link, opened in a new tab, reproduces the first image exactly
//   offline   with the server stopped, the page reloads from the service worker and generates
//   widget    <ldm-image> embedded in a page of another origin generates the same image, with
//             ldm-progress and ldm-done events; its lora attribute gives diffusers' image; its
//             control-image with control-preprocess="depth" gives the CLI's; its init-image feeds
//             a concatenation-conditioned LDM
//   families  against diffusers' own images (ref/family_N): SDXL with an SDXL LoRA from a share
//             link, two LoRA rows with scale sliders and TAESD previews every step, textual-
//             inversion embeddings, the A1111 prompt-weighting toggle, TAESD as the final decoder;
//             the download counter never passes its total
//   photo     a photo uploaded as the init image becomes canny edges (OpenCV's, exactly) and a depth
//             map (Depth Anything fetched by Range, as `ldm depth`'s) shown beside it; the depth map
//             drives a ControlNet as `ldm generate --control` does; edited with the mouse (a colour
//             picked from it, strokes painted), it drives the ControlNet as the edited PNG does in
//             the CLI; the estimator is in the models panel
//   concat    a concatenation-conditioned LDM draws from the uploaded photo as `ldm generate
//             --init-image` does (and the widget's init-image, above)
//   train     the Train tab trains on the fixture pairs with ldm train's losses, the run is found
//             after a reload (OPFS) and resumes exactly, and the result generates in the Generate tab
//   train-lora  the Train tab trains a LoRA of the built-in model on captioned images with ldm
//             train-lora's losses, resumes it exactly, and the LoRA (opfs:RUN/...) changes the
//             Generate tab's image
//   bench depth  bench.html?mode=depth prints ldm bench depth's JSON
//   bench     bench.html?mode=generate prints ldm bench generate's JSON (Chromium)
//   cpu       the share link on the CPU backend (?device=cpu) gives the CLI's pixels
//   no-webgpu a browser without WebGPU gets a message naming the flag to set, and its first visit
//             draws on the CPU backend as the CLI does
// A screenshot of the page after its first generation is saved under --artifacts.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import http from 'node:http';
import crypto from 'node:crypto';
import zlib from 'node:zlib';
import { spawn, execFileSync } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { PNG } from 'pngjs';
import { CHROMIUM_ARGS, FIREFOX_PREFS, EXECUTABLES } from './browsers.mjs';
import { readHeadersFile } from './server.mjs';

const TOL = 2; // of 255
// The built-in model in f16 against the CLI's f32 (see tests/builtin.rs): max and mean, of 255.
const BUILTIN_F16_TOL = { max: 8, mean: 0.5 };
// The family fixtures against diffusers' f32 images when the browser runs in f16 (Firefox on
// lavapipe): random tiny weights, 4 steps; f32 runs stay within TOL.
const FAMILY_F16_TOL = { max: 4, mean: 0.5 };
const PROMPT = 'a watercolor lighthouse at dawn';
const SETTINGS = { prompt: PROMPT, steps: 3, guidance: 7.5, width: 64, height: 64 };
// LDM fixture runs, as page links and as `ldm generate` flags.
const LDM_TEXT2IM = { query: { prompt: 'A painting of a squirrel eating a burger', seed: '6', steps: '4', guidance: '6', width: '96', height: '64' },
  cli: ['--prompt', 'A painting of a squirrel eating a burger', '--seed', '6', '--steps', '4', '--guidance', '6', '--width', '96', '--height', '64'] };
const SDXL_Q4 = { prompt: 'a photo of an astronaut riding a horse on mars', negative_prompt: 'blurry, low quality', seed: '2000', steps: '4', guidance: '5', width: '64', height: '64' };
const SDXL_Q4_CLI = Object.entries(SDXL_Q4).flatMap(([k, v]) => [`--${k.replace('_', '-')}`, v]);
const LDM_UNCOND = { query: { prompt: '', seed: '1', steps: '4' }, cli: ['--seed', '1', '--steps', '4'] };
// The concatenation-conditioned LDM fixture (tests/fixtures/concat/rescale) with the photo as its condition.
const CONCAT = { query: { seed: '3', steps: '10', width: '32', height: '32' }, cli: ['--seed', '3', '--steps', '10', '--width', '32', '--height', '32'] };

// The Train tab's run (the fixture pairs, 32x32, a small UNet) and ldm train's flags for the same.
const TRAIN = {
  fields: { 'train-steps': '12', 'train-batch': '2', 'train-lr': '0.001', 'train-resolution': '32', 'train-channels': '32,64', 'train-save-every': '6', 'train-sample-every': '0', 'train-seed': '0' },
  cli: ['--batch', '2', '--lr', '0.001', '--resolution', '32', '--channels', '32,64', '--seed', '0'],
  steps: 12,
  resumeTo: 16,
};

// The Train tab's LoRA run (the fixture targets with captions, the built-in model at 32x32) and
// ldm train-lora's flags for the same.
const LORA = {
  fields: { 'train-steps': '4', 'train-batch': '2', 'train-lr': '0.001', 'train-resolution': '32', 'train-save-every': '2', 'train-sample-every': '0', 'train-seed': '0', 'train-dropout': '0', 'train-lora-rank': '4' },
  cli: ['--batch', '2', '--lr', '0.001', '--resolution', '32', '--seed', '0', '--rank', '4', '--steps', '6'],
  captions: { '1F34E': 'a red apple', '1F525': 'fire', '2600-FE0F': 'the sun', '2764-FE0F': 'a red heart' },
};

function parseArgs(argv) {
  const o = { ldm: 'target/release/ldm', www: 'www', fixtures: 'tests/fixtures', browsers: ['chromium', 'firefox'], artifacts: null, timeoutMin: 30, only: null };
  for (let i = 0; i < argv.length; i++) {
    const [k, inline] = argv[i].split(/=(.*)/s);
    const v = () => inline ?? argv[++i];
    switch (k) {
      case '--ldm': o.ldm = v(); break;
      case '--www': o.www = v(); break;
      case '--fixtures': o.fixtures = v(); break;
      case '--browsers': o.browsers = v().split(',').filter(Boolean); break;
      case '--artifacts': o.artifacts = v(); break;
      case '--timeout-min': o.timeoutMin = Number(v()); break;
      // Runs only these scenarios (comma-separated attempt names), for debugging one of them.
      case '--only': o.only = v().split(',').filter(Boolean); break;
      default: console.error(`unknown argument ${k}`); process.exit(2);
    }
  }
  return o;
}

const opts = parseArgs(process.argv.slice(2));
const t0 = performance.now();
const secs = () => ((performance.now() - t0) / 1000).toFixed(0);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- fixtures: a model folder with a manifest, a tampered copy, and the CLI's images -----------------

function copyDir(from, to) {
  fs.cpSync(from, to, { recursive: true });
}

// A ZIP (deflated entries) of the files under `dir`, named relative to it, for the Train tab's ZIP input.
function zipOf(dir) {
  const local = [];
  const central = [];
  let offset = 0;
  const walk = (d) => fs.readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(path.join(d, e.name)) : [path.join(d, e.name)]));
  const files = walk(dir).sort();
  for (const f of files) {
    const name = Buffer.from(path.relative(dir, f).split(path.sep).join('/'));
    const raw = fs.readFileSync(f);
    const data = zlib.deflateRawSync(raw);
    const head = Buffer.alloc(30);
    head.writeUInt32LE(0x04034b50, 0); head.writeUInt16LE(20, 4); head.writeUInt16LE(8, 8);
    head.writeUInt32LE(zlib.crc32(raw), 14); head.writeUInt32LE(data.length, 18); head.writeUInt32LE(raw.length, 22); head.writeUInt16LE(name.length, 26);
    const entry = Buffer.alloc(46);
    entry.writeUInt32LE(0x02014b50, 0); entry.writeUInt16LE(20, 4); entry.writeUInt16LE(20, 6); entry.writeUInt16LE(8, 10);
    entry.writeUInt32LE(zlib.crc32(raw), 16); entry.writeUInt32LE(data.length, 20); entry.writeUInt32LE(raw.length, 24); entry.writeUInt16LE(name.length, 28); entry.writeUInt32LE(offset, 42);
    local.push(head, name, data);
    central.push(entry, name);
    offset += 30 + name.length + data.length;
  }
  const dirBytes = Buffer.concat(central);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0); end.writeUInt16LE(files.length, 8); end.writeUInt16LE(files.length, 10); end.writeUInt32LE(dirBytes.length, 12); end.writeUInt32LE(offset, 16);
  return Buffer.concat([...local, dirBytes, end]);
}

function prepare(work) {
  const models = path.join(work, 'models');
  fs.mkdirSync(models, { recursive: true });
  copyDir(path.join(opts.fixtures, 'sd1'), path.join(models, 'sd1'));
  // 64 KiB chunks: the 2.2 MB UNet takes several requests, so coalescing and resuming show.
  execFileSync(opts.ldm, ['manifest', path.join(models, 'sd1'), '--chunk-size', '65536']);
  copyDir(path.join(models, 'sd1'), path.join(models, 'sd1-tampered'));
  const mf = path.join(models, 'sd1-tampered', 'ldm-manifest.json');
  const m = JSON.parse(fs.readFileSync(mf, 'utf8'));
  m.files['unet/diffusion_pytorch_model.safetensors'].chunks[1] = '0'.repeat(64);
  fs.writeFileSync(mf, JSON.stringify(m));
  copyDir(path.join(opts.fixtures, 'sd1-inpaint'), path.join(models, 'sd1-inpaint'));
  copyDir(path.join(opts.fixtures, 'controlnet-a'), path.join(models, 'controlnet-a'));
  copyDir(path.join(opts.fixtures, 'ldm', 'text2im'), path.join(models, 'ldm-text2im'));
  copyDir(path.join(opts.fixtures, 'ldm', 'uncond'), path.join(models, 'ldm-uncond'));
  for (const dir of ['sdxl', 'lora', 'embeddings', 'taesd']) copyDir(path.join(opts.fixtures, dir), path.join(models, dir));
  copyDir(path.join(opts.fixtures, 'depth', 'depth-anything'), path.join(models, 'depth-anything'));
  copyDir(path.join(opts.fixtures, 'concat', 'rescale'), path.join(models, 'concat-rescale'));
  fs.mkdirSync(path.join(models, 'photo'), { recursive: true });
  fs.copyFileSync(path.join(opts.fixtures, 'images', 'init.png'), path.join(models, 'photo', 'init.png'));
  // The photo scenario's references: ldm depth's 8-bit map of the photo, and the ControlNet it drives.
  const depth8 = path.join(work, 'cli-depth8.png');
  execFileSync(opts.ldm, ['depth', '--model', path.join(models, 'depth-anything'), '--image', path.join(opts.fixtures, 'images', 'init.png'), '--out', depth8, '--bits', '8'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const cli = (args, out) => {
    execFileSync(opts.ldm, ['generate', ...args, '--out', out], { stdio: ['ignore', 'ignore', 'inherit'] });
    return PNG.sync.read(fs.readFileSync(out));
  };
  const ldm = {
    text2im: cli(['--model', path.join(models, 'ldm-text2im'), ...LDM_TEXT2IM.cli], path.join(work, 'cli-ldm-text2im.png')),
    uncond: cli(['--model', path.join(models, 'ldm-uncond'), ...LDM_UNCOND.cli], path.join(work, 'cli-ldm-uncond.png')),
  };
  // The built-in model's first-visit image: example prompt 0 with the model's own settings.
  const hints = JSON.parse(fs.readFileSync(path.join(opts.www, 'builtin', 'emoji', 'ldm-web.json'), 'utf8'));
  const builtin = { hints, png: cli(['--prompt', hints.example_prompts[0], '--seed', '0'], path.join(work, 'cli-builtin.png')) };
  const refs = {};
  for (const seed of [7, 8]) {
    const out = path.join(work, `cli-seed${seed}.png`);
    execFileSync(opts.ldm, ['generate', '--model', path.join(models, 'sd1'), '--prompt', PROMPT, '--seed', String(seed), '--steps', '3',
      '--guidance', '7.5', '--width', '64', '--height', '64', '--out', out], { stdio: ['ignore', 'ignore', 'inherit'] });
    refs[seed] = PNG.sync.read(fs.readFileSync(out));
  }
  // ldm convert's web format: q4_1 UNet, q8 text encoder and VAE; the page must load it like any model.
  execFileSync(opts.ldm, ['convert', '--model', path.join(models, 'sd1'), '--out', path.join(models, 'sd1-q4'), '--unet', 'q4_1', '--text-encoder', 'q8', '--vae', 'q8'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const quantised = cli(['--model', path.join(models, 'sd1-q4'), '--prompt', PROMPT, '--seed', '7', '--steps', '3', '--guidance', '7.5', '--width', '64', '--height', '64'], path.join(work, 'cli-sd1-q4.png'));
  // SDXL converted the same way: a q4_1 UNet and q8 text encoders (both) and VAE.
  execFileSync(opts.ldm, ['convert', '--model', path.join(models, 'sdxl'), '--out', path.join(models, 'sdxl-q4'), '--unet', 'q4_1', '--text-encoder', 'q8', '--vae', 'q8'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const xlQ4 = cli(['--model', path.join(models, 'sdxl-q4'), ...SDXL_Q4_CLI], path.join(work, 'cli-sdxl-q4.png'));
  const photo = {
    depth8: PNG.sync.read(fs.readFileSync(depth8)),
    edges: PNG.sync.read(fs.readFileSync(path.join(opts.fixtures, 'edges', 'init_edges.png'))),
    control: cli(['--model', path.join(models, 'sd1'), '--control', `${path.join(models, 'controlnet-a')}=${depth8}`, '--prompt', PROMPT, '--seed', '3', '--steps', '3', '--guidance', '7.5'], path.join(work, 'cli-photo-depth-control.png')),
  };
  // A concatenation-conditioned LDM (ldm-web.json "concat": the photo, rescaled, beside the latents).
  const concat = cli(['--model', path.join(models, 'concat-rescale'), '--init-image', path.join(opts.fixtures, 'images', 'init.png'), ...CONCAT.cli], path.join(work, 'cli-concat.png'));
  // ldm train on the fixture pairs with the Train tab's settings below: its loss per step.
  const trainOut = path.join(work, 'cli-train');
  execFileSync(opts.ldm, ['--device', 'cpu', 'train', '--pairs', path.join(opts.fixtures, 'training', 'pairs'), ...TRAIN.cli, '--steps', String(TRAIN.resumeTo), '--save-every', '100', '--out', trainOut], { stdio: ['ignore', 'ignore', 'inherit'] });
  const train = { losses: JSON.parse(fs.readFileSync(path.join(trainOut, 'training', 'state.json'), 'utf8')).losses, zip: path.join(work, 'pairs.zip') };
  fs.writeFileSync(train.zip, zipOf(path.join(opts.fixtures, 'training', 'pairs')));
  // ldm train-lora of the built-in model on the fixture targets with captions (NAME.txt).
  const loraImages = path.join(work, 'lora-images');
  fs.mkdirSync(loraImages, { recursive: true });
  for (const [stem, caption] of Object.entries(LORA.captions)) {
    fs.copyFileSync(path.join(opts.fixtures, 'training', 'pairs', 'target', `${stem}.png`), path.join(loraImages, `${stem}.png`));
    fs.writeFileSync(path.join(loraImages, `${stem}.txt`), `${caption}\n`);
  }
  const loraOut = path.join(work, 'cli-lora');
  execFileSync(opts.ldm, ['--device', 'cpu', 'train-lora', '--model', 'builtin', '--images', loraImages, ...LORA.cli, '--save-every', '100', '--sample-steps', '2', '--out', loraOut], { stdio: ['ignore', 'ignore', 'inherit'] });
  const lora = { losses: JSON.parse(fs.readFileSync(path.join(loraOut, 'training', 'state.json'), 'utf8')).losses, files: fs.readdirSync(loraImages).sort().map((f) => path.join(loraImages, f)) };
  return { models, refs, ldm, builtin, quantised, xlQ4, photo, concat, train, lora };
}

// ---- ldm serve, with its request log ---------------------------------------------------------------

async function startServe(models, port = 0) {
  const args = ['serve', '--root', opts.www, '--models', models, '--port', String(port), '--inject-fault', 'sd1/unet/diffusion_pytorch_model.safetensors'];
  const child = spawn(opts.ldm, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  let buf = '';
  child.stderr.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const m = /^(\w+) (\S+) (\d+) (\d+)(?: range=(.*))?$/.exec(line);
      if (m) log.push({ t: Date.now(), method: m[1], url: m[2], status: Number(m[3]), bytes: Number(m[4]), range: m[5] ?? null });
    }
  });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = /on (http:\/\/[\d.]+:\d+)\//.exec(out);
      if (m) resolve(`${m[1]}/`);
    });
    child.on('exit', (code) => reject(new Error(`ldm serve exited with ${code}`)));
  });
  return { url, log, port: Number(new URL(url).port), stop: () => new Promise((r) => { child.on('exit', r); child.kill('SIGKILL'); }) };
}

// A page of another origin that embeds the widget (localhost and 127.0.0.1 are different origins).
function startEmbedder(appUrl) {
  const model = new URL('models/sd1/', appUrl).href;
  const html = `<!doctype html><meta charset="utf-8"><title>embed</title>
<script type="module" src="${new URL('ldm-image.js', appUrl).href}" nonce="e2e"></script>
<ldm-image model="${model}" prompt="${PROMPT}" seed="7" steps="3" guidance="7.5" width="64" height="64" device="gpu" style="width:192px"></ldm-image>
<script nonce="e2e">
  window.__embed = { progress: [], done: null, error: null };
  const el = document.querySelector('ldm-image');
  el.addEventListener('ldm-progress', (e) => window.__embed.progress.push(e.detail));
  el.addEventListener('ldm-error', (e) => { window.__embed.error = e.detail.message; });
  window.__embed.all = [];
  el.addEventListener('ldm-done', async (e) => {
    const b = new Uint8Array(await e.detail.blob.arrayBuffer());
    let s = ''; for (const x of b) s += String.fromCharCode(x);
    window.__embed.done = btoa(s);
    window.__embed.all.push(window.__embed.done);
  });
</script>`;
  // The embedding page's own policy, as strict as README's widget section says it can be.
  const appOrigin = new URL(appUrl).origin;
  const csp = `script-src 'nonce-e2e' ${appOrigin} 'wasm-unsafe-eval'; worker-src blob: ${appOrigin}; connect-src ${appOrigin}; object-src 'none'`;
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Security-Policy': csp });
    res.end(html);
  });
  return new Promise((resolve) => server.listen(0, 'localhost', () => resolve({ url: `http://localhost:${server.address().port}/`, close: () => server.close() })));
}

// ---- browsers: one small interface over playwright and puppeteer -----------------------------------

async function launch(name, { webgpu = true } = {}) {
  if (name === 'chromium') {
    const { chromium } = await import('playwright-core');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ldm-e2e-chromium-'));
    const ctx = await chromium.launchPersistentContext(dir, {
      executablePath: EXECUTABLES.chromium, headless: true, timeout: 120_000,
      args: webgpu ? CHROMIUM_ARGS : CHROMIUM_ARGS.filter((a) => a !== '--enable-unsafe-webgpu'),
    });
    return { newPage: () => ctx.newPage(), close: async () => { await ctx.close().catch(() => {}); fs.rmSync(dir, { recursive: true, force: true }); } };
  }
  const puppeteer = (await import('puppeteer-core')).default;
  const browser = await puppeteer.launch({
    browser: 'firefox', executablePath: EXECUTABLES.firefox, headless: true, timeout: 120_000, protocolTimeout: 600_000,
    extraPrefsFirefox: { ...FIREFOX_PREFS, 'dom.webgpu.enabled': webgpu },
  });
  return { newPage: () => browser.newPage(), close: () => browser.close().catch(() => {}) };
}

function watch(page, tag) {
  page.on('console', (m) => {
    const text = m.text();
    if (/error|warn|panic|retrying|lost/i.test(text) || m.type() === 'error') console.log(`${tag} console ${m.type()}: ${text.slice(0, 400)}`);
  });
  page.on('pageerror', (e) => console.log(`${tag} page error: ${e?.message ?? e}`));
  page.on('crash', () => console.log(`${tag} PAGE CRASHED`));
  page.on('close', () => console.log(`${tag} page closed`));
}

// Files chosen in an <input type=file> (one path or several), by each driver's own upload
// (playwright, puppeteer).
async function upload(page, selector, file) {
  if (typeof page.setInputFiles === 'function') return page.setInputFiles(selector, file);
  const input = await page.$(selector);
  if (!input) throw new Error(`no ${selector} on the page`);
  await input.uploadFile(...[file].flat());
}

// A mouse drag over the element `selector` between two points given as fractions of its box.
async function drag(page, selector, [x0, y0], [x1, y1]) {
  const box = await page.evaluate(`(() => {
    const el = document.querySelector(${JSON.stringify(selector)});
    el.scrollIntoView({ block: 'center' });
    const r = el.getBoundingClientRect();
    return { x: r.x, y: r.y, width: r.width, height: r.height };
  })()`);
  await page.mouse.move(box.x + box.width * x0, box.y + box.height * y0);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * x1, box.y + box.height * y1, { steps: 12 });
  await page.mouse.up();
}

async function waitFor(page, expr, what, timeoutMs = opts.timeoutMin * 60_000) {
  const end = performance.now() + timeoutMs;
  for (;;) {
    const v = await page.evaluate(expr);
    if (v) return v;
    if (performance.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(250);
  }
}

// Waits for the page's next result (or error) after `before` results; returns the PNG and events.
async function nextResult(page, before) {
  const out = await waitFor(page, `(() => {
    const a = window.__ldmApp; if (!a) return null;
    if (a.results.length > ${before}) return { ok: true };
    const e = a.events.filter((x) => x.type === 'error');
    if (e.length && a.events.lastIndexOf(e[e.length - 1]) > a.events.findLastIndex((x) => x.type === 'start')) return { ok: false, error: e[e.length - 1] };
    return null;
  })()`, 'a generation');
  if (!out.ok) throw new Error(`the page reported ${out.error.kind}: ${out.error.message}`);
  const b64 = await page.evaluate(`(async () => {
    const r = window.__ldmApp.results[window.__ldmApp.results.length - 1];
    const b = new Uint8Array(await r.blob.arrayBuffer());
    let s = ''; for (const x of b) s += String.fromCharCode(x);
    return btoa(s);
  })()`);
  return Buffer.from(b64, 'base64');
}

function pixelDiff(pngBytes, ref) {
  const img = PNG.sync.read(pngBytes);
  if (img.width !== ref.width || img.height !== ref.height) throw new Error(`size ${img.width}x${img.height}, CLI ${ref.width}x${ref.height}`);
  let max = 0, sum = 0, n = 0;
  for (let i = 0; i < img.data.length; i++) {
    if (i % 4 === 3) continue;
    const d = Math.abs(img.data[i] - ref.data[i]);
    max = Math.max(max, d); sum += d; n++;
  }
  return { max, mean: sum / n };
}

const maxDiff = (pngBytes, ref) => pixelDiff(pngBytes, ref).max;

// diffusers' output_type="np" image of a family case (ref/family_N.safetensors, "image": 1 x H x W
// x 3 f32 in [0, 1]) as RGBA values in [0, 255], unrounded, for pixelDiff.
function diffusersImage(index) {
  const buf = fs.readFileSync(path.join(opts.fixtures, 'ref', `family_${index}.safetensors`));
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.toString('utf8', 8, 8 + n));
  const t = header.image;
  if (!t || t.dtype !== 'F32') throw new Error(`family_${index}.safetensors has no f32 image`);
  const [, height, width] = t.shape;
  const data = new Float32Array(width * height * 4);
  for (let i = 0; i < width * height; i++) {
    for (let c = 0; c < 3; c++) data[i * 4 + c] = 255 * buf.readFloatLE(8 + n + t.data_offsets[0] + 4 * (i * 3 + c));
    data[i * 4 + 3] = 255;
  }
  return { width, height, data };
}

function familyCase(index) {
  const c = JSON.parse(fs.readFileSync(path.join(opts.fixtures, 'ref', 'family_cases.json'), 'utf8')).cases[index];
  const q = { seed: String(c.seed), steps: String(c.steps), guidance: String(c.guidance), width: String(c.width), height: String(c.height) };
  const prompt = c.a1111?.prompt ?? c.prompt ?? '';
  const negative = c.a1111?.negative_prompt ?? c.negative_prompt;
  return { ...c, query: { prompt, ...(negative ? { negative_prompt: negative } : {}), ...(c.scheduler ? { scheduler: c.scheduler } : {}), ...q } };
}

function parametersChunk(pngBytes) {
  // tEXt / iTXt chunks named "parameters".
  let off = 8;
  while (off + 8 <= pngBytes.length) {
    const len = pngBytes.readUInt32BE(off);
    const type = pngBytes.toString('latin1', off + 4, off + 8);
    const data = pngBytes.subarray(off + 8, off + 8 + len);
    if ((type === 'tEXt' || type === 'iTXt') && data.toString('latin1', 0, 11) === 'parameters\0') return data.toString('utf8', 11);
    off += 12 + len;
  }
  return null;
}

// ---- the scenario ----------------------------------------------------------------------------------

async function runBrowser(name, fx, results) {
  const tag = `[${name}]`;
  const check = (test, ok, detail) => {
    results.push({ browser: name, test, ok, detail });
    console.log(`${tag} ${ok ? 'pass' : 'FAIL'} ${test}: ${detail}`);
  };
  const attempt = async (test, fn) => {
    if (opts.only && !opts.only.includes(test)) return;
    try {
      await fn();
    } catch (e) {
      check(test, false, (e?.stack ?? String(e)).split('\n').slice(0, 3).join(' | '));
    }
  };
  let serve = await startServe(fx.models);
  const app = serve.url;
  console.log(`${tag} ldm serve at ${app} (t=${secs()} s)`);
  const browser = await launch(name);
  const query = (seed) => new URLSearchParams({ model: '/models/sd1/', ...Object.fromEntries(Object.entries(SETTINGS).map(([k, v]) => [k, String(v)])), seed: String(seed) }).toString();
  const link7 = `${app}?${query(7)}`;
  let page = await browser.newPage();
  watch(page, tag);
  // This profile's scenarios test WebGPU (the app's Device setting, kept in the browser); the
  // first-visit profile below keeps the default (auto: the CPU backend on a fallback adapter).
  await page.goto(`${app}icon.svg`);
  await page.evaluate(`localStorage.setItem('ldm-device', 'gpu')`);
  let first = null;
  let firstLink = null; // the address the page gave its first image (a share link)
  try {
    await attempt('builtin', async () => {
      // A profile of its own: a first visit has an empty gallery and caches.
      const fresh = await launch(name);
      const page = await fresh.newPage();
      watch(page, `${tag}(first visit)`);
      try {
        await page.goto(app);
        const png = await nextResult(page, 0);
        const { max: d, mean } = pixelDiff(png, fx.builtin.png);
        const info = await page.evaluate('window.__ldmApp.results[0].info');
        const firstVisit = await page.evaluate(`window.__ldmApp.events.some((e) => e.type === 'first-visit')`);
        // A trained model with guidance 5 carries f16 rounding through 12 steps into a few pixels
        // (natively: 4.1/255 at most, 0.1/255 on average, tests/builtin.rs); f32 stays within TOL.
        const [tolMax, tolMean] = info.precision === 'f16' ? [BUILTIN_F16_TOL.max, BUILTIN_F16_TOL.mean] : [TOL, TOL];
        check('first visit draws with the built-in model', firstVisit && d <= tolMax && mean <= tolMean,
          `"${fx.builtin.hints.example_prompts[0]}", ${info.steps} steps, ${info.precision} on ${info.device_name}: max |browser - ldm generate (no --model)| = ${d}/255 (mean ${mean.toFixed(3)}, tolerance ${tolMax}/${tolMean}) in ${(info.total_ms / 1000).toFixed(1)} s (UNet ${(info.unet_steps_ms.reduce((a, b) => a + b, 0) / info.unet_steps_ms.length).toFixed(0)} ms/step, load ${(info.load_ms / 1000).toFixed(1)} s)`);
        // This browser's WebGPU is a software fallback here: auto chooses the CPU backend.
        check('a fallback adapter means the CPU backend', info.device === 'cpu', `device ${info.device} (${info.device_name})`);
        const dl = await page.evaluate(`window.__ldmApp.events.filter((e) => e.type === 'download').map((e) => [e.fetched, e.total])`);
        // The VAE file downloads in the background from the first step; a fast generation (the CPU
        // backend) can finish before its unused encoder half has arrived.
        check('built-in model download counter stays within its total', dl.length > 0 && dl.every(([f, t]) => f <= t) && dl.at(-1)[0] >= 0.95 * dl.at(-1)[1],
          `${dl.length} download events, last ${(dl.at(-1)?.[0] / 1e6).toFixed(2)} / ${(dl.at(-1)?.[1] / 1e6).toFixed(2)} MB, ${dl.filter(([f, t]) => f > t).length} past the total`);
        const builtinReqs = serve.log.filter((r) => r.url.startsWith('/builtin/emoji/') && r.url.endsWith('.safetensors'));
        check('built-in weights served beside the app', builtinReqs.length > 0 && builtinReqs.every((r) => r.status === 206 || r.status === 404), `${builtinReqs.length} range requests under /builtin/emoji/`);
        const page_ = await page.evaluate(`({ examples: [...document.querySelectorAll('#examples button')].map((b) => b.textContent), about: document.getElementById('about').textContent })`);
        check('example prompts and licences on the page', page_.examples.length === fx.builtin.hints.example_prompts.length && /Apache License 2\.0/.test(page_.about) && /CC BY 4\.0/.test(page_.about),
          `${page_.examples.length} example prompts; About box names Apache-2.0 and CC BY 4.0`);
        if (opts.artifacts) {
          fs.mkdirSync(opts.artifacts, { recursive: true });
          const shot = path.join(opts.artifacts, `builtin-${name}.png`);
          await page.screenshot({ path: shot, fullPage: true });
          console.log(`${tag} screenshot: ${shot}`);
        }
        // Steady-state speed of the built-in model in this browser (after a warm-up run).
        const h = fx.builtin.hints;
        await page.goto(`${app}bench.html?mode=generate&steps=${h.steps}&guidance=${h.guidance}&prompt=${encodeURIComponent(h.example_prompts[0])}`);
        const r = await waitFor(page, `window.__ldmBenchError ? { error: window.__ldmBenchError } : window.__ldmBenchResults`, 'the built-in benchmark');
        if (r.error) throw new Error(r.error);
        const total = r.text_encoder_ms + r.unet_step_ms.each.reduce((a, b) => a + b, 0) + r.vae_decode_ms;
        check('built-in model benchmark', r.unet_step_ms.each.length === h.steps && total > 0,
          `${r.adapter?.name || 'WebGPU'}, ${r.precision}: ${(total / 1000).toFixed(2)} s per image after warm-up (text encoder ${r.text_encoder_ms.toFixed(0)} ms, UNet ${r.unet_step_ms.mean.toFixed(0)} ms/step x ${h.steps}, VAE ${r.vae_decode_ms.toFixed(0)} ms), warm-up ${(r.warmup_ms / 1000).toFixed(1)} s, peak ${(r.peak_gpu_bytes / 2 ** 20).toFixed(1)} MiB`);
      } finally {
        await fresh.close();
      }
    });

    await attempt('page', async () => {
      await page.goto(link7);
      const png = await nextResult(page, 0);
      first = png;
      firstLink = await page.evaluate('location.href');
      const d = maxDiff(png, fx.refs[7]);
      const info = await page.evaluate('window.__ldmApp.results[0].info');
      check('page matches CLI', d <= TOL, `max |browser - ldm generate| = ${d}/255 (tolerance ${TOL}; browser ran in ${info.precision}, the CLI in f32)`);
      const params = parametersChunk(png);
      check('PNG parameters chunk', !!params && params.includes('Seed: 7') && params.startsWith(PROMPT), JSON.stringify(params));
      const modelReqs = serve.log.filter((r) => r.url.startsWith('/models/sd1/') && r.url.endsWith('.safetensors'));
      // 404s are the loader probing for files a model may not have (fp16 variants, shards).
      check('weights by Range requests', modelReqs.some((r) => r.status === 206) && modelReqs.every((r) => r.range && (r.status === 206 || r.status === 404)),
        `${modelReqs.length} safetensors requests (${modelReqs.filter((r) => r.status === 404).length} probes answered 404), all with Range, the rest 206: ${modelReqs.map((r) => `${r.url.split('/').slice(-2).join('/')} ${r.range}`).slice(0, 6).join('; ')}…`);
      const events = await page.evaluate('window.__ldmApp.events');
      const step1 = events.find((e) => e.type === 'step' && e.step === 1);
      const vae = serve.log.find((r) => r.url.includes('/sd1/vae/') && r.url.endsWith('.safetensors'));
      check('first UNet step before the VAE is fetched', !!step1 && !!vae && step1.worker_t <= vae.t, `step 1 done at ${step1?.worker_t} (worker clock), first VAE weight request logged at ${vae?.t}; the VAE downloads during the remaining steps`);
      const lastStep = events.filter((e) => e.type === 'step').pop();
      const vaeReqs = serve.log.filter((r) => r.url.includes('/sd1/vae/') && r.status === 206);
      check('VAE downloaded while denoising', vaeReqs.length > 0 && vaeReqs.every((r) => r.t <= lastStep.worker_t),
        `${vaeReqs.length} VAE range requests, the last at ${vaeReqs.at(-1)?.t}; last step done at ${lastStep?.worker_t}`);
      const previews = events.filter((e) => e.type === 'preview').length;
      check('live previews while denoising', previews >= 2, `${previews} preview frames before the image`);
      const torn = serve.log.find((r) => r.range?.includes('fault=dropped'));
      const tornStart = torn && Number(/bytes=(\d+)-/.exec(torn.range)[1]);
      const resumed = torn && serve.log.find((r) => r.t >= torn.t && r !== torn && r.url === torn.url && Number(/bytes=(\d+)-/.exec(r.range ?? '')?.[1]) > tornStart);
      check('torn download resumed where it broke off', !!torn && !!resumed, `${torn?.range} -> then ${resumed?.range}`);
      if (opts.artifacts) {
        fs.mkdirSync(opts.artifacts, { recursive: true });
        const shot = path.join(opts.artifacts, `page-${name}.png`);
        await page.screenshot({ path: shot, fullPage: true });
        console.log(`${tag} screenshot: ${shot}`);
      }
    });

    await attempt('again', async () => {
      const n = serve.log.length;
      await page.evaluate(`(() => { const f = document.getElementById('settings'); f.elements.seed.value = '8'; f.requestSubmit(); })()`);
      const png = await nextResult(page, 1);
      const d = maxDiff(png, fx.refs[8]);
      const fetched = serve.log.slice(n).filter((r) => r.url.startsWith('/models/'));
      check('second generation fetches nothing', fetched.length === 0, `${fetched.length} model requests; max diff vs CLI ${d}/255`);
      check('second generation matches CLI', d <= TOL, `max diff ${d}/255`);
    });

    await attempt('cancel', async () => {
      const before = await page.evaluate('window.__ldmApp.events.length');
      await page.evaluate(`(() => { const f = document.getElementById('settings'); f.elements.steps.value = '500'; f.requestSubmit(); })()`);
      await waitFor(page, `window.__ldmApp.events.slice(${before}).some((e) => e.type === 'step')`, 'a first step');
      await page.evaluate(`document.getElementById('cancel').click()`);
      const t = Date.now();
      const err = await waitFor(page, `window.__ldmApp.events.slice(${before}).find((e) => e.type === 'error')`, 'the cancellation', 120_000);
      const steps = await page.evaluate(`window.__ldmApp.events.slice(${before}).filter((e) => e.type === 'step').length`);
      const status = await page.evaluate(`document.getElementById('status').textContent + ' / generate enabled: ' + !document.getElementById('generate').disabled`);
      check('cancel', err.kind === 'cancelled' && steps < 500 && status.includes('enabled: true'), `stopped after ${steps} of 500 steps, ${Date.now() - t} ms after the click; ${status}`);
      await page.evaluate(`document.getElementById('settings').elements.steps.value = '3'`);
    });

    await attempt('out of memory', async () => {
      const before = await page.evaluate('window.__ldmApp.results.length');
      const evBefore = await page.evaluate('window.__ldmApp.events.length');
      await page.evaluate(`(() => { window.__ldmApp.engine.simulateOutOfMemory(); const f = document.getElementById('settings'); f.elements.seed.value = '7'; f.requestSubmit(); })()`);
      const err = await waitFor(page, `window.__ldmApp.events.slice(${evBefore}).find((e) => e.type === 'error' || e.type === 'done')`, 'the out-of-memory report', 300_000);
      const status = await page.evaluate(`document.getElementById('status').textContent`);
      await page.evaluate(`document.getElementById('settings').requestSubmit()`);
      const png = await nextResult(page, before);
      const d = maxDiff(png, fx.refs[7]);
      check('out of memory reported and recovered', err.kind === 'out-of-memory' && /ran out of memory/.test(status) && d <= TOL, `status ${JSON.stringify(status)}; the next generation: max diff ${d}/255`);
    });

    await attempt('recover', async () => {
      const before = await page.evaluate('window.__ldmApp.results.length');
      const evBefore = await page.evaluate('window.__ldmApp.events.length');
      await page.evaluate(`(() => { window.__ldmApp.engine.simulateDeviceLoss(); const f = document.getElementById('settings'); f.elements.seed.value = '7'; f.requestSubmit(); })()`);
      const png = await nextResult(page, before);
      const msgs = await page.evaluate(`window.__ldmApp.events.slice(${evBefore}).filter((e) => e.type === 'status').map((e) => e.message)`);
      const d = maxDiff(png, fx.refs[7]);
      check('device loss reported and recovered', msgs.some((m) => /device was lost/.test(m)) && d <= TOL, `messages ${JSON.stringify(msgs)}; max diff ${d}/255`);
    });

    await attempt('manifest', async () => {
      const evBefore = await page.evaluate('window.__ldmApp.events.length');
      await page.evaluate(`(() => { const f = document.getElementById('settings'); f.elements.model.value = '/models/sd1-tampered/'; f.requestSubmit(); })()`);
      const err = await waitFor(page, `window.__ldmApp.events.slice(${evBefore}).find((e) => e.type === 'error' || e.type === 'done')`, 'the checksum failure', 300_000);
      check('tampered chunk refused', err.type === 'error' && /sha256/.test(err.message) && err.message.includes('unet/diffusion_pytorch_model.safetensors') && /reading tensor \S+/.test(err.message), String(err.message ?? err.type).slice(0, 300));
      await page.evaluate(`document.getElementById('settings').elements.model.value = '/models/sd1/'`);
    });

    await attempt('gallery', async () => {
      const made = await page.evaluate('window.__ldmApp.results.length');
      await page.goto(app);
      const n = await waitFor(page, `window.__ldmApp && window.__ldmApp.gallery && window.__ldmApp.gallery.length`, 'the gallery', 60_000);
      check('gallery survives a reload', made >= 1 && n === made, `${n} images after the reload, ${made} made before it`);
    });

    // The link the page made for its first image (settings in the fragment) in a new tab: the
    // same pixels, and the server saw neither the model URL nor the prompt.
    await attempt('share', async () => {
      const link = firstLink ?? link7;
      const tab = await browser.newPage();
      watch(tab, `${tag}(share)`);
      const seen = serve.log.length;
      await tab.goto(link);
      const png = await nextResult(tab, 0);
      const same = first && maxDiff(png, PNG.sync.read(first)) === 0;
      const leaked = serve.log.slice(seen).filter((r) => /prompt=|model=/.test(r.url)).map((r) => r.url);
      check('share link reproduces the image', same && new URL(link).search === '' && /prompt=/.test(new URL(link).hash) && leaked.length === 0,
        `${link.slice(link.indexOf('#'), link.indexOf('#') + 60)}…: identical pixels to the first generation: ${same}; requests carrying settings: ${leaked.length}`);
      await tab.close();
    });

    // The same share link on the CPU backend (?device=cpu for this visit): the CLI's pixels.
    await attempt('cpu', async () => {
      await page.goto(`${link7}&device=cpu`);
      const png = await nextResult(page, 0);
      const info = await page.evaluate('window.__ldmApp.results[0].info');
      const d = maxDiff(png, fx.refs[7]);
      check('the CPU backend matches the CLI', info.device === 'cpu' && d <= TOL, `${info.device_name}, ${info.precision}: max |browser - ldm generate| = ${d}/255 in ${(info.total_ms / 1000).toFixed(2)} s (UNet ${(info.unet_steps_ms.reduce((a, b) => a + b, 0) / info.unet_steps_ms.length).toFixed(0)} ms/step)`);
    });

    // Every scenario here runs under the app's Content-Security-Policy (www/_headers): the header
    // and index.html's meta carry it, code from strings is refused, and nothing else was blocked
    // (app.js notes each violation) while the page above generated on the CPU backend.
    await attempt('csp', async () => {
      const policy = readHeadersFile(opts.www)['Content-Security-Policy'];
      const r = await page.evaluate(`(async () => {
        const header = (await fetch(location.pathname, { cache: 'no-store' })).headers.get('content-security-policy');
        const meta = document.querySelector('meta[http-equiv="Content-Security-Policy"]')?.content ?? null;
        const tryCode = (f) => { try { f(); return 'ran'; } catch (e) { return e.name; } };
        const evaluated = tryCode(() => eval('1 + 1'));
        const constructed = tryCode(() => new Function('return 1')());
        await new Promise((r) => setTimeout(r, 300));
        const violations = window.__ldmApp.events.filter((e) => e.type === 'csp-violation').map((e) => e.directive + ' ' + e.blocked);
        return { header, meta, evaluated, constructed, violations, generated: window.__ldmApp.results.length };
      })()`);
      const others = r.violations.filter((v) => !/^script-src(-elem)? eval$/.test(v));
      check('the app runs under its Content-Security-Policy', !!policy && r.header === policy && r.meta === policy && r.evaluated === 'EvalError' && r.constructed === 'EvalError' && others.length === 0 && r.generated > 0,
        `header ${r.header === policy ? 'as _headers' : JSON.stringify(r.header)}, meta ${r.meta === policy ? 'the same' : JSON.stringify(r.meta)}; eval: ${r.evaluated}, new Function: ${r.constructed}; ${r.generated} image(s) generated on the page with ${others.length} other violation(s) ${JSON.stringify(others)}`);
    });

    await attempt('offline', async () => {
      await waitFor(page, `navigator.serviceWorker.ready.then(() => !!navigator.serviceWorker.controller || 'registered')`, 'the service worker', 60_000);
      await serve.stop();
      let loaded = false;
      try {
        await page.goto(link7);
        loaded = true;
        const png = await nextResult(page, 0);
        const d = maxDiff(png, fx.refs[7]);
        check('offline reload generates', d <= TOL, `page loaded from the service worker with the server stopped; max diff vs CLI ${d}/255`);
      } finally {
        if (!loaded) console.log(`${tag} the page did not load offline`);
        serve = await startServe(fx.models, serve.port);
      }
    });

    await attempt('widget', async () => {
      const embed = await startEmbedder(app);
      try {
        const tab = await browser.newPage();
        watch(tab, `${tag}(widget)`);
        await tab.goto(embed.url);
        const out = await waitFor(tab, `window.__embed && (window.__embed.done || window.__embed.error) && window.__embed`, 'the widget');
        if (out.error) throw new Error(`ldm-error: ${out.error}`);
        const d = maxDiff(Buffer.from(out.done, 'base64'), fx.refs[7]);
        const last = out.progress[out.progress.length - 1];
        check('widget on another origin matches CLI', d <= TOL && out.progress.length >= 3 && last?.step === last?.steps, `max diff ${d}/255; ldm-progress events ${JSON.stringify(out.progress)}`);
        await tab.evaluate(`document.querySelector('ldm-image').setAttribute('seed', '8')`);
        const again = await waitFor(tab, `window.__embed.all.length >= 2 ? window.__embed.all[1] : (window.__embed.error ? 'error: ' + window.__embed.error : null)`, 'the widget after an attribute change');
        if (again.startsWith('error')) throw new Error(again);
        const d8 = maxDiff(Buffer.from(again, 'base64'), fx.refs[8]);
        check('widget regenerates when an attribute changes', d8 <= TOL, `seed="8" set: max diff ${d8}/255 vs the CLI's seed 8`);
        // The lora attribute, with the settings of diffusers' case 15 (a PEFT LoRA at 0.8, Euler a).
        const c15 = familyCase(15);
        const attrs = { prompt: c15.query.prompt, seed: c15.query.seed, steps: c15.query.steps, guidance: c15.query.guidance, scheduler: c15.query.scheduler, lora: `${app}models/lora/sd1-peft.safetensors:0.8` };
        await tab.evaluate(`(() => { const el = document.querySelector('ldm-image'); for (const [k, v] of Object.entries(${JSON.stringify(attrs)})) el.setAttribute(k, v); })()`);
        const withLora = await waitFor(tab, `window.__embed.all.length >= 3 ? window.__embed.all[2] : (window.__embed.error ? 'error: ' + window.__embed.error : null)`, 'the widget with a LoRA');
        if (withLora.startsWith('error')) throw new Error(withLora);
        const dl = pixelDiff(Buffer.from(withLora, 'base64'), diffusersImage(15));
        check('widget lora attribute matches diffusers', dl.max <= TOL, `lora="…/sd1-peft.safetensors:0.8", Euler a: max |widget - diffusers| = ${dl.max.toFixed(2)}/255 (mean ${dl.mean.toFixed(3)})`);
        // control-image with control-preprocess="depth": the widget makes the photo's depth map and
        // a ControlNet draws from it, as ldm depth + ldm generate --control do.
        const photoAttrs = { prompt: PROMPT, seed: '3', steps: '3', guidance: '7.5', width: '96', height: '64', controlnet: `${app}models/controlnet-a/`,
          'control-image': `${app}models/photo/init.png`, 'control-preprocess': 'depth', 'depth-estimator': `${app}models/depth-anything/` };
        await tab.evaluate(`(() => { const el = document.querySelector('ldm-image'); el.removeAttribute('lora'); el.removeAttribute('scheduler'); for (const [k, v] of Object.entries(${JSON.stringify(photoAttrs)})) el.setAttribute(k, v); })()`);
        const withControl = await waitFor(tab, `window.__embed.all.length >= 4 ? window.__embed.all[3] : (window.__embed.error ? 'error: ' + window.__embed.error : null)`, 'the widget with a control image');
        if (withControl.startsWith('error')) throw new Error(withControl);
        const dc = pixelDiff(Buffer.from(withControl, 'base64'), fx.photo.control);
        const [cMax, cMean] = name === 'firefox' ? [FAMILY_F16_TOL.max, FAMILY_F16_TOL.mean] : [TOL, TOL];
        check('widget control-image with control-preprocess="depth" matches the CLI', dc.max <= cMax && dc.mean <= cMean,
          `depth of …/photo/init.png into controlnet-a: max |widget - ldm generate --control| = ${dc.max}/255 (mean ${dc.mean.toFixed(3)}, tolerance ${cMax}/${cMean})`);
        // init-image into a concatenation-conditioned LDM: the photo is its condition.
        await tab.evaluate(`(() => {
          const el = document.querySelector('ldm-image');
          for (const k of ['prompt', 'guidance', 'controlnet', 'control-image', 'control-preprocess', 'depth-estimator']) el.removeAttribute(k);
          for (const [k, v] of Object.entries(${JSON.stringify({ ...CONCAT.query, model: `${app}models/concat-rescale/`, 'init-image': `${app}models/photo/init.png` })})) el.setAttribute(k, v);
        })()`);
        const withConcat = await waitFor(tab, `window.__embed.all.length >= 5 ? window.__embed.all[4] : (window.__embed.error ? 'error: ' + window.__embed.error : null)`, 'the widget with a concat model');
        if (withConcat.startsWith('error')) throw new Error(withConcat);
        const dk = pixelDiff(Buffer.from(withConcat, 'base64'), fx.concat);
        check('widget init-image into a concatenation-conditioned LDM matches the CLI', dk.max <= cMax && dk.mean <= cMean,
          `concat-rescale with init-image=…/photo/init.png: max |widget - ldm generate --init-image| = ${dk.max}/255 (mean ${dk.mean.toFixed(3)}, tolerance ${cMax}/${cMean})`);
        if (opts.artifacts) await tab.screenshot({ path: path.join(opts.artifacts, `widget-${name}.png`) });
        await tab.close();
      } finally {
        embed.close();
      }
    });

    await attempt('models panel', async () => {
      const before = await page.evaluate('window.__ldmApp.engine.models()');
      const sd1 = before.find((m) => m.url.endsWith('/models/sd1/'));
      await page.evaluate(`window.__ldmApp.engine.deleteModel(${JSON.stringify(sd1?.url ?? '')})`);
      const after = await page.evaluate('window.__ldmApp.engine.models()');
      check('models panel lists and deletes', !!sd1 && sd1.bytes > 2_500_000 && !after.some((m) => m.url === sd1.url),
        `before: ${JSON.stringify(before.map((m) => [m.url, m.bytes]))}; after delete: ${JSON.stringify(after.map((m) => m.url))}`);
    });

    if (name === 'chromium') {
      await attempt('bench', async () => {
        const tab = await browser.newPage();
        await tab.goto(`${app}bench.html?mode=generate&model=/models/sd1/&steps=2&width=64&height=64`);
        const r = await waitFor(tab, `window.__ldmBenchError ? { error: window.__ldmBenchError } : window.__ldmBenchResults`, 'the benchmark');
        if (r.error) throw new Error(r.error);
        check('bench.html UNet step benchmark', r.unet_step_ms?.each?.length >= 2 && r.peak_gpu_bytes > 0 && r.width === 64, `unet_step_ms ${JSON.stringify(r.unet_step_ms)}, vae ${r.vae_decode_ms?.toFixed(0)} ms, peak ${r.peak_gpu_bytes} B`);
        await tab.goto(`${app}bench.html?mode=unet&model=/models/sd1/&latent=8&runs=2&decode=0&unet=q8`);
        const u = await waitFor(tab, `window.__ldmBenchError ? { error: window.__ldmBenchError } : window.__ldmBenchResults`, 'the UNet benchmark');
        if (u.error) throw new Error(u.error);
        check('bench.html?mode=unet (ldm bench unet JSON)', u.unet_steps_ms?.length === 2 && u.buffers_created_per_step === 0 && u.readbacks_per_step === 1 && u.unet_weights === 'q8_0' && u.unet_weight_bytes > 0,
          `${u.unet_step_ms?.toFixed(0)} ms/step, ${u.buffers_created_per_step} buffers and ${u.submissions_per_step} submissions per step, ${u.unet_weight_bytes} q8 UNet bytes, peak ${u.peak_gpu_bytes} B`);
        check('the denoising loop reads nothing back', u.loop_steps_ms?.length === 2 && u.loop_readbacks_per_step === 0,
          `${u.loop_step_ms?.toFixed(0)} ms per loop step (guidance and scheduler as kernels), ${u.loop_submissions_per_step} submissions and ${u.loop_readbacks_per_step} readbacks per step`);
        await tab.close();
      });
    }

    await attempt('quantised', async () => {
      await page.goto(link7.replace(encodeURIComponent('/models/sd1/'), encodeURIComponent('/models/sd1-q4/')));
      const png = await nextResult(page, 0);
      const d = maxDiff(png, fx.quantised);
      const unetFile = path.join(fx.models, 'sd1-q4', 'unet', 'diffusion_pytorch_model.safetensors');
      const fetched = serve.log.filter((r) => r.url === '/models/sd1-q4/unet/diffusion_pytorch_model.safetensors' && r.status === 206).reduce((n, r) => n + r.bytes, 0);
      check('converted q4 model matches CLI', d <= TOL && fetched > 0 && fetched <= fs.statSync(unetFile).size,
        `max |browser - ldm generate| = ${d}/255 on ldm convert's q4_1 UNet + q8 text encoder and VAE; ${fetched} UNet bytes fetched (file ${fs.statSync(unetFile).size})`);
      const listed = await page.evaluate(`(async () => { await new Promise((r) => setTimeout(r, 200)); return document.getElementById('model-list').textContent; })()`);
      const recipe = JSON.parse(fs.readFileSync(path.join(fx.models, 'sd1-q4', 'ldm-web.json'), 'utf8')).quantisation;
      check('the models panel shows the converted folder\'s recipe', listed.includes(`sd1-q4/ — `) && listed.includes(`weights unet=q4_1, `) && listed.includes(`(UNet ${recipe.bits_per_weight.unet} bits per weight)`), listed.slice(0, 400));
    });

    // A mask painted with the mouse and an uploaded condition image drive generations that
    // match ldm generate given the same files (the page's mask exported as it sent it).
    if (name === 'chromium') await attempt('conditions', async () => {
      const work = path.dirname(fx.models);
      const images = path.join(opts.fixtures, 'images');
      const settle = async (model) => {
        await page.goto(`${app}?model=${encodeURIComponent(model)}`);
        await waitFor(page, `window.__ldmApp.events.some((e) => e.type === 'ready')`, 'the engine');
        await page.evaluate(`document.getElementById('conditioning').open = true`);
        await page.fill('[name=prompt]', PROMPT);
        await page.fill('[name=seed]', '3');
        await page.fill('[name=steps]', '3');
        return page.evaluate('window.__ldmApp.results.length');
      };
      const common = ['--prompt', PROMPT, '--seed', '3', '--steps', '3', '--guidance', '7.5'];

      let before = await settle('/models/sd1-inpaint/');
      await page.setInputFiles('#init-file', path.join(images, 'init.png'));
      await waitFor(page, `document.getElementById('mask-canvas').width === 96`, 'the init image on the mask canvas');
      // The canvas is below the form: mouse events need it inside the viewport.
      await page.locator('#mask-canvas').scrollIntoViewIfNeeded();
      const box = await page.locator('#mask-canvas').boundingBox();
      await page.mouse.move(box.x + box.width * 0.25, box.y + box.height * 0.35);
      await page.mouse.down();
      await page.mouse.move(box.x + box.width * 0.7, box.y + box.height * 0.65, { steps: 10 });
      await page.mouse.up();
      await waitFor(page, 'window.__ldmApp.maskPainted', 'the painted mask', 10_000);
      await page.click('#generate');
      let png = await nextResult(page, before);
      const maskB64 = await page.evaluate(`(async () => { const b = await window.__ldmMaskPng(); let s = ''; for (const x of b) s += String.fromCharCode(x); return btoa(s); })()`);
      const maskFile = path.join(work, 'page-mask.png');
      fs.writeFileSync(maskFile, Buffer.from(maskB64, 'base64'));
      const mask = PNG.sync.read(fs.readFileSync(maskFile));
      let painted = 0;
      for (let i = 0; i < mask.data.length; i += 4) painted += mask.data[i] >= 128 ? 1 : 0;
      const cliOut = (args, out) => {
        execFileSync(opts.ldm, ['generate', ...args, ...common, '--out', path.join(work, out)], { stdio: ['ignore', 'ignore', 'inherit'] });
        return PNG.sync.read(fs.readFileSync(path.join(work, out)));
      };
      let ref = cliOut(['--model', path.join(fx.models, 'sd1-inpaint'), '--init-image', path.join(images, 'init.png'), '--mask', maskFile], 'cli-inpaint.png');
      let d = maxDiff(png, ref);
      check('painted mask inpaints as the CLI', d <= TOL && painted > 0 && painted < mask.width * mask.height,
        `${mask.width}x${mask.height} mask, ${painted} pixels painted with the mouse; 9-channel inpainting UNet: max |browser - ldm generate| = ${d}/255`);

      before = await settle('/models/sd1/');
      await page.fill('#controlnet-url', '/models/controlnet-a/');
      await page.setInputFiles('#cond-file', path.join(images, 'control.png'));
      await page.click('#generate');
      png = await nextResult(page, before);
      ref = cliOut(['--model', path.join(fx.models, 'sd1'), '--control', `${path.join(fx.models, 'controlnet-a')}=${path.join(images, 'control.png')}`], 'cli-controlnet.png');
      d = maxDiff(png, ref);
      const fetched = serve.log.filter((r) => r.url.startsWith('/models/controlnet-a/') && r.status === 206).length;
      check('uploaded condition image drives the ControlNet as in the CLI', d <= TOL && fetched > 0, `control.png through /models/controlnet-a/ (${fetched} range requests): max |browser - ldm generate --control| = ${d}/255`);
    });

    // A photo becomes a condition in the page: canny edges, then a depth map that drives a ControlNet;
    // the depth map edited with the mouse drives it as the edited PNG does in the CLI.
    await attempt('photo', async () => {
      const work = path.dirname(fx.models);
      const before0 = await (async () => {
        await page.goto(`${app}?model=${encodeURIComponent('/models/sd1/')}`);
        await waitFor(page, `window.__ldmApp.events.some((e) => e.type === 'ready')`, 'the engine');
        await page.evaluate(`document.getElementById('conditioning').open = true`);
        return page.evaluate('window.__ldmApp.results.length');
      })();
      await upload(page, '#init-file', path.join(opts.fixtures, 'images', 'init.png'));
      await waitFor(page, `document.getElementById('mask-canvas').width === 96`, 'the uploaded photo', 30_000);
      const made = async (kind) => {
        await page.evaluate(`(() => { window.__ldmMadeCondition = null; document.getElementById('cond-from').value = '${kind}'; document.getElementById('cond-make').click(); })()`);
        const status = await waitFor(page, `window.__ldmMadeCondition ? 'made' : (document.getElementById('status').classList.contains('error') && document.getElementById('status').textContent)`, `the ${kind} condition`, 300_000);
        if (status !== 'made') throw new Error(`making the ${kind} condition: ${status}`);
        const b64 = await page.evaluate(`(() => { let s = ''; for (const x of window.__ldmMadeCondition) s += String.fromCharCode(x); return btoa(s); })()`);
        return PNG.sync.read(Buffer.from(b64, 'base64'));
      };
      // Gray conditions come back as RGB: compare the red channel with the reference's gray.
      const levels = (img, ref) => {
        let off = 0, worst = 0;
        for (let i = 0; i < img.width * img.height; i++) {
          const d = Math.abs(img.data[4 * i] - ref.data[4 * i]);
          worst = Math.max(worst, d);
          off += d > 0 ? 1 : 0;
        }
        return { off, worst, size: `${img.width}x${img.height}`, same: img.width === ref.width && img.height === ref.height };
      };
      const edges = levels(await made('canny'), fx.photo.edges);
      check('a photo becomes canny edges as OpenCV finds them', edges.same && edges.off === 0, `${edges.size}: ${edges.off} pixels differ from cv2.Canny(init.png, 100, 200)`);
      await page.evaluate(`document.getElementById('depth-estimator-url').value = '/models/depth-anything/'`);
      const depth = levels(await made('depth'), fx.photo.depth8);
      const fetched = serve.log.filter((r) => r.url.startsWith('/models/depth-anything/') && r.status === 206).length;
      const shown = await page.evaluate(`(() => { const f = document.getElementById('cond-figure'), c = document.getElementById('cond-canvas'); return !f.hidden && c.width + 'x' + c.height; })()`);
      check('a photo becomes a depth map as ldm depth makes it, shown beside the photo', depth.same && depth.worst <= 1 && fetched > 0 && shown === '96x64',
        `${depth.size}: ${depth.off} pixels off by at most ${depth.worst} from ldm depth --bits 8; the estimator came in ${fetched} range requests; editor ${shown}`);
      // The depth map drives the ControlNet (the photo itself is not used as an init image).
      const generateWithControl = async (before) => {
        await page.evaluate(`(() => {
          document.getElementById('init-file').value = '';
          document.getElementById('controlnet-url').value = '/models/controlnet-a/';
          const f = document.getElementById('settings').elements;
          f.prompt.value = ${JSON.stringify(PROMPT)};
          f.seed.value = '3';
          f.steps.value = '3';
          document.getElementById('generate').click();
        })()`);
        const png = await nextResult(page, before);
        const p = await page.evaluate('window.__ldmApp.results.at(-1).info.precision');
        return { png, p, tol: p === 'f16' ? [FAMILY_F16_TOL.max, FAMILY_F16_TOL.mean] : [TOL, TOL] };
      };
      let out = await generateWithControl(before0);
      let d = pixelDiff(out.png, fx.photo.control);
      check('the depth map from the photo drives a ControlNet as in the CLI', d.max <= out.tol[0] && d.mean <= out.tol[1],
        `max |browser - ldm generate --control controlnet-a=depth.png| = ${d.max}/255 (mean ${d.mean.toFixed(3)}; ${out.p}, tolerance ${out.tol.join('/')})`);

      // Edit the depth map: pick the colour of its nearest point, paint a stroke with it, then a
      // black one with a wider brush; the engine gets what the editor exports.
      await page.evaluate(`(() => { document.querySelector('input[name=cond-mode][value=pick]').checked = true; })()`);
      const nearest = (() => { let best = 0; for (let i = 0; i < 96 * 64; i++) if (fx.photo.depth8.data[4 * i] > fx.photo.depth8.data[4 * best]) best = i; return best; })();
      const at = await page.evaluate(`(() => {
        const c = document.getElementById('cond-canvas'); c.scrollIntoView({ block: 'center' });
        const r = c.getBoundingClientRect();
        return [r.x + (${nearest % 96} + 0.5) * r.width / 96, r.y + (${Math.floor(nearest / 96)} + 0.5) * r.height / 64];
      })()`);
      await page.mouse.click(at[0], at[1]);
      const picked = await page.evaluate(`document.getElementById('cond-color').value`);
      const want = fx.photo.depth8.data[4 * nearest].toString(16).padStart(2, '0');
      await page.evaluate(`(() => { document.querySelector('input[name=cond-mode][value=paint]').checked = true; document.getElementById('cond-brush').value = '4'; })()`);
      await drag(page, '#cond-canvas', [0.1, 0.8], [0.9, 0.8]);
      await page.evaluate(`(() => { document.getElementById('cond-color').value = '#000000'; document.getElementById('cond-brush').value = '9'; })()`);
      await drag(page, '#cond-canvas', [0.3, 0.15], [0.7, 0.5]);
      await waitFor(page, 'window.__ldmApp.conditionEdited', 'the edited condition', 10_000);
      if (opts.artifacts) {
        fs.mkdirSync(opts.artifacts, { recursive: true });
        await page.screenshot({ path: path.join(opts.artifacts, `photo-${name}.png`), fullPage: true });
      }
      const edited = Buffer.from(await page.evaluate(`(async () => { const b = await window.__ldmConditionPng(); let s = ''; for (const x of b) s += String.fromCharCode(x); return btoa(s); })()`), 'base64');
      const editedFile = path.join(work, `page-edited-depth-${name}.png`);
      fs.writeFileSync(editedFile, edited);
      const e = PNG.sync.read(edited);
      let changed = 0, other = 0;
      for (let i = 0; i < e.width * e.height; i++) {
        const v = e.data[4 * i];
        if (v !== fx.photo.depth8.data[4 * i]) {
          changed++;
          if (v !== 0 && v !== Number.parseInt(want, 16)) other++;
        }
      }
      check('the condition is edited by painting on it', picked === `#${want}${want}${want}` && changed > 50 && other === 0 && e.width === 96 && e.height === 64,
        `picked ${picked} at the nearest point (map value #${want}); ${changed} pixels painted, ${other} of them with neither the picked colour nor black`);
      const before1 = await page.evaluate('window.__ldmApp.results.length');
      out = await generateWithControl(before1);
      const editedRef = PNG.sync.read((() => {
        const f = path.join(work, `cli-edited-control-${name}.png`);
        execFileSync(opts.ldm, ['generate', '--model', path.join(fx.models, 'sd1'), '--control', `${path.join(fx.models, 'controlnet-a')}=${editedFile}`, '--prompt', PROMPT, '--seed', '3', '--steps', '3', '--guidance', '7.5', '--out', f], { stdio: ['ignore', 'ignore', 'inherit'] });
        return fs.readFileSync(f);
      })());
      d = pixelDiff(out.png, editedRef);
      // The tiny random ControlNet hardly reacts to its condition, so the bytes the engine was given
      // are compared too.
      const sent = await page.evaluate(`window.__ldmApp.events.filter((e) => e.type === 'inputs').at(-1).digests.controls?.[0]`);
      const editedSha = crypto.createHash('sha256').update(edited).digest('hex');
      check('the edited depth map drives the ControlNet as the edited PNG does in the CLI', d.max <= out.tol[0] && d.mean <= out.tol[1] && sent === editedSha,
        `the engine got the edited PNG (sha256 ${sent?.slice(0, 12)}…, the editor's export ${editedSha.slice(0, 12)}…); max |browser - ldm generate --control controlnet-a=edited.png| = ${d.max}/255 (mean ${d.mean.toFixed(3)}; ${out.p}, tolerance ${out.tol.join('/')})`);
      const listed = await page.evaluate(`(async () => { await new Promise((r) => setTimeout(r, 200)); return document.getElementById('model-list').textContent; })()`);
      check('the depth estimator is listed in the models panel', /depth estimator: .*depth-anything/.test(listed), listed.slice(0, 200));
    });

    // A concatenation-conditioned LDM with the photo as its condition, chosen as the init image.
    await attempt('concat', async () => {
      await page.goto(`${app}?${new URLSearchParams({ model: '/models/concat-rescale/', ...CONCAT.query })}`);
      await waitFor(page, `window.__ldmApp.events.some((e) => e.type === 'ready')`, 'the engine');
      await page.evaluate(`document.getElementById('conditioning').open = true`);
      await upload(page, '#init-file', path.join(opts.fixtures, 'images', 'init.png'));
      await waitFor(page, `document.getElementById('mask-canvas').width === 96`, 'the uploaded photo', 30_000);
      await page.evaluate(`document.getElementById('generate').click()`);
      const png = await nextResult(page, 0);
      const info = await page.evaluate('window.__ldmApp.results.at(-1).info');
      const { max, mean } = pixelDiff(png, fx.concat);
      const [tolMax, tolMean] = info.precision === 'f16' ? [FAMILY_F16_TOL.max, FAMILY_F16_TOL.mean] : [TOL, TOL];
      check('a concatenation-conditioned LDM draws from the photo as in the CLI', max <= tolMax && mean <= tolMean,
        `concat/rescale (ldm-web.json "concat": rescale), ${info.width}x${info.height}, ${info.steps} steps, ${info.precision}: max |browser - ldm generate --init-image init.png| = ${max}/255 (mean ${mean.toFixed(3)}, tolerance ${tolMax}/${tolMean})`);
    });

    // The Train tab: a run on the fixture pairs (CPU backend), its losses as ldm train's, a reload
    // that finds it saved (OPFS), a resumed run that continues as an uninterrupted one, and an
    // image generated with the result.
    await attempt('train', async () => {
      const trainDone = (n) => `(() => { const t = window.__ldmTrain; if (!t) return null; if (t.errors.length) return { error: t.errors.at(-1) }; return t.result && !t.busy && t.result.step >= ${n} ? t.result : null; })()`;
      const trainPage = async () => {
        await page.goto(`${app}?tab=train&device=cpu`);
        await waitFor(page, `window.__ldmApp.events.some((e) => e.type === 'ready')`, 'the engine');
      };
      await trainPage();
      await page.evaluate(`(() => {
        const fields = ${JSON.stringify({ ...TRAIN.fields, 'train-name': 'e2e' })};
        for (const [id, v] of Object.entries(fields)) document.getElementById(id).value = v;
        document.getElementById('train-folders').click();
      })()`);
      const dir = path.join(opts.fixtures, 'training', 'pairs');
      const files = (side) => fs.readdirSync(path.join(dir, side)).sort().map((f) => path.join(dir, side, f));
      // The pairs as chosen files in Chromium, as one ZIP (deflated) in Firefox: both inputs are used.
      const how = name === 'firefox' ? 'a ZIP of cond/ and target/' : 'chosen files';
      if (name === 'firefox') {
        await upload(page, '#train-zip', fx.train.zip);
      } else {
        await upload(page, '#train-cond', files('cond'));
        await upload(page, '#train-target', files('target'));
      }
      const t = Date.now();
      await page.evaluate(`document.getElementById('train-start').click()`);
      const out = await waitFor(page, trainDone(TRAIN.steps), 'the training run');
      if (out.error) throw new Error(out.error);
      const secs = (Date.now() - t) / 1000;
      const rel = (a, b) => Math.max(...a.map((v, i) => Math.abs(v - b[i]) / b[i]));
      const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;
      const l = out.losses;
      const d = rel(l, fx.train.losses.slice(0, l.length));
      const samples = await page.evaluate('window.__ldmTrain.samples');
      check('the Train tab trains as ldm train does', l.length === TRAIN.steps && d <= 1e-3 && mean(l.slice(-4)) < mean(l.slice(0, 4)) && samples >= 1,
        `pairs from ${how}; ${l.length} steps in ${secs.toFixed(1)} s; loss ${l[0].toFixed(4)} -> ${l.at(-1).toFixed(4)} (mean of the first 4 ${mean(l.slice(0, 4)).toFixed(4)}, last 4 ${mean(l.slice(-4)).toFixed(4)}); max relative difference to ldm train's losses ${d.toExponential(2)} (tolerance 1e-3); ${samples} sample(s) shown`);
      // A reload: the run is still there, and resumes where it stopped.
      await trainPage();
      const listed = await waitFor(page, `document.querySelector('#train-runs li[data-run="e2e"] span')?.textContent`, 'the saved run', 60_000);
      await page.evaluate(`document.getElementById('train-steps').value = '${TRAIN.resumeTo}'`);
      await page.evaluate(`document.querySelector('#train-runs li[data-run="e2e"] button.resume').click()`);
      const resumed = await waitFor(page, trainDone(TRAIN.resumeTo), 'the resumed run');
      if (resumed.error) throw new Error(resumed.error);
      const r = resumed.losses;
      const dr = rel(r, fx.train.losses);
      check('a saved run survives a reload and resumes exactly', /step 12 of 12/.test(listed) && r.length === TRAIN.resumeTo && dr <= 1e-3,
        `listed after the reload: ${JSON.stringify(listed.slice(0, 80))}; resumed to step ${resumed.step}: losses 13-${TRAIN.resumeTo} ${r.slice(TRAIN.steps).map((v) => v.toFixed(4)).join(', ')}; max relative difference to an uninterrupted ldm train ${dr.toExponential(2)}`);
      // Cancel: a long continuation stops at its next step and is saved where it stopped.
      await page.evaluate(`document.getElementById('train-steps').value = '1000'`);
      const evs = await page.evaluate('window.__ldmTrain.events.length');
      await page.evaluate(`document.querySelector('#train-runs li[data-run="e2e"] button.resume').click()`);
      await waitFor(page, `window.__ldmTrain.events.slice(${evs}).filter((e) => e.type === 'train-step').length >= 2`, 'steps of the continued run');
      await page.evaluate(`document.getElementById('train-cancel').click()`);
      const stopped = await waitFor(page, `(() => { const t = window.__ldmTrain; return !t.busy && t.result?.cancelled ? t.result : null; })()`, 'the cancellation', 120_000);
      const savedAs = await waitFor(page, `(() => { const s = document.querySelector('#train-runs li[data-run="e2e"] span')?.textContent ?? ''; return s.includes('step ' + window.__ldmTrain.result.step + ' of 1000') ? s : null; })()`, 'the run saved at the cancelled step', 60_000);
      check('Cancel stops training and saves the run where it stopped', stopped.step > TRAIN.resumeTo && stopped.step < 1000, `stopped at step ${stopped.step} of 1000; listed as ${JSON.stringify(savedAs)}`);
      // Generate with it: the Generate tab, model opfs:e2e/, the condition as the init image.
      const before = await page.evaluate('window.__ldmApp.results.length');
      await page.evaluate(`document.querySelector('#train-runs li[data-run="e2e"] button.use').click()`);
      await page.evaluate(`(() => { document.getElementById('conditioning').open = true; document.getElementById('settings').elements.steps.value = '10'; })()`);
      await upload(page, '#init-file', files('cond')[0]);
      await waitFor(page, `document.getElementById('mask-canvas').width === 32`, 'the condition image', 30_000);
      await page.evaluate(`document.getElementById('generate').click()`);
      const png = await nextResult(page, before);
      const img = PNG.sync.read(png);
      const info = await page.evaluate('window.__ldmApp.results.at(-1).info');
      check('the trained model generates in the Generate tab', img.width === 32 && img.height === 32 && info.steps === 10,
        `model ${info.model}: ${img.width}x${img.height}, ${info.steps} steps on ${info.device_name} in ${(info.total_ms / 1000).toFixed(2)} s`);
    });

    // The Train tab's LoRA mode: a LoRA of the built-in model on captioned images (CPU backend), its
    // losses as ldm train-lora's, then the Generate tab with the saved LoRA (an opfs: URL) against
    // the same generation without it.
    await attempt('train-lora', async () => {
      const done = (n) => `(() => { const t = window.__ldmTrain; if (!t) return null; if (t.errors.length) return { error: t.errors.at(-1) }; return t.result && !t.busy && t.result.step >= ${n} ? t.result : null; })()`;
      await page.goto(`${app}?tab=train&device=cpu`);
      await waitFor(page, `window.__ldmApp.events.some((e) => e.type === 'ready')`, 'the engine');
      await page.evaluate(`(() => {
        const kind = document.getElementById('train-kind');
        kind.value = 'lora';
        kind.dispatchEvent(new Event('change'));
        const fields = ${JSON.stringify({ ...LORA.fields, 'train-name': 'e2e-lora' })};
        for (const [id, v] of Object.entries(fields)) document.getElementById(id).value = v;
        document.getElementById('train-folders').click();
      })()`);
      await upload(page, '#train-lora-images', fx.lora.files);
      const t = Date.now();
      await page.evaluate(`document.getElementById('train-start').click()`);
      const out = await waitFor(page, done(4), 'the LoRA training run');
      if (out.error) throw new Error(out.error);
      const secs = (Date.now() - t) / 1000;
      const l = out.losses;
      const d = Math.max(...l.map((v, i) => Math.abs(v - fx.lora.losses[i]) / fx.lora.losses[i]));
      const samples = await page.evaluate('window.__ldmTrain.samples');
      check('the Train tab trains a LoRA as ldm train-lora does', l.length === 4 && d <= 1e-3 && samples >= 1,
        `4 captioned images from chosen files (.png + .txt); ${l.length} steps in ${secs.toFixed(1)} s; losses ${l.map((v) => v.toFixed(4)).join(', ')}; max relative difference to ldm train-lora's ${d.toExponential(2)} (tolerance 1e-3); ${samples} sample(s) shown`);
      const listed = await waitFor(page, `document.querySelector('#train-runs li[data-run="e2e-lora"][data-kind="lora"] span')?.textContent`, 'the saved LoRA run', 60_000);
      await page.evaluate(`document.getElementById('train-steps').value = '6'`);
      await page.evaluate(`document.querySelector('#train-runs li[data-run="e2e-lora"] button.resume').click()`);
      const resumed = await waitFor(page, done(6), 'the resumed LoRA run');
      if (resumed.error) throw new Error(resumed.error);
      const dr = Math.max(...resumed.losses.map((v, i) => Math.abs(v - fx.lora.losses[i]) / fx.lora.losses[i]));
      check('a LoRA run resumes as an uninterrupted one', resumed.losses.length === 6 && dr <= 1e-3, `resumed to step ${resumed.step}: losses 5-6 ${resumed.losses.slice(4).map((v) => v.toFixed(4)).join(', ')}; max relative difference to an uninterrupted ldm train-lora ${dr.toExponential(2)}`);
      // Generate with it, then without it: the same seed and prompt, different pixels.
      const gen = async () => {
        const before = await page.evaluate('window.__ldmApp.results.length');
        await page.evaluate(`(() => { const f = document.getElementById('settings').elements; f.prompt.value = 'a red apple'; f.steps.value = '4'; f.seed.value = '1'; f.width.value = '32'; f.height.value = '32'; })()`);
        await page.evaluate(`document.getElementById('generate').click()`);
        return PNG.sync.read(await nextResult(page, before));
      };
      await page.evaluate(`document.querySelector('#train-runs li[data-run="e2e-lora"] button.use').click()`);
      const rows = await page.evaluate(`[...document.querySelectorAll('#lora-list .lora-url')].map((i) => i.value)`);
      const withLora = await gen();
      await page.evaluate(`document.querySelectorAll('#lora-list .remove').forEach((b) => b.click())`);
      const without = await gen();
      let diff = 0;
      for (let i = 0; i < withLora.data.length; i++) diff = Math.max(diff, Math.abs(withLora.data[i] - without.data[i]));
      check('the trained LoRA generates in the Generate tab', rows.includes('opfs:e2e-lora/pytorch_lora_weights.safetensors') && withLora.width === 32 && diff > 0,
        `listed as ${JSON.stringify(listed.slice(0, 90))}; LoRA rows ${JSON.stringify(rows)}; largest pixel difference with and without it ${diff}`);
    });

    // Depth estimation time in the browser (ldm bench depth's JSON) on the fixture estimator.
    await attempt('bench depth', async () => {
      const tab = await browser.newPage();
      try {
        await tab.goto(`${app}bench.html?mode=depth&model=/models/depth-anything/&width=97&height=61`);
        const r = await waitFor(tab, `window.__ldmBenchError ? { error: window.__ldmBenchError } : window.__ldmBenchResults`, 'the depth benchmark');
        if (r.error) throw new Error(r.error);
        check('bench.html?mode=depth (ldm bench depth JSON)', r.image?.join('x') === '97x61' && r.estimate_ms > 0 && r.first_ms > 0 && r.peak_gpu_bytes > 0 && r.dtype === 'F32',
          `${r.model}: model input ${r.model_input?.join('x')}, load ${r.load_ms?.toFixed(0)} ms, first ${r.first_ms?.toFixed(0)} ms, then ${r.estimate_ms?.toFixed(0)} ms, peak ${r.peak_gpu_bytes} B`);
      } finally {
        await tab.close();
      }
    });

    // Model families through the page, each against diffusers' own image (ref/family_N): an SDXL
    // model with an SDXL LoRA from a share link; two LoRAs added with the LoRA rows and their
    // scale sliders, with a tiny autoencoder's real-colour previews; textual-inversion embeddings;
    // A1111 prompt weighting by its toggle; the tiny autoencoder as the final decoder.
    await attempt('families', async () => {
      const viaLink = async (index, extra) => {
        const c = familyCase(index);
        const q = new URLSearchParams({ model: `/models/${c.model}/`, ...c.query });
        for (const [k, v] of extra) q.append(k, v);
        await page.goto(`${app}?${q}`);
        return { c, png: await nextResult(page, 0) };
      };
      const precision = () => page.evaluate('window.__ldmApp.results.at(-1).info.precision');
      const report = async (what, png, index) => {
        const { max, mean } = pixelDiff(png, diffusersImage(index));
        const p = await precision();
        const [tolMax, tolMean] = p === 'f16' ? [FAMILY_F16_TOL.max, FAMILY_F16_TOL.mean] : [TOL, TOL];
        return { ok: max <= tolMax && mean <= tolMean, text: `${what}: max |browser - diffusers| = ${max.toFixed(2)}/255 (mean ${mean.toFixed(3)}; ${p}, tolerance ${tolMax}/${tolMean})` };
      };
      const downloads = () => page.evaluate(`window.__ldmApp.events.filter((e) => e.type === 'download').map((e) => [e.fetched, e.total])`);

      let { png } = await viaLink(17, [['lora', '/models/lora/sdxl-kohya.safetensors:0.9']]);
      let r = await report('SDXL base + kohya SDXL LoRA (lora_te1_/lora_te2_/lora_unet_) at 0.9, 4 Euler steps', png, 17);
      const params = parametersChunk(png) ?? '';
      check('SDXL with a LoRA from a share link matches diffusers', r.ok && params.includes('<lora:sdxl-kohya:0.9>'), `${r.text}; parameters ${JSON.stringify(params.slice(0, 160))}`);
      const dl = await downloads();
      const over = dl.filter(([f, t]) => f > t);
      const lora = serve.log.filter((x) => x.url === '/models/lora/sdxl-kohya.safetensors' && x.status === 206);
      check('download counter stays within its total', dl.length > 0 && over.length === 0 && lora.length > 0,
        `${dl.length} download events for the model and its LoRA (${lora.length} LoRA range requests), last ${JSON.stringify(dl.at(-1))}, ${over.length} over the total`);

      // Two LoRA rows with their sliders and the tiny autoencoder, as a user fills them in.
      const c16 = familyCase(16);
      await page.goto(`${app}?${new URLSearchParams({ model: '/models/sd1/', ...c16.query })}`);
      await nextResult(page, 0);
      const before = await page.evaluate('window.__ldmApp.results.length');
      await page.evaluate(`(() => {
        document.getElementById('extras').open = true;
        const rows = [['/models/lora/sd1-kohya.safetensors', '0.7'], ['/models/lora/sd1-peft.safetensors', '-0.4']];
        for (const [url, scale] of rows) {
          document.getElementById('add-lora').click();
          const row = document.querySelector('#lora-list .extra-row:last-child');
          row.querySelector('.lora-url').value = url;
          const slider = row.querySelector('.lora-scale');
          slider.value = scale;
          slider.dispatchEvent(new Event('input', { bubbles: true }));
        }
        document.getElementById('settings').elements.tiny_vae.value = '/models/taesd/';
        document.getElementById('generate').click();
      })()`);
      png = await nextResult(page, before);
      r = await report('SD1 + kohya LoRA at 0.7 + PEFT LoRA at -0.4, DPM++ 2M', png, 16);
      const shown = await page.evaluate(`[...document.querySelectorAll('#lora-list .lora-scale-text')].map((o) => o.textContent)`);
      const previews = await page.evaluate(`window.__ldmApp.events.slice(window.__ldmApp.events.findLastIndex((e) => e.type === 'start')).filter((e) => e.type === 'preview')`);
      const tiny = previews.filter((e) => e.decoder === 'tiny' && e.width === 64 && e.height === 64);
      check('two LoRA rows with scale sliders match diffusers', r.ok && shown.join() === '0.70,-0.40', `${r.text}; sliders show ${shown.join(', ')}`);
      check('tiny autoencoder previews every step', tiny.length === Number(c16.query.steps) && previews.length === tiny.length,
        `${tiny.length} of ${previews.length} previews decoded by TAESD at 64x64 (steps ${c16.query.steps})`);
      const link = await page.evaluate('location.href');
      check('LoRA rows go into the share link', /lora=[^&]*sd1-kohya\.safetensors%3A0\.7/.test(link) && /lora=[^&]*sd1-peft\.safetensors%3A-0\.4/.test(link) && /tiny_vae=/.test(link), link.slice(link.indexOf('#'), link.indexOf('#') + 300));

      ({ png } = await viaLink(20, [['embedding', '/models/embeddings/cat-toy.safetensors'], ['embedding', '/models/embeddings/a1111-style.safetensors']]));
      r = await report('SD1 + <cat-toy> (diffusers learned_embeds) and a1111-style (A1111 emb_params, token from the file name)', png, 20);
      check('textual-inversion embeddings match diffusers', r.ok, r.text);

      ({ png } = await viaLink(27, [['prompt_weighting', 'a1111']]));
      r = await report('"(red:1.3) apple, [blue] sky" with A1111 weighting (reference: A1111\'s maths on diffusers\' CLIP)', png, 27);
      const toggled = await page.evaluate(`document.getElementById('settings').elements.prompt_weighting.checked`);
      check('A1111 prompt weighting toggle matches its reference', r.ok && toggled, `${r.text}; toggle on: ${toggled}`);

      ({ png } = await viaLink(22, [['tiny_vae', '/models/taesd/'], ['vae_decoder', 'tiny']]));
      r = await report('SD1 decoded by TAESD (AutoencoderTiny as pipe.vae)', png, 22);
      check('tiny autoencoder as the final decoder matches diffusers', r.ok, r.text);

      // ldm convert's q4 SDXL: loads by ranges like any model and draws what ldm generate draws.
      await page.goto(`${app}?${new URLSearchParams({ model: '/models/sdxl-q4/', ...SDXL_Q4 })}`);
      png = await nextResult(page, 0);
      const dq = pixelDiff(png, fx.xlQ4);
      const p = await precision();
      const unetFile = path.join(fx.models, 'sdxl-q4', 'unet', 'diffusion_pytorch_model.safetensors');
      const fetched = serve.log.filter((x) => x.url === '/models/sdxl-q4/unet/diffusion_pytorch_model.safetensors' && x.status === 206).reduce((n, x) => n + x.bytes, 0);
      const [qMax, qMean] = p === 'f16' ? [FAMILY_F16_TOL.max, FAMILY_F16_TOL.mean] : [TOL, TOL];
      check('q4 SDXL (ldm convert) matches ldm generate', dq.max <= qMax && dq.mean <= qMean && fetched > 0 && fetched <= fs.statSync(unetFile).size,
        `max |browser - ldm generate| = ${dq.max}/255 (mean ${dq.mean.toFixed(3)}; ${p}) on a q4_1 UNet + q8 text encoders and VAE; ${fetched} UNet bytes fetched by range (file ${fs.statSync(unetFile).size})`);
    });

    await attempt('ldm', async () => {
      for (const [which, run, ref] of [['ldm-text2im', LDM_TEXT2IM, fx.ldm.text2im], ['ldm-uncond', LDM_UNCOND, fx.ldm.uncond]]) {
        const q = new URLSearchParams({ model: `/models/${which}/`, ...run.query }).toString();
        await page.goto(`${app}?${q}`);
        const png = await nextResult(page, 0);
        const d = maxDiff(png, ref);
        const info = await page.evaluate('window.__ldmApp.results[0].info');
        check(`${which} matches CLI`, d <= TOL, `${info.width}x${info.height}, ${info.steps} steps, ${info.precision}: max |browser - ldm generate| = ${d}/255`);
      }
    });
  } finally {
    await browser.close();
    await serve.stop();
  }

  await attempt('no-webgpu', async () => {
    const srv = await startServe(fx.models);
    const b = await launch(name, { webgpu: false });
    try {
      const p = await b.newPage();
      await p.goto(srv.url);
      const msg = await waitFor(p, `(() => { const e = document.getElementById('no-webgpu'); return e && !e.hidden && e.textContent; })()`, 'the no-WebGPU message', 60_000);
      const names = name === 'chromium' ? /enable-unsafe-webgpu/ : /dom\.webgpu\.enabled/;
      check('no-WebGPU message', names.test(msg), msg);
      // Without WebGPU the first visit still draws, on the CPU backend.
      const png = await nextResult(p, 0);
      const info = await p.evaluate('window.__ldmApp.results[0].info');
      const { max, mean } = pixelDiff(png, fx.builtin.png);
      check('without WebGPU the app draws on the CPU', info.device === 'cpu' && max <= TOL && mean <= TOL, `${info.device_name}: max |browser - ldm generate (no --model)| = ${max}/255 in ${(info.total_ms / 1000).toFixed(2)} s`);
    } finally {
      await b.close();
      await srv.stop();
    }
  });
}

async function main() {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'ldm-e2e-'));
  const results = [];
  try {
    console.log(`preparing fixtures and CLI reference images in ${work}`);
    const fx = prepare(work);
    for (const name of opts.browsers) {
      try {
        await runBrowser(name, fx, results);
      } catch (e) {
        results.push({ browser: name, test: 'run', ok: false, detail: e?.message ?? String(e) });
        console.log(`[${name}] FAIL run: ${e?.stack ?? e}`);
      }
      console.log(`[${name}] finished at t=${secs()} s`);
    }
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
  for (const name of opts.browsers) {
    const mine = results.filter((r) => r.browser === name);
    const passed = mine.filter((r) => r.ok).length;
    console.log(`${name} e2e: ${passed} passed, ${mine.length - passed + (mine.length === 0 ? 1 : 0)} failed`);
  }
  const failed = results.filter((r) => !r.ok).length;
  console.log(`app e2e: ${results.length - failed} passed, ${failed} failed (${secs()} s)`);
  process.exit(failed === 0 && results.length > 0 ? 0 : 1);
}

main().catch((e) => {
  console.error(e?.stack ?? String(e));
  process.exit(1);
});
