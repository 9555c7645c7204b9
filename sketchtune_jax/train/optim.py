"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import optax

from sketchtune_jax.train.config import TrainConfig


def _phases(config: TrainConfig, total_steps: int) -> tuple[int, int]:
    """(warmup steps, decay steps): warmup leaves at least one step to decay."""
    warmup = min(config.warmup_for(total_steps), max(total_steps - 1, 0))
    return warmup, max(total_steps - warmup, 1)


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``config.lr`` over `TrainConfig.warmup_for` steps, then linear/cosine decay to 0 or constant."""
    warmup, decay_steps = _phases(config, total_steps)
    if config.schedule == "linear":
        after = optax.linear_schedule(config.lr, 0.0, decay_steps)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(config.lr, decay_steps)
    else:
        after = optax.constant_schedule(config.lr)
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, config.lr, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def host_learning_rate(config: TrainConfig, total_steps: int, step: int) -> float:
    """`make_schedule`'s value at ``step``, computed in Python on the host.

    The training loop logs the learning rate of every step; evaluating the optax
    schedule would run a device computation and wait for it each step.
    """
    warmup, decay_steps = _phases(config, total_steps)
    if step < warmup:
        return config.lr * max(step, 0) / warmup
    progress = min(step - warmup, decay_steps) / decay_steps
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the config's schedule.

    Gradient accumulation is not done here: `train_step` sums token-weighted
    gradients over the micro-batches of one step, which (unlike averaging
    per-micro-batch means, as ``optax.MultiSteps`` does) equals one large batch.
    """
    parts = []
    if config.max_grad_norm is not None and config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(config, total_steps),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
    )
    return optax.chain(*parts)
