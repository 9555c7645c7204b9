"""``sketchtune finetune MODEL --data FILE|--text FILE --out RUN``: a sketch's codebooks, or a dense
model by LoRA, QLoRA or fully, fine-tuned (`sketchtune_jax.jobs.finetune_to_dir`)."""

from __future__ import annotations

import argparse
from typing import Any

from sketchtune_jax._utils.reporting import print_table
from sketchtune_jax.cli._common import (
    add_distributed_args,
    add_json_arg,
    add_model_args,
    distributed_settings,
    start_distributed,
    write_json,
)
from sketchtune_jax.io.sketched_dir import is_sketched_dir
from sketchtune_jax.jobs import finetune_to_dir
from sketchtune_jax.parallel.distributed import is_primary
from sketchtune_jax.settings import SettingError, add_settings_arguments, named_as_flags, settings_from_args
from sketchtune_jax.train.config import FinetuneSettings, TrainConfig
from sketchtune_jax.train.lora import LoraSettings
from sketchtune_jax.train.methods import method_for

# The adapter settings as --lora-<name> flags (a field's own flag, e.g. --qlora-tile-size, aside).
LORA_PREFIX = "lora_"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a sketch's codebooks, or a dense model by LoRA, QLoRA or fully"
    )
    add_model_args(p)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="JSON/JSONL records {instruction, input, output}; the response is scored")
    data.add_argument(
        "--text",
        help="plain text (a .txt, JSON/JSONL or hf:NAME[:CONFIG]:SPLIT source) cut into packed windows of "
        "--seq-len tokens; every token is scored (language modelling)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory (logs, checkpoints, codebooks); must be empty unless --resume or --overwrite",
    )
    p.add_argument("--codebooks", help="start from these fine-tuned codebooks")
    add_settings_arguments(p, FinetuneSettings)
    add_settings_arguments(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    add_settings_arguments(
        p.add_argument_group("LoRA and QLoRA adapters (LoraSettings)"), LoraSettings, prefix=LORA_PREFIX
    )
    p.add_argument(
        "--mesh",
        help="train on a device mesh, e.g. data=2,model=4 (sizes multiply to the device count; sketch only): "
        "batches split over data, projections over model",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (same batch size, seed, seq len)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    add_json_arg(p, "the run's summary")
    add_distributed_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    job = settings_from_args(FinetuneSettings, args)
    config = settings_from_args(TrainConfig, args, compute_dtype=None if args.dtype == "float32" else args.dtype)
    # Rank, alpha and the QLoRA base are the job's (FinetuneSettings); the rest are --lora-* flags.
    qtype = job.qlora_qtype if job.method == "qlora" else None
    lora = settings_from_args(LoraSettings, args, prefix=LORA_PREFIX, rank=1, alpha=1.0, qtype=qtype, seed=config.seed)
    distributed = distributed_settings(args)
    if distributed is not None and job.method not in (None, "sketch"):
        raise SettingError("method", f"{job.method} cannot run over several processes (for now); use sketch")
    start_distributed(args, distributed)
    with named_as_flags(LoraSettings, args, prefix=LORA_PREFIX):
        method_for(job, lora, sketched=is_sketched_dir(args.model), model=args.model)
    summary = finetune_to_dir(
        args.model,
        args.out,
        config,
        job,
        data=args.data,
        text=args.text,
        lora=lora,
        codebooks=args.codebooks,
        dtype=args.dtype,
        resume=args.resume,
        overwrite=args.overwrite,
        mesh=args.mesh,
    )
    if is_primary():
        print_table(f"fine-tuned {args.model} on {args.data or args.text} ({summary['method']})", summary)
        write_json(args, summary)
    return 0
