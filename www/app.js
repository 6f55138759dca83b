// The ldm-web page: settings form (mirrored in the URL, so a link reproduces an image), progress
// and live previews, the result with its PNG download, a gallery in IndexedDB, the models panel,
// and the mask / condition image inputs. All GPU work happens in the engine worker.

import { LdmEngine, webgpuHelp, previewImage } from './ldm-client.js';
import { setupTraining } from './train.js';

const $ = (id) => document.getElementById(id);
const form = $('settings');
const PARAMS = ['model', 'prompt', 'negative_prompt', 'seed', 'steps', 'guidance', 'width', 'height', 'scheduler',
  'prompt_2', 'negative_prompt_2', 'prompt_weighting', 'vae', 'tiny_vae', 'vae_decoder', 'lora_merge'];
// Settings that choose what is loaded with the model rather than how it generates.
const MODEL_EXTRAS = ['vae', 'tiny_vae', 'vae_decoder', 'lora_merge', 'loras', 'embeddings'];
// The emoji model that ships with the app (copied to www/builtin/ by build.sh), used when no
// other model is chosen.
const BUILTIN = new URL('builtin/emoji/', location.href).href;
const NUMERIC = new Set(['seed', 'steps', 'guidance', 'width', 'height']);

// State the browser tests read (window.__ldmApp): results, events with wall-clock times, errors.
const app = { results: [], events: [], errors: [], busy: false, engine: null, gallery: null };
window.__ldmApp = app;
const note = (type, detail = {}) => app.events.push({ type, t: Date.now(), ...detail });

// Whatever the Content-Security-Policy (_headers) blocks is named in the console and in the
// events, so a deployment that tightens it sees what broke.
document.addEventListener('securitypolicyviolation', (e) => {
  note('csp-violation', { directive: e.effectiveDirective, blocked: e.blockedURI || '(inline)' });
  console.warn(`ldm-web: the Content-Security-Policy's ${e.effectiveDirective} blocked ${e.blockedURI || 'inline code'}`);
});

