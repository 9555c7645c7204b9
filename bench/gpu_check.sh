#!/usr/bin/env bash
# One prepared check for an NVIDIA GPU (H100/H200; Triton needs Ampere or newer), about
# 11 minutes in all (the step limits sum to 660 s). From the repository root, with jax[cuda] already installed:
#
#     OUT=./gpu-out bash bench/gpu_check.sh
#
# 1. installs the project (no dependencies), 2. runs the kernel tests compiled
# (SKETCHTUNE_KERNEL_BACKEND=pallas, against the jnp twins) and the CUDA lowering tests,
# 3. benchmarks the kernels, the SmolLM2 forward pass and the training step at SmolLM2 and
# Llama-3-8B layer shapes. Every step has its own time limit and the script goes on
# after a failure; $OUT/summary.json records each step's exit status and seconds, and
# each step's JSON and log land beside it.
set -u -o pipefail

OUT="${OUT:-./gpu-out}"
# shellcheck source=bench/_device_check.sh
source "$(dirname "$0")/_device_check.sh"
record_device

step install 45 - "$PY" -m pip install --no-deps -q -e .

# Compiled kernels against their jnp twins (Triton); the lowering tests (Triton, Mosaic GPU,
# Mosaic TPU) need no device but must still pass beside one.
step kernel_tests 90 - env SKETCHTUNE_KERNEL_BACKEND=pallas \
  "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_kernels.py tests/integration/test_cuda_lowering.py tests/unit/test_kernel_backends.py

# The Mosaic GPU kernels compiled (forward, dx, codebook gradient; interpreted on CPU in
# tests/unit/test_kernels_mosaic_gpu.py, which runs them compiled here), against the jnp twins
# at model shapes (pallas_kernels/mosaic_gpu.py). Kernels bench beside it.
step mosaic_gpu_tests 60 - "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_kernels_mosaic_gpu.py
step mosaic_gpu_check 75 mosaic-gpu-check.json "$PY" - <<'PYEOF'
import json, jax, jax.numpy as jnp, numpy as np
from pallas_kernels import (pack_codes, sketched_matmul, sketched_matmul_grads,
                            sketched_matmul_grads_reference, sketched_matmul_reference)
rows = []
for bits in (2, 3, 4):
    for m, out, k, groups in [(1, 128, 2048, 2), (16, 4096, 4096, 1), (200, 1024, 4096, 4)]:
        rng = np.random.default_rng(0)
        cb = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), jnp.float32)
        codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, k // groups)), jnp.uint8), bits)
        x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        y = sketched_matmul(x, cb, codes, bits, backend="mosaic_gpu").astype(jnp.float32)
        ref = sketched_matmul_reference(x, cb, codes, bits).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
        rows.append(dict(kernel="forward", bits=bits, m=m, out=out, k=k, groups=groups, rel_err=err, ok=err < 2e-2))
    for m, out, k, groups in [(16, 4096, 4096, 1), (200, 1024, 4096, 4)]:
        rng = np.random.default_rng(1)
        cb = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), jnp.float32)
        codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, k // groups)), jnp.uint8), bits)
        x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        dy = jnp.asarray(rng.normal(size=(m, out)), jnp.bfloat16)
        grads = sketched_matmul_grads(x, cb, codes, bits, dy, backend="mosaic_gpu")
        for kernel, got, ref in zip(("dx", "dcodebook"), grads, sketched_matmul_grads_reference(x, cb, codes, bits, dy)):
            got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
            err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
            rows.append(dict(kernel=kernel, bits=bits, m=m, out=out, k=k, groups=groups, rel_err=err, ok=err < 2e-2))
print(json.dumps(rows, indent=1))
raise SystemExit(0 if all(r["ok"] for r in rows) else 1)
PYEOF

# Llama-3-8B's layers through the Mosaic GPU kernels.
step kernels_llama3_8b_mosaic_gpu 60 kernels-llama3-8b-mosaic-gpu.json \
  "$PY" bench/kernel_speed.py --iters 5 --dtype bfloat16 --backend mosaic_gpu --layers 4096x4096,14336x4096

model_benches 95 50 60 85
write_summary
