"""The sketch -> evaluate -> fine-tune -> evaluate -> export pipeline shared by the example scripts."""

from __future__ import annotations

import argparse
from pathlib import Path

import sketchtune_jax as st
from sketchtune_jax._utils.reporting import print_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def add_arguments(parser: argparse.ArgumentParser, *, lr: float, batch_size: int, max_new_tokens: int) -> None:
    """Options common to the example scripts; defaults fit a CPU run on the embedded model."""
    parser.add_argument("--model", default="smollm2-135m", help="dense model to sketch, or a sketched directory")
    parser.add_argument("--out", required=True, help="run directory (sketch, fine-tune run, evaluations, export)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groups-per-row", type=int, default=4)
    parser.add_argument("--calib", default=str(DATA / "wikitext-2" / "test.txt"))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = full epochs)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--val-records", type=int, default=64, help="records held out for validation loss")
    parser.add_argument("--pad-multiple", type=int, default=64, help="pad batches to a multiple of this many tokens")
    parser.add_argument("--eval-limit", type=int, default=100, help="records per evaluation set")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--skip-baseline", action="store_true", help="do not evaluate before fine-tuning")


def sketched_model(args: argparse.Namespace):
    """The sketched model: loaded if ``--model`` is a sketch, else sketched once into ``OUT/sketch``."""
    if st.io.sketched_dir.is_sketched_dir(args.model):
        return st.load_any(args.model)
    sketch_dir = Path(args.out) / "sketch"
    if not st.io.sketched_dir.is_sketched_dir(sketch_dir):
        settings = st.SketchSettings(
            bits=args.bits,
            groups_per_row=args.groups_per_row,
            calib=args.calib,
            nsamples=args.nsamples,
            seq_len=args.calib_seq_len,
        )
        st.sketch_to_dir(args.model, sketch_dir, settings)
    return st.load_any(str(sketch_dir))


def evaluate(loaded, eval_files: list[Path], args: argparse.Namespace, tag: str) -> dict[str, float]:
    """Accuracy on each file's first ``--eval-limit`` records; predictions go to ``OUT/eval-TAG``."""
    out = Path(args.out) / f"eval-{tag}"
    out.mkdir(parents=True, exist_ok=True)

    def generate_fn(prompts: list[str]) -> list[str]:
        return st.generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens)

    scores = {}
    for path in eval_files:
        name = path.name.split(".")[0]
        summary = st.evaluate_task(
            generate_fn,
            path,
            loaded.tokenizer,
            limit=args.eval_limit,
            batch_size=8,
            out_jsonl=out / f"{name}.predictions.jsonl",
            progress=True,
        )
        scores[name] = summary["accuracy"]
    return scores


def run(args: argparse.Namespace, train_file: Path, eval_files: list[Path]) -> dict:
    """Sketch (once), evaluate, fine-tune the codebooks, evaluate again, export; returns the results."""
    out = Path(args.out)
    loaded = sketched_model(args)
    results: dict = {
        "model": args.model,
        "train": str(train_file),
        "trainable_params": st.io.codebooks.trainable_parameter_count(loaded.model),
    }
    if not args.skip_baseline:
        results["before"] = evaluate(loaded, eval_files, args, "before")
    records = st.data.records.load_instruction_data(str(train_file))
    train, val = st.build_batches(
        records,
        loaded.tokenizer,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        val_fraction=min(0.5, args.val_records / len(records)),
        on_long_prompt="skip",
        pad_multiple=args.pad_multiple,
    )
    config = st.TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup_steps=args.warmup_steps,
        save_every=100,
        eval_every=100,
    )
    result = st.finetune(loaded.model, train, config, out / "run", val_batches=val)
    results.update(steps=result.step, final_loss=result.loss, val_loss=result.val_loss)
    results["after"] = evaluate(loaded, eval_files, args, "after")
    export_dir = out / "dense"
    if not export_dir.exists():
        from converters import export_hf

        export_hf(loaded.model, loaded.config, loaded.tokenizer, export_dir)
    results["export"] = str(export_dir)
    rows = [{"set": k, "before": results.get("before", {}).get(k, ""), "after": v} for k, v in results["after"].items()]
    print_table("accuracy before and after fine-tuning the codebooks", rows)
    st.io.write_json_atomic(out / "results.json", results)
    return results
