// <ldm-image>: an image generated in the visitor's browser on WebGPU. Embed with
//   <script type="module" src="https://HOST/ldm-image.js"></script>
//   <ldm-image model="https://HOST/models/sd1/" prompt="a red apple" seed="1" steps="20"></ldm-image>
// Attributes: model (default: the built-in emoji model), prompt, negative-prompt, seed, steps, guidance,
// width, height, scheduler, prompt-weighting ("a1111"), lora ("URL:SCALE URL2:SCALE", space-separated,
// the scale 1 when left out), embedding ("URL[:TOKEN] ..."), vae (a VAE folder), tiny-vae (a TAESD
// folder: real-colour previews), init-image (an image URL: image-to-image), control-image (an image URL)
// with controlnet (a ControlNet folder URL), control-scale, control-preprocess ("canny[:LOW,HIGH]" or
// "depth": the condition made from the image), depth-estimator (a Depth Anything / DPT folder URL)
// and device ("auto", "gpu" or "cpu": where it computes; auto takes the GPU unless the browser has
// no WebGPU or only a software fallback adapter).
// It generates when connected and again when an attribute changes, shows its own progress and
// result, and dispatches ldm-progress ({step, steps}), ldm-done ({blob}: the PNG with its
// parameters chunk) and ldm-error ({message}). All widgets on a page share one engine worker.

import { LdmEngine, webgpuHelp, previewImage } from './ldm-client.js';

const ATTRS = ['model', 'prompt', 'negative-prompt', 'seed', 'steps', 'guidance', 'width', 'height', 'scheduler', 'prompt-weighting', 'lora', 'embedding', 'vae', 'tiny-vae',
  'init-image', 'control-image', 'controlnet', 'control-scale', 'control-preprocess', 'depth-estimator', 'device'];
let engine = null;
let chain = Promise.resolve(); // widgets take turns on the one GPU device

const STYLE = `
  :host { display: inline-block; position: relative; width: 256px; aspect-ratio: var(--ldm-aspect, 1); font: 12px/1.4 system-ui, sans-serif; color: #333; }
  [hidden] { display: none !important; }
  .frame { position: absolute; inset: 0; background: #eee; overflow: hidden; }
  img, canvas { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; }
  canvas { image-rendering: pixelated; }
  .bar { position: absolute; left: 0; right: 0; bottom: 0; height: 4px; background: rgba(0,0,0,.15); }
  .bar > div { height: 100%; width: 0; background: #3b6fd8; transition: width .2s; }
  .msg { position: absolute; left: 6px; right: 6px; top: 6px; text-shadow: 0 0 3px #fff; }
  .error { color: #b00020; }
`;

// One constructed style sheet shared by every widget: unlike a <style> element it needs no
// 'unsafe-inline' in an embedding page's Content-Security-Policy.
let sheet = null;
function widgetSheet() {
  if (!sheet) {
    sheet = new CSSStyleSheet();
    sheet.replaceSync(STYLE);
  }
  return sheet;
}

class LdmImage extends HTMLElement {
  static get observedAttributes() {
    return ATTRS;
  }

  constructor() {
    super();
    const root = this.attachShadow({ mode: 'open' });
    root.adoptedStyleSheets = [widgetSheet()];
    root.innerHTML = `<div class="frame" part="frame"><canvas part="preview" hidden></canvas><img part="image" alt="" hidden><div class="msg" part="status"></div><div class="bar"><div></div></div></div>`;
    this.frame = root.querySelector('.frame');
    this.canvas = root.querySelector('canvas');
    this.img = root.querySelector('img');
    this.msg = root.querySelector('.msg');
    this.bar = root.querySelector('.bar > div');
    this.run = 0;
    this.scheduled = false;
  }

  connectedCallback() {
    this.schedule();
  }

  attributeChangedCallback(name, before, after) {
    if (before !== after && this.isConnected) this.schedule();
  }

  disconnectedCallback() {
    this.run++;
  }

