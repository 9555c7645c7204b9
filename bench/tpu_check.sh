#!/usr/bin/env bash
# One prepared check for a TPU (v4/v5e/v5p/v6e), about 9 minutes in all (the step limits
# sum to 540 s). From the repository root, with jax[tpu] already installed:
#
#     OUT=./tpu-out bash bench/tpu_check.sh
#
# 1. installs the project (no dependencies), 2. runs the Mosaic TPU kernel tests compiled
# (SKETCHTUNE_KERNEL_INTERPRET=0, against the jnp twins) and the backend tests,
# 3. benchmarks the kernels (bytes/s as a fraction of the chip's HBM bandwidth, beside bf16
# dense and the jnp twin), the SmolLM2 forward pass and the training step at SmolLM2 and
# Llama-3-8B layer shapes. The automatic backend is Mosaic TPU here; each JSON records it.
# Every step has its own time limit and the script goes on after a failure;
# $OUT/summary.json records each step's exit status and seconds.
set -u -o pipefail

OUT="${OUT:-./tpu-out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"

# step NAME LIMIT_S JSON_FILE|- CMD...: runs CMD under a time limit; stdout to JSON_FILE
# when one is named (the benches print JSON), everything to $OUT/NAME.log.
step() {
  local name=$1 limit=$2 json=$3
  shift 3
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
  if [ "$json" = "-" ]; then
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$OUT/$json" 2>> "$OUT/$name.log"
  fi
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$SUMMARY"
}

"$PY" - > "$OUT/device.json" <<'EOF'
import json, jax
from pallas_kernels import describe
d = jax.devices()[0]
print(json.dumps({"platform": d.platform, "device": d.device_kind, "count": jax.device_count(),
                  "jax": jax.__version__, "kernel_backend": describe()["kernel_backend"]}))
EOF
cat "$OUT/device.json"

step install 45 - "$PY" -m pip install --no-deps -q -e .

step kernel_tests 120 - env SKETCHTUNE_KERNEL_INTERPRET=0 \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_tpu.py tests/test_kernel_backends.py

# Kernels: SmolLM2-135M layers (576 hidden, 1536 MLP) then Llama-3-8B's (the default).
step kernels_smollm2 40 kernels-smollm2.json \
  "$PY" bench/kernel_speed.py --layers 576x576,192x576,1536x576,576x1536 --iters 5 --dtype bfloat16
step kernels_llama3_8b 110 kernels-llama3-8b.json \
  "$PY" bench/kernel_speed.py --iters 5 --dtype bfloat16

# The real SmolLM2 forward and decoding need the GGUF and WikiText under shared/data.
if [ -f shared/data/wikitext-2/test.txt ] || [ -f ../shared/data/wikitext-2/test.txt ]; then
  DATA=shared/data/wikitext-2/test.txt
  [ -f "$DATA" ] || DATA=../shared/data/wikitext-2/test.txt
  step forward_smollm2 60 forward-smollm2.json \
    "$PY" bench/forward.py --model smollm2-135m --data "$DATA" --dtype bfloat16 --seq-len 512 \
    --windows 4 --decode-rows 16 --decode-tokens 64 --skip-transformers
else
  printf 'forward_smollm2\tskipped (no shared/data)\t0\n' | tee -a "$SUMMARY"
fi

# Training step, sketched vs dense, at SmolLM2's shapes and at one Llama-3-8B layer.
step train_smollm2 70 train-smollm2.json \
  "$PY" bench/train_step.py --hidden 576 --intermediate 1536 --layers 4 --heads 9 --kv-heads 3 \
  --vocab 49152 --batch 4 --seq 512 --dtype bfloat16 --steps 5
step train_llama3_8b_layer 95 train-llama3-8b-layer.json \
  "$PY" bench/train_step.py --hidden 4096 --intermediate 14336 --layers 1 --heads 32 --kv-heads 8 \
  --vocab 32000 --batch 4 --seq 2048 --dtype bfloat16 --steps 3

"$PY" - "$SUMMARY" > "$OUT/summary.json" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print(json.dumps({name: {"status": rc, "seconds": int(s)} for name, rc, s in rows}, indent=1))
EOF
cat "$OUT/summary.json"
