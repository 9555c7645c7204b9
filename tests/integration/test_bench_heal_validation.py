"""bench/heal_validation.py: heal variants of a tiny sketch scored on validation windows, resumable."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
from model_utils import sketch_tiny_with_cli


@pytest.fixture(scope="module")
def heal_validation():
    with pytest.MonkeyPatch.context() as mp:
        # bench scripts import their shared module, _common, from bench/
        mp.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
        yield importlib.import_module("heal_validation")


def test_variants_are_healed_scored_on_validation_windows_and_a_rerun_skips_them(tmp_path, heal_validation):
    tiny = sketch_tiny_with_cli(tmp_path)
    out = tmp_path / "val.json"
    argv = [str(tiny["sketch"]), "--teacher", str(tiny["hf"]), "--text", str(tiny["calib"])]
    argv += ["--val-windows", "2", "--val-seq-len", "32", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    flags = "--steps 2 --batch-size 2 --seq-len 32 --save-every 0 --lr 1e-2"
    heal_validation.main(argv + ["--variant", f"plain={flags}", "--variant", f"norms={flags} --train-norms"])
    got = json.loads(out.read_text())
    assert set(got["variants"]) == {"plain", "norms"}
    assert got["variants"]["norms"]["train_norms"] and not got["variants"]["plain"]["train_norms"]
    ppl = [got["val_ppl"]["teacher"], got["val_ppl"]["unhealed"], *(v["val_ppl"] for v in got["variants"].values())]
    assert all(math.isfinite(p) and p > 1 for p in ppl)
    assert got["variants"]["plain"]["val_ppl"] != got["val_ppl"]["unhealed"], "the heal changed nothing"
    seconds = got["variants"]["plain"]["seconds"]
    heal_validation.main(argv + ["--variant", f"plain={flags}"])
    assert json.loads(out.read_text())["variants"]["plain"]["seconds"] == seconds, "a finished variant ran again"
    with pytest.raises(SystemExit, match="meets --calib-range"):
        heal_validation.main(argv + ["--val-range", "0.4:0.6", "--variant", f"x={flags}"])
    with pytest.raises(ValueError, match="NAME=FLAGS"):
        heal_validation.parse_variant("--steps 2")
