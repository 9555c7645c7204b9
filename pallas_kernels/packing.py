"""Dense bit-packing of sketch codes into uint32 words, layout ``[out, groups, words]``.

Each row-group is packed on its own and stays contiguous, so a kernel reads a
group's codes with wide aligned loads.

- 2 and 4 bits: fields, little end first. Code ``c`` of a group lives in word
  ``c // (32 // bits)`` at bit offset ``(c % (32 // bits)) * bits`` (16 or 8 a word).
- 3 bits: bit planes. Codes go in blocks of 32; block ``k`` takes words ``3k, 3k+1,
  3k+2``, and word ``3k + b`` holds bit ``b`` of the block's code ``i`` at bit ``i``.
  That is exactly 3 bits a code (for groups a multiple of 32 wide) and no code
  straddles a word: a column decodes with three loads of the same lane.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4)
_PLANE_BLOCK = 32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packed_words(cols_per_group: int, bits: int) -> int:
    """uint32 words needed for one row-group of ``cols_per_group`` codes."""
    _check_bits(bits)
    if bits == 3:
        return 3 * -(-cols_per_group // _PLANE_BLOCK)
    return -(-cols_per_group // (32 // bits))


def decode_codes(load_words, cols, bits: int):
    """Codes (uint32) of the group columns ``cols`` (int32 array, position within the group).

    ``load_words(word_index)`` returns the packed uint32 words at ``word_index`` (an int32
    array shaped like ``cols``, or broadcasting with what the caller loads). The one
    decoding rule shared by `unpack_codes` and the Pallas kernels; numpy or jax arrays.
    """
    _check_bits(bits)
    if bits == 3:
        block = cols // _PLANE_BLOCK
        lane = (cols - block * _PLANE_BLOCK).astype(np.uint32)
        code = (load_words(3 * block) >> lane) & np.uint32(1)
        for plane in (1, 2):
            code = code | (((load_words(3 * block + plane) >> lane) & np.uint32(1)) << np.uint32(plane))
        return code
    per_word = 32 // bits
    word = cols // per_word
    shift = ((cols - word * per_word) * bits).astype(np.uint32)
    return (load_words(word) >> shift) & np.uint32((1 << bits) - 1)


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def pack_codes(codes, bits: int):
    """Pack codes ``uint8 [out, groups, cols_per_group]`` into ``uint32 [out, groups, words]``.

    Accepts numpy (returns numpy) or jax arrays (returns jax, jittable). Values must be
    below ``2**bits``; the tail of the last word (block, for 3 bits) is zero-padded.
    """
    _check_bits(bits)
    if codes.ndim != 3:
        raise ValueError(f"codes must be [out, groups, cols_per_group], got shape {codes.shape}")
    xp = _xp(codes)
    out, groups, cols = codes.shape
    words = packed_words(cols, bits)
    per_word = _PLANE_BLOCK if bits == 3 else 32 // bits
    padded = -(-cols // per_word) * per_word
    c = codes.astype(xp.uint32)
    if padded != cols:
        c = xp.pad(c, ((0, 0), (0, 0), (0, padded - cols)))
    c = c.reshape(out, groups, padded // per_word, per_word)
    # Fields are disjoint, so the sums are bitwise ors and cannot carry.
    if bits == 3:
        lanes = xp.arange(_PLANE_BLOCK, dtype=xp.uint32)
        planes = [xp.sum(((c >> xp.uint32(b)) & xp.uint32(1)) << lanes, axis=-1, dtype=xp.uint32) for b in range(3)]
        return xp.stack(planes, axis=-1).reshape(out, groups, words)
    shifts = (xp.arange(per_word, dtype=xp.uint32) * xp.uint32(bits)).astype(xp.uint32)
    return xp.sum(c << shifts, axis=-1, dtype=xp.uint32)


def unpack_codes(packed, bits: int, cols_per_group: int):
    """Unpack ``uint32 [out, groups, words]`` back into ``uint8 [out, groups, cols_per_group]``."""
    _check_bits(bits)
    if packed.ndim != 3:
        raise ValueError(f"packed codes must be [out, groups, words], got shape {packed.shape}")
    words = packed_words(cols_per_group, bits)
    if packed.shape[-1] != words:
        raise ValueError(f"{cols_per_group} codes of {bits} bits need {words} words per group, got {packed.shape[-1]}")
    xp = _xp(packed)
    packed = packed.astype(xp.uint32)
    cols = xp.arange(cols_per_group, dtype=xp.int32)
    return decode_codes(lambda w: packed[..., w], cols, bits).astype(xp.uint8)
