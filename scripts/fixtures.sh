#!/usr/bin/env bash
# Regenerate the test fixtures (tiny random-weight SD1/SD2 models, image-conditioned models (inpainting,
# depth, ControlNet, x4 upscaler) and CompVis LDM models, diffusers reference outputs, scheduler
# trajectories, diffusers' images of the built-in model).
# Idempotent: creates the Python venv only if it lacks diffusers; re-running reproduces
# byte-identical files. Venv location: $LDM_VENV (default /work/venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LDM_VENV:-/work/venv}"
if ! "$VENV/bin/python" -c "import diffusers, transformers, torch" >/dev/null 2>&1; then
  echo "fixtures.sh: creating venv at $VENV" >&2
  bash "$ROOT/scripts/install-cpu-torch.sh" "$VENV"
fi
# diffusers' LMS scheduler integrates its coefficients with scipy.
"$VENV/bin/python" -c "import scipy" >/dev/null 2>&1 || "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check scipy
cd "$ROOT"
# one thread: CPU kernels reduce in a fixed order, so outputs are bit-reproducible
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
"$VENV/bin/python" scripts/make_fixtures.py "$@"
"$VENV/bin/python" scripts/cond_fixtures.py
"$VENV/bin/python" scripts/scheduler_fixtures.py
"$VENV/bin/python" scripts/ldm_fixtures.py
# diffusers' images of the committed built-in model (assets/builtin/emoji)
"$VENV/bin/python" scripts/builtin/reference.py
