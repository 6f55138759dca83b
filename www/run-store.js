// Training runs in the origin-private file system (OPFS), one folder per run under ldm-training/:
// the model folder `ldm train` writes (model_index.json, unet/, vqvae/, scheduler/, ldm-web.json),
// training/ (the state a run resumes from) and pairs/{cond,target}/ (the images it trains on); or,
// for a LoRA run (`ldm train-lora`), pytorch_lora_weights.safetensors, training/ (with base.json:
// the model it adapts) and images/ (with captions.json). A run continues after a reload without the
// network (a LoRA run needs its base model, cached like any model). A run's model is generated from by the URL
// `opfs:NAME/`, read through RunStore like any weight store.

const ROOT = 'ldm-training';

function notFound(e) {
  return e?.name === 'NotFoundError' || e?.name === 'TypeError';
}

async function root(create) {
  if (!navigator.storage?.getDirectory) throw Object.assign(new Error('this browser has no origin-private file system (navigator.storage.getDirectory), where training runs are kept'), { kind: 'input' });
  const top = await navigator.storage.getDirectory();
  return top.getDirectoryHandle(ROOT, { create });
}

// A run's name: letters, digits, '-', '_' and '.', as it is a folder and part of a URL.
export function checkRunName(name) {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name ?? '')) {
    throw Object.assign(new Error(`the run name ${JSON.stringify(name)} must be 1 to 64 letters, digits, '.', '-' or '_'`), { kind: 'input' });
  }
  return name;
}

async function runDir(name, create = false) {
  return (await root(create)).getDirectoryHandle(checkRunName(name), { create });
}

async function fileHandle(dir, path, create) {
  const parts = path.split('/').filter(Boolean);
  const last = parts.pop();
  for (const p of parts) dir = await dir.getDirectoryHandle(p, { create });
  return dir.getFileHandle(last, { create });
}

async function writeFile(dir, path, bytes) {
  const handle = await fileHandle(dir, path, true);
  if (handle.createWritable) {
    // Written to a swap file and swapped in on close: a reload mid-write keeps the old file.
    const w = await handle.createWritable();
    await w.write(bytes);
    await w.close();
    return;
  }
  const access = await handle.createSyncAccessHandle();
  try {
    access.truncate(0);
    access.write(bytes, { at: 0 });
    access.flush();
  } finally {
    access.close();
  }
}

// Writes [[path, bytes], ...] into run `name`.
export async function writeRunFiles(name, files) {
  const dir = await runDir(name, true);
  for (const [path, bytes] of files) await writeFile(dir, path, bytes);
}

async function walk(dir, prefix, out) {
  for await (const [name, handle] of dir.entries()) {
    const path = prefix ? `${prefix}/${name}` : name;
    if (handle.kind === 'directory') await walk(handle, path, out);
    else out.push([path, handle]);
  }
  return out;
}

// {path: Uint8Array} of run `name`'s files whose paths start with one of `prefixes`.
export async function readRunFiles(name, prefixes) {
  const out = {};
  for (const [path, handle] of await walk(await runDir(name), '', [])) {
    if (prefixes.some((p) => path.startsWith(p))) out[path] = new Uint8Array(await (await handle.getFile()).arrayBuffer());
  }
  return out;
}

// The pairs run `name` trains on: {cond: Map(stem -> File), target: Map(stem -> File)}.
export async function readRunPairs(name) {
  const pairs = { cond: new Map(), target: new Map() };
  for (const [path, handle] of await walk(await runDir(name), '', [])) {
    const m = /^pairs\/(cond|target)\/(.+)$/.exec(path);
    if (m) pairs[m[1]].set(m[2].replace(/\.[^.]*$/, ''), await handle.getFile());
  }
  return pairs;
}

// Replaces run `name` with a new one holding `pairs` ({cond, target}: Map(stem -> Blob)).
export async function startRun(name, pairs) {
  await deleteRun(name);
  const dir = await runDir(name, true);
  for (const side of ['cond', 'target']) {
    for (const [stem, blob] of pairs[side]) await writeFile(dir, `pairs/${side}/${stem}.png`, new Uint8Array(await blob.arrayBuffer()));
  }
}

// Replaces run `name` with a LoRA run of the model at `base` (a URL) on `images` (Map(stem -> Blob))
// with their `captions` ({stem: text}).
export async function startLoraRun(name, base, images, captions) {
  await deleteRun(name);
  const dir = await runDir(name, true);
  for (const [stem, blob] of images) await writeFile(dir, `images/${stem}.png`, new Uint8Array(await blob.arrayBuffer()));
  const json = (v) => new TextEncoder().encode(JSON.stringify(v, null, 1));
  await writeFile(dir, 'images/captions.json', json(captions));
  await writeFile(dir, 'training/base.json', json({ model: base }));
}

// What LoRA run `name` trains on: {base, images: Map(stem -> File), captions: {stem: text}}.
export async function readLoraRun(name) {
  const out = { base: null, images: new Map(), captions: {} };
  const text = async (handle) => JSON.parse(await (await handle.getFile()).text());
  for (const [path, handle] of await walk(await runDir(name), '', [])) {
    const m = /^images\/(.+)\.png$/.exec(path);
    if (m) out.images.set(m[1], await handle.getFile());
    else if (path === 'images/captions.json') out.captions = await text(handle);
    else if (path === 'training/base.json') out.base = (await text(handle)).model;
  }
  if (!out.base) throw Object.assign(new Error(`run ${name} is not a LoRA run (no training/base.json)`), { kind: 'input' });
  return out;
}

// Every saved run: {name, kind: 'ldm' | 'lora', base (LoRA runs' model URL), step, steps, losses,
// pairs (images of LoRA runs), resolution} from its training/state.json.
export async function listRuns() {
  let dir;
  try {
    dir = await root(false);
  } catch (e) {
    if (notFound(e)) return [];
    throw e;
  }
  const runs = [];
  for await (const [name, handle] of dir.entries()) {
    if (handle.kind !== 'directory') continue;
    const json = async (path) => {
      try {
        return JSON.parse(await (await (await fileHandle(handle, path, false)).getFile()).text());
      } catch {
        return null;
      }
    };
    const state = await json('training/state.json');
    const base = (await json('training/base.json'))?.model ?? null;
    runs.push({ name, kind: base ? 'lora' : 'ldm', base, step: state?.step ?? 0, steps: state?.config?.steps ?? 0, losses: state?.losses ?? [], pairs: state?.pairs?.length ?? 0, resolution: state?.resolution ?? 0 });
  }
  return runs.sort((a, b) => a.name.localeCompare(b.name));
}

export async function deleteRun(name) {
  try {
    await (await root(false)).removeEntry(checkRunName(name), { recursive: true });
    return true;
  } catch (e) {
    if (notFound(e)) return false;
    throw e;
  }
}

// A run's files as a weight store (size / read / prefetch, as WeightStore).
export class RunStore {
  constructor(name) {
    this.name = checkRunName(name);
    this.dir = null;
  }

  async file(path) {
    this.dir ??= await runDir(this.name);
    try {
      return await (await fileHandle(this.dir, path, false)).getFile();
    } catch (e) {
      if (notFound(e)) return null;
      throw e;
    }
  }

  async size(path) {
    return (await this.file(path))?.size ?? null;
  }

  async read(path, start, length) {
    const f = await this.file(path);
    if (!f) throw new Error(`opfs:${this.name}/${path} does not exist`);
    return new Uint8Array(await f.slice(start, start + length).arrayBuffer());
  }

  async prefetch() {}
}
