"""Distillation loss: KL(teacher || student) over next-token distributions, teacher run inside the step.

The teacher is a frozen NNX model split into its static structure (graphdef and pytree
structure, held by `TeacherKL`, which is hashable and so a static argument of the jitted
step) and its arrays (passed as the step's ``loss_inputs``: read, never trained, donated
or checkpointed)::

    loss_fn, teacher_arrays = teacher_kl(teacher)
    Trainer(student, batches, config, out_dir, loss_fn=loss_fn, loss_inputs=teacher_arrays).run()

Teacher logits are computed on the fly, full vocabulary, in float32: each calibration
window is seen about once in a short heal, so caching them on disk would cost the same
teacher forward plus ``[tokens, vocab]`` of storage, and top-k truncation would bias the KL.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sketchtune_jax.train.step import LOSS_CHUNK, Batch, next_token_weights, sum_over_chunks


def kl_from_logits(teacher_logits: jax.Array, student_logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(weights * KL(softmax(teacher) || softmax(student)))`` over ``[..., V]`` logits (float32).

    Reference twin of the chunked loss; the gradient with respect to the student's logits
    is ``weights * (softmax(student) - softmax(teacher))``.
    """
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return jnp.sum(kl * weights)


def _has_trunk_and_head(model: nnx.Module) -> bool:
    return hasattr(model, "hidden_states") and hasattr(model, "logits_from_hidden")


@dataclasses.dataclass(frozen=True)
class TeacherKL:
    """``loss_fn(student, batch, teacher_arrays) -> (kl_sum, count)`` for `sketchtune_jax.train.Trainer`.

    Position ``t`` counts when it predicts a loss token (``loss_mask[:, t + 1]``), as for
    the NLL. Models with a trunk and head (``LlamaForCausalLM``) compute the head
    ``chunk`` positions at a time, teacher and student together, so neither's
    ``[B, T, vocab]`` logits exist whole; other models give full logits.
    """

    teacher_graphdef: Any
    teacher_treedef: Any
    chunk: int = LOSS_CHUNK

    def __call__(self, model: nnx.Module, batch: Batch, teacher_arrays: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        # The teacher's Variables are rebuilt here, inside the step's own trace: NNX refuses
        # Variables that cross into its transforms (scan, grad) from an outer trace.
        teacher = nnx.merge(self.teacher_graphdef, jax.tree.unflatten(self.teacher_treedef, teacher_arrays))
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        weights = next_token_weights(batch)
        if _has_trunk_and_head(model) and _has_trunk_and_head(teacher):
            t_hidden = jax.lax.stop_gradient(teacher.hidden_states(ids, attention_mask=mask))
            s_hidden = model.hidden_states(ids, attention_mask=mask)

            def chunk_kl(t_h: jax.Array, s_h: jax.Array, w: jax.Array) -> jax.Array:
                t_logits = jax.lax.stop_gradient(teacher.logits_from_hidden(t_h))
                return kl_from_logits(t_logits, model.logits_from_hidden(s_h), w)

            kl = sum_over_chunks(chunk_kl, (t_hidden, s_hidden, weights), self.chunk)
        else:
            t_logits = jax.lax.stop_gradient(teacher(ids, attention_mask=mask)[0])
            kl = kl_from_logits(t_logits, model(ids, attention_mask=mask)[0], weights)
        return kl, jnp.sum(weights)


def teacher_kl(teacher: nnx.Module, *, chunk: int = LOSS_CHUNK) -> tuple[TeacherKL, list[jax.Array]]:
    """The distillation loss for ``teacher`` and the arrays to pass as the trainer's ``loss_inputs``."""
    graphdef, state = nnx.split(teacher)
    arrays, treedef = jax.tree.flatten(state)
    return TeacherKL(graphdef, treedef, chunk), arrays


__all__ = ["TeacherKL", "kl_from_logits", "teacher_kl"]
