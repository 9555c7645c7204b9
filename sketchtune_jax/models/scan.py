"""Decoder layers stacked into one module and run by `nnx.scan`, so that a train step's
program (and its compile time) does not grow with depth.

A model's decoder layers are an ``nnx.List`` of identical modules (``model.layers.3...``).
`stack_layers` turns that list, in place, into one module of the same class whose every
variable has a leading ``[num_layers]`` axis; `LlamaModel` then runs its cache-free
forward (training, evaluation) as one scan over that axis. `unstack_layers` undoes it.
Stacking copies each variable once (not each step); the step reads the stacked arrays
as they are::

    stack_layers(model)            # model.model.layers: one DecoderLayer, variables [L, ...]
    ...train...
    unstack_layers(model)          # back to model.model.layers[0..L-1]

Names do not change on disk: the variable at ``model.layers.self_attn.q_proj.codebook``
(stacked) is written as ``model.layers.{i}.self_attn.q_proj.codebook`` for each ``i``
(`layer_path`); codebook files and training checkpoints use those per-layer names.
Stacking and unstacking keep each array's `NamedSharding` (the layer axis unsplit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "LAYERS",
    "is_stacked",
    "layer_path",
    "layer_slice",
    "scan_layers",
    "stack_layers",
    "stack_modules",
    "stacked_layer_axis",
    "unstack_layers",
    "unstack_module",
]

# The attribute of the decoder (`LlamaModel`) that holds its layers.
LAYERS = "layers"


def _decoder(model: nnx.Module) -> nnx.Module:
    """The module that holds ``layers`` and runs them stacked or not (`LlamaModel`, whose
    class says so with ``runs_stacked_layers = True``), given it or its causal LM."""
    for node in (model, getattr(model, "model", None)):
        if getattr(type(node), "runs_stacked_layers", False):
            return node
    raise ValueError(f"{type(model).__name__} cannot run stacked layers (only the Llama-family models can)")


def is_stacked(model: nnx.Module) -> bool:
    """Whether ``model``'s (or its decoder's) layers are stacked by `stack_layers`."""
    try:
        decoder = _decoder(model)
    except ValueError:
        return False
    return not isinstance(getattr(decoder, LAYERS), nnx.List)


def _static_attributes(module: nnx.Module) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and not isinstance(v, (nnx.Variable, nnx.Module, nnx.List))
    }


def _difference(first: nnx.Module, other: nnx.Module) -> str:
    """What makes ``other`` differ from ``first`` (a variable's shape or a static attribute)."""
    a, b = dict(nnx.to_flat_state(nnx.state(first))), dict(nnx.to_flat_state(nnx.state(other)))
    if set(a) != set(b):
        names = sorted(".".join(map(str, p)) for p in set(a) ^ set(b))
        return f"variables present in only one of them: {', '.join(names[:4])}"
    for path, var in a.items():
        x, y = var.get_value(), b[path].get_value()
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            return f"{'.'.join(map(str, path))} is {y.dtype}{list(y.shape)}, not {x.dtype}{list(x.shape)}"
    modules = dict(nnx.iter_graph(first))
    for path, module in nnx.iter_graph(other):
        if isinstance(module, nnx.Module):
            mine, theirs = _static_attributes(modules[path]), _static_attributes(module)
            for k in sorted(mine.keys() | theirs.keys()):
                if mine.get(k) != theirs.get(k):
                    where = ".".join(map(str, (*path, k)))
                    return f"{where} is {theirs.get(k)!r}, not {mine.get(k)!r}"
    return "their module structure differs"


def _stacked_sharding(value: jax.Array) -> jax.sharding.Sharding:
    sharding = value.sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return sharding


def _layer_sharding(value: jax.Array) -> jax.sharding.Sharding:
    sharding = value.sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _stack(*xs: jax.Array) -> jax.Array:
    return jnp.stack(xs)


def _unstack(x: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(x[i] for i in range(x.shape[0]))


def _with_layer_axis(var: nnx.Variable, value: jax.Array) -> nnx.Variable:
    meta = var.get_metadata()
    if meta.get("out_sharding"):
        return var.copy(value, out_sharding=(None, *meta["out_sharding"]))
    return var.copy(value)


def _without_layer_axis(var: nnx.Variable, value: jax.Array) -> nnx.Variable:
    meta = var.get_metadata()
    if meta.get("out_sharding"):
        return var.copy(value, out_sharding=tuple(meta["out_sharding"])[1:])
    return var.copy(value)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of ``modules[0]``'s class whose variables stack theirs on a new leading axis.

    The modules must be alike: the same variables of the same shapes and dtypes and the
    same static attributes (bits, groups, ...); otherwise ValueError names the first
    difference. The inputs are emptied as their variables are stacked, so that only one
    variable (across the modules) is held twice at a time.
    """
    if not modules:
        raise ValueError("no modules to stack")
    graphdef, _ = nnx.split(modules[0])
    for i, module in enumerate(modules[1:], 1):
        if nnx.split(module)[0] != graphdef:
            raise ValueError(
                f"cannot stack layer {i} onto layer 0: {_difference(modules[0], module)}; "
                "stacking needs every layer alike (same bits, groups and shapes)"
            )
    flats = [nnx.to_flat_state(nnx.state(m)) for m in modules]
    stacked = []
    for j, (path, var) in enumerate(flats[0]):
        values = [flat[j][1].get_value() for flat in flats]
        target = _stacked_sharding(values[0])
        value = jax.jit(_stack, out_shardings=target)(*values)
        stacked.append((path, _with_layer_axis(var, value)))
        for flat in flats:
            flat[j][1].set_value(jnp.zeros((0,), values[0].dtype))
        del values
    return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def unstack_module(stacked: nnx.Module) -> list[nnx.Module]:
    """The modules `stack_modules` stacked into ``stacked`` (which is emptied)."""
    graphdef, state = nnx.split(stacked)
    flat = nnx.to_flat_state(state)
    n = flat[0][1].get_value().shape[0]
    layers: list[list[tuple[Any, nnx.Variable]]] = [[] for _ in range(n)]
    for path, var in flat:
        value = var.get_value()
        target = _layer_sharding(value)
        parts = jax.jit(_unstack, out_shardings=(target,) * n)(value)
        for i in range(n):
            layers[i].append((path, _without_layer_axis(var, parts[i])))
        var.set_value(jnp.zeros((0,), value.dtype))
        del value, parts
    return [nnx.merge(graphdef, nnx.from_flat_state(items)) for items in layers]


def stack_layers(model: nnx.Module) -> nnx.Module:
    """Stack ``model``'s decoder layers (``model.model.layers``) in place; returns ``model``.

    A no-op on a model already stacked. Raises ValueError, leaving the model as it was,
    when the model has no ``layers`` list or its layers differ (e.g. mixed bits); the
    message names the first difference.
    """
    decoder = _decoder(model)
    if is_stacked(decoder):
        return model
    setattr(decoder, LAYERS, stack_modules(list(getattr(decoder, LAYERS))))
    return model


def unstack_layers(model: nnx.Module) -> nnx.Module:
    """Undo `stack_layers` in place (``model.model.layers`` a list again); returns ``model``."""
    decoder = _decoder(model)
    if is_stacked(decoder):
        setattr(decoder, LAYERS, nnx.List(unstack_module(getattr(decoder, LAYERS))))
    return model


def scan_layers(body: Callable[[nnx.Module, jax.Array], jax.Array], stacked: nnx.Module, carry: jax.Array) -> jax.Array:
    """``carry = body(layer, carry)`` for each layer of ``stacked``, in order, as one `nnx.scan`.

    ``body`` reads the layer and must not change it: nothing about the layers comes out
    of the scan, so a step never copies the stacked variables.
    """

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: None})
    def run(layer: nnx.Module, h: jax.Array) -> jax.Array:
        return body(layer, h)

    return run(stacked, carry)


def layer_slice(stacked: nnx.Module, i: int) -> nnx.Module:
    """Layer ``i`` of ``stacked`` as a module of its own (its arrays sliced: a copy under jit
    unless XLA fuses it into the use)."""
    graphdef, state = nnx.split(stacked)
    flat = [(path, _without_layer_axis(var, var.get_value()[i])) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def stacked_layer_axis(path: tuple[Any, ...]) -> int | None:
    """Where the layer index goes in a stacked variable's ``path``, or None for any other path.

    A stacked path is a per-layer one without its index: ``('model', 'layers', 'mlp', ...)``
    (index at 2) for ``('model', 'layers', 0, 'mlp', ...)``; the same holds inside an
    optimizer's state (``('opt_state', 0, 'mu', 'model', 'layers', 'mlp', ...)``).
    """
    for k in range(len(path) - 1):
        if path[k] == LAYERS and not isinstance(path[k + 1], int):
            return k + 1
    return None


def layer_path(path: tuple[Any, ...], i: int) -> tuple[Any, ...]:
    """The per-layer path of layer ``i`` of a stacked variable at ``path``."""
    k = stacked_layer_axis(path)
    if k is None:
        raise ValueError(f"{'.'.join(map(str, path))} is not a stacked layer path")
    return (*path[:k], i, *path[k:])
