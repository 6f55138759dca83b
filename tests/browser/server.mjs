// Tiny static file server for the browser tests (node built-ins only).
//
//   import { startServer } from './server.mjs';
//   const srv = await startServer({ root: 'www', port: 0 });  // srv.url, await srv.close()
//
//   node tests/browser/server.mjs --root www --port 8080
//
// Binds 127.0.0.1 only. Sends COOP/COEP so pages are cross-origin isolated
// (SharedArrayBuffer, precise timers), supports HEAD and single-range requests.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.htm': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.txt': 'text/plain; charset=utf-8',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.gif': 'image/gif',
  '.webp': 'image/webp',
  '.svg': 'image/svg+xml',
  '.ico': 'image/x-icon',
  '.webmanifest': 'application/manifest+json',
  '.wgsl': 'text/plain; charset=utf-8',
  '.safetensors': 'application/octet-stream',
  '.bin': 'application/octet-stream',
};

export function mimeType(file) {
  return MIME[path.extname(file).toLowerCase()] ?? 'application/octet-stream';
}

// Parses a Range header against a file of `size` bytes.
// Returns null (no/ignored range: send the whole file), 'unsatisfiable', or {start, end} (inclusive).
export function parseRange(header, size) {
  if (!header) return null;
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(header);
  if (!m) return null; // multiple ranges or other units: serve the full body (allowed by RFC 9110)
  const [, a, b] = m;
  if (a === '' && b === '') return null;
  let start;
  let end;
  if (a === '') {
    // suffix range: last n bytes
    const n = Number(b);
    if (n === 0 || size === 0) return 'unsatisfiable';
    start = Math.max(0, size - n);
    end = size - 1;
  } else {
    start = Number(a);
    end = b === '' ? size - 1 : Math.min(Number(b), size - 1);
    if (b !== '' && Number(b) < start) return null; // invalid range spec: ignore
    if (start >= size) return 'unsatisfiable';
  }
  return { start, end };
}

// The app's own headers from `_headers` in the served folder (its `/*` section; see
// src/bin/ldm/serve.rs), set by startServer.
let appHeaders = {};

export function readHeadersFile(root) {
  let text;
  try {
    text = fs.readFileSync(path.join(root, '_headers'), 'utf8');
  } catch {
    return {};
  }
  const out = {};
  let inRoot = false;
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t || t.startsWith('#')) continue;
    if (!/^[ \t]/.test(line)) { inRoot = t === '/*'; continue; }
    const i = t.indexOf(':');
    if (inRoot && i > 0) out[t.slice(0, i).trim()] = t.slice(i + 1).trim();
  }
  return out;
}

function baseHeaders() {
  return {
    'Cache-Control': 'no-cache',
    'Cross-Origin-Opener-Policy': 'same-origin',
    'Cross-Origin-Embedder-Policy': 'require-corp',
    'Cross-Origin-Resource-Policy': 'same-origin',
    'X-Content-Type-Options': 'nosniff',
    ...appHeaders,
  };
}

function sendError(req, res, status, text) {
  const body = `${status} ${text}\n`;
  res.writeHead(status, {
    ...baseHeaders(),
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(req.method === 'HEAD' ? undefined : body);
}

// Maps a URL path to a file under root, or null when it would escape root.
function resolvePath(root, urlPath) {
  let decoded;
  try {
    decoded = decodeURIComponent(urlPath);
  } catch {
    return null;
  }
  if (decoded.includes('\0')) return null;
  const full = path.resolve(root, '.' + path.posix.normalize('/' + decoded));
  if (full !== root && !full.startsWith(root + path.sep)) return null;
  return full;
}

function handler(root, quiet) {
  return async (req, res) => {
    const log = (status) => {
      if (!quiet) console.log(`${req.method} ${req.url} ${status}`);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('Allow', 'GET, HEAD');
      log(405);
      return sendError(req, res, 405, 'Method Not Allowed');
    }
    const urlPath = new URL(req.url, 'http://localhost').pathname;
    let file = resolvePath(root, urlPath);
    if (file === null) {
      log(403);
      return sendError(req, res, 403, 'Forbidden');
    }
    let st;
    try {
      // realpath so a symlink inside root cannot lead outside it
      file = await fs.promises.realpath(file);
      if (file !== root && !file.startsWith(root + path.sep)) throw new Error('outside root');
      st = await fs.promises.stat(file);
      if (st.isDirectory()) {
        if (!urlPath.endsWith('/')) {
          res.writeHead(301, { ...baseHeaders(), Location: urlPath + '/' + new URL(req.url, 'http://localhost').search });
          log(301);
          return res.end();
        }
        file = path.join(file, 'index.html');
        st = await fs.promises.stat(file);
      }
      if (!st.isFile()) throw new Error('not a file');
    } catch {
      log(404);
      return sendError(req, res, 404, 'Not Found');
    }

    const size = st.size;
    const headers = {
      ...baseHeaders(),
      'Content-Type': mimeType(file),
      'Accept-Ranges': 'bytes',
      'Last-Modified': st.mtime.toUTCString(),
    };
    let range = parseRange(req.headers.range, size);
    // If-Range with a validator that does not match: send the whole file
    if (range && req.headers['if-range'] && req.headers['if-range'] !== headers['Last-Modified']) range = null;
    if (range === 'unsatisfiable') {
      res.writeHead(416, { ...baseHeaders(), 'Content-Range': `bytes */${size}`, 'Accept-Ranges': 'bytes', 'Content-Length': 0 });
      log(416);
      return res.end();
    }
    let status = 200;
    let start = 0;
    let end = size - 1;
    if (range) {
      status = 206;
      ({ start, end } = range);
      headers['Content-Range'] = `bytes ${start}-${end}/${size}`;
    }
    headers['Content-Length'] = size === 0 ? 0 : end - start + 1;
    res.writeHead(status, headers);
    log(status);
    if (req.method === 'HEAD' || size === 0) return res.end();
    const stream = fs.createReadStream(file, { start, end });
    stream.on('error', () => res.destroy());
    res.on('close', () => stream.destroy());
    stream.pipe(res);
  };
}

export async function startServer({ root, port = 0, host = '127.0.0.1', quiet = true } = {}) {
  if (!root) throw new Error('startServer: root is required');
  const absRoot = await fs.promises.realpath(path.resolve(root));
  appHeaders = readHeadersFile(absRoot);
  const server = http.createServer(handler(absRoot, quiet));
  const sockets = new Set();
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port: actualPort } = server.address();
  return {
    url: `http://${host}:${actualPort}/`,
    port: actualPort,
    root: absRoot,
    close() {
      return new Promise((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      });
    },
  };
}

function parseArgs(argv) {
  const opts = { root: '.', port: 8080, quiet: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--root') opts.root = val();
    else if (a === '--port') opts.port = Number(val());
    else if (a === '--quiet') opts.quiet = true;
    else if (a === '-h' || a === '--help') {
      console.log('usage: node server.mjs --root DIR [--port 8080] [--quiet]');
      process.exit(0);
    } else throw new Error(`unknown argument ${a}`);
  }
  return opts;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    const opts = parseArgs(process.argv.slice(2));
    const srv = await startServer(opts);
    console.log(`serving ${srv.root} at ${srv.url}`);
    const stop = async () => {
      await srv.close();
      process.exit(0);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  } catch (e) {
    console.error(String(e?.message ?? e));
    process.exit(2);
  }
}
