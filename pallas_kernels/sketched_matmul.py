"""Dequantisation and the fused sketched matmul, with pure-``jnp`` twins.

A sketched weight is ``W_hat[r, j] = codebook[r, j // cols_per_group, code[r, j]]`` with
``codebook [out, groups, 2**bits]`` and codes packed by `pallas_kernels.packing` into
``uint32 [out, groups, words]``.

Every public function takes ``backend``:

* ``None``: picked by the platform the computation is *lowered for* (not the host), with
  `jax.lax.platform_dependent`: the Pallas kernel for ``cuda`` (a jit on an NVIDIA GPU,
  or ``jax.export(..., platforms=["cuda"])`` from a CPU-only host), the ``jnp`` reference
  for every other platform. Only the chosen branch is lowered;
* ``"pallas"``: the compiled Pallas kernel;
* ``"interpret"``: the same Pallas kernel run by the Pallas interpreter (any platform);
* ``"reference"``: the ``jnp`` twin.

The Pallas kernels never write ``W_hat`` to HBM: every program rebuilds the
``[block_n, block_k]`` tile it needs from the packed codes and the codebook (two gathered
loads that hit L1/L2: each code word serves ``32 // bits`` columns and a row's codebook
is at most 16 entries). Shapes that are not multiples of the tiles are handled by
clamping code/codebook indices into range and zero-padding only the activations, so the
large operands are never copied.

Tiles are set per kernel by `ForwardBlockSizes`, `DxBlockSizes`, `DcodebookBlockSizes`
(gathered in `BlockSizes`) and `DequantizeBlockSizes`. Shapes are checked once per public
call, before any kernel is built.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.packing import SUPPORTED_BITS, decode_codes, packed_words, unpack_codes

Backend = Literal["pallas", "interpret", "reference"]
_BACKENDS = ("pallas", "interpret", "reference")
_AUTO = "auto"


# ---------------------------------------------------------------------- tile sizes


def _check_tile(owner: str, name: str, value: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(
            f"block_sizes: {owner}.{name}={value!r} must be a power of two >= 16 "
            "(Triton tiles are powers of two and tl.dot needs every side >= 16)"
        )


class _Tiles:
    """Validation shared by the per-kernel block-size dataclasses."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_tile(type(self).__name__, field.name, getattr(self, field.name))


def _tile(dim: int, want: int) -> int:
    """``want`` shrunk to the next power of two >= ``dim`` (never below 16)."""
    return max(16, min(want, 1 << max(0, (dim - 1).bit_length())))


@dataclasses.dataclass(frozen=True, slots=True)
class ForwardBlockSizes(_Tiles):
    """Tiles of the forward kernel ``y[m, n] = x[m, k] @ W_hat[n, k].T``.

    Each field is an upper bound: a tile never exceeds the next power of two of its
    dimension. ``None`` picks by the number of rows ``m`` of ``x``:

    * decode, ``m <= 16``: ``block_m=16, block_n=64, block_k=128``, and K is split across
      programs (about 512 in all) so every SM streams its share of the codes;
    * ``16 < m <= 64``: ``64, 64, 64``, K split likewise;
    * prefill, ``m > 64``: ``128, 128, 32``; a tall M tile amortises each rebuilt weight
      tile over 128 rows, no K split.

    Attributes:
      block_m: rows of ``x`` per program.
      block_n: output features (rows of ``W_hat``) per program.
      block_k: input features per step of the K loop.
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None

    def resolve(self, m: int, n: int, k: int) -> tuple[int, int, int]:
        if m <= 16:
            default = (16, 64, 128)
        elif m <= 64:
            default = (64, 64, 64)
        else:
            default = (128, 128, 32)
        given = (self.block_m, self.block_n, self.block_k)
        bm, bn, bk = (d if g is None else g for g, d in zip(given, default))
        return _tile(m, bm), _tile(n, bn), _tile(k, bk)


@dataclasses.dataclass(frozen=True, slots=True)
class DxBlockSizes(_Tiles):
    """Tiles of the input-gradient kernel ``dx[m, k] = dy[m, n] @ W_hat[n, k]``
    (upper bounds, as in `ForwardBlockSizes`).

    Attributes:
      block_m: rows of ``dy`` per program (default 64).
      block_n: output features per step of the N loop (default 32).
      block_k: input features (columns of ``dx``) per program (default 128).
    """

    block_m: int = 64
    block_n: int = 32
    block_k: int = 128

    def resolve(self, m: int, n: int, k: int) -> tuple[int, int, int]:
        return _tile(m, self.block_m), _tile(n, self.block_n), _tile(k, self.block_k)


@dataclasses.dataclass(frozen=True, slots=True)
class DcodebookBlockSizes(_Tiles):
    """Tiles of the codebook-gradient kernel (bucket sums of ``dy^T x`` per row-group;
    upper bounds, as in `ForwardBlockSizes`).

    Attributes:
      block_m: rows of ``x``/``dy`` per step of the M loop (default 64).
      block_n: output features per program (default 64).
      block_k: columns of a group per step of the K loop (default 64).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64

    def resolve(self, m: int, n: int, cols_per_group: int) -> tuple[int, int, int]:
        return (_tile(m, self.block_m), _tile(n, self.block_n), _tile(cols_per_group, self.block_k))


