"""bench/gpu_check.sh and bench/tpu_check.sh, the one command each device kind runs, share their
step runner and model benches (bench/_device_check.sh); run here with a Python that does nothing,
each must still walk every step and write its summary."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_STEPS = ["kernels_smollm2", "kernels_llama3_8b", "forward_smollm2", "train_smollm2", "train_llama3_8b_layer"]
STEPS = {
    "gpu_check.sh": ["install", "kernel_tests", "mosaic_gpu_tests", "mosaic_gpu_check", "kernels_llama3_8b_mosaic_gpu"],
    "tpu_check.sh": ["install", "kernel_tests"],
}


@pytest.mark.parametrize("script", sorted(STEPS))
def test_device_check_walks_every_step_and_records_it(script, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", f"bench/{script}"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == STEPS[script] + SHARED_STEPS
    assert all(r[1] == "0" or r[1].startswith("skipped") for r in rows), rows
    assert (out / "device.json").exists() and (out / "summary.json").exists()
