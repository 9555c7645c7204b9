"""Tune one sketched decoder layer's codebooks to reproduce the dense model's output there.

Algorithm 1 fits each projection to its own input statistics, one projection at a time;
the errors of a layer's projections then compound through attention and the MLP, and the
errors of earlier layers reach this one through its input. After a layer is sketched,
this step trains its codebooks (codes frozen) with Adam so that the sketched layer, fed
the sketched model's hidden states, gives the dense model's hidden states:
``min ‖layer_sketched(x_sketched) − layer_dense(x_dense)‖²`` over the calibration rows
(the block-wise fine-tuning of AQLM, Egiazarian et al. 2024, Sec. 3.3, on codebooks only).
It needs no vocabulary head and no teacher pass through the whole model, so it is far
cheaper per token than end-to-end healing (`sketchtune_jax.train.heal`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sketchtune_jax.layers import Codebook

__all__ = ["relative_layer_error", "tune_layer_codebooks"]


def _positions(rows: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))


def _squared_error(graphdef: nnx.GraphDef, books: nnx.State, rest: nnx.State, x: jax.Array, y: jax.Array):
    layer = nnx.merge(graphdef, books, rest)
    out = layer(x, positions=_positions(*x.shape[:2]), attention_mask=None)
    return jnp.sum(jnp.square(out.astype(jnp.float32) - y))


def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(lr, steps))


# The optimizer is rebuilt from static (lr, steps) so that every layer of a model, having
# the same graph, reuses one compiled step.
@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _step(graphdef, lr, steps, books, opt_state, rest, x, y):
    loss, grads = jax.value_and_grad(_squared_error, argnums=1)(graphdef, books, rest, x, y)
    updates, opt_state = _optimizer(lr, steps).update(grads, opt_state, books)
    return optax.apply_updates(books, updates), opt_state, loss / jnp.sum(jnp.square(y))


@functools.partial(jax.jit, static_argnums=0)
def _error(graphdef, books, rest, x, y):
    return _squared_error(graphdef, books, rest, x, y), jnp.sum(jnp.square(y))


def relative_layer_error(layer: nnx.Module, inputs: jax.Array, targets: jax.Array, batch_size: int) -> float:
    """``‖layer(inputs) − targets‖² / ‖targets‖²`` over all rows; ``inputs``/``targets`` ``[N, T, D]``."""
    graphdef, books, rest = nnx.split(layer, Codebook, ...)
    err = norm = 0.0
    for lo in range(0, inputs.shape[0], batch_size):
        e, n = _error(graphdef, books, rest, inputs[lo : lo + batch_size], targets[lo : lo + batch_size])
        err, norm = err + float(e), norm + float(n)
    return err / norm


def tune_layer_codebooks(
    layer: nnx.Module,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Train ``layer``'s `Codebook`s in place so that ``layer(inputs)`` approaches ``targets``.

    ``inputs``, ``targets``: float32 ``[N, T, D]`` (the sketched model's input to the layer and
    the dense model's output of it). ``steps`` Adam steps on ``batch_size`` rows each, drawn
    without replacement (reshuffled each pass, seeded), cosine-decayed from ``lr``.
    Returns the relative squared error over all rows before and after.
    """
    n = inputs.shape[0]
    batch_size = min(batch_size, n)
    before = relative_layer_error(layer, inputs, targets, batch_size)
    graphdef, books, rest = nnx.split(layer, Codebook, ...)
    opt_state = _optimizer(lr, steps).init(books)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.permutation(n).tolist()
        rows, order = np.asarray(order[:batch_size]), order[batch_size:]
        books, opt_state, _ = _step(graphdef, float(lr), steps, books, opt_state, rest, inputs[rows], targets[rows])
    nnx.update(layer, books)
    after = relative_layer_error(layer, inputs, targets, batch_size)
    return {"layer_error_before": before, "layer_error_after": after}
