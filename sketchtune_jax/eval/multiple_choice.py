"""Multiple-choice accuracy by log-likelihood, the way lm-evaluation-harness scores it.

Each record (LLM-Adapters layout: the instruction lists the options and ends with
``Answer format: answer1/answer2/...`` or ``true/false``) becomes one row per choice:
the Alpaca prompt, then a continuation whose summed log-likelihood given the prompt is
the choice's score. ``acc`` picks the highest sum, ``acc_norm`` the highest sum divided
by the continuation's length in characters (the harness's ``acc_norm``).

What the continuation is (``continuation=``):

- ``"response"`` (default): the whole response a model fine-tuned on these files writes,
  ``"the correct answer is answerK"`` (``"... is true"`` / ``"... is false"`` for BoolQ),
  exactly the ``output`` field of every train record. Choices differ only in the answer
  word, so this measures a fine-tuned model's preference between the words it was taught.
- ``"option"``: the option's own text (``"a bacterial population in the bloodstream"``;
  ``true`` / ``false`` for BoolQ) after the same Alpaca prompt, which lists all options.
- ``"question"``: lm-evaluation-harness's ARC / OpenBookQA format: the prompt is only
  ``"Question: {question}\nAnswer:"`` (the question parsed from the instruction, no option
  list) and the continuation ``" {option text}"``. It has signal on a model that never
  learned the answer words or the Alpaca format, e.g. a small base or chat model.

The EOS token is not scored. Rows are right-padded: ``batch_size`` rows a forward pass
(short batches filled with copies of their first row) and widths up to a multiple of 64,
so one evaluation compiles a few programs at most.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax._utils.fileio import atomic_write_bytes
from sketchtune_jax.data.records import TokenizerLike, read_json_records, tokenize_example
from sketchtune_jax.models.inference_view import inference_view
from sketchtune_jax.train.step import token_nll_sum

Continuation = Literal["response", "option", "question"]
CONTINUATIONS = ("response", "option", "question")
RESPONSE_TEMPLATE = "the correct answer is {}"
_WIDTH_BUCKET = 64
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9_]+(?:\s*/\s*[A-Za-z0-9_]+)+)\s*$")


@dataclasses.dataclass(frozen=True)
class Choices:
    """The answer words of a record (``answer1``..., ``true``/``false``) and each option's text."""

    words: tuple[str, ...]
    texts: tuple[str, ...]


def parse_choices(instruction: str) -> Choices:
    """Answer words from the instruction's last line ``Answer format: w1/w2/...`` and option texts
    from the ``W1: text W2: text`` list before it (the words themselves for ``true/false``).

    Raises:
        ValueError: no ``Answer format:`` line, or an option label missing from the instruction.
    """
    text = instruction.rstrip()
    m = _ANSWER_FORMAT.search(text)
    if not m:
        raise ValueError(
            f"cannot find the choices: the instruction does not end with 'Answer format: w1/w2/...': {text[-80:]!r}"
        )
    words = tuple(w.strip().lower() for w in m.group(1).split("/"))
    if len(set(words)) != len(words):
        raise ValueError(f"repeated answer words in {m.group(0)!r}")
    if not all(re.fullmatch(r"[a-z]+\d+", w) for w in words):
        return Choices(words, words)
    body = text[: m.start()]
    starts, ends = [], []
    pos = 0
    for word in words:
        label = re.compile(rf"\b{re.escape(word)}\s*:", re.IGNORECASE).search(body, pos)
        if label is None:
            raise ValueError(f"cannot find the choices: option {word!r} is not listed as '{word.capitalize()}:'")
        starts.append(label.start())
        ends.append(label.end())
        pos = label.end()
    texts = tuple(body[ends[i] : starts[i + 1] if i + 1 < len(words) else len(body)].strip() for i in range(len(words)))
    return Choices(words, texts)


