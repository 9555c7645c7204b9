"""Write our model as a Hugging Face directory that `transformers.AutoModelForCausalLM` loads as it is.

Every projection module is asked for its dense weight through ``dense_weight()``
when it has one (`SketchedLinear` returns W_hat = codebook[codes], ``[out, in]``),
otherwise its ``weight`` is used. This is the one place that reads weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from converters._common import ConversionError, hf_name
from sketchtune_jax._utils.fileio import atomic_directory, check_output_dir
from sketchtune_jax.layers import Linear
from sketchtune_jax.models import ModelConfig

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000`` or ``"5GB"`` / ``"500MB"`` / ``"20KiB"`` (decimal units, like HF)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _is_projection(node: Any) -> bool:
    return isinstance(node, Linear) or callable(getattr(node, "dense_weight", None))


def dense_tensors(model: nnx.Module) -> Iterator[tuple[str, Callable[[], jax.Array]]]:
    """``(hf_key, thunk)`` for every tensor of the dense HF checkpoint, evaluated lazily.

    Projections contribute ``<path>.weight`` (via ``dense_weight()`` if they have it) and
    ``<path>.bias`` when they have one; everything else under them (codebooks, codes) is
    not part of a dense checkpoint. Other `nnx.Param` s are written under their own path.
    """
    projections: list[tuple] = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and _is_projection(node):
            projections.append(path)
    covered = set(projections)

    def under_projection(path: tuple) -> bool:
        return any(path[:i] in covered for i in range(len(path)))

    # iter_graph yields children before parents, so collect first and then emit in path order.
    items: dict[str, Callable[[], jax.Array]] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and not under_projection(path):
            items[hf_name(path)] = lambda v=node: v[...]
        elif path in covered:
            items[hf_name(path) + ".weight"] = _weight_thunk(node)
            bias = getattr(node, "bias", None)
            if isinstance(bias, nnx.Variable):
                items[hf_name(path) + ".bias"] = lambda v=bias: v[...]
    yield from sorted(items.items(), key=lambda kv: _natural_key(kv[0]))


def _weight_thunk(module: Any) -> Callable[[], jax.Array]:
    if callable(getattr(module, "dense_weight", None)):
        return module.dense_weight
    return lambda: module.weight[...]


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def export_hf(
    model: nnx.Module,
    config: ModelConfig,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` to ``out_dir`` as a HF checkpoint; returns the directory.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` beyond
    ``max_shard_size``) and the tokenizer's files (when ``tokenizer`` is not None).
    Everything is written to a temporary directory beside the target and renamed into
    place, so a failure leaves no partial checkpoint. An existing non-empty ``out_dir``
    is refused unless ``overwrite=True``.
    """
    out = Path(out_dir).expanduser().absolute()
    try:
        check_output_dir(out, overwrite=overwrite)
    except FileExistsError as e:
        raise ConversionError(f"export target {e}") from e
    limit = parse_size(max_shard_size)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        dtype_name = _write_weights(model, tmp, limit)
        hf_config = config.to_hf()
        hf_config["torch_dtype"] = hf_config["dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {
            k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def _write_weights(model: nnx.Module, directory: Path, limit: int) -> str:
    """Write (possibly sharded) safetensors; returns the dtype name of the bulk of the weights."""
    from safetensors.numpy import save_file

    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = total = 0
    dtype_bytes: dict[str, int] = {}

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(directory / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, thunk in dense_tensors(model):
        array = np.asarray(jax.device_get(thunk()))
        if pending and pending_bytes + array.nbytes > limit:
            flush()
        pending[name] = np.ascontiguousarray(array)
        pending_bytes += array.nbytes
        total += array.nbytes
        dtype_bytes[array.dtype.name] = dtype_bytes.get(array.dtype.name, 0) + array.nbytes
    flush()
    if len(shards) == 1:
        os.rename(directory / "shard-00000.tmp", directory / "model.safetensors")
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.rename(directory / f"shard-{i:05d}.tmp", directory / file)
            weight_map.update({n: file for n in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    bulk = max(dtype_bytes, key=dtype_bytes.get) if dtype_bytes else "float32"
    return _DTYPE_NAMES.get(bulk, "float32")
