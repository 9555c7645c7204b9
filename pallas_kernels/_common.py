"""Small helpers shared by every kernel backend (no kernels here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def dot_precision(dtype) -> lax.Precision:
    """fp32 callers expect fp32 results, not TF32/bf16 passes."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """``a [r, c]`` zero-padded to ``[rows, cols]`` (no copy when already that shape)."""
    pr, pc = rows - a.shape[0], cols - a.shape[1]
    if pr == 0 and pc == 0:
        return a
    return jnp.pad(a, ((0, pr), (0, pc)))
