#!/usr/bin/env bash
# The real-GPU benchmark, prepared here and run on a lent NVIDIA machine (the device tool):
#
#   scripts/device-bench.sh prepare   here: builds and gathers what the GPU machine needs into
#                                     .device/ (git-ignored through .git/info/exclude): the ldm
#                                     binary (stripped, xz), the Vulkan loader package, a diffusers
#                                     wheel. About 55 MB.
#   scripts/device-bench.sh run       there, with carry [".device"]: native `ldm bench unet` over
#                                     Vulkan for Stable Diffusion 1.5's UNet (random weights) at
#                                     512x512 (latent 64), batch 2, with f16 activations and f16,
#                                     q8_0 and q4_1 weights; then the same UNet step in PyTorch
#                                     fp16 eager (diffusers, SDPA) on the same GPU; prints per-step
#                                     times, their ratio to PyTorch and the achieved TFLOP/s (one
#                                     FLOP count, torch's FlopCounterMode) and writes the JSON to
#                                     $OUT (or .device/out). Designed to finish within 8 minutes.
#
# Note: the device tool sends the whole checkout, and this repository's tracked files (about
# 110 MB, most of it test fixtures and the built-in model) are over its 64 MiB transfer limit; a
# run needs a checkout without tests/fixtures (e.g. `git worktree` of a branch that drops them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEV=.device
LATENT="${LATENT:-64}"
RUNS="${RUNS:-5}"

prepare() {
  mkdir -p "$DEV"
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
  cargo build --release --bin ldm
  local target="${CARGO_TARGET_DIR:-$ROOT/target}"
  cp "$target/release/ldm" "$DEV/ldm"
  strip "$DEV/ldm"
  xz -T0 -6 -f "$DEV/ldm"
  # The Vulkan loader (the GPU machine has NVIDIA's driver and ICD, maybe no loader).
  local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64'
  (cd "$DEV" && rm -f ./*.deb && apt-get $o download libvulkan1)
  # diffusers for the PyTorch side (torch and transformers are there already).
  python3 -m pip download --no-deps --only-binary=:all: -d "$DEV" diffusers==0.42.1
  du -sh "$DEV"
}

run() {
  local out="${OUT:-$DEV/out}"
  mkdir -p "$out"
  for f in "$DEV"/*.deb; do dpkg -x "$f" /; done
  ldconfig
  local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$icd" ] && export VK_DRIVER_FILES="$icd"
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
  xz -dc "$DEV/ldm.xz" > /tmp/ldm && chmod +x /tmp/ldm
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$DEV"/diffusers-*.whl
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
  for w in float q8 q4_1; do
    echo "== ldm bench unet, UNet weights $w"
    timeout 150 /tmp/ldm bench unet --model sd15 --latent "$LATENT" --batch 2 --dtype f16 --unet "$w" --runs "$RUNS" --no-decode \
      > "$out/ldm-$w.json" || echo "ldm bench unet --unet $w failed (exit $?)"
  done
  echo "== PyTorch"
  timeout 150 python3 scripts/torch_unet_step.py --latent "$LATENT" --batch 2 --dtype fp16 --runs 10 --device cuda --json "$out/torch.json" > /dev/null \
    || echo "the PyTorch step failed (exit $?)"
  python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    try:
        with open(p) as f:
            return json.load(f)
    except Exception as e:
        print(f"{name}: {e}")
        return None
torch = load("torch.json")
flops = torch["flops_per_step"] if torch else None
rows = []
if torch:
    rows.append(("PyTorch fp16 eager (SDPA)", torch["step_ms_median"], None))
for w in ["float", "q8", "q4_1"]:
    r = load(f"ldm-{w}.json")
    if r:
        rows.append((f"ldm {r['unet_weights']} weights, UNet step", r["unet_step_ms"], r))
        rows.append((f"ldm {r['unet_weights']} weights, denoising loop step", r["loop_step_ms"], r))
print(f"{'what':48} {'ms/step':>9} {'x torch':>8} {'TFLOP/s':>8}")
base = torch["step_ms_median"] if torch else None
for what, ms, r in rows:
    ratio = f"{ms / base:8.2f}" if base else "       -"
    tf = f"{flops / (ms / 1e3) / 1e12:8.1f}" if flops else "       -"
    print(f"{what:48} {ms:9.2f} {ratio} {tf}")
    if r:
        print(f"{'':48} submissions/step {r['loop_submissions_per_step']:.2f}, readbacks/step {r['loop_readbacks_per_step']:.2f}, peak {r['peak_gpu_bytes'] / 2**30:.2f} GiB")
json.dump({"rows": [{"what": w, "ms": m} for w, m, _ in rows], "flops_per_step": flops}, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
