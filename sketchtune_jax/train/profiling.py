"""What the benches measure, in one place: state bytes, compiled train-step memory and speed, serving speed.

`bench/train_step.py` and `bench/compare.py` both report these for every fine-tuning method.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax.models.generate import generate
from sketchtune_jax.train.step import Batch, compile_train_step, train_step


def state_bytes(model: nnx.Module, *filters: Any) -> int:
    """Bytes of the model's variables as held in memory (weights, codes, codebooks, adapters, a
    quantized base), or of those of ``filters``; RNG state excluded."""
    state = nnx.state(model, *filters) if filters else nnx.state(model, nnx.Not(nnx.RngState))
    total = 0
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        if hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            total += int(np.prod(value.shape)) * jnp.dtype(value.dtype).itemsize
    return total


def train_step_memory(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> dict[str, float]:
    """Compile the train step for ``batch``'s shapes; XLA's static memory accounting and the compile time.

    Returns ``argument_bytes``, ``temp_bytes``, ``output_bytes`` (from ``memory_analysis``,
    available on every backend, CPU included) and ``compile_s``.
    """
    t0 = time.perf_counter()
    compiled = compile_train_step(model, optimizer, batch)
    out: dict[str, float] = {"compile_s": time.perf_counter() - t0}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        out.update(
            argument_bytes=int(analysis.argument_size_in_bytes),
            temp_bytes=int(analysis.temp_size_in_bytes),
            output_bytes=int(analysis.output_size_in_bytes),
        )
    return out


def train_step_speed(
    model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, *, steps: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Time ``steps`` train steps on ``batch`` after the first (compiling) step and ``warmup`` more.

    The steps update ``model``: time a copy that is not needed afterwards. Returns
    ``first_step_s``, ``step_ms``, ``tokens_per_s`` (``input_ids`` tokens, all micro-batches) and
    the last ``loss``.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, batch))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(train_step(model, optimizer, batch))
    t0 = time.perf_counter()
    for _ in range(steps):
        metrics = train_step(model, optimizer, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    return {
        "first_step_s": first,
        "step_ms": 1e3 * elapsed / steps,
        "tokens_per_s": int(np.prod(np.shape(batch["input_ids"]))) * steps / elapsed,
        "loss": float(metrics["loss"]),
    }


def serving_speed(
    model: nnx.Module,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch: int = 1,
    vocab: int | None = None,
    repeats: int = 3,
) -> dict[str, float]:
    """Greedy generation speed with the KV cache: time to first token and decode tokens/s.

    Both programs (1 and ``1 + new_tokens`` new tokens) are compiled and run once before
    timing; each figure is the median of ``repeats``. ``vocab`` bounds the random prompt ids.
    """
    vocab = vocab or model.config.vocab_size
    prompts = np.random.default_rng(0).integers(3, vocab, (batch, prompt_len)).tolist()

    def timed(n: int) -> float:
        generate(model, prompts, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(model, prompts, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    first = timed(1)
    full = timed(1 + new_tokens)
    return {
        "ttft_s": first,
        "decode_tokens_per_s": batch * new_tokens / max(full - first, 1e-9),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch": batch,
    }
