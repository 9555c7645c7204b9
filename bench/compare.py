"""Sketch tuning side by side with LoRA, QLoRA and full fine-tuning on the same model and data.

One run, one table: every method trains on the same mixture of ARC-Easy, ARC-Challenge,
OpenBookQA and BoolQ train records (same batches, seed, steps, batch and sequence length),
its learning rate chosen on held-out train records (validation loss) from a small grid,
then is scored on the four test sets by generation and by log-likelihood, plus a held-out
set whose answer words no training record uses (ARC-Easy test rewritten with
``ending1..4``). Also: weight bytes as held for training, trainable parameters, train
tokens/s, compiled train-step memory, and serving speed of the result (sketch as is;
LoRA/QLoRA unmerged and merged). Costs do not depend on the trained values: they are
measured last, one method at a time on a freshly prepared model, so no timing shares the
machine with another method's training or evaluation.

    python bench/compare.py --sketch-int4 SKETCH4 --sketch-int3 SKETCH3 --out bench/results/compare/compare.json

Every stage is cached under ``--work`` (fine-tuning runs resume; finished methods are read
back), so an interrupted run continues where it stopped. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from _common import DATA, report, result_header, write_result

COMMONSENSE = DATA / "commonsense"
TASKS = ("ARC-Easy", "ARC-Challenge", "openbookqa", "boolq")
METHODS = ("sketch4", "sketch3", "lora", "qlora", "full")
DEFAULT_LRS = {
    "sketch4": "1e-4,3e-4",
    "sketch3": "1e-4,3e-4",
    "lora": "3e-4,1e-3",
    "qlora": "3e-4,1e-3",
    "full": "1e-5,3e-5",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the dense model (LoRA, QLoRA and full start from it)")
    p.add_argument("--sketch-int4", help="INT4 GPR4 sketched directory of --model (for method sketch4)")
    p.add_argument("--sketch-int3", help="INT3 GPR4 sketched directory of --model (for method sketch3)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train-per-task", type=int, default=400, help="train records drawn from each task")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    for m in METHODS:
        p.add_argument(f"--lrs-{m}", default=DEFAULT_LRS[m], help=f"learning rates tried for {m}")
    p.add_argument("--eval-limit", type=int, default=100, help="test items per task")
    p.add_argument("--gen-limit", type=int, default=50, help="test items per task scored by generation")
    p.add_argument("--serve-prompt", type=int, default=128, help="prompt tokens for the serving-speed figures")
    p.add_argument("--serve-tokens", type=int, default=16, help="decoded tokens for the serving-speed figures")
    p.add_argument("--work", default="runs/compare/work")
    p.add_argument("--out", required=True)
    p.add_argument("--markdown", action="store_true", help="print the results in --out as Markdown tables and exit")
    return p.parse_args(argv)


def run_settings(args: argparse.Namespace, name: str) -> dict:
    """What decides a method's cached result: a cached result made otherwise is not reused."""
    keys = ("model", "train_per_task", "val_fraction", "steps", "batch", "seq", "seed", "eval_limit", "gen_limit")
    return {**{k: getattr(args, k) for k in keys}, "lrs": getattr(args, f"lrs_{name}")}


