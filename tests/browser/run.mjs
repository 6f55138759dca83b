// Runs ldm-web's WebGPU kernel tests (or benchmarks) in headless browsers.
//
//   node tests/browser/run.mjs --www www [--browsers chromium,firefox] [--filter STR]
//                              [--mode test|bench] [--which small] [--query K=V&...] [--timeout-min 40]
//                              [--device gpu|cpu]   (gpu: WebGPU; cpu: the engine's CPU backend)
//                              [--threads 0|N]      (the single-threaded wasm build, or the threads
//                                                    build with N workers; default: from the cores)
//
// Serves --www on a free 127.0.0.1 port, opens tests.html?filter=... (or bench.html?which=...) in each
// browser in turn and waits for window.__ldmTestResults / __ldmTestError (__ldmBench* in bench mode).
// Exits non-zero when any test failed, a browser could not launch, the page reported an error
// (no WebGPU adapter, wasm failed to load, ...), a browser ran zero tests, or the timeout passed.
// A missing browser or adapter is a failure, never a skip.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { startServer } from './server.mjs';

import { CHROMIUM_ARGS, FIREFOX_PREFS, EXECUTABLES } from './browsers.mjs';

const BROWSERS = {
  chromium: { executable: EXECUTABLES.chromium, launch: launchChromium },
  firefox: { executable: EXECUTABLES.firefox, launch: launchFirefox },
};

function usage(code) {
  const text =
    'usage: node tests/browser/run.mjs --www DIR [--browsers chromium,firefox] [--filter STR]\n' +
    '                                  [--mode test|bench] [--which small] [--query K=V&...] [--timeout-min 40]\n' +
    'env: LDM_CHROMIUM, LDM_FIREFOX override the browser executables';
  (code ? console.error : console.log)(text);
  process.exit(code);
}

function parseArgs(argv) {
  const opts = { www: null, browsers: ['chromium', 'firefox'], filter: '', mode: 'test', which: 'small', query: '', device: 'gpu', threads: null, timeoutMin: 40 };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let v;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) {
      v = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const val = () => {
      if (v !== undefined) return v;
      if (i + 1 >= argv.length) {
        console.error(`${a} needs a value`);
        usage(2);
      }
      return argv[++i];
    };
    switch (a) {
      case '--www': opts.www = val(); break;
      case '--browsers': opts.browsers = val().split(',').map((s) => s.trim()).filter(Boolean); break;
      case '--filter': opts.filter = val(); break;
      case '--mode': opts.mode = val(); break;
      case '--which': opts.which = val(); break;
      // More bench.html parameters, e.g. mode=depth&model=depth-anything-v2-small (bench mode).
      case '--query': opts.query = val(); break;
      case '--device': opts.device = val(); break;
      // 0: the engine's single-threaded wasm build; N: its threads build with N workers.
      case '--threads': opts.threads = val(); break;
      case '--timeout-min': opts.timeoutMin = Number(val()); break;
      case '-h': case '--help': usage(0); break;
      default:
        console.error(`unknown argument ${a}`);
        usage(2);
    }
  }
  if (!opts.www) { console.error('--www is required'); usage(2); }
  if (!['test', 'bench'].includes(opts.mode)) { console.error(`--mode must be test or bench, not ${opts.mode}`); usage(2); }
  if (!(opts.timeoutMin > 0)) { console.error('--timeout-min must be a positive number'); usage(2); }
  for (const b of opts.browsers) if (!BROWSERS[b]) { console.error(`unknown browser ${b} (known: ${Object.keys(BROWSERS).join(', ')})`); usage(2); }
  if (opts.browsers.length === 0) { console.error('--browsers is empty'); usage(2); }
  return opts;
}

const secs = (t0) => ((performance.now() - t0) / 1000).toFixed(1);

function fmtNum(x) {
  if (x === null || x === undefined) return '-';
  const n = Number(x);
  if (!Number.isFinite(n)) return String(x);
  if (n === 0) return '0';
  return n.toExponential(1).replace('.0e', 'e').replace('e+', 'e');
}

