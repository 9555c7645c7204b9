"""bench/quality.py refuses to score on windows its sketches were calibrated on, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("eval_range", ["0.4:0.6", "0:1"])
def test_an_eval_range_that_meets_the_calibration_range_is_refused(tmp_path, eval_range):
    out = tmp_path / "q.json"
    argv = [sys.executable, str(ROOT / "bench" / "quality.py"), "--configs", "int3-g4", "--eval-range", eval_range]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"--eval-range {eval_range} meets --calib-range 0.5:1" in done.stderr
    assert not out.exists()
