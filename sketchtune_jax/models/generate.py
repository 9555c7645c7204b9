"""Batched autoregressive generation with a KV cache (greedy, or temperature / top-p sampling).

The prefill and the whole decode loop (a `lax.while_loop`) are one jitted function, so
nothing is recompiled per token; it is compiled once per (batch, padded prompt length,
max_new_tokens, sampling or not); rows are padded up to a power of two and the prompt
length up to a multiple of 64, so that similar batches share compilations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax.models import LlamaForCausalLM, init_cache
from sketchtune_jax.models.inference_view import inference_view
from sketchtune_jax.settings import require, setting

_PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """How text is continued (checked when built, before a model is loaded)."""

    max_new_tokens: int = setting(64, "tokens to generate after each prompt, at most")
    temperature: float = setting(0.0, "sampling temperature; 0 is greedy")
    top_p: float = setting(1.0, "sample only from the most likely tokens whose probability reaches this")
    seed: int = setting(0, "random seed of the sampling")

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(
            self.temperature >= 0 and self.temperature < float("inf"),
            "temperature",
            f"must be a finite number >= 0, got {self.temperature}",
        )
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")


def generate(
    model: LlamaForCausalLM,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens of each row.

    Prompts of unequal length are left-padded with ``pad_token_id``. A row stops after
    its first token in ``eos_token_id`` (which is kept in its output) or after
    ``max_new_tokens``. ``temperature == 0`` is greedy; otherwise tokens are sampled
    from ``softmax(logits / temperature)`` restricted to the smallest set of tokens
    whose probability reaches ``top_p``, with randomness from ``seed``.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in prompt_ids]
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    eos = (
        ()
        if eos_token_id is None
        else (
            (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(int(e) for e in eos_token_id)
        )
    )
    batch = len(prompt_ids)
    # Rows up to a power of two (filled with copies of the first prompt) and prompt
    # widths up to a multiple of the bucket, so an evaluation's batches share programs.
    rows = 1 << (batch - 1).bit_length()
    prompt_ids = list(prompt_ids) + [prompt_ids[0]] * (rows - batch)
    longest = max(len(p) for p in prompt_ids)
    width = -(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET
    ids = np.full((rows, width), pad_token_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    # On a CPU, rebuild each sketched weight once here rather than per decoded token.
    graphdef, state = nnx.split(inference_view(model))
    tokens = _generate(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.asarray(eos or (-1,), jnp.int32),
        jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        max_new_tokens=max_new_tokens,
        pad=int(pad_token_id),
        sample=temperature > 0,
    )
    out = []
    for row in np.asarray(tokens)[:batch].tolist():
        stop = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:stop])
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad", "sample"))
def _generate(
    graphdef,
    state,
    ids: jax.Array,
    mask: jax.Array,
    eos_ids: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    max_new_tokens: int,
    pad: int,
    sample: bool,
) -> jax.Array:
    """int32 ``[B, max_new_tokens]`` new tokens; rows that stopped are filled with ``pad``.

    ``eos_ids`` is int32 ``[n]`` (-1 when there is none), traced so that changing it does
    not recompile.
    """
    model = nnx.merge(graphdef, state)
    batch, width = ids.shape
    cache = init_cache(model.config, batch, width + max_new_tokens, model.dtype)
    logits, cache = model(ids, attention_mask=mask, cache=cache)

    def pick(step_logits: jax.Array, step: jax.Array) -> jax.Array:
        if not sample:
            return jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
        return _sample_top_p(step_logits, jax.random.fold_in(key, step), temperature, top_p)

    first = pick(logits[:, -1], jnp.int32(0))
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(carry):
        step, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, done, cache, out = carry
        logits, cache = model(token[:, None], cache=cache)
        nxt = jnp.where(done, pad, pick(logits[:, 0], step))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, done | jnp.isin(nxt, eos_ids), cache, out

    *_, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first, done, cache, out))
    return out


def _sample_top_p(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sample ``[B]`` ids from ``logits [B, V]`` after temperature and nucleus (top-p) filtering."""
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass before it is below top_p, so the most likely one always stays.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_text(
    model: LlamaForCausalLM,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    add_bos: bool = True,
) -> list[str]:
    """Continue each text prompt and return the decoded new text (special tokens dropped).

    The settings are checked as `GenerateSettings` (`SettingError` before any work).
    ``chat`` wraps each prompt in the tokenizer's chat template as a user turn (a
    tokenizer without one is refused before any work).
    ``add_bos`` puts the tokenizer's BOS token first when the tokenizer has one and
    did not add it itself.
    """
    GenerateSettings(max_new_tokens, temperature, top_p, seed)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template; "
            "generate without chat (chat=False; on the command line, drop --chat)"
        )
    prompt_ids = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            bos = tokenizer.bos_token_id
            if add_bos and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        prompt_ids.append(list(ids))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outs = generate(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