function adapterLine(a) {
  if (!a || typeof a !== 'object') return 'adapter: (not reported)';
  return `adapter: name=${JSON.stringify(a.name ?? '')} backend=${a.backend} shader_f16=${a.shader_f16} ` +
    `subgroups=${a.subgroups} timestamp_query=${a.timestamp_query} ` +
    `max_storage_buffer_binding_size=${a.max_storage_buffer_binding_size}` +
    (Number.isFinite(a.max_storage_buffer_binding_size) ? ` (${(a.max_storage_buffer_binding_size / 2 ** 20).toFixed(0)} MiB)` : '') +
    ` device_type=${a.device_type} profile=${a.profile}` +
    (a.browser ? ` browser_info=${JSON.stringify(a.browser)}` : '');
}

// ---------------------------------------------------------------------------------------------------------
// Browser adapters: each returns {version, open(url, tag) -> page wrapper, close()}.
// A page wrapper has poll(expression) -> value (evaluated in the page) and close().

async function launchChromium(executable, log) {
  const { chromium } = await import('playwright-core');
  const userDataDir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'ldm-chromium-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: executable,
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 120_000,
    });
  } catch (e) {
    await fs.promises.rm(userDataDir, { recursive: true, force: true }).catch(() => {});
    throw e;
  }
  const version = context.browser()?.version() ?? '(unknown version)';
  let crashed = null;
  return {
    version,
    async open(url) {
      const page = context.pages()[0] ?? (await context.newPage());
      const seenWorkers = new WeakSet();
      page.on('console', (msg) => {
        const w = msg.worker?.();
        if (w) seenWorkers.add(w);
        log(`${w ? '(worker) ' : ''}${msg.type() === 'log' ? '' : msg.type() + ': '}${msg.text()}`);
      });
      page.on('worker', (worker) => {
        log(`(worker started: ${worker.url()})`);
        // Older playwright versions only deliver worker console output on the Worker object.
        worker.on('console', (msg) => {
          if (msg.worker?.()) return; // already forwarded through page 'console'
          log(`(worker) ${msg.type() === 'log' ? '' : msg.type() + ': '}${msg.text()}`);
        });
        worker.on('close', () => log('(worker closed)'));
      });
      page.on('pageerror', (err) => log(`page error: ${err?.stack ?? err}`));
      page.on('crash', () => { crashed = 'page crashed'; log('PAGE CRASHED'); });
      page.on('requestfailed', (req) => log(`request failed: ${req.url()} ${req.failure()?.errorText ?? ''}`));
      page.on('response', (res) => { if (res.status() >= 400) log(`HTTP ${res.status()} ${res.url()}`); });
      await page.goto(url, { waitUntil: 'load', timeout: 120_000 });
      return {
        async poll(expr) {
          if (crashed) throw new Error(crashed);
          return await page.evaluate(expr);
        },
        close: () => page.close().catch(() => {}),
      };
    },
    async close() {
      await context.close().catch(() => {});
      await fs.promises.rm(userDataDir, { recursive: true, force: true }).catch(() => {});
    },
  };
}

async function launchFirefox(executable, log) {
  const puppeteer = (await import('puppeteer-core')).default;
  const browser = await puppeteer.launch({
    browser: 'firefox',
    executablePath: executable,
    headless: true,
    extraPrefsFirefox: FIREFOX_PREFS,
    timeout: 120_000,
    protocolTimeout: 300_000, // generous for a CPU saturated by a software WebGPU adapter
  });
  const version = await browser.version().catch(() => '(unknown version)');
  let disconnected = false;
  browser.on('disconnected', () => { disconnected = true; });
  return {
    version,
    async open(url) {
      const page = await browser.newPage();
      page.on('console', (msg) => {
        log(`${msg.type() === 'log' ? '' : msg.type() + ': '}${msg.text()}`);
      });
      page.on('workercreated', (worker) => {
        log(`(worker started: ${worker.url()})`);
        worker.on?.('console', (msg) => log(`(worker) ${msg.type() === 'log' ? '' : msg.type() + ': '}${msg.text()}`));
      });
      page.on('pageerror', (err) => log(`page error: ${err?.stack ?? err}`));
      page.on('requestfailed', (req) => log(`request failed: ${req.url()} ${req.failure()?.errorText ?? ''}`));
      page.on('response', (res) => { if (res.status() >= 400) log(`HTTP ${res.status()} ${res.url()}`); });
      await page.goto(url, { waitUntil: 'load', timeout: 120_000 });
      return {
        async poll(expr) {
          if (disconnected) throw new Error('browser disconnected');
          return await page.evaluate(expr);
        },
        close: () => page.close().catch(() => {}),
      };
    },
    async close() {
      await browser.close().catch(() => {});
    },
  };
}

