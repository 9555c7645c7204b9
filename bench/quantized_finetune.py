"""The paper's quantized fine-tuning comparison (its Table 4) on SmolLM2-135M and WikiText-2.

Every row fine-tunes one model by one method on the same packed windows of WikiText-2 text
(language modelling, every token scored; same batches, seed, steps), its learning rate picked
from a grid by short pilot runs scored on validation windows (extended half a decade at a time,
twice at most, while the best pilot is at the grid's edge), then is scored once on the test
windows, before and after fine-tuning:

- ``lora-r64``: LoRA on the dense model; ``full``: every weight trains (the ceiling);
- ``qlora-r64-nf{4,3,2}``: LoRA on a NormalFloat-k base (absmax per block of 64);
- ``loftq-r64-nf{4,3,2}``: the same, base and adapter initialised by LoftQ (5 alternations);
- ``sketch-int{4,3,2}-g{1,4}``: the codebooks of a sketch made with the project's recipe for
  its width (``SKETCH_RECIPES``, the one command the README gives), healed as the recipe says.

Text ranges of ``wikitext-2/test.txt`` (fractions of its characters), which never overlap:
training windows from 0.5:1 (where the sketches were calibrated and healed), validation
windows from 0.25:0.5 for the learning rate, and the test windows the README has always used
(the first 20 x 512 tokens of the file), read only after a row's choices are fixed.

    python bench/quantized_finetune.py --work runs/qft --out bench/results/quantized-finetune/quantized-finetune-smollm2-135m-cpu.json
    python bench/quantized_finetune.py --rows qlora-r64-nf2 --work runs/qft --out ONE_ROW.json   # one row

Every stage is cached under ``--work`` (sketches and fine-tuning runs resume, finished pilots and
rows are read back), so the same command continues where it stopped; several processes may
work on different ``--rows`` of one ``--work`` at once. Prints a table and writes JSON with every
figure beside its bootstrap standard error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import DATA, ROOT, WIKITEXT, result_header

TEXT = WIKITEXT
MATH_TRAIN = DATA / "math" / "math_data.train.json"
GSM8K_TEST = DATA / "math" / "gsm8k.test.json"
MATH_ROWS = ("lora-r64", "qlora-r64-nf4", "qlora-r64-nf2", "loftq-r64-nf2", "sketch-int4-g4", "sketch-int2-g4")
MODEL = "smollm2-135m"
TRAIN_RANGE = (0.5, 1.0)
VAL_RANGE = (0.25, 0.5)

# Recipe flags of `sketchtune sketch` per width (docs/recipes.md):
# INT3/INT4 layer-tuned from 128 windows and healed 32 steps; INT2 act-order, true-sequential,
# 256 windows, layer tuning 64 and a 64-step heal with the norms.
SKETCH_RECIPES = {
    4: "--nsamples 128 --seq-len 512 --layer-tune-steps 32 --heal-steps 32 --heal-batch-size 2 --heal-lr 5e-4",
    3: "--nsamples 128 --seq-len 512 --layer-tune-steps 32 --heal-steps 32 --heal-batch-size 2 --heal-lr 5e-4",
    2: "--act-order --true-sequential --nsamples 256 --seq-len 512 --layer-tune-steps 64 "
    "--heal-steps 64 --heal-batch-size 2 --heal-lr 5e-4 --heal-train-norms",
}
LORA_LRS = (1e-4, 3e-4, 1e-3)
SKETCH_LRS = (1e-4, 3e-4, 1e-3)
FULL_LRS = (1e-5, 3e-5, 1e-4)
# A grid whose best point is its edge says the optimum may lie beyond it: pilots go on half a decade
# at a time in that direction, at most this many points beyond the grid.
GRID_EXTENSIONS = 2


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration of the table: the method, its base and its learning-rate grid."""

    name: str
    method: str
    lrs: tuple[float, ...]
    qtype: str | None = None
    loftq: bool = False
    bits: int | None = None
    groups_per_row: int | None = None

    @property
    def family(self) -> str:
        if self.method == "sketch":
            return f"SketchTune INT{self.bits} GPR{self.groups_per_row}"
        if self.loftq:
            return f"LoftQ {self.qtype.upper()}"
        return {"lora": "LoRA (dense base)", "qlora": f"QLoRA {(self.qtype or '').upper()}", "full": "full"}[
            self.method
        ]


