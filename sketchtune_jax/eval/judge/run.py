"""Run a pairwise judgement: answer every question with both models, ask the judge in both orders.

Generation is injected (an `Answerer` per model), as in `sketchtune_jax.eval.tasks`, so the
loop is testable without a model; `ModelAnswerer` is the one the command line uses.
Everything already in the output directory (answers, verdicts) is reused, not redone.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sketchtune_jax._utils.reporting import progress
from sketchtune_jax.eval.judge.client import JudgeClient, JudgeError, JudgeUnavailable
from sketchtune_jax.eval.judge.prompts import ORDERS, Question, judge_messages, pair_outcome, parse_verdict
from sketchtune_jax.eval.judge.stats import summarize
from sketchtune_jax.eval.judge.store import JudgeStore

log = logging.getLogger(__name__)

Answerer = Callable[[Sequence[Question]], list[str]]
SIDES = ("a", "b")


@dataclasses.dataclass(frozen=True)
class Side:
    """One model of the comparison, as `sketchtune generate` takes it: a model (HF directory, GGUF
    file, sketched directory or built-in name), fine-tuned ``codebooks`` for a sketch, or a LoRA
    ``adapter`` directory for a dense model."""

    model: str
    codebooks: str | None = None
    adapter: str | None = None

    def check(self, name: str) -> None:
        """Refuse, before any work, a model, codebook file or adapter that is not there or does not
        fit; ``name`` (``"a"`` or ``"b"``) is the side the message names."""
        from converters import BUILTIN_MODELS
        from sketchtune_jax.io.sketched_dir import is_sketched_dir

        path = Path(self.model)
        hub_name = self.model.count("/") == 1 and not self.model.startswith((".", "/", "~"))
        if self.model not in BUILTIN_MODELS and not path.exists() and not hub_name:
            raise FileNotFoundError(f"--model-{name}: {self.model} not found (a directory, .gguf file or smollm2-135m)")
        if self.codebooks:
            if not Path(self.codebooks).is_file():
                raise FileNotFoundError(f"--codebooks-{name}: {self.codebooks} not found")
            if not is_sketched_dir(self.model):
                raise ValueError(f"--codebooks-{name} applies to a sketched model, and {self.model} is not one")
        if self.adapter:
            if not Path(self.adapter).is_dir():
                raise FileNotFoundError(f"--adapter-{name}: {self.adapter} is not a directory")
            if is_sketched_dir(self.model):
                raise ValueError(f"--adapter-{name} applies to a dense model, and {self.model} is sketched")

    def identity(self) -> dict[str, str | None]:
        """The side with every path made absolute (a run may resume from another directory)."""

        def absolute(p: str | None) -> str | None:
            return str(Path(p).resolve()) if p and Path(p).exists() else p

        return {"model": absolute(self.model), "codebooks": absolute(self.codebooks), "adapter": absolute(self.adapter)}


class ModelAnswerer:
    """Answers questions with ``side``'s model, loaded (as `sketchtune generate` loads it) on the
    first call and released by `close`.

    Greedy decoding of at most ``max_new_tokens``; ``chat`` wraps each question in the
    tokenizer's chat template, otherwise the model sees the Alpaca prompt it was tuned on.
    """

    def __init__(self, side: Side, *, max_new_tokens: int, chat: bool = False, dtype: str = "float32"):
        self.side = side
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        self.dtype = dtype
        self._loaded = None

    def __call__(self, questions: Sequence[Question]) -> list[str]:
        from sketchtune_jax.io.loading import load_any
        from sketchtune_jax.models.generate import generate_text
        from sketchtune_jax.settings import dtype_from_name

        if self._loaded is None:
            dtype = dtype_from_name(self.dtype)
            self._loaded = load_any(
                self.side.model,
                dtype=dtype,
                param_dtype=dtype,
                codebooks=self.side.codebooks,
                adapter=self.side.adapter,
            )
        prompts = [q.text if self.chat else q.alpaca for q in questions]
        outs = generate_text(
            self._loaded.model,
            self._loaded.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            chat=self.chat,
        )
        return [o.strip() for o in outs]

    def close(self) -> None:
        """Release the model."""
        self._loaded = None


def run_judge(
    questions: Sequence[Question],
    answerers: Mapping[str, Answerer],
    client: JudgeClient,
    store: JudgeStore,
    *,
    batch_size: int = 8,
    concurrency: int = 4,
    confidence: float = 0.95,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Judge model ``"a"`` against model ``"b"`` on ``questions``; returns the summary.

    Missing answers are generated ``batch_size`` questions at a time and saved as each batch
    ends; then every (question, order) without a saved verdict is asked, ``concurrency`` at a
    time, each verdict saved as it arrives. The endpoint is checked (`JudgeClient.check`)
    before any model is loaded, and not at all when everything is already saved.

    Raises:
        JudgeError: the judge cannot be used as set up (unreachable, key refused, request rejected).
        JudgeUnavailable: the judge kept failing after its retries.
        Either way every verdict that arrived is saved, and the same call goes on from there.
    """
    if not questions:
        raise ValueError("no questions to judge")
    if batch_size <= 0 or concurrency <= 0:
        raise ValueError(f"batch size and concurrency must be > 0, got {batch_size} and {concurrency}")
    answers = {side: store.answers(side) for side in SIDES}
    saved = store.verdicts()
    missing = {side: [q for q in questions if q.id not in answers[side]] for side in SIDES}
    if missing["a"] or missing["b"] or _jobs(questions, answers, saved):
        client.check()
    for side in SIDES:
        _answer(side, missing[side], answers[side], answerers[side], store, batch_size, show_progress)
    jobs = _jobs(questions, answers, saved)
    asked = _ask(jobs, answers, client, store, saved, concurrency, show_progress)
    pairs, outcomes, inconsistent = [], [], 0
    for q in questions:
        verdicts = {order: saved[(q.id, order, _key(q, answers, order))] for order in ORDERS}
        outcome, flipped = pair_outcome(verdicts["ab"]["verdict"], verdicts["ba"]["verdict"])
        outcomes.append(outcome)
        inconsistent += flipped
        pairs.append(
            {
                "id": q.id,
                "question": q.text,
                "answer_a": answers["a"][q.id],
                "answer_b": answers["b"][q.id],
                "outcome": outcome,
                "inconsistent": flipped,
                **{f"verdict_{o}": verdicts[o]["verdict"] for o in ORDERS},
                **{f"judgment_{o}": verdicts[o]["judgment"] for o in ORDERS},
            }
        )
    summary = summarize(outcomes, inconsistent=inconsistent, confidence=confidence)
    summary.update(requests=2 * len(questions), asked_this_run=asked, judge_model=client.model)
    store.write_results(pairs, summary)
    return summary


