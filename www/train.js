// The Train tab: fits an image-to-image latent diffusion model to the user's pairs (condition image
// -> target image) in this browser, on the engine's device, as `ldm train` does natively, or a LoRA
// of a text-to-image model to captioned images, as `ldm train-lora` does. Runs are kept in OPFS
// (run-store.js) with their data, so one continues after a reload; the result generates in the
// Generate tab (model `opfs:NAME/`, or LoRA `opfs:NAME/pytorch_lora_weights.safetensors`) or
// downloads (a diffusers folder as a ZIP, or the LoRA file).

import { writeZip } from './zip.js';

const $ = (id) => document.getElementById(id);

// State the browser tests read (window.__ldmTrain).
const state = { busy: false, losses: [], events: [], errors: [], samples: 0, result: null, runs: [] };
window.__ldmTrain = state;

function status(text, error = false) {
  $('train-status').textContent = text;
  $('train-status').classList.toggle('error', error);
  if (error) state.errors.push(text);
}

// The loss of every step, and its moving average over 20 steps.
function drawLosses(losses) {
  const c = $('train-loss');
  const ctx = c.getContext('2d');
  const w = c.width;
  const h = c.height;
  ctx.clearRect(0, 0, w, h);
  if (!losses.length) return;
  const max = Math.max(...losses);
  const min = Math.min(...losses, 0);
  const x = (i) => (losses.length === 1 ? w / 2 : (i / (losses.length - 1)) * (w - 8) + 4);
  const y = (v) => h - 4 - ((v - min) / (max - min || 1)) * (h - 8);
  const line = (values, colour) => {
    ctx.strokeStyle = colour;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
  };
  line(losses, '#9bb0d6');
  const avg = losses.map((_, i) => {
    const part = losses.slice(Math.max(0, i - 19), i + 1);
    return part.reduce((a, b) => a + b, 0) / part.length;
  });
  line(avg, '#22324f');
  $('train-loss-text').textContent = `step ${losses.length}: loss ${losses.at(-1).toFixed(4)} (mean of the last 20: ${avg.at(-1).toFixed(4)}; first: ${losses[0].toFixed(4)})`;
}

function settings() {
  const num = (id) => Number($(id).value);
  return {
    steps: num('train-steps'),
    batch: num('train-batch'),
    lr: num('train-lr'),
    resolution: num('train-resolution'),
    channels: $('train-channels').value.split(',').map((v) => Number(v.trim())),
    objective: $('train-objective').value,
    cond_dropout: num('train-dropout'),
    ema_decay: num('train-ema'),
    seed: num('train-seed'),
    save_every: num('train-save-every'),
    sample_every: num('train-sample-every'),
    sample_steps: 20,
    gradient_checkpointing: $('train-checkpointing').checked,
    mixed_precision: $('train-mixed').checked,
  };
}

// `ldm train-lora`'s settings from the same fields and the LoRA ones.
function loraSettings() {
  const num = (id) => Number($(id).value);
  return {
    steps: num('train-steps'),
    batch: num('train-batch'),
    lr: num('train-lr'),
    resolution: num('train-resolution'),
    rank: num('train-lora-rank'),
    cond_dropout: num('train-dropout'),
    seed: num('train-seed'),
    save_every: num('train-save-every'),
    sample_every: num('train-sample-every'),
    sample_steps: 20,
    sample_prompt: $('train-lora-prompt').value.trim(),
    gradient_checkpointing: $('train-checkpointing').checked,
    mixed_precision: $('train-mixed').checked,
  };
}

const LORA_FILE = 'pytorch_lora_weights.safetensors';

