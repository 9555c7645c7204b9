"""The training and evaluation steps: only `Codebook` leaves receive gradients.

Use them in your own loop::

    from flax import nnx
    from sketchtune_jax.layers import Codebook
    from sketchtune_jax.train import TrainConfig, make_optimizer, train_step

    config = TrainConfig(lr=1e-4, max_steps=100)
    optimizer = nnx.Optimizer(model, make_optimizer(config, 100), wrt=Codebook)
    for batch in batches:  # dicts of [B, T] int32: input_ids, attention_mask, loss_mask
        metrics = train_step(model, optimizer, batch)
        print(float(metrics["loss"]), float(metrics["grad_norm"]))

``batch`` arrays may also be ``[A, B, T]``: ``A`` micro-batches accumulated into one update.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sketchtune_jax.layers import Codebook

Batch = dict[str, jax.Array]


def token_nll_sum(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token negative log-likelihoods over loss-masked tokens, and their count.

    Args:
        logits: ``[B, T, V]`` any float dtype; the softmax runs in float32.
        batch: ``input_ids`` and ``loss_mask``, ``[B, T]`` int. Position ``t`` predicts
            token ``t + 1``, counted when ``loss_mask[:, t + 1] == 1``.

    Returns:
        ``(nll_sum, count)``, float32 scalars.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = batch["input_ids"][:, 1:]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * weights), jnp.sum(weights)


def _forward_nll(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    logits, _ = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return token_nll_sum(logits, batch)


def _micro_batches(batch: Batch) -> Batch:
    # A plain [B, T] batch is one micro-batch; the scan below always sees [A, B, T].
    return {k: (v[None] if v.ndim == 2 else v) for k, v in batch.items()}


def _accumulated_grads(
    model: nnx.Module, batch: Batch, wrt: Any = Codebook
) -> tuple[nnx.State, jax.Array, jax.Array]:
    # NNX transforms throughout (not split/merge under jax.grad): models that use
    # nnx.remat inside their layers only trace correctly under NNX's own transforms.
    grad_fn = nnx.value_and_grad(_forward_nll, argnums=nnx.DiffState(0, wrt), has_aux=True)
    params = nnx.state(model, wrt)

    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=nnx.Carry)
    def accumulate(model, carry, micro):
        g_acc, l_acc, n_acc = carry
        (l, n), g = grad_fn(model, micro)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return g_acc, l_acc + l, n_acc + n

    # Sums of per-token gradients, divided once by the total token count, make A
    # micro-batches of B rows equal one batch of A*B rows regardless of padding.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    g, l, n = accumulate(model, init, _micro_batches(batch))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), g, params)
    return grads, l / denom, n


def apply_train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> dict[str, jax.Array]:
    """`train_step`'s body, unjitted, to compose inside a jitted function of your own."""
    grads, loss, tokens = _accumulated_grads(model, batch, optimizer.wrt)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": tokens}


def _split_for_step(model: nnx.Module, optimizer: nnx.Optimizer):
    # Only what a step changes goes in and out of the jitted function: the trained
    # variables, the optimizer state and RNG counters. Everything else (codes,
    # embeddings, norms, head) is an input only, so XLA never copies the frozen
    # model into fresh output buffers, which ``nnx.jit`` would do every step.
    mutable = nnx.Any(optimizer.wrt, nnx.OptState, nnx.RngState)
    return nnx.split((model, optimizer), mutable, ...)


@functools.partial(jax.jit, static_argnums=0)
def _pure_train_step(graphdef, mutable, frozen, batch):
    model, optimizer = nnx.merge(graphdef, mutable, frozen)
    metrics = apply_train_step(model, optimizer, batch)
    return _split_for_step(model, optimizer)[1], metrics


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> dict[str, jax.Array]:
    """One optimizer update (jitted) of the variables the optimizer trains; all other state is untouched.

    Args:
        model: an NNX causal LM, ``model(input_ids, *, attention_mask=...) -> (logits, cache)``.
        optimizer: ``nnx.Optimizer(model, tx, wrt=Codebook)``; another ``wrt`` filter
            (e.g. ``nnx.Any(Codebook, MyNormScale)``) trains those variables instead.
        batch: ``input_ids``, ``attention_mask``, ``loss_mask``: ``[B, T]`` or ``[A, B, T]`` int32.

    Returns:
        ``loss`` (mean NLL per loss token, float32), ``grad_norm`` (global norm before
        clipping), ``tokens`` (loss tokens in the step, float32).
    """
    graphdef, mutable, frozen = _split_for_step(model, optimizer)
    new_mutable, metrics = _pure_train_step(graphdef, mutable, frozen, batch)
    nnx.update((model, optimizer), new_mutable)
    return metrics


def compile_train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> jax.stages.Compiled:
    """The compiled executable `train_step` runs for these shapes (for ``memory_analysis()``, HLO)."""
    graphdef, mutable, frozen = _split_for_step(model, optimizer)
    return _pure_train_step.lower(graphdef, mutable, frozen, batch).compile()


@functools.partial(jax.jit, static_argnums=0)
def _pure_eval_step(graphdef, state, batch):
    nll, n = _forward_nll(nnx.merge(graphdef, state), batch)
    return {"nll_sum": nll, "tokens": n}


def eval_step(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """Summed NLL and loss-token count of a ``[B, T]`` batch (float32 scalars), for token-weighted means."""
    graphdef, state = nnx.split(model)
    return _pure_eval_step(graphdef, state, batch)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _pure_grads(graphdef, state, batch, wrt):
    grads, loss, _ = _accumulated_grads(nnx.merge(graphdef, state), batch, wrt)
    return loss, grads


def loss_and_grads(model: nnx.Module, batch: Batch, wrt: Any = Codebook) -> tuple[jax.Array, nnx.State]:
    """Mean loss and gradients of the ``wrt`` variables (default `Codebook`) without an update."""
    graphdef, state = nnx.split(model)
    return _pure_grads(graphdef, state, batch, wrt)


# The trainer's loop carries the split state itself (see `Trainer.run`).
split_for_step = _split_for_step
pure_train_step = _pure_train_step
