"""What the commands share: the parser class, the flag groups (model with dtype, codebooks and
adapter; JSON output; several processes), loading MODEL, and naming settings by their flags."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from sketchtune_jax._utils.fileio import write_json_atomic
from sketchtune_jax.io import loading
from sketchtune_jax.models.loaded import LoadedModel
from sketchtune_jax.parallel import distributed
from sketchtune_jax.parallel.distributed import DistributedSettings
from sketchtune_jax.settings import add_settings_arguments, dtype_from_name, settings_from_args

DTYPE_CHOICES = ("float32", "bfloat16")


class Parser(argparse.ArgumentParser):
    """Every (sub-)command shows its defaults in ``--help`` and takes ``-v``."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a sub-command's -v adds to the top level's instead of resetting it.
        self.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug lines and tracebacks"
        )


def add_model_args(p: argparse.ArgumentParser, *, applied: bool = False) -> None:
    """MODEL and ``--dtype``; with ``applied`` also ``--codebooks`` and ``--adapter``, applied to it."""
    p.add_argument("model", help="HF directory, GGUF file, sketched directory, or 'smollm2-135m'")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="compute and parameter dtype")
    if applied:
        p.add_argument("--codebooks", help="fine-tuned codebook file to apply to a sketched model first")
        p.add_argument("--adapter", help="LoRA/QLoRA adapter directory (PEFT format) to apply to a dense model")


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", metavar="FILE", help=f"also write {what} to this JSON file")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several processes (hosts)",
        "run the same command in every process, each with its own --process-id; all three or none",
    )
    add_settings_arguments(g, DistributedSettings)


def load(args: argparse.Namespace) -> LoadedModel:
    """MODEL in ``--dtype``, with ``--codebooks`` and ``--adapter`` applied where the command has them."""
    dtype = dtype_from_name(args.dtype)
    return loading.load_any(
        args.model,
        dtype=dtype,
        param_dtype=dtype,
        codebooks=getattr(args, "codebooks", None),
        adapter=getattr(args, "adapter", None),
    )


def write_json(args: argparse.Namespace, result: Any) -> None:
    """``result`` to the ``--json`` file, when one was given."""
    if args.json:
        write_json_atomic(args.json, result)


def flag_namer(args: argparse.Namespace) -> Callable[[str], str]:
    """Names a setting by its flag (``--name-with-dashes``) when ``args`` has one; flags are named
    after the fields they fill (argparse's dest convention)."""
    return lambda name: f"--{name.replace('_', '-')}" if name in vars(args) else name


def error_line(args: argparse.Namespace, error: Exception) -> str:
    """``error`` as the one line the command prints, settings named by their flags."""
    render = getattr(error, "render", None)
    return f"sketchtune {args.command}: error: {render(flag_namer(args)) if render else error}"


def distributed_settings(args: argparse.Namespace) -> DistributedSettings | None:
    """The `DistributedSettings` the flags ask for, or None for one process (checked, nothing started)."""
    return settings_from_args(DistributedSettings, args, build=distributed.distributed_settings)


def start_distributed(args: argparse.Namespace, settings: DistributedSettings | None) -> None:
    """Join the run of several processes ``settings`` describes (nothing for None); a run that
    never assembles ends the process with the error line and status 2."""

    def fail(error: Exception) -> None:
        print(error_line(args, error), file=sys.stderr, flush=True)
        os._exit(2)

    if settings is not None:
        distributed.initialize(
            settings.coordinator,
            settings.num_processes,
            settings.process_id,
            timeout_s=settings.timeout_s,
            on_timeout=fail,
        )
