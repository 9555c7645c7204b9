"""Mosaic TPU (Pallas TPU) kernels of the sketched matmul: dequantize, forward, dx, dcodebook.

TPU vector registers are ``8 x 128`` (sublanes x lanes) and there is no lane gather, so
the kernels never turn a packed word into adjacent columns: they work in slot order
(`pallas_kernels.slots`), and a slot's codes meet that slot's activation columns on the
MXU. The dense weight exists only as one slot's tile in VMEM.

Layouts passed to the kernels (built by `_TpuLayout`, a `SlotLayout`):

* codes ``uint32 [planes, out, groups * lanes]``: a free reshape of the packed codes for
  2 and 4 bits (``planes = 1``); for 3 bits the three bit planes of each 32-code block are
  moved apart (``planes = 3``), one transpose of the codes per call, because a lane
  stride of 3 cannot be loaded;
* codebook ``f32 [groups, out_pad, 2**bits]`` (transposed, rows zero-padded to the row
  tile: rows past ``out`` in an edge block of codes then look up zeros);
* activations ``[slots, rows, groups * lanes]`` in slot order.

The K axis is cut into *chunks*: when a group's word-lanes are a multiple of 128, a chunk
is ``block_k / S`` lanes of one group (rounded to 128 and dividing the group); otherwise
one chunk holds whole rows (every group, the full lane dimension, which the TPU tiling
rule always allows).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import dot_precision, pad2, round_up
from pallas_kernels.block_sizes import (
    DcodebookBlockSizes,
    DequantizeBlockSizes,
    DxBlockSizes,
    ForwardBlockSizes,
    tpu_lanes,
    tpu_rows,
)
from pallas_kernels.slots import SlotLayout, select, slot_bits, slot_codes


def _interpret(interpret: bool):
    # The TPU interpreter simulates HBM, VMEM, SMEM and DMAs on the host.
    return pltpu.InterpretParams() if interpret else False


@dataclasses.dataclass(frozen=True)
class _TpuLayout(SlotLayout):
    """How one sketch's codes are cut into slots, lanes and K chunks (static)."""

    chunk_cols: int = 8192  # wanted input features per chunk (block_k)

    @property
    def whole_rows(self) -> bool:
        return self.lanes % 128 != 0

    @property
    def chunk_lanes(self) -> int:
        """Lanes of one group in one chunk."""
        if self.whole_rows:
            return self.lanes
        want = max(128, -(-self.chunk_cols // self.slots))
        best = 128
        for q in range(1, self.lanes // 128 + 1):
            if self.lanes % (128 * q) == 0 and 128 * q <= want:
                best = 128 * q
        return best

    @property
    def groups_per_chunk(self) -> int:
        return self.groups if self.whole_rows else 1

    @property
    def chunks_per_group(self) -> int:
        return 1 if self.whole_rows else self.lanes // self.chunk_lanes

    @property
    def chunks(self) -> int:
        return 1 if self.whole_rows else self.groups * self.chunks_per_group

    @property
    def block_lanes(self) -> int:
        return self.groups_per_chunk * self.chunk_lanes

    def chunk_group(self, k):
        """The codebook block (group) of chunk ``k``."""
        # lax.div, not //: program ids are non-negative, and floor division lowers
        # through a sign computation that Mosaic only knows for a real TPU generation.
        return 0 if self.whole_rows else lax.div(k, self.chunks_per_group)


def _codebook(codebook: jax.Array, rows: int) -> jax.Array:
    """``[out, groups, 2**bits]`` -> fp32 ``[groups, rows, 2**bits]``, zero rows past ``out``."""
    cb = codebook.astype(jnp.float32).transpose(1, 0, 2)
    return jnp.pad(cb, ((0, 0), (0, rows - cb.shape[1]), (0, 0)))


# ------------------------------------------------------------------ in-kernel helpers


def _load_words(codes_ref, gi: int, lanes: int, planes: int) -> list[jax.Array]:
    """The ``[block_n, lanes]`` words of group ``gi`` of the block, one array per plane."""
    return [codes_ref[p, :, pl.ds(gi * lanes, lanes)] for p in range(planes)]


def _lookup(bit_masks: list[jax.Array], cb: jax.Array) -> jax.Array:
    """``cb[r, code]`` for codes given by their bits: ``cb [block_n, 2**bits]`` ->
    ``[block_n, lanes]`` in ``cb.dtype``."""
    values = select(bit_masks, [cb[:, k : k + 1] for k in range(cb.shape[1])])
    return jnp.broadcast_to(values, bit_masks[0].shape)


_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


# ------------------------------------------------------------------------ dequantize


def _dequantize_kernel(cb_ref, codes_ref, o_ref, *, layout: _TpuLayout):
    lanes = layout.chunk_lanes
    for gi in range(layout.groups_per_chunk):
        cb = cb_ref[gi]
        words = _load_words(codes_ref, gi, lanes, layout.planes)

        def body(s, carry, cb=cb, words=words, gi=gi):
            w = _lookup(slot_bits(words, s, layout.bits), cb)
            o_ref[s, :, pl.ds(gi * lanes, lanes)] = w.astype(o_ref.dtype)
            return carry

        lax.fori_loop(0, layout.slots, body, 0)


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dequantize(codebook, codes, bits: int, cols: int, interpret: bool, blocks: DequantizeBlockSizes):
    """``W_hat [out, groups * cols]`` in ``codebook.dtype`` (shapes checked by the caller)."""
    out, groups, nc = codebook.shape
    want_n, want_k = blocks.tpu()
    layout = _TpuLayout(bits, groups, cols, want_k)
    bn = tpu_rows(out, want_n, codebook.dtype)
    rows = round_up(out, bn)
    w = pl.pallas_call(
        functools.partial(_dequantize_kernel, layout=layout),
        grid=(rows // bn, layout.chunks),
        in_specs=[
            pl.BlockSpec((layout.groups_per_chunk, bn, nc), lambda j, k: (layout.chunk_group(k), j, 0)),
            pl.BlockSpec((layout.planes, bn, layout.block_lanes), lambda j, k: (0, j, k)),
        ],
        out_specs=pl.BlockSpec((layout.slots, bn, layout.block_lanes), lambda j, k: (0, j, k)),
        out_shape=jax.ShapeDtypeStruct((layout.slots, out, groups * layout.lanes), codebook.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret(interpret),
        name="sketch_dequantize_tpu",
    )(_codebook(codebook, rows), layout.codes(codes))
    return layout.from_slots(w, out)


# --------------------------------------------------------------------------- forward


def _forward_kernel(x_ref, cb_ref, codes_ref, o_ref, acc_ref, *, layout: _TpuLayout, precision):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    lanes = layout.chunk_lanes
    for gi in range(layout.groups_per_chunk):
        cb = cb_ref[gi]
        words = _load_words(codes_ref, gi, lanes, layout.planes)

        def body(s, acc, cb=cb, words=words, gi=gi):
            x = x_ref[s, :, pl.ds(gi * lanes, lanes)]
            w = _lookup(slot_bits(words, s, layout.bits), cb).astype(x.dtype)
            return acc + lax.dot_general(x, w, _NT, precision=precision, preferred_element_type=jnp.float32)

        acc_ref[...] = lax.fori_loop(0, layout.slots, body, acc_ref[...])

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def forward(x2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: ForwardBlockSizes):
    """``x2 [m, in] @ W_hat.T -> [m, out]`` in ``x2.dtype`` (fp32 accumulation)."""
    m = x2.shape[0]
    out, groups, nc = codebook.shape
    want_m, want_n, want_k = blocks.tpu(m)
    layout = _TpuLayout(bits, groups, cols, want_k)
    bm = tpu_rows(m, want_m, x2.dtype)
    bn = tpu_lanes(out, want_n)
    mp, rows = round_up(m, bm), round_up(out, bn)
    y = pl.pallas_call(
        functools.partial(_forward_kernel, layout=layout, precision=dot_precision(x2.dtype)),
        grid=(mp // bm, rows // bn, layout.chunks),
        in_specs=[
            pl.BlockSpec((layout.slots, bm, layout.block_lanes), lambda i, j, k: (0, i, k)),
            pl.BlockSpec((layout.groups_per_chunk, bn, nc), lambda i, j, k: (layout.chunk_group(k), j, 0)),
            pl.BlockSpec((layout.planes, bn, layout.block_lanes), lambda i, j, k: (0, j, k)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, out), x2.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="sketch_matmul_tpu",
    )(layout.to_slots(x2, mp), _codebook(codebook, rows), layout.codes(codes))
    return y[:m]


# -------------------------------------------------------------------------------- dx


def _dx_kernel(dy_ref, cb_ref, codes_ref, o_ref, acc_ref, *, layout: _TpuLayout, precision):
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dy = dy_ref[...]
    lanes = layout.chunk_lanes
    for gi in range(layout.groups_per_chunk):
        cb = cb_ref[gi]
        words = _load_words(codes_ref, gi, lanes, layout.planes)

        def body(s, carry, cb=cb, words=words, gi=gi):
            w = _lookup(slot_bits(words, s, layout.bits), cb).astype(dy.dtype)
            part = lax.dot_general(dy, w, _NN, precision=precision, preferred_element_type=jnp.float32)
            acc_ref[s, :, pl.ds(gi * lanes, lanes)] += part
            return carry

        lax.fori_loop(0, layout.slots, body, 0)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dx(dy2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: DxBlockSizes):
    """``dy2 [m, out] @ W_hat -> [m, in]`` in ``dy2.dtype`` (fp32 accumulation)."""
    m = dy2.shape[0]
    out, groups, nc = codebook.shape
    want_m, want_n, want_k = blocks.tpu()
    layout = _TpuLayout(bits, groups, cols, want_k)
    bm = tpu_rows(m, want_m, dy2.dtype)
    bn = tpu_lanes(out, want_n)
    mp, rows = round_up(m, bm), round_up(out, bn)
    # dy's padded columns are zero, and so are the padded codebook rows they meet.
    dyp = pad2(dy2, mp, rows)
    dxs = pl.pallas_call(
        functools.partial(_dx_kernel, layout=layout, precision=dot_precision(dy2.dtype)),
        grid=(mp // bm, layout.chunks, rows // bn),
        in_specs=[
            pl.BlockSpec((bm, bn), lambda i, k, j: (i, j)),
            pl.BlockSpec((layout.groups_per_chunk, bn, nc), lambda i, k, j: (layout.chunk_group(k), j, 0)),
            pl.BlockSpec((layout.planes, bn, layout.block_lanes), lambda i, k, j: (0, j, k)),
        ],
        out_specs=pl.BlockSpec((layout.slots, bm, layout.block_lanes), lambda i, k, j: (0, i, k)),
        out_shape=jax.ShapeDtypeStruct((layout.slots, mp, groups * layout.lanes), dy2.dtype),
        scratch_shapes=[pltpu.VMEM((layout.slots, bm, layout.block_lanes), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="sketch_matmul_dx_tpu",
    )(dyp, _codebook(codebook, rows), layout.codes(codes))
    return layout.from_slots(dxs, m)


# ------------------------------------------------------------------------- dcodebook


def _dcodebook_kernel(dy_ref, x_ref, codes_ref, o_ref, dw_ref, *, layout: _TpuLayout, precision):
    """One (row tile, chunk): ``dW = dy^T x`` summed over the M steps in VMEM, then bucketed
    by code into the ``2**bits`` entries of each row's codebook; dW never reaches HBM."""
    k = pl.program_id(1)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)

    dy = dy_ref[...]

    def accumulate(s, carry):
        dw_ref[s] += lax.dot_general(dy, x_ref[s], _TN, precision=precision, preferred_element_type=jnp.float32)
        return carry

    lax.fori_loop(0, layout.slots, accumulate, 0)

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        nc = 2**layout.bits
        lanes = layout.chunk_lanes
        for gi in range(layout.groups_per_chunk):
            words = _load_words(codes_ref, gi, lanes, layout.planes)
            centres = lax.broadcasted_iota(jnp.int32, (1, nc), 1)

            def bucket(s, acc, words=words, gi=gi):
                code = slot_codes(words, s, layout.bits)
                d = dw_ref[s, :, pl.ds(gi * lanes, lanes)]
                for c in range(nc):
                    total = jnp.sum(jnp.where(code == c, d, 0.0), axis=1, keepdims=True)
                    acc = acc + jnp.where(centres == c, total, 0.0)
                return acc

            part = lax.fori_loop(0, layout.slots, bucket, jnp.zeros(o_ref.shape[1:], jnp.float32))
            first = lax.rem(k, layout.chunks_per_group) == 0

            @pl.when(first)
            def _(part=part, gi=gi):
                o_ref[gi] = part

            @pl.when(jnp.logical_not(first))
            def _(part=part, gi=gi):
                o_ref[gi] += part


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dcodebook(x2, dy2, codebook, codes, bits: int, cols: int, interpret: bool, blocks: DcodebookBlockSizes):
    """Bucket sums of ``dy2^T x2`` per (row, group, code): ``[out, groups, 2**bits]`` in
    ``codebook.dtype``."""
    m = x2.shape[0]
    out, groups, nc = codebook.shape
    want_m, want_n, want_k = blocks.tpu()
    layout = _TpuLayout(bits, groups, cols, want_k)
    bm = tpu_rows(m, want_m, x2.dtype)
    bn = tpu_lanes(out, want_n)
    mp, rows = round_up(m, bm), round_up(out, bn)
    # Padded rows of x and dy are zero: they add nothing to the sums over M.
    dyp = pad2(dy2, mp, rows)
    dcb = pl.pallas_call(
        functools.partial(_dcodebook_kernel, layout=layout, precision=dot_precision(x2.dtype)),
        grid=(rows // bn, layout.chunks, mp // bm),
        in_specs=[
            pl.BlockSpec((bm, bn), lambda j, k, i: (i, j)),
            pl.BlockSpec((layout.slots, bm, layout.block_lanes), lambda j, k, i: (0, i, k)),
            pl.BlockSpec((layout.planes, bn, layout.block_lanes), lambda j, k, i: (0, j, k)),
        ],
        out_specs=pl.BlockSpec((layout.groups_per_chunk, bn, nc), lambda j, k, i: (layout.chunk_group(k), j, 0)),
        out_shape=jax.ShapeDtypeStruct((groups, rows, nc), jnp.float32),
        scratch_shapes=[pltpu.VMEM((layout.slots, bn, layout.block_lanes), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret),
        name="sketch_matmul_dcodebook_tpu",
    )(dyp, layout.to_slots(x2, mp), layout.codes(codes))
    return dcb[:, :out].transpose(1, 0, 2).astype(codebook.dtype)
