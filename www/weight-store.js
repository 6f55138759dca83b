// Model files over HTTP Range requests, cached chunk by chunk in the Cache API, for the engine
// worker. The engine asks for byte ranges (`size(path)`, `read(path, start, length)`) in the order
// the model first uses its tensors; this store turns them into few requests and keeps every
// verified chunk, so later loads (and offline ones) need no network.
//
// - A file is cut into fixed-size chunks (1 MiB, or the manifest's `chunk_size`). A read needing
//   missing chunks fetches each run of consecutive missing chunks with one Range request, extended
//   forward (read-ahead) over chunks not cached yet, up to MAX_RUN chunks.
// - The first request for a file asks for its first chunk: it gives the size (Content-Range) and,
//   for configs and safetensors headers, all the bytes that are needed, in one round trip.
// - Network errors are retried with exponential backoff; a response that breaks off mid-body is
//   resumed from the byte where it stopped.
// - Only whole chunks are cached, each checked for its length and, when the model folder has an
//   `ldm-manifest.json` (written by `ldm manifest`), for its sha256; a torn or altered download is
//   never cached.

export const CACHE_NAME = 'ldm-weights-v1';
export const DEFAULT_CHUNK = 1 << 20;
const MAX_RUN = 16;
const MAX_ATTEMPTS = 6;
const BACKOFF_MS = 250;
const MEMORY_BYTES = 48 << 20;
const MANIFEST = 'ldm-manifest.json';

const tag = (url, what) => `${url}${url.includes('?') ? '&' : '?'}ldm-${what}`;
const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(t); reject(abortError()); }, { once: true });
});

export function abortError() {
  return new DOMException('cancelled', 'AbortError');
}

/// An error that retrying cannot fix (HTTP 4xx, a checksum that keeps failing).
class FatalError extends Error {}

async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, '0')).join('');
}

export class WeightStore {
  // base: the model folder's URL (ending in '/'). opts.onBytes(fetched, total) reports downloads
  // (total: the sizes of the weight files asked about so far),
  // opts.signal cancels, opts.fetch replaces fetch (tests).
  constructor(base, opts = {}) {
    this.base = base.endsWith('/') ? base : `${base}/`;
    this.onBytes = opts.onBytes ?? (() => {});
    this.signal = opts.signal ?? null;
    this.fetchImpl = opts.fetch ?? ((...a) => fetch(...a));
    this.chunkSize = DEFAULT_CHUNK;
    this.metas = new Map();
    this.memory = new Map();
    this.inflight = new Map();
    this.memoryBytes = 0;
    this.fetched = 0;
    this.weightFiles = new Set();
    this.weightBytes = 0;
    this.manifest = undefined;
    this.cachePromise = null;
    this.log = opts.log ?? (() => {});
  }

  url(path) {
    return new URL(path, this.base).href;
  }

  cache() {
    this.cachePromise ??= caches.open(CACHE_NAME);
    return this.cachePromise;
  }

  // Reads the model's manifest once (it sets the chunk size and the checksums).
  async init() {
    if (this.manifest !== undefined) return;
    this.manifest = null;
    const meta = await this.meta(MANIFEST, DEFAULT_CHUNK);
    if (meta.missing) return;
    const bytes = await this.readWith(MANIFEST, 0, meta.size, DEFAULT_CHUNK);
    let m;
    try {
      m = JSON.parse(new TextDecoder().decode(bytes));
    } catch (e) {
      throw new FatalError(`${this.url(MANIFEST)} is not valid JSON: ${e.message}`);
    }
    if (m?.format !== 'ldm-manifest' || typeof m.files !== 'object') throw new FatalError(`${this.url(MANIFEST)} is not an ldm manifest`);
    const cs = Number(m.chunk_size ?? DEFAULT_CHUNK);
    if (!Number.isInteger(cs) || cs < 4096 || cs % 4096) throw new FatalError(`${this.url(MANIFEST)}: chunk_size ${m.chunk_size} is not a multiple of 4096`);
    this.manifest = m;
    this.chunkSize = cs;
  }

