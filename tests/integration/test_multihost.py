"""Runs over several processes: two CPU processes on localhost joined by `jax.distributed`
(Gloo collectives), one device each, against one process on one device.

Each process of a run is a subprocess running ``sketchtune sketch`` then ``sketchtune
finetune`` (a process joins `jax.distributed` before any JAX work, which this test
process has done). The refusals run in this process: they fail before anything starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from model_utils import assert_cli_refuses, save_tiny_model_with_tokenizer

from sketchtune_jax.cli import main
from sketchtune_jax.data.prompts import format_prompt
from sketchtune_jax.train import read_codebooks, read_log

ROOT = Path(__file__).resolve().parents[2]
# fp32 sums over two processes run in another order than on one device.
TOL = dict(rtol=1e-5, atol=1e-5)
WORDS = "the cat sat on a mat while two dogs ran past the red barn and a bird sang in the old tree".split()
# One process of a run: each argv of the JSON list in turn, with the distributed flags after it.
DRIVER = """
import json, sys
from sketchtune_jax.cli import main
for argv in json.loads(sys.argv[1]):
    if rc := main(argv + sys.argv[2:]):
        sys.exit(rc)
"""


def _text(n: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def subprocess_env(tmp: Path) -> dict[str, str]:
    """One CPU device, this checkout's code (not an installed copy), temporary files in ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT), TMPDIR=str(tmp))


def run_processes(commands: list[list[str]], tmp: Path, n: int = 2, timeout: float = 600) -> list[str]:
    """Run ``commands`` (``sketchtune`` argv lists, in turn) in each of ``n`` processes joined on a
    free localhost port; every process must succeed. Returns their stdouts by process id."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(commands)]
            + ["--coordinator", f"localhost:{port}", "--num-processes", str(n), "--process-id", str(i)],
            env=subprocess_env(tmp / f"tmp{i}"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}\n{err[-5000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Llama with a tokenizer, its calibration text, 7 instruction records (a short last batch)."""
    root = tmp_path_factory.mktemp("multihost")
    calib = root / "calib.txt"
    calib.write_text("\n".join(_text(60, s) for s in range(40)))
    save_tiny_model_with_tokenizer(root / "hf", [calib.read_text(), format_prompt("x", "") * 20])
    data = root / "data.json"
    data.write_text(
        json.dumps([{"instruction": _text(6, s), "input": "", "output": _text(4, s + 1)} for s in range(7)])
    )
    return root, calib, data


def commands(root: Path, calib: Path, data: Path, sketch: Path, run: Path) -> list[list[str]]:
    """Sketch the tiny Llama into ``sketch``, then fine-tune that for 3 steps into ``run``."""
    argv = ["sketch", str(root / "hf"), "--bits", "3", "--groups-per-row", "4", "--calib", str(calib)]
    sketch_argv = [*argv, "--nsamples", "4", "--seq-len", "32", "--kmeans-iters", "3", "--out", str(sketch)]
    argv = ["finetune", str(sketch), "--data", str(data), "--out", str(run), "--max-steps", "3", "--batch-size", "4"]
    argv += ["--seq-len", "128", "--warmup-steps", "0", "--lr", "1e-2", "--pad-multiple", "128", "--save-every", "2"]
    return [sketch_argv, argv]


@pytest.fixture(scope="module")
def one_process(inputs):
    """The reference: the sketch and the fine-tune in this process, on one device."""
    root = inputs[0]
    for argv in commands(*inputs, root / "sketch", root / "run"):
        assert main(argv) == 0
    return root / "sketch", root / "run"


@pytest.fixture(scope="module")
def two_processes(inputs):
    """The same commands run by two processes; returns the outputs and each process's stdout."""
    root = inputs[0]
    stdouts = run_processes(commands(*inputs, root / "mh-sketch", root / "mh-run"), root)
    return root / "mh-sketch", root / "mh-run", stdouts


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_two_processes_sketch_like_one(one_process, two_processes, inputs):
    """Both processes sketch; process 0 alone writes, and the others' scratch is gone."""
    root = inputs[0]
    want, _ = one_process
    got, _, stdouts = two_processes
    assert listing(got) == listing(want)
    assert not (root / "mh-sketch.partial").exists()
    a = safetensors.numpy.load_file(got / "model.safetensors")
    b = safetensors.numpy.load_file(want / "model.safetensors")
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert "sketched" in stdouts[0] and "sketched" not in stdouts[1]
    assert listing(root / "tmp1") == [], "process 1 left files behind"


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "train_log.jsonl") if "loss" in r]