@dataclasses.dataclass(frozen=True, slots=True)
class DequantizeBlockSizes(_Tiles):
    """Tiles of the dequantize kernel, which writes ``W_hat [out, in]`` (upper bounds).

    Attributes:
      block_n: rows per program (default 64).
      block_k: columns per program (default 64).
    """

    block_n: int = 64
    block_k: int = 64

    def resolve(self, n: int, k: int) -> tuple[int, int]:
        return _tile(n, self.block_n), _tile(k, self.block_k)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """The tiles of the three kernels behind `sketched_matmul` and its VJP.

    Static and hashable (a jit/custom_vjp static argument). ``BlockSizes()`` is the
    default everywhere; `BlockSizes.uniform` sets one ``(m, n, k)`` for all three.

    Attributes:
      forward: `ForwardBlockSizes` (default: chosen by the rows of ``x``).
      dx: `DxBlockSizes` (default ``64, 32, 128``).
      dcodebook: `DcodebookBlockSizes` (default ``64, 64, 64``).
    """

    forward: ForwardBlockSizes = ForwardBlockSizes()
    dx: DxBlockSizes = DxBlockSizes()
    dcodebook: DcodebookBlockSizes = DcodebookBlockSizes()

    @classmethod
    def uniform(cls, block_m: int, block_n: int, block_k: int) -> BlockSizes:
        """The same tiles for the forward, dx and dcodebook kernels."""
        return cls(
            ForwardBlockSizes(block_m, block_n, block_k),
            DxBlockSizes(block_m, block_n, block_k),
            DcodebookBlockSizes(block_m, block_n, block_k),
        )

    @classmethod
    def of(cls, value: BlockSizes | tuple[int, int, int] | None) -> BlockSizes:
        """``value`` as `BlockSizes`: ``None`` is the default, a ``(block_m, block_n,
        block_k)`` tuple is `uniform`."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        try:
            bm, bn, bk = (int(b) for b in value)
        except (TypeError, ValueError):
            raise ValueError(f"block_sizes must be BlockSizes or (block_m, block_n, block_k), got {value!r}") from None
        return cls.uniform(bm, bn, bk)


# --------------------------------------------------------------------------- checks


def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        return _AUTO
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be None or one of {_BACKENDS}, got {backend!r}")
    return backend


def _check_sketch(codebook: jax.Array, codes: jax.Array, bits: int, in_features: int) -> int:
    """Validates shapes at trace time (once per public call); returns ``cols_per_group``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits=}")
    if codebook.ndim != 3 or codebook.shape[-1] != 2**bits:
        raise ValueError(f"codebook must be [out, groups, {2**bits}] for {bits}-bit codes, got shape {codebook.shape}")
    if not jnp.issubdtype(codebook.dtype, jnp.floating):
        raise ValueError(f"codebook must be a float array, got {codebook.dtype}")
    if codes.ndim != 3 or codes.shape[:2] != codebook.shape[:2]:
        raise ValueError(
            f"codes must be packed [out, groups, words] with out, groups = "
            f"{codebook.shape[:2]} as in the codebook, got shape {codes.shape}"
        )
    if codes.dtype != jnp.uint32:
        raise ValueError(f"codes must be packed uint32 (pallas_kernels.pack_codes), got {codes.dtype}")
    groups = codebook.shape[1]
    if in_features <= 0 or in_features % groups:
        raise ValueError(f"groups={groups} must divide {in_features=}")
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
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array, got {x.dtype}")
    return x.shape[-1]


