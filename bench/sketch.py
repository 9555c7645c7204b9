"""Seconds to sketch one linear module: Hessian accumulation and the sketch itself.

Synthetic calibration inputs (correlated channels with varying scales, the shape of
real activations, not their values), bf16 like a model's activations, fed in
batches as a layer-by-layer driver would. Prints JSON and writes it to ``--out``.

    python bench/sketch.py --out bench/results/sketching/sketch-<device>-<date>.json
    python bench/sketch.py --small          # quick CPU smoke run
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from _common import progress, report, result_header

if TYPE_CHECKING:
    import jax

FULL_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
SMALL_SHAPES = ((512, 512), (1024, 512), (512, 1024))


def _calibration_batch(key: jax.Array, tokens: int, scales: jax.Array, mix: jax.Array) -> jax.Array:
    """``[tokens, in]`` bf16 inputs: normal channels plus a shared low-rank part, scaled per channel."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(key)
    z = jax.random.normal(k1, (tokens, scales.shape[0]), jnp.float32)
    # A shared low-rank part correlates the channels, so H is far from diagonal.
    low = jax.random.normal(k2, (tokens, mix.shape[0]), jnp.float32) @ mix
    return ((z + low) * scales).astype(jnp.bfloat16)


def _time(fn):
    import jax

    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def bench_module(
    out_f: int,
    in_f: int,
    *,
    seqs: int,
    seq_len: int,
    batch_seqs: int,
    repeat: bool,
    **sketch_kw,
) -> dict:
    import jax
    import jax.numpy as jnp

    from sketchtune_jax.sketch.matrix import (
        accumulate_hessian,
        init_hessian,
        prepare_hessian,
        relative_output_error,
        sketch_matrix,
    )

    calibration_batch = jax.jit(_calibration_batch, static_argnums=1)
    key = jax.random.key(out_f * 100003 + in_f)
    kw, ks, km, kx = jax.random.split(key, 4)
    w = 0.02 * jax.random.normal(kw, (out_f, in_f), jnp.float32)
    scales = jnp.exp(jax.random.normal(ks, (in_f,)))
    mix = jax.random.normal(km, (16, in_f)) / 4.0

    h, n = init_hessian(in_f)
    # Compiled once per shape in a real run; keep compilation out of the figure.
    warm = calibration_batch(kx, min(batch_seqs, seqs) * seq_len, scales, mix)
    jax.block_until_ready(accumulate_hessian(h, n, warm))
    del warm
    accumulate_s = 0.0
    for i, bkey in enumerate(jax.random.split(kx, -(-seqs // batch_seqs))):
        tokens = min(batch_seqs, seqs - i * batch_seqs) * seq_len
        x = jax.block_until_ready(calibration_batch(bkey, tokens, scales, mix))
        (h, n), dt = _time(lambda: accumulate_hessian(h, n, x))
        accumulate_s += dt

    (u, wp), prepare_s = _time(lambda: prepare_hessian(h, w))
    res, sketch_s = _time(lambda: sketch_matrix(wp, u, **sketch_kw))
    row = {
        "shape": [out_f, in_f],
        "calibration_tokens": int(n),
        "hessian_accumulate_s": round(accumulate_s, 3),
        "hessian_prepare_s": round(prepare_s, 3),
        "sketch_first_call_s": round(sketch_s, 3),
        "relative_output_error": relative_output_error(w, res.w_hat, h),
    }
    if repeat:
        _, again = _time(lambda: sketch_matrix(wp, u, seed=1, **sketch_kw))
        row["sketch_s"] = round(again, 3)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="small shapes and calibration (CPU smoke)")
    p.add_argument("--shapes", type=str, default=None, help="e.g. 4096x4096,14336x4096 (out x in)")
    p.add_argument("--seqs", type=int, default=None, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    p.add_argument("--batch-seqs", type=int, default=8, help="sequences per accumulate call")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--kmeans-restarts", type=int, default=1)
    p.add_argument("--refit-codebook", action="store_true")
    p.add_argument("--no-repeat", action="store_true", help="skip the second, compiled, call")
    p.add_argument("--out", type=str, default=None)
    a = p.parse_args(argv)

    if a.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    else:
        shapes = SMALL_SHAPES if a.small else FULL_SHAPES
    seqs = a.seqs or (4 if a.small else 128)
    seq_len = a.seq_len or (512 if a.small else 2048)

    result = {
        **result_header(__file__, argv),
        "bits": a.bits,
        "groups_per_row": a.groups,
        "kmeans_restarts": a.kmeans_restarts,
        "refit_codebook": a.refit_codebook,
        "notes": (
            "hessian_accumulate_s: all calibration batches, compiled beforehand; "
            "hessian_prepare_s and sketch_first_call_s include compilation; "
            "sketch_s: a second, compiled call (another seed)"
        ),
        "modules": [],
    }
    for out_f, in_f in shapes:
        row = bench_module(
            out_f,
            in_f,
            seqs=seqs,
            seq_len=seq_len,
            batch_seqs=a.batch_seqs,
            repeat=not a.no_repeat,
            bits=a.bits,
            groups=a.groups,
            kmeans_restarts=a.kmeans_restarts,
            refit_codebook=a.refit_codebook,
        )
        result["modules"].append(row)
        progress(row)
    report(result, a.out)
    return result


if __name__ == "__main__":
    main()
