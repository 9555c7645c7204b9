"""Rematerialisation policies for decoder layers, by name.

A policy says which intermediate values of a layer the forward pass keeps for the
backward pass; everything else is recomputed there. ``"none"`` keeps everything
(no remat), ``"full"`` keeps only the layer's input, the ``dots_*`` policies keep
matmul outputs (`jax.checkpoint_policies`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

REMAT_POLICIES: tuple[str, ...] = ("none", *_POLICIES)


def remat_name(value: str | bool) -> str:
    """The policy name for ``value``: a name from `REMAT_POLICIES`, or True/False ("full"/"none")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)} (or True/False), got {value!r}")
    return value


def with_remat(fn: Callable[..., Any], policy: str | bool) -> Callable[..., Any]:
    """``fn`` wrapped in `nnx.remat` under the named policy; ``fn`` itself for ``"none"``."""
    name = remat_name(policy)
    if name == "none":
        return fn
    return nnx.remat(fn, policy=_POLICIES[name])
