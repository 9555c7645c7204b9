"""bench/_common.py: the header every result opens with, atomic result writing with the printed
summary, and the environment a bench hands its child processes."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def common():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "bench"))
        yield importlib.import_module("_common")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_data_directory_is_shared_data_beside_the_checkout(common):
    assert common.ROOT == ROOT
    assert common.DATA == ROOT.parent / "shared" / "data"
    assert common.WIKITEXT.is_file()
    assert str(ROOT) in sys.path


def test_the_header_names_the_bench_command_commit_machine_date_jax_and_kernel_backend(common):
    header = common.result_header("/anywhere/bench/quality.py", ["--configs", "int4-g4", "--out", "a b.json"])
    assert list(header) == [
        "bench",
        "command",
        "commit",
        "machine",
        "date",
        "jax",
        "kernel_backend",
        "kernel_backend_reason",
    ]
    assert header["bench"] == "quality"
    assert header["command"] == "python bench/quality.py --configs int4-g4 --out 'a b.json'"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert header["commit"] == _git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    assert f", {os.cpu_count()} cores; {jax.device_count()} x " in header["machine"]
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(header["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=2)
    assert header["jax"] == jax.__version__
    assert (header["kernel_backend"], header["kernel_backend_reason"].split(":")[0]) == ("reference", "cpu")


def test_the_header_commit_is_none_outside_a_git_checkout(common, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "ROOT", tmp_path)
    assert common.checkout_commit() is None


def test_report_writes_the_result_whole_and_prints_the_summary(common, tmp_path, capsys):
    out = tmp_path / "topic" / "result.json"
    common.report({"ppl": 29.5, "runs": [1, 2]}, out, summary={"ppl": 29.5})
    assert json.loads(out.read_text()) == {"ppl": 29.5, "runs": [1, 2]}
    assert [p.name for p in out.parent.iterdir()] == ["result.json"], "a temporary file was left behind"
    assert json.loads(capsys.readouterr().out) == {"ppl": 29.5}

    common.report({"ppl": 31.0}, None, summary=[{"variant": "h32", "val_ppl": 23.8851}], title="heal variants")
    shown = capsys.readouterr().out
    assert "heal variants" in shown and "h32" in shown and "23.89" in shown
    assert json.loads(out.read_text())["ppl"] == 29.5, "out=None wrote a file"


def test_progress_is_one_json_line_on_stderr(common, capsys):
    common.progress({"layers": 4, "peak_rss_mib": 1489.5})
    printed = capsys.readouterr()
    assert printed.out == ""
    assert json.loads(printed.err) == {"layers": 4, "peak_rss_mib": 1489.5} and printed.err.count("\n") == 1


def test_a_child_imports_this_checkout_first_on_the_forced_devices(common, tmp_path):
    env = common.child_env(host_devices=3)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    code = "import jax; print(jax.device_count())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "JAX_PLATFORMS": "cpu"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3"]
