"""CPU inference without rebuilding every sketched weight on every call.

On a CPU no Pallas kernel runs: a `SketchedLinear`'s product goes through the ``jnp``
twin, which rebuilds ``W_hat [out, in]`` from its codebook and codes inside every call
(once per jitted call at least; see the measurement below). `inference_view` rebuilds
each such weight once and returns a *view* of the model (a copy of its structure sharing
every other array) whose sketched layers are `PrecomputedSketchedLinear` holding
``W_hat``; their product is `pallas_kernels.dense_matmul_reference`, the ``jnp`` twin's
own product, so logits are the same bit for bit. `sketchtune_jax.models.generate.generate`,
`sketchtune_jax.eval.perplexity.perplexity` and `sketchtune_jax.eval.multiple_choice` build the
view once per call.

Measured (bench/serving.py, jax 0.10.2): inside `generate`'s one jitted program XLA already
hoists the rebuild out of the decode loop (the codebooks are loop-invariant), so decoding
speed is the same with and without the view, and the time to first token holds one
rebuild either way. What the view removes for certain is one rebuild per jitted call:
per batch of windows in perplexity, of rows in log-likelihood scoring, and per call of
the forward for anyone calling the view directly.

Only layers that would run the ``jnp`` twin on a CPU are rebuilt: those whose arrays live
on a CPU device, with ``backend`` ``None`` or ``"reference"`` and no sharding. On a GPU
or TPU the fused kernels never write ``W_hat`` to memory, which is their point.

Memory: the view holds the dense weights beside the sketch (``out * in`` elements per
layer, in the layer's compute dtype, else the codebook's). It is built only when they
fit in the budget (by default half of the host memory available now); otherwise a
warning says so and the model itself is used (the per-call rebuild: slower, same
numbers). `precompute_weights` changes the budget or turns the view off, e.g. to measure
the difference.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import dense_matmul_reference, dequantize_reference
from sketchtune_jax._utils.module_paths import get_submodule, iter_modules, set_submodule
from sketchtune_jax.layers import SketchedLinear

logger = logging.getLogger(__name__)

#: Share of the host memory available at build time that the dense weights may take.
DEFAULT_MEMORY_FRACTION = 0.5


class DenseWeight(nnx.Variable):
    """A sketch's ``W_hat [out, in]`` (``[layers, out, in]`` when stacked), rebuilt once for
    inference; not a `nnx.Param`, so nothing trains it."""


class PrecomputedSketchedLinear(nnx.Module):
    """Inference twin of a `SketchedLinear` holding its rebuilt weight: ``y = x @ W_hat.T + bias``
    with ``x [..., in]`` and ``y [..., out]`` in the compute dtype, the numbers of the
    ``jnp`` twin of `SketchedLinear.__call__`."""

    def __init__(self, layer: SketchedLinear, weight: jax.Array):
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.bits = layer.bits
        self.groups = layer.groups
        self.dtype = layer.dtype
        self.weight = DenseWeight(weight)
        self.bias = layer.bias

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = dense_matmul_reference(x.astype(dtype), self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


@dataclasses.dataclass(frozen=True)
class _Policy:
    enabled: bool = True
    max_bytes: int | None = None  # None: DEFAULT_MEMORY_FRACTION of the available memory


_POLICY: contextvars.ContextVar[_Policy | None] = contextvars.ContextVar("sketchtune_inference_policy", default=None)


@contextlib.contextmanager
def precompute_weights(enabled: bool = True, *, max_bytes: int | None = None) -> Iterator[None]:
    """Within the block, `inference_view` (hence generate and eval) rebuilds sketched weights
    once per call only if ``enabled``, and only within ``max_bytes`` (``None``: the default
    budget, `DEFAULT_MEMORY_FRACTION` of the available host memory)."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    token = _POLICY.set(_Policy(enabled, max_bytes))
    try:
        yield
    finally:
        _POLICY.reset(token)


def available_memory_bytes() -> int | None:
    """Host memory available now (``MemAvailable`` of ``/proc/meminfo``, else the free
    physical pages); ``None`` where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _runs_jnp_twin(layer: SketchedLinear) -> bool:
    """Whether ``layer``'s product is the per-call rebuild of the ``jnp`` twin on a CPU."""
    if layer.sharding is not None or layer.backend not in (None, "reference"):
        return False
    value = layer.codebook.get_value()
    if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
        return False
    return all(device.platform == "cpu" for device in value.devices())


def _weight_dtype(layer: SketchedLinear) -> jnp.dtype:
    # With a compute dtype the twin rounds W_hat to it before the product: round once here.
    return jnp.dtype(layer.dtype or layer.codebook.get_value().dtype)


def _weight_bytes(layer: SketchedLinear) -> int:
    stack = layer.codebook.get_value().shape[:-3]
    count = layer.out_features * layer.in_features
    for n in stack:
        count *= n
    return count * _weight_dtype(layer).itemsize


@functools.partial(jax.jit, static_argnames=("bits", "in_features", "dtype"))
def _rebuild(codebook: jax.Array, codes: jax.Array, *, bits: int, in_features: int, dtype: jnp.dtype) -> jax.Array:
    """``W_hat`` of ``codebook [..., out, groups, 2**bits]``: ``[..., out, in_features]`` in ``dtype``."""

    def one(cb, cd):
        return dequantize_reference(cb, cd, bits, in_features).astype(dtype)

    for _ in range(codebook.ndim - 3):  # stacked layers: one leading axis each
        one = jax.vmap(one)
    return one(codebook, codes)


def dense_weight_bytes(model: nnx.Module) -> int:
    """Bytes the dense weights of ``model``'s CPU-twin sketched layers take in a view."""
    return sum(_weight_bytes(m) for _, m in iter_modules(model, SketchedLinear) if _runs_jnp_twin(m))


def inference_view(model: nnx.Module) -> nnx.Module:
    """``model``, or an inference-only view of it whose CPU-twin sketched layers hold their
    rebuilt weights (see the module docstring). ``model`` is not changed; the view shares
    every array but the new weights, and reflects ``model``'s codebooks at this call."""
    policy = _POLICY.get() or _Policy()
    if not policy.enabled:
        return model
    layers = [name for name, m in iter_modules(model, SketchedLinear) if _runs_jnp_twin(m)]
    if not layers:
        return model
    need = dense_weight_bytes(model)
    available = available_memory_bytes()
    budget = policy.max_bytes
    if budget is None and available is not None:
        budget = int(available * DEFAULT_MEMORY_FRACTION)
    mib = 2**20
    if budget is not None and need > budget:
        logger.warning(
            "not precomputing the %d sketched weights: they need %.0f MiB, over the budget of %.0f MiB "
            "(host memory available: %s); each call rebuilds them instead (slower, same results)",
            len(layers),
            need / mib,
            budget / mib,
            "unknown" if available is None else f"{available / mib:.0f} MiB",
        )
        return model
    view = nnx.merge(*nnx.split(model))
    for name in layers:
        layer = get_submodule(view, name)
        weight = _rebuild(
            layer.codebook.get_value(),
            layer.codes.get_value(),
            bits=layer.bits,
            in_features=layer.in_features,
            dtype=_weight_dtype(layer),
        )
        set_submodule(view, name, PrecomputedSketchedLinear(layer, weight))
    logger.info(
        "precomputed %d sketched weights for inference on the CPU: %.0f MiB (budget %s)",
        len(layers),
        need / mib,
        "none" if budget is None else f"{budget / mib:.0f} MiB",
    )
    return view