def _key(q: Question, answers: Mapping[str, Mapping[str, str]], order: str) -> str:
    """A hash of what the judge sees for ``q`` in ``order``: a saved verdict is reused only for it."""
    first, second = (answers["a"][q.id], answers["b"][q.id])[:: 1 if order == "ab" else -1]
    return hashlib.sha256(json.dumps([q.text, first, second]).encode()).hexdigest()[:16]


def _jobs(questions, answers, saved) -> list[tuple[Question, str, str]]:
    """``(question, order, key)`` of every request still to ask (questions answered by both models)."""
    return [
        (q, order, key)
        for q in questions
        if q.id in answers["a"] and q.id in answers["b"]
        for order in ORDERS
        if (q.id, order, key := _key(q, answers, order)) not in saved
    ]


def _answer(side, questions, answers, answerer, store, batch_size, show_progress) -> None:
    if not questions:
        return
    batches = [questions[i : i + batch_size] for i in range(0, len(questions), batch_size)]
    try:
        for batch in progress(batches, desc=f"answers of model {side.upper()}", disable=not show_progress):
            outs = answerer(batch)
            if len(outs) != len(batch):
                raise ValueError(f"model {side.upper()} gave {len(outs)} answers to {len(batch)} questions")
            store.add_answers(side, [{"id": q.id, "question": q.text, "answer": a} for q, a in zip(batch, outs)])
            answers.update((q.id, a) for q, a in zip(batch, outs))
    finally:
        close = getattr(answerer, "close", None)
        if close:
            close()


def _ask(jobs, answers, client, store, saved, concurrency, show_progress) -> int:
    """Ask ``jobs`` ``concurrency`` at a time, saving each verdict as it comes; the number asked."""
    if not jobs:
        return 0
    error: JudgeError | JudgeUnavailable | None = None
    pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
    futures = {}
    for q, order, key in jobs:
        first, second = ("a", "b") if order == "ab" else ("b", "a")
        messages = judge_messages(q.text, answers[first][q.id], answers[second][q.id])
        futures[pool.submit(client.ask, messages)] = (q, order, key)
    asked = 0
    finished = False
    try:
        for future in progress(
            cf.as_completed(futures), desc="judge requests", total=len(futures), disable=not show_progress
        ):
            if future.cancelled():
                continue
            q, order, key = futures[future]
            try:
                reply = future.result()
            except (JudgeError, JudgeUnavailable) as e:
                # Stop asking, but keep every reply already on its way: those are paid for.
                if error is None:
                    error = e
                    client.stop()
                    for f in futures:
                        f.cancel()
                continue
            record = {
                "id": q.id,
                "order": order,
                "key": key,
                "verdict": parse_verdict(reply.text),
                "judgment": reply.text,
                "usage": reply.usage,
            }
            if reply.text is None:
                record["body"] = reply.body
            store.add_verdict(record)
            saved[(q.id, order, key)] = record
            asked += 1
        finished = True
    finally:
        if not finished:
            # Interrupted: no more retries, so the worker threads end with their current request.
            client.stop()
        pool.shutdown(wait=False, cancel_futures=True)
    if error is not None:
        raise type(error)(
            f"{error}; {len(saved)} verdicts are saved in {store.path}, run the same command again to go on"
        )
    return asked


__all__ = ["Answerer", "ModelAnswerer", "Side", "run_judge"]
