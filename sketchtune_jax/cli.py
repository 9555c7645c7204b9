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
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sketchtune_jax.parallel.distributed import DistributedSettings
    from sketchtune_jax.train.config import FinetuneSettings

DTYPE_CHOICES = ("float32", "bfloat16")


class _Parser(argparse.ArgumentParser):
    """Every (sub-)command shows its defaults in ``--help`` and takes ``-v``."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a sub-command's -v adds to the top level's instead of resetting it.
        self.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug lines and tracebacks"
        )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF directory, GGUF file, sketched directory, or 'smollm2-135m'")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="compute and parameter dtype")


def _load(args: argparse.Namespace):
    from sketchtune_jax.io.loading import load_any
    from sketchtune_jax.settings import dtype_from_name

    dtype = dtype_from_name(args.dtype)
    return load_any(
        args.model,
        dtype=dtype,
        param_dtype=dtype,
        codebooks=getattr(args, "codebooks", None),
        adapter=getattr(args, "adapter", None),
    )


def _add_adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="LoRA/QLoRA adapter directory (PEFT format) to apply to a dense model")


def cmd_info(args: argparse.Namespace) -> int:
    from pallas_kernels import describe
    from sketchtune_jax._utils.fileio import write_json_atomic
    from sketchtune_jax._utils.reporting import print_table
    from sketchtune_jax.io.loading import model_info

    loaded = _load(args)
    info = model_info(loaded.model, loaded.config)
    kernels = describe()  # which kernels a sketched layer runs on this machine, and why
    info["kernel_backend"] = f"{kernels['kernel_backend']} ({kernels['reason']})"
    print_table(f"{args.model}", info)
    if args.json:
        write_json_atomic(args.json, info)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sketchtune_jax._utils.fileio import write_json_atomic
    from sketchtune_jax.models.generate import GenerateSettings, generate_text
    from sketchtune_jax.settings import settings_from_args

    settings = settings_from_args(GenerateSettings, args)
    loaded = _load(args)
    prompts = args.prompt
    if args.template == "alpaca":
        from sketchtune_jax.data.prompts import format_prompt

        prompts = [format_prompt(p) for p in prompts]
    chat = args.template == "chat"
    outs = generate_text(loaded.model, loaded.tokenizer, prompts, **dataclasses.asdict(settings), chat=chat)
    for prompt, out in zip(args.prompt, outs):
        print(f"### {prompt}\n{out}\n")
    if args.json:
        outputs = [{"prompt": p, "output": o} for p, o in zip(args.prompt, outs)]
        write_json_atomic(
            args.json, {"model": args.model, "settings": dataclasses.asdict(settings), "outputs": outputs}
        )
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from sketchtune_jax._utils.fileio import write_json_atomic
    from sketchtune_jax._utils.reporting import print_table
    from sketchtune_jax.data.text import read_text, text_fraction
    from sketchtune_jax.eval.held_out import calibration_overlap
    from sketchtune_jax.eval.perplexity import perplexity
    from sketchtune_jax.eval.settings import PerplexitySettings
    from sketchtune_jax.settings import settings_from_args

    settings = settings_from_args(PerplexitySettings, args)
    text = text_fraction(read_text(args.text), settings.text_range)
    loaded = _load(args)
    overlap = calibration_overlap(
        args.model,
        args.text,
        text,
        loaded.tokenizer,
        seq_len=settings.seq_len,
        max_windows=settings.max_windows,
        text_range=settings.text_range,
    )
    if overlap:
        print(f"warning: {overlap}", file=sys.stderr)
    result = perplexity(
        loaded.model,
        loaded.tokenizer,
        text,
        seq_len=settings.seq_len,
        max_windows=settings.max_windows,
        batch_size=settings.batch_size,
    )
    out = {"ppl": result.ppl, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s, **result.to_dict()}
    print_table(f"perplexity of {args.model} on {args.text}", out)
    if args.json:
        write_json_atomic(args.json, out)
    return 0


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several processes (hosts)",
        "run the same command in every process, each with its own --process-id; all three or none",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, which serves there")
    g.add_argument("--num-processes", type=int, help="how many processes take part")
    g.add_argument("--process-id", type=int, help="this process's number, 0 .. num-processes - 1")
    from sketchtune_jax.parallel.distributed import DEFAULT_TIMEOUT_S

    g.add_argument(
        "--distributed-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for the coordinator, and then for all processes to join",
    )


def _distributed_settings(args: argparse.Namespace) -> DistributedSettings | None:
    """The `DistributedSettings` the flags ask for, or None for one process (checked, nothing started)."""
    from sketchtune_jax.parallel.distributed import distributed_settings
    from sketchtune_jax.settings import renamed_settings

    with renamed_settings({"timeout_s": "distributed_timeout"}):
        return distributed_settings(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)


def _start_distributed(args: argparse.Namespace, settings: DistributedSettings | None) -> None:
    """Join the run of several processes ``settings`` describes (nothing for None)."""
    import os

    from sketchtune_jax.parallel.distributed import initialize

    def fail(error: Exception) -> None:
        print(_error_line(args, error), file=sys.stderr, flush=True)
        os._exit(2)

    if settings is not None:
        initialize(
            settings.coordinator,
            settings.num_processes,
            settings.process_id,
            timeout_s=settings.timeout_s,
            on_timeout=fail,
        )


def _is_primary() -> bool:
    from sketchtune_jax.parallel.distributed import is_primary

    return is_primary()


def cmd_sketch(args: argparse.Namespace) -> int:
    from sketchtune_jax._utils.fileio import write_json_atomic
    from sketchtune_jax._utils.reporting import print_table
    from sketchtune_jax.jobs import sketch_to_dir
    from sketchtune_jax.settings import SettingError, settings_from_args
    from sketchtune_jax.sketch.driver import SketchSettings
    from sketchtune_jax.train.heal import HealSettings

    settings = settings_from_args(SketchSettings, args)
    # The heal's settings, built (and so checked) before the sketch, which may take an hour.
    heal = settings_from_args(HealSettings, args, prefix=HEAL_PREFIX, seq_len=settings.seq_len, seed=settings.seed)
    if not heal.steps:
        # A heal flag set away from its default would do nothing without heal steps.
        unused = _changed_settings(HealSettings, heal, HEAL_FLAGS)
        if unused:
            named = ", ".join("{" + HEAL_PREFIX + u + "}" for u in unused)
            mentions = tuple(HEAL_PREFIX + u for u in unused)
            raise SettingError("heal_steps", f"is 0, so {named} would do nothing; give N > 0", mentions)
    distributed = _distributed_settings(args)
    if distributed is not None and heal.steps:
        raise SettingError("heal_steps", "cannot run over several processes (for now); heal afterwards in one process")
    _start_distributed(args, distributed)
    levers = [] if settings.layer_tune_steps else ["--layer-tune-steps 32"]
    # act-order won every held-out comparison at 2 bits (README), by less than the noise at 3.
    levers += ["--act-order"] if settings.bits == 2 and not settings.act_order else []
    if settings.bits < 4 and levers:
        levers += [] if heal.steps else ["--heal-steps"]
        print(
            f"hint: at {settings.bits} bits, {', '.join(levers)} recover much of the loss "
            "to the dense model; see docs/recipes.md",
            file=sys.stderr,
        )
    report = sketch_to_dir(
        args.model,
        args.out,
        settings,
        dtype=args.dtype,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        streaming=args.streaming,
        mesh=args.mesh,
    )
    if not _is_primary():
        return 0
    if args.json:
        write_json_atomic(args.json, report)
    worst = sorted(report["modules"], key=lambda r: -r["rel_output_error"])[:5]
    print_table(
        "largest relative output errors",
        [
            {"layer": r["layer"], "module": r["module"], "error": r["rel_output_error"], "s": r["seconds"]}
            for r in worst
        ],
    )
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
    if heal.steps:
        from dataclasses import replace

        from sketchtune_jax.jobs import heal_to_dir

        record = heal_to_dir(
            args.out,
            args.model,
            settings.calib,
            args.out,
            replace(heal, calib_range=settings.calib_range),
            dtype=args.dtype,
            overwrite=True,
        )
        print_table(f"healed {args.out} against {args.model}", _heal_summary(record))
    return 0


# The heal settings ``sketch --heal-steps`` offers, as --heal-<name> flags.
HEAL_PREFIX = "heal_"
HEAL_FLAGS = ("steps", "batch_size", "lr", "train_norms")


def _changed_settings(cls: type, settings: Any, names: tuple[str, ...]) -> list[str]:
    """The fields of ``names`` whose value in ``settings`` differs from ``cls``'s default."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return [n for n in names if getattr(settings, n) != defaults[n]]


