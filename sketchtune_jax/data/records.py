"""Instruction records: loading (JSON, JSONL, ``hf:`` datasets, mixtures), validation,
tokenization with the loss on the response, and the train/validation split.

Records follow the LLM-Adapters / Alpaca layout ``{"instruction", "input", "output"}``
(extra fields such as ``answer`` are kept and ignored here). Prompts come from
`sketchtune_jax.data.prompts`; batches from `sketchtune_jax.data.batches`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np

from sketchtune_jax.data.prompts import format_prompt

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
    from sketchtune_jax.data.hub import HubSourceError, load_hub_dataset

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
