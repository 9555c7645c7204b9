"""Fine-tuned codebooks as a small safetensors file that applies on top of a base sketch.

Keys are module paths joined by dots, ending in ``codebook``
(``model.layers.0.self_attn.q_proj.codebook``); values are ``[out, groups, 2**bits]``.
The header metadata records the format, shapes and bits of every entry.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from safetensors import safe_open

from sketchtune_jax._utils.fileio import atomic_write_bytes
from sketchtune_jax.layers import Codebook
from sketchtune_jax.models.scan import layer_path, stacked_layer_axis
from sketchtune_jax.parallel.distributed import is_primary, to_host

FORMAT_NAME = "sketchtune-codebooks"
FORMAT_VERSION = "1"


class CodebookMismatchError(ValueError):
    """A codebook file does not fit the model (missing modules, unexpected keys, wrong shapes)."""


def path_key(path: tuple[Any, ...]) -> str:
    """``('model', 'layers', 0, 'codebook')`` -> ``'model.layers.0.codebook'``."""
    return ".".join(str(p) for p in path)


def flat_state(state: nnx.State) -> dict[str, nnx.Variable]:
    """The variables of an NNX state keyed by dotted path."""
    return {path_key(p): v for p, v in nnx.to_flat_state(state)}


Entry = tuple[nnx.Variable, int | None]


def layer_entries(state: nnx.State) -> dict[str, Entry]:
    """The variables of an NNX state keyed by their per-layer dotted path.

    A variable of stacked layers (`sketchtune_jax.models.scan.stack_layers`) appears once
    per layer, as ``(variable, layer index)``; any other as ``(variable, None)``. Files
    name variables this way whether or not the layers are stacked in memory.
    """
    items: list[tuple[tuple[Any, ...], Entry]] = []
    for path, var in nnx.to_flat_state(state):
        if stacked_layer_axis(path) is None:
            items.append((path, (var, None)))
        else:
            items.extend((layer_path(path, i), (var, i)) for i in range(var.shape[0]))
    if any(i is not None for _, (_, i) in items):
        # In the order the per-layer model lists them (layer 0's variables first), so that
        # files list their entries alike either way.
        items.sort(key=lambda item: tuple((isinstance(p, str), p) for p in item[0]))
    return {path_key(path): entry for path, entry in items}


def entry_shape(entry: Entry) -> tuple[int, ...]:
    """The per-layer shape of an entry of `layer_entries`."""
    var, i = entry
    return tuple(var.shape) if i is None else tuple(var.shape[1:])


def entry_value(entry: Entry) -> Any:
    """The per-layer value of an entry of `layer_entries` (a slice of a stacked variable)."""
    var, i = entry
    return var[...] if i is None else var[...][i]


def set_entries(entries: dict[str, Entry], values: dict[str, Any]) -> None:
    """Assign ``values`` (per-layer key -> array of the variable's dtype) to their
    `layer_entries`. A stacked variable is rebuilt once from all its layers' values (a
    layer not given keeps its own) and stays where it was placed."""
    stacked: dict[int, tuple[nnx.Variable, dict[int, Any]]] = {}
    for key, value in values.items():
        var, i = entries[key]
        if i is None:
            var.set_value(value)
        else:
            stacked.setdefault(id(var), (var, {}))[1][i] = value
    for var, layers in stacked.values():
        old = var[...]
        new = jnp.stack([layers[i] if i in layers else old[i] for i in range(old.shape[0])])
        var.set_value(jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new)


def trainable_parameter_count(model: nnx.Module, wrt: Any = Codebook) -> int:
    """Number of scalars in the model's ``wrt`` variables (default `Codebook`: rows x groups x 2**bits summed)."""
    return int(sum(int(np.prod(v.shape)) for v in flat_state(nnx.state(model, wrt)).values()))


def codebook_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every `Codebook` as a host numpy array, keyed by dotted per-layer module path (native dtype).

    In a run of several processes every process must call this (codebooks split over
    them are gathered)."""
    return {k: to_host(entry_value(e)) for k, e in layer_entries(nnx.state(model, Codebook)).items()}


def _bits(shape: tuple[int, ...]) -> int:
    k = shape[-1]
    return int(k).bit_length() - 1 if k > 0 and k & (k - 1) == 0 else -1


def save_codebooks(model: nnx.Module, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> None:
    """Write the model's codebooks to ``path`` (safetensors, atomic: temp file then rename).

    bfloat16 codebooks are stored as float32 (numpy has no bfloat16); ``load_codebooks``
    casts back to the model's dtype. In a run of several processes all of them call this
    and process 0 writes.
    """
    tensors = {}
    for k, v in codebook_state(model).items():
        a = v.astype(np.float32) if v.dtype == jnp.bfloat16 else v
        tensors[k] = np.ascontiguousarray(a)
    if not tensors:
        raise ValueError("the model has no Codebook variables to save")
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()}),
        "bits": json.dumps({k: _bits(v.shape) for k, v in tensors.items()}),
    }
    if metadata:
        meta["user"] = json.dumps(metadata)
    if is_primary():
        atomic_write_bytes(path, safetensors.numpy.save(tensors, metadata=meta))


def read_codebooks(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and header metadata of a codebook file."""
    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def load_codebooks(model: nnx.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Replace the model's codebooks with those in ``path``, in place.

    Every key and shape is validated before anything changes: with ``strict`` a file
    must hold exactly the model's codebooks; without it, keys the model lacks are
    still errors but model codebooks absent from the file keep their values.

    Raises:
        CodebookMismatchError: listing every missing, unexpected and mis-shaped entry.
    """
    tensors, meta = read_codebooks(path)
    if meta.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise CodebookMismatchError(f"{path}: not a codebook file (format {meta.get('format')!r})")
    apply_codebooks(model, tensors, strict=strict, source=os.fspath(path))


def apply_codebooks(
    model: nnx.Module, tensors: dict[str, Any], *, strict: bool = True, source: str = "codebooks"
) -> None:
    """Validate and assign ``{dotted path: array}`` to the model's `Codebook` variables."""
    entries = layer_entries(nnx.state(model, Codebook))
    problems = []
    unexpected = sorted(set(tensors) - set(entries))
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    missing = sorted(set(entries) - set(tensors))
    if missing and strict:
        problems.append(f"missing from the file: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    for k in sorted(set(tensors) & set(entries)):
        want, got = entry_shape(entries[k]), tuple(np.shape(tensors[k]))
        if want != got:
            problems.append(f"{k}: shape {got} in the file, {want} in the model")
    if problems:
        raise CodebookMismatchError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    values = {}
    for k, array in tensors.items():
        var, i = entries[k]
        new = jnp.asarray(array, dtype=var.dtype)
        if i is None and isinstance(var[...], jax.Array):
            # Keep the variable where it lives (sharded models keep their layout).
            new = jax.device_put(new, var[...].sharding)
        values[k] = new
    set_entries(entries, values)
