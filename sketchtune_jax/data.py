"""Instruction data: loading, the prompt templates (Alpaca, chat), tokenization, resumable batches.

Records follow the LLM-Adapters / Alpaca layout ``{"instruction", "input", "output"}``
(extra fields such as ``answer`` are kept and ignored here). A batch is a dict of
numpy arrays, all ``[B, T]`` ``int32``:

- ``input_ids``: BOS + prompt + response + EOS, right-padded with the pad id;
- ``attention_mask``: 1 on real tokens, 0 on padding;
- ``loss_mask``: 1 on the response and EOS tokens (the tokens the loss predicts).

Batches come from `BucketedBatches`, whose order is a pure function of
``(seed, epoch)``, so a `DataPosition` ``(epoch, index)`` stored in a checkpoint
replays exactly the same batches after a restart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from sketchtune_jax.settings import require

PROMPT_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
REQUIRED_FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Raised for unreadable or malformed instruction data."""


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


# ----------------------------------------------------------------------------- loading


def load_instruction_data(source: str | os.PathLike, *, split: str = "train") -> list[dict[str, Any]]:
    """Load instruction records from a JSON list, a JSONL file, or a Hugging Face dataset name.

    A local path is read with the standard ``json`` module (JSON list, or one object
    per line); anything else is treated as a dataset name for `datasets.load_dataset`.
    Every record is checked for ``instruction``, ``input`` and ``output`` (``input`` may
    be missing, meaning empty); all must be strings.

    Raises:
        DataError: file is not JSON / JSONL, a record is not an object or lacks a field
            (the message names the record index and the field), or no records.
    """
    path = os.fspath(source)
    if os.path.exists(path):
        records = read_json_records(path)
        where = path
    else:
        # Hub names look like "owner/name"; anything with a JSON extension or an
        # explicit directory prefix is a local path that does not exist.
        looks_like_path = path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~")) or path.count("/") > 1
        if looks_like_path:
            raise DataError(f"instruction data file not found: {path}")
        records = _load_hub_dataset(path, split)
        where = f"{path} (split {split!r})"
    if not records:
        raise DataError(f"no records in {where}: the dataset is empty")
    return [_validate_record(r, i, where) for i, r in enumerate(records)]


