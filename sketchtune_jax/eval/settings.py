"""How a model is evaluated: `PerplexitySettings` (``sketchtune eval ppl``) and `TaskSettings`
(``sketchtune eval math|commonsense``). Each holds its defaults and help once and is checked when
built, before a model is loaded."""

from __future__ import annotations

import dataclasses
from typing import Literal

from sketchtune_jax.settings import fraction_range, require, require_positive, setting, show_fraction_range
from sketchtune_jax.train.config import TEMPLATE_HELP

# Tokens an answer needs: a worked solution for math, one word for commonsense.
_NEW_TOKENS = {"math": 256, "commonsense": 32}


@dataclasses.dataclass(frozen=True)
class PerplexitySettings:
    """Perplexity over non-overlapping windows of a text (`sketchtune_jax.eval.perplexity.perplexity`)."""

    seq_len: int = setting(512, "tokens per window")
    max_windows: int | None = setting(20, "windows measured, at most (None: the whole text)")
    batch_size: int = setting(4, "windows per forward pass")
    text_range: tuple[float, float] = setting(
        (0.0, 1.0),
        "read only this fraction of the text, e.g. 0.25:0.5 for validation windows apart from the test ones",
        show=show_fraction_range,
    )

    def __post_init__(self):
        object.__setattr__(self, "text_range", fraction_range(self.text_range, "text_range"))
        require(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        require_positive(self, "batch_size")
        if self.max_windows is not None:
            require_positive(self, "max_windows")


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """Accuracy on a math or commonsense task (`sketchtune_jax.eval.tasks.evaluate_task`, or
    `sketchtune_jax.eval.multiple_choice.evaluate_multiple_choice` with ``scoring="loglik"``)."""

    limit: int | None = setting(None, "evaluate only the first N records (None: all)")
    batch_size: int = setting(8, "prompts (or prompt-choice rows) per batch")
    max_new_tokens: int | None = setting(None, "tokens generated per answer (None: 256 for math, 32 for commonsense)")
    task_name: str | None = setting(None, "task or answer kind (None: from the file name)")
    reference_rule: bool = setting(
        False, "extract answers exactly as the reference does (last number), not 'The answer is' first"
    )
    template: Literal["alpaca", "chat"] = setting("alpaca", TEMPLATE_HELP)
    scoring: Literal["generate", "loglik"] = setting(
        "generate", "generate and extract the answer, or pick the choice of highest log-likelihood"
    )
    continuation: Literal["response", "option", "question"] = setting(
        "response",
        "loglik: score 'the correct answer is answerK', the option's text, or the option's text after "
        "'Question: ...\\nAnswer:' (lm-evaluation-harness's ARC format)",
    )

    def __post_init__(self):
        require_positive(self, "batch_size")
        for name in ("limit", "max_new_tokens"):
            if getattr(self, name) is not None:
                require_positive(self, name)
        require(self.template in ("alpaca", "chat"), "template", f"must be alpaca or chat, got {self.template!r}")

    def new_tokens(self, task: str) -> int:
        """Tokens generated per answer of ``task`` (``math`` or ``commonsense``)."""
        return self.max_new_tokens or _NEW_TOKENS[task]
