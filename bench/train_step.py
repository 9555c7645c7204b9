"""Training-step throughput and memory: sketched (codebooks train) vs dense (all weights train).

Both variants are the project's `LlamaForCausalLM` with the same random config; in
the sketched one every projection of the decoder is a `SketchedLinear` with random
codebooks and codes (the LM head and embeddings stay dense and frozen), in the dense
one every parameter trains. Each variant runs in its own process so that the
device's peak-memory counter belongs to it alone. Prints one JSON object.

    python bench/train_step.py                       # small CPU default
    python bench/train_step.py --hidden 4096 --intermediate 14336 --layers 2 \\
        --heads 32 --kv-heads 8 --vocab 32000 --batch 4 --seq 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("sketched", "dense")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--groups", type=int, default=4, help="codebook groups per row")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of sketched,dense")
    p.add_argument("--single", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, mode: str) -> dict:
    """Build, compile and time one variant in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sketchtune_jax.layers import Codebook, Linear, SketchedLinear
    from sketchtune_jax.models import LlamaForCausalLM, ModelConfig
    from sketchtune_jax.module_paths import iter_modules, set_submodule
    from sketchtune_jax.train import TrainConfig, compile_train_step, make_optimizer, train_step

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
    )
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if mode == "sketched":
        # Build abstractly so the dense weights we replace are never allocated.
        model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
        for name, lin in list(iter_modules(model.model, Linear)):
            g, k = args.groups, 2**args.bits
            codebook = jnp.asarray(0.02 * rng.standard_normal((lin.out_features, g, k)), jnp.float32)
            codes = jnp.asarray(rng.integers(0, k, (lin.out_features, g, lin.in_features // g)), jnp.uint8)
            sketched = SketchedLinear(
                lin.in_features, lin.out_features, bits=args.bits, groups=g, codebook=codebook, codes=codes,
                dtype=dtype,
            )
            set_submodule(model.model, name, sketched)
        # Materialise the remaining (frozen) dense leaves: embeddings, norms, head.
        for _, var in nnx.to_flat_state(nnx.state(model)):
            value = var.get_value()
            if isinstance(value, jax.ShapeDtypeStruct):
                var.set_value(jnp.asarray(0.02 * rng.standard_normal(value.shape), value.dtype))
        wrt = Codebook
    else:
        model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
        wrt = nnx.Param
    build_s = time.perf_counter() - t0

    total_steps = args.warmup + args.steps + 1
    optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(lr=1e-5, max_steps=total_steps), total_steps), wrt=wrt)
    shape = (args.accum, args.batch, args.seq) if args.accum > 1 else (args.batch, args.seq)
    ids = jnp.asarray(rng.integers(0, args.vocab, shape), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}

    def leaves(filter_):
        return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, filter_))]

    t0 = time.perf_counter()
    compiled = compile_train_step(model, optimizer, batch)
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    t0 = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, batch))
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(train_step(model, optimizer, batch))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        metrics = train_step(model, optimizer, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0

    tokens_per_step = int(np.prod(shape))
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "mode": mode,
        "state_bytes": int(sum(x.nbytes for x in leaves(...))),
        "trainable_params": int(sum(x.size for x in leaves(wrt))),
        "step_ms": 1e3 * elapsed / args.steps,
        "tokens_per_s": tokens_per_step * args.steps / elapsed,
        "build_s": build_s,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "loss": float(metrics["loss"]),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }
    if analysis is not None:
        # XLA's static accounting of the step: buffers it allocates (temp) plus its
        # arguments and outputs; available on every backend, CPU included.
        result["xla_temp_bytes"] = int(analysis.temp_size_in_bytes)
        result["xla_argument_bytes"] = int(analysis.argument_size_in_bytes)
        result["xla_output_bytes"] = int(analysis.output_size_in_bytes)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.single:
        print(json.dumps(run_one(args, args.single)))
        return
    import jax

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    results = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for mode in modes:
        argv_child = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(argv_child + ["--single", mode], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {
        "bench": "train_step",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "config": {k: v for k, v in vars(args).items() if k != "single"},
        "results": results,
    }
    if {"sketched", "dense"} <= results.keys():
        s, d = results["sketched"], results["dense"]
        out["sketched_over_dense"] = {
            "tokens_per_s": s["tokens_per_s"] / d["tokens_per_s"],
            "trainable_params": s["trainable_params"] / d["trainable_params"],
        }
        for key in ("peak_bytes_in_use", "state_bytes", "xla_temp_bytes", "xla_argument_bytes"):
            if s.get(key) and d.get(key):
                out["sketched_over_dense"][key] = s[key] / d[key]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
