"""Perplexity over non-overlapping token windows of a text."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax._utils.reporting import progress
from sketchtune_jax.data.batches import packed_windows
from sketchtune_jax.models.inference_view import inference_view
from sketchtune_jax.settings import SettingError
from sketchtune_jax.train.step import token_nll_sum


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over ``windows`` windows of ``seq_len`` tokens (``tokens`` predicted in all);
    ``window_nll`` is each window's mean next-token NLL (for a bootstrap over windows)."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    tokens_per_s: float
    window_nll: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_windows(tokenizer, text: str, seq_len: int, max_windows: int | None) -> np.ndarray:
    """Tokenize ``text`` and cut it into non-overlapping windows: int32 ``[windows, seq_len]``.

    Only as much of the text as the windows need is tokenized, plus a margin so that
    the cut does not change the tokens kept.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    need = None if max_windows is None else seq_len * max_windows
    chars = len(text) if need is None else min(len(text), need * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if need is None or chars >= len(text) or len(ids) > need + 16:
            break
        chars = min(len(text), chars * 2)
    if need is not None and chars < len(text):
        ids = ids[:need]
    n_windows = len(ids) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise SettingError(
            "seq_len",
            f"of {seq_len} is longer than the text ({len(ids)} tokens); give a longer text or a smaller {{seq_len}}",
            ("seq_len",),
        )
    return packed_windows(np.asarray(ids[: n_windows * seq_len]), seq_len)


@functools.partial(jax.jit, static_argnums=0)
def _windows_nll(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    """Summed next-token negative log-likelihood of each row of ``ids`` [B, T]: f32 ``[B]``."""
    # split/merge rather than nnx.jit: the model is an input only, never copied into outputs.
    logits, _ = nnx.merge(graphdef, state)(ids)
    rows = {"input_ids": ids[:, None], "loss_mask": jnp.ones_like(ids)[:, None]}
    return jax.vmap(lambda lg, batch: token_nll_sum(lg, batch)[0])(logits[:, None], rows)


def perplexity(
    model: nnx.Module,
    tokenizer,
    text: str,
    *,
    seq_len: int = 512,
    max_windows: int | None = 20,
    batch_size: int = 4,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text``: exp of the mean NLL of every token after the first of each window."""
    windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
    # On a CPU, rebuild each sketched weight once for all windows rather than per batch.
    graphdef, state = nnx.split(inference_view(model))
    sums = []
    start = time.perf_counter()
    for lo in progress(range(0, len(windows), batch_size), desc="perplexity", disable=not show_progress):
        batch = windows[lo : lo + batch_size]
        sums.extend(np.asarray(_windows_nll(graphdef, state, jnp.asarray(batch)), np.float64).tolist())
    seconds = time.perf_counter() - start
    tokens = windows.shape[0] * (seq_len - 1)
    nll = sum(sums) / tokens
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=tokens,
        windows=int(windows.shape[0]),
        seq_len=seq_len,
        seconds=seconds,
        tokens_per_s=windows.size / seconds,
        window_nll=tuple(x / (seq_len - 1) for x in sums),
    )
