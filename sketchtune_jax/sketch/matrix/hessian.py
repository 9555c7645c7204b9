"""The layer Hessian ``H = 2 X Xᵀ / n`` and the upper Cholesky factor of its inverse.

``H`` is the second derivative of the row-wise objective ``‖w X − ŵ X‖²`` (paper
eq. 2); its scale does not matter to the sketch (damping is relative to its mean
diagonal, and the column sweep and the k-means weights are invariant to a global
scale), so ``n`` counts input vectors (tokens), not sequences.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def init_hessian(in_features: int) -> tuple[jax.Array, jax.Array]:
    """Empty accumulator: ``H`` zeros ``[in, in]`` float32 and the count ``n`` (int32 scalar)."""
    if in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    return jnp.zeros((in_features, in_features), jnp.float32), jnp.zeros((), jnp.int32)


@jax.jit
def accumulate_hessian(h: jax.Array, n: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fold a batch of inputs into the running ``H = 2 X Xᵀ / n``.

    Args:
      h: ``[in, in]`` float32, the running Hessian over ``n`` inputs.
      n: int32 scalar, inputs seen so far.
      x: ``[..., in]`` of any float dtype; every leading index is one input vector.

    Returns:
      ``(h, n)`` updated. The old mean is rescaled before the new batch is added (as
      GPTQ does), so ``h`` stays O(|x|²) however many batches arrive, and the product
      is taken in float32 at full precision whatever ``x``'s dtype.
    """
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = x.shape[0]
    n_new = n + m
    old = n.astype(jnp.float32) / n_new.astype(jnp.float32)
    # Scaling x by sqrt(2 / n_new) before the product keeps the addend the same
    # size as the running mean instead of growing with the batch.
    xs = x * jnp.sqrt(2.0 / n_new.astype(jnp.float32))
    h = h * old + jnp.matmul(xs.T, xs, precision=_HIGHEST)
    return h, n_new


@jax.jit
def _fix_dead(h: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    # An input that is always zero carries no information about its column of W:
    # give it unit curvature so H stays invertible, and zero the column so the
    # sketch spends nothing on it.
    diag = jnp.diagonal(h)
    dead = diag == 0
    idx = jnp.arange(h.shape[0])
    h = h.at[idx, idx].set(jnp.where(dead, 1.0, diag))
    w = jnp.where(dead[None, :], 0.0, w)
    return h, w


@jax.jit
def _upper_chol_of_inverse(h: jax.Array, percdamp: jax.Array) -> jax.Array:
    n = h.shape[0]
    damp = percdamp * jnp.mean(jnp.diagonal(h))
    h = h + damp * jnp.eye(n, dtype=h.dtype)
    low = jnp.linalg.cholesky(h)
    # H⁻¹ = L⁻ᵀ L⁻¹; a triangular solve is cheaper and as accurate as a general inverse.
    linv = jax.scipy.linalg.solve_triangular(low, jnp.eye(n, dtype=h.dtype), lower=True)
    hinv = jnp.matmul(linv.T, linv, precision=_HIGHEST)
    # The sweep wants U with H⁻¹ = Uᵀ U (U upper); U_jj² is the inverse Hessian
    # diagonal over the columns not yet mapped when the sweep reaches column j.
    return jnp.linalg.cholesky(hinv).T


def prepare_hessian(
    h: jax.Array,
    w: jax.Array,
    percdamp: float = 0.01,
    *,
    max_percdamp: float = 10.0,
) -> tuple[jax.Array, jax.Array]:
    """Damp ``H`` and return the upper Cholesky factor of ``H⁻¹`` for the column sweep.

    Args:
      h: ``[in, in]`` Hessian from `accumulate_hessian`.
      w: ``[out, in]`` weight; columns of dead inputs (``H_ii == 0``) are zeroed.
      percdamp: diagonal damping as a fraction of ``mean(diag H)``.
      max_percdamp: if the Cholesky factorisation fails, damping is raised ×10 with a
        warning until it succeeds or would exceed this.

    Returns:
      ``(hinv_upper [in, in] float32, w [out, in] float32)``.

    Raises:
      ValueError: on bad shapes, NaN/Inf in ``h`` or ``w``, or if no damping up to
        ``max_percdamp`` makes ``H`` positive definite.
    """
    h = jnp.asarray(h, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"H must be square [in, in], got shape {h.shape}")
    if w.ndim != 2 or w.shape[1] != h.shape[0]:
        raise ValueError(f"W must be [out, {h.shape[0]}] to match H, got shape {w.shape}")
    if percdamp <= 0:
        raise ValueError(f"percdamp must be positive, got {percdamp}")
    check_finite(h, "H")
    check_finite(w, "W")
    h, w = _fix_dead(h, w)
    damp = float(percdamp)
    while True:
        u = _upper_chol_of_inverse(h, jnp.float32(damp))
        if bool(jnp.all(jnp.isfinite(u))):
            return u, w
        if damp * 10 > max_percdamp:
            raise ValueError(
                f"H is not positive definite even with percdamp={damp:g} "
                f"(max_percdamp={max_percdamp:g}); check the calibration inputs"
            )
        warnings.warn(
            f"Cholesky of the damped Hessian failed with percdamp={damp:g}; retrying with percdamp={damp * 10:g}",
            RuntimeWarning,
            stacklevel=2,
        )
        damp *= 10


def check_finite(x: jax.Array, name: str, hint: str = "") -> None:
    """Raise a ValueError naming ``x`` (and adding ``hint``) if it holds NaN or Inf; skipped under tracing."""
    if isinstance(x, jax.core.Tracer):
        return
    has_nan, has_inf = _nan_inf(x)
    for found, what in ((has_nan, "NaN"), (has_inf, "Inf")):
        if bool(found):
            raise ValueError(f"{name} contains {what}" + (f"; {hint}" if hint else ""))


@jax.jit
def _nan_inf(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Reduced on the device so a large matrix never travels to the host.
    return jnp.isnan(x).any(), jnp.isinf(x).any()
