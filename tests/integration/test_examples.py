"""The example scripts run end to end, each in a fresh interpreter as a user starts it, on a tiny
model with small settings; and they use only the public API (every ``st.NAME`` they read is exported)."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from model_utils import sketch_tiny_with_cli

import sketchtune_jax as st

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Small settings the scripts share: a few items scored with a few tokens, two training steps.
SMALL = ["--eval-limit", "2", "--max-new-tokens", "4", "--max-steps", "2", "--batch-size", "2", "--seq-len", "256"]
SMALL += ["--warmup-steps", "0", "--val-records", "2", "--pad-multiple", "256"]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_examples_read_only_exported_names(script):
    tree = ast.parse(script.read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "st"
    }
    assert used <= set(st.__all__), f"{script.name} reads st.{sorted(used - set(st.__all__))}, not exported"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF model whose tokenizer covers its calibration text, and its 2-bit sketch."""
    return sketch_tiny_with_cli(tmp_path_factory.mktemp("tiny"))


def _run(script: str, *args: str) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def _sketch_settings(sketch_dir) -> dict:
    return json.loads((Path(sketch_dir) / "sketch_config.json").read_text())["settings"]


def _assert_exported(directory) -> None:
    directory = Path(directory)
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    assert not st.io.sketched_dir.is_sketched_dir(directory)  # dense, for any HF tool


def test_quickstart_runs_end_to_end(tiny, tmp_path):
    out = tmp_path / "quickstart"
    args = ["--model", str(tiny["hf"]), "--text", str(tiny["calib"]), "--out", str(out), "--bits", "2"]
    args += ["--groups-per-row", "2", "--nsamples", "4", "--seq-len", "32", "--eval-windows", "2"]
    _run("quickstart.py", *args, "--train-steps", "2", "--eval-limit", "2")
    results = json.loads((out / "quickstart.json").read_text())
    assert results["model"] == str(tiny["hf"]) and results["train_steps"] == 2
    assert math.isfinite(results["dense_ppl"]) and math.isfinite(results["sketched_ppl"])
    assert results["ppl_ratio"] == results["sketched_ppl"] / results["dense_ppl"]
    settings = _sketch_settings(results["sketch"])
    assert settings["bits"] == 2 and settings["calib_range"] == [0.5, 1.0]
    assert results["before"]["n"] == results["after"]["n"] == 2
    assert {"generate", "loglik", "chance"} <= results["before"].keys()
    _assert_exported(results["export"])


def test_finetune_math_sketches_then_runs_end_to_end(tiny, tmp_path):
    out = tmp_path / "math"
    args = ["--model", str(tiny["hf"]), "--out", str(out), "--bits", "2", "--groups-per-row", "2"]
    args += ["--calib", str(tiny["calib"]), "--nsamples", "4", "--calib-seq-len", "32"]
    _run("finetune_math.py", *args, *SMALL)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and math.isfinite(results["final_loss"]) and math.isfinite(results["val_loss"])
    assert set(results["before"]) == set(results["after"]) == {"gsm8k", "AQuA", "mawps"}
    assert _sketch_settings(out / "sketch")["bits"] == 2
    _assert_exported(results["export"])


def test_finetune_commonsense_starts_from_a_sketch_and_runs_end_to_end(tiny, tmp_path):
    out = tmp_path / "commonsense"
    _run("finetune_commonsense.py", "--model", str(tiny["sketch"]), "--out", str(out), "--skip-baseline", *SMALL)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and "before" not in results and not (out / "sketch").exists()
    assert set(results["after"]) == {"ARC-Easy", "ARC-Challenge", "openbookqa", "boolq"}
    _assert_exported(results["export"])
