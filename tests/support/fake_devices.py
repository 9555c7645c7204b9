"""Rerun a test file on N fake CPU devices: ``XLA_FLAGS`` must ask for them before JAX
starts, and the rest of the suite runs on one."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest


def rerun_on_fake_devices(test_file: str, devices: int, runner_test: str) -> None:
    """Run ``test_file`` in a fresh interpreter with ``devices`` CPU devices, all but
    ``runner_test`` (the test calling this); fail with its output unless all pass."""
    if jax.device_count() >= devices:
        pytest.skip(f"already on {devices} devices: the tests below run in this process")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", f"not {runner_test}"],
        env=env,
        capture_output=True,
        text=True,
        # Generous: compiling for 8 devices on 2 shared CPU cores can take minutes.
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
