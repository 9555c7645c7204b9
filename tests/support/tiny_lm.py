"""A tiny NNX causal LM with codebook-sketched projections, for the training tests.

Same call signature as `sketchtune_jax.models.LlamaForCausalLM`:
``model(input_ids [B, T] int32, *, positions=None, attention_mask=None, cache=None) -> (logits, cache)``.
Each projection is ``W = take_along_axis(codebook, codes)`` with unpacked uint8 codes.
Weights are drawn with numpy: eager ``jax.random`` calls compile once per shape,
which costs more than the tests themselves on a busy CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax.layers import Codebook, Codes


class TinySketchedLinear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, groups: int, bits: int, rng: np.random.Generator):
        self.d_in, self.d_out = d_in, d_out
        self.codebook = Codebook(jnp.asarray(0.2 * rng.standard_normal((d_out, groups, 2**bits)), jnp.float32))
        self.codes = Codes(jnp.asarray(rng.integers(0, 2**bits, (d_out, groups, d_in // groups)), jnp.uint8))
        self.dtype = None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = jnp.take_along_axis(self.codebook[...], self.codes[...].astype(jnp.int32), axis=-1)
        w = w.reshape(self.d_out, self.d_in)
        dtype = self.dtype or x.dtype
        return x.astype(dtype) @ w.astype(dtype).T


class TinyRMSNorm(nnx.Module):
    def __init__(self, d: int):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (y * self.scale[...]).astype(x.dtype)


class TinyBlock(nnx.Module):
    def __init__(self, d: int, *, groups: int, bits: int, rng: np.random.Generator):
        kw = dict(groups=groups, bits=bits, rng=rng)
        self.norm1, self.norm2 = TinyRMSNorm(d), TinyRMSNorm(d)
        self.q = TinySketchedLinear(d, d, **kw)
        self.k = TinySketchedLinear(d, d, **kw)
        self.v = TinySketchedLinear(d, d, **kw)
        self.o = TinySketchedLinear(d, d, **kw)
        self.up = TinySketchedLinear(d, 2 * d, **kw)
        self.down = TinySketchedLinear(2 * d, d, **kw)
        self.remat = False

    def _block(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.norm1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        s = jnp.einsum("btd,bsd->bts", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
        s = jnp.where(mask, s, -1e9)
        x = x + self.o(jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v))
        return x + self.down(jax.nn.silu(self.up(self.norm2(x))))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        if self.remat:
            return nnx.remat(TinyBlock._block)(self, x, mask)
        return self._block(x, mask)


class TinyCausalLM(nnx.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, *, groups: int = 2, bits: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.embed = nnx.Param(jnp.asarray(rng.standard_normal((vocab, d)), jnp.float32))
        self.layers = nnx.List([TinyBlock(d, groups=groups, bits=bits, rng=rng) for _ in range(layers)])
        self.norm = TinyRMSNorm(d)
        self.head = nnx.Param(jnp.asarray(0.2 * rng.standard_normal((vocab, d)), jnp.float32))

    def __call__(self, input_ids, *, positions=None, attention_mask=None, cache=None):
        t = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, :].astype(bool)
        x = jnp.take(self.embed[...], input_ids, axis=0)
        for layer in self.layers:
            x = layer(x, mask)
        return (self.norm(x) @ self.head[...].T).astype(jnp.float32), cache