def all_rows() -> dict[str, Row]:
    rows = [Row("lora-r64", "lora", LORA_LRS)]
    for q in ("nf4", "nf3", "nf2"):
        rows.append(Row(f"qlora-r64-{q}", "qlora", LORA_LRS, qtype=q))
        rows.append(Row(f"loftq-r64-{q}", "qlora", LORA_LRS, qtype=q, loftq=True))
    for g in (4, 1):
        for b in (4, 3, 2):
            rows.append(Row(f"sketch-int{b}-g{g}", "sketch", SKETCH_LRS, bits=b, groups_per_row=g))
    rows.append(Row("full", "full", FULL_LRS))
    return {r.name: r for r in rows}


# Ordered by what the comparison needs first: the 2-bit and 3-bit rows, then 4 bits, then the rest.
DEFAULT_ORDER = (
    "qlora-r64-nf2",
    "loftq-r64-nf2",
    "sketch-int2-g4",
    "qlora-r64-nf3",
    "loftq-r64-nf3",
    "sketch-int3-g4",
    "lora-r64",
    "qlora-r64-nf4",
    "loftq-r64-nf4",
    "sketch-int4-g4",
    "full",
    "sketch-int2-g1",
    "sketch-int3-g1",
    "sketch-int4-g1",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(DEFAULT_ORDER), help="comma-separated rows, in the order they run")
    p.add_argument("--work", default="runs/qft", help="cache of sketches, runs and finished rows (resumable)")
    p.add_argument("--out", required=True, help="JSON file of the table")
    p.add_argument("--text", default=str(TEXT), help="WikiText-2 text")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=25, help="optimizer steps of a final run")
    p.add_argument("--pilot-steps", type=int, default=8, help="optimizer steps of a learning-rate pilot")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--val-windows", type=int, default=20, help="validation windows scoring the pilots")
    p.add_argument("--test-windows", type=int, default=20)
    p.add_argument("--loftq-iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test windows")
    p.add_argument(
        "--math-rows",
        default="",
        help=f"rows that also get the math column (fine-tune on math_data.train, score GSM8K); e.g. {','.join(MATH_ROWS)}",
    )
    p.add_argument("--math-nll-limit", type=int, default=200, help="GSM8K test items scored by reference NLL")
    p.add_argument("--math-gen-limit", type=int, default=50, help="GSM8K test items scored by generated answer")
    p.add_argument("--math-max-new-tokens", type=int, default=192)
    p.add_argument("--report-only", action="store_true", help="assemble the table from finished rows only")
    args = p.parse_args(argv)
    known = all_rows()
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.math_rows = [r.strip() for r in args.math_rows.split(",") if r.strip()]
    unknown = [r for r in args.rows + args.math_rows if r not in known]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(known)}")
    if not Path(args.text).is_file():
        p.error(f"text not found: {args.text}")
    return args


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What every row shares; a finished row is reused only under the same settings."""
    return {
        "model": MODEL,
        "text": str(Path(args.text).resolve()),
        "train_range": list(TRAIN_RANGE),
        "val_range": list(VAL_RANGE),
        "steps": args.steps,
        "pilot_steps": args.pilot_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "train_tokens": args.steps * args.batch_size * args.seq_len,
        "val_windows": args.val_windows,
        "test_windows": args.test_windows,
        "rank": args.rank,
        "loftq_iters": args.loftq_iters,
        "seed": args.seed,
        "lr_grid_extensions": GRID_EXTENSIONS,
    }


def sketch_command(row: Row, out: Path, text: str) -> list[str]:
    """The one `sketchtune sketch` command (recipe flags included) that makes a row's sketch."""
    return [
        sys.executable,
        "-m",
        "sketchtune_jax.cli",
        "sketch",
        MODEL,
        "--bits",
        str(row.bits),
        "--groups-per-row",
        str(row.groups_per_row),
        "--calib",
        text,
        "--calib-range",
        f"{TRAIN_RANGE[0]}:{TRAIN_RANGE[1]}",
        *shlex.split(SKETCH_RECIPES[row.bits]),
        "--out",
        str(out),
    ]


