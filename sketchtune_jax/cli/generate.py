"""``sketchtune generate MODEL --prompt TEXT``: text from one or more prompts."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sketchtune_jax.cli._common import add_json_arg, add_model_args, load, write_json
from sketchtune_jax.data.prompts import TEMPLATES, format_prompt
from sketchtune_jax.models.generate import GenerateSettings, generate_text
from sketchtune_jax.settings import add_settings_arguments, settings_from_args


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text from one or more prompts")
    add_model_args(p, applied=True)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    add_settings_arguments(p, GenerateSettings)
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        help="wrap each prompt in the Alpaca prompt or the tokenizer's chat template (default: as given)",
    )
    p.add_argument("--chat", dest="template", action="store_const", const="chat", help="same as --template chat")
    add_json_arg(p, "the prompts and outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(GenerateSettings, args)
    loaded = load(args)
    prompts = [format_prompt(p) for p in args.prompt] if args.template == "alpaca" else args.prompt
    chat = args.template == "chat"
    outs = generate_text(loaded.model, loaded.tokenizer, prompts, **dataclasses.asdict(settings), chat=chat)
    for prompt, out in zip(args.prompt, outs):
        print(f"### {prompt}\n{out}\n")
    outputs = [{"prompt": p, "output": o} for p, o in zip(args.prompt, outs)]
    write_json(args, {"model": args.model, "settings": dataclasses.asdict(settings), "outputs": outputs})
    return 0