  // Attribute changes made together start one generation.
  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      this.generate();
    });
  }

  params() {
    const num = (name) => {
      const v = this.getAttribute(name);
      if (v === null || v === '') return undefined;
      const n = Number(v);
      if (!Number.isFinite(n)) throw new Error(`${name}="${v}" is not a number`);
      return n;
    };
    const p = { prompt: this.getAttribute('prompt') ?? '', preview_every: 1 };
    const neg = this.getAttribute('negative-prompt');
    if (neg) p.negative_prompt = neg;
    for (const [attr, key] of [['seed', 'seed'], ['steps', 'steps'], ['guidance', 'guidance'], ['width', 'width'], ['height', 'height']]) {
      const v = num(attr);
      if (v !== undefined) p[key] = v;
    }
    const s = this.getAttribute('scheduler');
    if (s) p.scheduler = s;
    const w = this.getAttribute('prompt-weighting');
    if (w) p.prompt_weighting = w;
    return p;
  }

  // LoRAs, embeddings and VAEs from the attributes, as the engine takes them (undefined: none).
  extras() {
    const words = (name) => (this.getAttribute(name) ?? '').split(/\s+/).filter(Boolean);
    const suffix = (v, accept) => {
      const i = v.lastIndexOf(':');
      return i > 0 && accept(v.slice(i + 1)) ? [v.slice(0, i), v.slice(i + 1)] : [v, undefined];
    };
    const out = {};
    const loras = words('lora').map((v) => {
      const [url, scale] = suffix(v, (x) => x !== '' && Number.isFinite(Number(x)));
      return { url, scale: scale === undefined ? 1 : Number(scale) };
    });
    const embeddings = words('embedding').map((v) => {
      const [url, token] = suffix(v, (x) => /^[^/\\.]+$/.test(x));
      return { url, token: token ?? '' };
    });
    if (loras.length) out.loras = loras;
    if (embeddings.length) out.embeddings = embeddings;
    for (const [attr, key] of [['vae', 'vae'], ['tiny-vae', 'tiny_vae']]) if (this.getAttribute(attr)) out[key] = this.getAttribute(attr);
    return Object.keys(out).length ? out : undefined;
  }

  // The init and ControlNet images from their URLs as PNG bytes; with control-preprocess, the
  // ControlNet's condition made from its image by the engine (canny edges or a depth map).
  async images(engine) {
    const out = {};
    const png = async (url) => {
      const r = await fetch(new URL(url, document.baseURI));
      if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
      const blob = await r.blob();
      if (blob.type === 'image/png') return new Uint8Array(await blob.arrayBuffer());
      const bmp = await createImageBitmap(blob);
      const c = new OffscreenCanvas(bmp.width, bmp.height);
      c.getContext('2d').drawImage(bmp, 0, 0);
      return new Uint8Array(await (await c.convertToBlob({ type: 'image/png' })).arrayBuffer());
    };
    if (this.getAttribute('init-image')) out.init = await png(this.getAttribute('init-image'));
    const controlImage = this.getAttribute('control-image');
    if (controlImage) {
      const net = this.getAttribute('controlnet');
      if (!net) throw new Error('control-image needs a controlnet attribute (the URL of a ControlNet folder)');
      let image = await png(controlImage);
      const pre = this.getAttribute('control-preprocess');
      if (pre) {
        const [kind, thresholds] = pre.split(':');
        const [low, high] = (thresholds ?? '100,200').split(',').map(Number);
        const estimator = this.getAttribute('depth-estimator');
        if (kind === 'depth' && !estimator) throw new Error('control-preprocess="depth" needs a depth-estimator attribute (a Depth Anything or DPT folder URL)');
        image = await engine.preprocess(image, kind, { low, high }, kind === 'depth' ? new URL(estimator, document.baseURI).href : undefined);
      }
      out.controls = [{ url: new URL(net, document.baseURI).href, image, scale: Number(this.getAttribute('control-scale') ?? 1) }];
    }
    return out;
  }

  status(text, error = false) {
    this.msg.textContent = text;
    this.msg.classList.toggle('error', error);
  }

  async generate() {
    const run = ++this.run;
    const current = () => run === this.run && this.isConnected;
    let params;
    let extras;
    try {
      params = this.params();
      extras = this.extras();
      // Without WebGPU only the CPU can run it (auto chooses it; "gpu" cannot).
      const help = webgpuHelp();
      if (help && this.getAttribute('device') === 'gpu') throw new Error(help);
    } catch (e) {
      this.fail(e.message);
      return;
    }
    const w = params.width ?? 512;
    const h = params.height ?? 512;
    this.style.setProperty('--ldm-aspect', `${w} / ${h}`);
    this.status('waiting…');
    this.bar.style.width = '0';
    const mine = chain.then(async () => {
      if (!current()) return;
      engine ??= new LdmEngine();
      if (engine.busyWith && engine.busyWith !== this) engine.cancel();
      engine.busyWith = this;
      // Widgets take turns on the one engine, each with its own device choice.
      engine.device = this.getAttribute('device') || 'auto';
      this.status('loading…');
      try {
        // Without a model attribute: the built-in emoji model served beside this script.
        const model = this.getAttribute('model') ? new URL(this.getAttribute('model'), document.baseURI).href : new URL('builtin/emoji/', import.meta.url).href;
        const { blob } = await engine.generate(model, params, (ev) => {
          if (!current()) return;
          if (ev.type === 'download' && ev.total) {
            this.status(`downloading ${(ev.fetched / 2 ** 20).toFixed(1)} / ${(ev.total / 2 ** 20).toFixed(1)} MB`);
          } else if (ev.type === 'step') {
            this.status(`step ${ev.step}/${ev.steps}`);
            this.bar.style.width = `${(100 * ev.step) / ev.steps}%`;
            this.dispatchEvent(new CustomEvent('ldm-progress', { detail: { step: ev.step, steps: ev.steps } }));
          } else if (ev.type === 'preview') {
            const img = previewImage(ev);
            this.canvas.width = img.width;
            this.canvas.height = img.height;
            this.canvas.getContext('2d').putImageData(img, 0, 0);
            this.canvas.hidden = false;
            this.img.hidden = true;
          } else if (ev.type === 'stage' && ev.stage === 'decode') {
            this.status('decoding…');
          }
        }, { ...extras, ...(await this.images(engine)) });
        if (!current()) return;
        if (this.img.src) URL.revokeObjectURL(this.img.src);
        this.img.src = URL.createObjectURL(blob);
        this.img.alt = params.prompt;
        this.img.hidden = false;
        this.canvas.hidden = true;
        this.status('');
        this.bar.style.width = '0';
        this.dispatchEvent(new CustomEvent('ldm-done', { detail: { blob } }));
      } catch (e) {
        if (current()) this.fail(e.kind === 'cancelled' ? 'cancelled' : e.message);
      } finally {
        if (engine.busyWith === this) engine.busyWith = null;
      }
    });
    chain = mine.catch(() => {});
    await mine;
  }

  fail(message) {
    this.status(message, true);
    this.dispatchEvent(new CustomEvent('ldm-error', { detail: { message } }));
  }
}

if (!customElements.get('ldm-image')) customElements.define('ldm-image', LdmImage);
