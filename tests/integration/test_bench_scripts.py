"""Every bench and example script imports as a module without running (its work sits behind
``if __name__ == "__main__"``), and every bench script answers ``--help`` at once: without
loading JAX, torch or the library, whose imports take seconds."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = sorted((ROOT / "bench").glob("*.py"))
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Helper modules (a leading underscore) have no command line of their own.
COMMANDS = [p for p in BENCH + EXAMPLES if not p.name.startswith("_")]
HEAVY = {"jax", "jaxlib", "flax", "optax", "torch", "transformers", "sketchtune_jax", "pallas_kernels", "converters"}


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and isinstance(node.test.comparators[0], ast.Constant)
        and node.test.comparators[0].value == "__main__"
    )


def _calls_main(nodes: list[ast.stmt]) -> list[int]:
    """Lines where ``main(...)`` is called in ``nodes``, outside function and class bodies."""
    lines = []
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "main":
                lines.append(sub.lineno)
    return lines


def test_the_scripts_are_found():
    names = {p.name for p in BENCH + EXAMPLES}
    assert {"_common.py", "quality.py", "train_step.py", "sketch_memory.py", "quickstart.py"} <= names
    assert "scale.py" not in names, "bench/scale.py was split into one script a benchmark"


@pytest.mark.parametrize("script", COMMANDS, ids=_name)
def test_main_runs_only_under_the_main_guard(script):
    tree = ast.parse(script.read_text(), filename=str(script))
    guards = [node for node in tree.body if _is_main_guard(node)]
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{script.name} has no main"
    assert len(guards) == 1 and _calls_main(guards[0].body), f"{script.name} does not call main under the guard"
    outside = _calls_main([node for node in tree.body if not _is_main_guard(node)])
    assert outside == [], f"{script.name} calls main on import (lines {outside})"


@pytest.mark.parametrize("script", BENCH + EXAMPLES, ids=_name)
def test_importing_a_script_runs_nothing(script, monkeypatch, capsys):
    # Its sibling modules (_common, _pipeline) are found beside it, as when it runs.
    monkeypatch.syspath_prepend(str(script.parent))
    # A command line that ran on import would print its help and exit.
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    spec = importlib.util.spec_from_file_location(f"imported_{script.parent.name}_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up by name while the class is built.
    monkeypatch.setitem(sys.modules, spec.name, module)
    try:
        spec.loader.exec_module(module)
    except SystemExit:
        pytest.fail(f"importing {_name(script)} ran its command line")
    assert capsys.readouterr().out == "", f"importing {_name(script)} printed"
    if not script.name.startswith("_"):
        assert callable(module.main)


@pytest.mark.parametrize("script", [p for p in COMMANDS if p.parent.name == "bench"], ids=_name)
def test_help_exits_at_once_without_loading_heavy_modules(script):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {script.name}")
    # -X importtime writes one line per module imported: "import time: self | cumulative | name".
    loaded = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "argparse" in loaded, "no import lines read: -X importtime changed its format"
    assert not loaded & HEAVY, f"--help of {script.name} imports {sorted(loaded & HEAVY)}"