def markdown_tables(out: dict) -> str:
    """The README's tables from a result JSON: costs and speed, then accuracy by generation / likelihood."""
    lines = [
        "| method | lr | trainable | weights held | step args + temp | train tok/s | TTFT (as trained / merged) "
        "| decode tok/s (as trained / merged) | train loss | val loss |",
        "|" + "---|" * 10,
    ]
    for name, r in out["methods"].items():
        serve = r["serving"]
        merged = serve.get("merged")
        step = r["train_step"]
        lines.append(
            f"| {name} | {r['lr']:g} | {r['trainable_params'] / 1e6:.2f} M | {r['weight_bytes'] / 1e6:.0f} MB "
            f"| {(step.get('argument_bytes', 0) + step.get('temp_bytes', 0)) / 1e9:.2f} GB | {r['tokens_per_s']:.0f} "
            f"| {1e3 * serve['as_trained']['ttft_s']:.0f} ms"
            + (f" / {1e3 * merged['ttft_s']:.0f} ms" if merged else "")
            + f" | {serve['as_trained']['decode_tokens_per_s']:.1f}"
            + (f" / {merged['decode_tokens_per_s']:.1f}" if merged else "")
            + f" | {r['final_train_loss']:.3f} | {r['val_loss']:.3f} |"
        )
    sets = list(next(iter(out["methods"].values()))["accuracy"])
    lines += ["", "| method | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for name, r in out["methods"].items():
        cells = [f"{a['generate']:.2f} / {a['loglik_acc']:.2f}" for a in r["accuracy"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_records(per_task: int, seed: int) -> list[dict]:
    """``per_task`` train records of every task, shuffled together with ``seed``."""
    from sketchtune_jax.data.records import sample_mixture

    return sample_mixture([COMMONSENSE / f"{task}.train.json" for task in TASKS], per_task, seed=seed)


def unseen_words_set(limit: int) -> list[dict]:
    """ARC-Easy test items with four options, their answer words rewritten ``answerK`` -> ``endingK``
    (no training record uses ``ending``): does the tuned model still follow the prompt's format?"""
    from sketchtune_jax.data.records import read_json_records

    out = []
    for r in read_json_records(str(COMMONSENSE / "ARC-Easy.test.json")):
        if "answer4" not in r["instruction"] or "answer5" in r["instruction"]:
            continue
        instruction = re.sub(r"Answer(\d):", r"Ending\1:", r["instruction"]).replace("answer", "ending")
        out.append(
            {
                **r,
                "instruction": instruction,
                "answer": r["answer"].replace("answer", "ending"),
                "output": r["output"].replace("answer", "ending"),
            }
        )
        if len(out) == limit:
            break
    return out


def load_method(args: argparse.Namespace, name: str, loaded_dense=None):
    """``(loaded, method)`` ready to train for method ``name``."""
    from sketchtune_jax import load_any
    from sketchtune_jax.train.lora import LoraSettings, auto_rank
    from sketchtune_jax.train.methods import FinetuneMethod

    if name.startswith("sketch"):
        return load_any(args.sketch_int4 if name == "sketch4" else args.sketch_int3), FinetuneMethod("sketch")
    loaded = load_any(args.model)
    if name == "full":
        return loaded, FinetuneMethod("full")
    rank = auto_rank(loaded.model)
    settings = LoraSettings(rank=rank, alpha=2.0 * rank, qtype="nf4" if name == "qlora" else None, seed=args.seed)
    return loaded, FinetuneMethod(name, lora=settings)


def run_method(args: argparse.Namespace, name: str, train, val) -> dict:
    """Train ``name`` at each learning rate of its grid, keep the best on validation, score it."""
    import numpy as np

    from sketchtune_jax.train import TrainConfig, finetune, read_log
    from sketchtune_jax.train.lora import merge_lora

    work = Path(args.work) / name
    lrs = [float(x) for x in getattr(args, f"lrs_{name}").split(",")]
    sweep, best = {}, None
    for lr in lrs:
        loaded, method = load_method(args, name)
        model = method.prepare(loaded.model)
        config = TrainConfig(
            lr=lr,
            schedule="cosine",
            warmup_steps=max(1, args.steps // 10),
            max_steps=args.steps,
            batch_size=args.batch,
            seq_len=args.seq,
            save_every=max(10, args.steps // 2),
            keep_checkpoints=1,
            seed=args.seed,
        )
        run_dir = work / f"lr{lr:g}"
        result = finetune(model, train, config, run_dir, val_batches=val, wrt=method.wrt, save_result=lambda m, d: d)
        log = [r for r in read_log(run_dir / "train_log.jsonl") if "loss" in r]
        sweep[f"{lr:g}"] = {
            "val_loss": result.val_loss,
            "final_train_loss": float(np.mean([r["loss"] for r in log[-10:]])),
        }
        if best is None or result.val_loss < sweep[best[0]]["val_loss"]:
            best = (f"{lr:g}", loaded, method, model, config)
    lr, loaded, method, model, config = best
    out = {"method": name, "lr": float(lr), "lr_sweep": sweep, **sweep[lr]}
    # What the best run keeps (adapter, codebooks, or the full model for bench/update_analysis.py).
    out["result"] = method.result_writer(config=loaded.config, tokenizer=loaded.tokenizer, base_model=args.model)(
        model, str(work)
    )
    if method.lora is not None:
        out.update(lora_rank=method.lora.rank, lora_alpha=method.lora.alpha, lora_qtype=method.lora.qtype)
    # Accuracy of the result as served: LoRA/QLoRA merged (the same function as unmerged).
    eval_model = merge_lora(model, method.lora) if method.lora is not None else model
    out["accuracy"] = evaluate(args, eval_model, loaded.tokenizer, work)
    return out


def cost_settings(args: argparse.Namespace) -> dict:
    """What decides a method's measured costs."""
    return {k: getattr(args, k) for k in ("model", "batch", "seq", "serve_prompt", "serve_tokens")}


def measure_costs(args: argparse.Namespace, name: str, batch: dict) -> dict:
    """What ``name`` costs, on a freshly prepared model (costs do not depend on the trained values):
    weights held, trainable parameters, compiled train-step memory and speed on ``batch``, and
    serving speed (as trained; LoRA/QLoRA merged too). Run when nothing else is: these are timings."""
    from flax import nnx

    from sketchtune_jax.train import TrainConfig, make_optimizer, trainable_parameter_count
    from sketchtune_jax.train.lora import merge_lora
    from sketchtune_jax.train.profiling import serving_speed, state_bytes, train_step_memory, train_step_speed

    loaded, method = load_method(args, name)
    model = method.prepare(loaded.model)
    out = {"weight_bytes": state_bytes(model), "trainable_params": trainable_parameter_count(model, method.wrt)}
    served = {"as_trained": model}
    if method.lora is not None:
        served["merged"] = merge_lora(model, method.lora)
    out["serving"] = {
        k: serving_speed(m, prompt_len=args.serve_prompt, new_tokens=args.serve_tokens, repeats=3)
        for k, m in served.items()
    }
    config = TrainConfig(lr=1e-5, max_steps=8, batch_size=args.batch, seq_len=args.seq)
    optimizer = nnx.Optimizer(model, make_optimizer(config, config.max_steps), wrt=method.wrt)
    out["train_step"] = train_step_memory(model, optimizer, batch)
    out["train_step"].update(train_step_speed(model, optimizer, batch, steps=3, warmup=1))
    out["tokens_per_s"] = out["train_step"]["tokens_per_s"]
    return out


def evaluate(args: argparse.Namespace, model, tokenizer, work: Path) -> dict:
    """Generation and log-likelihood accuracy on every test set and on the unseen-words set."""
    from sketchtune_jax.eval.multiple_choice import evaluate_multiple_choice
    from sketchtune_jax.eval.tasks import evaluate_task
    from sketchtune_jax.models.generate import generate_text

    def generate_fn(prompts):
        return generate_text(model, tokenizer, prompts, max_new_tokens=12)

    sets = {t: str(COMMONSENSE / f"{t}.test.json") for t in TASKS}
    unseen = unseen_words_set(args.eval_limit)
    results = {}
    for name, records in [*sets.items(), ("ARC-Easy-unseen-words", unseen)]:
        task = "ending" if name.endswith("unseen-words") else name.lower()
        gen = evaluate_task(generate_fn, records, tokenizer, task=task, limit=args.gen_limit, batch_size=16)
        ll = evaluate_multiple_choice(model, tokenizer, records, limit=args.eval_limit, batch_size=16)
        results[name] = {
            "generate": gen["accuracy"],
            "generate_no_answer": gen["no_answer"],
            "n_generate": gen["n"],
            "loglik_acc": ll["acc"],
            "loglik_acc_norm": ll["acc_norm"],
            "n_loglik": ll["n"],
            "chance": ll["chance"],
        }
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from sketchtune_jax import load_any
    from sketchtune_jax.data.batches import build_batches

    if args.markdown:
        print(markdown_tables(json.loads(Path(args.out).read_text())))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    for name, path in (("sketch4", args.sketch_int4), ("sketch3", args.sketch_int3)):
        if name in methods and not (path and (Path(path) / "sketch_config.json").is_file()):
            raise SystemExit(
                f"method {name} needs --sketch-int{name[-1]}: a sketched directory of --model "
                "(make it with `sketchtune sketch`)"
            )
    tokenizer = load_any(args.model).tokenizer
    train, val = build_batches(
        train_records(args.train_per_task, args.seed),
        tokenizer,
        batch_size=args.batch,
        seq_len=args.seq,
        val_fraction=args.val_fraction,
        seed=args.seed,
        on_long_prompt="skip",
        pad_multiple=args.seq,
    )
    results = {}
    t0 = time.perf_counter()
    for name in methods:
        cached = Path(args.work) / name / "result.json"
        if cached.is_file():
            results[name] = json.loads(cached.read_text())
            # Throughput comes from the costs phase alone: training logs share the machine.
            for entry in results[name]["lr_sweep"].values():
                entry.pop("tokens_per_s", None)
            saved = results[name].get("settings")
            if saved is not None and saved != run_settings(args, name):
                raise SystemExit(f"{cached} was made with other settings ({saved}); use another --work")
            continue
        print(f"== {name}", flush=True)
        results[name] = run_method(args, name, train, val)
        results[name]["settings"] = run_settings(args, name)
        write_result(results[name], cached)
    import numpy as np

    batch = {k: np.asarray(v) for k, v in next(iter(train.iterate()))[1].items()}
    for name in results:
        cached = Path(args.work) / name / "costs.json"
        costs = json.loads(cached.read_text()) if cached.is_file() else None
        if costs is None or costs.get("settings") != cost_settings(args):
            print(f"== costs of {name}", flush=True)
            costs = {**measure_costs(args, name, batch), "settings": cost_settings(args)}
            write_result(costs, cached)
        results[name].update({k: v for k, v in costs.items() if k != "settings"})
    out = {
        **result_header(__file__, argv),
        "config": vars(args),
        "train_records": train.num_batches * args.batch,
        "seconds": time.perf_counter() - t0,
        "methods": results,
    }
    rows = []
    for name, r in results.items():
        row = {
            "method": name,
            "lr": r["lr"],
            "trainable": r["trainable_params"],
            "weight MB": r["weight_bytes"] / 1e6,
            "tok/s": r["tokens_per_s"],
            "step MB": (r["train_step"].get("argument_bytes", 0) + r["train_step"].get("temp_bytes", 0)) / 1e6,
            "ttft ms": 1e3 * r["serving"]["as_trained"]["ttft_s"],
            "val loss": r["val_loss"],
        }
        for task, acc in r["accuracy"].items():
            row[f"{task} gen/ll"] = f"{acc['generate']:.2f}/{acc['loglik_acc']:.2f}"
        rows.append(row)
    report(out, args.out, summary=rows, title="fine-tuning methods side by side")


if __name__ == "__main__":
    main()
