"""Peak host memory of `sketchtune sketch` as the checkpoint grows: streaming against the whole model.

Writes random-weight Llama checkpoints (`_random_llama`) that differ only in depth, sketches
each in a child process and reads the child's peak RSS (``wait4`` rusage ``ru_maxrss``). Random
weights: the sketch quality means nothing here, only the memory does. Prints JSON and writes it
to ``--out``.

    python bench/sketch_memory.py --in-memory --out bench/results/scale/sketch-memory-cpu.json
    python bench/sketch_memory.py --layers 2 4 --hidden 256 --intermediate 704    # quick smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import progress, report, result_header
from _random_llama import TOKENIZER, add_shape_arguments, shape_record, write_checkpoint
from _sketch_child import add_sketch_arguments, sketch_in_child, sketch_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs=2, default=(4, 16), metavar=("SHALLOW", "DEEP"))
    add_shape_arguments(p)
    add_sketch_arguments(p)
    p.add_argument("--in-memory", action="store_true", help="also measure --no-streaming (whole model loaded)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    calib_text = args.calib.read_text(encoding="utf-8")
    modes = (True, False) if args.in_memory else (True,)
    runs = []
    with tempfile.TemporaryDirectory(prefix="sketch-memory-") as tmp:
        for layers in args.layers:
            model = Path(tmp) / f"llama-{layers}l"
            size = write_checkpoint(model, args, layers, calib_text)
            for streaming in modes:
                measured = sketch_in_child(model, Path(tmp) / f"sketch-{layers}l", args, streaming=streaming)
                runs.append(
                    {"layers": layers, "checkpoint_mib": round(size / 2**20, 1), "streaming": streaming, **measured}
                )
                progress(runs[-1])
    shallow, deep = args.layers

    def ratio(streaming: bool) -> float | None:
        by = {r["layers"]: r for r in runs if r["streaming"] == streaming}
        return round(by[deep]["peak_rss_mib"] / by[shallow]["peak_rss_mib"], 3) if by else None

    result = {
        **result_header(__file__, argv),
        "what": "peak RSS of `sketchtune sketch` (child process, ru_maxrss) on random-weight Llama checkpoints",
        "model": shape_record(args, tokenizer=TOKENIZER, shards="one per decoder layer"),
        "sketch": sketch_settings(args),
        "runs": runs,
        "checkpoint_growth": round(runs[-1]["checkpoint_mib"] / runs[0]["checkpoint_mib"], 3),
        "peak_rss_growth_streaming": ratio(True),
        "peak_rss_growth_in_memory": ratio(False),
        "target": "peak RSS grows <= 1.3x while the checkpoint grows 4x",
    }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
