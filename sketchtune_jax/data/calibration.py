"""Calibration token windows for sketching: from a text file, a JSON/JSONL file, an HF dataset, text or
token ids in memory, or the model itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sketchtune_jax.data.records import read_json_records
from sketchtune_jax.data.text import is_text, read_text, text_fraction
from sketchtune_jax.settings import SettingError, fraction_range

# A text given in memory rather than a file name: it has a line break, or a space and no file suffix.


def calibration_windows(
    source: str | Sequence[int] | np.ndarray,
    tokenizer,
    *,
    nsamples: int,
    seq_len: int,
    seed: int = 0,
    model=None,
    text_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """``nsamples`` windows of ``seq_len`` tokens, int32 ``[nsamples, seq_len]``.

    ``source`` is a text file, a JSON/JSONL file of records (``text`` or the
    instruction fields), ``hf:NAME[:CONFIG]:SPLIT``, ``self`` (sampled from
    ``model``), the text itself (a str that names no file and holds a line break, or a space
    and no file suffix), or token ids: ``[n]`` (a token stream) or ``[rows, length]`` (windows
    of ``length >= seq_len``, cut to ``seq_len``). Windows start at seeded random token offsets
    (random rows of 2-D ids), as GPTQ samples C4. ``text_range`` keeps only that fraction of a
    text or token stream (for held-out evaluation).
    """
    if nsamples < 1 or seq_len < 2:
        raise ValueError(f"need nsamples >= 1 and seq_len >= 2, got {nsamples} and {seq_len}")
    if not isinstance(source, str):
        return _windows_of_ids(np.asarray(source), nsamples=nsamples, seq_len=seq_len, seed=seed, text_range=text_range)
    if tokenizer is None:
        raise ValueError(
            "the model has no tokenizer files, and calibration text must be tokenized; "
            "add the tokenizer to the model directory"
        )
    if source == "self":
        if model is None:
            raise ValueError("calibration 'self' needs the model to sample from")
        return self_generated_windows(model, tokenizer, nsamples=nsamples, seq_len=seq_len, seed=seed)
    ids = calibration_token_ids(source, tokenizer, text_range=text_range)
    where = f"calibration source {source!r}" if not is_text(source) else f"the text of {len(source)} characters"
    return _sample_or_refuse(ids, where, nsamples=nsamples, seq_len=seq_len, seed=seed)


def _sample_or_refuse(ids: np.ndarray, source: str, *, nsamples: int, seq_len: int, seed: int) -> np.ndarray:
    """`sample_windows` of ``ids`` read from ``source``, or a `SettingError` when they are too few."""
    if len(ids) < seq_len * nsamples:
        have = len(ids) // seq_len
        raise SettingError(
            "nsamples",
            f"of {nsamples} windows of {seq_len} do not fit {source}: its "
            f"{len(ids)} tokens hold {have}; lower {{nsamples}} or {{seq_len}}, or give more text",
            ("nsamples", "seq_len"),
        )
    return sample_windows(ids, nsamples=nsamples, seq_len=seq_len, seed=seed)


def _windows_of_ids(
    ids: np.ndarray, *, nsamples: int, seq_len: int, seed: int, text_range: tuple[float, float]
) -> np.ndarray:
    """Windows of token ids given in memory: a stream ``[n]`` sampled as text is, or rows ``[r, L]``."""
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"calibration token ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int32)
    if ids.ndim == 1:
        lo, hi = fraction_range(text_range, "text_range")
        ids = ids[int(len(ids) * lo) : int(len(ids) * hi)]
        return _sample_or_refuse(ids, "the token ids given", nsamples=nsamples, seq_len=seq_len, seed=seed)
    if ids.ndim != 2:
        raise ValueError(f"calibration token ids must be [n] or [rows, length], got shape {ids.shape}")
    rows, length = ids.shape
    if rows < nsamples or length < seq_len:
        raise SettingError(
            "nsamples",
            f"of {nsamples} windows of {seq_len} do not fit the [{rows}, {length}] token ids given; "
            "lower {nsamples} or {seq_len}, or give more",
            ("nsamples", "seq_len"),
        )
    keep = np.sort(np.random.default_rng(seed).choice(rows, size=nsamples, replace=False))
    return ids[keep, :seq_len]


def calibration_token_ids(source: str, tokenizer, *, text_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Token ids (int32 ``[n]``) of the ``text_range`` fraction of a text/JSON/JSONL file, an ``hf:``
    source, or a text given in memory (`is_text`)."""

    text = text_fraction(_read_calibration_text(source), text_range)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def sample_windows(ids: np.ndarray, *, nsamples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``nsamples`` windows of ``ids`` at distinct seeded random starts, in text order, int32 ``[nsamples, seq_len]``."""
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(ids) - seq_len + 1, size=nsamples, replace=False)
    return np.stack([ids[s : s + seq_len] for s in np.sort(starts)])


def _read_calibration_text(source: str) -> str:
    if is_text(source):
        return source
    if source.startswith("hf:"):
        return read_text(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration file not found: {source} (give a text/JSON/JSONL file, hf:NAME:SPLIT, or 'self')"
        )
    if path.suffix.lower() in (".json", ".jsonl"):
        return "\n\n".join(_record_text(r) for r in read_json_records(str(path)))
    return path.read_text(encoding="utf-8")


def _record_text(record: dict) -> str:
    if "text" in record:
        return str(record["text"])
    parts = [str(record.get(k, "")).strip() for k in ("instruction", "input", "output")]
    text = "\n".join(p for p in parts if p)
    if not text:
        raise ValueError(f"a calibration record has neither 'text' nor instruction fields: {record!r:.200}")
    return text


def self_generated_windows(model, tokenizer, *, nsamples: int, seq_len: int, seed: int) -> np.ndarray:
    """Windows sampled from ``model`` itself (temperature 1) starting from BOS, for when no data is at hand."""
    from sketchtune_jax.models.generate import generate

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rng = np.random.default_rng(seed)
    # A random first token per sample diversifies the sequences the way different documents would.
    firsts = rng.integers(0, len(tokenizer), size=nsamples)
    prompts = [[int(bos), int(t)] for t in firsts]
    outs = generate(
        model,
        prompts,
        max_new_tokens=seq_len - 2,
        eos_token_id=None,
        pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos),
        temperature=1.0,
        top_p=1.0,
        seed=seed,
    )
    return np.asarray([p + o for p, o in zip(prompts, outs)], dtype=np.int32)
