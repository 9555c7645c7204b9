"""The example scripts use only the public API: every ``st.NAME`` they read is exported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sketchtune_jax as st

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_examples_read_only_exported_names(script):
    tree = ast.parse(script.read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "st"
    }
    assert used <= set(st.__all__), f"{script.name} reads st.{sorted(used - set(st.__all__))}, not exported"
