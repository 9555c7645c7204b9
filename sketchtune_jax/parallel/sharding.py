"""Fine-tuning on a device mesh: data parallel, with sketched projections split
Megatron-style over the ``model`` axis.

JAX's own SPMD does the work; this module only says where things live::

    mesh = make_mesh("data=2,model=4")                   # Auto axes over all devices
    model = shard_model(model, mesh)                     # in place, returns the model
    optimizer = nnx.Optimizer(model, tx, wrt=Codebook)   # moments split like codebooks
    loss = train_step(model, optimizer, shard_batch(batch, mesh))   # any nnx.jit step

`shard_model` pairs projections by name (`MEGATRON_SPLITS`): ``q/k/v_proj`` and
``gate/up_proj`` split their output features (rows) over ``model_axis``, ``o_proj`` and
``down_proj`` their input features (columns), so the activations between the two stay
split and each attention or MLP block ends in one reduction (see
`pallas_kernels.sharding`). It annotates every `Codebook` and `Codes` with
``out_sharding`` and ``mesh`` metadata to match, splits the vocabulary of the frozen
embedding and ``lm_head`` weights over ``data_axis`` (FSDP-style: each device keeps a
slice and XLA gathers it where it is used), places every variable by its metadata
(`nnx.get_named_sharding`; variables without it are replicated, so annotations made with
`nnx.with_partitioning` are kept), and sets `pallas_kernels.SketchSharding` on every
`SketchedLinear` so that its kernel runs per shard. Activations are split over
``data_axis`` by their leading (batch) dimension.

Sketched layers work on meshes with ``Auto`` or ``Explicit`` axes (the default of
`jax.make_mesh`), but `sketchtune_jax.models` needs ``Auto`` axes: under ``Explicit``
ones JAX asks every ambiguous op (the embedding gather first) for an ``out_sharding``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pallas_kernels import SketchSharding
from sketchtune_jax.layers import SketchedLinear
from sketchtune_jax.settings import SettingError

__all__ = [
    "MEGATRON_SPLITS",
    "MESH_AXES",
    "VOCAB_MODULES",
    "make_mesh",
    "mesh_spec",
    "parse_mesh",
    "process_rows",
    "shard_batch",
    "shard_model",
    "shard_optimizer_state",
]

A = TypeVar("A")
Axis = str | tuple[str, ...] | None

# Projection name -> how its weights split over the model axis. A rows projection's
# output (split over model) feeds the next columns projection as its split input.
MEGATRON_SPLITS: Mapping[str, str] = {
    "q_proj": "rows",
    "k_proj": "rows",
    "v_proj": "rows",
    "gate_proj": "rows",
    "up_proj": "rows",
    "o_proj": "columns",
    "down_proj": "columns",
}
# Modules whose dense ``weight [vocab, hidden]`` is split by vocabulary over the data axis.
VOCAB_MODULES = ("embed_tokens", "lm_head")
# The axes `make_mesh` knows, in mesh order.
MESH_AXES = ("data", "model")


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh ``spec`` describes, e.g. ``"data=2,model=4"``, with ``Auto`` axes.

    Axes are `MESH_AXES`; one left out has size 1. The sizes must multiply to the number
    of ``devices`` (default: all of them). Raises `SettingError` (field ``mesh``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise SettingError(
            "mesh",
            f"{spec!r} multiplies to {math.prod(shape)} but the number of devices is {len(devices)}",
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``; raises `SettingError` (field ``mesh``)."""
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, size = (p.strip() for p in part.partition("="))
        if not eq:
            raise SettingError("mesh", f"must be axis=size pairs like data=2,model=4, got {spec!r}")
        if name not in MESH_AXES:
            raise SettingError("mesh", f"has an unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise SettingError("mesh", f"names the axis {name!r} twice in {spec!r}")
        if not size.isdigit() or int(size) < 1:
            raise SettingError("mesh", f"axis {name!r} must have a positive integer size, got {size!r}")
        sizes[name] = int(size)
    return sizes


def mesh_spec(mesh: Mesh) -> str:
    """``mesh`` written as `parse_mesh` reads it, e.g. ``"data=2,model=4"``."""
    return ",".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def axis_size(mesh: Mesh, axis: Axis) -> int:
    """How many devices ``axis`` (a mesh axis, a tuple of them, or None) spans."""
    names = () if axis is None else (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[a] for a in names)


def shard_model(
    node: A,
    mesh: Mesh,
    *,
    data_axis: Axis = "data",
    model_axis: Axis = "model",
    splits: Mapping[str, str] = MEGATRON_SPLITS,
    shard_vocab: bool = True,
) -> A:
    """Place ``node`` (any NNX graph: a model, or a module within one) on ``mesh``, in
    place; returns ``node``.

    A `SketchedLinear` named (last path entry) in ``splits`` splits as it says there,
    any other by rows; pass ``splits={}`` to split every projection by rows. Codebooks
    ``[out, groups, 2**bits]`` and codes ``[out, groups, words]`` follow their layer
    (kept whole where ``model_axis`` does not divide them). The ``weight [vocab, ...]``
    of a dense module named in `VOCAB_MODULES` is split by vocabulary over ``data_axis``
    when that divides it (with ``shard_vocab``; else replicated). Other variables with ``out_sharding`` metadata follow it; all
    others are replicated. An `nnx.Optimizer` made afterwards copies each codebook's
    metadata into its moments, and Flax places them the same way as it creates them.
    """
    for path, value in nnx.iter_graph(node):
        name = str(path[-1]) if path else ""
        if isinstance(value, SketchedLinear):
            _shard_sketched(value, SketchSharding(mesh, data_axis, model_axis, splits.get(name, "rows")), mesh)
        elif shard_vocab and name in VOCAB_MODULES and isinstance(getattr(value, "weight", None), nnx.Variable):
            _shard_vocab(value.weight, mesh, data_axis)
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    return node


def shard_optimizer_state(optimizer: nnx.Optimizer, data_axis: Axis = "data") -> nnx.Optimizer:
    """Split the optimizer's moments over ``data_axis`` too (ZeRO-1 / FSDP of optimizer state),
    in place; returns ``optimizer``.

    Moments are made like their parameters (a codebook's follow its ``model`` split and are
    whole on every data-parallel device). Each moment with ``mesh`` metadata (from
    `shard_model`) also splits over ``data_axis`` its first dimension that can take it: one
    already split (rows over ``model``) when ``model x data`` divides it, else the first whole
    one that ``data`` divides. A moment no dimension fits stays as it was. The update then
    runs on each device's slice, and XLA gathers the new parameter where it is used;
    `sketchtune_jax.train.step` keeps the layout from step to step.
    """
    meshes = []
    for _, var in nnx.iter_graph(optimizer):
        if not isinstance(var, nnx.OptState) or var.get_metadata().get("mesh") is None:
            continue
        mesh = var.get_metadata()["mesh"]
        size = axis_size(mesh, data_axis)
        spec = list(var.get_metadata().get("out_sharding") or (None,) * var.ndim)
        if size == 1 or any(_names(a) & _names(data_axis) for a in spec):
            continue
        for dim, axis in enumerate(spec):
            if var.shape[dim] % (axis_size(mesh, axis) * size) == 0:
                spec[dim] = (*_names(axis, ordered=True), *_names(data_axis, ordered=True))
                var.set_metadata(out_sharding=tuple(spec))
                meshes.append(mesh)
                break
    if meshes:
        state = nnx.state(optimizer, nnx.OptState)
        nnx.update(optimizer, jax.device_put(state, nnx.get_named_sharding(state, meshes[0])))
    return optimizer


def _names(axis: Axis, *, ordered: bool = False):
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    return names if ordered else set(names)


def _shard_sketched(layer: SketchedLinear, sharding: SketchSharding, mesh: Mesh) -> None:
    layer.sharding = sharding
    for var in (layer.codebook, layer.codes):
        # With the mesh beside it, variables made from this one (optimizer moments)
        # are placed as they are created.
        var.set_metadata(out_sharding=tuple(sharding.weight_spec(var.shape)), mesh=mesh)


def _shard_vocab(weight: nnx.Variable, mesh: Mesh, data_axis: Axis) -> None:
    size = axis_size(mesh, data_axis)
    if len(weight.shape) == 2 and size > 1 and weight.shape[0] % size == 0:
        weight.set_metadata(out_sharding=(data_axis, None), mesh=mesh)


def shard_batch(batch: A, mesh: Mesh, data_axis: Axis = "data", *, dim: int = 0) -> A:
    """Split every array of ``batch`` (any pytree of the *global* batch, the same on every
    process) by its dimension ``dim`` (the batch dimension: 1 for stacked micro-batches
    ``[A, B, T]``) over ``data_axis``; arrays with no such dimension are replicated.

    With several processes, each transfers only its own rows (`process_rows`) and the
    global arrays are assembled by `jax.make_array_from_process_local_data`.
    """
    size = axis_size(mesh, data_axis)
    several = jax.process_count() > 1

    def put(leaf):
        if not hasattr(leaf, "shape") or len(leaf.shape) <= dim:
            sharding = NamedSharding(mesh, PartitionSpec())
            if several:
                return jax.make_array_from_process_local_data(sharding, np.asarray(leaf), np.shape(leaf))
            return jax.device_put(leaf, sharding)
        if leaf.shape[dim] % size:
            raise ValueError(
                f"batch dimension {leaf.shape[dim]} is not divisible by the {size} devices of mesh axis {data_axis!r}"
            )
        sharding = NamedSharding(mesh, PartitionSpec(*(None,) * dim, data_axis))
        if not several:
            return jax.device_put(leaf, sharding)
        rows = process_rows(leaf.shape[dim], mesh, data_axis)
        local = np.asarray(leaf[(slice(None),) * dim + (rows,)])
        return jax.make_array_from_process_local_data(sharding, local, leaf.shape)

    return jax.tree.map(put, batch)


def process_rows(rows: int, mesh: Mesh, data_axis: Axis = "data") -> slice:
    """The rows of a global batch of ``rows`` rows, split over ``data_axis``, that this
    process's devices hold: what a per-process data loader must read. All rows with one process."""
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    spans = {index[0].indices(rows)[:2] for index in sharding.addressable_devices_indices_map((rows,)).values()}
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    if sum(e - s for s, e in spans) != stop - start:
        raise ValueError(
            f"this process's devices hold rows {sorted(spans)} of the batch, not one run of rows; "
            f"order the mesh's devices by process along {data_axis!r}"
        )
    return slice(start, stop)
