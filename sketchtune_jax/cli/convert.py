"""``sketchtune convert MODEL --out DIR``: a model written as a Hugging Face directory (`export`
without codebooks or an adapter to apply)."""

from __future__ import annotations

from typing import Any

from sketchtune_jax.cli import export
from sketchtune_jax.cli._common import add_model_args

run = export.run


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("convert", help="write a model as a Hugging Face directory")
    add_model_args(p)
    export.add_output_args(p)
    p.set_defaults(func=run)
