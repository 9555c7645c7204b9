"""Benchmark the sketched matmul against a dense ``jnp.dot`` in the same dtype.

Forward at decode (1, 8, 16 rows) and prefill (512, 4096 rows), and forward+backward
(dx and dcodebook for the sketch; dx and dW for the dense layer) at prefill sizes, for
4096x4096, 14336x4096 and 4096x14336 layers at 4 and 2 bits. Prints JSON and writes it
to ``--out``. Figures only; nothing here passes or fails on time.

    python bench/kernel_speed.py --out bench/results/kernels/kernels-h100.json
    python bench/kernel_speed.py --small --out /tmp/kernels.json          # CPU smoke test
    python bench/kernel_speed.py --layers 576x576,1536x576,576x1536 --out k.json  # SmolLM2 shapes
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
from _common import report, result_header

FULL = dict(layers=[(4096, 4096), (14336, 4096), (4096, 14336)], decode=[1, 8, 16], prefill=[512, 4096], bits=[4, 2])
SMALL = dict(layers=[(256, 128), (128, 256)], decode=[1, 8], prefill=[64], bits=[4, 2])


def _time(fn: Callable, args: tuple, iters: int, warmup: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _temp_bytes(fn, args) -> int | None:
    try:
        analysis = fn.lower(*args).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes) if analysis is not None else None
    except Exception:  # memory_analysis is unimplemented on some backends
        return None


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _measure(
    name: str, fn, args, *, nbytes: int, flops: int, iters: int, warmup: int, bandwidth: float | None, **meta: Any
) -> dict:
    t = _time(fn, args, iters, warmup)
    return dict(
        bandwidth_fraction=nbytes / t / bandwidth if bandwidth else None,
        impl=name,
        **meta,
        median_ms=t * 1e3,
        bytes=nbytes,
        flops=flops,
        gb_per_s=nbytes / t / 1e9,
        tflop_per_s=flops / t / 1e12,
        temp_bytes=_temp_bytes(fn, args),
        peak_bytes_in_use=_peak_bytes(),
    )


def run(
    config: dict, *, groups: int, dtype, backend: str | None, iters: int, warmup: int, bandwidth: float | None
) -> list[dict]:
    """Every ``(layer, bits, rows)`` of ``config`` timed for the dense, sketched and jnp-twin
    matmul (forward; forward+backward at prefill sizes), as one row each."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import pack_codes, packed_words, sketched_matmul

    rng = np.random.default_rng(0)
    item = jnp.dtype(dtype).itemsize
    measure = functools.partial(_measure, iters=iters, warmup=warmup, bandwidth=bandwidth)
    results = []
    for out, k in config["layers"]:
        w = jnp.asarray(rng.normal(size=(out, k)) * 0.02, dtype)
        dense_fwd = jax.jit(lambda x, w: jnp.einsum("mi,oi->mo", x, w))
        dense_vjp = jax.jit(lambda x, w, dy: jax.vjp(dense_fwd, x, w)[1](dy))
        for bits in config["bits"]:
            cols = k // groups
            codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)) * 0.02, dtype)
            codes = jnp.asarray(pack_codes(rng.integers(0, 2**bits, (out, groups, cols), dtype=np.uint8), bits))
            sketch_bytes = out * groups * packed_words(cols, bits) * 4 + out * groups * 2**bits * item

            def fwd(x, cb, c, bits=bits):
                return sketched_matmul(x, cb, c, bits, backend=backend)

            def twin(x, cb, c, bits=bits):
                return sketched_matmul(x, cb, c, bits, backend="reference")

            sk_fwd = jax.jit(fwd)
            sk_vjp = jax.jit(lambda x, cb, c, dy, fwd=fwd: jax.vjp(lambda x, cb: fwd(x, cb, c), x, cb)[1](dy))
            ref_fwd = jax.jit(twin)
            ref_vjp = jax.jit(lambda x, cb, c, dy, f=twin: jax.vjp(lambda x, cb: f(x, cb, c), x, cb)[1](dy))
            for m in config["decode"] + config["prefill"]:
                x = jnp.asarray(rng.normal(size=(m, k)), dtype)
                act = (m * k + m * out) * item
                meta = dict(out=out, in_features=k, rows=m, bits=bits, groups=groups)
                dense = measure(
                    "dense",
                    dense_fwd,
                    (x, w),
                    op="forward",
                    nbytes=act + out * k * item,
                    flops=2 * m * out * k,
                    **meta,
                )
                sk = measure(
                    "sketched",
                    sk_fwd,
                    (x, codebook, codes),
                    op="forward",
                    nbytes=act + sketch_bytes,
                    flops=2 * m * out * k,
                    **meta,
                )
                sk["speedup_vs_dense"] = dense["median_ms"] / sk["median_ms"]
                # The jnp twin moves the sketch in, and writes and reads back W_hat.
                twin_row = measure(
                    "jnp_twin",
                    ref_fwd,
                    (x, codebook, codes),
                    op="forward",
                    nbytes=act + sketch_bytes + 2 * out * k * item,
                    flops=2 * m * out * k,
                    **meta,
                )
                results += [dense, sk, twin_row]
                if m not in config["prefill"]:
                    continue
                dy = jnp.asarray(rng.normal(size=(m, out)), dtype)
                # Forward + backward reads x, dy and the weights; writes y, dx and the
                # weight gradient (dW dense, dcodebook sketched).
                train_act = (2 * m * k + 2 * m * out) * item
                dense = measure(
                    "dense",
                    dense_vjp,
                    (x, w, dy),
                    op="forward_backward",
                    nbytes=train_act + 2 * out * k * item,
                    flops=6 * m * out * k,
                    **meta,
                )
                sk = measure(
                    "sketched",
                    sk_vjp,
                    (x, codebook, codes, dy),
                    op="forward_backward",
                    nbytes=train_act + 2 * sketch_bytes,
                    flops=6 * m * out * k,
                    **meta,
                )
                sk["speedup_vs_dense"] = dense["median_ms"] / sk["median_ms"]
                twin_row = measure(
                    "jnp_twin",
                    ref_vjp,
                    (x, codebook, codes, dy),
                    op="forward_backward",
                    nbytes=train_act + 2 * sketch_bytes + 4 * out * k * item,
                    flops=6 * m * out * k,
                    **meta,
                )
                results += [dense, sk, twin_row]
                print(f"{out}x{k} {bits}-bit rows={m} done", file=sys.stderr, flush=True)
    return results


