"""``sketchtune sketch MODEL --calib TEXT --out DIR``: a model's projections sketched into codebooks
and codes (`sketchtune_jax.jobs.sketch_to_dir`), then, with ``--heal-steps``, healed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from sketchtune_jax._utils.reporting import print_table
from sketchtune_jax.cli import heal as heal_command
from sketchtune_jax.cli._common import (
    add_distributed_args,
    add_json_arg,
    add_model_args,
    distributed_settings,
    flag_namer,
    start_distributed,
    write_json,
)
from sketchtune_jax.jobs import heal_to_dir, sketch_to_dir
from sketchtune_jax.jobs.sketch import resumed_sketch_report
from sketchtune_jax.parallel.distributed import is_primary
from sketchtune_jax.settings import (
    SettingError,
    add_settings_arguments,
    named_as_flags,
    require_enabled,
    settings_from_args,
)
from sketchtune_jax.sketch.driver import SketchSettings
from sketchtune_jax.train.heal import HealSettings

# The heal settings ``sketch`` offers, as --heal-<name> flags (the rest follow the sketch's).
HEAL_PREFIX = "heal_"
HEAL_FLAGS = ("steps", "batch_size", "lr", "train_norms")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sketch", help="sketch a model's projections into codebooks and codes")
    add_model_args(p)
    add_settings_arguments(p, SketchSettings, required=("calib",))
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and any unfinished sketch")
    p.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the checkpoint one decoder layer at a time (same result as --no-streaming, "
        "which loads the whole model)",
    )
    p.add_argument(
        "--mesh",
        help="sketch on a device mesh, e.g. data=8 or data=2,model=4 (sizes multiply to the device count): "
        "calibration samples split over data, every projection's rows over all devices",
    )
    add_json_arg(p, "the report")
    add_distributed_args(p)
    g = p.add_argument_group("healing after the sketch", "against MODEL on the calibration text (sketchtune heal)")
    add_settings_arguments(g, HealSettings, prefix=HEAL_PREFIX, only=HEAL_FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(SketchSettings, args)
    # The heal's settings, built (and so checked) before the sketch, which may take an hour.
    heal = settings_from_args(HealSettings, args, prefix=HEAL_PREFIX, seq_len=settings.seq_len, seed=settings.seed)
    with named_as_flags(HealSettings, args, prefix=HEAL_PREFIX):
        require_enabled(heal, "steps", HEAL_FLAGS)
    distributed = distributed_settings(args)
    if distributed is not None and heal.steps:
        with named_as_flags(HealSettings, args, prefix=HEAL_PREFIX):
            raise SettingError("steps", "cannot run over several processes (for now); heal afterwards in one process")
    start_distributed(args, distributed)
    hint = settings.recovery_hint(heal_steps=heal.steps)
    if hint is not None:
        print(f"hint: {hint.render(flag_namer(args))}", file=sys.stderr)
    resumed = None if args.overwrite or not heal.steps else resumed_sketch_report(args.out, settings)
    report = resumed or sketch_to_dir(
        args.model,
        args.out,
        settings,
        dtype=args.dtype,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        streaming=args.streaming,
        mesh=args.mesh,
    )
    if not is_primary():
        return 0
    write_json(args, report)
    _print_report(args, settings, report)
    if heal.steps:
        heal = dataclasses.replace(heal, calib_range=settings.calib_range)
        record = heal_to_dir(args.out, args.model, settings.calib, args.out, heal, dtype=args.dtype, overwrite=True)
        print_table(f"healed {args.out} against {args.model}", heal_command.summary(record))
    return 0


def _print_report(args: argparse.Namespace, settings: SketchSettings, report: dict[str, Any]) -> None:
    worst = sorted(report["modules"], key=lambda r: -r["rel_output_error"])[:5]
    rows = [
        {"layer": r["layer"], "module": r["module"], "error": r["rel_output_error"], "s": r["seconds"]} for r in worst
    ]
    print_table("largest relative output errors", rows)
    print_table(
        f"sketched {args.model} -> {args.out}",
        {
            "bits": settings.bits,
            "groups per row": settings.groups_per_row,
            "modules": len(report["modules"]),
            "mean relative output error": report["mean_rel_output_error"],
            "seconds": report["seconds"],
        },
    )