function setStatus(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

// ---- settings <-> URL ------------------------------------------------------------------------------

// LoRA and embedding rows: [{url, scale}] and [{url, token}].
function addLora(l = {}) {
  const row = $('lora-row').content.firstElementChild.cloneNode(true);
  const scale = row.querySelector('.lora-scale');
  const text = row.querySelector('.lora-scale-text');
  row.querySelector('.lora-url').value = l.url ?? '';
  scale.value = String(l.scale ?? 1);
  const show = () => { text.textContent = Number(scale.value).toFixed(2); };
  scale.addEventListener('input', show);
  show();
  row.querySelector('.remove').addEventListener('click', () => row.remove());
  $('lora-list').append(row);
  return row;
}

function addEmbedding(e = {}) {
  const row = $('embedding-row').content.firstElementChild.cloneNode(true);
  row.querySelector('.embedding-url').value = e.url ?? '';
  row.querySelector('.embedding-token').value = e.token ?? '';
  row.querySelector('.remove').addEventListener('click', () => row.remove());
  $('embedding-list').append(row);
  return row;
}

function readRows() {
  const loras = [...$('lora-list').children].map((r) => ({ url: r.querySelector('.lora-url').value.trim(), scale: Number(r.querySelector('.lora-scale').value) })).filter((l) => l.url);
  const embeddings = [...$('embedding-list').children].map((r) => ({ url: r.querySelector('.embedding-url').value.trim(), token: r.querySelector('.embedding-token').value.trim() })).filter((e) => e.url);
  return { loras, embeddings };
}

function readForm() {
  const fd = new FormData(form);
  const p = {};
  for (const k of PARAMS) {
    const v = String(fd.get(k) ?? '').trim();
    if (v !== '') p[k] = NUMERIC.has(k) ? Number(v) : v;
  }
  p.precision = String(fd.get('precision') ?? 'auto');
  const { loras, embeddings } = readRows();
  if (loras.length) p.loras = loras;
  if (embeddings.length) p.embeddings = embeddings;
  return p;
}

function fillForm(p) {
  for (const k of [...PARAMS, 'precision']) {
    const el = form.elements[k];
    if (!el) continue;
    if (el.type === 'checkbox') el.checked = p[k] !== undefined && p[k] !== '' && p[k] !== '0' && p[k] !== 'none';
    else if (p[k] !== undefined) el.value = p[k];
  }
  $('lora-list').replaceChildren();
  $('embedding-list').replaceChildren();
  (p.loras ?? []).forEach(addLora);
  (p.embeddings ?? []).forEach(addEmbedding);
  if (MODEL_EXTRAS.some((k) => p[k] !== undefined) || p.prompt_2 || p.negative_prompt_2 || p.prompt_weighting) $('extras').open = true;
}

// A LoRA as `URL:SCALE` and an embedding as `URL:TOKEN` in links, as ldm generate's --lora and
// --embedding take them; a URL's own colons (https:, a port) are never followed by a number or a
// word alone.
function splitSuffix(s, accept) {
  const i = s.lastIndexOf(':');
  if (i > 0 && accept(s.slice(i + 1))) return [s.slice(0, i), s.slice(i + 1)];
  return [s, undefined];
}

// Share links carry the settings in the fragment (#model=…&prompt=…), which browsers never send
// to the app's server: model URLs and prompts reach only the hosts they name.
function shareUrl(p) {
  const u = new URL(location.pathname, location.href);
  const q = new URLSearchParams();
  for (const k of PARAMS) if (p[k] !== undefined && p[k] !== '') q.set(k, String(p[k]));
  for (const l of p.loras ?? []) q.append('lora', `${l.url}:${l.scale}`);
  for (const e of p.embeddings ?? []) q.append('embedding', e.token ? `${e.url}:${e.token}` : e.url);
  u.hash = q.toString();
  return u.href;
}

// The link's settings: from the fragment, or from the query string of older links.
function linkParams() {
  return new URLSearchParams(location.hash.length > 1 ? location.hash.slice(1) : location.search);
}

function fromUrl() {
  const q = linkParams();
  const p = {};
  for (const k of PARAMS) if (q.has(k)) p[k] = q.get(k);
  const loras = q.getAll('lora').map((v) => {
    const [url, scale] = splitSuffix(v, (x) => x !== '' && Number.isFinite(Number(x)));
    return { url, scale: scale === undefined ? 1 : Number(scale) };
  });
  const embeddings = q.getAll('embedding').map((v) => {
    const [url, token] = splitSuffix(v, (x) => /^[^/\\.\s]+$/.test(x));
    return { url, token: token ?? '' };
  });
  if (loras.length) p.loras = loras;
  if (embeddings.length) p.embeddings = embeddings;
  return p;
}

// What is loaded with the model, for the engine (URLs, scales, tokens).
function modelExtras(p) {
  const out = {};
  if (p.loras) out.loras = p.loras;
  if (p.lora_merge) out.lora_merge = true;
  if (p.embeddings) out.embeddings = p.embeddings;
  if (p.vae) out.vae = p.vae;
  if (p.tiny_vae) out.tiny_vae = p.tiny_vae;
  if (p.vae_decoder === 'tiny') {
    if (!p.tiny_vae) throw new Error('The tiny decoder needs the tiny autoencoder\'s URL (a TAESD folder).');
    out.tiny_decode = true;
  }
  return out;
}

// ---- gallery (IndexedDB) ---------------------------------------------------------------------------

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('ldm-web', 1);
    req.onupgradeneeded = () => req.result.createObjectStore('images', { keyPath: 'id', autoIncrement: true });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function tx(db, mode, fn) {
  return new Promise((resolve, reject) => {
    const t = db.transaction('images', mode);
    const out = fn(t.objectStore('images'));
    t.oncomplete = () => resolve(out?.result ?? out);
    t.onerror = () => reject(t.error);
    t.onabort = () => reject(t.error ?? new Error('IndexedDB transaction aborted (storage full?)'));
  });
}

async function galleryAdd(entry) {
  const db = await openDb();
  return tx(db, 'readwrite', (s) => s.add(entry));
}

async function galleryAll() {
  const db = await openDb();
  return tx(db, 'readonly', (s) => s.getAll());
}

async function galleryDelete(id) {
  const db = await openDb();
  return tx(db, 'readwrite', (s) => s.delete(id));
}

const thumbUrls = [];
async function renderGallery() {
  let items;
  try {
    items = await galleryAll();
  } catch (e) {
    $('gallery').textContent = `The gallery is unavailable: ${e.message}`;
    return;
  }
  app.gallery = items.map((i) => ({ id: i.id, params: i.params, created: i.created }));
  thumbUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
  const g = $('gallery');
  g.replaceChildren();
  if (items.length === 0) g.textContent = 'Generated images appear here and stay across visits.';
  for (const item of items.reverse()) {
    const fig = document.createElement('figure');
    const img = document.createElement('img');
    const url = URL.createObjectURL(item.blob);
    thumbUrls.push(url);
    img.src = url;
    img.alt = item.params.prompt ?? '';
    img.title = `${item.params.prompt ?? ''}\nseed ${item.params.seed}, ${item.params.steps} steps`;
    img.addEventListener('click', () => {
      fillForm(item.params);
      showResult(item.blob, item.params, item.info);
    });
    const cap = document.createElement('figcaption');
    const span = document.createElement('span');
    span.textContent = item.params.prompt || '(no prompt)';
    const del = document.createElement('button');
    del.textContent = '✕';
    del.title = 'Delete from the gallery';
    del.addEventListener('click', async () => {
      await galleryDelete(item.id);
      renderGallery();
    });
    cap.append(span, del);
    fig.append(img, cap);
    g.append(fig);
  }
}

// ---- output ----------------------------------------------------------------------------------------

let resultUrl = null;
function showResult(blob, params, info) {
  if (resultUrl) URL.revokeObjectURL(resultUrl);
  resultUrl = URL.createObjectURL(blob);
  $('result').src = resultUrl;
  $('result').hidden = false;
  $('preview').hidden = true;
  const a = $('download');
  a.href = resultUrl;
  a.download = `ldm-${params.seed ?? 0}-${(params.prompt ?? '').replace(/[^a-z0-9]+/gi, '-').slice(0, 40) || 'image'}.png`;
  a.hidden = false;
  if (info) {
    const steps = info.unet_steps_ms ?? [];
    const mean = steps.length ? steps.reduce((x, y) => x + y, 0) / steps.length : 0;
    $('info').textContent = `${info.model}: ${info.width}x${info.height}, ${info.steps} steps, ${info.scheduler}, ${info.precision}\n` +
      `load ${(info.load_ms / 1000).toFixed(1)} s, text encoder ${info.text_encoder_ms.toFixed(0)} ms, UNet ${mean.toFixed(0)} ms/step, ` +
      `VAE decode ${info.vae_decode_ms.toFixed(0)} ms, total ${(info.total_ms / 1000).toFixed(1)} s, peak GPU ${(info.peak_gpu_bytes / 2 ** 20).toFixed(0)} MiB`;
  }
}

function drawPreview(ev) {
  const c = $('preview');
  const img = previewImage(ev);
  c.width = img.width;
  c.height = img.height;
  c.getContext('2d').putImageData(img, 0, 0);
  c.hidden = false;
  $('result').hidden = true;
}

// ---- generation ------------------------------------------------------------------------------------

const mb = (b) => (b / 2 ** 20).toFixed(1);

async function generate() {
  if (app.busy) return;
  const p = readForm();
  if (!p.model) {
    setStatus('Enter a model URL first (a diffusers folder or a .safetensors file).', true);
    return;
  }
  history.replaceState(null, '', shareUrl(p));
  $('share-link').value = location.href;
  let images;
  try {
    images = await pageImages();
    const extras = modelExtras(p);
    if (Object.keys(extras).length) images = { ...(images ?? {}), ...extras };
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  const conditioning = pipelineSettings();
  app.busy = true;
  $('generate').disabled = true;
  $('cancel').disabled = false;
  $('download-bar').value = 0;
  $('download-text').textContent = '';
  $('step-bar').value = 0;
  $('step-text').textContent = '';
  setStatus('Starting…');
  note('start', { params: p });
  navigator.storage?.persist?.().catch(() => {});
  const params = { ...p, ...conditioning, preview_every: 2 };
  for (const k of ['model', ...MODEL_EXTRAS]) delete params[k];
  note('inputs', { images: Object.keys(images ?? {}), digests: await imageDigests(images), conditioning, loras: p.loras ?? [], embeddings: p.embeddings ?? [] });
  try {
    const { blob, info } = await app.engine.generate(p.model, params, (ev) => {
      if (ev.type === 'download') {
        $('download-bar').max = Math.max(ev.total, ev.fetched, 1);
        $('download-bar').value = ev.fetched;
        $('download-text').textContent = `${mb(ev.fetched)} / ${mb(ev.total)} MB`;
        note('download', { fetched: ev.fetched, total: ev.total });
      } else if (ev.type === 'stage') {
        note('stage', { stage: ev.stage, worker_t: ev.t });
        setStatus({ load: 'Loading the model…', denoise: 'Denoising…', vae: 'Fetching the VAE…', decode: 'Decoding…' }[ev.stage] ?? ev.stage);
      } else if (ev.type === 'step') {
        note('step', { step: ev.step, steps: ev.steps, worker_t: ev.t });
        $('step-bar').max = ev.steps;
        $('step-bar').value = ev.step;
        $('step-text').textContent = `${ev.step} / ${ev.steps} (${(ev.ms / 1000).toFixed(2)} s)`;
      } else if (ev.type === 'preview') {
        note('preview', { step: ev.step, decoder: ev.decoder ?? 'latent', width: ev.width, height: ev.height });
        drawPreview(ev);
      } else if (ev.type === 'status') {
        note('status', { message: ev.message });
        setStatus(ev.message);
      }
    }, images);
    const entry = { params: p, info, blob, created: Date.now() };
    app.results.push(entry);
    note('done', { info });
    showResult(blob, p, info);
    setStatus(`Done in ${(info.total_ms / 1000).toFixed(1)} s.`);
    try {
      await galleryAdd(entry);
    } catch (e) {
      setStatus(`Done, but the gallery could not keep it: ${e.message}`, true);
    }
    renderGallery();
    refreshModels();
  } catch (e) {
    note('error', { kind: e.kind, message: e.message });
    app.errors.push({ kind: e.kind, message: e.message });
    if (e.kind === 'cancelled') setStatus('Cancelled.');
    else if (e.kind === 'out-of-memory') setStatus(`${e.message}\nThe GPU memory was released; try a smaller size.`, true);
    else setStatus(e.message, true);
  } finally {
    app.busy = false;
    $('generate').disabled = false;
    $('cancel').disabled = true;
  }
}

// ---- models panel ----------------------------------------------------------------------------------

async function refreshModels() {
  const list = $('model-list');
  let models;
  try {
    models = await app.engine.models();
  } catch (e) {
    list.textContent = `Cannot read the cache: ${e.message}`;
    return;
  }
  app.models = models;
  list.replaceChildren();
  $('cached-models').replaceChildren(...models.filter((m) => !m.kind).map((m) => Object.assign(document.createElement('option'), { value: m.url })));
  if (models.length === 0) list.append(Object.assign(document.createElement('li'), { textContent: 'None yet: a model is stored here the first time it is used.' }));
  for (const m of models) {
    const li = document.createElement('li');
    const kind = { lora: 'LoRA', embedding: 'embedding', vae: 'VAE', 'tiny-vae': 'tiny autoencoder', controlnet: 'ControlNet', 'depth-estimator': 'depth estimator' }[m.kind];
    const q = m.quantisation;
    const weights = q?.recipe ? `, weights ${q.recipe.replace(/[;,]/g, ', ')}${q.bits_per_weight?.unet ? ` (UNet ${q.bits_per_weight.unet} bits per weight)` : ''}` : '';
    li.textContent = `${kind ? `${kind}: ` : ''}${m.url} — ${mb(m.bytes)} MB in ${m.files} files${weights} `;
    const use = Object.assign(document.createElement('button'), { type: 'button', textContent: 'use' });
    use.addEventListener('click', () => {
      $('extras').open = m.kind && !['controlnet', 'depth-estimator'].includes(m.kind);
      if (m.kind === 'lora') addLora({ url: m.url });
      else if (m.kind === 'embedding') addEmbedding({ url: m.url });
      else if (m.kind === 'vae') form.elements.vae.value = m.url;
      else if (m.kind === 'tiny-vae') form.elements.tiny_vae.value = m.url;
      else if (m.kind === 'controlnet') $('controlnet-url').value = m.url;
      else if (m.kind === 'depth-estimator') $('depth-estimator-url').value = m.url;
      else form.elements.model.value = m.url;
    });
    const del = Object.assign(document.createElement('button'), { type: 'button', textContent: 'delete' });
    del.addEventListener('click', async () => {
      await app.engine.deleteModel(m.url);
      refreshModels();
    });
    li.append(use, del);
    list.append(li);
  }
  if (navigator.storage?.estimate) {
    const est = await navigator.storage.estimate();
    const persisted = navigator.storage.persisted ? await navigator.storage.persisted() : false;
    $('storage-info').textContent = `This site uses ${mb(est.usage ?? 0)} MB of ${mb(est.quota ?? 0)} MB allowed; storage is ${persisted ? 'persistent' : 'best-effort (the browser may evict it when space is short)'}.`;
  }
}

// ---- mask painter and condition inputs -------------------------------------------------------------

// A file's bytes as PNG: PNG files as they are (16-bit depth maps keep their precision), other
// formats decoded by the browser and re-encoded losslessly.
async function pngBytes(file) {
  if (file.type === 'image/png') return new Uint8Array(await file.arrayBuffer());
  let bmp;
  try {
    bmp = await createImageBitmap(file);
  } catch {
    throw new Error(`${file.name} is not an image this browser can read (PNG, JPEG, WebP).`);
  }
  const c = new OffscreenCanvas(bmp.width, bmp.height);
  c.getContext('2d').drawImage(bmp, 0, 0);
  return new Uint8Array(await (await c.convertToBlob({ type: 'image/png' })).arrayBuffer());
}

// The painted mask as a PNG: white where painted (its coverage as gray on antialiased edges),
// black elsewhere, at the init image's size.
async function maskPng() {
  const canvas = $('mask-canvas');
  const out = new OffscreenCanvas(canvas.width, canvas.height);
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return new Uint8Array(await (await out.convertToBlob({ type: 'image/png' })).arrayBuffer());
}
window.__ldmMaskPng = maskPng;

// The sha256 (hex) of each image sent to the engine, so a test can tell which bytes were used.
async function imageDigests(images) {
  const hex = async (bytes) => [...new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))].map((b) => b.toString(16).padStart(2, '0')).join('');
  const out = {};
  for (const k of ['init', 'mask', 'depth']) if (images?.[k]) out[k] = await hex(images[k]);
  if (images?.controls) out.controls = await Promise.all(images.controls.map((c) => hex(c.image)));
  return out;
}

