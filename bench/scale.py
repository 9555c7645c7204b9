"""Scaling figures: peak host memory of `sketchtune sketch` as the checkpoint grows
(streaming vs the whole model), with ``--collectives`` the bytes a sharded train step
moves between devices, and with ``--compile-layers`` how the train step's compile time grows
with depth.

Memory: writes random-weight Llama checkpoints (sharded safetensors, one shard per decoder layer,
a small BPE tokenizer trained on the calibration text) that differ only in depth, sketches
each in a subprocess and reads the child's peak RSS (``wait4`` rusage ``ru_maxrss``).
Random weights: the sketch quality means nothing here, only the memory does. Prints JSON
and writes it to ``--out``.

    python bench/scale.py --out bench/results/scale-cpu-<date>.json
    python bench/scale.py --layers 2 4 --hidden 256 --intermediate 704    # quick smoke run

Compile time: ``--compile-layers 4 32`` lowers and compiles the sketch train step of random
sketched Llamas of both depths, with the decoder layers scanned (``TrainConfig.scan_layers``)
and one by one, and reports seconds and program sizes (StableHLO and compiled HLO characters).

    python bench/scale.py --compile-layers 4 32 --hidden 256 --intermediate 704 --heads 4 \
        --kv-heads 2 --vocab 2048 --batch 4 --out bench/results/compile-layers-cpu.json

Collectives: compiles the sketch train step of a random-weight Llama-shaped sketched model
(the first ``--layers`` value is its depth) on forced host devices (``--devices``, default
8) and mesh ``--mesh`` (default data=2,model=4) for four layouts of
`sketchtune_jax.parallel.sharding.shard_model` (`LAYOUTS`): every projection split by rows (the
layout before Megatron pairing) or Megatron-paired, each with embeddings and ``lm_head``
replicated or split by vocabulary over data. Sums the result sizes of the collectives in
the compiled per-device HLO (`collective_bytes`); compile only, nothing runs, nothing
about time is claimed.

    python bench/scale.py --collectives --hidden 512 --intermediate 1376 --heads 8 --kv-heads 4 \
        --vocab 2048 --layers 4 4 --out bench/results/collectives-mesh-cpu-8dev.json

Sketch mesh: sketches one random-weight checkpoint (the first ``--layers`` value is its depth)
with `sketchtune sketch` on ``--devices`` forced host devices, on ``--mesh`` and on one device
(``--batch-size`` 8, and 4 for scale: the same samples summed in another order), each in a
child process, and compares each checkpoint with the one-device one: the fraction of codes
that differ, per layer and overall, and the largest codebook difference, with each run's
seconds. Forced host devices share the host's cores: the seconds are no speed-up figure.

    python bench/scale.py --sketch-mesh --layers 2 2 --hidden 256 --intermediate 768 --heads 4 \
        --kv-heads 2 --nsamples 8 --out bench/results/sketch-mesh-cpu-8dev.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def write_checkpoint(
    path: Path,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    calib_text: str,
    vocab: int,
    seed: int = 0,
) -> int:
    """A random Llama HF directory at ``path``, one safetensors shard per decoder layer; returns its weight bytes."""
    import safetensors.numpy
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [calib_text],
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(str(path))
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (1.0 / np.sqrt(cols))).astype(np.float32)

    shards: list[tuple[str, dict[str, np.ndarray]]] = []
    shards.append(
        (
            "globals",
            {
                "model.embed_tokens.weight": dense(len(tokenizer), hidden),
                "lm_head.weight": dense(len(tokenizer), hidden),
                "model.norm.weight": np.ones(hidden, np.float32),
            },
        )
    )
    weight_map, total = {}, 0
    names = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    for i, file in enumerate(names):
        if i == 0:
            tensors = shards[0][1]
        else:
            p = f"model.layers.{i - 1}."
            tensors = {
                p + "self_attn.q_proj.weight": dense(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": dense(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": dense(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": dense(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": dense(intermediate, hidden),
                p + "mlp.up_proj.weight": dense(intermediate, hidden),
                p + "mlp.down_proj.weight": dense(hidden, intermediate),
                p + "input_layernorm.weight": np.ones(hidden, np.float32),
                p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            }
        safetensors.numpy.save_file(tensors, str(path / file))
        weight_map.update({name: file for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total


def checkpoint_from_args(path: Path, args: argparse.Namespace, layers: int, calib_text: str) -> int:
    """`write_checkpoint` with the model shape given on the command line; returns its weight bytes."""
    return write_checkpoint(
        path,
        layers=layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        calib_text=calib_text,
        vocab=args.vocab,
    )


def sketch_peak_rss(
    model: Path,
    out: Path,
    calib: Path,
    *,
    streaming: bool,
    nsamples: int,
    seq_len: int,
    kmeans_iters: int,
    extra: tuple[str, ...] = (),
    devices: int | None = None,
) -> dict:
    """Run `sketchtune sketch` (with ``extra`` flags, on ``devices`` forced host devices if
    given) in a child process; its peak RSS (MiB) and seconds."""
    argv = [
        sys.executable,
        "-m",
        "sketchtune_jax.cli",
        "sketch",
        str(model),
        "--out",
        str(out),
        "--calib",
        str(calib),
        "--nsamples",
        str(nsamples),
        "--seq-len",
        str(seq_len),
        "--bits",
        "4",
        "--groups-per-row",
        "4",
        "--kmeans-iters",
        str(kmeans_iters),
        "--overwrite",
        "--streaming" if streaming else "--no-streaming",
        *extra,
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    if devices is not None:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    err = child.stderr.read().decode()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"sketch of {model} failed ({child.returncode}): {err[-2000:]}")
    # ru_maxrss is in KiB on Linux.
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1)}


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# "%name = SHAPE op(" or "ROOT %name = SHAPE op-start(": SHAPE is an array or a (tuple).
_COLLECTIVE_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\([^()]*\)|\S+)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(",
    re.MULTILINE,
)
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")


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
    """Collectives of one compiled sketch train step on ``args.mesh`` with ``layout``
    (a key of `LAYOUTS`)."""
    import numpy as np
    from flax import nnx

    # This checkout's library and its bench/train_step.py (the model builder), whatever is installed.
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from train_step import build

    from sketchtune_jax.parallel.sharding import MEGATRON_SPLITS, make_mesh, shard_batch, shard_model
    from sketchtune_jax.train import TrainConfig, compile_train_step, make_optimizer

    mesh = make_mesh(args.mesh)
    shape = argparse.Namespace(
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers[0],
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        bits=4,
        groups=args.groups,
        dtype="float32",
        remat="none",
    )
    model, wrt = build(shape, "sketch")
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


def step_compile(args: argparse.Namespace, layers: int, scan: bool) -> dict:
    """Lower and compile the sketch train step of a random ``layers``-deep sketched Llama,
    its decoder layers stacked and scanned (``scan``) or one by one: seconds and program sizes."""
    import numpy as np
    from flax import nnx

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from train_step import build

    from sketchtune_jax.models.scan import stack_layers
    from sketchtune_jax.train import TrainConfig, make_optimizer
    from sketchtune_jax.train.step import pure_train_step, split_for_step

    shape = argparse.Namespace(
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        bits=4,
        groups=args.groups,
        dtype="float32",
        remat=args.remat,
    )
    model, wrt = build(shape, "sketch")
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


def compile_main(args: argparse.Namespace) -> dict:
    """The ``--compile-layers`` report: train-step compile time and program size at two depths, scanned or not."""
    shallow, deep = args.compile_layers
    # A throwaway compile first, so that neither measurement pays for starting up.
    step_compile(args, 1, True)
    runs = []
    for scan in (True, False):
        for layers in (shallow, deep):
            runs.append(step_compile(args, layers, scan))
            print(json.dumps(runs[-1]), file=sys.stderr)

    def growth(scan: bool, key: str) -> float:
        by = {r["layers"]: r[key] for r in runs if r["scan_layers"] == scan}
        return round(by[deep] / by[shallow], 3)

    return {
        "what": "seconds to lower and compile the sketch train step (jit of pure_train_step) and its program "
        "size, decoder layers scanned (TrainConfig.scan_layers) or one by one; compiled only, nothing run",
        **run_header("; CPU backend (XLA:CPU), figures are CPU compile times"),
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "bits": 4,
            "groups_per_row": args.groups,
            "dtype": "float32",
            "remat": args.remat,
            "weights": "random",
        },
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


def run_header(host_note: str = "") -> dict:
    """When, where and how a report was made: date, host (plus ``host_note``) and the command."""
    return {
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}{host_note}",
        "command": " ".join(["python", "bench/scale.py", *sys.argv[1:]]),
    }


LAYOUTS = {
    "rows": "every projection split by rows over model, embeddings and lm_head replicated (before pairing)",
    "rows+vocab": "every projection by rows, embeddings and lm_head split by vocabulary over data",
    "megatron": "q/k/v/gate/up by rows, o/down by columns, embeddings and lm_head replicated",
    "megatron+vocab": "q/k/v/gate/up by rows, o/down by columns, vocabulary over data (shard_model's default)",
}


def collectives_main(args: argparse.Namespace) -> dict:
    """The ``--collectives`` report: each layout's collective bytes per device per step."""
    layouts = {layout: step_collectives(args, layout) for layout in LAYOUTS}
    base = layouts["rows"]["total_bytes"]
    return {
        "what": "collective bytes per device per sketch train step (sum of collective result sizes in the "
        "compiled HLO), by shard_model layout; compiled only, nothing timed",
        **run_header(f", {args.devices} forced host devices"),
        "mesh": args.mesh,
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers[0],
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "bits": 4,
            "groups_per_row": args.groups,
            "dtype": "float32",
            "weights": "random",
        },
        "batch": {"rows": args.batch, "seq_len": args.seq_len},
        "layouts": LAYOUTS,
        "results": layouts,
        "bytes_over_rows": {k: round(v["total_bytes"] / base, 4) for k, v in layouts.items()} if base else None,
    }