def prepare_sketch(row: Row, work: Path, text: str) -> tuple[str, dict[str, Any]]:
    """The row's sketched directory (made by the recipe command unless already there) and its preparation record."""
    out = work / "sketches" / f"int{row.bits}-g{row.groups_per_row}"
    cmd = sketch_command(row, out, text)
    config = read_json(out / "sketch_config.json") or {}
    # Finished once healed: the recipe's command resumes an unfinished sketch or heal.
    if "heal" not in config:
        print("$ sketchtune", shlex.join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        config = read_json(out / "sketch_config.json")
    report = config.get("report") or {}
    heal = config.get("heal") or {}
    prep = {
        "command": "sketchtune " + shlex.join(cmd[3:]),
        "sketch_seconds": report.get("seconds"),
        "heal_seconds": heal.get("seconds"),
    }
    prep["seconds"] = sum(v for v in (prep["sketch_seconds"], prep["heal_seconds"]) if v is not None)
    return str(out), prep


def prepare_loftq(settings, out: Path) -> tuple[str, str, dict[str, Any]]:
    """LoftQ once per row (`loftq_to_dir`): the quantized base, the initial adapter and the record."""
    from sketchtune_jax.jobs import loftq_to_dir

    done = read_json(out / "loftq.json")
    if done is None:
        loftq_to_dir(MODEL, settings, out, overwrite=True)
        done = read_json(out / "loftq.json")
    prep = {"seconds": done["loftq_seconds"], "what": f"quantize + LoftQ ({settings.loftq_iters} iterations)"}
    return done["base"], done["adapter"], prep


def method_of(row: Row, rank: int, loftq_iters: int, seed: int):
    """``(job, lora, method)``: the `FinetuneSettings` and `LoraSettings` a row trains with, and the
    `FinetuneMethod` they make."""
    from sketchtune_jax.train.config import FinetuneSettings
    from sketchtune_jax.train.lora import LoraSettings
    from sketchtune_jax.train.methods import method_for

    job = FinetuneSettings(method=row.method, lora_rank=rank, lora_alpha=2.0 * rank, qlora_qtype=row.qtype or "nf4")
    lora = LoraSettings(qtype=row.qtype, init="loftq" if row.loftq else "default", loftq_iters=loftq_iters, seed=seed)
    return job, lora, method_for(job, lora, sketched=row.method == "sketch")


def load_result(row: Row, model_ref: str, run: Path | None):
    """The model a finished run (or, with ``run`` None, the row's starting point) evaluates as:
    loaded the way a user loads it (`sketchtune eval ppl` with ``--codebooks``/``--adapter``)."""
    from sketchtune_jax.io.loading import load_any

    if run is None:
        return load_any(model_ref)
    if row.method == "sketch":
        return load_any(model_ref, codebooks=str(run / "codebooks.safetensors"))
    if row.method == "full":
        return load_any(str(run / "model"))
    return load_any(model_ref, adapter=str(run / "adapter"))


def initial_model(model_ref: str, method, adapter: str | None):
    """The model as fine-tuning starts (for QLoRA the quantized base with its initial adapter; for
    LoftQ the adapter ``loftq_to_dir`` wrote) and the seconds preparing it took (quantization)."""
    from sketchtune_jax.io.loading import load_any
    from sketchtune_jax.train.adapters import load_adapter

    loaded = load_any(model_ref)
    t0 = time.perf_counter()
    model = (
        method.prepare(loaded.model) if adapter is None else load_adapter(loaded.model, adapter, for_training=True)[0]
    )
    return loaded, model, time.perf_counter() - t0


def finetune_run(
    model_ref: str, adapter: str | None, job, lora, lr: float, steps: int, run: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Fine-tune (or resume) into ``run``; the summary, with train tokens/s from the run's log."""
    from sketchtune_jax.jobs import finetune_to_dir
    from sketchtune_jax.train import TrainConfig
    from sketchtune_jax.train.metrics_log import read_log

    done = read_json(run / "summary.json")
    if done is None:
        config = TrainConfig(
            lr=lr,
            schedule="cosine",
            warmup_steps=0,
            batch_size=args.batch_size,
            max_steps=steps,
            seq_len=args.seq_len,
            save_every=0 if steps <= args.pilot_steps else 10,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        done = finetune_to_dir(
            model_ref,
            run,
            config,
            dataclasses.replace(job, text_range=TRAIN_RANGE),
            text=args.text,
            lora=lora,
            adapter=adapter,
            resume=run.is_dir() and any(run.iterdir()),
            progress=True,
        )
        done["wall_seconds"] = time.perf_counter() - t0
        log = read_log(done["log"])
        # The first step compiles; its rate is left out.
        rates = [r["tokens_per_s"] for r in log if r.get("step", 0) > 1 and "tokens_per_s" in r]
        done["train_tokens_per_s"] = sum(rates) / len(rates) if rates else None
        (run / "summary.json").write_text(json.dumps(done, indent=2))
    return done


def ppl(model, tokenizer, text: str, windows: int, seq_len: int) -> dict[str, Any]:
    from sketchtune_jax.eval.perplexity import perplexity

    return perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=windows, show_progress=False).to_dict()


def bootstrap_ppl(window_nll: list[float], resamples: int, seed: int) -> float:
    """Standard error of the perplexity (exp of the mean window NLL) by a bootstrap over windows."""
    import numpy as np

    nll = np.asarray(window_nll, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(resamples, len(nll)))
    return float(np.std(np.exp(nll[idx].mean(axis=1)), ddof=1))


def memory_of(model_ref: str, method, adapter: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Compiled train-step memory, trainable count and base bytes held, on a freshly prepared model."""
    import numpy as np
    from flax import nnx

    from sketchtune_jax.train import TrainConfig, make_optimizer, trainable_parameter_count
    from sketchtune_jax.train.lora import base_weight_bytes
    from sketchtune_jax.train.profiling import train_step_memory

    loaded, model, prepare_s = initial_model(model_ref, method, adapter)
    config = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, max_steps=args.steps)
    optimizer = nnx.Optimizer(model, make_optimizer(config, args.steps), wrt=method.wrt)
    ones = np.ones((args.batch_size, args.seq_len), np.int32)
    batch = {"input_ids": ones, "attention_mask": ones, "loss_mask": ones}
    out = {
        "trainable_params": trainable_parameter_count(model, method.wrt),
        "base_bytes": base_weight_bytes(model),
        "projection_bytes": base_weight_bytes(model, projections_only=True),
        "prepare_seconds": prepare_s,
        **train_step_memory(model, optimizer, batch),
    }
    return out


def best_lr(scores: dict[float, float]) -> float:
    """The learning rate of the lowest validation perplexity (a diverged pilot, NaN or inf, never wins)."""
    return min(scores, key=lambda lr: scores[lr] if math.isfinite(scores[lr]) else math.inf)


def next_pilot_lr(scores: dict[float, float], grid: tuple[float, ...]) -> float | None:
    """The next pilot while the best learning rate is at an edge of those tried: half a decade beyond it
    (1e-3 -> 3e-3 -> 1e-2), at most ``GRID_EXTENSIONS`` beyond ``grid``; None once the best is inside."""
    tried = sorted(scores)
    best = best_lr(scores)
    if best == tried[-1] and sum(lr > max(grid) for lr in tried) < GRID_EXTENSIONS:
        return half_decade(best, up=True)
    if best == tried[0] and sum(lr < min(grid) for lr in tried) < GRID_EXTENSIONS:
        return half_decade(best, up=False)
    return None


def half_decade(lr: float, *, up: bool) -> float:
    """The neighbour of ``lr`` on the 1, 3, 10, 30 ... ladder."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent)
    if mantissa not in (1, 3):
        raise ValueError(f"learning rate {lr:g} is not on the 1, 3, 10 ladder")
    factor = {(1, True): 3, (3, True): 10 / 3, (1, False): 0.3, (3, False): 1 / 3}[mantissa, up]
    return float(f"{lr * factor:.0e}")


def row_identity(row: Row) -> dict[str, Any]:
    """What a row is, as its JSON record names it: method, base width, groups per row, adapter init."""
    return {
        "row": row.name,
        "family": row.family,
        "method": row.method,
        "qtype": row.qtype,
        "init": "loftq" if row.loftq else None,
        "bits": row.bits or (int(row.qtype[-1]) if row.qtype else None),
        "groups_per_row": row.groups_per_row,
    }


def run_row(row: Row, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from sketchtune_jax.data.text import read_text, text_fraction

    row_dir = work / "rows" / row.name
    finished = read_json(row_dir / "row.json")
    if finished is not None and finished.get("settings") == settings_of(args):
        return finished
    row_dir.mkdir(parents=True, exist_ok=True)
    prep: dict[str, Any] = {}
    adapter = None
    job, lora, method = method_of(row, args.rank, args.loftq_iters, args.seed)
    if row.method == "sketch":
        model_ref, prep = prepare_sketch(row, work, args.text)
    elif row.loftq:
        model_ref, adapter, prep = prepare_loftq(method.lora, row_dir / "loftq-init")
    else:
        model_ref = MODEL
    val_text = text_fraction(read_text(args.text), VAL_RANGE)

    costs = read_json(row_dir / "costs.json")
    if costs is None:
        costs = memory_of(model_ref, method, adapter, args)
        (row_dir / "costs.json").write_text(json.dumps(costs, indent=2))
    if row.method != "sketch" and not row.loftq:
        what = {"lora": "adapters", "full": "none", "qlora": "quantize"}[row.method]
        prep = {"seconds": costs["prepare_seconds"], "what": what}

    def pilot(lr: float) -> dict[str, Any]:
        pilot_dir = row_dir / f"pilot-lr{lr:g}"
        scored = read_json(pilot_dir / "val.json")
        if scored is None:
            summary = finetune_run(model_ref, adapter, job, lora, lr, args.pilot_steps, pilot_dir / "run", args)
            loaded = load_result(row, model_ref, pilot_dir / "run")
            scored = {"lr": lr, "val": ppl(loaded.model, loaded.tokenizer, val_text, args.val_windows, args.seq_len)}
            scored["train_loss"] = summary["loss"]
            (pilot_dir / "val.json").write_text(json.dumps(scored, indent=2))
        print(f"{row.name}: pilot lr {lr:g}: validation perplexity {scored['val']['ppl']:.3f}", flush=True)
        return scored

    pilots = {lr: pilot(lr) for lr in row.lrs}
    while (lr := next_pilot_lr({lr: p["val"]["ppl"] for lr, p in pilots.items()}, row.lrs)) is not None:
        pilots[lr] = pilot(lr)
    pilots = [pilots[lr] for lr in sorted(pilots)]
    lr = best_lr({p["lr"]: p["val"]["ppl"] for p in pilots})

    final_dir = row_dir / f"final-lr{lr:g}"
    summary = finetune_run(model_ref, adapter, job, lora, lr, args.steps, final_dir, args)
    test_text = read_text(args.text)
    before = read_json(row_dir / "test-before.json")
    if before is None:
        loaded, model, _ = initial_model(model_ref, method, adapter)
        before = ppl(model, loaded.tokenizer, test_text, args.test_windows, args.seq_len)
        (row_dir / "test-before.json").write_text(json.dumps(before, indent=2))
    loaded = load_result(row, model_ref, final_dir)
    after = ppl(loaded.model, loaded.tokenizer, test_text, args.test_windows, args.seq_len)
    result = {
        **row_identity(row),
        "model": model_ref,
        "preparation": prep,
        "lr_grid": [{"lr": p["lr"], "val_ppl": p["val"]["ppl"], "train_loss": p["train_loss"]} for p in pilots],
        "lr": lr,
        "test_ppl_before": before["ppl"],
        "test_ppl_before_stderr": bootstrap_ppl(before["window_nll"], args.bootstrap, args.seed),
        "test_ppl_after": after["ppl"],
        "test_ppl_after_stderr": bootstrap_ppl(after["window_nll"], args.bootstrap, args.seed),
        "test_window_nll_after": after["window_nll"],
        "test_window_nll_before": before["window_nll"],
        "train_loss": summary["loss"],
        "train_tokens_per_s": summary.get("train_tokens_per_s"),
        "train_wall_seconds": summary.get("wall_seconds"),
        **{k: costs[k] for k in ("trainable_params", "base_bytes", "projection_bytes")},
        "train_step_memory_bytes": costs.get("argument_bytes", 0) + costs.get("temp_bytes", 0),
        "train_step_temp_bytes": costs.get("temp_bytes"),
        "settings": settings_of(args),
    }
    (row_dir / "row.json").write_text(json.dumps(result, indent=2))
    return result


def math_scores(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """GSM8K test: reference-solution NLL (first ``--math-nll-limit``) and generated-answer accuracy
    (first ``--math-gen-limit``), each with its standard error."""
    from sketchtune_jax.data.records import load_instruction_data
    from sketchtune_jax.eval.tasks import evaluate_task, reference_nll
    from sketchtune_jax.models.generate import generate_text

    records = load_instruction_data(str(GSM8K_TEST))
    nll = reference_nll(model, tokenizer, records, seq_len=1024, limit=args.math_nll_limit)

    def generate_fn(prompts: list[str]) -> list[str]:
        return generate_text(model, tokenizer, prompts, max_new_tokens=args.math_max_new_tokens)

    acc = evaluate_task(generate_fn, records, tokenizer, task="gsm8k", limit=args.math_gen_limit)
    p, n = acc["accuracy"], acc["n"]
    return {
        "nll": nll["nll"],
        "nll_stderr": nll["stderr"],
        "nll_n": nll["n"],
        "record_nll": nll["record_nll"],
        "record_tokens": nll["record_tokens"],
        "accuracy": p,
        "accuracy_stderr": math.sqrt(p * (1 - p) / n),
        "accuracy_n": n,
        "no_answer": acc.get("no_answer"),
    }


def run_math(row: Row, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The row's math column: fine-tune on math_data.train (instruction records, response scored) with
    the learning rate its text grid chose, as many steps and windows as the text runs, then score GSM8K."""
    from sketchtune_jax.jobs import finetune_to_dir
    from sketchtune_jax.train import TrainConfig

    row_dir = work / "rows" / row.name
    text_row = read_json(row_dir / "row.json")
    if text_row is None:
        raise RuntimeError(f"{row.name}: its text row must finish first (it picks the learning rate)")
    done = read_json(row_dir / "math.json")
    if done is not None and done.get("settings") == settings_of(args):
        return done
    job, lora, method = method_of(row, args.rank, args.loftq_iters, args.seed)
    adapter = None
    if row.loftq:
        model_ref, adapter, _ = prepare_loftq(method.lora, row_dir / "loftq-init")
    else:
        model_ref = text_row["model"]
    before = read_json(row_dir / "math-before.json")
    if before is None:
        loaded, model, _ = initial_model(model_ref, method, adapter)
        before = math_scores(model, loaded.tokenizer, args)
        (row_dir / "math-before.json").write_text(json.dumps(before, indent=2))
    run = row_dir / f"math-lr{text_row['lr']:g}"
    if not (run / "summary.json").is_file():
        config = TrainConfig(
            lr=text_row["lr"],
            schedule="cosine",
            warmup_steps=0,
            batch_size=args.batch_size,
            max_steps=args.steps,
            seq_len=args.seq_len,
            save_every=10,
            seed=args.seed,
        )
        finetune_to_dir(
            model_ref,
            run,
            config,
            job,
            data=str(MATH_TRAIN),
            lora=lora,
            adapter=adapter,
            resume=run.is_dir() and any(run.iterdir()),
        )
    loaded = load_result(row, model_ref, run)
    after = math_scores(loaded.model, loaded.tokenizer, args)
    done = {"row": row.name, "lr": text_row["lr"], "before": before, "after": after, "settings": settings_of(args)}
    (row_dir / "math.json").write_text(json.dumps(done, indent=2))
    return done


def paired_difference(a: dict[str, Any], b: dict[str, Any], resamples: int, seed: int) -> tuple[float, float]:
    """``ppl_a - ppl_b`` after fine-tuning and its bootstrap standard error over the same test windows."""
    import numpy as np

    x = np.asarray(a["test_window_nll_after"])
    y = np.asarray(b["test_window_nll_after"])
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    diffs = np.exp(x[idx].mean(axis=1)) - np.exp(y[idx].mean(axis=1))
    return float(np.exp(x.mean()) - np.exp(y.mean())), float(np.std(diffs, ddof=1))


def paired_nll_difference(a: dict[str, Any], b: dict[str, Any], resamples: int, seed: int) -> tuple[float, float]:
    """GSM8K reference NLL per token, ``a - b`` after fine-tuning, and its bootstrap standard error over
    the same test items (each a ratio of summed NLL to tokens)."""
    import numpy as np

    tokens = np.asarray(a["after"]["record_tokens"], np.float64)
    x = np.asarray(a["after"]["record_nll"], np.float64)
    y = np.asarray(b["after"]["record_nll"], np.float64)
    if len(x) != len(y) or not np.array_equal(tokens, np.asarray(b["after"]["record_tokens"], np.float64)):
        raise ValueError(f"{a['row']} and {b['row']} were scored on different GSM8K items")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    diffs = (x[idx].sum(axis=1) - y[idx].sum(axis=1)) / tokens[idx].sum(axis=1)
    return float((x.sum() - y.sum()) / tokens.sum()), float(np.std(diffs, ddof=1))


def references(row: dict[str, Any]) -> tuple[str, ...]:
    """The rows ``row`` is read against: a sketch against QLoRA and LoftQ at its width, LoRA and full
    fine-tuning on the dense model, and a GPR 1 sketch also against GPR 4 at its width; LoftQ against
    QLoRA at its width; full fine-tuning against LoRA."""
    if row["method"] == "sketch":
        bits = row["bits"]
        sibling = (f"sketch-int{bits}-g4",) if row["groups_per_row"] == 1 else ()
        return (f"qlora-r64-nf{bits}", f"loftq-r64-nf{bits}", "lora-r64", "full", *sibling)
    if row.get("init") == "loftq":
        return (f"qlora-r64-{row['qtype']}",)
    if row["method"] == "full":
        return ("lora-r64",)
    return ()


def paired_comparisons(
    rows: dict[str, dict[str, Any]],
    scored: dict[str, dict[str, Any]],
    difference,
    figure: str,
    resamples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Each row in ``scored`` against its `references` there: ``difference(a, b, resamples, seed)`` gives
    ``(a - b, stderr)``, reported under ``figure`` with whether it exceeds 2 stderr."""
    out = []
    for name, a in scored.items():
        for other in references(rows[name]):
            if other not in scored:
                continue
            diff, se = difference(a, scored[other], resamples, seed)
            out.append({"a": name, "b": other, figure: diff, "stderr": se, "beyond_two_stderr": abs(diff) > 2 * se})
    return out


def comparisons(rows: dict[str, dict[str, Any]], resamples: int, seed: int) -> list[dict[str, Any]]:
    """Each row's test perplexity against its references' (paired over the same test windows)."""
    return paired_comparisons(rows, rows, paired_difference, "ppl_a_minus_b", resamples, seed)


def math_comparisons(
    rows: dict[str, dict[str, Any]], maths: dict[str, dict[str, Any]], resamples: int, seed: int
) -> list[dict[str, Any]]:
    """Each row's GSM8K reference NLL against its references' (paired over the same items)."""
    return paired_comparisons(rows, maths, paired_nll_difference, "nll_a_minus_b", resamples, seed)


def finished_math(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The math columns finished under the current settings, for rows whose text row is finished."""
    maths = {}
    for name in rows:
        m = read_json(Path(args.work) / "rows" / name / "math.json")
        if m is not None and m.get("settings") == settings_of(args):
            maths[name] = m
    return maths


def write_report(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from sketchtune_jax._utils.fileio import write_json_atomic

    maths = finished_math(args, rows)
    report = {
        **result_header(__file__),
        "benchmark": "quantized-finetune",
        "settings": settings_of(args),
        "rows": list(rows.values()),
        "comparisons": comparisons(rows, args.bootstrap, args.seed),
        "missing": [r for r in DEFAULT_ORDER if r not in rows],
        "math": list(maths.values()),
        "math_comparisons": math_comparisons(rows, maths, args.bootstrap, args.seed),
    }
    write_json_atomic(args.out, report)

    def ppl_cell(value: float, stderr: float) -> str:
        # A diverged run's perplexity (QLoRA NF2 reaches 1e9) in the same column width.
        return f"{value:.2f} ± {stderr:.2f}" if value < 1e4 else f"{value:.3g} ± {stderr:.2g}"

    print(f"{'row':<16} {'trainable':>10} {'proj MB':>8} {'prep s':>7} {'lr':>7} {'ppl before':>20} {'ppl after':>20}")
    for r in rows.values():
        print(
            f"{r['row']:<16} {r['trainable_params']:>10,} {r['projection_bytes'] / 1e6:>8.1f} "
            f"{(r['preparation'].get('seconds') or 0):>7.0f} {r['lr']:>7.0e} "
            f"{ppl_cell(r['test_ppl_before'], r['test_ppl_before_stderr']):>20} "
            f"{ppl_cell(r['test_ppl_after'], r['test_ppl_after_stderr']):>20}"
        )
    if maths:
        print(
            f"\n{'row (GSM8K)':<16} {'ref NLL before':>18} {'ref NLL after':>18} {'acc before':>14} {'acc after':>14}"
        )
        for name, m in maths.items():
            b, a = m["before"], m["after"]
            print(
                f"{name:<16} {b['nll']:>9.3f} ± {b['nll_stderr']:<6.3f} {a['nll']:>9.3f} ± {a['nll_stderr']:<6.3f} "
                f"{b['accuracy']:>6.2f} ± {b['accuracy_stderr']:<5.2f} {a['accuracy']:>6.2f} ± {a['accuracy_stderr']:<5.2f}"
            )
    print(f"wrote {args.out}")
    return report


def finished_rows(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    for name in DEFAULT_ORDER:
        r = read_json(work / "rows" / name / "row.json")
        if r is not None and r.get("settings") == settings_of(args):
            rows[name] = r
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    known = all_rows()
    if not args.report_only:
        for name in args.rows:
            print(f"== {name} ==", flush=True)
            run_row(known[name], args, work)
        for name in args.math_rows:
            print(f"== {name} (math) ==", flush=True)
            run_math(known[name], args, work)
    write_report(args, finished_rows(args, work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
