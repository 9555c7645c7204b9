"""Sketch and fine-tune a tiny model through the command line, as a new user would:
with the core install only, run directories that refuse to be clobbered, calibration text
that is not silently evaluated on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sketchtune_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _finetune_argv(tiny_sketch, out) -> list[str]:
    return [
        "finetune",
        str(tiny_sketch["sketch"]),
        "--data",
        str(tiny_sketch["data"]),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "128",
        "--warmup-steps",
        "0",
        "--pad-multiple",
        "128",
    ]


def test_sketch_records_its_calibration(tiny_sketch):
    settings = json.loads((tiny_sketch["sketch"] / "sketch_config.json").read_text())["settings"]
    assert settings["calib"] == str(tiny_sketch["calib"].resolve())
    assert tuple(settings["calib_range"]) == (0.0, 1.0) and settings["hessian_exponent"] == 3.0
    assert not (tiny_sketch["root"] / "sketch.partial").exists()


def test_finetune_without_matplotlib_finishes(tiny_sketch, tmp_path):
    blocker = (
        "import sys, runpy\n"
        "class NoMatplotlib:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n"
        "sys.meta_path.insert(0, NoMatplotlib())\n"
        "sys.argv = ['sketchtune'] + sys.argv[1:]\n"
        "runpy.run_module('sketchtune_jax.cli', run_name='__main__')\n"
    )
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", blocker, *_finetune_argv(tiny_sketch, run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss plot skipped: matplotlib not installed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run / "codebooks.safetensors").is_file() and not (run / "loss_curve.png").exists()
    assert json.loads((run / "summary.json").read_text())["step"] == 2


def test_finetune_resumes_only_when_asked(tiny_sketch, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_finetune_argv(tiny_sketch, run)) == 0
    capsys.readouterr()
    assert main(_finetune_argv(tiny_sketch, run)) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert main([*_finetune_argv(tiny_sketch, run), "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 2
    assert main([*_finetune_argv(tiny_sketch, run), "--overwrite"]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from"] is None


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "-1", "--lr must be a finite number > 0"),
        ("--lr", "nan", "--lr must be a finite number > 0"),
        ("--max-steps", "-3", "--max-steps must be >= 0"),
        ("--batch-size", "0", "--batch-size must be > 0"),
        ("--seq-len", "0", "--seq-len must be > 0"),
        ("--warmup-steps", "5", "--warmup-steps must be shorter than the run (2 steps)"),
        ("--weight-decay", "-0.1", "--weight-decay must be >= 0"),
        ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0"),
    ],
)
def test_finetune_rejects_bad_settings_before_any_work(tiny_sketch, tmp_path, capsys, flag, value, message):
    argv = _finetune_argv(tiny_sketch, tmp_path / "run")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_warmup_longer_than_an_epoch_is_refused(tiny_sketch, tmp_path, capsys):
    argv = _finetune_argv(tiny_sketch, tmp_path / "run")
    argv[argv.index("--max-steps") + 1] = "0"
    argv[argv.index("--warmup-steps") + 1] = "50"
    assert main(argv) == 2
    assert "--warmup-steps must be shorter than the run (2 steps), got 50" in capsys.readouterr().err


def test_eval_ppl_warns_when_the_text_calibrated_the_sketch(tiny_sketch, capsys):
    argv = [
        "eval",
        "ppl",
        str(tiny_sketch["sketch"]),
        "--text",
        str(tiny_sketch["calib"]),
        "--seq-len",
        "32",
        "--max-windows",
        "2",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "also calibrated this sketch" in err and "not on held-out text" in err
    other = tiny_sketch["root"] / "other.txt"
    other.write_text(tiny_sketch["calib"].read_text())
    assert main([*argv[:4], str(other), *argv[5:]]) == 0
    assert "calibrated" not in capsys.readouterr().err


def test_eval_ppl_text_range_reads_that_fraction_of_the_text(tiny_sketch, tmp_path, capsys):
    text = tiny_sketch["calib"].read_text()
    whole, part = tmp_path / "whole.txt", tmp_path / "part.txt"
    whole.write_text(text)
    part.write_text(text[len(text) // 2 :])
    argv = ["eval", "ppl", str(tiny_sketch["sketch"]), "--seq-len", "32", "--max-windows", "2"]
    assert main([*argv, "--text", str(whole), "--text-range", "0.5:1", "--json", str(tmp_path / "a.json")]) == 0
    assert main([*argv, "--text", str(part), "--json", str(tmp_path / "b.json")]) == 0
    assert main([*argv, "--text", str(whole), "--json", str(tmp_path / "c.json")]) == 0
    ranged, sliced, full = (json.loads((tmp_path / f"{n}.json").read_text())["ppl"] for n in "abc")
    assert ranged == pytest.approx(sliced, rel=1e-6)
    assert abs(ranged - full) > 1e-3 * full
    capsys.readouterr()
    assert main([*argv, "--text", str(whole), "--text-range", "0.6:0.2"]) == 2
    assert "--text-range must be fractions 0 <= START < END <= 1" in capsys.readouterr().err


def test_finetune_on_a_mesh_of_one_device(tiny_sketch, tmp_path):
    """The mesh path end to end on the one device of this process (8 devices: tests/integration/test_mesh_training.py)."""
    run = tmp_path / "run"
    assert main([*_finetune_argv(tiny_sketch, run), "--mesh", "data=1,model=1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mesh"] == "data=1,model=1" and summary["step"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mesh", "data=2,model=4"], "--mesh 'data=2,model=4' multiplies to 8 but the number of devices is 1"),
        (["--mesh", "data=1,tensor=1"], "--mesh has an unknown axis 'tensor'"),
        (["--mesh", "model=0"], "--mesh axis 'model' must have a positive integer size"),
    ],
)
def test_finetune_refuses_a_bad_mesh_before_any_work(tiny_sketch, tmp_path, capsys, extra, message):
    assert main([*_finetune_argv(tiny_sketch, tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_finetune_mesh_is_for_sketch_tuning_only(tiny_sketch, tmp_path, capsys):
    argv = _finetune_argv(tiny_sketch, tmp_path / "run")
    argv[1] = str(tiny_sketch["root"] / "hf")
    assert main([*argv, "--method", "lora", "--mesh", "data=1"]) == 2
    assert "--mesh is supported for method sketch only (for now)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, levers",
    [
        ("--bits 2 --layer-tune-steps 0", "--layer-tune-steps 32, --act-order, --heal-steps"),
        ("--bits 2 --layer-tune-steps 0 --heal-steps 2", "--layer-tune-steps 32, --act-order"),
        ("--bits 2 --layer-tune-steps 4", "--act-order, --heal-steps"),
        ("--bits 2 --layer-tune-steps 4 --act-order", None),
        ("--bits 3 --layer-tune-steps 0", "--layer-tune-steps 32, --heal-steps"),
        ("--bits 3 --layer-tune-steps 4", None),
        ("--bits 4 --layer-tune-steps 0", None),
    ],
)
def test_sketch_below_4_bits_hints_at_the_levers_not_yet_on(tiny_sketch, capsys, flags, levers):
    argv = [
        "sketch",
        str(tiny_sketch["hf"]),
        *flags.split(),
        "--calib",
        str(tiny_sketch["calib"]),
        "--out",
        str(tiny_sketch["sketch"]),
    ]
    # The existing sketch makes the command stop before any work, after the hint.
    assert main(argv) == 2
    err = capsys.readouterr().err
    hints = [line for line in err.splitlines() if line.startswith("hint:")]
    bits = flags.split()[1]
    want = f"hint: at {bits} bits, {levers} recover much of the loss to the dense model; see docs/recipes.md"
    assert hints == ([] if levers is None else [want])
    assert "exists" in err
