"""Slot order: how the Mosaic kernels (TPU and GPU) rebuild weight tiles without a gather.

A packed word holds ``S`` codes (``S = 32 // bits``; for 3 bits a 32-code block spread over
three bit-plane words). Slot ``s`` of word-lane ``j`` is column ``j * S + s`` of its group.
For one slot the codes of a tile of words come out with one shift and mask per bit
(`slot_bits`) and are looked up with a ``bits``-deep tree of selects over the row's
codebook entries (`select`): ``2**bits - 1`` selects, no gather, which neither Mosaic
backend can lower. The activations are permuted into slot order by XLA outside the
kernels (`SlotLayout.to_slots`); they are the small operands.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """How one sketch's codes are cut into slots and word-lanes (static)."""

    bits: int
    groups: int
    cols: int  # columns per group

    @property
    def slots(self) -> int:
        return 32 if self.bits == 3 else 32 // self.bits

    @property
    def planes(self) -> int:
        return 3 if self.bits == 3 else 1

    @property
    def lanes(self) -> int:
        """Word-lanes per group (words per group, or 32-code blocks for 3 bits)."""
        return -(-self.cols // self.slots)

    def codes(self, codes: jax.Array, rows: int | None = None, lanes: int | None = None) -> jax.Array:
        """Packed ``uint32 [out, groups, words]`` -> ``[planes, rows, groups * lanes]``, rows and
        each group's lanes zero-padded to ``rows`` and ``lanes`` (default: none).

        A free reshape for 2 and 4 bits without padding; for 3 bits the three bit planes of
        each 32-code block are moved apart (a lane stride of 3 cannot be loaded)."""
        out = codes.shape[0]
        rows, lanes = rows or out, lanes or self.lanes
        if self.bits == 3:
            planes = codes.reshape(out, self.groups, self.lanes, 3).transpose(3, 0, 1, 2)
        else:
            planes = codes.reshape(1, out, self.groups, self.lanes)
        if (rows, lanes) != (out, self.lanes):
            planes = jnp.pad(planes, ((0, 0), (0, rows - out), (0, 0), (0, lanes - self.lanes)))
        return planes.reshape(self.planes, rows, self.groups * lanes)

    def to_slots(self, a: jax.Array, rows: int, lanes: int | None = None) -> jax.Array:
        """Activations ``[r, groups * cols]`` -> ``[slots, rows, groups * lanes]`` (zero-padded)."""
        lanes = lanes or self.lanes
        r = a.shape[0]
        a = a.reshape(r, self.groups, self.cols)
        a = jnp.pad(a, ((0, rows - r), (0, 0), (0, lanes * self.slots - self.cols)))
        a = a.reshape(rows, self.groups, lanes, self.slots)
        return a.transpose(3, 0, 1, 2).reshape(self.slots, rows, self.groups * lanes)

    def from_slots(self, a: jax.Array, rows: int, lanes: int | None = None) -> jax.Array:
        """Inverse of `to_slots`: ``[slots, R, groups * lanes]`` -> ``[rows, groups * cols]``."""
        lanes = lanes or self.lanes
        a = a[:, :rows].reshape(self.slots, rows, self.groups, lanes)
        a = a.transpose(1, 2, 3, 0).reshape(rows, self.groups, lanes * self.slots)
        return a[:, :, : self.cols].reshape(rows, self.groups * self.cols)


def slot_bits(words: list[jax.Array], s, bits: int) -> list[jax.Array]:
    """Bit ``b`` (b < bits) of the codes in slot ``s`` (a Python or traced int), as bool arrays;
    ``words`` holds one array of packed words per plane."""
    one = jnp.uint32(1)
    s = s.astype(jnp.uint32) if hasattr(s, "astype") else jnp.uint32(s)
    if bits == 3:
        return [((plane >> s) & one) == one for plane in words]
    (w,) = words
    base = s * jnp.uint32(bits)
    return [((w >> (base + jnp.uint32(b))) & one) == one for b in range(bits)]


def select(bit_masks: list[jax.Array], values: list[jax.Array]) -> jax.Array:
    """``values[code]`` for codes given by their bits (lowest first): a tree of
    ``2**bits - 1`` selects; ``values`` broadcast against the masks."""
    for bit in bit_masks:
        values = [jnp.where(bit, values[2 * i + 1], values[2 * i]) for i in range(len(values) // 2)]
    return values[0]


def slot_codes(words: list[jax.Array], s, bits: int) -> jax.Array:
    """The uint32 codes in slot ``s`` (a Python or traced int) of ``words`` (one array of
    packed words per plane), with shifts and masks only."""
    one = jnp.uint32(1)
    s = s.astype(jnp.uint32) if hasattr(s, "astype") else jnp.uint32(s)
    if bits == 3:
        code = (words[0] >> s) & one
        for b in (1, 2):
            code = code | (((words[b] >> s) & one) << jnp.uint32(b))
        return code
    (w,) = words
    return (w >> (s * jnp.uint32(bits))) & jnp.uint32(2**bits - 1)
