// Service worker: the app shell is cached on the first visit, so the page loads (and, with its
// stored models, generates) with the network off. Shell files are served network-first, so an
// update shows on the next online visit; model weights are not touched here (the engine worker
// caches them chunk by chunk in the Cache API itself).

const SHELL_CACHE = 'ldm-shell-v6';
const SHELL = [
  './', 'index.html', 'app.js', 'app.css', 'ldm-client.js', 'ldm-image.js', 'engine-worker.js', 'weight-store.js',
  'worker-job.js', 'train.js', 'run-store.js', 'zip.js', 'manifest.webmanifest', 'icon.svg', 'embed.html', 'bench.html', 'tests.html',
  'pkg/ldm_web.js', 'pkg/ldm_web_bg.wasm', 'pkg-mt/ldm_web.js', 'pkg-mt/ldm_web_bg.wasm',
  // The built-in model's settings and example prompts (its weights arrive through the engine's
  // chunk cache like any model's).
  'builtin/emoji/ldm-web.json', 'builtin/emoji/README.md', 'builtin/LICENSES/Apache-2.0.txt', 'builtin/LICENSES/CC-BY-4.0.txt',
];

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(SHELL_CACHE);
    await cache.addAll(SHELL.map((p) => new Request(new URL(p, self.registration.scope), { cache: 'reload' })));
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) if (name.startsWith('ldm-shell-') && name !== SHELL_CACHE) await caches.delete(name);
    await self.clients.claim();
  })());
});

function isShell(url) {
  if (url.origin !== self.location.origin || !url.pathname.startsWith(new URL(self.registration.scope).pathname)) return false;
  if (url.pathname.includes('/models/')) return false;
  // Model files are the engine's business; of the built-in model only the small files above are shell.
  return !url.pathname.includes('/builtin/emoji/') || SHELL.some((p) => url.pathname.endsWith(p));
}

self.addEventListener('fetch', (event) => {
  const req = event.request;
  const url = new URL(req.url);
  if (req.method !== 'GET' || req.headers.has('Range') || !isShell(url)) return;
  event.respondWith((async () => {
    const cache = await caches.open(SHELL_CACHE);
    try {
      const res = await fetch(req);
      if (res.ok && res.status === 200) cache.put(url.origin + url.pathname, res.clone()).catch(() => {});
      return res;
    } catch (e) {
      const hit = (await cache.match(url.origin + url.pathname)) ?? (req.mode === 'navigate' ? await cache.match(new URL('./', self.registration.scope)) : undefined);
      if (hit) return hit;
      throw e;
    }
  })());
});
