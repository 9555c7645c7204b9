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
    from sketchtune_jax.distributed import DistributedSettings

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
    from sketchtune_jax.loading import load_any
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


def _settings_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """``cls`` built from the parsed flags named like its fields, plus ``values``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in fields}, **values})


def cmd_info(args: argparse.Namespace) -> int:
    from pallas_kernels import describe
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.loading import model_info
    from sketchtune_jax.reporting import print_table

    loaded = _load(args)
    info = model_info(loaded.model, loaded.config)
    kernels = describe()  # which kernels a sketched layer runs on this machine, and why
    info["kernel_backend"] = f"{kernels['kernel_backend']} ({kernels['reason']})"
    print_table(f"{args.model}", info)
    if args.json:
        write_json_atomic(args.json, info)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.generate import GenerateSettings, generate_text
    from sketchtune_jax.settings import settings_from_args

    settings = settings_from_args(GenerateSettings, args)
    loaded = _load(args)
    prompts = args.prompt
    outs = generate_text(loaded.model, loaded.tokenizer, prompts, **dataclasses.asdict(settings), chat=args.chat)
    for prompt, out in zip(prompts, outs):
        print(f"### {prompt}\n{out}\n")
    if args.json:
        outputs = [{"prompt": p, "output": o} for p, o in zip(prompts, outs)]
        write_json_atomic(
            args.json, {"model": args.model, "settings": dataclasses.asdict(settings), "outputs": outputs}
        )
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.perplexity import perplexity, read_text, text_fraction
    from sketchtune_jax.reporting import print_table
    from sketchtune_jax.settings import fraction_range
    from sketchtune_jax.workflows import calibration_overlap

    text_range = fraction_range(args.text_range, "text_range")
    text = text_fraction(read_text(args.text), text_range)
    loaded = _load(args)
    overlap = calibration_overlap(
        args.model,
        args.text,
        text,
        loaded.tokenizer,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        text_range=text_range,
    )
    if overlap:
        print(f"warning: {overlap}", file=sys.stderr)
    result = perplexity(
        loaded.model,
        loaded.tokenizer,
        text,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
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
    g.add_argument(
        "--distributed-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the coordinator, and then for all processes to join (default 60)",
    )


def _distributed_settings(args: argparse.Namespace) -> DistributedSettings | None:
    """The `DistributedSettings` the flags ask for, or None for one process (checked, nothing started)."""
    from sketchtune_jax.distributed import distributed_settings
    from sketchtune_jax.settings import SettingError

    try:
        return distributed_settings(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)
    except SettingError as e:
        field = "distributed_timeout" if e.field == "timeout_s" else e.field
        raise SettingError(field, e.problem, e.mentions) from None


def _start_distributed(args: argparse.Namespace, settings: DistributedSettings | None) -> None:
    """Join the run of several processes ``settings`` describes (nothing for None)."""
    import os

    from sketchtune_jax.distributed import initialize

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
    from sketchtune_jax.distributed import is_primary

    return is_primary()


def cmd_sketch(args: argparse.Namespace) -> int:
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.reporting import print_table
    from sketchtune_jax.settings import SettingError, fraction_range
    from sketchtune_jax.sketcher import SketchSettings
    from sketchtune_jax.workflows import sketch_to_dir

    settings = _settings_from_args(
        SketchSettings,
        args,
        error_feedback=not args.no_error_feedback,
        calib_range=fraction_range(args.calib_range, "calib_range"),
    )
    if args.heal_steps < 0:
        raise ValueError(f"--heal-steps must be >= 0, got {args.heal_steps}")
    # The heal's own settings, by their `heal_config` names; a sketch's flags carry a heal_ prefix.
    chosen = {k: v for k, v in (("batch_size", args.heal_batch_size), ("lr", args.heal_lr)) if v is not None}
    as_flag = {"steps": "heal_steps", "batch_size": "heal_batch_size", "lr": "heal_lr"}
    unused = [as_flag[k] for k in chosen] + (["heal_train_norms"] if args.heal_train_norms else [])
    if unused and not args.heal_steps:
        named = ", ".join("{" + u + "}" for u in unused)
        raise SettingError("heal_steps", f"is 0, so {named} would do nothing; give N > 0", tuple(unused))
    heal = None
    if args.heal_steps:
        from sketchtune_jax.heal import heal_config

        # Built (and so checked) before the sketch, which may take an hour, not after it.
        try:
            heal = heal_config(steps=args.heal_steps, seq_len=settings.seq_len, seed=settings.seed, **chosen)
        except SettingError as e:
            problem = e.problem
            for m in e.mentions:
                problem = problem.replace("{" + m + "}", "{" + as_flag.get(m, m) + "}")
            mentions = tuple(as_flag.get(m, m) for m in e.mentions)
            raise SettingError(as_flag.get(e.field, e.field), problem, mentions) from None
    distributed = _distributed_settings(args)
    if distributed is not None and args.heal_steps:
        raise SettingError("heal_steps", "cannot run over several processes (for now); heal afterwards in one process")
    _start_distributed(args, distributed)
    levers = [] if settings.layer_tune_steps else ["--layer-tune-steps 32"]
    # act-order won every held-out comparison at 2 bits (README), by less than the noise at 3.
    levers += ["--act-order"] if settings.bits == 2 and not settings.act_order else []
    if settings.bits < 4 and levers:
        levers += [] if args.heal_steps else ["--heal-steps"]
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
    if heal is not None:
        from sketchtune_jax.workflows import heal_to_dir

        record = heal_to_dir(
            args.out,
            args.model,
            settings.calib,
            args.out,
            config=heal,
            calib_range=settings.calib_range,
            dtype=args.dtype,
            train_norms=args.heal_train_norms,
            overwrite=True,
        )
        print_table(f"healed {args.out} against {args.model}", _heal_summary(record))
    return 0


def _heal_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "windows", "first_kl", "final_kl", "ppl_before", "ppl_after", "seconds", "cpu_seconds")
    return {k: record[k] for k in keys if k in record}


def cmd_heal(args: argparse.Namespace) -> int:
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.heal import heal_config
    from sketchtune_jax.reporting import print_table
    from sketchtune_jax.settings import fraction_range
    from sketchtune_jax.workflows import heal_to_dir

    record = heal_to_dir(
        args.model,
        args.teacher,
        args.calib,
        args.out,
        config=heal_config(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            schedule=args.schedule,
            warmup_steps=args.warmup_steps,
            save_every=args.save_every,
            seed=args.seed,
        ),
        calib_range=fraction_range(args.calib_range, "calib_range"),
        windows=args.windows,
        dtype=args.dtype,
        eval_text=args.eval_text,
        eval_windows=args.eval_windows,
        allow_sketched_teacher=args.allow_sketched_teacher,
        train_norms=args.train_norms,
        overwrite=args.overwrite,
    )
    if args.json:
        write_json_atomic(args.json, record)
    print_table(f"healed {args.model} against {args.teacher} -> {args.out}", _heal_summary(record))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``convert`` and ``export``: any model the commands take, written as a dense HF directory."""
    from converters import export_hf
    from sketchtune_jax.fileio import check_output_dir

    check_output_dir(args.out, overwrite=args.overwrite)
    loaded = _load(args)
    model = loaded.model
    if getattr(args, "adapter", None):
        from sketchtune_jax.lora import merge_lora, read_adapter_settings

        model = merge_lora(model, read_adapter_settings(args.adapter))
    export_hf(model, loaded.config, loaded.tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    if args.json:
        from sketchtune_jax.fileio import write_json_atomic

        sources = {"codebooks": getattr(args, "codebooks", None), "adapter": getattr(args, "adapter", None)}
        write_json_atomic(args.json, {"model": args.model, **sources, "out": str(Path(args.out).resolve())})
    return 0


def _finetune_method(args: argparse.Namespace):
    """The `FinetuneMethod` the flags ask for (None: the model's default, checked by the workflow),
    and the LoRA rank asked for (an int, ``"auto"``, or None without adapters)."""
    from sketchtune_jax.lora import LoraSettings
    from sketchtune_jax.methods import FinetuneMethod
    from sketchtune_jax.settings import SettingError

    name = args.method
    if args.lora_init != "default" and name != "qlora":
        raise SettingError("lora_init", f"{args.lora_init} initialises a QLoRA adapter; add --method qlora")
    if name is None:
        return None, None
    if name not in ("lora", "qlora"):
        return FinetuneMethod(name), None
    rank = args.lora_rank
    if rank != "auto":
        try:
            rank = int(rank)
        except ValueError:
            raise SettingError("lora_rank", f"must be a positive integer or 'auto', got {rank!r}") from None
    try:
        settings = LoraSettings(
            rank=1 if rank == "auto" else rank,
            alpha=1.0 if args.lora_alpha is None else args.lora_alpha,
            dropout=args.lora_dropout,
            targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
            qtype=args.qlora_qtype if name == "qlora" else None,
            tile_size=args.qlora_tile_size,
            seed=args.seed,
            init=args.lora_init,
            loftq_iters=args.loftq_iters,
        )
    except SettingError as e:
        # The flags of LoraSettings' fields carry the method's name: --lora-rank, --qlora-qtype, ...
        prefix = {"qtype": "qlora_", "tile_size": "qlora_", "loftq_iters": ""}.get(e.field, "lora_")
        raise SettingError(prefix + e.field, e.problem, e.mentions) from None
    return FinetuneMethod(name, lora=settings), rank


def cmd_finetune(args: argparse.Namespace) -> int:
    from sketchtune_jax.reporting import print_table
    from sketchtune_jax.settings import SettingError, fraction_range
    from sketchtune_jax.train import TrainConfig
    from sketchtune_jax.workflows import finetune_to_dir

    method, rank = _finetune_method(args)
    config = _settings_from_args(TrainConfig, args, compute_dtype=None if args.dtype == "float32" else args.dtype)
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
        text_range=fraction_range(args.text_range, "text_range"),
        method=method,
        auto_lora_rank=rank == "auto",
        lora_alpha=args.lora_alpha,
        codebooks=args.codebooks,
        dtype=args.dtype,
        val_fraction=args.val_fraction,
        pad_multiple=args.pad_multiple,
        resume=args.resume,
        overwrite=args.overwrite,
        mesh=args.mesh,
    )
    if _is_primary():
        print_table(f"fine-tuned {args.model} on {args.data or args.text} ({summary['method']})", summary)
        if args.json:
            from sketchtune_jax.fileio import write_json_atomic

            write_json_atomic(args.json, summary)
    return 0


