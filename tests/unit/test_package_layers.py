"""Imports between the packages of sketchtune_jax run one way, bottom to top, so each package can
be read (and tested) knowing only the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sketchtune_jax"
ORDER = ["settings", "_utils", "layers", "models", "parallel", "data", "io", "train", "eval", "sketch", "jobs", "cli"]
# load_any(adapter=...) applies a LoRA adapter, whose layers live in train/; the import is lazy.
ALLOWED_UPWARD = {("io/loading.py", "train")}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "sketchtune_jax":
        return None
    return "__init__" if len(parts) == 1 else parts[1]


def upward_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        me = rel.parts[0].removesuffix(".py")
        if me == "__init__":
            continue
        assert me in ORDER, f"{rel}: the package {me!r} has no place in ORDER; give it one"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                unit = _unit(module)
                if unit == "__init__" and me == "cli":
                    continue  # the version string
                if unit in ORDER and ORDER.index(unit) > ORDER.index(me):
                    if (rel.as_posix(), unit) not in ALLOWED_UPWARD:
                        found.append(f"{rel} imports {module}")
    return found


def test_imports_between_packages_run_one_way():
    assert upward_imports() == []


def test_every_package_says_what_it_owns():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.parent.name}/__init__.py needs a docstring saying what it owns"


def test_the_top_level_exports_entry_points_not_internals():
    import sketchtune_jax as st

    names = [n for n in st.__all__ if not isinstance(getattr(st, n), type(st))]
    assert 15 <= len(names) <= 25, names
    for internal in ("write_json_atomic", "partial_dir_for", "process_rows", "read_text"):
        assert not hasattr(st, internal), f"{internal} is an internal; reach it by its module path"
