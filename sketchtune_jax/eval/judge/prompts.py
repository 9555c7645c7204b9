"""Questions for a pairwise judgement, the MT-Bench pairwise judge prompt, and reading its verdicts.

A question file is JSON or JSONL instruction records (``instruction`` and an optional
``input``, as the training data), a JSON list of strings, or plain text with one question
a line. Each question gets a content id (a hash of its text), so a cache keyed by id
stays right when the file is reordered or extended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Any, Literal

from sketchtune_jax.data.prompts import format_prompt
from sketchtune_jax.data.records import DataError, read_json_records

log = logging.getLogger(__name__)

# The "pair-v2" prompt of MT-Bench (Zheng et al., 2023, "Judging LLM-as-a-Judge"), the judge
# prompt of the SketchTune paper's instruction-following comparisons.
PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows the "
    "user's instructions and answers the user's question better. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their "
    "responses. Begin your evaluation by comparing the two responses and provide a short explanation. "
    "Avoid any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your evaluation. Do "
    "not favor certain names of the assistants. Be as objective as possible. After providing your "
    'explanation, output your final verdict by strictly following this format: "[[A]]" if assistant A is '
    'better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
PAIRWISE_USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)

Verdict = Literal["A", "B", "tie", "unparsed"]
Outcome = Literal["win", "loss", "tie", "unparsed"]
# Both orders a pair is shown in: "ab" shows model A's answer first, "ba" model B's.
ORDERS = ("ab", "ba")

_VERDICT = re.compile(r"\[\[([ABC])\]\]")


@dataclasses.dataclass(frozen=True)
class Question:
    """One question: ``id`` (12 hex digits of its text's SHA-256), the ``text`` the judge and a chat
    model see, and the ``alpaca`` prompt (the training template) an instruction-tuned sketch sees."""

    id: str
    text: str
    alpaca: str


def read_questions(path: str | os.PathLike, *, limit: int | None = None) -> list[Question]:
    """The questions of ``path`` in file order, duplicates dropped, the first ``limit`` of them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a record is neither a string nor an object with a string ``instruction``,
            or the file holds no question.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head[:1] in ("[", "{"):
        items: list[Any] = read_json_records(path)
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a list of questions, found a {type(items).__name__}")
    else:
        with open(path, encoding="utf-8") as f:
            items = [line.strip() for line in f if line.strip()]
    questions: dict[str, Question] = {}
    for index, item in enumerate(items):
        question = _question(item, index, path)
        if question.id in questions:
            log.info("%s: question %d repeats an earlier one and is judged once", path, index)
            continue
        questions[question.id] = question
    if not questions:
        raise DataError(f"no questions in {path}")
    return list(questions.values())[:limit]


def _question(item: Any, index: int, path: str) -> Question:
    if isinstance(item, str):
        instruction, extra = item, ""
    elif isinstance(item, dict) and isinstance(item.get("instruction"), str):
        instruction, extra = item["instruction"], item.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{path}: record {index}: field 'input' is a {type(extra).__name__}, not a string")
    else:
        found = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise DataError(
            f"{path}: record {index} is not a question: need a string or an object with a string "
            f"'instruction' (and optional 'input'), found {found}"
        )
    if not instruction.strip():
        raise DataError(f"{path}: record {index} has an empty instruction")
    text = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    return Question(
        id=hashlib.sha256(text.encode()).hexdigest()[:12],
        text=text,
        alpaca=format_prompt(instruction, extra),
    )


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat-completions ``messages`` asking which of two answers to ``question`` is better."""
    user = PAIRWISE_USER.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(judgment: str | None) -> Verdict:
    """``"A"``, ``"B"`` or ``"tie"`` from the last ``[[A]]``/``[[B]]``/``[[C]]`` of a judgment
    (the prompt asks for the verdict after the explanation); ``"unparsed"`` when there is none."""
    found = _VERDICT.findall(judgment or "")
    if not found:
        return "unparsed"
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def pair_outcome(verdict_ab: Verdict, verdict_ba: Verdict) -> tuple[Outcome, bool]:
    """Model A's outcome over both orders, and whether the two verdicts disagreed.

    ``verdict_ab`` judged model A's answer shown first, ``verdict_ba`` shown second. A win or
    loss counts only when both orders agree; a verdict that flips with the order is a tie
    (MT-Bench's rule against position bias). Either verdict unparsed makes the pair unparsed.
    """
    if "unparsed" in (verdict_ab, verdict_ba):
        return "unparsed", False
    first = {"A": "win", "B": "loss", "tie": "tie"}[verdict_ab]
    second = {"A": "loss", "B": "win", "tie": "tie"}[verdict_ba]
    if first == second:
        return first, False
    return "tie", True