def cmd_eval_task(args: argparse.Namespace) -> int:
    """``eval math`` and ``eval commonsense``: generate for every record and score the extracted answers,
    or (``--scoring loglik``) choose each answer by log-likelihood."""
    from sketchtune_jax.evaluation import evaluate_task
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.generate import generate_text
    from sketchtune_jax.reporting import print_table

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    scoring = getattr(args, "scoring", "generate")
    if scoring == "loglik":
        from sketchtune_jax.data import read_json_records
        from sketchtune_jax.multiple_choice import check_records

        records = read_json_records(args.data)[: args.limit]
        try:
            check_records(records)
        except ValueError as e:
            raise ValueError(f"{args.data}: {e}") from None
    loaded = _load(args)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    # Both scorings can share one --out directory without overwriting each other.
    name = Path(args.data).name.split(".")[0] + (".loglik" if scoring == "loglik" else "")
    predictions = Path(args.out) / f"{name}.predictions.jsonl" if args.out else None

    if scoring == "loglik":
        from sketchtune_jax.multiple_choice import evaluate_multiple_choice

        summary = evaluate_multiple_choice(
            loaded.model,
            loaded.tokenizer,
            records,
            continuation=args.continuation,
            batch_size=args.batch_size,
            out_jsonl=predictions,
            progress=True,
        )
        summary["scoring"] = "loglik"
    else:

        def generate_fn(prompts: list[str]) -> list[str]:
            return generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens)

        summary = evaluate_task(
            generate_fn,
            args.data,
            loaded.tokenizer,
            task=args.task_name,
            batch_size=args.batch_size,
            limit=args.limit,
            out_jsonl=predictions,
            strict=not args.reference_rule,
            progress=True,
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

    from sketchtune_jax.generate import GenerateSettings
    from sketchtune_jax.settings import add_settings_arguments

    p = sub.add_parser("generate", help="generate text from one or more prompts")
    _add_model_args(p)
    _add_codebooks_arg(p)
    _add_adapter_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    add_settings_arguments(p, GenerateSettings)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    _add_json_arg(p, "the prompts and outputs")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sketch", help="sketch a model's projections into codebooks and codes")
    _add_model_args(p)
    p.add_argument("--bits", type=int, default=4, help="bits per code: 2, 3 or 4")
    p.add_argument("--groups-per-row", type=int, default=4, help="codebooks per row (a divisor of the input widths)")
    p.add_argument("--calib", required=True, help="text/JSON/JSONL file, hf:NAME[:CONFIG]:SPLIT, or 'self'")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument(
        "--calib-range",
        default="0:1",
        help="use only this fraction of a calibration text, e.g. 0.5:1 to hold out the first half",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window")
    p.add_argument(
        "--hessian-exponent",
        "--s",
        type=float,
        default=3.0,
        help="exponent s of the Hessian weights diag(H^-1)^-s in k-means",
    )
    p.add_argument("--percdamp", type=float, default=0.01, help="damping as a fraction of mean(diag H)")
    p.add_argument("--block-size", type=int, default=128, help="columns per error-feedback block")
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--kmeans-restarts", type=int, default=1, help="k-means++ restarts; the best fit is kept")
    p.add_argument("--refit-codebook", action="store_true", help="re-fit codebooks by least squares after the sweep")
    p.add_argument(
        "--act-order",
        action="store_true",
        help="sweep each group's columns by descending Hessian diagonal (same groups, same size)",
    )
    p.add_argument(
        "--layer-tune-steps",
        type=int,
        default=0,
        help="then train each sketched layer's codebooks for N Adam steps to the dense layer's output "
        "(0: no; 32 recommended below 4 bits, docs/recipes.md)",
    )
    p.add_argument("--layer-tune-lr", type=float, default=1e-3, help="peak learning rate of the layer tuning")
    p.add_argument("--layer-tune-rows", type=int, default=4, help="calibration windows per layer-tuning step")
    p.add_argument(
        "--true-sequential",
        action="store_true",
        help="measure each stage's Hessian after the stages before it are sketched",
    )
    p.add_argument("--no-error-feedback", action="store_true", help="ablation: map weights without error feedback")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and any unfinished sketch")
    p.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the checkpoint one decoder layer at a time (default; same result as --no-streaming, "
        "which loads the whole model)",
    )
    p.add_argument(
        "--mesh",
        help="sketch on a device mesh, e.g. data=8 or data=2,model=4 (sizes multiply to the device count): "
        "calibration samples split over data, every projection's rows over all devices",
    )
    p.add_argument("--json", help="also write the report to this JSON file")
    _add_distributed_args(p)
    p.add_argument(
        "--heal-steps",
        type=int,
        default=0,
        help="then heal the sketch for N steps against MODEL on the calibration text (0: no healing)",
    )
    p.add_argument("--heal-batch-size", type=int, help="windows per heal step (default: sketchtune heal's, 4)")
    p.add_argument("--heal-lr", type=float, help="peak heal learning rate (default: sketchtune heal's, 5e-4)")
    p.add_argument("--heal-train-norms", action="store_true", help="the heal also trains the RMSNorm scales")
    p.set_defaults(func=cmd_sketch)

    p = sub.add_parser("heal", help="distil a sketch's codebooks from the dense model (KL on generic text)")
    _add_model_args(p)
    p.add_argument("--teacher", required=True, help="the dense model the sketch was made from")
    p.add_argument("--calib", required=True, help="text/JSON/JSONL file, hf:NAME[:CONFIG]:SPLIT, or 'self'")
    p.add_argument("--calib-range", default="0:1", help="use only this fraction of the text, e.g. 0.5:1")
    p.add_argument("--out", required=True, help="output sketched directory (SKETCH itself with --overwrite)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--windows", type=int, help="distinct windows (default: steps x batch size, as the text allows)")
    p.add_argument("--lr", type=float, default=5e-4, help="5e-4 from held-out figures (README)")
    p.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="cosine")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument(
        "--train-norms",
        action="store_true",
        help="also train the RMSNorm scales (stored in every sketch already: the size does not change)",
    )
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (a rerun resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-text", help="also measure perplexity on this held-out text before and after")
    p.add_argument("--eval-windows", type=int, default=20, help="512-token windows of --eval-text")
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
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    _add_model_args(p)
    _add_codebooks_arg(p)
    _add_adapter_arg(p)
    p.add_argument("--text", required=True, help="a text file, or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument(
        "--text-range",
        default="0:1",
        help="read only this fraction of the text, e.g. 0.25:0.5 for validation windows apart from the test ones",
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_eval_ppl)
    for task in ("math", "commonsense"):
        p = ev.add_parser(task, help=f"{task} accuracy: generate, extract the answer, score")
        _add_model_args(p)
        _add_adapter_arg(p)
        p.add_argument("--data", required=True, help="JSON records {instruction, input, answer}")
        _add_codebooks_arg(p)
        p.add_argument("--limit", type=int, help="evaluate only the first N records")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-new-tokens", type=int, default=256 if task == "math" else 32)
        p.add_argument("--task-name", help="task or answer kind (default: from the file name)")
        p.add_argument(
            "--reference-rule",
            action="store_true",
            help="extract answers exactly as the reference does (last number), not 'The answer is' first",
        )
        p.add_argument("--out", help="directory for per-item predictions (JSONL) and the summary")
        p.add_argument("--json", help="also write the summary to this JSON file")
        if task == "commonsense":
            p.add_argument(
                "--scoring",
                choices=("generate", "loglik"),
                default="generate",
                help="generate and extract the answer, or pick the choice of highest log-likelihood",
            )
            p.add_argument(
                "--continuation",
                choices=("response", "option", "question"),
                default="response",
                help="loglik: score 'the correct answer is answerK', the option's text, or the option's "
                "text after 'Question: ...\\nAnswer:' (lm-evaluation-harness's ARC format)",
            )
        p.set_defaults(func=cmd_eval_task)
    from sketchtune_jax.judge.cli import add_judge_parser

    add_judge_parser(ev)

    from sketchtune_jax.quantized_base import QTYPES

    p = sub.add_parser("finetune", help="fine-tune a sketch's codebooks, or a dense model by LoRA, QLoRA or fully")
    _add_model_args(p)
    p.add_argument(
        "--method",
        choices=("sketch", "lora", "qlora", "full"),
        help="what trains: sketch (codebooks; the default for a sketched model), lora, qlora "
        "(adapters on an NF4/INT4 base) or full (every weight) for a dense model",
    )
    p.add_argument(
        "--lora-rank",
        default="auto",
        help="adapter rank, or 'auto': the rank whose trainable count is closest to an INT4 GPR4 sketch's",
    )
    p.add_argument("--lora-alpha", type=float, help="adapter scale numerator (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated projections that get adapters",
    )
    p.add_argument(
        "--qlora-qtype",
        choices=QTYPES,
        default="nf4",
        help="storage of QLoRA's frozen base: NormalFloat or evenly spaced levels at 4, 3 or 2 bits",
    )
    p.add_argument("--qlora-tile-size", type=int, default=64, help="input columns per QLoRA quantization scale")
    p.add_argument(
        "--lora-init",
        choices=("default", "loftq"),
        default="default",
        help="default: the adapter starts at zero; loftq (qlora only): base and adapter fitted together "
        "so that they start close to the dense weights (the run also writes the quantized base as base/)",
    )
    p.add_argument("--loftq-iters", type=int, default=1, help="LoftQ alternations (LoftQ's paper reports 1 and 5)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="JSON/JSONL records {instruction, input, output}; the response is scored")
    data.add_argument(
        "--text",
        help="plain text (a .txt, JSON/JSONL or hf:NAME[:CONFIG]:SPLIT source) cut into packed windows of "
        "--seq-len tokens; every token is scored (language modelling)",
    )
    p.add_argument(
        "--text-range",
        default="0:1",
        help="with --text: the fraction of the text to train on, e.g. 0.5:1 (held-out text stays unread)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory (logs, checkpoints, codebooks); must be empty unless --resume or --overwrite",
    )
    p.add_argument("--codebooks", help="start from these fine-tuned codebooks")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps of linear warmup (None: a tenth of the run, at most 100, the paper's 100 on long runs)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument(
        "--pad-multiple",
        type=int,
        default=64,
        help="pad batches to a multiple of this many tokens (each length compiles once)",
    )
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    p.add_argument(
        "--scan-layers",
        action="store_true",
        help="run the decoder layers as one scan (compile time independent of depth; files unchanged)",
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
    _add_json_arg(p, "the run's summary")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_finetune)
    return parser


def _quiet_other_libraries() -> None:
    """No banners from other libraries (transformers' "PyTorch was not found", for one); set
    before they are imported."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _show_library_info(verbose: bool) -> None:
    # The library reports through logging; the command line prints its info lines (debug with -v),
    # once each: not passed on to the root logger, which another library may have set up to print too.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("sketchtune_jax")
    if not root.handlers:
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