export function setupTraining(engine, { builtin, useModel, useLora }) {
  const showTab = (tab) => {
    for (const t of ['generate', 'train']) $(`tab-${t}`).setAttribute('aria-pressed', String(t === tab));
    for (const el of document.querySelectorAll('[data-tab]')) el.hidden = el.dataset.tab !== tab;
    if (tab === 'train') refreshRuns();
  };
  $('tab-generate').addEventListener('click', () => showTab('generate'));
  $('tab-train').addEventListener('click', () => showTab('train'));
  $('train-folders').addEventListener('change', () => {
    for (const id of ['train-cond', 'train-target', 'train-lora-images']) $(id).toggleAttribute('webkitdirectory', $('train-folders').checked);
  });
  const showKind = () => {
    const kind = $('train-kind').value;
    for (const el of document.querySelectorAll('#train [data-kind]')) el.hidden = el.dataset.kind !== kind;
  };
  $('train-kind').addEventListener('change', showKind);
  showKind();
  if (!$('train-autoencoder').value) $('train-autoencoder').value = builtin;

  const setBusy = (busy) => {
    state.busy = busy;
    $('train-start').disabled = busy;
    $('train-cancel').disabled = !busy;
    for (const b of document.querySelectorAll('#train-runs button')) b.disabled = busy;
  };

  async function run(job) {
    setBusy(true);
    state.losses = job.resume ? [...(state.runs.find((r) => r.name === job.run)?.losses ?? [])] : [];
    drawLosses(state.losses);
    status(job.resume ? `Resuming ${job.run}…` : `Starting ${job.run}…`);
    const t0 = performance.now();
    let first = null;
    try {
      const lora = job.kind === 'lora';
      const out = await (lora ? engine.trainLora.bind(engine) : engine.train.bind(engine))(job, (ev) => {
        state.events.push({ type: ev.type, step: ev.step, t: Date.now() });
        if (ev.type === 'stage') status(ev.stage !== 'encode' ? 'Training…' : lora ? 'Encoding the images and captions with the model…' : 'Encoding the pairs with the autoencoder…');
        else if (ev.type === 'status') status(ev.message);
        else if (ev.type === 'train-step') {
          first ??= { step: ev.step - 1, t: performance.now() };
          state.losses.push(ev.loss);
          drawLosses(state.losses);
          const rate = (ev.step - first.step) / ((performance.now() - first.t) / 1000);
          $('train-progress').max = ev.steps;
          $('train-progress').value = ev.step;
          status(`Step ${ev.step} of ${ev.steps}, ${rate.toFixed(2)} steps/s.`);
        } else if (ev.type === 'checkpoint') {
          $('train-saved').textContent = `saved at step ${ev.step}`;
          refreshRuns();
        } else if (ev.type === 'sample') {
          const c = $('train-sample');
          c.width = ev.width;
          c.height = ev.height;
          c.getContext('2d').putImageData(new ImageData(new Uint8ClampedArray(ev.rgba), ev.width, ev.height), 0, 0);
          c.hidden = false;
          $('train-sample-text').textContent = lora ? `the sample prompt with the LoRA at step ${ev.step}` : `generated from the first pair's condition at step ${ev.step}`;
          state.samples++;
        }
      });
      state.result = out;
      const secs = (performance.now() - t0) / 1000;
      status(out.cancelled ? `Cancelled at step ${out.step} (saved).` : `Done: ${out.step} steps in ${secs.toFixed(1)} s. Generate with it below, or download it.`);
    } catch (e) {
      status(`Training failed: ${e.message}`, true);
    } finally {
      setBusy(false);
      refreshRuns();
    }
  }

  $('train-start').addEventListener('click', () => {
    if ($('train-kind').value === 'lora') {
      const images = [...$('train-lora-images').files];
      const zip = $('train-lora-zip').files[0];
      if (!zip && !images.length) {
        status('Choose the images with their captions (or a ZIP of them).', true);
        return;
      }
      const model = $('train-lora-model').value.trim() || builtin;
      run({ kind: 'lora', run: $('train-name').value.trim(), settings: loraSettings(), model, images, zip, caption: $('train-lora-caption').value.trim() });
      return;
    }
    const zip = $('train-zip').files[0];
    const cond = [...$('train-cond').files];
    const target = [...$('train-target').files];
    if (!zip && (!cond.length || !target.length)) {
      status('Choose the condition and the target images (or a ZIP with cond/ and target/ folders).', true);
      return;
    }
    run({ run: $('train-name').value.trim(), settings: settings(), autoencoder: $('train-autoencoder').value.trim(), zip, cond, target });
  });
  $('train-cancel').addEventListener('click', () => {
    engine.cancel();
    status('Cancelling (saving where it is)…');
  });

  async function download(name, kind) {
    status(`Packing ${name}…`);
    const files = await engine.runFiles(name);
    if (kind === 'lora') {
      const lora = files.find(([p]) => p === LORA_FILE);
      if (!lora) throw new Error(`${name} has no ${LORA_FILE} yet`);
      const a = document.createElement('a');
      a.href = URL.createObjectURL(new Blob([lora[1]]));
      a.download = `${name}.safetensors`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
      status(`${name}.safetensors: a diffusers LoRA (ldm generate --lora ${name}.safetensors, or pipe.load_lora_weights).`);
      return;
    }
    const a = document.createElement('a');
    a.href = URL.createObjectURL(writeZip(files.map(([p, b]) => [`${name}/${p}`, b])));
    a.download = `${name}.zip`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
    status(`${name}.zip: a diffusers LDMPipeline folder (ldm generate --model ${name} --init-image CONDITION).`);
  }

  async function refreshRuns() {
    let runs;
    try {
      runs = await engine.runs();
    } catch (e) {
      $('train-runs').textContent = `Saved runs cannot be listed: ${e.message}`;
      return;
    }
    state.runs = runs;
    const list = $('train-runs');
    list.replaceChildren();
    if (!runs.length) list.textContent = 'No saved runs yet.';
    for (const r of runs) {
      const li = document.createElement('li');
      li.dataset.run = r.name;
      const text = document.createElement('span');
      const last = r.losses.slice(-20);
      const mean = last.length ? (last.reduce((a, b) => a + b, 0) / last.length).toFixed(4) : '–';
      text.textContent = r.kind === 'lora'
        ? `${r.name}: LoRA of ${r.base}, step ${r.step} of ${r.steps}, ${r.pairs} images at ${r.resolution} px, recent loss ${mean}`
        : `${r.name}: step ${r.step} of ${r.steps}, ${r.pairs} pairs at ${r.resolution} px, recent loss ${mean}`;
      li.dataset.kind = r.kind;
      li.append(text);
      const button = (label, cls, fn) => {
        const b = document.createElement('button');
        b.type = 'button';
        b.textContent = label;
        b.className = cls;
        b.disabled = state.busy;
        b.addEventListener('click', fn);
        li.append(b);
      };
      button('Resume', 'resume', () => {
        const more = Math.max(r.step + 1, Number($('train-steps').value), r.steps);
        $('train-name').value = r.name;
        if (r.kind === 'lora') run({ kind: 'lora', run: r.name, settings: { ...loraSettings(), steps: more }, resume: true });
        else run({ run: r.name, settings: { ...settings(), steps: more }, resume: true });
      });
      button('Generate with it', 'use', () => {
        showTab('generate');
        if (r.kind === 'lora') useLora(r.base, `opfs:${r.name}/${LORA_FILE}`);
        else useModel(`opfs:${r.name}/`);
      });
      button('Download', 'download', () => download(r.name, r.kind).catch((e) => status(`Download failed: ${e.message}`, true)));
      button('Delete', 'delete', async () => {
        await engine.deleteRun(r.name);
        refreshRuns();
      });
      list.append(li);
    }
  }

  const tab = new URL(location.href).searchParams.get('tab');
  showTab(tab === 'train' ? 'train' : 'generate');
  return { showTab, refreshRuns };
}