// The images the chosen pipeline uses; `undefined` when none.
async function pageImages() {
  const pipeline = $('pipeline').value;
  if (pipeline === 'txt2img') return undefined;
  const init = $('init-file').files[0];
  const cond = await conditionPng();
  const url = $('controlnet-url').value.trim();
  const images = {};
  if (init) images.init = await pngBytes(init);
  if (init && maskPainted && (pipeline === 'auto' || pipeline === 'inpaint')) images.mask = await maskPng();
  const toControl = url && (pipeline === 'auto' || pipeline === 'controlnet');
  if (cond && toControl) images.controls = [{ url, image: cond, scale: Number($('controlnet-scale').value || 1) }];
  else if (cond && (pipeline === 'auto' || pipeline === 'depth')) images.depth = cond;
  const need = { img2img: init, inpaint: init && maskPainted, depth: init && cond, controlnet: cond && url, upscale: init }[pipeline];
  if (pipeline !== 'auto' && !need) {
    throw new Error({ img2img: 'Image-to-image needs an init image.', inpaint: 'Inpainting needs an init image and a painted or uploaded mask.', depth: 'Depth-to-image needs an init image and a depth map.', controlnet: 'ControlNet needs its URL and a condition image.', upscale: 'Upscaling needs the low-resolution image as the init image.' }[pipeline]);
  }
  return Object.keys(images).length ? images : undefined;
}

