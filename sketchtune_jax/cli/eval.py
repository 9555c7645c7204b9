"""``sketchtune eval ppl|math|commonsense|judge``: perplexity on a text, accuracy on a task (by
generation or, ``--scoring loglik``, by log-likelihood), or a pairwise judgement
(`sketchtune_jax.eval.judge.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sketchtune_jax._utils.fileio import write_json_atomic
from sketchtune_jax._utils.reporting import print_table
from sketchtune_jax.cli._common import add_json_arg, add_model_args, load, write_json
from sketchtune_jax.data.prompts import check_template
from sketchtune_jax.data.records import read_json_records
from sketchtune_jax.data.text import read_text, text_fraction
from sketchtune_jax.eval.held_out import calibration_overlap
from sketchtune_jax.eval.judge.cli import add_judge_parser
from sketchtune_jax.eval.multiple_choice import check_records, evaluate_multiple_choice
from sketchtune_jax.eval.perplexity import perplexity
from sketchtune_jax.eval.settings import PerplexitySettings, TaskSettings
from sketchtune_jax.eval.tasks import evaluate_task
from sketchtune_jax.models.generate import generate_text
from sketchtune_jax.settings import add_settings_arguments, settings_from_args


def add_parser(subparsers: Any) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a model").add_subparsers(dest="task", required=True)
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    add_model_args(p, applied=True)
    p.add_argument("--text", required=True, help="a text file, or hf:NAME[:CONFIG]:SPLIT")
    add_settings_arguments(p, PerplexitySettings)
    add_json_arg(p)
    p.set_defaults(func=run)
    for task in ("math", "commonsense"):
        p = ev.add_parser(task, help=f"{task} accuracy: generate, extract the answer, score")
        add_model_args(p, applied=True)
        p.add_argument("--data", required=True, help="JSON records {instruction, input, answer}")
        # Log-likelihood scoring chooses among a record's options: commonsense only.
        add_settings_arguments(p, TaskSettings, skip=() if task == "commonsense" else ("scoring", "continuation"))
        p.add_argument("--out", help="directory for per-item predictions (JSONL) and the summary")
        add_json_arg(p, "the summary")
        p.set_defaults(func=run)
    add_judge_parser(ev)


def run(args: argparse.Namespace) -> int:
    return _perplexity(args) if args.task == "ppl" else _task(args)


def _perplexity(args: argparse.Namespace) -> int:
    settings = settings_from_args(PerplexitySettings, args)
    text = text_fraction(read_text(args.text), settings.text_range)
    loaded = load(args)
    windows = {"seq_len": settings.seq_len, "max_windows": settings.max_windows}
    overlap = calibration_overlap(
        args.model, args.text, text, loaded.tokenizer, **windows, text_range=settings.text_range
    )
    if overlap:
        print(f"warning: {overlap}", file=sys.stderr)
    result = perplexity(loaded.model, loaded.tokenizer, text, **windows, batch_size=settings.batch_size)
    out = {"ppl": result.ppl, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s, **result.to_dict()}
    print_table(f"perplexity of {args.model} on {args.text}", out)
    write_json(args, out)
    return 0


def _task(args: argparse.Namespace) -> int:
    """Generate for every record and score the extracted answers, or (``--scoring loglik``) choose
    each answer by log-likelihood."""
    settings = settings_from_args(TaskSettings, args)
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    loglik = settings.scoring == "loglik"
    if loglik:
        records = read_json_records(args.data)[: settings.limit]
        try:
            check_records(records)
        except ValueError as e:
            raise ValueError(f"{args.data}: {e}") from None
    loaded = load(args)
    check_template(settings.template, loaded.tokenizer)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    # Both scorings can share one --out directory without overwriting each other.
    name = Path(args.data).name.split(".")[0] + (".loglik" if loglik else "")
    predictions = Path(args.out) / f"{name}.predictions.jsonl" if args.out else None
    common = {"batch_size": settings.batch_size, "out_jsonl": predictions, "progress": True}
    if loglik:
        summary = evaluate_multiple_choice(
            loaded.model,
            loaded.tokenizer,
            records,
            continuation=settings.continuation,
            template=settings.template,
            **common,
        )
        summary["scoring"] = "loglik"
    else:
        new_tokens = settings.new_tokens(args.task)

        def generate_fn(prompts: list[str]) -> list[str]:
            return generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=new_tokens)

        summary = evaluate_task(
            generate_fn,
            args.data,
            loaded.tokenizer,
            task=settings.task_name,
            limit=settings.limit,
            strict=not settings.reference_rule,
            template=settings.template,
            **common,
        )
    summary["model"] = args.model
    print_table(f"{args.task} accuracy on {args.data}", summary)
    if args.out:
        write_json_atomic(Path(args.out) / f"{name}.summary.json", summary)
    write_json(args, summary)
    return 0