// ---------------------------------------------------------------------------------------------------------

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let interrupted = false;

// Rejects when `promise` has not settled within ms (the page's main thread could hang).
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${Math.round(ms / 1000)} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Runs one browser; returns {name, ok, passed, failed, unsupported, error}.
async function runBrowser(name, opts, baseUrl) {
  const tag = `[${name}]`;
  const log = (line) => {
    for (const l of String(line).split('\n')) console.log(`${tag} ${l}`);
  };
  const summary = { name, ok: false, passed: 0, failed: 0, unsupported: 0, error: null, adapter: null };
  const spec = BROWSERS[name];
  if (!fs.existsSync(spec.executable)) {
    summary.error = `browser executable not found: ${spec.executable}`;
    log(`ERROR: ${summary.error}`);
    return summary;
  }

  let session = null;
  let page = null;
  const tLaunch = performance.now();
  try {
    log(`launching ${spec.executable}`);
    session = await spec.launch(spec.executable, log);
    log(`launched ${session.version} in ${secs(tLaunch)} s`);
  } catch (e) {
    summary.error = `could not launch ${name}: ${e?.message ?? e}`;
    log(`ERROR: ${summary.error}`);
    return summary;
  }

  const isTest = opts.mode === 'test';
  const url = new URL(isTest ? 'tests.html' : 'bench.html', baseUrl);
  url.searchParams.set('device', opts.device);
  if (opts.threads !== null) url.searchParams.set('threads', opts.threads);
  if (isTest) url.searchParams.set('filter', opts.filter);
  else {
    url.searchParams.set('which', opts.which);
    for (const [k, v] of new URLSearchParams(opts.query)) url.searchParams.set(k, v);
  }
  const resultVar = isTest ? '__ldmTestResults' : '__ldmBenchResults';
  const errorVar = isTest ? '__ldmTestError' : '__ldmBenchError';
  const expr = `(() => {
    const e = window.${errorVar};
    if (e !== undefined) return { error: String(e) };
    const r = window.${resultVar};
    if (r !== undefined) return { result: r };
    return null;
  })()`;

  const tRun = performance.now();
  const deadline = tRun + opts.timeoutMin * 60_000;
  try {
    log(`opening ${url.href}`);
    page = await session.open(url.href);
    let out = null;
    let lastNote = performance.now();
    while (out === null) {
      if (interrupted) throw new Error('interrupted');
      const left = Math.max(deadline - performance.now(), 0);
      out = await withTimeout(page.poll(expr), left + 30_000, 'the page');
      if (out !== null) break;
      if (performance.now() > deadline) throw new Error(`timed out after ${opts.timeoutMin} min waiting for ${resultVar}`);
      if (performance.now() - lastNote > 60_000) {
        log(`still running (${secs(tRun)} s)`);
        lastNote = performance.now();
      }
      await sleep(500);
    }
    if (out.error !== undefined) throw new Error(`page reported: ${out.error}`);
    const res = out.result;
    log(`finished in ${secs(tRun)} s`);

    if (isTest) {
      summary.adapter = res.adapter ?? null;
      log(adapterLine(res.adapter));
      const results = Array.isArray(res.results) ? res.results : [];
      for (const r of results) {
        const status = String(r.status);
        const line = `${status.padEnd(4)}  ${r.name} ${r.dtype}  err=${fmtNum(r.max_err)} tol=${fmtNum(r.tol)}`;
        log(status === 'pass' || !r.message ? line : `${line}  ${r.message}`);
        if (status === 'pass') summary.passed++;
        else if (status === 'unsupported') summary.unsupported++;
        else summary.failed++; // 'fail' or anything unexpected
      }
      if (res.passed !== summary.passed || res.failed !== summary.failed || res.unsupported !== summary.unsupported) {
        log(`warning: reported counts (${res.passed} passed, ${res.failed} failed, ${res.unsupported} unsupported) ` +
            `differ from the results list; using the list`);
      }
      const b = res.adapter?.browser;
      const aname = res.adapter?.name || [b?.vendor, b?.architecture].filter(Boolean).join(' ') || (b?.isFallbackAdapter ? 'fallback adapter' : `unnamed ${res.adapter?.backend ?? ''} adapter`.replace('  ', ' '));
      console.log(`${name} (${aname}): ${summary.passed} passed, ${summary.failed} failed, ${summary.unsupported} unsupported`);
      if (summary.passed + summary.failed === 0) {
        summary.error = `zero tests ran in ${name}` + (opts.filter ? ` (filter ${JSON.stringify(opts.filter)})` : '');
        log(`ERROR: ${summary.error}`);
      }
      summary.ok = summary.error === null && summary.failed === 0;
    } else {
      if (res && res.adapter) log(adapterLine(res.adapter));
      console.log(`${tag} bench results:`);
      console.log(JSON.stringify(res, null, 2));
      summary.ok = true;
    }
  } catch (e) {
    summary.error = e?.message ?? String(e);
    log(`ERROR: ${summary.error}`);
    if (isTest) console.log(`${name} (no adapter info): ERROR ${summary.error.split('\n')[0]}`);
  } finally {
    if (page) await withTimeout(page.close(), 30_000, 'page.close').catch((e) => log(`warning: ${e.message}`));
    await withTimeout(session.close(), 60_000, 'browser close').catch((e) => log(`warning: ${e.message}`));
  }
  return summary;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const www = path.resolve(opts.www);
  if (!fs.existsSync(path.join(www, opts.mode === 'test' ? 'tests.html' : 'bench.html'))) {
    console.error(`${www} has no ${opts.mode === 'test' ? 'tests.html' : 'bench.html'}`);
    process.exit(2);
  }
  if (!fs.existsSync(path.join(www, 'pkg', 'ldm_web.js'))) {
    console.error(`warning: ${path.join(www, 'pkg', 'ldm_web.js')} does not exist; build the wasm package first`);
  }
  const server = await startServer({ root: www, port: 0 });
  console.log(`serving ${www} at ${server.url}`);

  const onSignal = (sig) => {
    if (interrupted) process.exit(130);
    interrupted = true;
    console.error(`${sig}: stopping (again to exit now)`);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const summaries = [];
  try {
    for (const name of opts.browsers) {
      if (interrupted) {
        summaries.push({ name, ok: false, passed: 0, failed: 0, unsupported: 0, error: 'interrupted' });
        continue;
      }
      summaries.push(await runBrowser(name, opts, server.url));
    }
  } finally {
    await server.close();
  }

  const errors = summaries.filter((s) => s.error);
  for (const s of errors) console.log(`${s.name}: ERROR ${s.error.split('\n')[0]}`);
  let code;
  if (opts.mode === 'test') {
    const passed = summaries.reduce((n, s) => n + s.passed, 0);
    // A browser that could not run its tests (launch failure, no adapter, page error, zero tests,
    // timeout) counts as one failure, so this line never reads "0 failed" for a failed run.
    const failed = summaries.reduce((n, s) => n + s.failed + (s.error && s.failed === 0 ? 1 : 0), 0);
    console.log(`browser kernels: ${passed} passed, ${failed} failed`);
    code = failed === 0 && errors.length === 0 && summaries.every((s) => s.ok) ? 0 : 1;
  } else {
    const ok = summaries.filter((s) => s.ok).length;
    console.log(`browser bench: ${ok} ok, ${summaries.length - ok} failed`);
    code = ok === summaries.length ? 0 : 1;
  }
  process.exit(code);
}

main().catch((e) => {
  console.error(e?.stack ?? String(e));
  process.exit(1);
});
