"""LoftQ initialisation (Li et al., 2023): a quantized base and a LoRA adapter fitted together.

Starting from a zero adapter, alternate ``Q = quant(W - s * (A B)^T)`` and ``A, B = the best
rank-r fit of W - deq(Q)`` (truncated SVD), so that ``deq(Q) + s * (A B)^T`` starts close to
the dense ``W`` and fine-tuning starts from the dense model's function rather than from the
quantized one's. ``s`` is the adapter's ``alpha / rank``; A ``[in, r]`` and B ``[r, out]``
are laid out as `sketchtune_jax.train.lora` keeps them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sketchtune_jax.train.quantized_base import DEFAULT_BLOCK, dequantize_blockwise, quantize_blockwise


def low_rank_factors(residual: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """``A [in, rank]``, ``B [rank, out]`` with ``scale * (A B)^T`` the best rank-``rank`` fit of ``residual [out, in]``.

    The top singular pairs come from the eigenvectors of the smaller Gram matrix in float64 on the
    host: for a rank far below the width that is several times faster than a full SVD, and exact
    to float32 for the leading pairs.
    """
    r = np.asarray(jax.device_get(residual), np.float64)
    tall = r.shape[0] >= r.shape[1]
    gram = r.T @ r if tall else r @ r.T
    eigvals, eigvecs = np.linalg.eigh(gram)
    top = eigvecs[:, ::-1][:, :rank]
    sing = np.sqrt(np.maximum(eigvals[::-1][:rank], 0.0))
    other = (r @ top if tall else r.T @ top) / np.where(sing > 0, sing, 1.0)
    v, u = (top, other) if tall else (other, top)
    root = np.sqrt(sing / scale)
    a = v * root
    b = root[:, None] * u.T
    return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def loftq_fit(
    weight: jax.Array,
    qtype: str,
    *,
    rank: int,
    scale: float,
    iters: int = 1,
    block: int = DEFAULT_BLOCK,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """LoftQ's ``iters`` alternations on ``weight [out, in]``.

    Returns ``(codes, scales, A, B)``: the packed quantized base (`quantize_blockwise`) and the
    adapter factors ``A [in, rank]``, ``B [rank, out]`` (float32) of the last alternation.
    """
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"rank {rank} must be in [1, {min(weight.shape)}] for a weight of shape {weight.shape}")
    w = weight.astype(jnp.float32)
    adapter = jnp.zeros_like(w)
    for _ in range(iters):
        codes, scales = quantize_blockwise(w - adapter, qtype, block)
        a, b = low_rank_factors(w - dequantize_blockwise(codes, scales, qtype, block), rank, scale)
        adapter = scale * (a @ b).T
    return codes, scales, a, b


def loftq_error(
    weight: jax.Array, qtype: str, *, rank: int, scale: float, iters: int, block: int = DEFAULT_BLOCK
) -> float:
    """Frobenius norm of ``W - (deq(Q) + s * (A B)^T)`` after ``iters`` LoftQ alternations."""
    codes, scales, a, b = loftq_fit(weight, qtype, rank=rank, scale=scale, iters=iters, block=block)
    fitted = dequantize_blockwise(codes, scales, qtype, block) + scale * (a @ b).T
    return float(jnp.linalg.norm(weight.astype(jnp.float32) - fitted))


__all__ = ["loftq_error", "loftq_fit", "low_rank_factors"]
