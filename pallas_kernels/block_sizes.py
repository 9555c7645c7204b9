"""Tile sizes of the sketched-matmul kernels, one dataclass per kernel, shared by every backend.

Each field is an upper bound in *logical* units (rows of ``x``, output features, input
features) and ``None`` means "the backend's default". Each backend turns them into tiles
its hardware accepts:

* Triton (`resolve`): powers of two >= 16, shrunk to the next power of two of the dimension;
* Mosaic TPU (`tpu_rows`, `tpu_lanes`): second-minor sides a multiple of 8 (16 for 16-bit
  dtypes), minor sides a multiple of 128 unless they span the whole dimension;
* Mosaic GPU (`mosaic_gpu`): 64 rows of ``W_hat`` (one warpgroup) a program; tokens and
  the K step from the fields, fitted to shared memory by `pallas_kernels.mosaic_gpu`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


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


def _pick(given: tuple[int | None, ...], default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d if g is None else g for g, d in zip(given, default))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tpu_rows(dim: int, want: int, dtype) -> int:
    """A TPU second-minor (sublane) tile: ``want`` rounded up to the dtype's sublane
    multiple (8 rows of 32-bit, 16 of 16-bit), and no taller than ``dim`` so rounded."""
    sub = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    return min(_round_up(want, sub), _round_up(dim, sub))


def tpu_lanes(dim: int, want: int) -> int:
    """A TPU minor (lane) tile: the whole dimension when ``want`` covers it, else ``want``
    rounded up to a multiple of 128 (a partial last block is masked by Pallas)."""
    if dim <= want:
        return dim
    tile = _round_up(want, 128)
    return dim if tile >= dim else tile


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

    On TPU the defaults are ``block_m = m`` (rounded to 8/16 rows) up to 256,
    ``block_n=512`` and ``block_k=8192`` input features for ``m <= 64``, and
    ``256, 256, 4096`` above (`tpu`).

    Attributes:
      block_m: rows of ``x`` per program.
      block_n: output features (rows of ``W_hat``) per program (Mosaic GPU: always 64).
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
        bm, bn, bk = _pick((self.block_m, self.block_n, self.block_k), default)
        return _tile(m, bm), _tile(n, bn), _tile(k, bk)

    def tpu(self, m: int) -> tuple[int, int, int]:
        """Logical TPU upper bounds ``(block_m, block_n, block_k)`` for ``m`` rows of ``x``."""
        default = (min(m, 256), 512, 8192) if m <= 64 else (256, 256, 4096)
        return _pick((self.block_m, self.block_n, self.block_k), default)

    def mosaic_gpu(self, m: int) -> tuple[int, int | None]:
        """Mosaic GPU upper bounds ``(block_m, block_k)`` for ``m`` rows of ``x``: rows of ``x``
        per program (the wgmma N side: ``m`` rounded to 16, 32, 64, then 128; at most 256)
        and input features per K step (``None``: as many as shared memory takes)."""
        default = next(t for t in (16, 32, 64, 128) if m <= t or t == 128)
        return min(256, self.block_m or default), self.block_k


@dataclasses.dataclass(frozen=True, slots=True)
class DxBlockSizes(_Tiles):
    """Tiles of the input-gradient kernel ``dx[m, k] = dy[m, n] @ W_hat[n, k]``
    (upper bounds, as in `ForwardBlockSizes`).

    Attributes:
      block_m: rows of ``dy`` per program (Triton default 64, TPU 256).
      block_n: output features per step of the N loop (Triton 32, TPU 256).
      block_k: input features (columns of ``dx``) per program (Triton 128, TPU 4096,
        Mosaic GPU 64 word-lanes).
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None

    def resolve(self, m: int, n: int, k: int) -> tuple[int, int, int]:
        bm, bn, bk = _pick((self.block_m, self.block_n, self.block_k), (64, 32, 128))
        return _tile(m, bm), _tile(n, bn), _tile(k, bk)

    def tpu(self) -> tuple[int, int, int]:
        """Logical TPU upper bounds ``(block_m, block_n, block_k)``."""
        return _pick((self.block_m, self.block_n, self.block_k), (256, 256, 4096))

    def mosaic_gpu(self) -> int | None:
        """Mosaic GPU upper bound on input features per program (``None``: 64 word-lanes);
        the tokens (64, the wgmma M side) and the rows per step (64) are fixed."""
        return self.block_k


@dataclasses.dataclass(frozen=True, slots=True)
class DcodebookBlockSizes(_Tiles):
    """Tiles of the codebook-gradient kernel (bucket sums of ``dy^T x`` per row-group;
    upper bounds, as in `ForwardBlockSizes`).

    Attributes:
      block_m: rows of ``x``/``dy`` per step of the M loop (Triton default 64, TPU 512).
      block_n: output features per program (Triton 64, TPU 256).
      block_k: columns of a group per step of the K loop (Triton 64, TPU 2048; Mosaic GPU:
        per program, 64 word-lanes).
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None

    def resolve(self, m: int, n: int, cols_per_group: int) -> tuple[int, int, int]:
        bm, bn, bk = _pick((self.block_m, self.block_n, self.block_k), (64, 64, 64))
        return _tile(m, bm), _tile(n, bn), _tile(cols_per_group, bk)

    def tpu(self) -> tuple[int, int, int]:
        """Logical TPU upper bounds ``(block_m, block_n, block_k)``."""
        return _pick((self.block_m, self.block_n, self.block_k), (512, 256, 2048))

    def mosaic_gpu(self) -> int | None:
        """Mosaic GPU upper bound on input features per program (``None``: 64 word-lanes);
        the rows (64, the wgmma M side) and the tokens per step (64) are fixed."""
        return self.block_k


@dataclasses.dataclass(frozen=True, slots=True)
class DequantizeBlockSizes(_Tiles):
    """Tiles of the dequantize kernel, which writes ``W_hat [out, in]`` (upper bounds).

    Attributes:
      block_n: rows per program (Triton default 64, TPU 256).
      block_k: columns per program (Triton 64, TPU 4096).
    """

    block_n: int | None = None
    block_k: int | None = None

    def resolve(self, n: int, k: int) -> tuple[int, int]:
        bn, bk = _pick((self.block_n, self.block_k), (64, 64))
        return _tile(n, bn), _tile(k, bk)

    def tpu(self) -> tuple[int, int]:
        """Logical TPU upper bounds ``(block_n, block_k)``."""
        return _pick((self.block_n, self.block_k), (256, 4096))


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """The tiles of the three kernels behind `sketched_matmul` and its VJP.

    Static and hashable (a jit/custom_vjp static argument). ``BlockSizes()`` is the
    default everywhere; `BlockSizes.uniform` sets one ``(m, n, k)`` for all three.

    Attributes:
      forward: `ForwardBlockSizes` (default: chosen by the rows of ``x``).
      dx: `DxBlockSizes`.
      dcodebook: `DcodebookBlockSizes`.
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
