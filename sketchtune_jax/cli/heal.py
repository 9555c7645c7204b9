"""``sketchtune heal SKETCH --teacher MODEL --calib TEXT --steps N --out DIR``: a sketch's codebooks
distilled from the dense model (`sketchtune_jax.jobs.heal_to_dir`)."""

from __future__ import annotations

import argparse
from typing import Any

from sketchtune_jax._utils.reporting import print_table
from sketchtune_jax.cli._common import add_json_arg, add_model_args, write_json
from sketchtune_jax.jobs import heal_to_dir
from sketchtune_jax.settings import add_settings_arguments, settings_from_args
from sketchtune_jax.train.heal import HealSettings

# What a heal record's table shows, in this order (``sketch --heal-steps`` shows the same).
SUMMARY_KEYS = ("steps", "windows", "first_kl", "final_kl", "ppl_before", "ppl_after", "seconds", "cpu_seconds")


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The figures of a heal record (`heal_to_dir`'s) that the command prints."""
    return {k: record[k] for k in SUMMARY_KEYS if k in record}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("heal", help="distil a sketch's codebooks from the dense model (KL on generic text)")
    add_model_args(p)
    p.add_argument("--teacher", required=True, help="the dense model the sketch was made from")
    p.add_argument("--calib", required=True, help="text/JSON/JSONL file, hf:NAME[:CONFIG]:SPLIT, or 'self'")
    p.add_argument("--out", required=True, help="output sketched directory (SKETCH itself with --overwrite)")
    add_settings_arguments(p, HealSettings, required=("steps",))
    p.add_argument("--eval-text", help="also measure perplexity on this held-out text before and after")
    p.add_argument(
        "--allow-sketched-teacher", action="store_true", help="accept a sketched teacher (it passes its own errors on)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out and discard an unfinished heal (in place: permits it; an unfinished heal resumes)",
    )
    add_json_arg(p, "the heal record")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(HealSettings, args)
    settings.require_steps()
    record = heal_to_dir(
        args.model,
        args.teacher,
        args.calib,
        args.out,
        settings,
        dtype=args.dtype,
        eval_text=args.eval_text,
        allow_sketched_teacher=args.allow_sketched_teacher,
        overwrite=args.overwrite,
    )
    write_json(args, record)
    print_table(f"healed {args.model} against {args.teacher} -> {args.out}", summary(record))
    return 0