def test_two_processes_finetune_like_one(one_process, two_processes):
    """Data parallel over two processes (each moves only its 2 rows of a 4-row batch; the
    last batch has 3 rows, padded to 4) gives one process's losses and codebooks, and
    process 0 alone writes the run's files."""
    _, want = one_process
    _, run, stdouts = two_processes
    assert [r["step"] for r in read_log(run / "train_log.jsonl")] == [1, 2, 3], "each step logged once"
    np.testing.assert_allclose(losses(run), losses(want), **TOL)
    got, _ = read_codebooks(run / "codebooks.safetensors")
    ref, _ = read_codebooks(want / "codebooks.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=k)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mesh"] == "data=2,model=1" and summary["step"] == 3
    assert listing(run) == listing(want)
    assert listing(run / "checkpoints") == ["2", "3"]
    assert "fine-tuned" in stdouts[0] and "fine-tuned" not in stdouts[1]
    print(f"two processes vs one: max |loss diff| {np.max(np.abs(np.subtract(losses(run), losses(want)))):.2e}")


def _finetune(tmp_path: Path, *flags: str) -> list[str]:
    return ["finetune", "sketch", "--data", "data.json", "--out", str(tmp_path / "run"), *flags]


@pytest.mark.parametrize(
    "flags, match",
    [
        (
            ["--num-processes", "2", "--process-id", "2"],
            "--process-id must be one of 0..1 (--num-processes is 2), got 2",
        ),
        (["--num-processes", "0", "--process-id", "0"], "--num-processes must be >= 1, got 0"),
        (["--num-processes", "2", "--process-id", "-1"], "--process-id must be one of 0..1"),
        (["--num-processes", "2"], "--coordinator needs --process-id too"),
        (["--num-processes", "2", "--process-id", "0", "--distributed-timeout", "0"], "--distributed-timeout must be"),
    ],
    ids=["id-too-large", "no-processes", "negative-id", "partial", "timeout"],
)
def test_bad_settings_are_refused_before_anything_starts(tmp_path, capsys, flags, match):
    assert_cli_refuses(_finetune(tmp_path, "--coordinator", "localhost:1", *flags), capsys, match)
    assert not (tmp_path / "run").exists()


def test_partial_flags_name_what_is_missing(tmp_path, capsys):
    argv = ["sketch", "m", "--calib", "c.txt", "--out", str(tmp_path / "s"), "--process-id", "1"]
    assert_cli_refuses(argv, capsys, "--process-id needs --coordinator and --num-processes too")
    argv = [*argv, "--num-processes", "2", "--coordinator", "nohostport"]
    assert_cli_refuses(argv, capsys, "--coordinator must be HOST:PORT with a port in 1..65535, got 'nohostport'")


def test_what_cannot_run_over_several_processes_is_refused(tmp_path, capsys):
    flags = ["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "1"]
    argv = ["sketch", "m", "--calib", "c.txt", "--out", str(tmp_path / "s"), "--heal-steps", "2", *flags]
    assert_cli_refuses(argv, capsys, "--heal-steps cannot run over several processes")
    argv = _finetune(tmp_path, "--method", "lora", *flags)
    assert_cli_refuses(argv, capsys, "--method lora cannot run over several processes (for now); use sketch")


def test_unreachable_coordinator_errors_after_the_timeout(tmp_path, capsys):
    port = free_port()  # nothing listens there
    start = time.monotonic()
    flags = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "1"]
    err = assert_cli_refuses(
        _finetune(tmp_path, *flags, "--distributed-timeout", "1"), capsys, "could not be reached within 1 s"
    )
    assert time.monotonic() - start < 10, err


def test_coordinator_port_taken(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        flags = ["--coordinator", f"localhost:{s.getsockname()[1]}", "--num-processes", "2", "--process-id", "0"]
        assert_cli_refuses(_finetune(tmp_path, *flags), capsys, "cannot listen on port")


def test_processes_that_never_all_join_end_in_one_line(tmp_path):
    """Process 0 of 2 alone: the coordinator serves, nobody else comes; one line, exit 2."""
    flags = ["--coordinator", f"localhost:{free_port()}", "--num-processes", "2", "--process-id", "0"]
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "sketchtune_jax.cli", *_finetune(tmp_path, *flags, "--distributed-timeout", "2")],
        env=subprocess_env(tmp_path / "tmp"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = run.stderr.strip()
    assert run.returncode == 2, err
    assert err.splitlines() == [
        f"sketchtune finetune: error: --coordinator {flags[1]}: not all 2 processes joined within 2 s "
        "(start each with the same coordinator and number of processes, and a distinct process id)"
    ], err
    assert time.monotonic() - start < 60