// Strength, mask blur, noise level and guess mode, for the pipelines that use them.
function pipelineSettings() {
  const num = (id) => ($(id).value.trim() === '' ? undefined : Number($(id).value));
  const out = {};
  const pipeline = $('pipeline').value;
  if (pipeline === 'txt2img') return out;
  if ($('init-file').files.length && pipeline !== 'upscale' && num('strength') !== undefined) out.strength = num('strength');
  if (maskPainted && num('mask-blur')) out.mask_blur = num('mask-blur');
  if (num('noise-level') !== undefined && (pipeline === 'auto' || pipeline === 'upscale')) out.noise_level = num('noise-level');
  if ($('guess-mode').checked && $('controlnet-url').value.trim()) out.guess_mode = true;
  return out;
}

// ---- the condition image: made from the photo or uploaded, then edited -----------------------------

// The condition as given (PNG bytes of the made or uploaded image), its pixels (an ImageBitmap) and
// whether it was painted on. Unedited, the given bytes go to the engine as they are, so a 16-bit
// depth map keeps its precision; edited, the picture with the edits on top goes as an 8-bit PNG.
const condition = { png: null, bitmap: null, edited: false };

// Shows `png` (bytes) as the condition to edit, dropping earlier edits.
async function setCondition(png) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(new Blob([png], { type: 'image/png' }), { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch {
    throw new Error('the condition image is not an image this browser can read (PNG, JPEG, WebP)');
  }
  Object.assign(condition, { png, bitmap, edited: false });
  app.conditionEdited = false;
  const canvas = $('cond-canvas');
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  $('cond-stage').style.aspectRatio = `${bitmap.width} / ${bitmap.height}`;
  const old = $('cond-preview').src;
  $('cond-preview').src = URL.createObjectURL(new Blob([png], { type: 'image/png' }));
  if (old.startsWith('blob:')) URL.revokeObjectURL(old);
  $('cond-figure').hidden = false;
  $('cond-download').href = $('cond-preview').src;
}

// The condition with its edits as PNG bytes; null when there is none.
async function conditionPng() {
  if (!condition.png) return null;
  if (!condition.edited) return condition.png;
  const out = new OffscreenCanvas(condition.bitmap.width, condition.bitmap.height);
  const ctx = out.getContext('2d');
  ctx.drawImage(condition.bitmap, 0, 0);
  ctx.drawImage($('cond-canvas'), 0, 0);
  return new Uint8Array(await (await out.convertToBlob({ type: 'image/png' })).arrayBuffer());
}
window.__ldmConditionPng = conditionPng;

async function makeCondition() {
  const photo = $('init-file').files[0];
  if (!photo) return setStatus('Choose the photo as the init image first.', true);
  const kind = $('cond-from').value;
  const estimator = $('depth-estimator-url').value.trim();
  if (kind === 'depth' && !estimator) return setStatus('Depth needs the URL of a depth estimator folder (Depth Anything V2, DPT).', true);
  setStatus(kind === 'depth' ? 'Estimating depth…' : 'Finding edges…');
  try {
    const png = await app.engine.preprocess(await pngBytes(photo), kind, { low: Number($('canny-low').value), high: Number($('canny-high').value) }, kind === 'depth' ? estimator : undefined, (ev) => {
      if (ev.type === 'download') setStatus(`Depth estimator: ${mb(ev.fetched)} / ${mb(ev.total)} MB`);
    });
    await setCondition(png);
    window.__ldmMadeCondition = png;
    setStatus(kind === 'depth' ? 'Depth map made from the photo: it is the condition now (paint on it to edit).' : 'Edges made from the photo: they are the condition now (paint on it to edit).');
    refreshModels();
  } catch (e) {
    setStatus(`Could not make the condition: ${e.message ?? e}`, true);
  }
}

// Painting on the condition: square stamps of whole pixels in one colour (no antialiasing, so an
// edge map stays black and white and a depth map gets exactly the level picked), restoring the
// given image under the brush, or picking a colour from what is shown.
function setupConditionEditor() {
  const canvas = $('cond-canvas');
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const mode = () => document.querySelector('input[name=cond-mode]:checked')?.value ?? 'paint';
  const pos = (e) => {
    const r = canvas.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * canvas.width, ((e.clientY - r.top) / r.height) * canvas.height];
  };
  const stamp = ([x, y]) => {
    const size = Number($('cond-brush').value);
    const [left, top] = [Math.round(x - size / 2), Math.round(y - size / 2)];
    if (mode() === 'restore') ctx.clearRect(left, top, size, size);
    else ctx.fillRect(left, top, size, size);
  };
  const stroke = (a, b) => {
    ctx.fillStyle = $('cond-color').value;
    const n = Math.max(1, Math.ceil(Math.max(Math.abs(b[0] - a[0]), Math.abs(b[1] - a[1]))));
    for (let i = 0; i <= n; i++) stamp([a[0] + ((b[0] - a[0]) * i) / n, a[1] + ((b[1] - a[1]) * i) / n]);
    condition.edited = true;
    app.conditionEdited = true;
  };
  const pick = ([x, y]) => {
    const t = new OffscreenCanvas(1, 1).getContext('2d');
    t.drawImage(condition.bitmap, -Math.floor(x), -Math.floor(y));
    t.drawImage(canvas, -Math.floor(x), -Math.floor(y));
    const [r, g, b] = t.getImageData(0, 0, 1, 1).data;
    $('cond-color').value = `#${[r, g, b].map((v) => v.toString(16).padStart(2, '0')).join('')}`;
  };
  let last = null;
  canvas.addEventListener('pointerdown', (e) => {
    if (!condition.bitmap) return;
    if (mode() === 'pick') return pick(pos(e));
    last = pos(e);
    stroke(last, last);
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener('pointermove', (e) => {
    if (!last) return;
    const p = pos(e);
    stroke(last, p);
    last = p;
  });
  const end = async () => {
    if (!last) return;
    last = null;
    const old = $('cond-download').href;
    $('cond-download').href = URL.createObjectURL(new Blob([await conditionPng()], { type: 'image/png' }));
    if (old.startsWith('blob:') && old !== $('cond-preview').src) URL.revokeObjectURL(old);
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  $('cond-reset').addEventListener('click', () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    condition.edited = false;
    app.conditionEdited = false;
    $('cond-download').href = $('cond-preview').src;
  });
  $('cond-file').addEventListener('change', async (e) => {
    const f = e.target.files[0];
    if (!f) return;
    try {
      await setCondition(await pngBytes(f));
    } catch (err) {
      setStatus(`${f.name}: ${err.message ?? err}`, true);
    }
  });
  $('cond-make').addEventListener('click', makeCondition);
}

let maskPainted = false;
function setupMask() {
  const canvas = $('mask-canvas');
  const ctx = canvas.getContext('2d');
  let drawing = false;
  let last = null;
  const pos = (e) => {
    const r = canvas.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * canvas.width, ((e.clientY - r.top) / r.height) * canvas.height];
  };
  const stroke = (a, b) => {
    const erase = form.ownerDocument.querySelector('input[name=mask-mode]:checked')?.value === 'erase';
    ctx.globalCompositeOperation = erase ? 'destination-out' : 'source-over';
    ctx.strokeStyle = '#fff';
    ctx.lineCap = 'round';
    ctx.lineWidth = Number($('brush').value) * (canvas.width / canvas.getBoundingClientRect().width || 1);
    ctx.beginPath();
    ctx.moveTo(...a);
    ctx.lineTo(...b);
    ctx.stroke();
    maskPainted = true;
    app.maskPainted = true;
  };
  canvas.addEventListener('pointerdown', (e) => { drawing = true; last = pos(e); stroke(last, last); canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener('pointermove', (e) => { if (drawing) { const p = pos(e); stroke(last, p); last = p; } });
  canvas.addEventListener('pointerup', () => { drawing = false; });
  $('mask-clear').addEventListener('click', () => { ctx.clearRect(0, 0, canvas.width, canvas.height); maskPainted = false; });
  $('mask-invert').addEventListener('click', () => {
    const img = ctx.getImageData(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < img.data.length; i += 4) {
      const on = img.data[i + 3] > 127;
      img.data.set(on ? [0, 0, 0, 0] : [255, 255, 255, 255], i);
    }
    ctx.globalCompositeOperation = 'source-over';
    ctx.putImageData(img, 0, 0);
    maskPainted = true;
  });
  const loadImage = async (file) => {
    try {
      return await createImageBitmap(file);
    } catch {
      setStatus(`${file.name} is not an image this browser can read.`, true);
      return null;
    }
  };
  $('mask-file').addEventListener('change', async (e) => {
    const f = e.target.files[0];
    const bmp = f && (await loadImage(f));
    if (!bmp) return;
    // White = repaint, whatever the upload's mode: luminance becomes the mask's alpha.
    const tmp = new OffscreenCanvas(canvas.width, canvas.height);
    const t = tmp.getContext('2d');
    t.drawImage(bmp, 0, 0, canvas.width, canvas.height);
    const img = t.getImageData(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < img.data.length; i += 4) {
      const l = 0.299 * img.data[i] + 0.587 * img.data[i + 1] + 0.114 * img.data[i + 2];
      img.data.set([255, 255, 255, l], i);
    }
    ctx.putImageData(img, 0, 0);
    maskPainted = true;
  });
  $('init-file').addEventListener('change', async (e) => {
    const f = e.target.files[0];
    const bmp = f && (await loadImage(f));
    if (!bmp) return;
    $('init-preview').src = URL.createObjectURL(f);
    canvas.width = bmp.width;
    canvas.height = bmp.height;
    $('mask-stage').style.aspectRatio = `${bmp.width} / ${bmp.height}`;
    maskPainted = false;
  });
}

// ---- the built-in model: its settings and example prompts (ldm-web.json) ---------------------------

async function builtinHints() {
  try {
    const res = await fetch(new URL('ldm-web.json', BUILTIN));
    return res.ok ? await res.json() : {};
  } catch {
    return {};
  }
}

function showExamples(hints, given) {
  const box = $('examples');
  for (const prompt of hints.example_prompts ?? []) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = prompt;
    b.addEventListener('click', () => {
      form.elements.model.value = BUILTIN;
      form.elements.prompt.value = prompt;
      if (hints.steps) form.elements.steps.value = hints.steps;
      if (hints.guidance) form.elements.guidance.value = hints.guidance;
      generate();
    });
    box.append(b);
  }
  box.hidden = !(hints.example_prompts ?? []).length;
  // The built-in model's own settings, unless the link says otherwise.
  if (!given.model || given.model === BUILTIN) {
    if (!given.steps && hints.steps) form.elements.steps.value = hints.steps;
    if (!given.guidance && hints.guidance) form.elements.guidance.value = hints.guidance;
  }
}

// ---- start-up --------------------------------------------------------------------------------------

function showOnline() {
  $('online-status').textContent = navigator.onLine ? '' : 'offline: using stored models';
}

async function main() {
  $('widget-url').textContent = new URL('ldm-image.js', location.href).href;
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('./sw.js').then(
      () => note('service-worker'),
      (e) => console.warn(`offline support unavailable: ${e.message}`),
    );
  }
  addEventListener('online', showOnline);
  addEventListener('offline', showOnline);
  showOnline();
  setupMask();
  setupConditionEditor();
  renderGallery();
  const fromLink = fromUrl();
  fillForm(fromLink);
  if (!form.elements.model.value) form.elements.model.value = BUILTIN;
  $('use-builtin').addEventListener('click', () => { form.elements.model.value = BUILTIN; });
  $('add-lora').addEventListener('click', () => addLora().querySelector('.lora-url').focus());
  $('add-embedding').addEventListener('click', () => addEmbedding().querySelector('.embedding-url').focus());
  const hints = await builtinHints();
  app.hints = hints;
  showExamples(hints, fromLink);
  $('randomise').addEventListener('click', () => { form.elements.seed.value = Math.floor(Math.random() * 2 ** 32); });
  $('share').addEventListener('click', async () => {
    const link = shareUrl(readForm());
    $('share-link').value = link;
    $('share-link').hidden = false;
    $('share-link').select();
    try { await navigator.clipboard.writeText(link); setStatus('Share link copied.'); } catch { setStatus('Share link below: copy it.'); }
  });

  // Another share link pasted over this one changes only the fragment: load it as a link.
  window.addEventListener('hashchange', () => location.reload());

  // Where to compute: the Device setting (kept in this browser), or ?device= for this visit.
  const linkDevice = linkParams().get('device');
  const device = ['auto', 'gpu', 'cpu'].includes(linkDevice) ? linkDevice : (localStorage.getItem('ldm-device') ?? 'auto');
  $('device').value = device;
  const help = webgpuHelp();
  app.engine = new LdmEngine();
  app.engine.device = device;
  app.engine.onStatus = (t) => setStatus(t, true);
  form.addEventListener('submit', (e) => { e.preventDefault(); generate(); });
  $('cancel').addEventListener('click', () => { app.engine.cancel(); setStatus('Cancelling…'); });
  // What this browser offers, and where jobs run; a Device change takes effect at the next job.
  const showDevice = async () => {
    const d = app.engine.device;
    if (help) {
      $('no-webgpu').textContent = d === 'gpu' ? help : `${help} Until then ldm-web runs on the CPU (slower than a GPU, but it works).`;
      $('no-webgpu').hidden = false;
      note('no-webgpu', { message: help });
    } else {
      $('no-webgpu').hidden = true;
    }
    $('generate').disabled = app.busy || (!!help && d === 'gpu');
    try {
      const a = await app.engine.adapter();
      const b = a.browser ?? {};
      const name = a.name || [b.vendor, b.architecture, b.description].filter(Boolean).join(' ') || (b.isFallbackAdapter ? 'software adapter' : 'unnamed adapter');
      const why = { 'no-adapter': 'no GPU adapter', fallback: 'WebGPU here is a software fallback' }[a.device_reason];
      $('gpu-status').textContent = a.backend === 'Cpu' ? `${name}${why ? ` (${why})` : ''}` : `WebGPU: ${name}${a.shader_f16 ? ', shader-f16' : ', f32 only'}`;
      if (a.device_reason === 'no-adapter') {
        const msg = `This browser has WebGPU but offers no GPU adapter. ${/Linux/.test(navigator.userAgent) ? 'On Linux, start Chromium/Chrome with --enable-unsafe-webgpu; Firefox needs gfx.webgpu.ignore-blocklist in about:config for software adapters.' : 'Update the browser and its GPU driver, or try another browser.'} Until then ldm-web runs on the CPU.`;
        $('no-webgpu').textContent = msg;
        $('no-webgpu').hidden = false;
        note('no-webgpu', { message: msg });
      }
      app.adapter = a;
      return true;
    } catch (e) {
      const msg = /adapter/i.test(e.message)
        ? `This browser has WebGPU but offers no GPU adapter. ${/Linux/.test(navigator.userAgent) ? 'On Linux, start Chromium/Chrome with --enable-unsafe-webgpu; Firefox needs gfx.webgpu.ignore-blocklist in about:config for software adapters.' : 'Update the browser and its GPU driver, or try another browser.'} Choose the CPU device to generate anyway.`
        : `The engine could not start: ${e.message}`;
      $('no-webgpu').textContent = msg;
      $('no-webgpu').hidden = false;
      $('gpu-status').textContent = 'No usable GPU.';
      $('generate').disabled = true;
      note('no-webgpu', { message: msg });
      return false;
    }
  };
  $('device').addEventListener('change', async () => {
    app.engine.device = $('device').value;
    localStorage.setItem('ldm-device', $('device').value);
    await showDevice();
  });
  app.training = setupTraining(app.engine, {
    builtin: BUILTIN,
    // A trained model generates from a condition: the init image of the Generate tab.
    useModel: (url) => {
      form.elements.model.value = url;
      form.elements.guidance.value = '1';
      form.elements.prompt.value = '';
      setStatus('Choose the condition image as the init image, then Generate.');
    },
    // A LoRA trained here: its base model with the LoRA as a LoRA row.
    useLora: (base, url) => {
      form.elements.model.value = base;
      if (![...$('lora-list').children].some((r) => r.querySelector('.lora-url').value === url)) addLora({ url });
      $('lora-list').closest('details')?.setAttribute('open', '');
      setStatus('The LoRA is added below the prompt; write a prompt in its captions\' words, then Generate.');
    },
  });
  if (!(await showDevice())) return;
  refreshModels();
  note('ready');
  if (fromLink.model && fromLink.prompt !== undefined) {
    generate();
  } else if (location.search === '' && location.hash.length <= 1 && hints.example_prompts?.length && !(await galleryAll().catch(() => [])).length) {
    // A first visit: show what the app does right away, with the built-in model.
    form.elements.prompt.value = hints.example_prompts[0];
    note('first-visit');
    generate();
  }
}

main().catch((e) => {
  $('app-error').textContent = `The page failed to start: ${e.message}`;
  $('app-error').hidden = false;
});
