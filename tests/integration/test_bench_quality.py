"""bench/quality.py refuses to score on windows its sketches were calibrated on, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("eval_range", ["0.4:0.6", "0:1"])
def test_an_eval_range_that_meets_the_calibration_range_is_refused(tmp_path, eval_range):
    out = tmp_path / "q.json"
    argv = [sys.executable, str(ROOT / "bench" / "quality.py"), "--configs", "int3-g4", "--eval-range", eval_range]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"--eval-range {eval_range} meets --calib-range 0.5:1" in done.stderr
    assert not out.exists()


def test_a_saved_sketch_is_scored_with_its_own_seed_and_refused_under_another_config(tmp_path, monkeypatch):
    import importlib
    import json

    from model_utils import sketch_tiny_with_cli

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # bench scripts import their shared module, _common, from bench/
    quality = importlib.import_module("quality")
    tiny = sketch_tiny_with_cli(tmp_path, extra_args=["--seed", "3"])
    out = tmp_path / "q.json"
    argv = ["--model", str(tiny["hf"]), "--text", str(tiny["calib"]), "--nsamples", "4", "--seq-len", "32"]
    argv += ["--eval-windows", "2", "--eval-range", "0:0.25", "--out", str(out)]
    with pytest.raises(SystemExit, match=r"is not configuration int2-g4: its sketch has groups_per_row 2 \(config 4\)"):
        quality.main([*argv, "--configs", "int2-g4", "--sketched", f"int2-g4={tiny['sketch']}"])
    with pytest.raises(SystemExit, match=r"act_order False \(config True\)"):
        quality.main([*argv, "--configs", "int2-g4-ao", "--sketched", f"int2-g4-ao={tiny['sketch']}"])
    quality.main([*argv, "--configs", "int2-g2", "--sketched", f"int2-g2={tiny['sketch']}"])
    row = json.loads(out.read_text())["runs"]["int2-g2"]
    assert row["seed"] == 3 and row["bits"] == 2 and row["groups_per_row"] == 2
    assert row["ppl"] > 1 and row["sketch_dir"] == str(tiny["sketch"])
