"""``sketchtune export MODEL --out DIR``: any model the commands take, written as a dense HF
directory (a sketch as its reconstructed weights, an adapter merged). ``convert`` runs the same."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from converters import export_hf
from sketchtune_jax._utils.fileio import check_output_dir
from sketchtune_jax.cli._common import add_json_arg, add_model_args, load, write_json
from sketchtune_jax.train.adapters import read_adapter_settings
from sketchtune_jax.train.lora import merge_lora


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--overwrite`` and ``--json``, as ``export`` and ``convert`` take them."""
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    add_json_arg(p, "what was written")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="write a model as a dense HF directory (a sketch as W_hat, an adapter merged)"
    )
    add_model_args(p, applied=True)
    add_output_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, overwrite=args.overwrite)
    loaded = load(args)
    adapter = getattr(args, "adapter", None)
    model = merge_lora(loaded.model, read_adapter_settings(adapter)) if adapter else loaded.model
    export_hf(model, loaded.config, loaded.tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    sources = {"codebooks": getattr(args, "codebooks", None), "adapter": adapter}
    write_json(args, {"model": args.model, **sources, "out": str(Path(args.out).resolve())})
    return 0
