"""Kill-and-resume through the command line, as a user meets it: ``sketchtune sketch`` (its
``.partial`` directory), ``finetune --resume``, ``heal`` and ``sketch --heal-steps`` are
SIGKILLed right after a layer or a checkpoint reached the disk (tests/support/cli_kill_script.py), run
again with the same command, and must end with the same files as a run never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from sketchtune_jax.cli import main
from sketchtune_jax.train import read_codebooks, read_log

SUPPORT = Path(__file__).resolve().parents[1] / "support"


def _cli(point: str, kill_after: int, argv: list[str]) -> subprocess.CompletedProcess:
    """``sketchtune argv`` in a fresh process, SIGKILLed after the ``kill_after``-th ``point`` (0: never)."""
    return subprocess.run(
        [sys.executable, str(SUPPORT / "cli_kill_script.py"), point, str(kill_after), *argv],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _killed(point: str, kill_after: int, argv: list[str]) -> None:
    run = _cli(point, kill_after, argv)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert f"{point} passed {kill_after} times; killing" in run.stderr


def _resumed(point: str, argv: list[str]) -> int:
    """Run ``argv`` to the end; returns how many times it passed ``point``."""
    run = _cli(point, 0, argv)
    assert run.returncode == 0, run.stderr[-3000:]
    return int(run.stderr.rsplit(f"{point} passed ", 1)[1].split()[0])


def _assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def _sketch_argv(tiny_sketch, out: Path) -> list[str]:
    """The arguments ``sketch_tiny_with_cli`` made ``tiny_sketch["sketch"]`` with, writing to ``out``."""
    return [
        *("sketch", str(tiny_sketch["hf"]), "--calib", str(tiny_sketch["calib"]), "--out", str(out)),
        *("--bits", "2", "--groups-per-row", "2", "--nsamples", "4", "--seq-len", "32", "--kmeans-iters", "5"),
    ]


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(path) if "loss" in r]


def test_a_killed_sketch_resumes_from_its_partial_directory_to_the_same_sketch(tiny_sketch, tmp_path):
    out = tmp_path / "sketch"
    partial = tmp_path / "sketch.partial"
    _killed("layer", 1, _sketch_argv(tiny_sketch, out))
    assert (partial / "layer_0000.safetensors").is_file() and not (partial / "layer_0001.safetensors").exists()
    assert not out.exists()
    assert _resumed("layer", _sketch_argv(tiny_sketch, out)) == 1  # of the model's two layers, only the second
    assert not partial.exists()
    _assert_same_tensors(load_file(out / "model.safetensors"), load_file(tiny_sketch["sketch"] / "model.safetensors"))
    settings = [json.loads((d / "sketch_config.json").read_text())["settings"] for d in (out, tiny_sketch["sketch"])]
    assert settings[0] == settings[1]


def _killed_and_resumed(argv_for: Callable[[Path], list[str]], tmp_path: Path, checkpoint: str, resume=()) -> int:
    """Run ``argv_for(tmp_path / "a")`` to the end in this process, and ``argv_for(tmp_path / "b")``
    killed once its first checkpoint, ``tmp_path / checkpoint``, is written, then again (plus
    ``resume``) to the end; returns how many checkpoints the rerun wrote."""
    assert main(argv_for(tmp_path / "a")) == 0
    _killed("checkpoint", 1, argv_for(tmp_path / "b"))
    assert (tmp_path / checkpoint).is_dir()
    return _resumed("checkpoint", [*argv_for(tmp_path / "b"), *resume])


def test_a_killed_finetune_resumes_with_resume_to_the_same_codebooks_and_losses(tiny_sketch, tmp_path):
    def argv(out: Path) -> list[str]:
        return [
            *("finetune", str(tiny_sketch["sketch"]), "--data", str(tiny_sketch["data"]), "--out", str(out)),
            *("--max-steps", "6", "--save-every", "2", "--batch-size", "4", "--seq-len", "128"),
            *("--pad-multiple", "128", "--warmup-steps", "0", "--lr", "1e-3"),
        ]

    assert _killed_and_resumed(argv, tmp_path, "b/checkpoints/2", ["--resume"]) == 2  # steps 4 and 6
    a, b = tmp_path / "a", tmp_path / "b"
    summary = json.loads((b / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["step"] == 6
    unbroken, _ = read_codebooks(a / "codebooks.safetensors")
    _assert_same_tensors(unbroken, read_codebooks(b / "codebooks.safetensors")[0])
    sketch, _ = read_codebooks(tiny_sketch["sketch"] / "model.safetensors")
    assert all(not np.array_equal(unbroken[k], sketch[k]) for k in unbroken)  # the codebooks did train
    assert _losses(b / "train_log.jsonl") == _losses(a / "train_log.jsonl")
    assert [step for step, _ in _losses(b / "train_log.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_killed_heal_resumes_to_the_same_healed_sketch(tiny_sketch, tmp_path):
    def argv(out: Path) -> list[str]:
        return [
            *("heal", str(tiny_sketch["sketch"]), "--teacher", str(tiny_sketch["hf"])),
            *("--calib", str(tiny_sketch["calib"]), "--out", str(out), "--steps", "6", "--save-every", "2"),
            *("--batch-size", "2", "--seq-len", "32", "--lr", "1e-3"),
        ]

    assert _killed_and_resumed(argv, tmp_path, "b.heal/checkpoints/2") == 2  # steps 4 and 6
    a, b = tmp_path / "a", tmp_path / "b"
    assert not (tmp_path / "b.heal").exists()
    record = json.loads((b / "sketch_config.json").read_text())["heal"]
    assert record["resumed_from"] == 2 and record["steps"] == 6
    # Its time counts the killed run's two steps too, as the log's running total does.
    assert record["seconds"] >= read_log(b / "heal_log.jsonl")[-1]["elapsed_s"]
    unbroken = load_file(a / "model.safetensors")
    _assert_same_tensors(unbroken, load_file(b / "model.safetensors"))
    sketch = load_file(tiny_sketch["sketch"] / "model.safetensors")
    assert any(not np.array_equal(unbroken[k], sketch[k]) for k in unbroken if k.endswith(".codebook"))
    assert _losses(b / "heal_log.jsonl") == _losses(a / "heal_log.jsonl")


def test_a_sketch_with_heal_steps_killed_while_healing_resumes_the_heal(tiny_sketch, tmp_path):
    def argv(out: Path) -> list[str]:
        return [*_sketch_argv(tiny_sketch, out), "--heal-steps", "4", "--heal-batch-size", "2", "--heal-lr", "1e-3"]

    # The heal checkpoints at its last step (4) only: the kill lands after the heal trained,
    # before the healed codebooks replace the sketch's.
    assert _killed_and_resumed(argv, tmp_path, "b.heal/checkpoints/4") == 0  # nothing left to train
    assert not (tmp_path / "b.heal").exists() and not (tmp_path / "b.partial").exists()
    record = json.loads((tmp_path / "b" / "sketch_config.json").read_text())["heal"]
    assert record["resumed_from"] == 4 and record["steps"] == 4
    _assert_same_tensors(
        load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    )


def test_a_heal_left_unfinished_is_not_resumed_onto_another_sketch(tiny_sketch, tmp_path, capsys):
    out = tmp_path / "b"
    heal = ["--heal-steps", "4", "--heal-batch-size", "2", "--heal-lr", "1e-3"]
    _killed("checkpoint", 1, [*_sketch_argv(tiny_sketch, out), *heal])
    assert (tmp_path / "b.heal").is_dir()
    other = [*_sketch_argv(tiny_sketch, out), *heal]
    other[other.index("--kmeans-iters") + 1] = "6"
    assert main(other) == 2
    assert "made with other settings" in capsys.readouterr().err and (tmp_path / "b.heal").is_dir()
    assert main([*other, "--overwrite"]) == 0  # a new sketch, healed from the start
    record = json.loads((out / "sketch_config.json").read_text())["heal"]
    assert record["resumed_from"] is None and not (tmp_path / "b.heal").exists()
