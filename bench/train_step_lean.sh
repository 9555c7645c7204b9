#!/usr/bin/env bash
# Before/after CPU figures of the lean training step (donation, chunked loss,
# dot_product_attention): bench/train_step.py at a SmolLM2-135M-like shape (4 layers),
# run on the code of BEFORE_REV and on this checkout. Writes two JSON files.
#
#   bench/train_step_lean.sh [BEFORE_REV] [OUT_DIR]      # defaults: 2128bf8 bench/results/training-step
set -euo pipefail
before=${1:-2128bf8}
out=${2:-bench/results/training-step}
python=${PYTHON:-python}
root=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$root" archive "$before" | tar -x -C "$tmp"
args=(--hidden 576 --intermediate 1536 --layers 4 --heads 9 --kv-heads 3 --vocab 49152
      --batch 4 --seq 512 --steps 3 --warmup 1)

run() {  # run NAME CODE_DIR REV
  PYTHONPATH="$2" JAX_PLATFORMS=cpu "$python" "$2/bench/train_step.py" "${args[@]}" > "$tmp/$1.json"
  "$python" - "$tmp/$1.json" "$3" "${args[@]}" > "$out/train-step-lean-$1-cpu.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
result["code_rev"] = sys.argv[2]
result["command"] = "bench/train_step_lean.sh, running bench/train_step.py " + " ".join(sys.argv[3:])
print(json.dumps(result, indent=2))
PY
}
run before "$tmp" "$(git -C "$root" rev-parse "$before")"
run after "$root" "$(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD -- sketchtune_jax || echo -dirty)"