  expected(path) {
    return path === MANIFEST ? null : this.manifest?.files?.[path] ?? null;
  }

  // Size in bytes, or null when the file does not exist.
  async size(path) {
    await this.init();
    const meta = await this.meta(path, this.chunkSize);
    if (meta.missing) return null;
    this.countWeightFile(path, meta.size);
    return meta.size;
  }

  // The download counter counts weight files only (configs and tokenizers are small and are
  // not in the total either), each byte once.
  isWeightFile(path) {
    return /\.(safetensors|ckpt|pt|pth|bin)$/i.test(path);
  }

  countWeightFile(path, size) {
    if (this.isWeightFile(path) && !this.weightFiles.has(path)) {
      this.weightFiles.add(path);
      this.weightBytes += size;
    }
  }

  async read(path, start, length) {
    await this.init();
    return this.readWith(path, start, length, this.chunkSize);
  }

  // What is known of a file: {size} or {missing: true}; asks the network once, then the cache.
  async meta(path, cs) {
    const key = `${path}@${cs}`;
    if (!this.metas.has(key)) {
      const p = this.loadMeta(path, cs);
      this.metas.set(key, p);
      p.catch(() => this.metas.delete(key));
    }
    return this.metas.get(key);
  }

  async loadMeta(path, cs) {
    const url = this.url(path);
    const cache = await this.cache();
    const hit = await cache.match(tag(url, `meta-${cs}`));
    if (hit) return hit.json();
    const meta = await this.fetchRange(path, 0, cs, cs, null);
    const want = this.expected(path);
    if (!meta.missing && want && want.size !== meta.size) {
      throw new FatalError(`${url} is ${meta.size} bytes but ${MANIFEST} says ${want.size}; the model folder changed, or the manifest is stale (run ldm manifest again)`);
    }
    if (meta.missing && want) throw new FatalError(`${url} is listed in ${MANIFEST} but the server has no such file`);
    await cache.put(tag(url, `meta-${cs}`), new Response(JSON.stringify(meta), { headers: { 'Content-Type': 'application/json' } }));
    return meta;
  }

  chunkKey(url, i, cs) {
    return tag(url, `chunk-${cs}-${i}`);
  }

  remember(key, bytes) {
    if (this.memory.has(key)) return;
    this.memory.set(key, bytes);
    this.memoryBytes += bytes.byteLength;
    for (const [k, v] of this.memory) {
      if (this.memoryBytes <= MEMORY_BYTES) break;
      this.memory.delete(k);
      this.memoryBytes -= v.byteLength;
    }
  }

  async cachedChunk(url, i, cs) {
    const key = this.chunkKey(url, i, cs);
    const m = this.memory.get(key);
    if (m) {
      this.memory.delete(key);
      this.memory.set(key, m);
      return m;
    }
    const hit = await (await this.cache()).match(key);
    if (!hit) return null;
    const bytes = new Uint8Array(await hit.arrayBuffer());
    this.remember(key, bytes);
    return bytes;
  }

  async readWith(path, start, length, cs) {
    if (this.signal?.aborted) throw abortError();
    const meta = await this.meta(path, cs);
    const url = this.url(path);
    if (meta.missing) throw new FatalError(`${url} does not exist`);
    if (start < 0 || length < 0 || start + length > meta.size) throw new FatalError(`${url}: bytes ${start}..${start + length} are outside its ${meta.size} bytes`);
    const out = new Uint8Array(length);
    if (length === 0) return out;
    const first = Math.floor(start / cs);
    const last = Math.floor((start + length - 1) / cs);
    const nChunks = Math.ceil(meta.size / cs);
    const copy = (i, bytes) => {
      const c0 = i * cs;
      const a = Math.max(start, c0);
      const b = Math.min(start + length, c0 + bytes.byteLength);
      out.set(bytes.subarray(a - c0, b - c0), a - start);
    };
    const missing = [];
    for (let i = first; i <= last; i++) {
      let bytes = (await this.cachedChunk(url, i, cs)) ?? (await this.inflight.get(this.chunkKey(url, i, cs)));
      if (bytes && bytes.byteLength !== Math.min(cs, meta.size - i * cs)) {
        // Not what this file's chunk must be (storage damaged, or the file changed): fetch it again.
        await this.forget(url, i, cs);
        bytes = null;
      }
      if (bytes) copy(i, bytes);
      else missing.push(i);
    }
    // Runs of consecutive missing chunks, each extended by read-ahead, one request per run.
    let k = 0;
    while (k < missing.length) {
      let a = missing[k];
      let b = a;
      while (k + 1 < missing.length && missing[k + 1] === b + 1 && b - a + 1 < MAX_RUN) b = missing[++k];
      k++;
      if (k >= missing.length) {
        while (b + 1 < nChunks && b - a + 1 < MAX_RUN && !(await this.cachedOrComing(url, b + 1, cs))) b++;
      }
      const got = await this.fetchRun(path, a, b, cs, meta.size);
      for (const [i, bytes] of got) if (i >= first && i <= last) copy(i, bytes);
    }
    return out;
  }

