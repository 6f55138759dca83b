#!/usr/bin/env bash
# ldm-web build, set-up and test driver. Every install step lives here and is idempotent, so a
# fresh Debian machine needs only:
#   ./build.sh serve [ARGS]  set up, build, and run `ldm serve ARGS` (the app on http://127.0.0.1:8080;
#                            PORT=..., --models DIR serves model folders at /models/)
#   ./build.sh test      set up, build, and run every test: unit, native kernels, Chromium, Firefox
# Other subcommands: setup, build, wasm, bench [small|sd], bench-browser [small|sd|depth [ESTIMATOR]|train [STEPS]],
#                    ort-compare [fixture|sd15-div5] (against ONNX Runtime Web; needs CPU torch).
# CARGO_TARGET_DIR is honoured (CI keeps it outside the clone to reuse builds).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BROWSER_DIR="$ROOT/tests/browser"
APT_PACKAGES=(mesa-vulkan-drivers libvulkan1 chromium firefox-esr binaryen)
# wgpu's Vulkan loader wants a runtime dir; headless machines often have none.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d /tmp/ldm-xdg.XXXXXX)}"
[ -d "$XDG_RUNTIME_DIR" ] || mkdir -p -m 700 "$XDG_RUNTIME_DIR"

log() { printf '\n==> %s\n' "$*"; }

# Seconds each part of a run took, printed in the test summary.
TIMES=()
STARTED=$(date +%s)
mark() { MARK=$(date +%s); }
took() { TIMES+=("$1: $(( $(date +%s) - MARK )) s"); }

wasm_bindgen_version() {
  # The CLI must be exactly the version of the wasm-bindgen crate in Cargo.lock.
  awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock
}

setup() {
  log "set-up (idempotent)"
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing apt packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
  rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
  # The threads build rebuilds std (see build_wasm_threads).
  rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src
  local want
  want="$(wasm_bindgen_version)"
  if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$want" ]; then
    echo "installing wasm-bindgen-cli $want (takes several minutes once)"
    # --locked first; one of 0.2.130's locked dependencies was yanked, so fall back to a fresh resolve.
    cargo install wasm-bindgen-cli --version "$want" --locked || cargo install wasm-bindgen-cli --version "$want"
  fi
  if [ ! -f "$BROWSER_DIR/node_modules/.package-lock.json" ] || [ "$BROWSER_DIR/package-lock.json" -nt "$BROWSER_DIR/node_modules/.package-lock.json" ]; then
    (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund)
  fi
}

build_native() {
  log "native build (release)"
  cargo build --release --bin ldm
}

build_wasm() {
  log "wasm build"
  cargo build --lib --target wasm32-unknown-unknown --profile wasm-release
  local raw="$TARGET_DIR/wasm32-unknown-unknown/wasm-release/ldm_web.wasm"
  rm -rf www/pkg
  wasm-bindgen --target web --no-typescript --out-dir www/pkg "$raw"
  # Debian's binaryen (108) breaks wasm-bindgen's externref table; use the pinned npm build.
  node "$BROWSER_DIR/node_modules/binaryen/bin/wasm-opt" -Os --enable-reference-types --enable-bulk-memory \
    --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals --enable-multivalue --enable-simd \
    www/pkg/ldm_web_bg.wasm -o www/pkg/ldm_web_bg.wasm
  # CLIP's BPE merges, fetched by the page only for single-file checkpoints (they carry no tokenizer).
  cp assets/clip/bpe_simple_vocab_16e6.txt.gz www/pkg/clip-bpe.txt.gz
  # The built-in model ships with the app, served from www/builtin/ (by ldm serve or any static server).
  rm -rf www/builtin
  mkdir -p www/builtin
  cp -r assets/builtin/emoji assets/builtin/LICENSES www/builtin/
  local size gz
  size=$(stat -c %s www/pkg/ldm_web_bg.wasm)
  gz=$(gzip -9 -c www/pkg/ldm_web_bg.wasm | wc -c)
  echo "www/pkg/ldm_web_bg.wasm: $size bytes after wasm-opt, $gz bytes gzipped"
  build_wasm_threads
}

