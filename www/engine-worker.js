// The engine's module Web Worker: owns the GPU device, the loaded model and the weight cache, so
// the page never blocks. Used by the app (app.js), the <ldm-image> widget and the test pages,
// always through ldm-client.js or worker-job.js.
//
// Messages in (one job runs at a time; `cancel` and the `simulate-*` commands act immediately):
//   {id, cmd: 'generate', model, params, images?}  params: prompt, negative_prompt, seed, steps, guidance,
//                                             width, height, scheduler, precision, preview_every, strength,
//                                             mask_blur, noise_level, guess_mode, control_start, control_end;
//                                             prompt_2, negative_prompt_2 (SDXL), prompt_weighting ('none' | 'a1111');
//                                             images: {init?, mask?, depth?: PNG bytes, controls?: [{url, image, scale}],
//                                             loras?: [{url, scale}], lora_merge?, embeddings?: [{url, token?}],
//                                             vae?: folder URL, tiny_vae?: folder URL, tiny_decode?}
//   {id, cmd: 'preprocess', image: PNG bytes, kind: 'canny' | 'depth', options?: {low, high, l2},
//    estimator?: folder URL}                (a condition from a photo; resolves to {png})
//   {id, cmd: 'bench-generate', model, params}
//   {id, cmd: 'adapter'} | {id, cmd: 'models'} | {id, cmd: 'delete-model', url}
//   {id, cmd: 'train', run, settings, autoencoder?: folder URL, cond?: File[], target?: File[], zip?: File,
//    resume?: bool}                         (ldm train in the page: a new run from the pairs (files paired
//                                             by name, or a ZIP of cond/ and target/), or the saved run
//                                             `run` continued; events train-step, checkpoint, sample)
//   {id, cmd: 'train-lora', run, settings, model?: Stable Diffusion folder URL, images?: File[] (images,
//    NAME.txt captions, metadata.jsonl), zip?: File, caption?, resume?: bool}   (ldm train-lora in the
//                                             page: a LoRA of the model from captioned images, or the saved
//                                             LoRA run `run` continued; events as train's)
//   {id, cmd: 'bench-train', model?: autoencoder folder URL, options: Train tab settings}  (ldm bench train)
//   {id, cmd: 'runs'} | {id, cmd: 'delete-run', run} | {id, cmd: 'run-files', run}   (saved runs in OPFS)
//   A model URL `opfs:RUN/` generates with a saved run's model; a LoRA URL `opfs:RUN/FILE` with its LoRA.
//   {id, cmd: 'bench-unet', model: 'sd15' | 'sdxl' | URL, inputs: URL?, options}  (ldm bench unet)
//   {id, cmd: 'bench-depth', model: architecture name | folder URL, options: {width, height, precision}}  (ldm bench depth)
//   {id, cmd: 'test', filter} | {id, cmd: 'bench', which}     (kernel tests and benchmarks)
//   Every message may carry device: 'auto' (default) | 'gpu' | 'cpu': where it computes (see chooseDevice).
//   {cmd: 'cancel'} | {cmd: 'simulate-device-loss'} | {cmd: 'simulate-out-of-memory'}   (the last two test recovery)
// Messages out:
//   {id: null, cmd: 'pool-start', threads} when the threads build starts its pool (the page restarts
//                                             a worker that is not ready soon after; see initEngine)
//   {id: null, cmd: 'ready'} or {id: null, ok: false, error} once, after initialisation
//   {id, event: {type: 'stage' | 'step' | 'preview' | 'download' | 'status', ...}} while a job runs
//   {id, ok: true, json?, png?, info?} | {id, ok: false, error, kind, fatal}

import { WeightStore, abortError, recordModel, listCachedModels, deleteCachedModel } from './weight-store.js';
import { RunStore, checkRunName, deleteRun, listRuns, readLoraRun, readRunFiles, readRunPairs, startLoraRun, startRun, writeRunFiles } from './run-store.js';
import { readZip } from './zip.js';

