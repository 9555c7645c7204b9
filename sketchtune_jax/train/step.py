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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sketchtune_jax.layers import Codebook

Batch = dict[str, jax.Array]


# Sequence positions per chunk of the chunked loss: the head's float32 logits exist
# for one chunk at a time, ``[B, LOSS_CHUNK, vocab]``, in the forward and the backward.
LOSS_CHUNK = 128


def _nll_and_weights(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted NLL sum of ``targets [..., T]`` under ``logits [..., T, V]`` (softmax in float32)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * weights)


def token_nll_sum(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token negative log-likelihoods over loss-masked tokens, and their count.

    Args:
        logits: ``[B, T, V]`` any float dtype; the softmax runs in float32.
        batch: ``input_ids`` and ``loss_mask``, ``[B, T]`` int. Position ``t`` predicts
            token ``t + 1``, counted when ``loss_mask[:, t + 1] == 1``.

    Returns:
        ``(nll_sum, count)``, float32 scalars.
    """
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return _nll_and_weights(logits[:, :-1], batch["input_ids"][:, 1:], weights), jnp.sum(weights)


def sum_over_chunks(
    per_chunk: Callable[..., jax.Array], arrays: tuple[jax.Array, ...], chunk: int = LOSS_CHUNK
) -> jax.Array:
    """``sum(per_chunk(*xs))`` over sequence chunks of ``arrays`` (each ``[B, T, ...]``).

    ``per_chunk`` is rematerialised in the backward pass, so what it builds (e.g.
    ``[B, chunk, vocab]`` logits) exists for one chunk at a time. ``T`` is padded up to a
    multiple of ``chunk`` with zeros; ``per_chunk`` must give padded positions no weight.
    """
    b, t = arrays[0].shape[:2]
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    pad = n * chunk - t

    def chunks(x: jax.Array) -> jax.Array:
        # [B, T, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    body = jax.checkpoint(lambda xs: per_chunk(*xs))
    return jnp.sum(jax.lax.map(body, tuple(chunks(x) for x in arrays)))


def next_token_weights(batch: Batch) -> jax.Array:
    """``[B, T]`` float32: 1 where position ``t`` predicts a loss token (``loss_mask[:, t + 1]``), else 0."""
    return jnp.pad(batch["loss_mask"][:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))


def chunked_token_nll_sum(
    hidden: jax.Array, head: Callable[[jax.Array], jax.Array], batch: Batch, chunk: int = LOSS_CHUNK
) -> tuple[jax.Array, jax.Array]:
    """`token_nll_sum` of ``head(hidden)``, computed ``chunk`` positions at a time.

    The head runs inside a loop over sequence chunks and is recomputed in the backward
    pass, so float32 logits never exist for the whole ``[B, T, V]``: peak memory for
    the loss is one chunk's logits, whatever the sequence length.

    Args:
        hidden: ``[B, T, D]`` final hidden states.
        head: ``[B, c, D] -> [B, c, V]`` logits (e.g. ``model.logits_from_hidden``).
        batch: ``input_ids`` and ``loss_mask``, ``[B, T]`` int, as for `token_nll_sum`.
        chunk: sequence positions per chunk; ``T`` is padded up to a multiple.

    Returns:
        ``(nll_sum, count)``, float32 scalars.
    """
    # Position t predicts token t + 1; the last position predicts nothing (weight 0).
    targets = jnp.pad(batch["input_ids"][:, 1:], ((0, 0), (0, 1)))
    weights = next_token_weights(batch)
    nll = sum_over_chunks(lambda h, tgt, w: _nll_and_weights(head(h), tgt, w), (hidden, targets, weights), chunk)
    return nll, jnp.sum(weights)


def next_token_nll(model: nnx.Module, batch: Batch, loss_inputs: Any = None) -> tuple[jax.Array, jax.Array]:
    """The default loss: summed next-token NLL of loss-masked tokens and their count (float32 scalars).

    Every loss has this signature, ``loss_fn(model, batch, loss_inputs) -> (sum, count)``;
    the step divides the sums by the counts. ``loss_inputs`` is a pytree of arrays the
    loss reads but never trains (e.g. a teacher's state, see `sketchtune_jax.train.heal`);
    this loss ignores it.
    """
    # Models that expose their trunk and head separately (LlamaForCausalLM) get the
    # chunked loss; any other ``model(ids) -> (logits, cache)`` gets the plain one.
    del loss_inputs
    mask = batch.get("attention_mask")
    if hasattr(model, "hidden_states") and hasattr(model, "logits_from_hidden"):
        hidden = model.hidden_states(batch["input_ids"], attention_mask=mask)
        return chunked_token_nll_sum(hidden, model.logits_from_hidden, batch)
    logits, _ = model(batch["input_ids"], attention_mask=mask)
    return token_nll_sum(logits, batch)


LossFn = Callable[[nnx.Module, Batch, Any], tuple[jax.Array, jax.Array]]


def _micro_batches(batch: Batch) -> Batch:
    # A plain [B, T] batch is one micro-batch; the scan below always sees [A, B, T].
    return {k: (v[None] if v.ndim == 2 else v) for k, v in batch.items()}


def _accumulated_grads(
    model: nnx.Module, batch: Batch, wrt: Any = Codebook, loss_fn: LossFn = next_token_nll, loss_inputs: Any = None
) -> tuple[nnx.State, jax.Array, jax.Array]:
    # NNX transforms throughout (not split/merge under jax.grad): models that use
    # nnx.remat inside their layers only trace correctly under NNX's own transforms.
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    params = nnx.state(model, wrt)

    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=nnx.Carry)
    def accumulate(model, carry, micro):
        g_acc, l_acc, n_acc = carry
        (l, n), g = grad_fn(model, micro, loss_inputs)
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


def apply_train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: Batch,
    loss_fn: LossFn = next_token_nll,
    loss_inputs: Any = None,
) -> dict[str, jax.Array]:
    """`train_step`'s body, unjitted, to compose inside a jitted function of your own."""
    grads, loss, tokens = _accumulated_grads(model, batch, optimizer.wrt, loss_fn, loss_inputs)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": tokens}


def split_for_step(model: nnx.Module, optimizer: nnx.Optimizer):
    """``(graphdef, mutable, frozen)`` of model and optimizer for `pure_train_step`."""
    # Only what a step changes goes in and out of the jitted function: the trained
    # variables, the optimizer state and RNG counters. Everything else (codes,
    # embeddings, norms, head) is an input only, so XLA never copies the frozen
    # model into fresh output buffers, which ``nnx.jit`` would do every step.
    mutable = nnx.Any(optimizer.wrt, nnx.OptState, nnx.RngState)
    return nnx.split((model, optimizer), mutable, ...)


# ``mutable`` is donated: XLA writes the new trained variables and optimizer moments
# into the old buffers instead of holding both. A caller must not touch the arrays it
# passed in after the call (they are deleted); it keeps only what is returned.
# ``loss_inputs`` (a teacher, say) is read-only like ``frozen`` and never donated.
@functools.partial(jax.jit, static_argnums=0, static_argnames="loss_fn", donate_argnums=1)
def pure_train_step(graphdef, mutable, frozen, batch, loss_inputs=None, *, loss_fn: LossFn = next_token_nll):
    """`train_step` on split state (see `split_for_step`): returns the new ``mutable`` and the metrics.

    ``loss_fn`` is static (hashable: a function, or a frozen dataclass holding graphdefs).
    """
    model, optimizer = nnx.merge(graphdef, mutable, frozen)
    metrics = apply_train_step(model, optimizer, batch, loss_fn, loss_inputs)
    return _keep_layout(split_for_step(model, optimizer)[1]), metrics


def _keep_layout(state: nnx.State) -> nnx.State:
    # On a mesh, pin the new trained variables and moments to the layout their metadata
    # names (`sketchtune_jax.parallel.sharding`): left to propagation, XLA may hand back moments
    # split over data as whole copies, and the next step would see another layout.
    meshes = {id(m): m for _, v in nnx.to_flat_state(state) if (m := v.get_metadata().get("mesh")) is not None}
    if len(meshes) != 1:
        return state
    (mesh,) = meshes.values()
    return jax.lax.with_sharding_constraint(state, nnx.get_named_sharding(state, mesh))


def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: Batch,
    *,
    loss_fn: LossFn = next_token_nll,
    loss_inputs: Any = None,
) -> dict[str, jax.Array]:
    """One optimizer update (jitted) of the variables the optimizer trains; all other state is untouched.

    Args:
        model: an NNX causal LM, ``model(input_ids, *, attention_mask=...) -> (logits, cache)``.
        optimizer: ``nnx.Optimizer(model, tx, wrt=Codebook)``; another ``wrt`` filter
            (e.g. ``nnx.Any(Codebook, MyNormScale)``) trains those variables instead.
        batch: ``input_ids``, ``attention_mask``, ``loss_mask``: ``[B, T]`` or ``[A, B, T]`` int32.
        loss_fn: ``(model, batch, loss_inputs) -> (sum, count)``; next-token NLL by default.
        loss_inputs: arrays ``loss_fn`` reads and nothing trains (e.g. a teacher's state).

    Returns:
        ``loss`` (mean loss per loss token, float32; the NLL by default), ``grad_norm`` (global norm before
        clipping), ``tokens`` (loss tokens in the step, float32).

    The trained variables' and optimizer state's arrays are donated to the step and
    replaced by new ones: arrays read from them before the call are deleted after it
    (copy them, e.g. ``np.asarray``, to keep a value).
    """
    graphdef, mutable, frozen = split_for_step(model, optimizer)
    new_mutable, metrics = pure_train_step(graphdef, mutable, frozen, batch, loss_inputs, loss_fn=loss_fn)
    nnx.update((model, optimizer), new_mutable)
    return metrics


def compile_train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: Batch,
    *,
    loss_fn: LossFn = next_token_nll,
    loss_inputs: Any = None,
) -> jax.stages.Compiled:
    """The compiled executable `train_step` runs for these shapes (for ``memory_analysis()``, HLO).

    Its second argument (trained variables, optimizer state) is donated: calling it
    deletes those input arrays.
    """
    graphdef, mutable, frozen = split_for_step(model, optimizer)
    return pure_train_step.lower(graphdef, mutable, frozen, batch, loss_inputs, loss_fn=loss_fn).compile()


