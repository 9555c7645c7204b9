"""Dequantisation and the fused sketched matmul, with pure-``jnp`` twins.

A sketched weight is ``W_hat[r, j] = codebook[r, j // cols_per_group, code[r, j]]`` with
``codebook [out, groups, 2**bits]`` and codes packed by `pallas_kernels.packing` into
``uint32 [out, groups, words]``.

Every public function takes ``backend``:

* ``None``: Pallas (Triton) on GPU, the ``jnp`` reference elsewhere;
* ``"pallas"``: the compiled Pallas kernel;
* ``"interpret"``: the same Pallas kernel run by the Pallas interpreter (any platform);
* ``"reference"``: the ``jnp`` twin.

The Pallas kernels never write ``W_hat`` to HBM: every program rebuilds the
``[block_n, block_k]`` tile it needs from the packed codes and the codebook (two gathered
loads that hit L1/L2: each code word serves ``32 // bits`` columns and a row's codebook
is at most 16 entries). Shapes that are not multiples of the tiles are handled by
clamping code/codebook indices into range and zero-padding only the activations, so the
large operands are never copied.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.packing import SUPPORTED_BITS, decode_codes, packed_words, unpack_codes

Backend = Literal["pallas", "interpret", "reference"]
BlockSizes = tuple[int, int, int]
_BACKENDS = ("pallas", "interpret", "reference")


# --------------------------------------------------------------------------- checks


def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be None or one of {_BACKENDS}, got {backend!r}")
    return backend


def _check_sketch(codebook: jax.Array, codes: jax.Array, bits: int, in_features: int) -> int:
    """Validates shapes at trace time; returns ``cols_per_group``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if codebook.ndim != 3 or codebook.shape[-1] != 2**bits:
        raise ValueError(
            f"codebook must be [out, groups, {2**bits}] for {bits}-bit codes, "
            f"got shape {codebook.shape}"
        )
    if codes.ndim != 3 or codes.shape[:2] != codebook.shape[:2]:
        raise ValueError(
            f"codes must be packed [out, groups, words] with out, groups = "
            f"{codebook.shape[:2]} as in the codebook, got shape {codes.shape}"
        )
    if codes.dtype != jnp.uint32:
        raise ValueError(
            f"codes must be packed uint32 (pallas_kernels.pack_codes), got {codes.dtype}"
        )
    groups = codebook.shape[1]
    if in_features <= 0 or in_features % groups:
        raise ValueError(f"groups={groups} must divide in_features={in_features}")
    cols = in_features // groups
    if codes.shape[2] != packed_words(cols, bits):
        raise ValueError(
            f"{cols} columns per group of {bits}-bit codes pack into "
            f"{packed_words(cols, bits)} words, but codes has {codes.shape[2]}"
        )
    return cols


def _in_features(x: jax.Array) -> int:
    if x.ndim < 1:
        raise ValueError("x must be [..., in_features], got a scalar")
    return x.shape[-1]


# ------------------------------------------------------------------- jnp reference


def dequantize_reference(
    codebook: jax.Array, codes: jax.Array, bits: int, in_features: int
) -> jax.Array:
    """``jnp`` twin of `dequantize`: ``W_hat [out, in_features]`` in ``codebook.dtype``."""
    cols = _check_sketch(codebook, codes, bits, in_features)
    idx = unpack_codes(codes, bits, cols).astype(jnp.int32)
    w = jnp.take_along_axis(codebook, idx, axis=2)
    return w.reshape(codebook.shape[0], in_features)


def _dot_precision(dtype) -> lax.Precision:
    # fp32 callers expect fp32 results, not TF32/bf16 passes.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def sketched_matmul_reference(
    x: jax.Array, codebook: jax.Array, codes: jax.Array, bits: int
) -> jax.Array:
    """``jnp`` twin of `sketched_matmul`: ``x [..., in] @ W_hat.T -> [..., out]`` in ``x.dtype``."""
    in_features = _in_features(x)
    w = dequantize_reference(codebook, codes, bits, in_features).astype(x.dtype)
    y = jnp.einsum(
        "...i,oi->...o", x, w,
        preferred_element_type=jnp.float32, precision=_dot_precision(x.dtype),
    )
    return y.astype(x.dtype)