build_wasm_threads() {
  # The same engine for cross-origin-isolated pages: shared memory and atomics, so the CPU backend
  # runs on a pool of Web Workers. Its std must be rebuilt with atomics (rust-src; -Z build-std on
  # this stable compiler through RUSTC_BOOTSTRAP); a target dir of its own keeps both builds cached.
  log "wasm build, threads"
  local tdir="$TARGET_DIR/wasm-threads"
  # The linker makes the memory shared and imported (so every worker maps the same one) and exports
  # what wasm-bindgen needs to give each thread its own TLS and stack.
  local link=""
  for a in --shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls --export=__tls_size --export=__tls_align --export=__tls_base; do
    link="$link -C link-arg=$a"
  done
  RUSTC_BOOTSTRAP=1 RUSTFLAGS="-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128$link" \
    cargo build --lib --target wasm32-unknown-unknown --profile wasm-release --features threads \
    -Z build-std=panic_abort,std --target-dir "$tdir"
  rm -rf www/pkg-mt
  wasm-bindgen --target web --no-typescript --out-dir www/pkg-mt "$tdir/wasm32-unknown-unknown/wasm-release/ldm_web.wasm"
  node "$BROWSER_DIR/node_modules/binaryen/bin/wasm-opt" -Os --enable-reference-types --enable-bulk-memory \
    --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals --enable-multivalue --enable-simd --enable-threads \
    www/pkg-mt/ldm_web_bg.wasm -o www/pkg-mt/ldm_web_bg.wasm
  echo "www/pkg-mt/ldm_web_bg.wasm: $(stat -c %s www/pkg-mt/ldm_web_bg.wasm) bytes after wasm-opt"
}

run_tests() {
  local results=() failed=0
  log "unit tests"
  mark
  local unit
  if unit=$(cargo test --release --lib --bins 2>&1); then :; else failed=1; fi
  echo "$unit" | tail -n 25
  local up uf
  up=$(echo "$unit" | sed -n 's/^test result: .* \([0-9]\+\) passed; \([0-9]\+\) failed.*/\1/p' | awk '{s += $1} END {print s + 0}')
  uf=$(echo "$unit" | sed -n 's/^test result: .* \([0-9]\+\) passed; \([0-9]\+\) failed.*/\2/p' | awk '{s += $1} END {print s + 0}')
  results+=("unit: ${up:-0} passed, ${uf:-1} failed")
  took "unit tests"

  log "Stable Diffusion and the CompVis LDMs against diffusers: schedulers, models, pipelines, CLI (native)"
  mark
  local sd sp sf
  if sd=$(cargo test --release --test schedulers --test sd_reference --test ldm_reference --test builtin --test sd_pipeline --test sd_conditions --test families --test cli --test serve -- --nocapture 2>&1); then :; else failed=1; fi
  echo "$sd" | grep -E '^(case |test |sd[12]|sdxl|vqmodel|uncond_|superres_|text2im_|ldm generate|bert |builtin|built-in|taesd|lora|LoRA|bad/|odd |merge|.*: max abs diff|test result)' | tail -n 300
  sp=$(echo "$sd" | sed -n 's/^test result: .* \([0-9]\+\) passed; \([0-9]\+\) failed.*/\1/p' | awk '{s += $1} END {print s + 0}')
  sf=$(echo "$sd" | sed -n 's/^test result: .* \([0-9]\+\) passed; \([0-9]\+\) failed.*/\2/p' | awk '{s += $1} END {print s + 0}')
  if echo "$sd" | grep -q '^error'; then sf=$((sf + 1)); echo "$sd" | grep -A 10 '^error' | head -40; fi
  results+=("diffusers reference: ${sp} passed, ${sf} failed")
  took "diffusers reference (build + run)"

  log "kernel tests, native (Vulkan; lavapipe here) and on the CPU backend"
  mark
  local logs
  logs=$(mktemp -d /tmp/ldm-test-logs.XXXXXX)
  if cargo test --release --test kernels 2>&1 | tee "$logs/native.log"; then :; else failed=1; fi
  results+=("$(grep '^native (' "$logs/native.log" | tail -1 || echo 'native: 0 passed, 1 failed (did not run)')")
  results+=("$(grep '^cpu backend (' "$logs/native.log" | tail -1 || echo 'cpu backend: 0 passed, 1 failed (did not run)')")
  took "kernels, native"

  log "kernel tests, Chromium and Firefox (WebGPU in a Web Worker, then the CPU backend)"
  mark
  if node "$BROWSER_DIR/run.mjs" --www www --timeout-min 40 2>&1 | tee "$logs/browser.log"; then :; else failed=1; fi
  results+=("$(grep -E '^(chromium|firefox)( |:)' "$logs/browser.log" || echo 'browsers: 0 passed, 1 failed (did not run)')")
  # The same suite on the engine's CPU backend, in both browsers: the threads build with a pool of
  # two workers and the single-threaded build.
  for threads in 2 0; do
    if node "$BROWSER_DIR/run.mjs" --www www --device cpu --threads "$threads" --timeout-min 8 2>&1 | tee "$logs/browser-cpu$threads.log"; then :; else failed=1; fi
    results+=("$(grep -E '^(chromium|firefox)( |:)' "$logs/browser-cpu$threads.log" | sed "s/^\([a-z]*\) /\1, threads=$threads, /" || echo "browsers, CPU backend threads=$threads: 0 passed, 1 failed (did not run)")")
  done
  took "kernels, Chromium + Firefox"

  log "the web app end to end: Chromium and Firefox against ldm serve"
  mark
  mkdir -p "$TARGET_DIR/e2e-artifacts"
  if node "$BROWSER_DIR/e2e.mjs" --ldm "$TARGET_DIR/release/ldm" --www www --fixtures tests/fixtures \
      --artifacts "$TARGET_DIR/e2e-artifacts" 2>&1 | tee "$logs/e2e.log"; then :; else failed=1; fi
  results+=("$(grep -E '^(chromium|firefox) e2e:' "$logs/e2e.log" || echo 'app e2e: 0 passed, 1 failed (did not run)')")
  took "app e2e, Chromium + Firefox"

  log "summary"
  printf '%s\n' "${results[@]}"
  local tp tf
  tp=$(printf '%s\n' "${results[@]}" | grep -o '[0-9]\+ passed' | awk '{s += $1} END {print s + 0}')
  tf=$(printf '%s\n' "${results[@]}" | grep -o '[0-9]\+ failed' | awk '{s += $1} END {print s + 0}')
  [ "$failed" -eq 0 ] || [ "$tf" -gt 0 ] || tf=1
  echo "total: $tp passed, $tf failed"
  printf 'time: %s\n' "${TIMES[@]}"
  echo "time, all: $(( $(date +%s) - STARTED )) s"
  [ "$failed" -eq 0 ]
}