def check_records(records: Sequence[dict[str, Any]]) -> list[int]:
    """The index of each record's ``answer`` among its parsed choices.

    Raises:
        ValueError: naming the first record without an ``instruction``, whose choices cannot be
            parsed, or whose ``answer`` is not one of them.
    """
    labels = []
    for index, record in enumerate(records):
        try:
            choices = parse_choices(record["instruction"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"record {index}: {e}") from None
        label = str(record.get("answer", "")).strip().lower()
        if label not in choices.words:
            raise ValueError(f"record {index}: answer {record.get('answer')!r} is not one of {list(choices.words)}")
        labels.append(choices.words.index(label))
    return labels


def continuation_for(choices: Choices, index: int, continuation: Continuation) -> str:
    """The text scored for choice ``index`` (see the module docstring)."""
    if continuation == "response":
        return RESPONSE_TEMPLATE.format(choices.words[index])
    if continuation == "option":
        return choices.texts[index]
    if continuation == "question":
        return " " + choices.texts[index]
    raise ValueError(f"continuation must be one of {CONTINUATIONS}, got {continuation!r}")


def choice_rows(
    record: dict[str, Any], tokenizer: TokenizerLike, continuation: Continuation, template: str = "alpaca"
) -> tuple[Choices, list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Per choice: ``(input_ids [L], loss_mask [L])`` int32 (BOS + prompt + continuation, mask on
    the continuation) and the continuation's length in characters; ``template`` formats the prompt
    of continuations ``response`` and ``option`` (`sketchtune_jax.data.prompts.format_prompt`)."""
    choices = parse_choices(record["instruction"])
    rows, lengths = [], []
    for i in range(len(choices.words)):
        text = continuation_for(choices, i, continuation)
        if continuation == "question":
            rows.append(_plain_row(f"Question: {question_of(record['instruction'])}\nAnswer:", text, tokenizer))
        else:
            ex = tokenize_example({**record, "output": text}, tokenizer, seq_len=1 << 30, template=template)
            rows.append((ex.input_ids[:-1], ex.loss_mask[:-1]))
        lengths.append(len(text))
    return choices, rows, lengths


def question_of(instruction: str) -> str:
    """The question of an LLM-Adapters instruction: the text after ``question:`` up to the next blank line."""
    m = re.search(r"question:\s*(.+?)\s*(?:\n\n|$)", instruction, re.IGNORECASE | re.DOTALL)
    if not m:
        raise ValueError(f"cannot find 'question: ...' in the instruction: {instruction[:80]!r}")
    return m.group(1)


def _plain_row(prompt: str, continuation: str, tokenizer: TokenizerLike) -> tuple[np.ndarray, np.ndarray]:
    # The same boundary rule as data.tokenize_example, for a prompt that is not the Alpaca template.
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    full_ids = list(tokenizer.encode(prompt + continuation, add_special_tokens=False))
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        cont_ids = full_ids[len(prompt_ids) :]
    else:
        cont_ids = list(tokenizer.encode(continuation, add_special_tokens=False))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + prompt_ids + cont_ids
    mask = [0] * (len(bos) + len(prompt_ids)) + [1] * len(cont_ids)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _row_logliks(graphdef, state, ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array) -> jax.Array:
    logits, _ = nnx.merge(graphdef, state)(ids, attention_mask=attention_mask)

    def row(row_logits, row_ids, row_mask):
        nll, _ = token_nll_sum(row_logits[None], {"input_ids": row_ids[None], "loss_mask": row_mask[None]})
        return -nll

    return jax.vmap(row)(logits, ids, loss_mask)


def sequence_logliks(
    model: nnx.Module, rows: Sequence[tuple[np.ndarray, np.ndarray]], *, batch_size: int = 8, pad_token_id: int = 0
) -> np.ndarray:
    """Summed log-probability of the loss-masked tokens of each ``(input_ids, loss_mask)`` row, ``[N]`` float32.

    Rows are sorted by length, batched ``batch_size`` at a time, right-padded to a multiple of 64.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # On a CPU, rebuild each sketched weight once for all rows rather than per batch.
    graphdef, state = nnx.split(inference_view(model))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out = np.zeros(len(rows), np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        chunk = chunk + [chunk[0]] * (batch_size - len(chunk))
        width = -(-max(len(rows[i][0]) for i in chunk) // _WIDTH_BUCKET) * _WIDTH_BUCKET
        ids = np.full((batch_size, width), pad_token_id, np.int32)
        attn = np.zeros((batch_size, width), np.int32)
        loss = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(chunk):
            row_ids, row_loss = rows[i]
            ids[r, : len(row_ids)] = row_ids
            attn[r, : len(row_ids)] = 1
            loss[r, : len(row_ids)] = row_loss
        scores = np.asarray(_row_logliks(graphdef, state, jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(loss)))
        n_real = min(batch_size, len(order) - start)
        out[chunk[:n_real]] = scores[:n_real]
    return out


def evaluate_multiple_choice(
    model: nnx.Module,
    tokenizer: TokenizerLike,
    records: Sequence[dict[str, Any]] | str | os.PathLike,
    *,
    continuation: Continuation = "response",
    limit: int | None = None,
    batch_size: int = 8,
    out_jsonl: str | os.PathLike | None = None,
    progress: bool = False,
    template: str = "alpaca",
) -> dict[str, Any]:
    """Accuracy of choosing each record's answer by log-likelihood (``acc``) and per character (``acc_norm``).

    Args:
        model: ``model(input_ids [B, T], attention_mask=[B, T]) -> (logits [B, T, V], cache)``.
        tokenizer: with ``encode``, ``bos_token_id``, ``eos_token_id`` (``pad_token_id`` optional).
        records: ``{instruction, input, answer}`` records, or a JSON / JSONL file of them; ``answer``
            is one of the words of the instruction's ``Answer format:`` line.
        continuation: ``"response"`` or ``"option"`` (see the module docstring).
        limit: only the first ``limit`` records.
        batch_size: (prompt, choice) rows per forward pass.
        out_jsonl: per-item log-likelihoods and predictions, one JSON object a line (written atomically).
        template: the prompt format of continuations ``response`` and ``option``: ``alpaca`` or
            ``chat`` (the tokenizer's chat template).

    Returns:
        ``{"n", "choices", "continuation", "acc", "acc_norm", "correct", "correct_norm", "chance", "out_jsonl"}``;
        ``chance`` is the mean of 1 / choices.

    Raises:
        ValueError: before any forward pass, for a record whose choices cannot be parsed or whose
            ``answer`` is not one of them (the message names the record).
    """
    if continuation not in CONTINUATIONS:
        raise ValueError(f"continuation must be one of {CONTINUATIONS}, got {continuation!r}")
    if isinstance(records, (str, os.PathLike)):
        records = read_json_records(os.fspath(records))
    records = list(records)[:limit] if limit is not None else list(records)
    if not records:
        raise ValueError("no records to evaluate")

    labels = check_records(records)
    parsed, rows, spans = [], [], []
    for record, label in zip(records, labels):
        choices, record_rows, lengths = choice_rows(record, tokenizer, continuation, template)
        parsed.append((choices, lengths, label))
        spans.append((len(rows), len(rows) + len(record_rows)))
        rows.extend(record_rows)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if progress:
        print(f"scoring {len(rows)} (prompt, choice) rows of {len(records)} records", flush=True)
    logliks = sequence_logliks(model, rows, batch_size=batch_size, pad_token_id=pad)

    items = []
    for index, ((choices, lengths, label), (lo, hi)) in enumerate(zip(parsed, spans)):
        ll = logliks[lo:hi]
        norm = ll / np.asarray(lengths, np.float32)
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(norm))
        items.append(
            {
                "index": index,
                "label": choices.words[label],
                "prediction": choices.words[pred],
                "prediction_norm": choices.words[pred_norm],
                "correct": pred == label,
                "correct_norm": pred_norm == label,
                "logliks": [float(x) for x in ll],
                "lengths": lengths,
            }
        )
    if out_jsonl is not None:
        out_jsonl = os.fspath(out_jsonl)
        atomic_write_bytes(out_jsonl, "".join(json.dumps(item) + "\n" for item in items).encode("utf-8"))
    n = len(items)
    correct = sum(i["correct"] for i in items)
    correct_norm = sum(i["correct_norm"] for i in items)
    return {
        "n": n,
        "choices": sorted({len(c.words) for c, _, _ in parsed}),
        "continuation": continuation,
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "correct": correct,
        "correct_norm": correct_norm,
        "chance": float(np.mean([1.0 / len(c.words) for c, _, _ in parsed])),
        "out_jsonl": out_jsonl,
    }
