// Side-by-side benchmark of one UNet step: ONNX Runtime Web (WebGPU EP, plus its wasm EP for reference)
// against torch's output, and optionally against our engine's bench page, in headless Chromium.
//
//   OMP_NUM_THREADS=1 /work/venv/bin/python scripts/ort_compare.py --model tests/fixtures/sd1 --out target/ort/fixture
//   node tests/browser/ort-compare.mjs --dir target/ort/fixture [--runs 5] [--eps webgpu,wasm] [--threads N]
//        [--ours 'www/bench.html?mode=unet&model=...&inputs=...'] [--timeout 1200] [--json FILE] [--quiet]
//
// Serves the repo root (so DIR, which must lie inside the repo, www/ and tests/browser/node_modules are
// all reachable), opens tests/browser/ort-page.html, and prints one JSON object on stdout:
//   {"ort": {ms_per_step, ms_runs, max_abs_vs_torch, mean_abs_vs_torch, rel_max_vs_torch, ...},
//    "ort_wasm": {...}, "adapter": {...}, "shape": {...}, "ours": {...}, "ratio": ours/ort}
// Times are around `await session.run()` (output read back included): one warm-up run, then --runs.
// --ours is a page path relative to the repo root; that page must set window.__ldmBenchResults =
// {"ms_per_step": number, "output": [floats]} (an object or a JSON string), or window.__ldmBenchError.
// Page logs go to stderr. Exit status 1 when ORT's WebGPU EP or our page failed.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { startServer } from './server.mjs';
import { CHROMIUM_ARGS, EXECUTABLES } from './browsers.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');

function usage(code) {
  console.error('usage: node tests/browser/ort-compare.mjs --dir DIR [--runs 5] [--eps webgpu,wasm] [--threads N]\n' +
    '         [--ours PAGE_PATH_RELATIVE_TO_REPO] [--timeout 1200] [--json FILE] [--quiet]');
  process.exit(code);
}

function parseArgs(argv) {
  const o = { dir: null, runs: 5, eps: ['webgpu', 'wasm'], threads: null, ours: null, timeout: 1200, json: null, quiet: false };
  for (let i = 0; i < argv.length; i++) {
    const [k, inline] = argv[i].split(/=(.*)/s);
    const v = () => {
      const x = inline ?? argv[++i];
      if (x === undefined) { console.error(`${k} needs a value`); usage(2); }
      return x;
    };
    switch (k) {
      case '--dir': o.dir = v(); break;
      case '--runs': o.runs = Number(v()); break;
      case '--eps': o.eps = v().split(',').filter(Boolean); break;
      case '--threads': o.threads = Number(v()); break;
      case '--ours': o.ours = v(); break;
      case '--timeout': o.timeout = Number(v()); break;
      case '--json': o.json = v(); break;
      case '--quiet': o.quiet = true; break;
      case '-h': case '--help': usage(0); break;
      default: console.error(`unknown argument ${k}`); usage(2);
    }
  }
  if (!o.dir) usage(2);
  if (!(o.runs >= 1)) { console.error('--runs must be >= 1'); usage(2); }
  for (const ep of o.eps) if (ep !== 'webgpu' && ep !== 'wasm') { console.error(`unknown EP ${ep} (webgpu, wasm)`); usage(2); }
  return o;
}

