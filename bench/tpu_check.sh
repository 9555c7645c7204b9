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
# shellcheck source=bench/_device_check.sh
source "$(dirname "$0")/_device_check.sh"
record_device

step install 45 - "$PY" -m pip install --no-deps -q -e .

step kernel_tests 120 - env SKETCHTUNE_KERNEL_INTERPRET=0 \
  "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_kernels_tpu.py tests/unit/test_kernel_backends.py


model_benches 110 60 70 95
write_summary