def sketched_matmul_grads_reference(
    x: jax.Array, codebook: jax.Array, codes: jax.Array, bits: int, dy: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``jnp`` twin of `sketched_matmul_grads`:
    ``(dx [..., in], dcodebook [out, groups, 2**bits])``.

    ``dcodebook`` is a segment sum of ``dy^T x`` over (row, group, code): one pass over
    ``[out, in]`` with no ``[out, in, 2**bits]`` one-hot.
    """
    in_features = _in_features(x)
    cols = _check_sketch(codebook, codes, bits, in_features)
    out, groups, nc = codebook.shape
    w = dequantize_reference(codebook, codes, bits, in_features).astype(dy.dtype)
    prec = _dot_precision(x.dtype)
    dx = jnp.einsum("...o,oi->...i", dy, w, preferred_element_type=jnp.float32, precision=prec)
    x2 = x.reshape(-1, in_features)
    dy2 = dy.reshape(-1, out)
    dw = jnp.einsum("mo,mi->oi", dy2, x2, preferred_element_type=jnp.float32, precision=prec)
    code = unpack_codes(codes, bits, cols).astype(jnp.int32)
    row_group = jnp.arange(out * groups, dtype=jnp.int32).reshape(out, groups, 1)
    seg = (row_group * nc + code).reshape(-1)
    dcb = jax.ops.segment_sum(
        dw.reshape(-1), seg, num_segments=out * groups * nc, indices_are_sorted=False
    )
    return dx.astype(x.dtype), dcb.reshape(out, groups, nc).astype(codebook.dtype)


# ---------------------------------------------------------------- Pallas (Triton)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(dim: int, want: int) -> int:
    # Triton tiles are powers of two and tl.dot needs every side >= 16.
    return max(16, min(want, _next_pow2(dim)))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    pr, pc = rows - a.shape[0], cols - a.shape[1]
    if pr == 0 and pc == 0:
        return a
    return jnp.pad(a, ((0, pr), (0, pc)))


def _tile_codes(codes_ref, rows, cols, *, bits: int, cols_per_group: int):
    """Codes (int32) at rows ``[bn, 1]`` x absolute columns ``[1, bk]`` (both in range)."""
    g = cols // cols_per_group
    shape = (rows.shape[0], cols.shape[1])
    rows, groups = jnp.broadcast_to(rows, shape), jnp.broadcast_to(g, shape)

    def load_words(word):
        return codes_ref[rows, groups, jnp.broadcast_to(word, shape)]

    code = decode_codes(load_words, cols - g * cols_per_group, bits)
    return g, code.astype(jnp.int32)


def _tile_weights(codebook_ref, codes_ref, n0, k0, *, bn: int, bk: int, bits: int,
                  out_features: int, in_features: int, cols_per_group: int):
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


def _pallas(kernel, *, grid, in_specs, out_specs, out_shape, backend, num_warps, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=backend == "interpret",
        name=name,
    )


def _dequantize_kernel(codebook_ref, codes_ref, o_ref, *, bn, bk, bits, out_features,
                       in_features, cols_per_group):
    w = _tile_weights(
        codebook_ref, codes_ref, pl.program_id(0) * bn, pl.program_id(1) * bk,
        bn=bn, bk=bk, bits=bits, out_features=out_features, in_features=in_features,
        cols_per_group=cols_per_group,
    )
    o_ref[...] = w.astype(o_ref.dtype)


def _dequantize_pallas(codebook, codes, bits, in_features, cols, backend):
    out = codebook.shape[0]
    bn, bk = _block(out, 64), _block(in_features, 64)
    np_, kp = _round_up(out, bn), _round_up(in_features, bk)
    kernel = functools.partial(
        _dequantize_kernel, bn=bn, bk=bk, bits=bits, out_features=out,
        in_features=in_features, cols_per_group=cols,
    )
    w = _pallas(
        kernel,
        grid=(np_ // bn, kp // bk),
        in_specs=[_full_spec(codebook), _full_spec(codes)],
        out_specs=pl.BlockSpec((bn, bk), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((np_, kp), codebook.dtype),
        backend=backend, num_warps=4, name="sketch_dequantize",
    )(codebook, codes)
    return w[:out, :in_features]


def _forward_kernel(x_ref, codebook_ref, codes_ref, o_ref, *, bm, bn, bk, tiles_per_split,
                    bits, out_features, in_features, cols_per_group, precision):
    n0 = pl.program_id(1) * bn
    first = pl.program_id(2) * tiles_per_split

    def body(t, acc):
        k0 = (first + t) * bk
        x = x_ref[:, pl.ds(k0, bk)]
        w = _tile_weights(
            codebook_ref, codes_ref, n0, k0, bn=bn, bk=bk, bits=bits,
            out_features=out_features, in_features=in_features, cols_per_group=cols_per_group,
        ).astype(x.dtype)
        return acc + plgpu.dot(x, w, trans_b=True, precision=precision)

    acc = lax.fori_loop(0, tiles_per_split, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _forward_blocks(m: int, n: int, k: int, block_sizes: BlockSizes | None) -> BlockSizes:
    if block_sizes is not None:
        return block_sizes
    if m <= 16:
        # Decode is bound by reading the codes; K is split across programs too (below)
        # so that every SM streams its share.
        return _block(m, 16), _block(n, 64), _block(k, 128)
    if m <= 64:
        return _block(m, 64), _block(n, 64), _block(k, 64)
    # Prefill: a tall M tile amortises each rebuilt weight tile over 128 rows.
    return _block(m, 128), _block(n, 128), _block(k, 32)


def _k_splits(programs: int, k_tiles: int, target: int = 512) -> tuple[int, int]:
    """(splits, tiles_per_split) giving about ``target`` programs in all."""
    splits = max(1, min(k_tiles, -(-target // programs)))
    tiles_per_split = -(-k_tiles // splits)
    return -(-k_tiles // tiles_per_split), tiles_per_split


def _forward_pallas(x2, codebook, codes, bits, cols, backend, block_sizes):
    m, k = x2.shape
    n = codebook.shape[0]
    bm, bn, bk = _forward_blocks(m, n, k, block_sizes)
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    # Split K only for short x: the fp32 partial sums are then a few rows each.
    programs = (mp // bm) * (np_ // bn)
    splits, tiles_per_split = _k_splits(programs, -(-k // bk)) if m <= 64 else (1, -(-k // bk))
    kp = splits * tiles_per_split * bk
    xp = _pad2(x2, mp, kp)
    kernel = functools.partial(
        _forward_kernel, bm=bm, bn=bn, bk=bk, tiles_per_split=tiles_per_split, bits=bits,
        out_features=n, in_features=k, cols_per_group=cols, precision=_dot_precision(x2.dtype),
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
        backend=backend, num_warps=8 if bm * bn >= 128 * 128 else 4, name="sketch_matmul",
    )(xp, codebook, codes)
    y = y.sum(axis=0) if splits > 1 else y[0]
    return y[:m, :n].astype(x2.dtype)


def _dx_kernel(dy_ref, codebook_ref, codes_ref, o_ref, *, bm, bn, bk, nn, bits,
               out_features, in_features, cols_per_group, precision):
    k0 = pl.program_id(1) * bk

    def body(t, acc):
        n0 = t * bn
        dy = dy_ref[:, pl.ds(n0, bn)]
        w = _tile_weights(
            codebook_ref, codes_ref, n0, k0, bn=bn, bk=bk, bits=bits,
            out_features=out_features, in_features=in_features, cols_per_group=cols_per_group,
        ).astype(dy.dtype)
        return acc + plgpu.dot(dy, w, precision=precision)

    acc = lax.fori_loop(0, nn, body, jnp.zeros((bm, bk), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dx_pallas(dy2, codebook, codes, bits, in_features, cols, backend, block_sizes):
    m, n = dy2.shape
    bm, bn, bk = block_sizes or (_block(m, 64), _block(n, 32), _block(in_features, 128))
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(in_features, bk)
    dyp = _pad2(dy2, mp, np_)
    kernel = functools.partial(
        _dx_kernel, bm=bm, bn=bn, bk=bk, nn=np_ // bn, bits=bits, out_features=n,
        in_features=in_features, cols_per_group=cols, precision=_dot_precision(dy2.dtype),
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
        backend=backend, num_warps=4, name="sketch_matmul_dx",
    )(dyp, codebook, codes)
    return dx[:m, :in_features]


def _dcodebook_kernel(dy_ref, x_ref, codes_ref, o_ref, *, bm, bn, bk, nm, tiles_per_split,
                      bits, out_features, cols_per_group, precision):
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


def _dcodebook_pallas(x2, dy2, codebook, codes, bits, cols, backend, block_sizes):
    m, k = x2.shape
    n, groups, nc = codebook.shape
    bm, bn, bk = block_sizes or (_block(m, 64), _block(n, 64), _block(cols, 64))
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    tiles = -(-cols // bk)
    # Split each group's K tiles across programs when rows x groups alone would leave
    # SMs idle; the partial bucket sums ([splits, out, groups, 2**bits]) are tiny.
    splits, tiles_per_split = _k_splits((np_ // bn) * groups, tiles)
    kx = (groups - 1) * cols + splits * tiles_per_split * bk
    xp = _pad2(x2, mp, max(kx, k))
    dyp = _pad2(dy2, mp, np_)
    kernel = functools.partial(
        _dcodebook_kernel, bm=bm, bn=bn, bk=bk, nm=mp // bm, tiles_per_split=tiles_per_split,
        bits=bits, out_features=n, cols_per_group=cols, precision=_dot_precision(x2.dtype),
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
        backend=backend, num_warps=4, name="sketch_matmul_dcodebook",
    )(dyp, xp, codes)
    return partial.sum(axis=0)[:n].astype(codebook.dtype)


# -------------------------------------------------------------------- public API


def dequantize(
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    in_features: int,
    *,
    backend: Backend | None = None,
) -> jax.Array:
    """Rebuild ``W_hat [out, in_features]`` (``codebook.dtype``) from ``codebook
    [out, groups, 2**bits]`` and packed ``codes uint32 [out, groups, words]``."""
    cols = _check_sketch(codebook, codes, bits, in_features)
    backend = _resolve_backend(backend)
    if backend == "reference":
        return dequantize_reference(codebook, codes, bits, in_features)
    return _dequantize_pallas(codebook, codes, bits, in_features, cols, backend)


def _forward(x2, codebook, codes, bits, backend, block_sizes):
    cols = _check_sketch(codebook, codes, bits, x2.shape[1])
    if backend == "reference":
        return sketched_matmul_reference(x2, codebook, codes, bits)
    return _forward_pallas(x2, codebook, codes, bits, cols, backend, block_sizes)


def _grads(x2, codebook, codes, bits, dy2, backend, block_sizes):
    cols = _check_sketch(codebook, codes, bits, x2.shape[1])
    if backend == "reference":
        return sketched_matmul_grads_reference(x2, codebook, codes, bits, dy2)
    dx = _dx_pallas(dy2, codebook, codes, bits, x2.shape[1], cols, backend, block_sizes)
    dcb = _dcodebook_pallas(x2, dy2, codebook, codes, bits, cols, backend, block_sizes)
    return dx.astype(x2.dtype), dcb


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sketched_matmul_2d(x2, codebook, codes, bits, backend, block_sizes):
    return _forward(x2, codebook, codes, bits, backend, block_sizes)


def _sketched_matmul_2d_fwd(x2, codebook, codes, bits, backend, block_sizes):
    return _forward(x2, codebook, codes, bits, backend, block_sizes), (x2, codebook, codes)


def _sketched_matmul_2d_bwd(bits, backend, block_sizes, residuals, dy2):
    x2, codebook, codes = residuals
    dx, dcb = _grads(x2, codebook, codes, bits, dy2.astype(x2.dtype), backend, block_sizes)
    # Codes are integers: their cotangent is symbolically zero.
    return dx, dcb, None


_sketched_matmul_2d.defvjp(_sketched_matmul_2d_fwd, _sketched_matmul_2d_bwd)


def sketched_matmul(
    x: jax.Array,
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    *,
    backend: Backend | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``y = x @ W_hat.T`` without materialising ``W_hat``.

    Args:
      x: ``[..., in_features]``, any float dtype; the result has ``x.dtype`` and is
        accumulated in fp32 (``W_hat`` is rounded to ``x.dtype`` before the product).
      codebook: ``[out, groups, 2**bits]``; differentiable.
      codes: packed ``uint32 [out, groups, words]``; not differentiable.
      bits: 2, 3 or 4 (static).
      backend: see the module docstring.
      block_sizes: ``(block_m, block_n, block_k)`` powers of two >= 16 for the Pallas
        kernels (forward and both gradients); ``None`` picks them from the shapes.

    Returns:
      ``[..., out]``. Differentiable in ``x`` and ``codebook`` via a custom VJP
      (``dx = dy @ W_hat``; ``dcodebook`` = bucket sums of ``dy^T x``).
    """
    in_features = _in_features(x)
    _check_sketch(codebook, codes, bits, in_features)
    backend = _resolve_backend(backend)
    if block_sizes is not None:
        block_sizes = tuple(int(b) for b in block_sizes)
        if len(block_sizes) != 3 or any(b < 16 or b & (b - 1) for b in block_sizes):
            raise ValueError(f"block_sizes must be three powers of two >= 16, got {block_sizes}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    y2 = _sketched_matmul_2d(x2, codebook, codes, bits, backend, block_sizes)
    return y2.reshape(*lead, codebook.shape[0])


def sketched_matmul_grads(
    x: jax.Array,
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    dy: jax.Array,
    *,
    backend: Backend | None = None,
    block_sizes: BlockSizes | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The backward pass of `sketched_matmul` for cotangent ``dy [..., out]``:
    ``(dx [..., in] in x.dtype, dcodebook [out, groups, 2**bits] in codebook.dtype)``."""
    in_features = _in_features(x)
    _check_sketch(codebook, codes, bits, in_features)
    out = codebook.shape[0]
    if dy.shape != (*x.shape[:-1], out):
        raise ValueError(f"dy must be {(*x.shape[:-1], out)}, got {dy.shape}")
    backend = _resolve_backend(backend)
    dx, dcb = _grads(
        x.reshape(-1, in_features), codebook, codes, bits,
        dy.reshape(-1, out).astype(x.dtype), backend, block_sizes,
    )
    return dx.reshape(x.shape), dcb