  async forget(url, i, cs) {
    const key = this.chunkKey(url, i, cs);
    const m = this.memory.get(key);
    if (m) {
      this.memory.delete(key);
      this.memoryBytes -= m.byteLength;
    }
    await (await this.cache()).delete(key);
  }

  async cachedOrComing(url, i, cs) {
    return this.inflight.has(this.chunkKey(url, i, cs)) || !!(await this.cachedChunk(url, i, cs));
  }

  // Fetches chunks a..b in one request; meanwhile a read of any of them waits for it instead of
  // asking the network again. Resolves to Map(index -> bytes).
  async fetchRun(path, a, b, cs, size) {
    const url = this.url(path);
    const waiting = new Map();
    for (let i = a; i <= b; i++) {
      let settle;
      const p = new Promise((resolve, reject) => { settle = { resolve, reject }; });
      p.catch(() => {});
      waiting.set(i, settle);
      this.inflight.set(this.chunkKey(url, i, cs), p);
    }
    try {
      const got = await this.fetchRange(path, a * cs, Math.min((b + 1) * cs, size), cs, size);
      for (const [i, settle] of waiting) {
        if (got.chunks.has(i)) settle.resolve(got.chunks.get(i));
        else settle.reject(new Error(`${url}: chunk ${i} did not arrive`));
      }
      return got.chunks;
    } catch (e) {
      for (const settle of waiting.values()) settle.reject(e);
      throw e;
    } finally {
      for (let i = a; i <= b; i++) this.inflight.delete(this.chunkKey(url, i, cs));
    }
  }

  // Downloads a whole file into the cache in the background (the VAE while the UNet denoises),
  // so that reading it later needs no network. Failures are left for the real read to report.
  async prefetch(path) {
    try {
      await this.init();
      const cs = this.chunkSize;
      const meta = await this.meta(path, cs);
      if (meta.missing) return false;
      const url = this.url(path);
      const n = Math.ceil(meta.size / cs);
      for (let i = 0; i < n; i++) {
        if (await this.cachedOrComing(url, i, cs)) continue;
        let b = i;
        while (b + 1 < n && b - i + 1 < MAX_RUN && !(await this.cachedOrComing(url, b + 1, cs))) b++;
        await this.fetchRun(path, i, b, cs, meta.size);
        i = b;
      }
      return true;
    } catch (e) {
      if (e?.name !== 'AbortError') this.log(`prefetching ${path} failed (${e.message}); it is fetched again when needed`);
      return false;
    }
  }

