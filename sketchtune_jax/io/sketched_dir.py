"""Sketched checkpoints: a directory with the HF ``config.json``, tokenizer files,
``sketch_config.json`` and ``model.safetensors`` holding the dense tensors that were
not sketched plus ``<module>.codebook`` and ``<module>.codes`` for each sketched one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax._utils.fileio import atomic_directory
from sketchtune_jax._utils.module_paths import iter_modules, set_submodule
from sketchtune_jax.layers import SketchedLinear
from sketchtune_jax.models import LoadedModel

SKETCH_CONFIG = "sketch_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def is_sketched_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sketched checkpoint directory."""
    return (Path(path) / SKETCH_CONFIG).is_file()


def sketched_modules(model: nnx.Module) -> dict[str, dict[str, int]]:
    """``{name: {in_features, out_features, bits, groups, use_bias}}`` for every `SketchedLinear` in ``model``."""
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bits": m.bits,
            "groups": m.groups,
            "use_bias": m.bias is not None,
        }
        for name, m in iter_modules(model, SketchedLinear)
    }


def save_sketched(
    model: nnx.Module,
    config,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    settings: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    heal: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its `SketchedLinear` modules) as a sketched checkpoint directory, atomically.

    ``settings`` and ``report`` describe how the sketch was made; ``heal``, when given, how
    its codebooks were distilled afterwards (`sketchtune_jax.jobs.heal_to_dir`).
    """
    _, state = nnx.split(model)
    flat = [(".".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]
    specs = {name: (tuple(var.shape), np.dtype(var.dtype)) for name, var in flat}
    return write_sketched_dir(
        out_dir,
        config,
        tokenizer,
        sketched_modules(model),
        specs,
        ((name, var[...]) for name, var in flat),
        settings=settings,
        report=report,
        heal=heal,
        overwrite=overwrite,
    )


def write_sketched_dir(
    out_dir: str | os.PathLike,
    config,
    tokenizer,
    modules: dict[str, dict[str, int]],
    specs: dict[str, tuple[tuple[int, ...], np.dtype]],
    arrays: Iterable[tuple[str, Any]],
    *,
    settings: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    heal: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a sketched checkpoint directory atomically, its tensors streamed one at a time.

    ``modules``: as `sketched_modules` returns. ``specs``: ``{name: (shape, dtype)}`` of every
    tensor, in the order ``arrays`` yields ``(name, array)``; only one array is held at a time.
    """
    if not modules:
        raise ValueError("the model has no sketched modules; sketch it first (sketchtune sketch)")
    bits = sorted({m["bits"] for m in modules.values()})
    groups = sorted({m["groups"] for m in modules.values()})
    sketch_config = {
        "format_version": FORMAT_VERSION,
        "bits": bits[0] if len(bits) == 1 else bits,
        "groups_per_row": groups[0] if len(groups) == 1 else groups,
        "modules": modules,
        "settings": settings or {},
        "report": report or {},
    }
    if heal is not None:
        sketch_config["heal"] = heal
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tmp / WEIGHTS, specs, arrays, metadata={"format": "sketchtune-jax"})
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
        (tmp / SKETCH_CONFIG).write_text(json.dumps(sketch_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def write_safetensors(
    path: Path,
    specs: dict[str, tuple[tuple[int, ...], np.dtype]],
    arrays: Iterable[tuple[str, Any]],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """A safetensors file written tensor by tensor: the header from ``specs``, then each array of ``arrays``.

    ``arrays`` must yield exactly the names of ``specs``, in that order, each of that shape and dtype.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        if dtype.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype.name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    expected = iter(specs.items())
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, array in arrays:
            want, (shape, dtype) = next(expected, (None, (None, None)))
            array = np.ascontiguousarray(array)
            if name != want or array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(
                    f"tensor {name!r} {array.dtype} {array.shape} does not match the header's "
                    f"next entry {want!r} {dtype} {shape}"
                )
            f.write(array.reshape(-1).view(np.uint8).data)
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors written than the header lists")


def load_sketched(
    path: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    codebook_dtype: jnp.dtype | None = None,
):
    """Load a sketched checkpoint directory as a `sketchtune_jax.models.LoadedModel`.

    Dense tensors are cast to ``param_dtype``, codebooks to ``codebook_dtype``
    (default ``param_dtype``); codes keep their packed integer type.
    """
    import safetensors
    from transformers import AutoTokenizer

    from sketchtune_jax.models import LlamaForCausalLM, ModelConfig

    path = Path(path)
    if not is_sketched_dir(path):
        raise FileNotFoundError(
            f"{path} is not a sketched checkpoint (no {SKETCH_CONFIG}); run `sketchtune sketch` first"
        )
    sketch_config = json.loads((path / SKETCH_CONFIG).read_text())
    if sketch_config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / SKETCH_CONFIG} has format_version {sketch_config.get('format_version')!r}; "
            f"this version of sketchtune-jax reads {FORMAT_VERSION}"
        )
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    codebook_dtype = codebook_dtype or param_dtype

    def build():
        model = LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        for name, spec in sketch_config["modules"].items():
            set_submodule(
                model,
                name,
                SketchedLinear.empty(**spec, dtype=dtype, codebook_dtype=codebook_dtype, bias_dtype=param_dtype),
            )
        return model

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    filled = []
    try:
        with safetensors.safe_open(str(weights), framework="flax") as f:
            keys = set(f.keys())
            for p, var in nnx.to_flat_state(state):
                key = ".".join(str(x) for x in p)
                if key not in keys:
                    raise ValueError(f"{weights}: tensor {key!r} is missing")
                value = f.get_tensor(key)
                if tuple(value.shape) != tuple(var.shape):
                    raise ValueError(
                        f"{weights}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(var.shape)}"
                    )
                if jnp.issubdtype(var.dtype, jnp.floating):
                    value = value.astype(var.dtype)
                elif value.dtype != var.dtype:
                    raise ValueError(f"{weights}: tensor {key!r} has dtype {value.dtype}, expected {var.dtype}")
                filled.append((p, var.replace(value)))
    except safetensors.SafetensorError as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e})") from e
    model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").is_file() else None
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=str(path))
