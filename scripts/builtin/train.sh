#!/usr/bin/env bash
# Trains the built-in emoji model from scratch, resumably: run it again after an interruption and
# every stage continues from its last checkpoint. Nobody needs this to use the app (the trained
# model is committed in assets/builtin/emoji); see README.md here for what each stage does and how
# long it took on 2 CPU cores.
#   LDM_VENV          the CPU PyTorch + diffusers venv (default /work/venv; made if missing)
#   LDM_BUILTIN_WORK  data, checkpoints and logs (default /work/builtin-train)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${LDM_VENV:-/work/venv}"
export LDM_BUILTIN_WORK="${LDM_BUILTIN_WORK:-/work/builtin-train}"
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# starve each other (measured: 10x slower while a compiler ran).
export OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0
mkdir -p "$LDM_BUILTIN_WORK"
if ! "$VENV/bin/python" -c "import diffusers, transformers, torch" >/dev/null 2>&1; then
  bash "$ROOT/scripts/install-cpu-torch.sh" "$VENV"
fi
PY="$VENV/bin/python"
cd "$HERE"
[ -f node_modules/.package-lock.json ] || npm ci --no-audit --no-fund
[ -f "$LDM_BUILTIN_WORK/emoji64.npz" ] || "$PY" data.py "$LDM_BUILTIN_WORK"
[ -f "$LDM_BUILTIN_WORK/autoencoder.json" ] || "$PY" train_autoencoder.py 2>&1 | tee -a "$LDM_BUILTIN_WORK/autoencoder.log"
[ -f "$LDM_BUILTIN_WORK/classifier.json" ] || "$PY" classifier.py 2>&1 | tee -a "$LDM_BUILTIN_WORK/classifier.log"
[ -f "$LDM_BUILTIN_WORK/unet.json" ] || "$PY" train_unet.py 2>&1 | tee -a "$LDM_BUILTIN_WORK/unet.log"
"$PY" export.py
"$PY" evaluate.py 2>&1 | tee "$LDM_BUILTIN_WORK/evaluate.log"
"$PY" card.py
OMP_NUM_THREADS=1 "$PY" reference.py
echo "done: $ROOT/assets/builtin/emoji (run ldm manifest on it, then the tests)"
