// The kernel test page (tests.html): the suite in the engine worker; see runWorkerJob.
import { runWorkerJob } from './worker-job.js';

const out = document.getElementById('out');
const q = new URLSearchParams(location.search);
const filter = q.get('filter') ?? '';
// device=cpu: the suite on the engine's CPU backend instead of WebGPU.
const device = q.get('device') === 'cpu' ? 'cpu' : 'gpu';
out.textContent = `filter=${JSON.stringify(filter)} device=${device}; starting worker…`;
runWorkerJob({
  out, name: '__ldmTest', tag: 'ldm-tests', what: 'tests', message: { cmd: 'test', filter, device },
  validate: (res) => (res && Array.isArray(res.results) ? null : 'result has no results array'),
  render(res, log, secs) {
    const a = res.adapter ?? {};
    log(`adapter: ${a.name || '(no name)'} backend=${a.backend} shader_f16=${a.shader_f16} ` +
        `subgroups=${a.subgroups} timestamp_query=${a.timestamp_query} ` +
        `max_storage_buffer_binding_size=${a.max_storage_buffer_binding_size} profile=${a.profile}`);
    for (const r of res.results) {
      const err = r.max_err == null ? '' : ` err=${Number(r.max_err).toExponential(2)}`;
      const tol = r.tol == null ? '' : ` tol=${Number(r.tol).toExponential(1)}`;
      const msg = r.status === 'pass' || !r.message ? '' : `  ${r.message}`;
      log(`${r.status.padEnd(11)} ${r.name} ${r.dtype}${err}${tol}${msg}`);
    }
    log(`${res.passed} passed, ${res.failed} failed, ${res.unsupported} unsupported in ${secs} s`);
    out.classList.add(res.failed > 0 ? 'fail' : 'pass');
  },
});
