"""Answer extraction and scoring for the math and commonsense tasks (LLM-Adapters rules).

Generation is injected: `evaluate_task` takes ``generate_fn(prompts) -> generations``,
so any engine (ours, transformers, a stub in tests) can be plugged in.

Extraction, per answer kind (``strict=False`` is the reference rule exactly):

- ``number`` (GSM8K, MAWPS, SVAMP, AddSub, MultiArith, SingleEq): the last number in
  the generation after removing commas. ``strict=True`` first reads the number after
  the first "The answer is", which ignores numbers the model rambles on with.
- ``letter`` (AQuA): ``strict=True`` reads "answer is (X)" first; the reference rule is
  the first capital A-E anywhere in the generation.
- ``boolean`` / ``answer`` / ``solution`` / ``option`` / ``ending`` (BoolQ, ARC,
  OpenBookQA, SIQA, PIQA, WinoGrande, HellaSwag): the first ``true|false``,
  ``answerN``, ``solutionN``, ``optionN`` or ``endingN``. ``strict=True`` also accepts
  other capitalisations and whole words only.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from sketchtune_jax._utils.fileio import atomic_write_bytes
from sketchtune_jax.data.prompts import check_template, format_prompt

# Task name (lower case, as in the LLM-Adapters file names) -> answer kind.
TASK_KINDS: dict[str, str] = {
    "gsm8k": "number",
    "mawps": "number",
    "svamp": "number",
    "addsub": "number",
    "multiarith": "number",
    "singleeq": "number",
    "aqua": "letter",
    "boolq": "boolean",
    "piqa": "solution",
    "social_i_qa": "answer",
    "siqa": "answer",
    "arc-easy": "answer",
    "arc-challenge": "answer",
    "openbookqa": "answer",
    "hellaswag": "ending",
    "winogrande": "option",
}
ANSWER_KINDS = ("number", "letter", "boolean", "answer", "solution", "option", "ending")

_CHOICE_PATTERNS = {
    "boolean": r"true|false",
    "answer": r"answer[1-5]",
    "solution": r"solution[1-2]",
    "option": r"option[1-2]",
    "ending": r"ending[1-4]",
}
_NUMBER = r"-?\d+\.?\d*"
_ANSWER_IS_NUMBER = re.compile(r"answer is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANSWER_IS_LETTER = re.compile(r"answer is\s*:?\s*\(?([A-E])\)?(?![A-Za-z])", re.IGNORECASE)


def extract_number(text: str, *, strict: bool = True) -> float | None:
    """The numeric answer of a generation, or None when it holds no number.

    Commas are removed first (``1,000`` -> ``1000``). See the module docstring for the rules.
    """
    text = text.replace(",", "")
    if strict and (m := _ANSWER_IS_NUMBER.search(text)):
        return float(m.group(1))
    numbers = re.findall(_NUMBER, text)
    return float(numbers[-1]) if numbers else None


def extract_letter(text: str, *, strict: bool = True) -> str:
    """The option letter A-E of a generation, or ``""``."""
    text = text.strip()
    if strict and (m := _ANSWER_IS_LETTER.search(text)):
        return m.group(1).upper()
    letters = re.findall(r"A|B|C|D|E", text)
    return letters[0] if letters else ""


def extract_choice(text: str, kind: str, *, strict: bool = True) -> str:
    """The first ``true|false`` / ``answerN`` / ``solutionN`` / ``optionN`` / ``endingN``, or ``""``."""
    if kind not in _CHOICE_PATTERNS:
        raise ValueError(f"kind must be one of {sorted(_CHOICE_PATTERNS)}, got {kind!r}")
    pattern = _CHOICE_PATTERNS[kind]
    if strict:
        m = re.search(rf"\b(?:{pattern})\b", text, re.IGNORECASE)
        return m.group(0).lower() if m else ""
    m = re.search(pattern, text.strip())
    return m.group(0) if m else ""


def answer_kind(task: str) -> str:
    """Answer kind of a task name (``"gsm8k"`` -> ``"number"``) or a kind itself."""
    t = task.lower()
    if t in ANSWER_KINDS:
        return t
    if t in TASK_KINDS:
        return TASK_KINDS[t]
    raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASK_KINDS)}, or an answer kind {ANSWER_KINDS}")


def extract_answer(text: str, task: str, *, strict: bool = True) -> float | str | None:
    """The answer of a generation for ``task`` (a task name or an answer kind)."""
    kind = answer_kind(task)
    if kind == "number":
        return extract_number(text, strict=strict)
    if kind == "letter":
        return extract_letter(text, strict=strict)
    return extract_choice(text, kind, strict=strict)


def is_correct(
    prediction: float | str | None,
    label: Any,
    task: str,
    *,
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-4,
) -> bool:
    """Numbers match within ``rel_tol`` or ``abs_tol``; other answers by equality (case-insensitive)."""
    if prediction is None or prediction == "":
        return False
    if answer_kind(task) == "number":
        try:
            target = float(str(label).replace(",", ""))
        except ValueError:
            return False
        if not math.isfinite(float(prediction)):
            return False
        return math.isclose(float(prediction), target, rel_tol=rel_tol, abs_tol=abs_tol)
    return str(prediction).strip().lower() == str(label).strip().lower()


def infer_task(name: str | os.PathLike | None = None, records: Sequence[dict[str, Any]] | None = None) -> str:
    """Task name from a file name (``.../gsm8k.test.json`` -> ``"gsm8k"``), else an answer kind
    from the records' ``answer`` values (all numeric -> ``"number"``, ``answer3`` -> ``"answer"``, ...).
    """
    if name is not None:
        base = os.path.basename(os.fspath(name)).lower()
        for task in sorted(TASK_KINDS, key=len, reverse=True):
            if base.startswith(task) or re.search(rf"(^|[^a-z]){re.escape(task)}([^a-z]|$)", base):
                return task
    if records:
        labels = [str(r.get("answer", "")).strip() for r in records]
        if all(_is_number(x) for x in labels):
            return "number"
        if all(re.fullmatch(r"[A-E]", x) for x in labels):
            return "letter"
        for kind, pattern in _CHOICE_PATTERNS.items():
            if all(re.fullmatch(pattern, x) for x in labels):
                return kind
    raise ValueError(
        f"cannot infer the task from {name!r} or the answers; pass task= (one of {sorted(TASK_KINDS)} or {ANSWER_KINDS})"
    )


def _is_number(x: str) -> bool:
    try:
        float(x.replace(",", ""))
    except ValueError:
        return False
    return True


def evaluate_task(
    generate_fn: Callable[[list[str]], list[str]],
    records: Sequence[dict[str, Any]] | str | os.PathLike,
    tokenizer: Any | None = None,
    *,
    task: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    out_jsonl: str | os.PathLike | None = None,
    strict: bool = True,
    progress: bool = False,
    template: str = "alpaca",
) -> dict[str, Any]:
    """Generate for every record's prompt (``template``: Alpaca, or ``chat``: ``tokenizer``'s chat
    template; `sketchtune_jax.data.prompts.format_prompt`), extract answers and score them.

    Args:
        generate_fn: ``prompts -> generations`` (the response text only, one per prompt).
        records: ``{instruction, input, answer}`` records, or a JSON file of them.
        tokenizer: optional; when given, its EOS text ends a generation and prompt
            token counts are reported.
        task: task name or answer kind; inferred from the file name or answers if None.
        batch_size: prompts per ``generate_fn`` call.
        limit: evaluate only the first ``limit`` records.
        out_jsonl: per-item predictions, one JSON object a line.
        strict: extraction rules (see the module docstring); False is the reference's.

    Returns:
        ``{"task", "kind", "n", "correct", "accuracy", "no_answer", "out_jsonl"}``
        (plus ``"prompt_tokens"`` with a tokenizer).
    """
    name = None
    if isinstance(records, (str, os.PathLike)):
        name = os.fspath(records)
        with open(name, encoding="utf-8") as f:
            records = json.load(f)
    records = list(records)[:limit] if limit is not None else list(records)
    if not records:
        raise ValueError("no records to evaluate")
    check_template(template, tokenizer)
    task = task or infer_task(name, records)
    kind = answer_kind(task)
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None

    items: list[dict[str, Any]] = []
    prompt_tokens = 0
    batches = range(0, len(records), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"eval {task}", unit="batch")
    for start in batches:
        chunk = records[start : start + batch_size]
        prompts = [
            format_prompt(r["instruction"], r.get("input", ""), template=template, tokenizer=tokenizer) for r in chunk
        ]
        generations = list(generate_fn(prompts))
        if len(generations) != len(prompts):
            raise ValueError(f"generate_fn returned {len(generations)} generations for {len(prompts)} prompts")
        for offset, (record, prompt, gen) in enumerate(zip(chunk, prompts, generations)):
            if eos and eos in gen:
                gen = gen[: gen.index(eos)]
            pred = extract_answer(gen, kind, strict=strict)
            item = {
                "index": start + offset,
                "instruction": record["instruction"],
                "label": record.get("answer"),
                "generation": gen,
                "prediction": pred,
                "correct": is_correct(pred, record.get("answer"), kind),
            }
            if tokenizer is not None:
                n = len(tokenizer.encode(prompt, add_special_tokens=False))
                item["prompt_tokens"] = n
                prompt_tokens += n
            items.append(item)

    if out_jsonl is not None:
        atomic_write_bytes(out_jsonl, "".join(json.dumps(item) + "\n" for item in items).encode())
    correct = sum(i["correct"] for i in items)
    summary: dict[str, Any] = {
        "task": task,
        "kind": kind,
        "n": len(items),
        "correct": correct,
        "accuracy": correct / len(items),
        "no_answer": sum(i["prediction"] in (None, "") for i in items),
        "out_jsonl": None if out_jsonl is None else os.fspath(out_jsonl),
    }
    if tokenizer is not None:
        summary["prompt_tokens"] = prompt_tokens
    return summary


def reference_nll(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    seq_len: int = 1024,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, Any]:
    """Mean negative log-likelihood per token of each record's reference ``output`` after its Alpaca
    prompt (the response and EOS tokens, as fine-tuning scores them), token-weighted over records.

    It has signal where answer accuracy has none (a small model that rarely gets GSM8K right still
    moves the likelihood of the worked solution). Returns ``{"nll", "tokens", "n", "stderr",
    "record_nll", "record_tokens"}``; ``stderr`` is the standard error of the ratio estimate over
    records (delta method), ``record_nll`` each record's summed NLL.
    """
    import numpy as np

    from sketchtune_jax.data.records import tokenize_example
    from sketchtune_jax.eval.multiple_choice import sequence_logliks

    records = list(records)[:limit] if limit is not None else list(records)
    if not records:
        raise ValueError("no records to score")
    rows = []
    for i, record in enumerate(records):
        example = tokenize_example(record, tokenizer, seq_len=seq_len, index=i)
        rows.append((example.input_ids, example.loss_mask))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = -sequence_logliks(model, rows, batch_size=batch_size, pad_token_id=pad).astype(np.float64)
    counts = np.asarray([int(mask[1:].sum()) for _, mask in rows], np.float64)
    mean = float(sums.sum() / counts.sum())
    n = len(rows)
    residual = sums - mean * counts
    stderr = float(np.sqrt(n / max(n - 1, 1) * np.sum(residual**2)) / counts.sum())
    return {
        "nll": mean,
        "tokens": int(counts.sum()),
        "n": n,
        "stderr": stderr,
        "record_nll": sums.tolist(),
        "record_tokens": counts.astype(int).tolist(),
    }