def _heal_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "windows", "first_kl", "final_kl", "ppl_before", "ppl_after", "seconds", "cpu_seconds")
    return {k: record[k] for k in keys if k in record}


def cmd_heal(args: argparse.Namespace) -> int:
    from sketchtune_jax._utils.fileio import write_json_atomic
    from sketchtune_jax._utils.reporting import print_table
    from sketchtune_jax.jobs import heal_to_dir
    from sketchtune_jax.settings import settings_from_args
    from sketchtune_jax.train.heal import HealSettings

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
    if args.json:
        write_json_atomic(args.json, record)
    print_table(f"healed {args.model} against {args.teacher} -> {args.out}", _heal_summary(record))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``convert`` and ``export``: any model the commands take, written as a dense HF directory."""
    from converters import export_hf
    from sketchtune_jax._utils.fileio import check_output_dir

    check_output_dir(args.out, overwrite=args.overwrite)
    loaded = _load(args)
    model = loaded.model
    if getattr(args, "adapter", None):
        from sketchtune_jax.train.adapters import read_adapter_settings
        from sketchtune_jax.train.lora import merge_lora

        model = merge_lora(model, read_adapter_settings(args.adapter))
    export_hf(model, loaded.config, loaded.tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    if args.json:
        from sketchtune_jax._utils.fileio import write_json_atomic

        sources = {"codebooks": getattr(args, "codebooks", None), "adapter": getattr(args, "adapter", None)}
        write_json_atomic(args.json, {"model": args.model, **sources, "out": str(Path(args.out).resolve())})
    return 0


def _finetune_method(args: argparse.Namespace, job: FinetuneSettings, seed: int):
    """The `FinetuneMethod` the flags ask for (None: the model's default, checked by the workflow)."""
    from sketchtune_jax.settings import SettingError, settings_from_args
    from sketchtune_jax.train.lora import LoraSettings
    from sketchtune_jax.train.methods import FinetuneMethod

    name = job.method
    if args.lora_init != "default" and name != "qlora":
        raise SettingError("lora_init", f"{args.lora_init} initialises a QLoRA adapter; add --method qlora")
    if name is None:
        return None
    if name not in ("lora", "qlora"):
        return FinetuneMethod(name)
    # Rank and alpha are the job's (FinetuneSettings: 'auto', 2 x rank), resolved with the model.
    lora = settings_from_args(
        LoraSettings,
        args,
        prefix=LORA_PREFIX,
        rank=1 if job.lora_rank == "auto" else job.lora_rank,
        alpha=1.0 if job.lora_alpha is None else job.lora_alpha,
        qtype=job.qlora_qtype if name == "qlora" else None,
        seed=seed,
    )
    return FinetuneMethod(name, lora=lora)


LORA_PREFIX = "lora_"


def cmd_finetune(args: argparse.Namespace) -> int:
    from sketchtune_jax._utils.reporting import print_table
    from sketchtune_jax.jobs import finetune_to_dir
    from sketchtune_jax.settings import SettingError, settings_from_args
    from sketchtune_jax.train import TrainConfig
    from sketchtune_jax.train.config import FinetuneSettings

    job = settings_from_args(FinetuneSettings, args)
    config = settings_from_args(TrainConfig, args, compute_dtype=None if args.dtype == "float32" else args.dtype)
    method = _finetune_method(args, job, config.seed)
    distributed = _distributed_settings(args)
    if distributed is not None and method is not None and method.name != "sketch":
        raise SettingError("method", f"{method.name} cannot run over several processes (for now); use sketch")
    _start_distributed(args, distributed)
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
    if _is_primary():
        print_table(f"fine-tuned {args.model} on {args.data or args.text} ({summary['method']})", summary)
        if args.json:
            from sketchtune_jax._utils.fileio import write_json_atomic

            write_json_atomic(args.json, summary)
    return 0


def cmd_eval_task(args: argparse.Namespace) -> int:
    """``eval math`` and ``eval commonsense``: generate for every record and score the extracted answers,
    or (``--scoring loglik``) choose each answer by log-likelihood."""
    from sketchtune_jax._utils.fileio import write_json_atomic
    from sketchtune_jax._utils.reporting import print_table
    from sketchtune_jax.data.prompts import check_template
    from sketchtune_jax.eval.settings import TaskSettings
    from sketchtune_jax.eval.tasks import evaluate_task
    from sketchtune_jax.models.generate import generate_text
    from sketchtune_jax.settings import settings_from_args

    settings = settings_from_args(TaskSettings, args)
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    if settings.scoring == "loglik":
        from sketchtune_jax.data.records import read_json_records
        from sketchtune_jax.eval.multiple_choice import check_records

        records = read_json_records(args.data)[: settings.limit]
        try:
            check_records(records)
        except ValueError as e:
            raise ValueError(f"{args.data}: {e}") from None
    loaded = _load(args)
    check_template(settings.template, loaded.tokenizer)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    # Both scorings can share one --out directory without overwriting each other.
    name = Path(args.data).name.split(".")[0] + (".loglik" if settings.scoring == "loglik" else "")
    predictions = Path(args.out) / f"{name}.predictions.jsonl" if args.out else None

    if settings.scoring == "loglik":
        from sketchtune_jax.eval.multiple_choice import evaluate_multiple_choice

        summary = evaluate_multiple_choice(
            loaded.model,
            loaded.tokenizer,
            records,
            continuation=settings.continuation,
            batch_size=settings.batch_size,
            out_jsonl=predictions,
            progress=True,
            template=settings.template,
        )
        summary["scoring"] = "loglik"
    else:
        new_tokens = settings.new_tokens(args.task)

        def generate_fn(prompts: list[str]) -> list[str]:
            return generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=new_tokens)

        summary = evaluate_task(
            generate_fn,
            args.data,
            loaded.tokenizer,
            task=settings.task_name,
            batch_size=settings.batch_size,
            limit=settings.limit,
            out_jsonl=predictions,
            strict=not settings.reference_rule,
            progress=True,
            template=settings.template,
        )
    summary["model"] = args.model
    print_table(f"{args.task} accuracy on {args.data}", summary)
    if args.out:
        write_json_atomic(Path(args.out) / f"{name}.summary.json", summary)
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