# ------------------------------------------------------------------- jnp reference


def _dequantize_ref(codebook, codes, bits, cols):
    idx = unpack_codes(codes, bits, cols).astype(jnp.int32)
    w = jnp.take_along_axis(codebook, idx, axis=2)
    return w.reshape(codebook.shape[0], codebook.shape[1] * cols)


def _dot_precision(dtype) -> lax.Precision:
    # fp32 callers expect fp32 results, not TF32/bf16 passes.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _forward_ref(x2, codebook, codes, bits, cols):
    w = _dequantize_ref(codebook, codes, bits, cols).astype(x2.dtype)
    y = jnp.einsum(
        "mi,oi->mo",
        x2,
        w,
        preferred_element_type=jnp.float32,
        precision=_dot_precision(x2.dtype),
    )
    return y.astype(x2.dtype)


def _grads_ref(x2, codebook, codes, bits, cols, dy2):
    out, groups, nc = codebook.shape
    w = _dequantize_ref(codebook, codes, bits, cols).astype(dy2.dtype)
    prec = _dot_precision(x2.dtype)
    dx = jnp.einsum("mo,oi->mi", dy2, w, preferred_element_type=jnp.float32, precision=prec)
    dw = jnp.einsum("mo,mi->oi", dy2, x2, preferred_element_type=jnp.float32, precision=prec)
    code = unpack_codes(codes, bits, cols).astype(jnp.int32)
    row_group = jnp.arange(out * groups, dtype=jnp.int32).reshape(out, groups, 1)
    seg = (row_group * nc + code).reshape(-1)
    dcb = jax.ops.segment_sum(dw.reshape(-1), seg, num_segments=out * groups * nc, indices_are_sorted=False)
    return dx.astype(x2.dtype), dcb.reshape(out, groups, nc).astype(codebook.dtype)


def dequantize_reference(codebook: jax.Array, codes: jax.Array, bits: int, in_features: int) -> jax.Array:
    """``jnp`` twin of `dequantize`: ``W_hat [out, in_features]`` in ``codebook.dtype``."""
    cols = _check_sketch(codebook, codes, bits, in_features)
    return _dequantize_ref(codebook, codes, bits, cols)


def sketched_matmul_reference(x: jax.Array, codebook: jax.Array, codes: jax.Array, bits: int) -> jax.Array:
    """``jnp`` twin of `sketched_matmul`: ``x [..., in] @ W_hat.T -> [..., out]`` in ``x.dtype``."""
    in_features = _in_features(x)
    cols = _check_sketch(codebook, codes, bits, in_features)
    y2 = _forward_ref(x.reshape(-1, in_features), codebook, codes, bits, cols)
    return y2.reshape(*x.shape[:-1], codebook.shape[0])


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
    _check_dy(dy, x, codebook)
    dx, dcb = _grads_ref(
        x.reshape(-1, in_features), codebook, codes, bits, cols, dy.reshape(-1, codebook.shape[0]).astype(x.dtype)
    )
    return dx.reshape(x.shape), dcb


def _check_dy(dy: jax.Array, x: jax.Array, codebook: jax.Array) -> None:
    want = (*x.shape[:-1], codebook.shape[0])
    if dy.shape != want:
        raise ValueError(f"dy must be {want} (x's batch shape, out features), got {dy.shape}")


# ---------------------------------------------------------------- Pallas (Triton)


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
@functools.partial(jax.jit, static_argnames=("bits", "cols", "backend", "blocks"))
def _dequantize_pallas(codebook, codes, bits, cols, backend, blocks: DequantizeBlockSizes):
    out = codebook.shape[0]
    in_features = codebook.shape[1] * cols
    bn, bk = blocks.resolve(out, in_features)
    np_, kp = _round_up(out, bn), _round_up(in_features, bk)
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
        backend=backend,
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


