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
from sketchtune_jax.jobs import finetune_to_dir
from sketchtune_jax.parallel.distributed import is_primary
from sketchtune_jax.settings import SettingError, add_settings_arguments, named_as_flags, settings_from_args
from sketchtune_jax.train.config import FinetuneSettings, TrainConfig
from sketchtune_jax.train.lora import LoraSettings
from sketchtune_jax.train.methods import FinetuneMethod

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
    method = _method(args, job, config.seed)
    distributed = distributed_settings(args)
    if distributed is not None and method is not None and method.name != "sketch":
        raise SettingError("method", f"{method.name} cannot run over several processes (for now); use sketch")
    start_distributed(args, distributed)
    summary = finetune_to_dir(
        args.model,
        args.data,
        args.out,
        config=config,
        text=args.text,
        text_range=job.text_range,
        method=method,
        auto_lora_rank=job.lora_rank == "auto",
        lora_alpha=job.lora_alpha,
        codebooks=args.codebooks,
        dtype=args.dtype,
        val_fraction=job.val_fraction,
        pad_multiple=job.pad_multiple,
        template=job.template,
        resume=args.resume,
        overwrite=args.overwrite,
        mesh=args.mesh,
    )
    if is_primary():
        print_table(f"fine-tuned {args.model} on {args.data or args.text} ({summary['method']})", summary)
        write_json(args, summary)
    return 0


def _method(args: argparse.Namespace, job: FinetuneSettings, seed: int) -> FinetuneMethod | None:
    """The `FinetuneMethod` the flags ask for (None: the model's default, checked by the job)."""
    if args.lora_init != "default" and job.method != "qlora":
        # Checked here: sketch and full build no LoraSettings to refuse it, and lora the same in one line.
        with named_as_flags(LoraSettings, args, prefix=LORA_PREFIX):
            problem = f"{args.lora_init} initialises a QLoRA adapter; add {{method}} qlora"
            raise SettingError("init", problem, ("method",))
    if job.method is None:
        return None
    if job.method not in ("lora", "qlora"):
        return FinetuneMethod(job.method)
    # Rank and alpha are the job's (FinetuneSettings: 'auto', 2 x rank), resolved with the model.
    lora = settings_from_args(
        LoraSettings,
        args,
        prefix=LORA_PREFIX,
        rank=1 if job.lora_rank == "auto" else job.lora_rank,
        alpha=1.0 if job.lora_alpha is None else job.lora_alpha,
        qtype=job.qlora_qtype if job.method == "qlora" else None,
        seed=seed,
    )
    return FinetuneMethod(job.method, lora=lora)
