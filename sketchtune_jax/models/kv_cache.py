"""Preallocated key/value cache for incremental decoding: a plain pytree of arrays."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sketchtune_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for ``max_len`` slots.

    Slots are shared by the rows of the batch: a call with ``T`` tokens writes slots
    ``[index, index + T)`` of every row. Rows of unequal length are left-padded, and
    `mask` remembers which slots hold real tokens.

    Attributes:
      k, v: one ``[batch, max_len, kv_heads, head_dim]`` array per layer, the compute
        dtype. Separate arrays (not one stacked array) let each layer's slot write
        happen in place; a stacked array is copied whole by every layer's write.
      mask: bool ``[batch, max_len]``, True where a slot holds a real (non-pad) token.
      index: int32 scalar, the next slot to write.
      lengths: int32 ``[batch]``, real tokens seen per row, i.e. the next position.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated).

    Writing past ``max_len`` is not checked inside `jit` (slot writes would clamp), so
    size it for the whole generation.
    """
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    layers = range(config.num_hidden_layers)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in layers),
        v=tuple(jnp.zeros(shape, dtype) for _ in layers),
        mask=jnp.zeros((batch, max_len), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
    )