@functools.partial(jax.jit, static_argnames=("bits", "cols", "backend", "blocks"))
def _forward_pallas(x2, codebook, codes, bits, cols, backend, blocks: ForwardBlockSizes):
    m, k = x2.shape
    n = codebook.shape[0]
    bm, bn, bk = blocks.resolve(m, n, k)
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    # Split K only for short x (decode is bound by reading the codes, and splitting lets
    # every SM stream its share); the fp32 partial sums are then a few rows each.
    programs = (mp // bm) * (np_ // bn)
    splits, tiles_per_split = _k_splits(programs, -(-k // bk)) if m <= 64 else (1, -(-k // bk))
    kp = splits * tiles_per_split * bk
    xp = _pad2(x2, mp, kp)
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
        precision=_dot_precision(x2.dtype),
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
        backend=backend,
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


@functools.partial(jax.jit, static_argnames=("bits", "cols", "backend", "blocks"))
def _dx_pallas(dy2, codebook, codes, bits, cols, backend, blocks: DxBlockSizes):
    m, n = dy2.shape
    in_features = codebook.shape[1] * cols
    bm, bn, bk = blocks.resolve(m, n, in_features)
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(in_features, bk)
    dyp = _pad2(dy2, mp, np_)
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
        precision=_dot_precision(dy2.dtype),
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
        backend=backend,
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


@functools.partial(jax.jit, static_argnames=("bits", "cols", "backend", "blocks"))
def _dcodebook_pallas(x2, dy2, codebook, codes, bits, cols, backend, blocks: DcodebookBlockSizes):
    m, k = x2.shape
    n, groups, nc = codebook.shape
    bm, bn, bk = blocks.resolve(m, n, cols)
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    tiles = -(-cols // bk)
    # Split each group's K tiles across programs when rows x groups alone would leave
    # SMs idle; the partial bucket sums ([splits, out, groups, 2**bits]) are tiny.
    splits, tiles_per_split = _k_splits((np_ // bn) * groups, tiles)
    kx = (groups - 1) * cols + splits * tiles_per_split * bk
    xp = _pad2(x2, mp, max(kx, k))
    dyp = _pad2(dy2, mp, np_)
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
        precision=_dot_precision(x2.dtype),
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
        backend=backend,
        num_warps=4,
        name="sketch_matmul_dcodebook",
    )(dyp, xp, codes)
    return partial.sum(axis=0)[:n].astype(codebook.dtype)


# -------------------------------------------------------------------- public API


def _by_platform(pallas_fn, reference_fn, *args):
    """``pallas_fn(*args)`` when lowering for CUDA, ``reference_fn(*args)`` otherwise.

    Decided per lowering platform, so ``jax.export(..., platforms=["cuda"])`` on a
    CPU-only host gets the Pallas kernels, and a jit on the CPU never lowers them.
    """
    return lax.platform_dependent(*args, cuda=pallas_fn, default=reference_fn)


def _dequantize(codebook, codes, bits, cols, backend, blocks: DequantizeBlockSizes):
    reference = functools.partial(_dequantize_ref, bits=bits, cols=cols)
    if backend == "reference":
        return reference(codebook, codes)
    pallas = functools.partial(_dequantize_pallas, bits=bits, cols=cols, blocks=blocks)
    if backend == _AUTO:
        return _by_platform(functools.partial(pallas, backend="pallas"), reference, codebook, codes)
    return pallas(codebook, codes, backend=backend)


def dequantize(
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    in_features: int,
    *,
    backend: Backend | None = None,
    block_sizes: DequantizeBlockSizes | None = None,
) -> jax.Array:
    """Rebuild ``W_hat [out, in_features]`` (``codebook.dtype``) from ``codebook
    [out, groups, 2**bits]`` and packed ``codes uint32 [out, groups, words]``."""
    cols = _check_sketch(codebook, codes, bits, in_features)
    backend = _resolve_backend(backend)
    if block_sizes is not None and not isinstance(block_sizes, DequantizeBlockSizes):
        raise ValueError(f"block_sizes must be DequantizeBlockSizes, got {block_sizes!r}")
    return _dequantize(codebook, codes, bits, cols, backend, block_sizes or DequantizeBlockSizes())


def _forward(x2, codebook, codes, bits, cols, backend, blocks: BlockSizes):
    def reference(x2, codebook, codes):
        return _forward_ref(x2, codebook, codes, bits, cols)

    def pallas(x2, codebook, codes, backend="pallas"):
        return _forward_pallas(x2, codebook, codes, bits, cols, backend, blocks.forward)

    if backend == "reference":
        return reference(x2, codebook, codes)
    if backend == _AUTO:
        return _by_platform(pallas, reference, x2, codebook, codes)
    return pallas(x2, codebook, codes, backend)


def _grads(x2, codebook, codes, bits, cols, dy2, backend, blocks: BlockSizes):
    def reference(x2, codebook, codes, dy2):
        return _grads_ref(x2, codebook, codes, bits, cols, dy2)

    def pallas(x2, codebook, codes, dy2, backend="pallas"):
        # Both kernels rebuild W_hat tiles on chip: neither W_hat nor dW reaches HBM.
        dx = _dx_pallas(dy2, codebook, codes, bits, cols, backend, blocks.dx)
        dcb = _dcodebook_pallas(x2, dy2, codebook, codes, bits, cols, backend, blocks.dcodebook)
        return dx.astype(x2.dtype), dcb

    if backend == "reference":
        return reference(x2, codebook, codes, dy2)
    if backend == _AUTO:
        return _by_platform(pallas, reference, x2, codebook, codes, dy2)
    return pallas(x2, codebook, codes, dy2, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _sketched_matmul_2d(x2, codebook, codes, bits, cols, backend, blocks):
    return _forward(x2, codebook, codes, bits, cols, backend, blocks)


def _sketched_matmul_2d_fwd(x2, codebook, codes, bits, cols, backend, blocks):
    return _forward(x2, codebook, codes, bits, cols, backend, blocks), (x2, codebook, codes)


def _sketched_matmul_2d_bwd(bits, cols, backend, blocks, residuals, dy2):
    x2, codebook, codes = residuals
    dx, dcb = _grads(x2, codebook, codes, bits, cols, dy2.astype(x2.dtype), backend, blocks)
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
    block_sizes: BlockSizes | tuple[int, int, int] | None = None,
) -> jax.Array:
    """``y = x @ W_hat.T`` without materialising ``W_hat``.

    Args:
      x: ``[..., in_features]``, any float dtype; the result has ``x.dtype`` and is
        accumulated in fp32 (``W_hat`` is rounded to ``x.dtype`` before the product).
      codebook: ``[out, groups, 2**bits]``; differentiable.
      codes: packed ``uint32 [out, groups, words]``; not differentiable.
      bits: 2, 3 or 4 (static).
      backend: see the module docstring.
      block_sizes: tiles of the Pallas kernels (forward and both gradients): a
        `BlockSizes`, or ``(block_m, block_n, block_k)`` powers of two >= 16 for all three
        (`BlockSizes.uniform`); ``None`` is ``BlockSizes()``.

    Returns:
      ``[..., out]``. Differentiable in ``x`` and ``codebook`` via a custom VJP
      (``dx = dy @ W_hat``; ``dcodebook`` = bucket sums of ``dy^T x``).
    """
    in_features = _in_features(x)
    cols = _check_sketch(codebook, codes, bits, in_features)
    backend = _resolve_backend(backend)
    blocks = BlockSizes.of(block_sizes)
    y2 = _sketched_matmul_2d(x.reshape(-1, in_features), codebook, codes, bits, cols, backend, blocks)
    return y2.reshape(*x.shape[:-1], codebook.shape[0])


def sketched_matmul_grads(
    x: jax.Array,
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    dy: jax.Array,
    *,
    backend: Backend | None = None,
    block_sizes: BlockSizes | tuple[int, int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The backward pass of `sketched_matmul` for cotangent ``dy [..., out]``:
    ``(dx [..., in] in x.dtype, dcodebook [out, groups, 2**bits] in codebook.dtype)``."""
    in_features = _in_features(x)
    cols = _check_sketch(codebook, codes, bits, in_features)
    _check_dy(dy, x, codebook)
    backend = _resolve_backend(backend)
    dx, dcb = _grads(
        x.reshape(-1, in_features),
        codebook,
        codes,
        bits,
        cols,
        dy.reshape(-1, codebook.shape[0]).astype(x.dtype),
        backend,
        BlockSizes.of(block_sizes),
    )
    return dx.reshape(x.shape), dcb
