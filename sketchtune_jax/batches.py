"""Batch sources the trainer reads: resumable streams of ``{name: [B, T] int32}`` dicts.

`sketchtune_jax.data.BucketedBatches` is one; `SequenceBatches` wraps a fixed list;
`stack_micro_batches` stacks a gradient-accumulation group into ``[A, B, T]``.
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