cmd="${1:-}"
case "$cmd" in
  setup) setup ;;
  build) setup; build_native; build_wasm ;;
  wasm) setup; build_wasm ;;
  test)
    mark; setup; took "set-up"
    mark; build_native; took "native build"
    mark; build_wasm; took "wasm build"
    run_tests
    ;;
  serve)
    setup; build_native; build_wasm
    shift
    log "ldm serve (Ctrl-C stops)"
    args=(--root www)
    if [ -n "${PORT:-}" ]; then args+=(--port "$PORT"); fi
    exec "$TARGET_DIR/release/ldm" serve "${args[@]}" "$@"
    ;;
  bench)
    setup; build_native
    "$TARGET_DIR/release/ldm" bench kernels --shapes "${2:-small}"
    ;;
  bench-browser)
    setup; build_wasm
    case "${2:-small}" in
      # Depth estimation of a 512x512 photo (ldm bench depth): ESTIMATOR = depth-anything-v2-small or dpt-hybrid-midas.
      depth) node "$BROWSER_DIR/run.mjs" --www www --mode bench --timeout-min 60 --query "mode=depth&model=${3:-depth-anything-v2-small}" ;;
      # Training steps (ldm bench train) of the Noto->Twemoji demonstration's settings, auto device.
      train) node "$BROWSER_DIR/run.mjs" --www www --mode bench --timeout-min 60 --query "mode=train&device=auto&steps=${3:-5}&batch=8&resolution=64&channels=64,128" ;;
      *) node "$BROWSER_DIR/run.mjs" --www www --mode bench --which "${2:-small}" ;;
    esac
    ;;
  ort-compare)
    # One UNet step in ONNX Runtime Web and in ldm-web, same Chromium, same inputs. Needs a Python
    # with CPU torch, diffusers, onnx and onnxscript (PYTHON=...; see scripts/ort_compare.py).
    setup; build_wasm
    py="${PYTHON:-python3}"
    case "${2:-fixture}" in
      fixture) dir=target/ort/fixture; model=../tests/fixtures/sd1/; latent=8
        OMP_NUM_THREADS=1 "$py" scripts/ort_compare.py --model tests/fixtures/sd1 --out "$dir" ;;
      sd15-div5) dir=target/ort/sd15-div5; model="../$dir/sd15-shaped/"; latent=32
        OMP_NUM_THREADS=1 "$py" scripts/ort_compare.py --sd15-shaped --width-div 5 --latent 32 32 --out "$dir" ;;
      *) echo "ort-compare fixture|sd15-div5" >&2; exit 2 ;;
    esac
    node "$BROWSER_DIR/ort-compare.mjs" --dir "$dir" --runs "${RUNS:-3}" --timeout 1800 --json "$dir/result.json" \
      --ours "www/bench.html?mode=unet&model=$model&inputs=../$dir/&output=1&decode=0&runs=${RUNS:-3}&latent=$latent"
    ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    [ -n "$cmd" ] && { echo "unknown subcommand: $cmd" >&2; exit 2; }
    ;;
esac
