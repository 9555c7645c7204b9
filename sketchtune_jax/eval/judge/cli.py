"""``sketchtune eval judge``: the command-line flags of a pairwise judgement, and the command.

    sketchtune eval judge --model-a SKETCH --codebooks-a run/codebooks.safetensors --model-b SKETCH \\
        --prompts questions.jsonl --endpoint https://api.openai.com/v1 --judge-model gpt-4o --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

ENDPOINT_ENV = "OPENAI_BASE_URL"
KEY_ENV = "OPENAI_API_KEY"


def add_judge_parser(subparsers: Any) -> None:
    """Add ``judge`` to the ``eval`` sub-commands ``subparsers`` (an argparse sub-parsers action)."""
    p = subparsers.add_parser(
        "judge",
        help="pairwise LLM-as-judge: which of two models answers better, judged in both orders",
        description="Answer every question with model A and model B, ask an OpenAI-compatible judge which "
        "answer is better (MT-Bench's pairwise prompt, both orders: 2 requests per question), and report "
        "model A's wins, losses, ties and win rate. Answers and verdicts are kept in --out; rerunning the "
        "same command resumes without asking again.",
    )
    for side in ("a", "b"):
        p.add_argument(
            f"--model-{side}",
            required=True,
            help=f"model {side.upper()}: HF directory, GGUF file, sketched directory, or 'smollm2-135m'",
        )
        p.add_argument(f"--codebooks-{side}", help=f"fine-tuned codebook file applied to sketch {side.upper()}")
        p.add_argument(
            f"--adapter-{side}", help=f"LoRA/QLoRA adapter directory (PEFT format) applied to model {side.upper()}"
        )
    p.add_argument(
        "--prompts",
        required=True,
        help="questions: JSON/JSONL records {instruction, input}, a JSON list of strings, or one a line",
    )
    p.add_argument("--limit", type=int, help="judge only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="questions answered at once")
    p.add_argument(
        "--chat",
        action="store_true",
        help="ask in the tokenizer's chat template (default: the Alpaca prompt fine-tuning uses)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and parameter dtype")
    p.add_argument("--endpoint", help=f"judge API base, e.g. https://api.openai.com/v1 (default: ${ENDPOINT_ENV})")
    p.add_argument("--api-key", help=f"judge API key (default: ${KEY_ENV}; none for a local server without one)")
    p.add_argument("--judge-model", required=True, help="the judge's model name at the endpoint, e.g. gpt-4o")
    p.add_argument("--judge-max-tokens", type=int, help="longest judgment, in tokens (default: the server's)")
    p.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at once")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one judge request may take")
    p.add_argument("--max-retries", type=int, default=5, help="tries after the first on 429, 5xx and timeouts")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubling after)")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the win rate's Wilson interval")
    p.add_argument("--out", required=True, help="directory for answers, verdicts and results (resumed if it has a run)")
    p.add_argument("--json", help="also write the summary to this JSON file")
    p.set_defaults(func=cmd_eval_judge)


def cmd_eval_judge(args: argparse.Namespace) -> int:
    """Run ``eval judge`` as parsed into ``args``; every setting is checked before any work."""
    from sketchtune_jax._utils.fileio import write_json_atomic
    from sketchtune_jax._utils.reporting import print_table
    from sketchtune_jax.eval.judge.client import JudgeClient
    from sketchtune_jax.eval.judge.prompts import read_questions
    from sketchtune_jax.eval.judge.run import ModelAnswerer, Side, run_judge
    from sketchtune_jax.eval.judge.store import JudgeStore
    from sketchtune_jax.settings import SettingError

    endpoint = args.endpoint or os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise ValueError(f"no judge endpoint: pass --endpoint URL or set {ENDPOINT_ENV}")
    for name in ("limit", "max_new_tokens", "batch_size", "concurrency", "timeout", "judge_max_tokens"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SettingError(name, f"must be > 0, got {value}")
    if args.max_retries < 0 or args.backoff < 0:
        raise SettingError(
            "max_retries", f"and {{backoff}} must be >= 0, got {args.max_retries} and {args.backoff}", ("backoff",)
        )
    if not 0 < args.confidence < 1:
        raise SettingError("confidence", f"must be between 0 and 1, got {args.confidence}")
    sides = {
        s: Side(getattr(args, f"model_{s}"), getattr(args, f"codebooks_{s}"), getattr(args, f"adapter_{s}"))
        for s in ("a", "b")
    }
    for name, side in sides.items():
        side.check(name)
    if sides["a"].identity() == sides["b"].identity():
        raise ValueError("model A and model B are the same model; give them different models, codebooks or adapters")
    questions = read_questions(args.prompts, limit=args.limit)
    client = JudgeClient(
        endpoint,
        args.judge_model,
        api_key=args.api_key or os.environ.get(KEY_ENV),
        timeout_s=args.timeout,
        max_retries=args.max_retries,
        backoff_s=args.backoff,
        max_tokens=args.judge_max_tokens,
        connections=args.concurrency,
    )
    generation = {"max_new_tokens": args.max_new_tokens, "chat": args.chat, "dtype": args.dtype}
    identity = {
        "model_a": sides["a"].identity(),
        "model_b": sides["b"].identity(),
        "generation": generation,
        "judge": {"model": args.judge_model, "max_tokens": args.judge_max_tokens, "temperature": 0.0},
    }
    store = JudgeStore(args.out, identity)
    answerers = {s: ModelAnswerer(side, **generation) for s, side in sides.items()}
    with client:
        summary = run_judge(
            questions,
            answerers,
            client,
            store,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            confidence=args.confidence,
            show_progress=True,
        )
    summary = {"model_a": _describe(sides["a"]), "model_b": _describe(sides["b"]), **summary}
    write_json_atomic(store.path / "summary.json", summary)
    print_table(f"model A against model B, judged by {args.judge_model} ({args.prompts})", _table(summary))
    if summary["unparsed"]:
        print(
            f"note: {summary['unparsed']} pairs have a verdict the judge did not give as [[A]]/[[B]]/[[C]]; "
            f"its words are in {store.path / 'pairs.jsonl'}",
            file=sys.stderr,
        )
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


def _describe(side: Any) -> str:
    extra = f" + codebooks {side.codebooks}" if side.codebooks else f" + adapter {side.adapter}" if side.adapter else ""
    return side.model + extra


def _table(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as the rows a person reads: counts, the win rate and its interval."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    level = f"{100 * summary['confidence']:g}%"
    return {
        "model A": summary["model_a"],
        "model B": summary["model_b"],
        "pairs": summary["pairs"],
        "A wins": summary["wins"],
        "A losses": summary["losses"],
        "ties": f"{summary['ties']} ({summary['inconsistent_ties']} flipped with the order)",
        "unparsed": summary["unparsed"],
        "A win rate": pct(summary["win_rate"]),
        f"{level} interval (Wilson)": f"{pct(summary['win_rate_low'])} - {pct(summary['win_rate_high'])}",
        "judge requests": f"{summary['requests']} ({summary['asked_this_run']} asked this run)",
    }
