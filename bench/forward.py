"""Forward-pass and greedy-decoding throughput of our model beside transformers (PyTorch).

    python bench/forward.py --model smollm2-135m --seq-len 512 --windows 4 --decode-rows 16 --decode-tokens 128

Forward: jitted full-window logits on WikiText-2 windows. Decoding: `generate` with the
KV cache, ``--decode-rows`` prompts of 64 tokens each continued by exactly
``--decode-tokens`` greedy tokens (no EOS stop), beside ``transformers.generate``.

Prints one JSON object, with the kernel backend the sketched layers get on this device and
why (`pallas_kernels.describe`), and, on a chip of known memory bandwidth, each of our
figures as a fraction of it (the weights read once per forward pass or decode step over
the chip's peak bytes/s). Both sides see the same weights (ours are exported to a
temporary HF directory for transformers) and the same token windows. No assertions:
the figures are for reading, not for passing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import WIKITEXT, report, result_header


def windows(tokenizer, path: Path, seq_len: int, count: int) -> np.ndarray:
    """``[count, seq_len]`` int32 consecutive windows from the start of the text."""
    text = path.read_text()
    # ~4 characters a token; read only what the windows need, with margin.
    ids = tokenizer(text[: seq_len * count * 8])["input_ids"]
    if len(ids) < seq_len * count:
        raise SystemExit(f"{path} has only {len(ids)} tokens, need {seq_len * count}")
    return np.asarray(ids[: seq_len * count], np.int32).reshape(count, seq_len)


def bench_ours(model, batches: np.ndarray) -> tuple[dict, np.ndarray]:
    from flax import nnx

    forward = nnx.jit(lambda m, ids: m(ids)[0])
    start = time.perf_counter()
    first = np.asarray(forward(model, batches[0][None]))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for row in batches:
        forward(model, row[None]).block_until_ready()
    elapsed = time.perf_counter() - start
    return {
        "compile_and_first_s": round(compile_s, 3),
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(batches.size / elapsed, 1),
    }, first


def bench_ours_decode(model, prompts: np.ndarray, new_tokens: int) -> tuple[dict, np.ndarray]:
    from sketchtune_jax.models.generate import generate

    run = lambda: generate(
        model,
        prompts.tolist(),
        max_new_tokens=new_tokens,
        eos_token_id=None,  # noqa: E731
        pad_token_id=0,
    )
    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = np.asarray(run())
    elapsed = time.perf_counter() - start
    return {
        "compile_and_first_s": round(compile_s, 3),
        "seconds": round(elapsed, 3),
        "new_tokens_per_s": round(tokens.size / elapsed, 1),
    }, tokens


def add_bandwidth_fraction(figures: dict, weight_bytes: int, weight_reads: int, bandwidth: float | None) -> None:
    """Adds ``bandwidth_fraction`` to ``figures`` (``None`` on a chip of unknown bandwidth):
    ``weight_reads`` reads of ``weight_bytes`` in ``figures["seconds"]`` over the peak bytes/s.
    A lower bound on the traffic (activations, KV cache and logits are left out)."""
    seconds = figures["seconds"]
    figures["bandwidth_fraction"] = (
        round(weight_bytes * weight_reads / seconds / bandwidth, 4) if bandwidth and seconds > 0 else None
    )


def transformers_model(loaded, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from converters import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(loaded.model, loaded.config, None, Path(tmp) / "model")
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "model", dtype=getattr(torch, dtype)).eval()


def bench_transformers_decode(model, prompts: np.ndarray, new_tokens: int) -> tuple[dict, np.ndarray]:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - start
    tokens = out[:, prompts.shape[1] :].numpy()
    return {"seconds": round(elapsed, 3), "new_tokens_per_s": round(tokens.size / elapsed, 1)}, tokens


def bench_transformers(model, batches: np.ndarray) -> tuple[dict, np.ndarray]:
    import torch

    with torch.no_grad():
        first = model(torch.tensor(batches[:1], dtype=torch.long)).logits.float().numpy()
        start = time.perf_counter()
        for row in batches:
            model(torch.tensor(row[None], dtype=torch.long))
        elapsed = time.perf_counter() - start
    return {
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(batches.size / elapsed, 1),
        "torch_threads": torch.get_num_threads(),
    }, first


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or smollm2-135m")
    parser.add_argument("--data", type=Path, default=WIKITEXT)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    parser.add_argument("--decode-rows", type=int, default=16, help="prompts decoded together (0: skip decoding)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    import jax.numpy as jnp

    from converters import load_model
    from pallas_kernels import describe
    from sketchtune_jax.train.profiling import state_bytes

    dtype = getattr(jnp, args.dtype)
    loaded = load_model(args.model, dtype=dtype, param_dtype=dtype)
    if loaded.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer")
    batches = windows(loaded.tokenizer, args.data, args.seq_len, args.windows)
    ours, ours_logits = bench_ours(loaded.model, batches)
    kernels = describe()
    weight_bytes = state_bytes(loaded.model)
    add_bandwidth_fraction(ours, weight_bytes, len(batches), kernels["chip_bandwidth_bytes_per_s"])
    result = {
        **result_header(__file__, argv),
        "model": args.model,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "windows": args.windows,
        "kernels": kernels,
        "weight_bytes": weight_bytes,
        "sketchtune_jax": ours,
    }
    prompts = windows(loaded.tokenizer, args.data, 64, args.decode_rows) if args.decode_rows else None
    if prompts is not None:
        result["decode"] = {"rows": args.decode_rows, "prompt_tokens": 64, "new_tokens": args.decode_tokens}
        ours_decode, ours_tokens = bench_ours_decode(loaded.model, prompts, args.decode_tokens)
        add_bandwidth_fraction(ours_decode, weight_bytes, args.decode_tokens, kernels["chip_bandwidth_bytes_per_s"])
        result["decode"]["sketchtune_jax"] = ours_decode
    if not args.skip_transformers:
        hf = transformers_model(loaded, args.dtype)
        theirs, theirs_logits = bench_transformers(hf, batches)
        result["transformers"] = theirs
        result["max_abs_logit_diff_first_window"] = float(np.abs(ours_logits - theirs_logits).max())
        if prompts is not None:
            result["decode"]["transformers"], theirs_tokens = bench_transformers_decode(hf, prompts, args.decode_tokens)
            # Greedy paths may part on near-ties; report how many leading tokens agree per row.
            agree = [int(np.argmin(np.append(a == b, False))) for a, b in zip(ours_tokens, theirs_tokens)]
            result["decode"]["leading_tokens_equal_per_row"] = agree
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
