"""Linear projections of the model: the one interface every projection goes through.

Every projection in the model is a module with ``__call__(x) -> y`` where
``x: [..., in_features]`` and ``y: [..., out_features]``. `Linear` keeps a dense
weight in the Hugging Face layout ``[out_features, in_features]``; `SketchedLinear`
keeps a trainable `Codebook` and frozen packed `Codes` instead. The sketcher swaps
one for the other by attribute assignment, without touching the model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Codebook(nnx.Param):
    """Trainable sketched parameters, ``[out_features, groups, 2**bits]``."""


class Codes(nnx.Variable):
    """Frozen packed integer codes, ``[out_features, groups, words]`` (not a `Param`)."""


class Linear(nnx.Module):
    """Dense projection ``y = x @ weight.T + bias``; weight ``[out, in]`` as in HF checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=0.02)
        self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.einsum("...i,oi->...o", x.astype(dtype), self.weight[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
