"""Batch sources the trainer reads: resumable streams of ``{name: [B, T] int32}`` dicts.

`sketchtune_jax.data.BucketedBatches` is one; `SequenceBatches` wraps a fixed list;
`stack_micro_batches` stacks a gradient-accumulation group into ``[A, B, T]``;
`packed_windows` and `window_batches` turn a token stream into language-modelling batches
(plain-text fine-tuning, healing).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from sketchtune_jax.data import DataPosition


class BatchSource(Protocol):
    """A resumable source of batches (`sketchtune_jax.data.BucketedBatches` is one)."""

    @property
    def num_batches(self) -> int: ...

    def iterate(
        self, start: DataPosition = ..., *, epochs: int | None = ...
    ) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]: ...


class SequenceBatches:
    """A fixed list of batches as a `BatchSource` (same order every epoch)."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]):
        if not batches:
            raise ValueError("no batches")
        self.batches = list(batches)

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def iterate(
        self, start: DataPosition = DataPosition(), *, epochs: int | None = None
    ) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]:
        epoch, index = start.epoch, start.index
        while epochs is None or epoch < epochs:
            for i in range(index, len(self.batches)):
                yield DataPosition(epoch, i), self.batches[i]
            epoch, index = epoch + 1, 0


def as_batch_source(batches: Any) -> BatchSource:
    """``batches`` itself if it is a `BatchSource`, a `SequenceBatches` of it if it is a list."""
    if hasattr(batches, "iterate") and hasattr(batches, "num_batches"):
        return batches
    if isinstance(batches, Sequence):
        return SequenceBatches(batches)
    raise TypeError(
        "train_batches must be a BatchSource (e.g. data.BucketedBatches) or a list of batch dicts; "
        f"got {type(batches).__name__} (a one-shot iterator cannot be resumed)"
    )


def packed_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Token ``ids [n]`` cut into ``n // seq_len`` consecutive, non-overlapping windows in text order,
    int32 ``[windows, seq_len]`` (a tail shorter than ``seq_len`` is dropped)."""
    ids = np.asarray(ids, np.int32)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    count = len(ids) // seq_len
    return ids[: count * seq_len].reshape(count, seq_len)


def window_batches(windows: np.ndarray, batch_size: int, *, drop_remainder: bool = True) -> list[dict[str, np.ndarray]]:
    """``[N, T]`` token windows as ``N // batch_size`` batches of ``[batch_size, T]`` int32 with all-ones
    attention and loss masks; a remainder of fewer than ``batch_size`` windows is dropped, or with
    ``drop_remainder=False`` kept as a last, smaller batch (for evaluation)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [N, T] token ids, got shape {windows.shape}")
    if len(windows) < batch_size:
        raise ValueError(
            f"{len(windows)} windows cannot fill one batch of {batch_size}; "
            "give more calibration text or lower the batch size"
        )
    last = len(windows) if not drop_remainder else len(windows) - batch_size + 1
    batches = []
    for i in range(0, last, batch_size):
        rows = windows[i : i + batch_size]
        ones = np.ones(rows.shape, np.int32)
        batches.append({"input_ids": rows, "attention_mask": ones, "loss_mask": ones})
    return batches


def text_batches(
    source: str,
    tokenizer: Any,
    *,
    batch_size: int,
    seq_len: int,
    text_range: tuple[float, float] = (0.0, 1.0),
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]] | None]:
    """Language-modelling ``(train, val)`` batches of a text: the ``text_range`` fraction of ``source``
    (a text/JSON/JSONL file or ``hf:`` source) cut into packed windows of ``seq_len`` tokens, every
    token scored. The last ``val_fraction`` of the windows (in text order) is held out for
    validation (None when 0); the training windows are shuffled once by ``seed``."""
    from sketchtune_jax.calibration import calibration_token_ids
    from sketchtune_jax.settings import SettingError

    if not 0 <= val_fraction < 1:
        raise SettingError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    windows = packed_windows(calibration_token_ids(source, tokenizer, text_range=text_range), seq_len)
    n_val = int(round(len(windows) * val_fraction))
    if len(windows) - n_val < batch_size or (val_fraction > 0 and n_val < 1):
        raise SettingError(
            "seq_len",
            f"of {seq_len} cuts {source!r} (range {text_range[0]}:{text_range[1]}) into {len(windows)} windows, "
            f"too few for a training batch of {batch_size} and a validation share of {val_fraction}; "
            "give more text or lower {seq_len} or {batch_size}",
            ("seq_len", "batch_size"),
        )
    train = windows[: len(windows) - n_val]
    train = train[np.random.default_rng(seed).permutation(len(train))]
    held_out = windows[len(windows) - n_val :]
    val = window_batches(held_out, min(batch_size, n_val), drop_remainder=False) if n_val else None
    return window_batches(train, batch_size), val


def stack_micro_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack ``A`` batches of ``[B_i, T_i]`` into ``[A, max B, max T]`` int32.

    Filler rows get one attended token and no loss tokens, so they add nothing to
    the loss or gradients and never produce an all-masked attention row.
    """
    if len(batches) == 1:
        return {k: np.asarray(v, np.int32) for k, v in batches[0].items()}
    rows = max(b["input_ids"].shape[0] for b in batches)
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {k: np.zeros((len(batches), rows, length), np.int32) for k in batches[0]}
    for a, b in enumerate(batches):
        r, t = b["input_ids"].shape
        for k, v in b.items():
            out[k][a, :r, :t] = v
        if "attention_mask" in out:
            out["attention_mask"][a, r:, 0] = 1
    return out


def pad_rows(batch: dict[str, np.ndarray], multiple: int, *, dim: int = 0) -> dict[str, np.ndarray]:
    """``batch`` with filler rows appended along ``dim`` up to a multiple of ``multiple``
    (as in `stack_micro_batches`: one attended token, no loss tokens), so that a short
    last batch still splits evenly over the devices of a data axis."""
    rows = batch["input_ids"].shape[dim]
    missing = -rows % multiple
    if not missing:
        return batch

    def pad(v: np.ndarray) -> np.ndarray:
        widths = [(0, 0)] * v.ndim
        widths[dim] = (0, missing)
        return np.pad(np.asarray(v), widths)

    out = {k: pad(v) for k, v in batch.items()}
    if "attention_mask" in out:
        index = (slice(None),) * dim + (slice(rows, None), 0)
        out["attention_mask"][index] = 1
    return out


__all__ = ["BatchSource", "SequenceBatches", "as_batch_source", "pad_rows", "stack_micro_batches"]
