// Module Web Worker hosting the ldm-web wasm engine (wasm-bindgen --target web output in ./pkg/).
//
// Messages in:  {id, cmd: 'test', filter}  -> ldm.run_kernel_tests(filter)  (resolves to a JSON string)
//               {id, cmd: 'bench', which}  -> ldm.bench_kernels(which)      (resolves to a JSON string)
// Replies:      {id, ok: true, json} | {id, ok: false, error}
// Before any command is handled the worker posts {id: null, cmd: 'ready'} or {id: null, ok: false, error}
// once initialisation finishes; commands sent earlier are queued until then.

let ldm = null;

function errorText(e) {
  if (e instanceof Error) {
    // Chromium's stack starts with "Name: message", Firefox's holds only the frames.
    const head = String(e);
    const stack = (e.stack ?? '').trimEnd();
    if (!stack) return head;
    return stack.startsWith(head) ? stack : `${head}\n${stack}`;
  }
  if (e && typeof e === 'object' && 'message' in e) return String(e.message);
  return String(e);
}

async function initEngine() {
  if (typeof navigator === 'undefined' || !navigator.gpu) {
    throw new Error(
      'WebGPU is unavailable in this worker (navigator.gpu is undefined); ' +
        'Chromium needs --enable-unsafe-webgpu on Linux, Firefox needs dom.webgpu.enabled',
    );
  }
  let mod;
  try {
    mod = await import('./pkg/ldm_web.js');
  } catch (e) {
    throw new Error(`failed to load ./pkg/ldm_web.js: ${errorText(e)}`);
  }
  try {
    await mod.default();
  } catch (e) {
    throw new Error(`wasm init failed: ${errorText(e)}`);
  }
  return mod;
}

const ready = initEngine().then(
  (mod) => {
    ldm = mod;
    self.postMessage({ id: null, cmd: 'ready' });
    return null;
  },
  (e) => {
    const error = errorText(e);
    self.postMessage({ id: null, ok: false, error });
    return error;
  },
);

async function handle(msg) {
  const initError = await ready;
  if (initError !== null) throw new Error(initError);
  switch (msg.cmd) {
    case 'test':
      if (typeof ldm.run_kernel_tests !== 'function') throw new Error('wasm module has no run_kernel_tests export');
      return await ldm.run_kernel_tests(msg.filter ?? '');
    case 'bench':
      if (typeof ldm.bench_kernels !== 'function') throw new Error('wasm module has no bench_kernels export');
      return await ldm.bench_kernels(msg.which ?? 'small');
    default:
      throw new Error(`unknown command ${JSON.stringify(msg.cmd)}`);
  }
}

// What the browser says of its adapter (wgpu reports only the description, which Chromium masks).
async function browserAdapterInfo() {
  try {
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
    const i = adapter?.info ?? {};
    return { vendor: i.vendor ?? '', architecture: i.architecture ?? '', device: i.device ?? '', description: i.description ?? '', isFallbackAdapter: i.isFallbackAdapter ?? null };
  } catch (e) {
    return { error: errorText(e) };
  }
}

self.addEventListener('message', async (ev) => {
  const msg = ev.data ?? {};
  const id = msg.id ?? null;
  try {
    let json = await handle(msg);
    const report = typeof json === 'string' ? JSON.parse(json) : json;
    if (report && report.adapter) report.adapter.browser = await browserAdapterInfo();
    json = JSON.stringify(report);
    self.postMessage({ id, ok: true, json });
  } catch (e) {
    self.postMessage({ id, ok: false, error: errorText(e) });
  }
});
