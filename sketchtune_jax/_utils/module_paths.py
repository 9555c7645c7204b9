"""Dotted module names (``model.layers.0.self_attn.q_proj``), as in Hugging Face checkpoints."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from flax import nnx


def get_submodule(root: nnx.Module, name: str) -> nnx.Module:
    """The module at dotted ``name`` below ``root``."""
    node = root
    for part in name.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def set_submodule(root: nnx.Module, name: str, module: nnx.Module) -> None:
    """Replace the module at dotted ``name`` below ``root`` with ``module``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = get_submodule(root, parent_name) if parent_name else root
    if leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


def iter_modules(root: nnx.Module, kind: type) -> Iterator[tuple[str, nnx.Module]]:
    """``(dotted name, module)`` for every submodule of type ``kind``, in definition order."""
    for path, module in nnx.iter_graph(root):
        if isinstance(module, kind):
            yield ".".join(str(p) for p in path), module


def flat_arrays(root: nnx.Module, *filters) -> dict[str, np.ndarray]:
    """Every variable below ``root`` (optionally filtered by type) as ``{dotted path: numpy array}``."""
    state = nnx.state(root, *filters) if filters else nnx.state(root)
    return {".".join(str(p) for p in path): np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}
