"""Pallas Triton kernels of the sketched matmul (NVIDIA GPUs before Hopper, and the
``"triton"`` backend anywhere a CUDA module is lowered).

The kernels never write ``W_hat`` to HBM: every program rebuilds the ``[block_n, block_k]``
tile it needs from the packed codes and the codebook (two gathered loads that hit L1/L2:
each code word serves ``32 // bits`` columns and a row's codebook is at most 16 entries).
Shapes that are not multiples of the tiles are handled by clamping code/codebook indices
into range and zero-padding only the activations, so the large operands are never copied.
Every entry point takes ``interpret`` (run in the Pallas interpreter) and the kernel's
block sizes; shapes are checked by `pallas_kernels.sketched_matmul`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import dot_precision, pad2, round_up
from pallas_kernels.block_sizes import (
    DcodebookBlockSizes,
    DequantizeBlockSizes,
    DxBlockSizes,
    ForwardBlockSizes,
)
from pallas_kernels.packing import decode_codes


def _tile_codes(codes_ref, rows, cols, *, bits: int, cols_per_group: int):
    """Codes (int32) at rows ``[bn, 1]`` x absolute columns ``[1, bk]`` (both in range)."""
    g = cols // cols_per_group
    shape = (rows.shape[0], cols.shape[1])
    rows, groups = jnp.broadcast_to(rows, shape), jnp.broadcast_to(g, shape)

    def load_words(word):
        return codes_ref[rows, groups, jnp.broadcast_to(word, shape)]

    code = decode_codes(load_words, cols - g * cols_per_group, bits)
    return g, code.astype(jnp.int32)


def _tile_weights(
    codebook_ref,
    codes_ref,
    n0,
    k0,
    *,
    bn: int,
    bk: int,
    bits: int,
    out_features: int,
    in_features: int,
    cols_per_group: int,
):
    """``W_hat[n0:n0+bn, k0:k0+bk]`` rebuilt on chip; out-of-range indices are clamped
    (their products meet zero padding of the activations or are sliced away)."""
    rows = jnp.minimum(n0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0), out_features - 1)
    cols = jnp.minimum(k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1), in_features - 1)
    g, code = _tile_codes(codes_ref, rows, cols, bits=bits, cols_per_group=cols_per_group)
    shape = (bn, bk)
    return codebook_ref[jnp.broadcast_to(rows, shape), jnp.broadcast_to(g, shape), code]


def _full_spec(a: jax.Array) -> pl.BlockSpec:
    zeros = (0,) * a.ndim
    return pl.BlockSpec(a.shape, lambda *_: zeros)


def _pallas(kernel, *, grid, in_specs, out_specs, out_shape, interpret, num_warps, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name=name,
    )


def _dequantize_kernel(codebook_ref, codes_ref, o_ref, *, bn, bk, bits, out_features, in_features, cols_per_group):
    w = _tile_weights(
        codebook_ref,
        codes_ref,
        pl.program_id(0) * bn,
        pl.program_id(1) * bk,
        bn=bn,
        bk=bk,
        bits=bits,
        out_features=out_features,
        in_features=in_features,
        cols_per_group=cols_per_group,
    )
    o_ref[...] = w.astype(o_ref.dtype)


# jit with static settings: a model calls each kernel once per layer with the same shapes,
# and the cached trace keeps the automatic backend (which traces both branches) cheap.
@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dequantize(codebook, codes, bits, cols, interpret, blocks: DequantizeBlockSizes):
    out = codebook.shape[0]
    in_features = codebook.shape[1] * cols
    bn, bk = blocks.resolve(out, in_features)
    np_, kp = round_up(out, bn), round_up(in_features, bk)
    kernel = functools.partial(
        _dequantize_kernel,
        bn=bn,
        bk=bk,
        bits=bits,
        out_features=out,
        in_features=in_features,
        cols_per_group=cols,
    )
    w = _pallas(
        kernel,
        grid=(np_ // bn, kp // bk),
        in_specs=[_full_spec(codebook), _full_spec(codes)],
        out_specs=pl.BlockSpec((bn, bk), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((np_, kp), codebook.dtype),
        interpret=interpret,
        num_warps=4,
        name="sketch_dequantize",
    )(codebook, codes)
    return w[:out, :in_features]


def _forward_kernel(
    x_ref,
    codebook_ref,
    codes_ref,
    o_ref,
    *,
    bm,
    bn,
    bk,
    tiles_per_split,
    bits,
    out_features,
    in_features,
    cols_per_group,
    precision,
):
    n0 = pl.program_id(1) * bn
    first = pl.program_id(2) * tiles_per_split

    def body(t, acc):
        k0 = (first + t) * bk
        x = x_ref[:, pl.ds(k0, bk)]
        w = _tile_weights(
            codebook_ref,
            codes_ref,
            n0,
            k0,
            bn=bn,
            bk=bk,
            bits=bits,
            out_features=out_features,
            in_features=in_features,
            cols_per_group=cols_per_group,
        ).astype(x.dtype)
        return acc + plgpu.dot(x, w, trans_b=True, precision=precision)

    acc = lax.fori_loop(0, tiles_per_split, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _k_splits(programs: int, k_tiles: int, target: int = 512) -> tuple[int, int]:
    """(splits, tiles_per_split) giving about ``target`` programs in all."""
    splits = max(1, min(k_tiles, -(-target // programs)))
    tiles_per_split = -(-k_tiles // splits)
    return -(-k_tiles // tiles_per_split), tiles_per_split


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def forward(x2, codebook, codes, bits, cols, interpret, blocks: ForwardBlockSizes):
    m, k = x2.shape
    n = codebook.shape[0]
    bm, bn, bk = blocks.resolve(m, n, k)
    mp, np_ = round_up(m, bm), round_up(n, bn)
    # Split K only for short x (decode is bound by reading the codes, and splitting lets
    # every SM stream its share); the fp32 partial sums are then a few rows each.
    programs = (mp // bm) * (np_ // bn)
    splits, tiles_per_split = _k_splits(programs, -(-k // bk)) if m <= 64 else (1, -(-k // bk))
    kp = splits * tiles_per_split * bk
    xp = pad2(x2, mp, kp)
    kernel = functools.partial(
        _forward_kernel,
        bm=bm,
        bn=bn,
        bk=bk,
        tiles_per_split=tiles_per_split,
        bits=bits,
        out_features=n,
        in_features=k,
        cols_per_group=cols,
        precision=dot_precision(x2.dtype),
    )
    y = _pallas(
        kernel,
        grid=(mp // bm, np_ // bn, splits),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)),
            _full_spec(codebook),
            _full_spec(codes),
        ],
        out_specs=pl.BlockSpec((pl.squeezed, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32 if splits > 1 else x2.dtype),
        interpret=interpret,
        num_warps=8 if bm * bn >= 128 * 128 else 4,
        name="sketch_matmul",
    )(xp, codebook, codes)
    y = y.sum(axis=0) if splits > 1 else y[0]
    return y[:m, :n].astype(x2.dtype)


def _dx_kernel(
    dy_ref,
    codebook_ref,
    codes_ref,
    o_ref,
    *,
    bm,
    bn,
    bk,
    nn,
    bits,
    out_features,
    in_features,
    cols_per_group,
    precision,
):
    k0 = pl.program_id(1) * bk

    def body(t, acc):
        n0 = t * bn
        dy = dy_ref[:, pl.ds(n0, bn)]
        w = _tile_weights(
            codebook_ref,
            codes_ref,
            n0,
            k0,
            bn=bn,
            bk=bk,
            bits=bits,
            out_features=out_features,
            in_features=in_features,
            cols_per_group=cols_per_group,
        ).astype(dy.dtype)
        return acc + plgpu.dot(dy, w, precision=precision)

    acc = lax.fori_loop(0, nn, body, jnp.zeros((bm, bk), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dx(dy2, codebook, codes, bits, cols, interpret, blocks: DxBlockSizes):
    m, n = dy2.shape
    in_features = codebook.shape[1] * cols
    bm, bn, bk = blocks.resolve(m, n, in_features)
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(in_features, bk)
    dyp = pad2(dy2, mp, np_)
    kernel = functools.partial(
        _dx_kernel,
        bm=bm,
        bn=bn,
        bk=bk,
        nn=np_ // bn,
        bits=bits,
        out_features=n,
        in_features=in_features,
        cols_per_group=cols,
        precision=dot_precision(dy2.dtype),
    )
    dx = _pallas(
        kernel,
        grid=(mp // bm, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, np_), lambda i, j: (i, 0)),
            _full_spec(codebook),
            _full_spec(codes),
        ],
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, kp), dy2.dtype),
        interpret=interpret,
        num_warps=4,
        name="sketch_matmul_dx",
    )(dyp, codebook, codes)
    return dx[:m, :in_features]


def _dcodebook_kernel(
    dy_ref, x_ref, codes_ref, o_ref, *, bm, bn, bk, nm, tiles_per_split, bits, out_features, cols_per_group, precision
):
    """One (row tile, group, K split): sum ``dy^T x`` into the ``2**bits`` buckets of each row.

    The ``[bn, bk]`` tile of ``dy^T x`` lives only in registers; it is reduced per code
    by compare-and-sum against the centres, so neither dW nor the one-hot map exists.
    """
    n0 = pl.program_id(0) * bn
    g = pl.program_id(1)
    split = pl.program_id(2)
    nc = 2**bits
    rows = jnp.minimum(n0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0), out_features - 1)
    centres = lax.broadcasted_iota(jnp.int32, (1, nc), 1)

    def k_body(t, acc):
        c0 = (split * tiles_per_split + t) * bk
        c = c0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        in_group = c < cols_per_group
        j0 = g * cols_per_group + c0

        def m_body(i, dw):
            dy = dy_ref[pl.ds(i * bm, bm), :]
            x = x_ref[pl.ds(i * bm, bm), pl.ds(j0, bk)]
            return dw + plgpu.dot(dy, x, trans_a=True, precision=precision)

        dw = lax.fori_loop(0, nm, m_body, jnp.zeros((bn, bk), jnp.float32))
        dw = jnp.where(in_group, dw, 0.0)
        cols = g * cols_per_group + jnp.minimum(c, cols_per_group - 1)
        _, code = _tile_codes(codes_ref, rows, cols, bits=bits, cols_per_group=cols_per_group)
        for k in range(nc):
            s_k = jnp.sum(jnp.where(code == k, dw, 0.0), axis=1, keepdims=True)
            acc = acc + jnp.where(centres == k, s_k, 0.0)
        return acc

    acc = lax.fori_loop(0, tiles_per_split, k_body, jnp.zeros((bn, nc), jnp.float32))
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("bits", "cols", "interpret", "blocks"))
def dcodebook(x2, dy2, codebook, codes, bits, cols, interpret, blocks: DcodebookBlockSizes):
    m, k = x2.shape
    n, groups, nc = codebook.shape
    bm, bn, bk = blocks.resolve(m, n, cols)
    mp, np_ = round_up(m, bm), round_up(n, bn)
    tiles = -(-cols // bk)
    # Split each group's K tiles across programs when rows x groups alone would leave
    # SMs idle; the partial bucket sums ([splits, out, groups, 2**bits]) are tiny.
    splits, tiles_per_split = _k_splits((np_ // bn) * groups, tiles)
    kx = (groups - 1) * cols + splits * tiles_per_split * bk
    xp = pad2(x2, mp, max(kx, k))
    dyp = pad2(dy2, mp, np_)
    kernel = functools.partial(
        _dcodebook_kernel,
        bm=bm,
        bn=bn,
        bk=bk,
        nm=mp // bm,
        tiles_per_split=tiles_per_split,
        bits=bits,
        out_features=n,
        cols_per_group=cols,
        precision=dot_precision(x2.dtype),
    )
    partial = _pallas(
        kernel,
        grid=(np_ // bn, groups, splits),
        in_specs=[
            pl.BlockSpec((mp, bn), lambda i, g, s: (0, i)),
            _full_spec(xp),
            _full_spec(codes),
        ],
        out_specs=pl.BlockSpec((pl.squeezed, bn, pl.squeezed, nc), lambda i, g, s: (s, i, g, 0)),
        out_shape=jax.ShapeDtypeStruct((splits, np_, groups, nc), jnp.float32),
        interpret=interpret,
        num_warps=4,
        name="sketch_matmul_dcodebook",
    )(dyp, xp, codes)
    return partial.sum(axis=0)[:n].astype(codebook.dtype)