@functools.partial(jax.jit, static_argnums=(0, 3))
def _pure_eval_step(graphdef, state, batch, loss_fn, loss_inputs):
    nll, n = loss_fn(nnx.merge(graphdef, state), batch, loss_inputs)
    return {"nll_sum": nll, "tokens": n}


def eval_step(
    model: nnx.Module, batch: Batch, *, loss_fn: LossFn = next_token_nll, loss_inputs: Any = None
) -> dict[str, jax.Array]:
    """Summed loss (``nll_sum``: the NLL by default) and loss-token count of a ``[B, T]`` batch (float32
    scalars), for token-weighted means."""
    graphdef, state = nnx.split(model)
    return _pure_eval_step(graphdef, state, batch, loss_fn, loss_inputs)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _pure_grads(graphdef, state, batch, wrt, loss_fn, loss_inputs):
    grads, loss, _ = _accumulated_grads(nnx.merge(graphdef, state), batch, wrt, loss_fn, loss_inputs)
    return loss, grads


def loss_and_grads(
    model: nnx.Module,
    batch: Batch,
    wrt: Any = Codebook,
    *,
    loss_fn: LossFn = next_token_nll,
    loss_inputs: Any = None,
) -> tuple[jax.Array, nnx.State]:
    """Mean loss and gradients of the ``wrt`` variables (default `Codebook`) without an update."""
    graphdef, state = nnx.split(model)
    return _pure_grads(graphdef, state, batch, wrt, loss_fn, loss_inputs)