def compare_sketches(a: Path, b: Path, bits: int, cols_per_group: Callable[[str], int]) -> dict:
    """How far the sketched checkpoints ``a`` and ``b`` are apart: the fraction of codes that
    differ (unpacked, ``cols_per_group(key)`` each) overall and per decoder layer, codebooks."""
    import safetensors.numpy

    sys.path.insert(0, str(ROOT))
    from pallas_kernels.packing import unpack_codes

    ta, tb = (safetensors.numpy.load_file(str(d / "model.safetensors")) for d in (a, b))
    differ: dict[str, int] = {}
    total: dict[str, int] = {}
    book_diff = 0.0
    for key in (k for k in ta if k.endswith(".codes")):
        ca, cb = (unpack_codes(t[key], bits, cols_per_group(key)) for t in (ta, tb))
        layer = key.split(".")[2]
        differ[layer] = differ.get(layer, 0) + int(np.sum(ca != cb))
        total[layer] = total.get(layer, 0) + ca.size
        book = key.removesuffix(".codes") + ".codebook"
        book_diff = max(book_diff, float(np.max(np.abs(ta[book] - tb[book]))))
    return {
        "code_mismatch": sum(differ.values()) / sum(total.values()),
        "code_mismatch_by_layer": {layer: differ[layer] / total[layer] for layer in sorted(total, key=int)},
        "max_codebook_diff": book_diff,
    }


