"""Dequantisation and the fused sketched matmul: the public entry points and their ``jnp`` twins.

A sketched weight is ``W_hat[r, j] = codebook[r, j // cols_per_group, code[r, j]]`` with
``codebook [out, groups, 2**bits]`` and codes packed by `pallas_kernels.packing` into
``uint32 [out, groups, words]``.

Every public function takes ``backend`` and ``interpret`` (`pallas_kernels.backends` holds
the table from platform and chip to backend): ``None`` picks the kernel of the platform
the computation is lowered for (Mosaic TPU, Mosaic GPU on Hopper+, Triton on older NVIDIA
GPUs, the ``jnp`` reference on CPU); ``"triton" | "mosaic_gpu" | "mosaic_tpu" |
"reference"`` forces one, ``interpret=True`` runs a kernel in its interpreter on any host;
``"pallas"`` and ``"interpret"`` are the older names of Triton compiled and interpreted.

The kernels (`pallas_kernels.triton`, `pallas_kernels.mosaic_tpu`,
`pallas_kernels.mosaic_gpu`) never write ``W_hat`` to HBM, except `dequantize`, whose
job it is. The Mosaic GPU backend has its own forward, ``dx`` and codebook-gradient kernels
for 16-bit activations and takes `dequantize` (and float32 activations) from Triton, which
lowers into the same CUDA module.

Tiles are set per kernel by `ForwardBlockSizes`, `DxBlockSizes`, `DcodebookBlockSizes`
(gathered in `BlockSizes`) and `DequantizeBlockSizes`. Shapes are checked once per public
call, before any kernel is built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import mosaic_gpu, mosaic_tpu, triton
from pallas_kernels._common import dot_precision
from pallas_kernels.backends import Backend, Choice, dispatch, resolve
from pallas_kernels.block_sizes import (
    BlockSizes,
    DcodebookBlockSizes,
    DequantizeBlockSizes,
    DxBlockSizes,
    ForwardBlockSizes,
)
from pallas_kernels.packing import SUPPORTED_BITS, packed_words, unpack_codes

__all__ = [
    "Backend",
    "BlockSizes",
    "DcodebookBlockSizes",
    "DequantizeBlockSizes",
    "DxBlockSizes",
    "ForwardBlockSizes",
    "dense_matmul_reference",
    "dequantize",
    "dequantize_reference",
    "sketched_matmul",
    "sketched_matmul_grads",
    "sketched_matmul_grads_reference",
    "sketched_matmul_reference",
]


# --------------------------------------------------------------------------- checks


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


def _dense_product(x2, w):
    # W_hat is rounded to x's dtype, the product accumulated in fp32 (HIGHEST for fp32 x).
    y = jnp.einsum(
        "mi,oi->mo",
        x2,
        w.astype(x2.dtype),
        preferred_element_type=jnp.float32,
        precision=dot_precision(x2.dtype),
    )
    return y.astype(x2.dtype)


def _forward_ref(x2, codebook, codes, bits, cols):
    return _dense_product(x2, _dequantize_ref(codebook, codes, bits, cols))


def _grads_ref(x2, codebook, codes, bits, cols, dy2):
    out, groups, nc = codebook.shape
    w = _dequantize_ref(codebook, codes, bits, cols).astype(dy2.dtype)
    prec = dot_precision(x2.dtype)
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


def dense_matmul_reference(x: jax.Array, w_hat: jax.Array) -> jax.Array:
    """`sketched_matmul_reference` with ``W_hat [out, in]`` (any float dtype) already rebuilt:
    ``x [..., in] @ W_hat.T -> [..., out]`` in ``x.dtype``, the same numbers bit for bit
    (``sketchtune_jax.models.inference_view`` serves CPU decoding with it)."""
    in_features = _in_features(x)
    if w_hat.ndim != 2 or w_hat.shape[1] != in_features:
        raise ValueError(f"w_hat must be [out, {in_features}] for x of shape {x.shape}, got {w_hat.shape}")
    y2 = _dense_product(x.reshape(-1, in_features), w_hat)
    return y2.reshape(*x.shape[:-1], w_hat.shape[0])


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


# -------------------------------------------------------------------- dispatch


def _kernels(**by_backend):
    """``{backend: factory(interpret)}`` from ``{backend: fn(*args, interpret)}``."""
    return {
        name: (lambda fn: lambda interpret: functools.partial(fn, interpret=interpret))(fn)
        for name, fn in by_backend.items()
    }


def _dequantize(codebook, codes, bits, cols, choice: Choice, blocks: DequantizeBlockSizes):
    def kernel(module):
        def run(codebook, codes, interpret):
            return module.dequantize(codebook, codes, bits, cols, interpret, blocks)

        return run

    kernels = _kernels(triton=kernel(triton), mosaic_gpu=kernel(triton), mosaic_tpu=kernel(mosaic_tpu))
    reference = functools.partial(_dequantize_ref, bits=bits, cols=cols)
    return dispatch(choice, kernels, reference, codebook, codes)


def dequantize(
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    in_features: int,
    *,
    backend: Backend | None = None,
    interpret: bool | None = None,
    block_sizes: DequantizeBlockSizes | None = None,
) -> jax.Array:
    """Rebuild ``W_hat [out, in_features]`` (``codebook.dtype``) from ``codebook
    [out, groups, 2**bits]`` and packed ``codes uint32 [out, groups, words]``."""
    cols = _check_sketch(codebook, codes, bits, in_features)
    choice = resolve(backend, interpret)
    if block_sizes is not None and not isinstance(block_sizes, DequantizeBlockSizes):
        raise ValueError(f"block_sizes must be DequantizeBlockSizes, got {block_sizes!r}")
    return _dequantize(codebook, codes, bits, cols, choice, block_sizes or DequantizeBlockSizes())


def _forward(x2, codebook, codes, bits, cols, choice: Choice, blocks: BlockSizes):
    def kernel(module):
        def run(x2, codebook, codes, interpret):
            return module.forward(x2, codebook, codes, bits, cols, interpret, blocks.forward)

        return run

    def reference(x2, codebook, codes):
        return _forward_ref(x2, codebook, codes, bits, cols)

    kernels = _kernels(triton=kernel(triton), mosaic_gpu=kernel(mosaic_gpu), mosaic_tpu=kernel(mosaic_tpu))
    return dispatch(choice, kernels, reference, x2, codebook, codes)


def _grads(x2, codebook, codes, bits, cols, dy2, choice: Choice, blocks: BlockSizes):
    def kernel(dx_module, dcodebook_module):
        def run(x2, codebook, codes, dy2, interpret):
            # Both kernels rebuild W_hat tiles on chip: neither W_hat nor dW reaches HBM.
            dx = dx_module.dx(dy2, codebook, codes, bits, cols, interpret, blocks.dx)
            dcb = dcodebook_module.dcodebook(x2, dy2, codebook, codes, bits, cols, interpret, blocks.dcodebook)
            return dx.astype(x2.dtype), dcb

        return run

    def reference(x2, codebook, codes, dy2):
        return _grads_ref(x2, codebook, codes, bits, cols, dy2)

    kernels = _kernels(
        triton=kernel(triton, triton),
        mosaic_gpu=kernel(mosaic_gpu, mosaic_gpu),
        mosaic_tpu=kernel(mosaic_tpu, mosaic_tpu),
    )
    return dispatch(choice, kernels, reference, x2, codebook, codes, dy2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _sketched_matmul_2d(x2, codebook, codes, bits, cols, choice, blocks):
    return _forward(x2, codebook, codes, bits, cols, choice, blocks)


def _sketched_matmul_2d_fwd(x2, codebook, codes, bits, cols, choice, blocks):
    return _forward(x2, codebook, codes, bits, cols, choice, blocks), (x2, codebook, codes)


def _sketched_matmul_2d_bwd(bits, cols, choice, blocks, residuals, dy2):
    x2, codebook, codes = residuals
    dx, dcb = _grads(x2, codebook, codes, bits, cols, dy2.astype(x2.dtype), choice, blocks)
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
    interpret: bool | None = None,
    block_sizes: BlockSizes | tuple[int, int, int] | None = None,
) -> jax.Array:
    """``y = x @ W_hat.T`` without materialising ``W_hat``.

    Args:
      x: ``[..., in_features]``, any float dtype; the result has ``x.dtype`` and is
        accumulated in fp32 (``W_hat`` is rounded to ``x.dtype`` before the product).
      codebook: ``[out, groups, 2**bits]``; differentiable.
      codes: packed ``uint32 [out, groups, words]``; not differentiable.
      bits: 2, 3 or 4 (static).
      backend: ``None`` (by platform) or a forced backend; see the module docstring.
      interpret: run the forced backend's kernels in its interpreter.
      block_sizes: tiles of the kernels (forward and both gradients): a `BlockSizes`, or
        ``(block_m, block_n, block_k)`` powers of two >= 16 for all three
        (`BlockSizes.uniform`); ``None`` is ``BlockSizes()``.

    Returns:
      ``[..., out]``. Differentiable in ``x`` and ``codebook`` via a custom VJP
      (``dx = dy @ W_hat``; ``dcodebook`` = bucket sums of ``dy^T x``).
    """
    in_features = _in_features(x)
    cols = _check_sketch(codebook, codes, bits, in_features)
    choice = resolve(backend, interpret)
    blocks = BlockSizes.of(block_sizes)
    y2 = _sketched_matmul_2d(x.reshape(-1, in_features), codebook, codes, bits, cols, choice, blocks)
    return y2.reshape(*x.shape[:-1], codebook.shape[0])


def sketched_matmul_grads(
    x: jax.Array,
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    dy: jax.Array,
    *,
    backend: Backend | None = None,
    interpret: bool | None = None,
    block_sizes: BlockSizes | tuple[int, int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The backward pass of `sketched_matmul` for cotangent ``dy [..., out]``:
    ``(dx [..., in] in x.dtype, dcodebook [out, groups, 2**bits] in codebook.dtype)``."""
    in_features = _in_features(x)
    cols = _check_sketch(codebook, codes, bits, in_features)
    _check_dy(dy, x, codebook)
    choice = resolve(backend, interpret)
    dx, dcb = _grads(
        x.reshape(-1, in_features),
        codebook,
        codes,
        bits,
        cols,
        dy.reshape(-1, codebook.shape[0]).astype(x.dtype),
        choice,
        BlockSizes.of(block_sizes),
    )
    return dx.reshape(x.shape), dcb