let ldm = null;
let current = null; // {id, abort: AbortController} of the running job
let queue = Promise.resolve();

function errorText(e) {
  if (e instanceof Error) {
    // Chromium's stack starts with "Name: message", Firefox's holds only the frames.
    const head = String(e);
    const stack = (e.stack ?? '').trimEnd();
    if (!stack || e.kind) return e.message ?? head;
    return stack.startsWith(head) ? stack : `${head}\n${stack}`;
  }
  if (e && typeof e === 'object' && 'message' in e) return String(e.message);
  return String(e);
}

// The engine module: the threads build where this worker may share memory (a cross-origin-
// isolated page) and there is more than one core, else the single-threaded one. The threads build
// runs the CPU backend on a pool of one worker per core while this one waits for them (measured on
// two cores: 1.4-1.7x at a 32x32 latent; small models like the built-in one gain nothing there).
// `engine-worker.js?threads=0` asks for the single-threaded build, `?threads=N` for a pool of N.
const THREADS_ASKED = new URL(self.location.href).searchParams.get('threads');
const CAN_SHARE = self.crossOriginIsolated === true && typeof SharedArrayBuffer === 'function';
const POOL = !CAN_SHARE || THREADS_ASKED === '0' ? 0
  : THREADS_ASKED ? Math.max(1, Math.min(Number(THREADS_ASKED) || 1, 16))
  : (navigator.hardwareConcurrency || 1) > 1 ? Math.min(navigator.hardwareConcurrency, 16) : 0;
const THREADED = POOL > 0;

