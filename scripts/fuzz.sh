#!/usr/bin/env bash
# Fuzzes what users hand ldm-web: weight files (safetensors, PyTorch zips and pickles), LoRA
# files and prompts, with cargo-fuzz (libFuzzer) on the stable toolchain (RUSTC_BOOTSTRAP for its
# flags; no sanitizer: the code has no unsafe of its own, so a crash is a panic, a hang or an
# out-of-memory). Seeds come from tests/fixtures. Not part of ./build.sh test.
#
#   scripts/fuzz.sh [SECONDS per target, default 60] [TARGET...]   (checkpoint unpickle lora prompt)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(checkpoint unpickle lora prompt)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
dir=tests/fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build --fuzz-dir "$dir" -s none -O

# Seed corpora (rebuilt each run; what libFuzzer finds is kept in $dir/corpus/TARGET).
seed() { mkdir -p "$dir/corpus/$1"; cp "${@:2}" "$dir/corpus/$1/" 2>/dev/null || true; }
fx=tests/fixtures
seed checkpoint $fx/bad/* $fx/embeddings/* "$fx/sd1/text_encoder/config.json"
head -c 65536 $fx/sd1.ckpt > "$dir/corpus/checkpoint/sd1-head.ckpt"
mkdir -p "$dir/corpus/unpickle"
python3 - "$dir/corpus/unpickle" $fx/embeddings/a1111-style.pt $fx/bad/os_system.ckpt $fx/lora/sd1-kohya.pt <<'PY'
import sys, zipfile, os
out = sys.argv[1]
for p in sys.argv[2:]:
    with zipfile.ZipFile(p) as z:
        for n in z.namelist():
            if n.endswith("data.pkl"):
                open(os.path.join(out, os.path.basename(p) + ".pkl"), "wb").write(z.read(n))
PY
cp $fx/bad/legacy.pt "$dir/corpus/unpickle/"
mkdir -p "$dir/corpus/lora"
for f in $fx/lora/*.safetensors $fx/lora/*.pt; do head -c 65536 "$f" > "$dir/corpus/lora/$(basename "$f")"; done
seed lora $fx/embeddings/*.safetensors
mkdir -p "$dir/corpus/prompt"
printf '%s' '(red:1.3) apple, [blue] sky' > "$dir/corpus/prompt/weights"
printf '%s' 'a ((cat)) BREAK \(escaped\) [[dog]] (x:-0.5) (unclosed' > "$dir/corpus/prompt/syntax"
printf '%s' 'a photo of an astronaut riding a horse on mars, 宇宙飛行士 🐴 !!!' > "$dir/corpus/prompt/unicode"

status=0
for t in "${targets[@]}"; do
  mkdir -p "$dir/artifacts/$t"
  echo "== $t: ${secs}s"
  if cargo fuzz run --fuzz-dir "$dir" -s none -O "$t" "$dir/corpus/$t" -- \
      -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
      -artifact_prefix="$dir/artifacts/$t/" -print_final_stats=1 2>&1 | tee "$dir/artifacts/$t.log" | grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|==[0-9]+== ERROR|thread .* panicked)'; then :; fi
  if grep -qE 'SUMMARY|panicked|ERROR: libFuzzer' "$dir/artifacts/$t.log"; then status=1; echo "$t: FAILED (see $dir/artifacts/$t.log)"; fi
done
exit $status
