"""Blockwise k-bit quantization of frozen base weights for QLoRA and LoftQ, held packed.

A weight ``W [out, in]`` is cut into blocks of ``block`` consecutive input columns of one
row; each block keeps its absolute maximum as a float16 scale and every entry the index of
the nearest of ``2**bits`` levels of ``W / absmax``:

- ``nf4``, ``nf3``, ``nf2``: NormalFloat-k as QLoRA and LoftQ define it: ``2**(k-1)``
  positive and ``2**(k-1) - 1`` negative quantiles of a standard normal (outer ones at
  0.9677 and 0.0323), zero, scaled so that the outermost is 1.
- ``int4``, ``int3``, ``int2``: ``2**k`` evenly spaced levels from -1 to 1.

Indices are packed exactly ``bits`` to an entry with the sketch codes' packing
(`pallas_kernels.pack_codes`), so the bytes held are ``out * in * bits / 8`` plus two
bytes a block: the real width, not an int8 or float container. Both extreme levels are
+-1, so re-quantizing a dequantized weight gives back the same codes and scales (a LoftQ
base written as a dense directory loads back exactly).
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import pack_codes, packed_words, unpack_codes

QTYPES = ("nf4", "nf3", "nf2", "int4", "int3", "int2")
DEFAULT_BLOCK = 64
# QLoRA's NF4 offset: the outermost quantile sits at the middle of the last of 2**k bins of
# 1 - 1/(2 * 15) and 1 - 1/(2 * 16), so that both ends of the code book are used.
_NF_OFFSET = 0.9677083


class QuantCodes(nnx.Variable):
    """Frozen packed level indices of a quantized base weight, ``uint32 [out, in // block, words]``."""


class QuantScales(nnx.Variable):
    """Frozen absmax of each block of a quantized base weight, ``float16 [out, in // block]``."""


def qtype_bits(qtype: str) -> int:
    """The bits a value of ``qtype`` takes (``nf3`` -> 3); ValueError for an unknown type."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    return int(qtype[-1])


@functools.cache
def quant_levels(qtype: str) -> np.ndarray:
    """The ``2**bits`` levels of ``qtype`` in [-1, 1], ascending, float32."""
    bits = qtype_bits(qtype)
    if qtype.startswith("int"):
        return np.linspace(-1.0, 1.0, 2**bits, dtype=np.float32)
    ppf = NormalDist().inv_cdf
    half = 2 ** (bits - 1)
    positive = [ppf(p) for p in np.linspace(_NF_OFFSET, 0.5, half + 1)[:-1]]
    negative = [-ppf(p) for p in np.linspace(_NF_OFFSET, 0.5, half)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative, dtype=np.float64))
    return (levels / levels.max()).astype(np.float32)


def check_blocks(in_features: int, block: int) -> None:
    """ValueError unless ``block`` is positive and divides ``in_features``."""
    if block <= 0 or in_features % block:
        raise ValueError(f"block size {block} must be positive and divide the input width {in_features}")


@functools.partial(jax.jit, static_argnames=("qtype", "block"))
def quantize_blockwise(weight: jax.Array, qtype: str, block: int = DEFAULT_BLOCK) -> tuple[jax.Array, jax.Array]:
    """Quantize ``weight [out, in]`` to ``(codes uint32 [out, in // block, words], scales float16 [out, in // block])``."""
    out, cols = weight.shape
    check_blocks(cols, block)
    bits = qtype_bits(qtype)
    w = weight.astype(jnp.float32).reshape(out, cols // block, block)
    scales = jnp.max(jnp.abs(w), axis=-1).astype(jnp.float16)
    held = scales.astype(jnp.float32)
    normed = w / jnp.where(held > 0, held, 1.0)[..., None]
    levels = jnp.asarray(quant_levels(qtype))
    # The nearest level is the count of midpoints below the value.
    codes = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, normed).astype(jnp.uint8)
    return pack_codes(codes, bits), scales


@functools.partial(jax.jit, static_argnames=("qtype", "block", "dtype"))
def dequantize_blockwise(
    codes: jax.Array, scales: jax.Array, qtype: str, block: int = DEFAULT_BLOCK, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """The weight ``[out, groups * block]`` in ``dtype`` that packed ``codes`` and ``scales`` hold."""
    bits = qtype_bits(qtype)
    out, groups = scales.shape
    indices = unpack_codes(codes, bits, block)
    values = jnp.asarray(quant_levels(qtype))[indices] * scales.astype(jnp.float32)[..., None]
    return values.reshape(out, groups * block).astype(dtype)


def quantized_bytes(out_features: int, in_features: int, qtype: str, block: int = DEFAULT_BLOCK) -> int:
    """Bytes held by one quantized ``[out, in]`` weight: packed codes plus float16 scales."""
    check_blocks(in_features, block)
    groups = in_features // block
    return out_features * groups * (4 * packed_words(block, qtype_bits(qtype)) + 2)


__all__ = [
    "DEFAULT_BLOCK",
    "QTYPES",
    "QuantCodes",
    "QuantScales",
    "check_blocks",
    "dequantize_blockwise",
    "qtype_bits",
    "quant_levels",
    "quantize_blockwise",
    "quantized_bytes",
]