  // Checks and caches one whole chunk.
  async storeChunk(path, url, i, cs, bytes, size) {
    const want = Math.min(cs, size - i * cs);
    if (bytes.byteLength !== want) throw new Error(`${url}: chunk ${i} is ${bytes.byteLength} bytes, expected ${want}`);
    const m = this.expected(path);
    if (m && cs === this.chunkSize) {
      const expect = m.chunks?.[i] ?? (size <= cs ? m.sha256 : null);
      if (expect) {
        const got = await sha256Hex(bytes);
        if (got !== expect) {
          const e = new Error(`${url}: bytes ${i * cs}..${i * cs + want} have sha256 ${got.slice(0, 16)}…, but ${MANIFEST} says ${expect.slice(0, 16)}…`);
          e.checksum = true;
          throw e;
        }
      }
    }
    await (await this.cache()).put(this.chunkKey(url, i, cs), new Response(bytes, { headers: { 'Content-Type': 'application/octet-stream', 'Content-Length': String(bytes.byteLength) } }));
    this.remember(this.chunkKey(url, i, cs), bytes);
  }

  // Fetches bytes [from, to) (to = null: the first chunk of a file of unknown size), storing
  // each whole chunk as it completes; resumes after a broken connection and retries with backoff.
  // Returns {size, chunks: Map(index -> bytes)} or {missing: true}.
  async fetchRange(path, from, to, cs, size) {
    const url = this.url(path);
    const chunks = new Map();
    let pos = from;
    let end = to;
    let attempt = 0;
    let checksumFailures = 0;
    let buf = null;
    let bufStart = from;
    for (;;) {
      if (this.signal?.aborted) throw abortError();
      try {
        const res = await this.fetchImpl(url, { headers: { Range: `bytes=${pos}-${end - 1}` }, signal: this.signal ?? undefined, cache: 'no-store' });
        if (res.status === 404 || res.status === 410) {
          if (size === null) return { missing: true };
          throw new FatalError(`${url} disappeared from the server (HTTP ${res.status})`);
        }
        if (res.status === 416 && size === null) {
          const total = Number(/\/(\d+)/.exec(res.headers.get('Content-Range') ?? '')?.[1]);
          if (total === 0) return { size: 0, chunks };
        }
        if (res.status >= 400 && res.status < 500) throw new FatalError(`${url}: HTTP ${res.status} ${res.statusText}`);
        if (res.status !== 200 && res.status !== 206) throw new Error(`${url}: HTTP ${res.status} ${res.statusText}`);
        let skip = 0;
        if (res.status === 206) {
          const cr = /bytes (\d+)-(\d+)\/(\d+|\*)/.exec(res.headers.get('Content-Range') ?? '');
          if (!cr) throw new FatalError(`${url}: the server answered a range request without a readable Content-Range (is Access-Control-Expose-Headers set?)`);
          if (Number(cr[1]) !== pos) throw new Error(`${url}: asked for bytes from ${pos}, got ${cr[1]}`);
          if (size === null) {
            if (cr[3] === '*') throw new FatalError(`${url}: the server does not say how large the file is`);
            size = Number(cr[3]);
            end = Math.min(end, size);
            this.countWeightFile(path, size);
          }
        } else {
          // The server ignored the range and sends the whole file: skip to where we are.
          skip = pos;
          if (size === null) {
            const len = res.headers.get('Content-Length');
            if (len === null) throw new FatalError(`${url}: the server sends neither ranges nor a Content-Length`);
            size = Number(len);
            end = Math.min(end, size);
            this.countWeightFile(path, size);
          }
        }
        if (end <= pos) {
          res.body?.cancel();
          return { size, chunks };
        }
        const reader = res.body.getReader();
        try {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            let v = value;
            if (skip > 0) {
              const s = Math.min(skip, v.byteLength);
              skip -= s;
              v = v.subarray(s);
            }
            while (v.byteLength > 0 && pos < end) {
              const i = Math.floor(pos / cs);
              if (!buf) {
                buf = new Uint8Array(Math.min(cs, size - i * cs));
                bufStart = i * cs;
              }
              const n = Math.min(v.byteLength, bufStart + buf.byteLength - pos, end - pos);
              buf.set(v.subarray(0, n), pos - bufStart);
              pos += n;
              if (this.isWeightFile(path)) {
                this.fetched += n;
                this.onBytes(this.fetched, this.weightBytes);
              }
              v = v.subarray(n);
              if (pos === bufStart + buf.byteLength) {
                try {
                  await this.storeChunk(path, url, i, cs, buf, size);
                } catch (e) {
                  if (!e.checksum || ++checksumFailures > 1) throw new FatalError(e.message);
                  // Fetch that chunk again once: a proxy may have mangled it. Its bytes are
                  // counted again as they arrive.
                  if (this.isWeightFile(path)) this.fetched -= pos - bufStart;
                  pos = bufStart;
                  buf = null;
                  throw e;
                }
                chunks.set(i, buf);
                buf = null;
                attempt = 0;
              }
            }
            if (pos >= end) break;
          }
        } finally {
          reader.cancel().catch(() => {});
        }
        if (pos < end) throw new Error(`${url}: the connection closed at byte ${pos} of ${end}`);
        return { size, chunks };
      } catch (e) {
        if (e?.name === 'AbortError' || this.signal?.aborted) throw abortError();
        if (e instanceof FatalError) throw e;
        if (++attempt >= MAX_ATTEMPTS) throw new Error(`${url}: giving up after ${MAX_ATTEMPTS} attempts: ${e.message ?? e}`);
        const wait = BACKOFF_MS * 2 ** (attempt - 1);
        this.log(`retrying ${url} from byte ${pos} in ${wait} ms (${e.message ?? e})`);
        await sleep(wait, this.signal);
      }
    }
  }
}

