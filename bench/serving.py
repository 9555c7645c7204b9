"""CPU serving speed of a sketch with and without the inference view, beside merged LoRA.

    python bench/serving.py --model smollm2-135m --prompt 16 --new-tokens 64 --rounds 2 \\
        --out bench/results/serving/serving-view-smollm2-135m-cpu.json

Three models of the same architecture, greedy generation with the KV cache, batch 1:

* ``lora_merged``: LoRA (rank `sketchtune_jax.train.lora.auto_rank`, the sketch's trainable count)
  added to the dense model and merged, i.e. a plain dense model, as served;
* ``sketch_view``: every decoder projection a 4-bit, 4-groups-per-row `SketchedLinear`
  (random codes and codebooks unless ``--sketch DIR``: speed does not depend on their
  values), served as `generate` serves it on a CPU, through `sketchtune_jax.models.inference_view`
  (each weight rebuilt once per call; the rebuild is inside the time to first token);
* ``sketch_per_call``: the same sketch with the view off: the ``jnp`` twin rebuilds every
  weight on every call, once per decoded token.

Timing: per model, generation of 1 token (time to first token: the prompt's prefill and, for
``sketch_view``, the rebuild of every weight) and of ``1 + new_tokens`` tokens, both
compiled and run once first, then timed in ``--repeats`` back-to-back pairs; decode
tokens/s is ``new_tokens`` over the median of the pairs' differences. The models take
turns ``--rounds`` times (the machine may be shared) and each figure is the median over
all pairs; the JSON keeps every pair, and whether the sketch's tokens are the same with
and without the view.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import report, result_header


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the dense model (HF directory, GGUF or smollm2-135m)")
    p.add_argument("--sketch", help="a sketched directory of --model (default: a random 4-bit GPR4 sketch of it)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens after the first")
    p.add_argument("--rounds", type=int, default=2, help="turns of the three models")
    p.add_argument("--repeats", type=int, default=3, help="timed pairs per model and round")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def random_sketch(model, *, bits: int = 4, groups: int = 4, seed: int = 0):
    """``model`` with every decoder projection replaced, in place, by a random sketch."""
    import numpy as np

    from sketchtune_jax._utils.module_paths import iter_modules, set_submodule
    from sketchtune_jax.layers import Linear, SketchedLinear

    rng = np.random.default_rng(seed)
    for name, lin in list(iter_modules(model.model, Linear)):
        k = 2**bits
        codebook = (0.02 * rng.standard_normal((lin.out_features, groups, k))).astype(np.float32)
        codes = rng.integers(0, k, (lin.out_features, groups, lin.in_features // groups)).astype(np.uint8)
        set_submodule(model.model, name, SketchedLinear.from_linear(lin, codebook, codes))
    return model


def build(args: argparse.Namespace) -> dict:
    """``{name: model}`` of the three models (see the module docstring)."""
    from sketchtune_jax import load_any
    from sketchtune_jax.train.lora import LoraSettings, auto_rank, merge_lora
    from sketchtune_jax.train.methods import FinetuneMethod

    dense = load_any(args.model).model
    rank = auto_rank(dense)
    lora = FinetuneMethod("lora", lora=LoraSettings(rank=rank, alpha=2.0 * rank))
    merged = merge_lora(lora.prepare(dense), lora.lora)
    sketch = load_any(args.sketch).model if args.sketch else random_sketch(load_any(args.model).model)
    return {"lora_merged": merged, "sketch": sketch, "lora_rank": rank}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import numpy as np

    from pallas_kernels import describe
    from sketchtune_jax.models.generate import generate
    from sketchtune_jax.models.inference_view import dense_weight_bytes, precompute_weights
    from sketchtune_jax.train.profiling import state_bytes

    t0 = time.perf_counter()
    models = build(args)
    sketch = models["sketch"]
    prompt = np.random.default_rng(1).integers(3, sketch.config.vocab_size, (1, args.prompt)).tolist()

    def timed_pairs(model, view: bool) -> list[dict]:
        def run(n: int) -> float:
            start = time.perf_counter()
            with precompute_weights(view):
                generate(model, prompt, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
            return time.perf_counter() - start

        run(1), run(1 + args.new_tokens)  # compile both programs
        pairs = []
        for _ in range(args.repeats):
            first, full = run(1), run(1 + args.new_tokens)
            pairs.append({"ttft_s": first, "full_s": full})
        return pairs

    runs = {
        "lora_merged": (models["lora_merged"], True),
        "sketch_view": (sketch, True),
        "sketch_per_call": (sketch, False),
    }
    rounds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, view) in runs.items():
            rounds[name].extend(timed_pairs(model, view))
    medians = {}
    for name, pairs in rounds.items():
        decode_s = statistics.median(p["full_s"] - p["ttft_s"] for p in pairs)
        medians[name] = {
            "ttft_s": statistics.median(p["ttft_s"] for p in pairs),
            "decode_tokens_per_s": args.new_tokens / decode_s if decode_s > 0 else None,
        }
    kwargs = dict(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    with precompute_weights(False):
        per_call_tokens = generate(sketch, prompt, **kwargs)
    out = {
        **result_header(__file__, argv),
        "kernels": describe(),
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "batch": 1,
            "lora_rank": models["lora_rank"],
            "sketch_bits": None if args.sketch else 4,
            "sketch_groups_per_row": None if args.sketch else 4,
        },
        "weight_bytes": {
            "lora_merged": state_bytes(models["lora_merged"]),
            "sketch": state_bytes(sketch),
            "sketch_view_extra": dense_weight_bytes(sketch),
        },
        "median": medians,
        "sketch_view_over_per_call": {
            "ttft": medians["sketch_view"]["ttft_s"] / medians["sketch_per_call"]["ttft_s"],
            "decode_tokens_per_s": medians["sketch_view"]["decode_tokens_per_s"]
            / medians["sketch_per_call"]["decode_tokens_per_s"],
        },
        "sketch_view_over_lora_merged": {
            "ttft": medians["sketch_view"]["ttft_s"] / medians["lora_merged"]["ttft_s"],
            "decode_tokens_per_s": medians["sketch_view"]["decode_tokens_per_s"]
            / medians["lora_merged"]["decode_tokens_per_s"],
        },
        "same_tokens_with_and_without_view": generate(sketch, prompt, **kwargs) == per_call_tokens,
        "pairs": rounds,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    report(out, args.out)
    return out


if __name__ == "__main__":
    main()
