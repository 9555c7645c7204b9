"""Training-step memory and throughput per fine-tuning method: sketch, LoRA, QLoRA, full.

Every method trains the project's `LlamaForCausalLM` with the same random config:
``sketch`` has every decoder projection as a `SketchedLinear` (random codebooks and
codes; codebooks train), ``lora``/``qlora`` add adapters through qwix to the dense model
(QLoRA's base in NF4), ``full`` trains every weight. Each method runs in its own process
so the device's peak-memory counter is its own. Prints one JSON object, with the kernel
backend the sketch gets on this device and why (``"kernels"``, `pallas_kernels.describe`):
``{"methods": {"sketch": {"argument_bytes", "temp_bytes", "output_bytes", "compile_s",
"tokens_per_s", "trainable_params", ...}, "lora": ..., "qlora": ..., "full": ...}}``.

    python bench/train_step.py --model smollm2-135m --methods sketch,lora,qlora,full \\
        --batch 4 --seq 512 --out FILE.json
    python bench/train_step.py --model llama3-8b-layer --seq 2048 --no-run     # memory only (compile)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import child_env, report, result_header

METHODS = ("sketch", "lora", "qlora", "full")
LEGACY_NAMES = {"sketched": "sketch", "dense": "full"}
# Architectures by name: SmolLM2-135M (all 30 layers) and one Llama-3-8B decoder layer.
PRESETS = {
    "smollm2-135m": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152),
    "llama3-8b-layer": dict(hidden=4096, intermediate=14336, layers=1, heads=32, kv_heads=8, vocab=32000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), help="an architecture preset (overrides the sizes below)")
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
    p.add_argument("--lora-rank", default="auto", help="adapter rank, or 'auto' (trainable count of the sketch)")
    p.add_argument("--qlora-tile-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--remat", default="none", help="remat policy of the decoder layers")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--no-run", action="store_true", help="compile only: memory figures, no timing")
    p.add_argument(
        "--methods", "--modes", default=",".join(METHODS), help="comma-separated subset of sketch,lora,qlora,full"
    )
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model:
        for k, v in PRESETS[args.model].items():
            setattr(args, k, v)
    return args


def build(args: argparse.Namespace, method: str):
    """``(model, wrt)`` for ``method`` at the configured shape, with random weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sketchtune_jax._utils.module_paths import iter_modules, set_submodule
    from sketchtune_jax.layers import Codebook, Linear, SketchedLinear
    from sketchtune_jax.models import LlamaForCausalLM, ModelConfig
    from sketchtune_jax.train.lora import LoraSettings, auto_rank
    from sketchtune_jax.train.methods import FinetuneMethod

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
    # Built abstractly, then filled from numpy: no dense weight a sketch replaces is allocated.
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, remat=args.remat, rngs=nnx.Rngs(0)))
    if method == "sketch":
        for name, lin in list(iter_modules(model.model, Linear)):
            g, k = args.groups, 2**args.bits
            codebook = jnp.asarray(0.02 * rng.standard_normal((lin.out_features, g, k)), jnp.float32)
            codes = jnp.asarray(rng.integers(0, k, (lin.out_features, g, lin.in_features // g)), jnp.uint8)
            set_submodule(
                model.model,
                name,
                SketchedLinear(
                    lin.in_features,
                    lin.out_features,
                    bits=args.bits,
                    groups=g,
                    codebook=codebook,
                    codes=codes,
                    dtype=dtype,
                ),
            )
    for _, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            var.set_value(jnp.asarray(0.02 * rng.standard_normal(value.shape), value.dtype))
    if method == "sketch":
        return model, Codebook
    if method == "full":
        return model, nnx.Param
    rank = (
        auto_rank(model, bits=args.bits, groups_per_row=args.groups)
        if args.lora_rank == "auto"
        else int(args.lora_rank)
    )
    settings = LoraSettings(
        rank=rank, alpha=2.0 * rank, qtype="nf4" if method == "qlora" else None, tile_size=args.qlora_tile_size
    )
    fm = FinetuneMethod(method, lora=settings)
    return fm.prepare(model), fm.wrt


def run_one(args: argparse.Namespace, method: str) -> dict:
    """Build, compile and (unless --no-run) time one method in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sketchtune_jax.train import TrainConfig, make_optimizer, trainable_parameter_count
    from sketchtune_jax.train.profiling import state_bytes, train_step_memory, train_step_speed

    t0 = time.perf_counter()
    model, wrt = build(args, method)
    build_s = time.perf_counter() - t0
    total_steps = args.warmup + args.steps + 1
    optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(lr=1e-5, max_steps=total_steps), total_steps), wrt=wrt)
    shape = (args.accum, args.batch, args.seq) if args.accum > 1 else (args.batch, args.seq)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, args.vocab, shape), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    result = {
        "method": method,
        "trainable_params": trainable_parameter_count(model, wrt),
        "weight_bytes": state_bytes(model),
        "build_s": build_s,
        **train_step_memory(model, optimizer, batch),
    }
    if method in ("lora", "qlora"):
        result["lora_rank"] = int(next(v for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))).shape[-1])
    if args.no_run:
        return result
    result.update(train_step_speed(model, optimizer, batch, steps=args.steps, warmup=args.warmup))
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.single:
        print(json.dumps(run_one(args, args.single)))
        return
    from pallas_kernels import describe

    methods = [LEGACY_NAMES.get(m.strip(), m.strip()) for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    results = {}
    child_argv = list(argv if argv is not None else sys.argv[1:])
    if "--out" in child_argv:
        i = child_argv.index("--out")
        del child_argv[i : i + 2]
    for method in methods:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *child_argv, "--single", method],
            capture_output=True,
            text=True,
            env=child_env(),
        )
        if proc.returncode != 0:
            raise SystemExit(f"{method} run failed:\n{proc.stderr[-4000:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {
        **result_header(__file__, argv),
        "kernels": describe(),
        "config": {k: v for k, v in vars(args).items() if k not in ("single", "out")},
        "methods": results,
    }
    for base in ("lora", "qlora", "full"):
        if "sketch" in results and base in results:
            s, b = results["sketch"], results[base]
            ratios = {
                k: s[k] / b[k]
                for k in ("argument_bytes", "temp_bytes", "tokens_per_s", "trainable_params")
                if s.get(k) and b.get(k)
            }
            if s.get("argument_bytes") and b.get("argument_bytes"):
                ratios["argument_plus_temp_bytes"] = (s["argument_bytes"] + s["temp_bytes"]) / (
                    b["argument_bytes"] + b["temp_bytes"]
                )
            out[f"sketch_over_{base}"] = ratios
    report(out, args.out)


if __name__ == "__main__":
    main()
