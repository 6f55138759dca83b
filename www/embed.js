// The widget's demo page (embed.html): one <ldm-image> built from the query string.
// The attributes come from this page's query string, e.g. embed.html?model=/models/sd1/&prompt=...
const q = new URLSearchParams(location.search);
const el = document.createElement('ldm-image');
for (const a of ['model', 'prompt', 'negative-prompt', 'seed', 'steps', 'guidance', 'width', 'height', 'scheduler']) {
  const v = q.get(a) ?? q.get(a.replace('-', '_'));
  if (v !== null) el.setAttribute(a, v);
}
if (!el.hasAttribute('model')) el.setAttribute('model', '/models/');
document.getElementById('code').textContent = `<script type="module" src="${new URL('ldm-image.js', location.href).href}"><\/script>\n${el.outerHTML}`;
const log = document.getElementById('log');
el.addEventListener('ldm-progress', (e) => { log.textContent = `step ${e.detail.step} of ${e.detail.steps}`; });
el.addEventListener('ldm-done', (e) => { log.textContent = `done: ${e.detail.blob.size}-byte PNG`; });
el.addEventListener('ldm-error', (e) => { log.textContent = `error: ${e.detail.message}`; });
document.getElementById('slot').append(el);
await import('./ldm-image.js');
