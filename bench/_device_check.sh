# Sourced by gpu_check.sh and tpu_check.sh: the step runner, the device record, the model benches
# both devices run, and the summary. The sourcing script sets OUT (and PYTHON, optionally) first.
OUT="${OUT:?set OUT before sourcing _device_check.sh}"
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

# The device, jax and the kernel backend the automatic choice takes, to $OUT/device.json.
record_device() {
  "$PY" - > "$OUT/device.json" <<'PYEOF'
import json, jax
from pallas_kernels import describe
d = jax.devices()[0]
print(json.dumps({"platform": d.platform, "device": d.device_kind, "count": jax.device_count(),
                  "jax": jax.__version__, "kernel_backend": describe()["kernel_backend"]}))
PYEOF
  cat "$OUT/device.json"
}

# model_benches KERNELS_8B_S FORWARD_S TRAIN_S TRAIN_8B_S: kernels at SmolLM2-135M's layers (576
# hidden, 1536 MLP) then Llama-3-8B's; the real SmolLM2 forward and decoding (needs the GGUF and
# WikiText under shared/data); the training step, sketched vs dense, at SmolLM2's shapes and at
# one Llama-3-8B layer. Each argument is that step's time limit.
model_benches() {
  step kernels_smollm2 40 kernels-smollm2.json \
    "$PY" bench/kernel_speed.py --layers 576x576,192x576,1536x576,576x1536 --iters 5 --dtype bfloat16
  step kernels_llama3_8b "$1" kernels-llama3-8b.json \
    "$PY" bench/kernel_speed.py --iters 5 --dtype bfloat16
  local data=shared/data/wikitext-2/test.txt
  [ -f "$data" ] || data=../shared/data/wikitext-2/test.txt
  if [ -f "$data" ]; then
    step forward_smollm2 "$2" forward-smollm2.json \
      "$PY" bench/forward.py --model smollm2-135m --data "$data" --dtype bfloat16 --seq-len 512 \
      --windows 4 --decode-rows 16 --decode-tokens 64 --skip-transformers
  else
    printf 'forward_smollm2\tskipped (no shared/data)\t0\n' | tee -a "$SUMMARY"
  fi
  step train_smollm2 "$3" train-smollm2.json \
    "$PY" bench/train_step.py --hidden 576 --intermediate 1536 --layers 4 --heads 9 --kv-heads 3 \
    --vocab 49152 --batch 4 --seq 512 --dtype bfloat16 --steps 5
  step train_llama3_8b_layer "$4" train-llama3-8b-layer.json \
    "$PY" bench/train_step.py --hidden 4096 --intermediate 14336 --layers 1 --heads 32 --kv-heads 8 \
    --vocab 32000 --batch 4 --seq 2048 --dtype bfloat16 --steps 3
}

# Each step's exit status and seconds, from $SUMMARY to $OUT/summary.json.
write_summary() {
  "$PY" - "$SUMMARY" > "$OUT/summary.json" <<'PYEOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print(json.dumps({name: {"status": rc, "seconds": int(s)} for name, rc, s in rows}, indent=1))
PYEOF
  cat "$OUT/summary.json"
}