async function initEngine() {
  // Without WebGPU the engine still runs, on its CPU backend (see chooseDevice).
  const pkg = THREADED ? './pkg-mt/ldm_web.js' : './pkg/ldm_web.js';
  let mod;
  try {
    mod = await import(pkg);
  } catch (e) {
    throw new Error(`failed to load ${pkg}: ${errorText(e)}`);
  }
  try {
    await mod.default();
  } catch (e) {
    throw new Error(`wasm init failed: ${errorText(e)}`);
  }
  if (THREADED) {
    // The page watches this start (ldm-client.js, worker-job.js): Firefox now and then never
    // finishes starting the pool's workers (about one cold start in seven on a loaded two-core
    // machine) and this worker then stops running anything, its own timers included; only the
    // page can see that and restart it.
    self.postMessage({ id: null, cmd: 'pool-start', threads: POOL });
    try {
      await mod.initThreadPool(POOL);
    } catch (e) {
      throw new Error(`the CPU backend's ${POOL} threads did not start: ${errorText(e)}`);
    }
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

// Where a job computes: 'cpu' (the engine's CPU backend) or 'gpu' (the browser's WebGPU adapter).
// 'auto' takes the GPU unless there is no WebGPU, no adapter, or only a fallback adapter (a
// software rasterizer such as SwiftShader or lavapipe, where the CPU backend is many times faster).
// Why auto chose what it did: 'no-webgpu', 'no-adapter', 'fallback' (CPU) or 'adapter' (GPU).
let autoDevice = null;
let autoReason = null;
let lastReason = null;
async function chooseDevice(pref) {
  if (pref === 'cpu' || pref === 'gpu') {
    lastReason = 'chosen';
    if (pref === 'gpu' && !navigator.gpu) throw Object.assign(new Error('this browser has no WebGPU (navigator.gpu is undefined); choose the CPU device or enable WebGPU'), { kind: 'input' });
    return pref;
  }
  if (autoDevice === null) {
    let adapter = null;
    try {
      adapter = navigator.gpu ? await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' }) : null;
    } catch {
      adapter = null;
    }
    autoReason = !navigator.gpu ? 'no-webgpu' : !adapter ? 'no-adapter' : adapter.info?.isFallbackAdapter ? 'fallback' : 'adapter';
    autoDevice = autoReason === 'adapter' ? 'gpu' : 'cpu';
  }
  lastReason = autoReason;
  return autoDevice;
}

// A model URL: a diffusers folder (ending in '/') or one checkpoint file (.safetensors, or a
// PyTorch .ckpt / .pt read by the engine's restricted unpickler).
function modelLocation(model) {
  if (!model) throw Object.assign(new Error('no model given: enter the URL of a diffusers folder or a .safetensors / .ckpt file'), { kind: 'input' });
  // A model trained in this browser (the Train tab), kept in OPFS.
  const run = /^opfs:([^/]+)\/?$/.exec(model);
  if (run) return { url: `opfs:${run[1]}/`, base: `opfs:${run[1]}/`, file: null, run: checkRunName(run[1]) };
  const url = new URL(model, self.location.href);
  if (/\.(safetensors|ckpt|pt|pth)$/i.test(url.pathname)) {
    const base = new URL('./', url).href;
    return { url: url.href, base, file: decodeURIComponent(url.pathname.slice(new URL(base).pathname.length)) };
  }
  const href = url.href.endsWith('/') ? url.href : `${url.href}/`;
  return { url: href, base: href, file: null };
}

// CLIP's BPE merges for single-file checkpoints (they carry no tokenizer), cached like weights.
async function clipBpe(signal) {
  const store = new WeightStore(new URL('./pkg/', import.meta.url).href, { signal });
  const n = await store.size('clip-bpe.txt.gz');
  if (n === null) throw new Error('pkg/clip-bpe.txt.gz is missing from this build');
  const gz = await store.read('clip-bpe.txt.gz', 0, n);
  const text = await new Response(new Blob([gz]).stream().pipeThrough(new DecompressionStream('gzip'))).text();
  return text;
}

// Events carry the worker's clock (ms since the epoch), so tests can order them against a server's log.
function postEvent(id, event) {
  self.postMessage({ id, event: Object.assign(event, { t: Date.now() }) });
}

async function withModel(id, msg, run) {
  const loc = modelLocation(msg.model);
  const counter = jobCounter(id);
  if (loc.run) return run(loc, new RunStore(loc.run), undefined, counter);
  const store = storeFor(id, loc.base, counter);
  // Recorded before anything downloads, so a partial download is listed (and can be deleted) too.
  await recordModel(loc.url, { file: loc.file });
  const bpe = loc.file ? await clipBpe(current.abort.signal) : undefined;
  return run(loc, store, bpe, counter);
}

// Downloads the first of `files` that exists, in the background.
async function prefetchFirst(store, files) {
  for (const f of files) {
    if ((await store.size(f).catch(() => null)) !== null) {
      await store.prefetch(f);
      return;
    }
  }
}

// One download counter for a job's stores (model, ControlNets, LoRAs, embeddings, VAEs), so the
// page shows one "fetched / total" that never runs past its total.
function jobCounter(id) {
  const stores = new Map();
  return (store, fetched, total) => {
    stores.set(store, [fetched, total]);
    let f = 0;
    let t = 0;
    for (const [a, b] of stores.values()) {
      f += a;
      t += b;
    }
    postEvent(id, { type: 'download', fetched: f, total: Math.max(t, f) });
  };
}

function storeFor(id, base, counter) {
  const store = new WeightStore(base, {
    signal: current.abort.signal,
    onBytes: (fetched, total) => counter(store, fetched, total),
    log: (line) => postEvent(id, { type: 'status', message: line }),
  });
  return store;
}

// A file given by URL (a LoRA, an embedding): its folder's weight store and its name there.
async function fileEntry(id, url, counter, what) {
  // A file of a run trained in this browser (a LoRA), kept in OPFS.
  const run = /^opfs:([^/]+)\/([^/]+)$/.exec(url);
  if (run) return { url, store: new RunStore(checkRunName(run[1])), file: run[2] };
  const u = new URL(url, self.location.href);
  const name = decodeURIComponent(u.pathname.split('/').pop() ?? '');
  if (!name) throw Object.assign(new Error(`the ${what} URL ${url} names a folder, not a file (.safetensors, .pt, .ckpt or .bin)`), { kind: 'input' });
  const base = new URL('./', u).href;
  await recordModel(u.href, { file: name, kind: what });
  return { url: u.href, store: storeFor(id, base, counter), file: name };
}

// A folder given by URL (a ControlNet, a VAE): its weight store.
async function folderEntry(id, url, counter, what) {
  const href = new URL(url, self.location.href).href;
  const base = href.endsWith('/') ? href : `${href}/`;
  await recordModel(base, { kind: what });
  return { url: base, store: storeFor(id, base, counter), file: '' };
}

// What a generation brings besides the model for the engine: images, ControlNets, LoRAs,
// embeddings and VAEs, each file with its own weight store (cached like a model, fetched only
// when a generation uses it).
async function engineImages(id, images, counter) {
  if (!images) return undefined;
  const controls = [];
  for (const c of images.controls ?? []) {
    const f = await folderEntry(id, c.url, counter, 'controlnet');
    controls.push({ url: f.url, store: f.store, image: c.image, scale: c.scale ?? 1 });
  }
  const loras = [];
  for (const l of images.loras ?? []) loras.push({ ...(await fileEntry(id, l.url, counter, 'lora')), scale: l.scale ?? 1 });
  const embeddings = [];
  for (const e of images.embeddings ?? []) embeddings.push({ ...(await fileEntry(id, e.url, counter, 'embedding')), token: e.token ?? '' });
  const out = { init: images.init, mask: images.mask, depth: images.depth, controls, loras, embeddings, lora_merge: !!images.lora_merge };
  if (images.vae) out.vae = await folderEntry(id, images.vae, counter, 'vae');
  if (images.tiny_vae) out.tiny_vae = { ...(await folderEntry(id, images.tiny_vae, counter, 'tiny-vae')), decode: !!images.tiny_decode };
  return out;
}

async function generate(id, msg) {
  const post = (event) => postEvent(id, event);
  const request = JSON.stringify(msg.params ?? {});
  for (let attempt = 0; ; attempt++) {
    try {
      return await withModel(id, msg, async (loc, store, bpe, counter) => {
        const images = await engineImages(id, msg.images, counter);
        const out = await ldm.generate(loc.base, store, loc.file ?? undefined, bpe, request, images, (ev) => {
          if (ev.type === 'prefetch') prefetchFirst(store, ev.files);
          else post(ev);
        });
        return { png: out.png, info: JSON.parse(out.info) };
      });
    } catch (e) {
      // The device was lost (driver reset, another tab, a simulated loss): the engine has dropped
      // it; open a new one and load the model again, from the cache.
      if (e?.kind === 'device-lost' && attempt === 0) {
        post({ type: 'status', message: `${e.message.replace(/^the GPU/, 'The GPU').replace(/;.*$/, '')}: reopening it and retrying.` });
        continue;
      }
      throw e;
    }
  }
}

// ---- training (the Train tab) --------------------------------------------------------------------

const IMAGE_NAME = /\.(png|jpe?g|webp|gif|bmp)$/i;
const stem = (name) => name.split('/').pop().replace(/\.[^.]*$/, '');

// Pairs from two lists of files, matched by name without extension.
function filePairs(cond, target) {
  const map = (files) => new Map(files.filter((f) => IMAGE_NAME.test(f.name)).map((f) => [stem(f.name), f]));
  return { cond: map(cond), target: map(target) };
}

// Pairs from a ZIP holding cond/ and target/ folders (at any depth).
async function zipPairs(zip) {
  const pairs = { cond: new Map(), target: new Map() };
  for (const { name, bytes } of await readZip(zip)) {
    const m = /(?:^|\/)(cond|target)\/([^/]+)$/.exec(name);
    if (m && IMAGE_NAME.test(m[2])) pairs[m[1]].set(stem(m[2]), new File([bytes], m[2]));
  }
  return pairs;
}

// An image file as {width, height, rgba}, decoded by the browser (PNG, JPEG, WebP, ...).
async function decodeImage(blob, what) {
  let bmp;
  try {
    bmp = await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch {
    throw Object.assign(new Error(`${what} is not an image this browser can read (PNG, JPEG, WebP)`), { kind: 'input' });
  }
  const canvas = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(bmp, 0, 0);
  const data = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
  return { width: bmp.width, height: bmp.height, rgba: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

async function train(id, msg) {
  const name = checkRunName(msg.run);
  let pairs;
  if (msg.resume) {
    pairs = await readRunPairs(name);
  } else {
    pairs = msg.zip ? await zipPairs(msg.zip) : filePairs(msg.cond ?? [], msg.target ?? []);
    const matched = [...pairs.cond.keys()].filter((k) => pairs.target.has(k)).length;
    if (!matched) throw Object.assign(new Error(`no pairs: ${pairs.cond.size} condition and ${pairs.target.size} target images, none with the same name`), { kind: 'input' });
    for (const side of ['cond', 'target']) for (const k of [...pairs[side].keys()]) if (!pairs[side === 'cond' ? 'target' : 'cond'].has(k)) pairs[side].delete(k);
    await startRun(name, pairs);
  }
  postEvent(id, { type: 'status', message: `${pairs.cond.size} pairs` });
  // In name order (as ldm train reads a folder): the data order of a run, resumed or not,
  // depends on it.
  const decoded = [];
  for (const key of [...pairs.cond.keys()].sort()) {
    decoded.push({ name: key, cond: await decodeImage(pairs.cond.get(key), `condition image ${key}`), target: await decodeImage(pairs.target.get(key), `target image ${key}`) });
  }
  // A resumed run reads its autoencoder from its own folder (vqvae/): no network needed.
  const resume = msg.resume ? await readRunFiles(name, ['training/', 'unet/config.json', 'scheduler/']) : null;
  const ae = msg.resume ? { url: `opfs:${name}/`, store: new RunStore(name) } : await folderEntry(id, msg.autoencoder, jobCounter(id), 'autoencoder');
  return savingCheckpoints(id, name, (onEvent) => ldm.train(ae.url, ae.store, decoded, JSON.stringify(msg.settings ?? {}), resume, onEvent));
}

// Runs `start(onEvent)` (ldm.train or ldm.train_lora), writing each checkpoint's files into run
// `name` in order and passing every other event on; resolves to {json} once all are written.
async function savingCheckpoints(id, name, start) {
  let saving = Promise.resolve();
  const json = await start((ev) => {
    if (ev.type === 'checkpoint') {
      const { files, step } = ev;
      saving = saving.then(() => writeRunFiles(name, files)).then(() => postEvent(id, { type: 'checkpoint', step }));
    } else {
      postEvent(id, ev);
    }
  });
  await saving;
  return { json };
}

const CAPTION_NAME = /\.txt$/i;

// Captioned images from files (or a ZIP's entries): images, NAME.txt captions and metadata.jsonl
// lines ({file_name, text}, diffusers' image folder), `fallback` for images without a caption.
// Resolves to {images: Map(stem -> File), captions: {stem: text}}.
async function captionedImages(files, zip, fallback) {
  const entries = zip ? (await readZip(zip)).map(({ name, bytes }) => new File([bytes], name.split('/').pop())) : files;
  const images = new Map();
  const captions = {};
  const named = {};
  for (const f of entries) {
    if (IMAGE_NAME.test(f.name)) images.set(stem(f.name), f);
    else if (CAPTION_NAME.test(f.name)) captions[stem(f.name)] = (await f.text()).trim();
    else if (f.name === 'metadata.jsonl') {
      for (const line of (await f.text()).split('\n').filter((l) => l.trim())) {
        let v;
        try {
          v = JSON.parse(line);
        } catch {
          v = null;
        }
        if (typeof v?.file_name !== 'string' || typeof v?.text !== 'string') throw Object.assign(new Error(`metadata.jsonl: expected {"file_name": ..., "text": ...} lines, got ${line.slice(0, 80)}`), { kind: 'input' });
        named[stem(v.file_name)] = v.text;
      }
    }
  }
  if (!images.size) throw Object.assign(new Error('no training images (PNG, JPEG, WebP)'), { kind: 'input' });
  const out = {};
  for (const k of images.keys()) {
    const c = named[k] ?? captions[k] ?? (fallback || null);
    if (c === null) throw Object.assign(new Error(`image ${k} has no caption: add ${k}.txt, a metadata.jsonl line, or a caption for all`), { kind: 'input' });
    out[k] = c;
  }
  return { images, captions: out };
}

async function trainLora(id, msg) {
  const name = checkRunName(msg.run);
  let data;
  if (msg.resume) {
    data = await readLoraRun(name);
  } else {
    data = await captionedImages(msg.images ?? [], msg.zip, msg.caption);
    data.base = new URL(msg.model ?? './builtin/emoji/', self.location.href).href;
    await startLoraRun(name, data.base, data.images, data.captions);
  }
  postEvent(id, { type: 'status', message: `${data.images.size} images` });
  // In name order (as ldm train-lora reads a folder): the data order depends on it.
  const decoded = [];
  for (const key of [...data.images.keys()].sort()) decoded.push({ name: key, caption: data.captions[key] ?? '', image: await decodeImage(data.images.get(key), `training image ${key}`) });
  const resume = msg.resume ? await readRunFiles(name, ['training/']) : null;
  const model = await folderEntry(id, data.base, jobCounter(id), 'model');
  return savingCheckpoints(id, name, (onEvent) => ldm.train_lora(model.url, model.store, decoded, JSON.stringify(msg.settings ?? {}), resume, onEvent));
}

async function handle(id, msg) {
  const initError = await ready;
  if (initError !== null) throw new Error(initError);
  // The kernel suite and benchmarks open their own devices; every other job uses the engine's.
  if (!['test', 'bench', 'models', 'delete-model', 'runs', 'delete-run', 'run-files'].includes(msg.cmd)) ldm.set_device((await chooseDevice(msg.device ?? 'auto')) === 'cpu');
  switch (msg.cmd) {
    case 'test':
      return { json: await ldm.run_kernel_tests(msg.filter ?? '', msg.device === 'cpu') };
    case 'bench':
      return { json: await ldm.bench_kernels(msg.which ?? 'small', msg.device === 'cpu') };
    case 'adapter':
      // The device in use, and why auto chose it (the page explains a missing GPU).
      return { json: JSON.stringify({ ...JSON.parse(await ldm.adapter_info()), device_reason: lastReason }) };
    case 'generate':
      return generate(id, msg);
    case 'preprocess': {
      // The depth estimator is fetched, cached and listed like a model.
      const est = msg.estimator ? await folderEntry(id, msg.estimator, jobCounter(id), 'depth-estimator') : undefined;
      return { png: await ldm.preprocess_condition(msg.image, msg.kind, JSON.stringify(msg.options ?? {}), est?.url, est?.store) };
    }
    case 'bench-generate':
      return withModel(id, msg, async (loc, store, bpe) => ({ json: await ldm.bench_generate(loc.base, store, loc.file ?? undefined, bpe, JSON.stringify(msg.params ?? {})) }));
    case 'bench-unet': {
      // model 'sd15' / 'sdxl': Stable Diffusion 1.5's / SDXL's architecture with random weights (nothing to fetch).
      const inputsBase = msg.inputs ? new URL(msg.inputs, self.location.href).href : undefined;
      const inputs = inputsBase ? new WeightStore(inputsBase, { signal: current.abort.signal }) : undefined;
      if (!msg.model || msg.model === 'sd15' || msg.model === 'sdxl') {
        const options = JSON.stringify({ ...(msg.options ?? {}), architecture: msg.model || 'sd15' });
        return { json: await ldm.bench_unet(undefined, undefined, inputsBase, inputs, options) };
      }
      const options = JSON.stringify(msg.options ?? {});
      return withModel(id, msg, async (loc, store) => ({ json: await ldm.bench_unet(loc.base, store, inputsBase, inputs, options) }));
    }
    case 'bench-depth': {
      // A published architecture's name (random weights, nothing to fetch) or an estimator folder's URL.
      if (!/[/:]/.test(msg.model ?? '')) return { json: await ldm.bench_depth(undefined, undefined, JSON.stringify({ ...(msg.options ?? {}), ...(msg.model ? { architecture: msg.model } : {}) })) };
      const est = await folderEntry(id, msg.model, jobCounter(id), 'depth-estimator');
      return { json: await ldm.bench_depth(est.url, est.store, JSON.stringify(msg.options ?? {})) };
    }
    case 'models':
      return { json: JSON.stringify(await listCachedModels()) };
    case 'train':
      return train(id, msg);
    case 'train-lora':
      return trainLora(id, msg);
    case 'bench-train': {
      // ldm bench train: synthetic pairs, the autoencoder of `model` (default: the built-in model's).
      const ae = await folderEntry(id, msg.model ?? new URL('./builtin/emoji/', self.location.href).href, jobCounter(id), 'autoencoder');
      return { json: await ldm.bench_train(ae.url, ae.store, JSON.stringify(msg.options ?? {})) };
    }
    case 'runs':
      return { json: JSON.stringify(await listRuns()) };
    case 'delete-run':
      return { json: JSON.stringify({ deleted: await deleteRun(msg.run) }) };
    case 'run-files': {
      // The model folder of a run, or a LoRA run's LoRA (not the training state or data), for download.
      const files = await readRunFiles(msg.run, ['model_index.json', 'unet/', 'vqvae/', 'scheduler/', 'ldm-web.json', 'pytorch_lora_weights.safetensors']);
      return { files: Object.entries(files) };
    }
    case 'delete-model':
      return { json: JSON.stringify({ deleted: await deleteCachedModel(msg.url) }) };
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

async function runJob(id, msg) {
  current = { id, abort: new AbortController() };
  try {
    const out = await handle(id, msg);
    if (out.json !== undefined) {
      const report = JSON.parse(out.json);
      if (report && report.adapter && report.adapter.backend !== 'Cpu') report.adapter.browser = await browserAdapterInfo();
      out.json = JSON.stringify(report);
    }
    self.postMessage({ id, ok: true, ...out }, out.png ? [out.png.buffer] : []);
  } catch (e) {
    // A wasm trap (a Rust panic) leaves the module unusable: the client starts a new worker.
    const fatal = e instanceof WebAssembly.RuntimeError;
    const kind = e?.kind ?? (e?.name === 'AbortError' ? 'cancelled' : fatal ? 'panic' : 'error');
    self.postMessage({ id, ok: false, error: errorText(e), kind, fatal });
  } finally {
    current = null;
  }
}

self.addEventListener('message', (ev) => {
  const msg = ev.data ?? {};
  const id = msg.id ?? null;
  if (msg.cmd === 'cancel') {
    ldm?.cancel();
    current?.abort.abort(abortError());
    return;
  }
  if (msg.cmd === 'simulate-device-loss') {
    ldm?.simulate_device_loss();
    return;
  }
  if (msg.cmd === 'simulate-out-of-memory') {
    ldm?.simulate_out_of_memory();
    return;
  }
  queue = queue.then(() => runJob(id, msg));
});
