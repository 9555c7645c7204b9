"""Dense bit-packing of sketch codes into uint32 words.

Codes of one row-group are packed little-end first: code ``c`` of a group lives in
word ``c // codes_per_word(bits)`` at bit offset ``(c % codes_per_word(bits)) * bits``.
3-bit codes pack 10 to a word (2 bits of each word unused, 3.2 bits a code) so that a
code never straddles two words and a kernel can decode any column with one load.
Layout ``[out, groups, words]`` keeps each row-group contiguous for wide loads.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def codes_per_word(bits: int) -> int:
    """Number of ``bits``-wide codes held by one uint32 word (16, 10 or 8)."""
    _check_bits(bits)
    return 32 // bits


def packed_words(cols_per_group: int, bits: int) -> int:
    """uint32 words needed for one row-group of ``cols_per_group`` codes."""
    cpw = codes_per_word(bits)
    return -(-cols_per_group // cpw)


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def pack_codes(codes, bits: int):
    """Pack codes ``uint8 [out, groups, cols_per_group]`` into ``uint32 [out, groups, words]``.

    Accepts numpy (returns numpy) or jax arrays (returns jax, jittable). Values must be
    below ``2**bits``; the tail of the last word is zero-padded.
    """
    _check_bits(bits)
    if codes.ndim != 3:
        raise ValueError(f"codes must be [out, groups, cols_per_group], got shape {codes.shape}")
    xp = _xp(codes)
    out, groups, cols = codes.shape
    cpw = codes_per_word(bits)
    words = packed_words(cols, bits)
    c = codes.astype(xp.uint32)
    if words * cpw != cols:
        c = xp.pad(c, ((0, 0), (0, 0), (0, words * cpw - cols)))
    c = c.reshape(out, groups, words, cpw)
    shifts = (xp.arange(cpw, dtype=xp.uint32) * xp.uint32(bits)).astype(xp.uint32)
    # Fields are disjoint, so the sum is the bitwise or and cannot carry.
    return xp.sum(c << shifts, axis=-1, dtype=xp.uint32)


def unpack_codes(packed, bits: int, cols_per_group: int):
    """Unpack ``uint32 [out, groups, words]`` back into ``uint8 [out, groups, cols_per_group]``."""
    _check_bits(bits)
    if packed.ndim != 3:
        raise ValueError(f"packed codes must be [out, groups, words], got shape {packed.shape}")
    words = packed_words(cols_per_group, bits)
    if packed.shape[-1] != words:
        raise ValueError(
            f"{cols_per_group} codes of {bits} bits need {words} words per group, "
            f"got {packed.shape[-1]}"
        )
    xp = _xp(packed)
    out, groups, _ = packed.shape
    cpw = codes_per_word(bits)
    shifts = (xp.arange(cpw, dtype=xp.uint32) * xp.uint32(bits)).astype(xp.uint32)
    fields = (packed.astype(xp.uint32)[..., None] >> shifts) & xp.uint32((1 << bits) - 1)
    return fields.reshape(out, groups, words * cpw)[..., :cols_per_group].astype(xp.uint8)