def sample_mixture(sources: Sequence[str | os.PathLike], per_source: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``per_source`` records drawn from each instruction source, shuffled together (seeded)."""
    import random

    if per_source <= 0:
        raise DataError(f"per_source must be positive, got {per_source}")
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for source in sources:
        rows = load_instruction_data(source)
        records += rng.sample(rows, min(per_source, len(rows)))
    rng.shuffle(records)
    return records


def read_json_records(path: str) -> list[Any]:
    """Records of a JSON list, a JSONL file, or a single object (or ``{"split": [...]}`` wrapper)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"no records in {path}: the file is empty")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e}") from None
        return data
    if stripped[0] != "{":
        raise DataError(
            f"{path} is not JSON: expected a JSON list of records or JSONL (one object per line), "
            f"found {stripped[:20]!r}"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        # A single object: either one record or a {"train": [...]}-style wrapper.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and not any(k in data for k in REQUIRED_FIELDS):
            return lists[0]
        return [data]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not JSON or JSONL: line {lineno}: {e}") from None
    return records


def _load_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    from sketchtune_jax.hub import HubSourceError, load_hub_dataset

    try:
        return [dict(r) for r in load_hub_dataset(name, None, split, source=name)]
    except HubSourceError as e:
        raise DataError(f"could not load {name!r}: it is not a local file, and {e.reason}") from None


def _validate_record(record: Any, index: int, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"record {index} in {where} is a {type(record).__name__}, not an object")
    out = dict(record)
    out.setdefault("input", "")
    if out["input"] is None:
        out["input"] = ""
    for field in REQUIRED_FIELDS:
        if field not in out:
            raise DataError(f"record {index} in {where} has no {field!r} field")
        if not isinstance(out[field], str):
            raise DataError(
                f"record {index} in {where}: field {field!r} is a {type(out[field]).__name__}, not a string"
            )
    return out


# ----------------------------------------------------------------------------- template


TEMPLATES = ("alpaca", "chat")


def format_prompt(
    instruction: str, input: str = "", *, template: str = "alpaca", tokenizer: TokenizerLike | None = None
) -> str:
    """The prompt text of one record in ``template`` (no BOS text for alpaca; the tokenizer's BOS id
    is prepended at tokenization when the text does not start with it).

    ``alpaca``: the Alpaca prompt the paper trains and evaluates with; ``### Input:`` appears only
    when ``input`` is non-empty after stripping. ``chat``: the ``tokenizer``'s own chat template
    (from the GGUF or HF files) with the instruction (and input, after a blank line) as one user
    turn, ready for the assistant's reply.
    """
    instruction = instruction.strip()
    input = (input or "").strip()
    if template == "chat":
        check_template(template, tokenizer)
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(  # type: ignore[union-attr]
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    check_template(template, tokenizer)
    parts = [PROMPT_HEADER, "", "### Instruction:", instruction, ""]
    if input:
        parts += ["### Input:", input, ""]
    parts += ["### Response:", ""]
    return "\n".join(parts)


def check_template(template: str, tokenizer: Any) -> None:
    """Refuse ``template`` before any work when it cannot be used with ``tokenizer``: an unknown
    name, or ``chat`` for a tokenizer without a chat template."""
    require(template in TEMPLATES, "template", f"must be one of {', '.join(TEMPLATES)}, got {template!r}")
    require(
        template != "chat" or bool(getattr(tokenizer, "chat_template", None)),
        "template",
        "is chat, but this model's tokenizer has no chat template; use alpaca",
    )


# ----------------------------------------------------------------------------- tokenize


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One tokenized record: ``input_ids`` and ``loss_mask``, both ``[L]`` ``int32``."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    prompt_len: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def tokenize_example(
    record: dict[str, Any],
    tokenizer: TokenizerLike,
    *,
    seq_len: int,
    index: int = 0,
    template: str = "alpaca",
) -> TokenizedExample:
    """BOS + prompt + response + EOS, truncated to ``seq_len``; loss on response + EOS only.

    The prompt is tokenized alone (as it will be at generation); the response takes the
    tokens that follow the prompt in the joint tokenization when the prompt's tokens
    are a prefix of it, and its own tokenization when they are not (a BPE merge across
    the boundary, e.g. ``"\\n" + "\\n"``), so the boundary is always exact. ``template`` formats
    the prompt (`format_prompt`); BOS is not repeated when the prompt's text begins with it (a chat
    template that writes it).

    Raises:
        DataError: the prompt alone (with BOS) does not leave room for one response token.
    """
    prompt = format_prompt(record["instruction"], record.get("input", ""), template=template, tokenizer=tokenizer)
    response = record["output"]
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    full_ids = list(tokenizer.encode(prompt + response, add_special_tokens=False))
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids) :]
    else:
        response_ids = list(tokenizer.encode(response, add_special_tokens=False))
    bos_id = tokenizer.bos_token_id
    bos = [bos_id] if bos_id is not None and prompt_ids[:1] != [bos_id] else []
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token first")
    prompt_part = bos + prompt_ids
    response_part = response_ids + [tokenizer.eos_token_id]
    if len(prompt_part) >= seq_len:
        raise DataError(
            f"record {index}: the prompt alone is {len(prompt_part)} tokens, which leaves no room "
            f"for the response in seq_len={seq_len}; raise seq_len or use on_long_prompt='skip'"
        )
    ids = (prompt_part + response_part)[:seq_len]
    mask = [0] * len(prompt_part) + [1] * (len(ids) - len(prompt_part))
    return TokenizedExample(np.asarray(ids, np.int32), np.asarray(mask, np.int32), len(prompt_part))


def tokenize_dataset(
    records: Sequence[dict[str, Any]],
    tokenizer: TokenizerLike,
    *,
    seq_len: int,
    on_long_prompt: Literal["error", "skip"] = "error",
    template: str = "alpaca",
) -> list[TokenizedExample]:
    """Tokenize every record (see `tokenize_example`; ``template`` formats the prompts).

    ``on_long_prompt="skip"`` drops records whose prompt fills ``seq_len``; ``"error"``
    raises `DataError` naming the record and its prompt length.
    """
    if on_long_prompt not in ("error", "skip"):
        raise ValueError(f"on_long_prompt must be 'error' or 'skip', got {on_long_prompt!r}")
    out = []
    for i, record in enumerate(records):
        try:
            out.append(tokenize_example(record, tokenizer, seq_len=seq_len, index=i, template=template))
        except DataError:
            if on_long_prompt == "error":
                raise
    if not out:
        raise DataError(f"no records left after tokenization (all {len(records)} prompts exceed seq_len={seq_len})")
    return out


def train_val_split(items: Sequence[Any], val_fraction: float, *, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Seeded random split; ``val_fraction`` in ``[0, 1)``. Validation gets ``round(n * f)`` items."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(items)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    val_idx = sorted(perm[:n_val].tolist())
    train_idx = sorted(perm[n_val:].tolist())
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


# ----------------------------------------------------------------------------- batches


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