def sketch_mesh_main(args: argparse.Namespace) -> dict:
    """The ``--sketch-mesh`` report: a sketch on ``args.mesh`` against one on one device."""
    calib_text = args.calib.read_text(encoding="utf-8")
    layers = args.layers[0]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="sketch-mesh-") as tmp:
        model = Path(tmp) / "llama"
        checkpoint_from_args(model, args, layers, calib_text)
        variants = {"mesh": ("--mesh", args.mesh), "one_device": (), "one_device_batch4": ("--batch-size", "4")}
        for name, extra in variants.items():
            out = Path(tmp) / name
            runs[name] = sketch_peak_rss(
                model,
                out,
                args.calib,
                streaming=True,
                nsamples=args.nsamples,
                seq_len=args.seq_len,
                kmeans_iters=args.kmeans_iters,
                extra=(*extra, "--json", str(Path(tmp) / f"{name}.json")),
                devices=args.devices,
            )
            report = json.loads((Path(tmp) / f"{name}.json").read_text())
            runs[name]["mean_rel_output_error"] = report["mean_rel_output_error"]
            print(json.dumps({name: runs[name]}), file=sys.stderr)
        differences = {
            name: compare_sketches(
                Path(tmp) / name,
                Path(tmp) / "one_device",
                4,
                lambda key: (args.intermediate if ".down_proj." in key else args.hidden) // 4,
            )
            for name in ("mesh", "one_device_batch4")
        }
    return {
        "what": "`sketchtune sketch --mesh` and `--batch-size 4` against one device with batch size 8, on "
        "forced host devices: codes and codebooks compared, seconds per child process (forced devices "
        "share the host's cores: not a speed-up)",
        **run_header(f", {args.devices} forced host devices"),
        "mesh": args.mesh,
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab_target": args.vocab,
            "dtype": "float32",
            "weights": "random",
        },
        "sketch": {
            "bits": 4,
            "groups_per_row": 4,
            "nsamples": args.nsamples,
            "seq_len": args.seq_len,
            "kmeans_iters": args.kmeans_iters,
        },
        "runs": runs,
        "differences": differences,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs=2, default=(4, 16), metavar=("SHALLOW", "DEEP"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--kmeans-iters", type=int, default=5)
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    parser.add_argument("--in-memory", action="store_true", help="also measure --no-streaming (whole model loaded)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--collectives", action="store_true", help="measure a sharded train step's collectives")
    parser.add_argument("--sketch-mesh", action="store_true", help="compare a sketch on --mesh with one on one device")
    parser.add_argument("--devices", type=int, default=8, help="forced host devices for --collectives/--sketch-mesh")
    parser.add_argument("--mesh", default="data=2,model=4", help="mesh for --collectives/--sketch-mesh")
    parser.add_argument("--groups", type=int, default=4, help="codebook groups per row for --collectives")
    parser.add_argument("--batch", type=int, default=8, help="rows per step for --collectives and --compile-layers")
    parser.add_argument(
        "--compile-layers",
        type=int,
        nargs=2,
        metavar=("SHALLOW", "DEEP"),
        help="measure the train step's compile time and program size at these depths, scanned and not",
    )
    parser.add_argument("--remat", default="none", help="remat policy for --compile-layers")
    args = parser.parse_args()
    if args.compile_layers:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        write_result(compile_main(args), args.out)
        return
    if args.collectives:
        # Before JAX starts: the forced devices are fixed when its CPU backend comes up.
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        write_result(collectives_main(args), args.out)
        return
    if args.sketch_mesh:
        write_result(sketch_mesh_main(args), args.out)
        return

    calib_text = args.calib.read_text(encoding="utf-8")
    modes = (True, False) if args.in_memory else (True,)
    runs = []
    with tempfile.TemporaryDirectory(prefix="sketch-scale-") as tmp:
        for layers in args.layers:
            model = Path(tmp) / f"llama-{layers}l"
            size = checkpoint_from_args(model, args, layers, calib_text)
            for streaming in modes:
                measured = sketch_peak_rss(
                    model,
                    Path(tmp) / f"sketch-{layers}l",
                    args.calib,
                    streaming=streaming,
                    nsamples=args.nsamples,
                    seq_len=args.seq_len,
                    kmeans_iters=args.kmeans_iters,
                )
                runs.append(
                    {"layers": layers, "checkpoint_mib": round(size / 2**20, 1), "streaming": streaming, **measured}
                )
                print(json.dumps(runs[-1]), file=sys.stderr)
    shallow, deep = args.layers

    def ratio(streaming: bool) -> float | None:
        by = {r["layers"]: r for r in runs if r["streaming"] == streaming}
        return round(by[deep]["peak_rss_mib"] / by[shallow]["peak_rss_mib"], 3) if by else None

    result = {
        "what": "peak RSS of `sketchtune sketch` (child process, ru_maxrss) on random-weight Llama checkpoints",
        **run_header(),
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab_target": args.vocab,
            "dtype": "float32",
            "shards": "one per decoder layer",
        },
        "sketch": {
            "bits": 4,
            "groups_per_row": 4,
            "nsamples": args.nsamples,
            "seq_len": args.seq_len,
            "kmeans_iters": args.kmeans_iters,
        },
        "runs": runs,
        "checkpoint_growth": round(runs[-1]["checkpoint_mib"] / runs[0]["checkpoint_mib"], 3),
        "peak_rss_growth_streaming": ratio(True),
        "peak_rss_growth_in_memory": ratio(False),
        "target": "peak RSS grows <= 1.3x while the checkpoint grows 4x",
    }
    write_result(result, args.out)


def write_result(result: dict, out: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
