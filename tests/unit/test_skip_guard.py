"""With ``SKETCHTUNE_STRICT_SKIPS=1`` (CI) a skip not on the allow list fails the run, in one
process and under pytest-xdist; skips on the list, expected failures and runs without the
variable pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from skip_guard import ALLOWED_SKIPS, STRICT_ENV, read_allowed_skips

SUPPORT = Path(__file__).resolve().parents[1] / "support"

SUITE = {
    "conftest.py": (
        "from pathlib import Path\n"
        "import skip_guard\n"
        "def pytest_configure(config):\n"
        "    skip_guard.install(config, Path(__file__).with_name('allowed.txt'))\n"
    ),
    "test_mod.py": (
        "import pytest\n"
        "def test_runs():\n"
        "    pass\n"
        "def test_allowed():\n"
        "    pytest.skip('needs 8 devices here')\n"
        "def test_unlisted():\n"
        "    pytest.skip('the GGUF file is missing')\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_expected_failure():\n"
        "    assert False\n"
    ),
    "test_missing.py": "import pytest\npytest.importorskip('no_such_module_sketchtune')\ndef test_x():\n    pass\n",
}


def _run(tmp_path: Path, allowed: str, *args: str, strict: bool = True) -> subprocess.CompletedProcess:
    for name, text in SUITE.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "allowed.txt").write_text(allowed)
    env = {k: v for k, v in os.environ.items() if k != STRICT_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")])
    if strict:
        env[STRICT_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_an_unlisted_skip_fails_the_run_and_is_named(tmp_path, workers):
    run = _run(tmp_path, "# comment\n*test_mod.py::test_allowed  needs * devices*  # why\n", *workers)
    assert run.returncode == 1, run.stdout + run.stderr
    section = run.stdout.split("skips not allowed", 1)[1]
    listed = [line.strip() for line in section.splitlines() if line.startswith("  ")]
    assert sorted(listed) == [
        "test_missing.py: could not import 'no_such_module_sketchtune': No module named 'no_such_module_sketchtune'",
        "test_mod.py::test_unlisted: the GGUF file is missing",
    ], run.stdout
    assert "1 passed" in run.stdout and "1 xfailed" in run.stdout


def test_listed_skips_pass_and_the_guard_is_off_without_the_variable(tmp_path):
    allowed = (
        "*::test_allowed  needs * devices*\n*::test_unlisted  the GGUF file is missing\n*test_missing.py  could not*\n"
    )
    run = _run(tmp_path, allowed)
    assert run.returncode == 0 and "skips not allowed" not in run.stdout, run.stdout + run.stderr
    # A listed test skipping for another reason is not allowed.
    run = _run(tmp_path, allowed.replace("the GGUF file is missing", "needs a GPU"))
    assert run.returncode == 1 and "test_mod.py::test_unlisted: the GGUF file is missing" in run.stdout
    run = _run(tmp_path, "", strict=False)
    assert run.returncode == 0 and "3 skipped" in run.stdout, run.stdout + run.stderr


def test_the_allow_list_parses_and_each_entry_names_a_reason(tmp_path):
    entries = read_allowed_skips(ALLOWED_SKIPS)
    assert len(entries) >= 5 and all(e.node_id.startswith("*") and e.reason for e in entries)
    bad = tmp_path / "bad.txt"
    bad.write_text("*::test_x  a reason\n*::test_y\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: give a test id glob and a skip reason glob"):
        read_allowed_skips(bad)
