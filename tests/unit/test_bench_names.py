"""Bench scripts run with bench/ first on sys.path, so a script named like an installed
package shadows it for every library the script imports (bench/kernels.py once hid the
`kernels` package from transformers and broke tokenizer loading)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _importable(name: str) -> bool:
    """Whether ``import name`` finds a module on the path as it stands; a bench script that a test
    imported is set aside from ``sys.modules`` meanwhile (`find_spec` looks there first)."""
    cached = sys.modules.pop(name, None)
    try:
        return importlib.util.find_spec(name) is not None
    finally:
        if cached is not None:
            sys.modules[name] = cached


def test_no_bench_script_shadows_an_importable_module():
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    try:
        clashes = [
            path.name
            for path in sorted(BENCH.glob("*.py"))
            if path.stem in sys.stdlib_module_names or _importable(path.stem)
        ]
    finally:
        sys.path[:] = saved
    assert clashes == [], f"rename these bench scripts, they shadow installed modules: {clashes}"
