"""Sketched checkpoints: a directory with the HF ``config.json``, tokenizer files,
``sketch_config.json`` and ``model.safetensors`` holding the dense tensors that were
not sketched plus ``<module>.codebook`` and ``<module>.codes`` for each sketched one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sketchtune_jax.fileio import atomic_directory
from sketchtune_jax.layers import SketchedLinear
from sketchtune_jax.module_paths import iter_modules, set_submodule

SKETCH_CONFIG = "sketch_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def is_sketched_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sketched checkpoint directory."""
    return (Path(path) / SKETCH_CONFIG).is_file()


def sketched_modules(model: nnx.Module) -> dict[str, dict[str, int]]:
    """``{name: {in_features, out_features, bits, groups, use_bias}}`` for every `SketchedLinear` in ``model``."""
    return {
        name: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits, "groups": m.groups,
               "use_bias": m.bias is not None}
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
    its codebooks were distilled afterwards (`sketchtune_jax.workflows.heal_to_dir`).
    """
    import safetensors.flax

    modules = sketched_modules(model)
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
    _, state = nnx.split(model)
    tensors = {".".join(str(p) for p in path): var[...] for path, var in nnx.to_flat_state(state)}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        safetensors.flax.save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "sketchtune-jax"})
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
        (tmp / SKETCH_CONFIG).write_text(json.dumps(sketch_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def load_sketched(
    path: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    codebook_dtype: jnp.dtype | None = None,
):
    """Load a sketched checkpoint directory as a `converters.LoadedModel`.

    Dense tensors are cast to ``param_dtype``, codebooks to ``codebook_dtype``
    (default ``param_dtype``); codes keep their packed integer type.
    """
    import safetensors
    from transformers import AutoTokenizer

    from converters import LoadedModel
    from sketchtune_jax.models import LlamaForCausalLM, ModelConfig

    path = Path(path)
    if not is_sketched_dir(path):
        raise FileNotFoundError(f"{path} is not a sketched checkpoint (no {SKETCH_CONFIG}); run `sketchtune sketch` first")
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
            set_submodule(model, name, SketchedLinear.empty(
                **spec, dtype=dtype, codebook_dtype=codebook_dtype, bias_dtype=param_dtype))
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
                    raise ValueError(f"{weights}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(var.shape)}")
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

