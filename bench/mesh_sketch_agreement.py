"""How far a sketch made on a mesh is from one made on one device: codes and codebooks compared.

Sketches one random-weight checkpoint (`_random_llama`, ``--layers`` deep) with `sketchtune sketch`
on ``--devices`` forced host devices, on ``--mesh`` and on one device (``--batch-size`` 8, and 4 for
scale: the same samples summed in another order), each in a child process, and compares each
checkpoint with the one-device one: the fraction of codes that differ, per layer and overall, and
the largest codebook difference, with each run's seconds. Forced host devices share the host's
cores: the seconds are no speed-up figure.

    python bench/mesh_sketch_agreement.py --layers 2 --hidden 256 --intermediate 768 --heads 4 \\
        --kv-heads 2 --nsamples 8 --out bench/results/scale/sketch-mesh-cpu-8dev.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import progress, report, result_header
from _random_llama import TOKENIZER, add_shape_arguments, shape_record, write_checkpoint
from _sketch_child import add_sketch_arguments, sketch_in_child, sketch_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the checkpoint")
    add_shape_arguments(p)
    add_sketch_arguments(p)
    p.add_argument("--devices", type=int, default=8, help="forced host devices of every child")
    p.add_argument("--mesh", default="data=2,model=4")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def compare_sketches(a: Path, b: Path, bits: int, cols_per_group: Callable[[str], int]) -> dict:
    """How far the sketched checkpoints ``a`` and ``b`` are apart: the fraction of codes that
    differ (unpacked, ``cols_per_group(key)`` each) overall and per decoder layer, codebooks."""
    import safetensors.numpy

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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    calib_text = args.calib.read_text(encoding="utf-8")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="sketch-mesh-") as tmp:
        model = Path(tmp) / "llama"
        write_checkpoint(model, args, args.layers, calib_text)
        variants = {"mesh": ("--mesh", args.mesh), "one_device": (), "one_device_batch4": ("--batch-size", "4")}
        for name, extra in variants.items():
            report_json = Path(tmp) / f"{name}.json"
            runs[name] = sketch_in_child(
                model, Path(tmp) / name, args, extra=(*extra, "--json", str(report_json)), host_devices=args.devices
            )
            runs[name]["mean_rel_output_error"] = json.loads(report_json.read_text())["mean_rel_output_error"]
            progress({name: runs[name]})
        differences = {
            name: compare_sketches(
                Path(tmp) / name,
                Path(tmp) / "one_device",
                4,
                lambda key: (args.intermediate if ".down_proj." in key else args.hidden) // 4,
            )
            for name in ("mesh", "one_device_batch4")
        }
    result = {
        **result_header(__file__, argv),
        "what": "`sketchtune sketch --mesh` and `--batch-size 4` against one device with batch size 8, on "
        "forced host devices: codes and codebooks compared, seconds per child process (forced devices "
        "share the host's cores: not a speed-up)",
        "devices": args.devices,
        "mesh": args.mesh,
        "model": shape_record(args, layers=args.layers, tokenizer=TOKENIZER),
        "sketch": sketch_settings(args),
        "runs": runs,
        "differences": differences,
    }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