def _layers(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(d) for d in shape.split("x", 1)) for shape in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like 576x576,1536x576; got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    p.add_argument("--groups", type=int, default=4, help="row-groups per output row")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--backend",
        choices=["triton", "mosaic_gpu", "mosaic_tpu", "reference", "pallas", "interpret"],
        default=None,
        help="force a sketched_matmul backend (default: by platform)",
    )
    p.add_argument("--layers", type=_layers, help="comma-separated OUTxIN layer shapes (default: Llama-3-8B's)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    iters = args.iters or (3 if args.small else 20)
    config = dict(SMALL if args.small else FULL)
    if args.layers:
        config["layers"] = args.layers
    import jax
    import jax.numpy as jnp

    from pallas_kernels import describe
    from pallas_kernels.backends import chip_bandwidth

    bandwidth = chip_bandwidth(jax.devices()[0].device_kind)
    result = {
        **result_header(__file__, argv),
        "dtype": args.dtype,
        "backend": args.backend or "auto",
        "kernel_backend": args.backend or describe()["kernel_backend"],
        "kernel_backend_reason": "forced by --backend" if args.backend else describe()["reason"],
        "chip_bandwidth_bytes_per_s": bandwidth,
        "iters": iters,
        "results": run(
            config,
            groups=args.groups,
            dtype=jnp.dtype(args.dtype),
            backend=args.backend,
            iters=iters,
            warmup=args.warmup,
            bandwidth=bandwidth,
        ),
    }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