const opts = parseArgs(process.argv.slice(2));
const t0 = performance.now();
const stamp = () => `[${((performance.now() - t0) / 1000).toFixed(1)}s]`;
const note = (msg) => { if (!opts.quiet) console.error(`${stamp()} ${msg}`); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function readF32(file) {
  const b = fs.readFileSync(file);
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}

// max/mean |a - b| and max |a - b| / max |ref|; NaNs in a count as infinitely wrong.
function compare(a, ref) {
  if (!a || a.length !== ref.length) return { error: `length ${a?.length} != ${ref.length}` };
  let max = 0;
  let sum = 0;
  let maxRef = 0;
  let nonFinite = 0;
  for (let i = 0; i < ref.length; i++) {
    const x = Number(a[i]);
    if (!Number.isFinite(x)) { nonFinite++; continue; }
    const d = Math.abs(x - ref[i]);
    if (d > max) max = d;
    sum += d;
    maxRef = Math.max(maxRef, Math.abs(ref[i]));
  }
  const r = { max_abs: max, mean_abs: sum / ref.length, rel_max: maxRef > 0 ? max / maxRef : null };
  if (nonFinite) { r.non_finite = nonFinite; r.max_abs = Infinity; r.rel_max = Infinity; }
  return r;
}

function urlPathInRepo(p) {
  const abs = fs.realpathSync(path.resolve(p));
  const rel = path.relative(fs.realpathSync(REPO), abs);
  if (rel.startsWith('..') || path.isAbsolute(rel)) throw new Error(`${p} is not inside the repo (${REPO}); the server's root is the repo`);
  return '/' + rel.split(path.sep).map(encodeURIComponent).join('/') + '/';
}

async function pollFor(page, expr, timeoutS, what) {
  const deadline = performance.now() + timeoutS * 1000;
  let crashed = null;
  page.on('crash', () => { crashed = `${what}: page crashed`; });
  for (;;) {
    if (crashed) throw new Error(crashed);
    const v = await page.evaluate(expr);
    if (v) return v;
    if (performance.now() > deadline) throw new Error(`${what}: no result after ${timeoutS} s`);
    await sleep(500);
  }
}

function watch(page, tag) {
  page.on('console', (m) => note(`${tag} ${m.type() === 'log' ? '' : m.type() + ': '}${m.text()}`));
  page.on('pageerror', (e) => note(`${tag} page error: ${e?.stack ?? e}`));
  page.on('requestfailed', (r) => note(`${tag} request failed: ${r.url()} ${r.failure()?.errorText ?? ''}`));
  page.on('response', (r) => { if (r.status() >= 400) note(`${tag} HTTP ${r.status()} ${r.url()}`); });
}

async function main() {
  const dirAbs = path.resolve(opts.dir);
  const meta = JSON.parse(fs.readFileSync(path.join(dirAbs, 'inputs.json'), 'utf8'));
  const torchOut = readF32(path.join(dirAbs, meta.files.out_torch));
  const nOut = meta.output.reduce((a, b) => a * b, 1);
  if (torchOut.length !== nOut) throw new Error(`out_torch has ${torchOut.length} floats, expected ${nOut}`);
  const dirUrl = urlPathInRepo(dirAbs);
  const nodeModules = path.join(HERE, 'node_modules', 'onnxruntime-web', 'dist');
  if (!fs.existsSync(nodeModules)) throw new Error(`${nodeModules} is missing: run npm ci (or npm install) in tests/browser`);
  const ortPkg = JSON.parse(fs.readFileSync(path.join(HERE, 'node_modules', 'onnxruntime-web', 'package.json'), 'utf8'));

  const server = await startServer({ root: REPO, port: 0 });
  const { chromium } = await import('playwright-core');
  const userDataDir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'ldm-ort-chromium-'));
  let context;
  const out = {
    model: meta.model,
    shape: { sample: meta.sample, encoder_hidden_states: meta.encoder_hidden_states, timestep: meta.timestep, timestep_mode: meta.timestep_mode, output: meta.output },
    onnx_nodes: meta.onnx_nodes ?? null,
    runs: opts.runs,
  };
  let failed = false;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: EXECUTABLES.chromium, headless: true, args: CHROMIUM_ARGS, timeout: 120_000,
    });
    out.browser = `chromium ${context.browser()?.version() ?? ''}`.trim();

    // ---- ONNX Runtime Web ------------------------------------------------------------------------
    const q = new URLSearchParams({ dir: dirUrl, runs: String(opts.runs), eps: opts.eps.join(',') });
    if (opts.threads) q.set('threads', String(opts.threads));
    const ortUrl = `${server.url}tests/browser/ort-page.html?${q}`;
    note(`ORT page: ${ortUrl}`);
    const page = context.pages()[0] ?? (await context.newPage());
    watch(page, '[ort]');
    await page.goto(ortUrl, { waitUntil: 'load', timeout: 120_000 });
    const res = await pollFor(page, '(() => window.__ortError ? {error: window.__ortError} : (window.__ortResults ?? null))()', opts.timeout, 'ORT page');
    if (res.error) throw new Error(`ORT page: ${res.error}`);
    out.ort_version = res.ort_version ?? ortPkg.version;
    out.adapter = res.adapter ?? null;
    out.cross_origin_isolated = res.cross_origin_isolated;
    const summarize = (e, extra = {}) => {
      if (!e) return null;
      if (e.error) return { ep: e.ep, error: e.error };
      const c = compare(e.output, torchOut);
      return {
        ep: e.ep,
        ms_per_step: e.ms_per_step,
        ms_min: e.ms_min,
        ms_runs: e.ms_runs,
        warmup_ms: e.warmup_ms,
        session_create_ms: e.session_create_ms,
        max_abs_vs_torch: c.max_abs,
        mean_abs_vs_torch: c.mean_abs,
        rel_max_vs_torch: c.rel_max,
        ...(c.non_finite ? { non_finite: c.non_finite } : {}),
        max_abs_warmup_vs_last: e.max_abs_warmup_vs_last,
        ...extra,
      };
    };
    const gpu = res.ep.webgpu;
    const wasm = res.ep.wasm;
    if (opts.eps.includes('webgpu')) {
      out.ort = summarize(gpu);
      if (out.ort?.error) failed = true;
    }
    if (opts.eps.includes('wasm')) out.ort_wasm = summarize(wasm, { threads: res.wasm_threads });
    let maxTorch = 0;
    for (const v of torchOut) maxTorch = Math.max(maxTorch, Math.abs(v));
    out.max_abs_torch = maxTorch;
    if (gpu?.output && wasm?.output) out.max_abs_ort_webgpu_vs_wasm = compare(gpu.output, Float32Array.from(wasm.output)).max_abs;
    await page.close().catch(() => {});

    // ---- our engine ------------------------------------------------------------------------------
    if (opts.ours) {
      const oursUrl = server.url + opts.ours.replace(/^\/+/, '');
      note(`our page: ${oursUrl}`);
      const p2 = await context.newPage();
      watch(p2, '[ours]');
      const tStart = performance.now();
      await p2.goto(oursUrl, { waitUntil: 'load', timeout: 120_000 });
      let r;
      try {
        r = await pollFor(p2, `(() => {
          if (window.__ldmBenchError) return {error: String(window.__ldmBenchError?.message ?? window.__ldmBenchError)};
          const r = window.__ldmBenchResults;
          if (r == null) return null;
          return typeof r === 'string' ? {json: r} : {json: JSON.stringify(r)};
        })()`, opts.timeout, 'our page');
      } catch (e) {
        r = { error: String(e?.message ?? e) };
      }
      if (r.error) {
        out.ours = { page: opts.ours, error: r.error };
        failed = true;
      } else {
        const o = JSON.parse(r.json);
        // bench.html?mode=unet reports ldm bench unet's JSON (unet_step_ms).
        o.ms_per_step ??= o.unet_step_ms;
        const vsTorch = compare(o.output, torchOut);
        const ortRef = gpu?.output ?? wasm?.output;
        const vsOrt = ortRef ? compare(o.output, Float32Array.from(ortRef)) : null;
        out.ours = {
          page: opts.ours,
          ms_per_step: o.ms_per_step,
          max_abs_vs_torch: vsTorch.max_abs ?? null,
          mean_abs_vs_torch: vsTorch.mean_abs ?? null,
          rel_max_vs_torch: vsTorch.rel_max ?? null,
          max_abs_vs_ort: vsOrt?.max_abs ?? null,
          ...(vsTorch.error ? { error: `output: ${vsTorch.error}` } : {}),
          page_total_s: (performance.now() - tStart) / 1000,
        };
        for (const [k, v] of Object.entries(o)) if (k !== 'output' && k !== 'ms_per_step' && !(k in out.ours)) out.ours[k] = v;
        if (vsTorch.error) failed = true;
        if (out.ort?.ms_per_step && typeof o.ms_per_step === 'number') out.ratio = o.ms_per_step / out.ort.ms_per_step;
        if (out.ort_wasm?.ms_per_step && typeof o.ms_per_step === 'number') out.ratio_vs_wasm = o.ms_per_step / out.ort_wasm.ms_per_step;
      }
      await p2.close().catch(() => {});
    }
  } finally {
    await context?.close().catch(() => {});
    await fs.promises.rm(userDataDir, { recursive: true, force: true }).catch(() => {});
    await server.close();
  }
  const text = JSON.stringify(out, null, 2);
  if (opts.json) fs.writeFileSync(opts.json, text + '\n');
  console.log(text);
  return failed ? 1 : 0;
}

main().then((code) => process.exit(code), (e) => {
  console.error(`ort-compare: ${e?.stack ?? e}`);
  process.exit(1);
});
