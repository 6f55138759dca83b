// Runs one command in the engine's Web Worker for a page (tests.html, bench.html): shows progress in
// `out`, and publishes the parsed result on window[`${name}Results`] or the failure on
// window[`${name}Error`], where the browser test driver (tests/browser/run.mjs) looks for them.

import { POOL_START_MS } from './ldm-client.js';

export function runWorkerJob({ out, name, tag, message, what, validate = () => null, render }) {
  const t0 = performance.now();
  const secs = () => ((performance.now() - t0) / 1000).toFixed(1);
  let done = false;
  const log = (line) => { out.textContent += `\n${line}`; };
  const ticker = setInterval(() => {
    out.firstChild.textContent = out.firstChild.textContent.replace(/( \(\d+\.\d s\))?$/, ` (${secs()} s)`);
  }, 1000);

  function fail(text) {
    if (done) return;
    done = true;
    clearInterval(ticker);
    window[`${name}Error`] = String(text);
    log(`ERROR after ${secs()} s: ${text}`);
    out.classList.add('fail');
    console.error(`[${tag}] ${text}`);
  }

  function succeed(res) {
    if (done) return;
    done = true;
    clearInterval(ticker);
    render(res, log, secs());
    window[`${name}Results`] = res;
  }

  window.addEventListener('error', (e) => fail(`page error: ${e.message}`));
  window.addEventListener('unhandledrejection', (e) => fail(`page unhandled rejection: ${e.reason}`));

  // ?threads=0 on the page: the engine's single-threaded build; ?threads=N: its threads build
  // with N workers (the default chooses from the cores).
  const threads = new URLSearchParams(location.search).get('threads');
  const url = threads ? `./engine-worker.js?threads=${encodeURIComponent(threads)}` : './engine-worker.js';
  const MAX_STARTS = 3;
  let starts = 0;
  let worker;

  function start() {
    starts += 1;
    try {
      worker = new Worker(url, { type: 'module' });
    } catch (e) {
      fail(`could not start worker: ${e}`);
      return;
    }
    worker.addEventListener('error', (e) => {
      e.preventDefault();
      fail(`worker error: ${e.message || 'failed to load or run engine-worker.js (see console)'}` +
           (e.filename ? ` at ${e.filename}:${e.lineno}` : ''));
    });
    worker.addEventListener('messageerror', () => fail('worker message could not be deserialised'));
    worker.addEventListener('message', onMessage);
    worker.postMessage({ id: 1, ...message });
  }

  // A worker whose thread pool has not started in time (see engine-worker.js): a fresh one.
  let poolTimer;
  function poolStuck(stuck, threads) {
    if (stuck !== worker || done) return;
    const why = `the CPU backend's ${threads} threads did not start within ${POOL_START_MS / 1000} s`;
    if (starts >= MAX_STARTS) {
      fail(why);
      return;
    }
    log(`${why}; restarting the engine worker (start ${starts + 1} of ${MAX_STARTS})`);
    console.warn(`[${tag}] ${why}; restarting the engine worker`);
    worker.terminate();
    start();
  }

  function onMessage(e) {
    if (e.target !== worker) return; // from a worker already restarted
    const m = e.data ?? {};
    if (m.id === null && m.cmd === 'pool-start') {
      const w = worker;
      poolTimer = setTimeout(() => poolStuck(w, m.threads), POOL_START_MS);
      return;
    }
    if (m.id === null) clearTimeout(poolTimer);
    if (m.id === null && m.cmd === 'ready') { log(`engine ready after ${secs()} s; running ${what}…`); return; }
    if (m.id === null && m.ok === false) { fail(m.error); return; }
    if (m.id !== 1) return;
    if (m.event) { if (m.event.type === 'step') log(`step ${m.event.step}/${m.event.steps} (${m.event.ms.toFixed(0)} ms)`); else if (m.event.type === 'stage') log(`stage: ${m.event.stage}`); return; }
    if (!m.ok) { fail(m.error); return; }
    let res;
    try { res = JSON.parse(m.json); } catch (err) { fail(`result is not JSON: ${err}: ${String(m.json).slice(0, 200)}`); return; }
    const problem = validate(res);
    if (problem) { fail(`${problem}: ${String(m.json).slice(0, 200)}`); return; }
    succeed(res);
  }

  start();
}