// Notes that the model at `url` (a folder URL ending in '/', or a single file's URL) is cached.
export async function recordModel(url, info = {}) {
  const cache = await caches.open(CACHE_NAME);
  const record = { url, added: Date.now(), ...info };
  await cache.put(tag(url, 'model'), new Response(JSON.stringify(record), { headers: { 'Content-Type': 'application/json' } }));
}

// The quantisation recipe `ldm convert` wrote into a cached folder's ldm-web.json, if any.
async function cachedRecipe(cache, entries, url) {
  const hints = entries.find((c) => c.file === `${url}ldm-web.json` && /^chunk-\d+-0$/.test(c.what));
  if (!hints) return undefined;
  try {
    return (await (await cache.match(tag(hints.file, hints.what))).json()).quantisation;
  } catch {
    return undefined;
  }
}

// The models the cache holds: [{url, bytes, files, added, quantisation}], sizes counted from the
// cached chunks.
export async function listCachedModels() {
  const cache = await caches.open(CACHE_NAME);
  const keys = (await cache.keys()).map((r) => r.url);
  const parse = (key) => {
    const u = new URL(key);
    const what = [...u.searchParams.keys()].find((k) => k.startsWith('ldm-'));
    if (!what) return null;
    u.searchParams.delete(what);
    return { file: u.href.replace(/\?$/, ''), what: what.slice(4) };
  };
  const entries = keys.map(parse).filter(Boolean);
  const sizes = new Map();
  for (const e of entries) {
    const m = /^meta-(\d+)$/.exec(e.what);
    if (m) sizes.set(`${e.file}@${m[1]}`, (await (await cache.match(tag(e.file, e.what))).json()).size ?? 0);
  }
  const models = [];
  for (const e of entries.filter((x) => x.what === 'model')) {
    const record = await (await cache.match(tag(e.file, 'model'))).json();
    const files = new Set();
    let bytes = 0;
    for (const c of entries) {
      const m = /^chunk-(\d+)-(\d+)$/.exec(c.what);
      if (!m || !c.file.startsWith(e.file)) continue;
      const [cs, i] = [Number(m[1]), Number(m[2])];
      files.add(c.file);
      bytes += Math.max(0, Math.min(cs, (sizes.get(`${c.file}@${cs}`) ?? cs) - i * cs));
    }
    models.push({ ...record, url: e.file, bytes, files: files.size, quantisation: await cachedRecipe(cache, entries, e.file) });
  }
  return models.sort((a, b) => a.url.localeCompare(b.url));
}

// Deletes every cached piece of the model at `url`.
export async function deleteCachedModel(url) {
  const cache = await caches.open(CACHE_NAME);
  let n = 0;
  for (const req of await cache.keys()) {
    if (req.url.startsWith(url)) {
      await cache.delete(req);
      n++;
    }
  }
  return n;
}
