"""Batch sources the trainer reads: resumable streams of ``{name: [B, T] int32}`` dicts.

An instruction batch holds ``input_ids`` (BOS + prompt + response + EOS, right-padded with the
pad id), ``attention_mask`` (1 on real tokens) and ``loss_mask`` (1 on the response and EOS
tokens). `BucketedBatches` (length-bucketed; its order a pure function of ``(seed, epoch)``, so
a `DataPosition` stored in a checkpoint replays the same batches) is built by `build_batches`;
`SequenceBatches` wraps a fixed list;
`stack_micro_batches` stacks a gradient-accumulation group into ``[A, B, T]``;
`packed_windows` and `window_batches` turn a token stream into language-modelling batches
(plain-text fine-tuning, healing).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from sketchtune_jax.data.prompts import check_template
from sketchtune_jax.data.records import (
    DataError,
    TokenizedExample,
    TokenizerLike,
    load_instruction_data,
    tokenize_dataset,
    train_val_split,
)


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the next batch comes from: ``epoch`` and batch ``index`` within it."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(int(d["epoch"]), int(d["index"]))


def pad_batch(examples: Sequence[TokenizedExample], *, pad_id: int, length: int) -> dict[str, np.ndarray]:
    """Right-pad examples to ``length``: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, length]`` int32."""
    b = len(examples)
    ids = np.full((b, length), pad_id, np.int32)
    attn = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.int32)
    for r, ex in enumerate(examples):
        n = len(ex)
        ids[r, :n] = ex.input_ids
        attn[r, :n] = 1
        loss[r, :n] = ex.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def padded_length(n: int, multiple: int, seq_len: int) -> int:
    """``n`` rounded up to ``multiple``, capped at ``seq_len`` (bounds the number of shapes jit sees)."""
    return min(int(math.ceil(n / multiple) * multiple), seq_len)


class BucketedBatches:
    """Length-bucketed, seeded, resumable batches over tokenized examples.

    Each epoch: shuffle the examples (seed, epoch), cut into mega-batches of
    ``mega_batch * batch_size``, sort each by length, cut into batches, then shuffle
    the batch order. Rows in a batch have similar lengths; padding goes to a
    multiple of ``pad_multiple`` (capped at ``seq_len``). The order depends only on
    ``(seed, epoch)``, so `iterate` from a `DataPosition` replays a run exactly.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        batch_size: int,
        *,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        pad_multiple: int = 64,
        mega_batch: int = 32,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if not examples:
            raise DataError("no examples to batch: the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.seed = seed
        self.pad_multiple = pad_multiple
        self.mega_batch = mega_batch
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._lengths = np.asarray([len(e) for e in self.examples])
        if self._lengths.max() > seq_len:
            raise DataError(
                f"example {int(self._lengths.argmax())} has {self._lengths.max()} tokens, longer than seq_len={seq_len}"
            )
        if self.num_batches == 0:
            raise DataError(f"{len(self.examples)} examples make no full batch of {batch_size} with drop_last=True")

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def epoch_order(self, epoch: int) -> list[np.ndarray]:
        """The example indices of every batch of ``epoch``, in order."""
        n = len(self.examples)
        if not self.shuffle:
            order = np.arange(n)
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            chunk = self.mega_batch * self.batch_size
            sorted_order = []
            for i in range(0, n, chunk):
                mega = order[i : i + chunk]
                # Stable sort keeps the shuffled order among equal lengths.
                sorted_order.append(mega[np.argsort(-self._lengths[mega], kind="stable")])
            order = np.concatenate(sorted_order)
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
            batches = [batches[j] for j in rng.permutation(len(batches))]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        exs = [self.examples[i] for i in indices]
        length = padded_length(max(len(e) for e in exs), self.pad_multiple, self.seq_len)
        return pad_batch(exs, pad_id=self.pad_id, length=length)

    def iterate(
        self, start: DataPosition = DataPosition(), *, epochs: int | None = None
    ) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]:
        """Yield ``(position_of_this_batch, batch)`` from ``start``, through ``epochs`` (None: forever)."""
        epoch, index = start.epoch, start.index
        while epochs is None or epoch < epochs:
            order = self.epoch_order(epoch)
            for i in range(index, len(order)):
                yield DataPosition(epoch, i), self.batch(order[i])
            epoch, index = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for _, b in self.iterate(epochs=1):
            yield b


def build_batches(
    source: str | os.PathLike | Sequence[dict[str, Any]],
    tokenizer: TokenizerLike,
    *,
    batch_size: int,
    seq_len: int,
    val_fraction: float = 0.0,
    seed: int = 0,
    pad_multiple: int = 64,
    on_long_prompt: Literal["error", "skip"] = "error",
    template: str = "alpaca",
) -> tuple[BucketedBatches, BucketedBatches | None]:
    """Load, tokenize, split and batch in one call: ``(train_batches, val_batches or None)``;
    ``template`` formats the prompts (`format_prompt`)."""
    check_template(template, tokenizer)
    records = source if isinstance(source, Sequence) and not isinstance(source, str) else load_instruction_data(source)
    examples = tokenize_dataset(records, tokenizer, seq_len=seq_len, on_long_prompt=on_long_prompt, template=template)
    train, val = train_val_split(examples, val_fraction, seed=seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(seq_len=seq_len, pad_id=pad_id, seed=seed, pad_multiple=pad_multiple)
    train_b = BucketedBatches(train, batch_size, **kw)
    val_b = BucketedBatches(val, batch_size, shuffle=False, **kw) if val else None
    return train_b, val_b


class BatchSource(Protocol):
    """A resumable source of batches (`BucketedBatches` is one)."""

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
    from sketchtune_jax.data.calibration import calibration_token_ids
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
