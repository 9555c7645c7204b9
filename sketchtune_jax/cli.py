"""The ``sketchtune`` command line: a thin layer over the library.

    sketchtune convert MODEL --out DIR
    sketchtune info MODEL
    sketchtune generate MODEL --prompt TEXT --max-new-tokens N
    sketchtune eval ppl MODEL --text FILE --seq-len 512 --max-windows 20 [--json OUT]
    sketchtune sketch MODEL --bits 4 --groups-per-row 4 --calib FILE|hf:NAME|self --nsamples N --seq-len L --out DIR
    sketchtune finetune SKETCH --data FILE --out RUN [--epochs --lr --batch-size ... --resume]
    sketchtune eval math|commonsense MODEL --data FILE [--limit N] [--codebooks FILE]
    sketchtune eval commonsense MODEL --data FILE --scoring loglik [--continuation response|option|question]
    sketchtune export SKETCH [--codebooks FILE] --out DIR

MODEL is a Hugging Face directory, a GGUF file, a sketched directory, or the
built-in name ``smollm2-135m``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF directory, GGUF file, sketched directory, or 'smollm2-135m'")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and parameter dtype")


def _load(args: argparse.Namespace):
    from sketchtune_jax.loading import load_any

    dtype = _dtype(args.dtype)
    return load_any(args.model, dtype=dtype, param_dtype=dtype, codebooks=getattr(args, "codebooks", None))


def cmd_info(args: argparse.Namespace) -> int:
    from sketchtune_jax.loading import model_info
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.reporting import print_table

    loaded = _load(args)
    info = model_info(loaded.model, loaded.config)
    print_table(f"{args.model}", info)
    if args.json:
        write_json_atomic(args.json, info)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sketchtune_jax.generate import generate_text

    loaded = _load(args)
    prompts = args.prompt
    outs = generate_text(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
    )
    for prompt, out in zip(prompts, outs):
        print(f"### {prompt}\n{out}\n")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from sketchtune_jax.perplexity import perplexity, read_text
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.reporting import print_table

    text = read_text(args.text)
    loaded = _load(args)
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


def _fraction_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--calib-range must be START:END fractions like 0.5:1, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"--calib-range needs 0 <= START < END <= 1, got {text!r}")
    return lo, hi


def cmd_sketch(args: argparse.Namespace) -> int:
    import dataclasses

    from sketchtune_jax.calibration import calibration_windows
    from sketchtune_jax.checkpoint import save_sketched
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.reporting import print_table
    from sketchtune_jax.sketcher import SketchSettings, partial_dir_for, prepare_sketch_output, sketch_model

    settings = SketchSettings(
        bits=args.bits,
        groups_per_row=args.groups_per_row,
        s=args.s,
        percdamp=args.percdamp,
        block_size=args.block_size,
        kmeans_iters=args.kmeans_iters,
        kmeans_restarts=args.kmeans_restarts,
        refit_codebook=args.refit_codebook,
        error_feedback=not args.no_error_feedback,
        true_sequential=args.true_sequential,
        seed=args.seed,
        calib=args.calib,
        nsamples=args.nsamples,
        seq_len=args.seq_len,
        calib_range=_fraction_range(args.calib_range),
    )
    if args.bits not in (2, 3, 4):
        raise ValueError(f"--bits must be 2, 3 or 4, got {args.bits}")
    if args.calib != "self" and not args.calib.startswith("hf:") and not Path(args.calib).is_file():
        raise FileNotFoundError(f"calibration file not found: {args.calib}")
    partial = prepare_sketch_output(args.out, overwrite=args.overwrite)
    if partial.exists():
        print(f"resuming the unfinished sketch in {partial}")
    loaded = _load(args)
    settings.validate(loaded.config)
    calib = calibration_windows(
        args.calib, loaded.tokenizer, nsamples=args.nsamples, seq_len=args.seq_len, seed=args.seed, model=loaded.model,
        text_range=settings.calib_range,
    )
    report = sketch_model(loaded.model, calib, settings, work_dir=partial, batch_size=args.batch_size)
    report["source"] = args.model
    save_sketched(
        loaded.model, loaded.config, loaded.tokenizer, args.out,
        settings=dataclasses.asdict(settings), report=report, overwrite=True,
    )
    write_json_atomic(Path(args.out) / "sketch_report.json", report)
    if args.json:
        write_json_atomic(args.json, report)
    import shutil

    shutil.rmtree(partial_dir_for(args.out), ignore_errors=True)
    worst = sorted(report["modules"], key=lambda r: -r["rel_output_error"])[:5]
    print_table("largest relative output errors", [
        {"layer": r["layer"], "module": r["module"], "error": r["rel_output_error"], "s": r["seconds"]} for r in worst
    ])
    print_table(f"sketched {args.model} -> {args.out}", {
        "bits": settings.bits,
        "groups per row": settings.groups_per_row,
        "modules": len(report["modules"]),
        "mean relative output error": report["mean_rel_output_error"],
        "seconds": report["seconds"],
    })
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``convert`` and ``export``: any model the commands take, written as a dense HF directory."""
    from converters import export_hf
    from sketchtune_jax.fileio import check_output_dir

    check_output_dir(args.out, overwrite=args.overwrite)
    loaded = _load(args)
    export_hf(loaded.model, loaded.config, loaded.tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from sketchtune_jax.checkpoint import is_sketched_dir
    from sketchtune_jax.data import build_batches, load_instruction_data
    from sketchtune_jax.fileio import write_json_atomic
    from sketchtune_jax.reporting import print_table
    from sketchtune_jax.train import TrainConfig, finetune, trainable_parameter_count

    if not is_sketched_dir(args.model):
        raise ValueError(f"{args.model} is not a sketched model; make one first with `sketchtune sketch`")
    config = TrainConfig(
        lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, grad_accum=args.grad_accum, batch_size=args.batch_size,
        epochs=args.epochs, max_steps=args.max_steps, seq_len=args.seq_len, save_every=args.save_every,
        eval_every=args.eval_every, seed=args.seed, remat=args.remat,
        compute_dtype=None if args.dtype == "float32" else args.dtype,
    )
    records = load_instruction_data(args.data)
    loaded = _load(args)
    train, val = build_batches(records, loaded.tokenizer, batch_size=args.batch_size, seq_len=args.seq_len,
                               val_fraction=args.val_fraction, seed=args.seed, on_long_prompt="skip",
                               pad_multiple=args.pad_multiple)
    result = finetune(loaded.model, train, config, args.out, val_batches=val)
    summary = {
        "step": result.step,
        "loss": result.loss,
        "val_loss": result.val_loss,
        "trainable_params": trainable_parameter_count(loaded.model),
        "resumed_from": result.resumed_from,
        "codebooks": result.codebooks_path,
        "log": result.log_path,
    }
    print_table(f"fine-tuned {args.model} on {args.data}", summary)
    write_json_atomic(Path(args.out) / "summary.json", summary)
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
            loaded.model, loaded.tokenizer, records, continuation=args.continuation, batch_size=args.batch_size,
            out_jsonl=predictions, progress=True,
        )
        summary["scoring"] = "loglik"
    else:
        def generate_fn(prompts: list[str]) -> list[str]:
            return generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens)

        summary = evaluate_task(
            generate_fn, args.data, loaded.tokenizer, task=args.task_name, batch_size=args.batch_size,
            limit=args.limit, out_jsonl=predictions, strict=not args.reference_rule, progress=True,
        )
    summary["model"] = args.model
    print_table(f"{args.task} accuracy on {args.data}", summary)
    if args.out:
        write_json_atomic(Path(args.out) / f"{name}.summary.json", summary)
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sketchtune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="write a model as a Hugging Face directory")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="architecture, parameter count and bytes of a model")
    _add_model_args(p)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from one or more prompts")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sketch", help="sketch a model's projections into codebooks and codes")
    _add_model_args(p)
    p.add_argument("--bits", type=int, default=4, help="bits per code: 2, 3 or 4")
    p.add_argument("--groups-per-row", type=int, default=4, help="codebooks per row (a divisor of the input widths)")
    p.add_argument("--calib", required=True, help="text/JSON/JSONL file, hf:NAME[:CONFIG]:SPLIT, or 'self'")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-range", default="0:1",
                   help="use only this fraction of a calibration text, e.g. 0.5:1 to hold out the first half")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--s", type=float, default=3.0, help="exponent of the Hessian weights in k-means")
    p.add_argument("--percdamp", type=float, default=0.01, help="damping as a fraction of mean(diag H)")
    p.add_argument("--block-size", type=int, default=128, help="columns per error-feedback block")
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--kmeans-restarts", type=int, default=1, help="k-means++ restarts; the best fit is kept")
    p.add_argument("--refit-codebook", action="store_true", help="re-fit codebooks by least squares after the sweep")
    p.add_argument("--true-sequential", action="store_true",
                   help="measure each stage's Hessian after the stages before it are sketched")
    p.add_argument("--no-error-feedback", action="store_true", help="ablation: map weights without error feedback")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue an unfinished sketch (also automatic)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and any unfinished sketch")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=cmd_sketch)

    p = sub.add_parser("export", help="write a sketched model as a dense HF directory (W_hat)")
    _add_model_args(p)
    p.add_argument("--codebooks", help="fine-tuned codebook file to apply first")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="task", required=True)
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="a text file, or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_eval_ppl)
    for task in ("math", "commonsense"):
        p = ev.add_parser(task, help=f"{task} accuracy: generate, extract the answer, score")
        _add_model_args(p)
        p.add_argument("--data", required=True, help="JSON records {instruction, input, answer}")
        p.add_argument("--codebooks", help="fine-tuned codebook file to apply first")
        p.add_argument("--limit", type=int, help="evaluate only the first N records")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-new-tokens", type=int, default=256 if task == "math" else 32)
        p.add_argument("--task-name", help="task or answer kind (default: from the file name)")
        p.add_argument("--reference-rule", action="store_true",
                       help="extract answers exactly as the reference does (last number), not 'The answer is' first")
        p.add_argument("--out", help="directory for per-item predictions (JSONL) and the summary")
        p.add_argument("--json", help="also write the summary to this JSON file")
        if task == "commonsense":
            p.add_argument("--scoring", choices=("generate", "loglik"), default="generate",
                           help="generate and extract the answer, or pick the choice of highest log-likelihood")
            p.add_argument("--continuation", choices=("response", "option", "question"), default="response",
                           help="loglik: score 'the correct answer is answerK', the option's text, or the option's "
                                "text after 'Question: ...\\nAnswer:' (lm-evaluation-harness's ARC format)")
        p.set_defaults(func=cmd_eval_task)

    p = sub.add_parser("finetune", help="fine-tune the codebooks of a sketched model on instruction data")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSON/JSONL records {instruction, input, output}")
    p.add_argument("--out", required=True, help="run directory (logs, checkpoints, codebooks); resumed if present")
    p.add_argument("--codebooks", help="start from these fine-tuned codebooks")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--pad-multiple", type=int, default=64,
                   help="pad batches to a multiple of this many tokens (each length compiles once)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (also automatic)")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"sketchtune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