def _add_codebooks_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codebooks", help="fine-tuned codebook file to apply to a sketched model first")


def _add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", metavar="FILE", help=f"also write {what} to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    from sketchtune_jax import __version__

    parser = _Parser(prog="sketchtune", description=__doc__.split("\n\n")[0])
    parser.set_defaults(verbose=False)
    parser.add_argument("--version", action="version", version=f"sketchtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="write a model as a Hugging Face directory")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    _add_json_arg(p, "what was written")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="architecture, parameter count and bytes of a model")
    _add_model_args(p)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_info)

    from sketchtune_jax.data.prompts import TEMPLATES
    from sketchtune_jax.models.generate import GenerateSettings
    from sketchtune_jax.settings import add_settings_arguments

    p = sub.add_parser("generate", help="generate text from one or more prompts")
    _add_model_args(p)
    _add_codebooks_arg(p)
    _add_adapter_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    add_settings_arguments(p, GenerateSettings)
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        help="wrap each prompt in the Alpaca prompt or the tokenizer's chat template (default: as given)",
    )
    p.add_argument("--chat", dest="template", action="store_const", const="chat", help="same as --template chat")
    _add_json_arg(p, "the prompts and outputs")
    p.set_defaults(func=cmd_generate)

    from sketchtune_jax.sketch.driver import SketchSettings
    from sketchtune_jax.train.heal import HealSettings

    p = sub.add_parser("sketch", help="sketch a model's projections into codebooks and codes")
    _add_model_args(p)
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
    p.add_argument("--json", help="also write the report to this JSON file")
    _add_distributed_args(p)
    g = p.add_argument_group("healing after the sketch", "against MODEL on the calibration text (sketchtune heal)")
    add_settings_arguments(g, HealSettings, prefix=HEAL_PREFIX, only=HEAL_FLAGS)
    p.set_defaults(func=cmd_sketch)

    p = sub.add_parser("heal", help="distil a sketch's codebooks from the dense model (KL on generic text)")
    _add_model_args(p)
    p.add_argument("--teacher", required=True, help="the dense model the sketch was made from")
    p.add_argument("--calib", required=True, help="text/JSON/JSONL file, hf:NAME[:CONFIG]:SPLIT, or 'self'")
    p.add_argument("--out", required=True, help="output sketched directory (SKETCH itself with --overwrite)")
    add_settings_arguments(p, HealSettings, required=("steps",))
    p.add_argument("--eval-text", help="also measure perplexity on this held-out text before and after")
    p.add_argument(
        "--allow-sketched-teacher", action="store_true", help="accept a sketched teacher (it passes its own errors on)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out and discard an unfinished heal")
    p.add_argument("--json", help="also write the heal record to this JSON file")
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("export", help="write a model as a dense HF directory (a sketch as W_hat, an adapter merged)")
    _add_model_args(p)
    _add_adapter_arg(p)
    _add_codebooks_arg(p)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    _add_json_arg(p, "what was written")
    p.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="task", required=True)
    from sketchtune_jax.eval.settings import PerplexitySettings, TaskSettings

    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    _add_model_args(p)
    _add_codebooks_arg(p)
    _add_adapter_arg(p)
    p.add_argument("--text", required=True, help="a text file, or hf:NAME[:CONFIG]:SPLIT")
    add_settings_arguments(p, PerplexitySettings)
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_eval_ppl)
    for task in ("math", "commonsense"):
        p = ev.add_parser(task, help=f"{task} accuracy: generate, extract the answer, score")
        _add_model_args(p)
        _add_adapter_arg(p)
        p.add_argument("--data", required=True, help="JSON records {instruction, input, answer}")
        _add_codebooks_arg(p)
        # Log-likelihood scoring chooses among a record's options: commonsense only.
        add_settings_arguments(p, TaskSettings, skip=() if task == "commonsense" else ("scoring", "continuation"))
        p.add_argument("--out", help="directory for per-item predictions (JSONL) and the summary")
        p.add_argument("--json", help="also write the summary to this JSON file")
        p.set_defaults(func=cmd_eval_task)
    from sketchtune_jax.eval.judge.cli import add_judge_parser

    add_judge_parser(ev)

    from sketchtune_jax.train import TrainConfig
    from sketchtune_jax.train.config import FinetuneSettings
    from sketchtune_jax.train.lora import LoraSettings

    p = sub.add_parser("finetune", help="fine-tune a sketch's codebooks, or a dense model by LoRA, QLoRA or fully")
    _add_model_args(p)
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
    g = p.add_argument_group("training (TrainConfig)")
    add_settings_arguments(g, TrainConfig)
    g = p.add_argument_group("LoRA and QLoRA adapters (LoraSettings)")
    add_settings_arguments(g, LoraSettings, prefix=LORA_PREFIX)
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
    _add_json_arg(p, "the run's summary")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_finetune)
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


def _error_line(args: argparse.Namespace, error: Exception) -> str:
    """``error`` as the one line the command prints, settings named by their flags."""

    # Flags are named after the settings fields they fill (argparse's dest convention).
    def flag(name: str) -> str:
        return f"--{name.replace('_', '-')}" if name in vars(args) else name

    render = getattr(error, "render", None)
    return f"sketchtune {args.command}: error: {render(flag) if render else error}"


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
        print(_error_line(args, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any other failure while running: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"{_error_line(args, e)} ({type(e).__name__}; -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
