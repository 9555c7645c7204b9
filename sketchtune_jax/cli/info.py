"""``sketchtune info MODEL``: architecture, parameter count and bytes, and the kernels it runs on."""

from __future__ import annotations

import argparse
from typing import Any

from pallas_kernels import describe
from sketchtune_jax._utils.reporting import print_table
from sketchtune_jax.cli._common import add_json_arg, add_model_args, load, write_json
from sketchtune_jax.io.loading import model_info


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="architecture, parameter count and bytes of a model")
    add_model_args(p)
    add_json_arg(p, "the figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    info = model_info(loaded.model, loaded.config)
    kernels = describe()  # which kernels a sketched layer runs on this machine, and why
    info["kernel_backend"] = f"{kernels['kernel_backend']} ({kernels['reason']})"
    print_table(f"{args.model}", info)
    write_json(args, info)
    return 0
