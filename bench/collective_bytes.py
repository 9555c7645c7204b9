"""Bytes a sharded sketch train step moves between devices, for each layout of `shard_model`.

Compiles the sketch train step of a random-weight Llama-shaped sketched model (``--layers`` deep,
built as bench/train_step.py builds it) on ``--devices`` forced host devices and mesh ``--mesh``
for four layouts of `sketchtune_jax.parallel.sharding.shard_model` (`LAYOUTS`): every projection
split by rows (the layout before Megatron pairing) or Megatron-paired, each with embeddings and
``lm_head`` replicated or split by vocabulary over data. Sums the result sizes of the collectives
in the compiled per-device HLO (`collective_bytes`); compile only, nothing runs, nothing about
time is claimed.

    python bench/collective_bytes.py --hidden 512 --intermediate 1376 --heads 8 --kv-heads 4 \\
        --vocab 2048 --layers 4 --out bench/results/scale/collectives-mesh-cpu-8dev.json
"""

from __future__ import annotations

import argparse
import os
import re

from _common import force_host_devices, report, result_header
from _random_llama import add_shape_arguments, shape_record, sketched_train_model

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# "%name = SHAPE op(" or "ROOT %name = SHAPE op-start(": SHAPE is an array or a (tuple).
_COLLECTIVE_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\([^()]*\)|\S+)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(",
    re.MULTILINE,
)
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")

LAYOUTS = {
    "rows": "every projection split by rows over model, embeddings and lm_head replicated (before pairing)",
    "rows+vocab": "every projection by rows, embeddings and lm_head split by vocabulary over data",
    "megatron": "q/k/v/gate/up by rows, o/down by columns, embeddings and lm_head replicated",
    "megatron+vocab": "q/k/v/gate/up by rows, o/down by columns, vocabulary over data (shard_model's default)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the model")
    add_shape_arguments(p)
    p.add_argument("--groups", type=int, default=4, help="codebook groups per row")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--devices", type=int, default=8, help="forced host devices")
    p.add_argument("--mesh", default="data=2,model=4")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def _array_bytes(dtype: str, dims: str) -> int:
    if dtype == "token":
        return 0
    bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d+)", dtype).group(1))
    count = 1
    for d in filter(None, dims.split(",")):
        count *= int(d)
    return count * bits // 8


def collective_bytes(hlo: str) -> dict[str, dict[str, int]]:
    """``{op: {"count": n, "bytes": b}}`` for the collectives of `COLLECTIVES` in HLO text:
    ``bytes`` sums their result sizes (a tuple result: every array in it; an async
    ``-start`` op: only its last array, the output buffer; ``-done`` ops are not counted
    again). In a partitioned module the sizes are per device."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for m in _COLLECTIVE_LINE.finditer(hlo):
        arrays = _ARRAY.findall(m["shape"])
        if m["start"]:
            arrays = arrays[-1:]
        out[m["op"]]["count"] += 1
        out[m["op"]]["bytes"] += sum(_array_bytes(dtype, dims) for dtype, dims in arrays)
    return out


def step_collectives(args: argparse.Namespace, layout: str) -> dict:
    """Collectives of one compiled sketch train step on ``args.mesh`` with ``layout`` (a key of `LAYOUTS`)."""
    import numpy as np
    from flax import nnx

    from sketchtune_jax.parallel.sharding import MEGATRON_SPLITS, make_mesh, shard_batch, shard_model
    from sketchtune_jax.train import TrainConfig, compile_train_step, make_optimizer

    mesh = make_mesh(args.mesh)
    model, wrt = sketched_train_model(args, args.layers)
    splits = MEGATRON_SPLITS if layout.startswith("megatron") else {}
    shard_model(model, mesh, splits=splits, shard_vocab=layout.endswith("+vocab"))
    optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(lr=1e-4), 10), wrt=wrt)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq_len)).astype(np.int32)
    batch = shard_batch({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}, mesh)
    compiled = compile_train_step(model, optimizer, batch)
    per_op = collective_bytes(compiled.as_text())
    return {
        # Per device: the model, optimizer state and batch the step reads.
        "argument_bytes": compiled.memory_analysis().argument_size_in_bytes,
        "per_op": per_op,
        "total_bytes": sum(v["bytes"] for v in per_op.values()),
        "total_count": sum(v["count"] for v in per_op.values()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    force_host_devices(os.environ, args.devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    layouts = {layout: step_collectives(args, layout) for layout in LAYOUTS}
    base = layouts["rows"]["total_bytes"]
    result = {
        **result_header(__file__, argv),
        "what": "collective bytes per device per sketch train step (sum of collective result sizes in the "
        "compiled HLO), by shard_model layout; compiled only, nothing timed",
        "devices": args.devices,
        "mesh": args.mesh,
        "model": shape_record(args, layers=args.layers, bits=4, groups_per_row=args.groups),
        "batch": {"rows": args.batch, "seq_len": args.seq_len},
        "layouts": LAYOUTS,
        "results": layouts,
        "bytes_over_rows": {k: round(v["total_bytes"] / base, 4) for k, v in layouts.items()} if base else None,
    }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
