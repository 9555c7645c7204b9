"""The ``sketchtune`` command line: a thin layer over the library.

    sketchtune convert MODEL --out DIR
    sketchtune info MODEL
    sketchtune generate MODEL --prompt TEXT --max-new-tokens N
    sketchtune eval ppl MODEL --text FILE --seq-len 512 --max-windows 20 [--json OUT]
    sketchtune sketch MODEL --bits 4 --groups-per-row 4 --calib FILE|hf:NAME|self --nsamples N --seq-len L --out DIR [--mesh data=8]
    sketchtune heal SKETCH --teacher MODEL --calib FILE|self --out DIR --steps N [--lr --batch-size --seq-len ...]
    sketchtune finetune SKETCH --data FILE --out RUN [--epochs --lr --batch-size ... --mesh data=2,model=4 --resume]
    sketchtune finetune MODEL --method qlora --qlora-qtype nf2 --lora-init loftq --text FILE --text-range 0.5:1 --out RUN
    sketchtune sketch|finetune ... --coordinator HOST:PORT --num-processes N --process-id I   (in every process)
    sketchtune eval math|commonsense MODEL --data FILE [--limit N] [--codebooks FILE]
    sketchtune eval commonsense MODEL --data FILE --scoring loglik [--continuation response|option|question]
    sketchtune eval judge --model-a MODEL [--codebooks-a F] --model-b MODEL --prompts FILE --judge-model NAME --out DIR
    sketchtune export SKETCH [--codebooks FILE] --out DIR

MODEL is a Hugging Face directory, a GGUF file, a sketched directory, or the
built-in name ``smollm2-135m``. ``--help`` on any command shows its flags and their defaults.

Exit status: 0 done, 2 refused input (a bad flag, setting or file, said in one line before any
work), 1 a failure while running, 130 interrupted (Ctrl-C). Quiet by default; ``-v`` shows the
library's debug lines and a failure's traceback.

One module a command (``cli/sketch.py``, ...): ``add_parser(subparsers)`` builds its flags, mostly
from the library's settings classes, and ``run(args)`` calls into the library; ``_common`` holds
the flag groups they share.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from sketchtune_jax import __version__
from sketchtune_jax.cli import convert, eval, export, finetune, generate, heal, info, sketch
from sketchtune_jax.cli._common import Parser, error_line

# In the order ``sketchtune --help`` lists them.
COMMANDS = (convert, info, generate, sketch, heal, export, eval, finetune)


def build_parser() -> Parser:
    """The ``sketchtune`` parser: every command of `COMMANDS`, each setting ``func`` to its ``run``."""
    parser = Parser(prog="sketchtune", description=__doc__.split("\n\n")[0])
    parser.set_defaults(verbose=False)
    parser.add_argument("--version", action="version", version=f"sketchtune {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _quiet_other_libraries() -> None:
    """No banners from other libraries (transformers' "PyTorch was not found", for one); set
    before they are imported."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is logged (a redirect or a test's capture made
    after the handler was set up), never to a stream since closed."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _show_library_info(verbose: bool) -> None:
    # The library reports through logging; the command line prints its info lines (debug with -v),
    # once each: not passed on to the root logger, which another library may have set up to print too.
    root = logging.getLogger("sketchtune_jax")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.propagate = False
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (module docstring)."""
    _quiet_other_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_library_info(args.verbose)
    try:
        return args.func(args)
    # SettingError and OutputExistsError among them: rendered with flag names.
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(error_line(args, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any other failure while running: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"{error_line(args, e)} ({type(e).__name__}; -v for the traceback)", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
