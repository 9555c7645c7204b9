"""How the train step's compile time and program size grow with depth, decoder layers scanned or not.

Lowers and compiles the sketch train step (jit of `pure_train_step`) of random sketched Llamas of
two depths (built as bench/train_step.py builds them), with the decoder layers stacked and
scanned (``TrainConfig.scan_layers``) and one by one, and reports seconds and program sizes
(StableHLO and compiled HLO characters). Compiled only, nothing runs.

    python bench/train_step_compile.py --layers 4 32 --hidden 256 --intermediate 704 --heads 4 \\
        --kv-heads 2 --vocab 2048 --batch 4 --out bench/results/training-step/compile-layers-cpu.json
"""

from __future__ import annotations

import argparse
import os
import time

from _common import progress, report, result_header
from _random_llama import add_shape_arguments, shape_record, sketched_train_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs=2, default=(4, 32), metavar=("SHALLOW", "DEEP"))
    add_shape_arguments(p)
    p.add_argument("--groups", type=int, default=4, help="codebook groups per row")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--remat", default="none", help="remat policy of the decoder layers")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def step_compile(args: argparse.Namespace, layers: int, scan: bool) -> dict:
    """Lower and compile the sketch train step of a random ``layers``-deep sketched Llama,
    its decoder layers stacked and scanned (``scan``) or one by one: seconds and program sizes."""
    import numpy as np
    from flax import nnx

    from sketchtune_jax.models.scan import stack_layers
    from sketchtune_jax.train import TrainConfig, make_optimizer
    from sketchtune_jax.train.step import pure_train_step, split_for_step

    model, wrt = sketched_train_model(args, layers, args.remat)
    t0 = time.perf_counter()
    if scan:
        stack_layers(model)
    stack_s = time.perf_counter() - t0
    optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(lr=1e-4), 10), wrt=wrt)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq_len)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    graphdef, mutable, frozen = split_for_step(model, optimizer)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = pure_train_step.lower(graphdef, mutable, frozen, batch)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    memory = compiled.memory_analysis()
    return {
        "layers": layers,
        "scan_layers": scan,
        "stack_s": round(stack_s, 3),
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        # CPU seconds of this process (all threads): steadier than wall time on a shared host.
        "lower_cpu_s": round(c1 - c0, 2),
        "compile_cpu_s": round(c2 - c1, 2),
        # Program sizes: the StableHLO jit hands XLA, and the optimised HLO XLA compiled.
        "stablehlo_chars": len(lowered.as_text()),
        "hlo_chars": len(compiled.as_text()),
        # Equal temp bytes scanned or not: the scan copies no layer's weights or codes.
        "argument_bytes": memory.argument_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    shallow, deep = args.layers
    # A throwaway compile first, so that neither measurement pays for starting up.
    step_compile(args, 1, True)
    runs = []
    for scan in (True, False):
        for layers in (shallow, deep):
            runs.append(step_compile(args, layers, scan))
            progress(runs[-1])

    def growth(scan: bool, key: str) -> float:
        by = {r["layers"]: r[key] for r in runs if r["scan_layers"] == scan}
        return round(by[deep] / by[shallow], 3)

    result = {
        **result_header(__file__, argv),
        "what": "seconds to lower and compile the sketch train step (jit of pure_train_step) and its program "
        "size, decoder layers scanned (TrainConfig.scan_layers) or one by one; compiled only, nothing run",
        "model": shape_record(args, bits=4, groups_per_row=args.groups, remat=args.remat),
        "batch": {"rows": args.batch, "seq_len": args.seq_len},
        # Compile seconds are wall time: other work on the host slows them (1-minute load average).
        "load_average_after": round(os.getloadavg()[0], 2),
        "runs": runs,
        "growth": {
            mode: {
                key: growth(scan, key)
                for key in ("lower_s", "compile_s", "lower_cpu_s", "compile_cpu_s", "stablehlo_chars", "hlo_chars")
            }
            for mode, scan in (("scanned", True), ("per_layer", False))
        },
        "target": f"scanned: compile time within 1.3x from {shallow} to {deep} layers",
        "note": "wall seconds (lower_s, compile_s) include waiting for the host's other work; "
        "the *_cpu_s figures count this process's CPU time only",
    }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
