// The benchmark page (bench.html): ldm bench in the engine worker; see runWorkerJob.
import { runWorkerJob } from './worker-job.js';

const out = document.getElementById('out');
const q = new URLSearchParams(location.search);
const which = q.get('which') || 'small';
let message = { cmd: 'bench', which };
if (q.get('mode') === 'generate') {
  const num = (k, d) => (q.has(k) ? Number(q.get(k)) : d);
  const params = { prompt: q.get('prompt') ?? 'a photograph of an astronaut riding a horse', seed: num('seed', 0), steps: num('steps', 10),
    guidance: num('guidance', 7.5), width: q.has('width') ? num('width') : null, height: q.has('height') ? num('height') : null,
    scheduler: q.get('scheduler') || null, precision: q.get('precision') || 'auto', preview_every: 0 };
  message = { cmd: 'bench-generate', model: new URL(q.get('model') || 'builtin/emoji/', location.href).href, params };
}
if (q.get('mode') === 'unet') {
  const num = (k, d) => (q.has(k) ? Number(q.get(k)) : d);
  const options = { latent: num('latent', 64), batch: num('batch', 2), unet: q.get('unet') || null, vae: q.get('vae') || null,
    precision: q.get('precision') || null, runs: num('runs', 3), decode: q.get('decode') !== '0', output: q.get('output') === '1' };
  const model = q.get('model') || 'sd15';
  message = { cmd: 'bench-unet', model: model === 'sd15' || model === 'sdxl' ? model : new URL(model, location.href).href,
    inputs: q.get('inputs') ? new URL(q.get('inputs'), location.href).href : null, options };
}
if (q.get('mode') === 'depth') {
  const model = q.get('model') || 'depth-anything-v2-small';
  const options = { width: Number(q.get('width') || 512), height: Number(q.get('height') || 512), precision: q.get('precision') || 'f32' };
  message = { cmd: 'bench-depth', model: /[/:]/.test(model) ? new URL(model, location.href).href : model, options };
}
if (q.get('mode') === 'train') {
  // Training steps on 16 synthetic pairs with the Train tab's settings (ldm bench train).
  const num = (k, d) => (q.has(k) ? Number(q.get(k)) : d);
  const options = { steps: num('steps', 10), batch: num('batch', 4), resolution: num('resolution', 64), channels: (q.get('channels') || '64,128').split(',').map(Number), lr: num('lr', 1e-4), mixed_precision: q.get('mixed_precision') === '1', gradient_checkpointing: q.get('gradient_checkpointing') === '1' };
  message = { cmd: 'bench-train', model: q.get('model') ? new URL(q.get('model'), location.href).href : undefined, options };
}
// device=cpu|gpu|auto: where it runs (the engine's CPU backend or WebGPU; default gpu, and auto
// for mode=generate as the app chooses).
message.device = q.get('device') ?? (['generate', 'train'].includes(q.get('mode')) ? 'auto' : 'gpu');
out.textContent = `${JSON.stringify(message)}; starting worker…`;
runWorkerJob({
  out, name: '__ldmBench', tag: 'ldm-bench', what: 'benchmarks', message,
  render(res, log, secs) {
    log(JSON.stringify(res, null, 2));
    log(`done in ${secs} s`);
  },
});
