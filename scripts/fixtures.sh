#!/usr/bin/env bash
# Regenerate the test fixtures (tiny random-weight SD1/SD2 models, image-conditioned models (inpainting,
# depth, ControlNet, x4 upscaler), CompVis LDM models (and concatenation-conditioned ones converted from
# the CompVis layout), depth estimators, OpenCV canny edge maps, the SDXL / turbo / LCM / TAESD family with LoRA and
# textual-inversion files, diffusers reference outputs, scheduler trajectories, diffusers' images of the
# built-in model, torch autograd's gradients and an AdamW run).
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
# diffusers' LoRA loading needs the PEFT backend (family_fixtures.py); see install-cpu-torch.sh
"$VENV/bin/python" -c "import peft" >/dev/null 2>&1 || "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check --no-deps peft==0.21.2
# OpenCV's cv2.Canny is the reference for edge maps (see install-cpu-torch.sh)
"$VENV/bin/python" -c "import cv2" >/dev/null 2>&1 || "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check --no-deps opencv-python-headless==4.12.0.88
cd "$ROOT"
# one thread: CPU kernels reduce in a fixed order, so outputs are bit-reproducible
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
"$VENV/bin/python" scripts/make_fixtures.py "$@"
"$VENV/bin/python" scripts/cond_fixtures.py
"$VENV/bin/python" scripts/scheduler_fixtures.py
"$VENV/bin/python" scripts/ldm_fixtures.py
# concatenation-conditioned LDMs: CompVis-layout checkpoints, converted, against a CompVis DDIM sampler
"$VENV/bin/python" scripts/concat_fixtures.py
# depth estimators (DPT, DPT-Hybrid, Depth Anything) and depth-to-image with its own estimator
# (reads sd2-depth/ from cond_fixtures.py); OpenCV's canny edge maps
"$VENV/bin/python" scripts/depth_fixtures.py
"$VENV/bin/python" scripts/preprocess_fixtures.py
# SDXL (base, refiner, inpainting, turbo), SD-Turbo, LCM, SDXL ControlNet, TAESD, LoRA / textual-inversion
# files, .ckpt and malformed inputs, A1111 prompt weighting (reads sd1/, sd2/, ldm/uncond/, images/)
"$VENV/bin/python" scripts/family_fixtures.py
# torch autograd's gradients and an AdamW run of a small network (src/autograd's tests)
"$VENV/bin/python" scripts/autograd_fixtures.py
# a tiny concatenation-conditioned UNet2DModel: its gradients and a 50-step training run by torch + diffusers (src/training's tests)
"$VENV/bin/python" scripts/training_fixtures.py
# a PEFT LoRA on tests/fixtures/sd1's UNet: its gradients, a 20-step run and diffusers' saved file (src/training/lora.rs's tests)
"$VENV/bin/python" scripts/lora_training_fixtures.py
# diffusers' images of the committed built-in model (assets/builtin/emoji)
"$VENV/bin/python" scripts/builtin/reference.py
