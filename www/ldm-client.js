// Talks to the engine worker from a page: the app (app.js) and the <ldm-image> widget use this.
// Starts the worker (also when this module was loaded from another origin), restarts it after a
// fatal error, and turns its messages into promises and callbacks.

const WORKER_URL = new URL('./engine-worker.js', import.meta.url);

// A module worker must come from the page's origin; from elsewhere (an embedding page), start a
// same-origin blob worker that imports the real one (served with CORS).
// `singleThreaded`: the engine's build without a thread pool (see engine-worker.js).
function startWorker(singleThreaded) {
  const url = new URL(WORKER_URL);
  if (singleThreaded) url.searchParams.set('threads', '0');
  if (url.origin === self.location.origin) return new Worker(url, { type: 'module' });
  const shim = URL.createObjectURL(new Blob([`import ${JSON.stringify(url.href)};`], { type: 'text/javascript' }));
  return new Worker(shim, { type: 'module' });
}

// How long a worker may take from starting its thread pool to being ready (about a second
// normally), and how many pools may fail to start (a fresh worker usually succeeds) before the
// single-threaded build is used instead.
export const POOL_START_MS = 10_000;
const POOL_FAILURES = 2;

// Why WebGPU is missing, in words a user can act on; null when navigator.gpu exists. (The engine
// then runs on its CPU backend.)
export function webgpuHelp() {
  if (typeof navigator !== 'undefined' && navigator.gpu) return null;
  const ua = navigator.userAgent;
  if (!self.isSecureContext) return 'WebGPU needs a secure page: open this app over https:// or from localhost / 127.0.0.1.';
  if (/Firefox\//.test(ua)) return 'This Firefox has WebGPU switched off: open about:config and set dom.webgpu.enabled to true (on Linux also gfx.webgpu.ignore-blocklist), or use Firefox 141+ on Windows.';
  if (/Edg\//.test(ua) || /Chrome\//.test(ua) || /Chromium\//.test(ua)) {
    return /Linux/.test(ua)
      ? 'This Chromium/Chrome has no WebGPU on Linux by default: start it with --enable-unsafe-webgpu (or enable chrome://flags/#enable-unsafe-webgpu) and, for a real GPU, --enable-features=Vulkan.'
      : 'This browser has WebGPU switched off: update to Chrome/Edge 113 or newer, or enable chrome://flags/#enable-unsafe-webgpu.';
  }
  if (/Safari\//.test(ua)) return 'Safari needs WebGPU turned on: Settings → Feature Flags → WebGPU (Safari 18+), or use Chrome 113+.';
  return 'This browser has no WebGPU. Use Chrome/Edge 113+, or Firefox with dom.webgpu.enabled.';
}

export class LdmEngine {
  constructor() {
    // Where jobs compute: 'auto' (the GPU unless there is none or only a fallback adapter),
    // 'gpu' (WebGPU) or 'cpu' (the engine's CPU backend).
    this.device = 'auto';
    this.nextId = 1;
    this.jobs = new Map();
    this.onStatus = () => {};
    this.poolFailures = 0;
    this.start();
  }

  start() {
    this.ready = new Promise((resolve, reject) => {
      this.readyResolve = resolve;
      this.readyReject = reject;
    });
    this.ready.catch(() => {});
    this.spawn();
  }

  // A worker for the current `ready` promise (a second one when the first could not start).
  spawn() {
    const worker = startWorker(this.poolFailures >= POOL_FAILURES);
    this.worker = worker;
    // Messages sent before the start finishes wait in the new worker's queue.
    for (const job of this.jobs.values()) worker.postMessage(job.message);
    worker.addEventListener('message', (e) => {
      if (this.worker !== worker) return;
      const m = e.data ?? {};
      if (m.id === null && m.cmd === 'pool-start') {
        this.poolTimer = setTimeout(() => this.poolStuck(worker, m.threads), POOL_START_MS);
        return;
      }
      if (m.id === null) clearTimeout(this.poolTimer);
      this.onMessage(m);
    });
    worker.addEventListener('error', (e) => {
      e.preventDefault();
      if (this.worker !== worker) return;
      this.fail(`the engine worker failed: ${e.message || 'could not load engine-worker.js (see the console)'}`, true);
    });
  }

  // Every running job fails; with `restart`, a fresh worker takes over for the next one.
  fail(message, restart) {
    this.readyReject(new Error(message));
    for (const job of this.jobs.values()) job.reject(Object.assign(new Error(message), { kind: 'worker' }));
    this.jobs.clear();
    if (restart) {
      clearTimeout(this.poolTimer);
      this.worker.terminate();
      this.onStatus('The engine stopped unexpectedly and was restarted.');
      this.start();
    }
  }

  // A worker whose thread pool did not start in time: a fresh one (or, after POOL_FAILURES, the
  // single-threaded build) takes over the same `ready` promise and pending jobs.
  poolStuck(worker, threads) {
    if (this.worker !== worker) return;
    worker.terminate();
    this.poolFailures += 1;
    const why = `the CPU backend's ${threads} threads did not start within ${POOL_START_MS / 1000} s`;
    const next = this.poolFailures >= POOL_FAILURES ? 'the single-threaded engine' : 'a fresh engine worker';
    this.onStatus(`${why}; starting ${next}.`);
    console.warn(`ldm-web: ${why}; starting ${next}`);
    this.spawn();
  }

  onMessage(m) {
    if (m.id === null || m.id === undefined) {
      if (m.cmd === 'ready') this.readyResolve();
      else if (m.ok === false) this.readyReject(new Error(m.error));
      return;
    }
    const job = this.jobs.get(m.id);
    if (!job) return;
    if (m.event) {
      job.onEvent?.(m.event);
      return;
    }
    this.jobs.delete(m.id);
    if (m.ok) job.resolve(m);
    else {
      job.reject(Object.assign(new Error(m.error), { kind: m.kind }));
      if (m.fatal) this.fail('the engine hit an internal error', true);
    }
  }

  request(message, onEvent) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const msg = { id, device: this.device, ...message };
      this.jobs.set(id, { resolve, reject, onEvent, message: msg });
      this.worker.postMessage(msg);
    });
  }

  // Generates one image: resolves to {blob (PNG with its parameters chunk), info}. onEvent sees
  // {type: 'download', fetched, total}, {type: 'stage', stage}, {type: 'step', step, steps, ms},
  // {type: 'preview', step, width, height, rgba, decoder?: 'tiny'}, {type: 'status', message}.
  // images (optional): {init, mask, depth: PNG bytes (Uint8Array), controls: [{url, image, scale}],
  // loras: [{url, scale}], lora_merge, embeddings: [{url, token}], vae: URL, tiny_vae: URL,
  // tiny_decode}: URLs relative to the page.
  async generate(model, params, onEvent, images) {
    await this.ready;
    if (images) {
      const abs = (u) => new URL(u, document.baseURI).href;
      images = { ...images };
      for (const k of ['controls', 'loras', 'embeddings']) if (images[k]) images[k] = images[k].map((c) => ({ ...c, url: abs(c.url) }));
      for (const k of ['vae', 'tiny_vae']) if (images[k]) images[k] = abs(images[k]);
    }
    const m = await this.request({ cmd: 'generate', model: new URL(model, document.baseURI).href, params, images }, onEvent);
    return { blob: new Blob([m.png], { type: 'image/png' }), info: m.info };
  }

  // A condition image from a photo (PNG bytes): kind 'canny' (options {low, high, l2}) or 'depth'
  // (estimator: the URL of a Depth Anything / DPT folder). Resolves to PNG bytes (Uint8Array).
  async preprocess(image, kind, options, estimator, onEvent) {
    await this.ready;
    const m = await this.request({ cmd: 'preprocess', image, kind, options, estimator: estimator ? new URL(estimator, document.baseURI).href : undefined }, onEvent);
    return m.png;
  }

  cancel() {
    this.worker.postMessage({ cmd: 'cancel' });
  }

  // Test hooks: the next GPU call fails as after a driver reset / an out-of-memory error.
  simulateDeviceLoss() {
    this.worker.postMessage({ cmd: 'simulate-device-loss' });
  }

  simulateOutOfMemory() {
    this.worker.postMessage({ cmd: 'simulate-out-of-memory' });
  }

  async json(message) {
    await this.ready;
    return JSON.parse((await this.request(message)).json);
  }

  adapter() {
    return this.json({ cmd: 'adapter' });
  }

  models() {
    return this.json({ cmd: 'models' });
  }

  deleteModel(url) {
    return this.json({ cmd: 'delete-model', url });
  }

  // Trains (engine-worker.js 'train'): job {run, settings, autoencoder?, cond?, target?, zip?,
  // resume?}; onEvent sees {type: 'stage' | 'status' | 'train-step' | 'checkpoint' | 'sample'}.
  // Resolves to {step, steps, losses, cancelled}.
  async train(job, onEvent) {
    await this.ready;
    const autoencoder = job.autoencoder ? new URL(job.autoencoder, document.baseURI).href : undefined;
    return JSON.parse((await this.request({ cmd: 'train', ...job, autoencoder }, onEvent)).json);
  }

  // LoRA training (engine-worker.js 'train-lora'): job {run, settings, model?, images?, zip?,
  // caption?, resume?}; events and result as train's.
  async trainLora(job, onEvent) {
    await this.ready;
    const model = job.model ? new URL(job.model, document.baseURI).href : undefined;
    return JSON.parse((await this.request({ cmd: 'train-lora', ...job, model }, onEvent)).json);
  }

  // Training runs saved in this browser: [{name, kind, base, step, steps, losses, pairs, resolution}].
  runs() {
    return this.json({ cmd: 'runs' });
  }

  deleteRun(run) {
    return this.json({ cmd: 'delete-run', run });
  }

  // A run's model folder: [[path, Uint8Array], ...].
  async runFiles(run) {
    await this.ready;
    return (await this.request({ cmd: 'run-files', run })).files;
  }
}

// RGBA latent previews as a canvas-ready ImageData.
export function previewImage(ev) {
  return new ImageData(new Uint8ClampedArray(ev.rgba), ev.width, ev.height);
}
