"""Data-parallel fine-tuning on a device mesh, with codebooks and codes split by rows.

JAX's own SPMD does the work; this module only says where things live::

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = shard_model(model, mesh)                     # in place, returns the model
    optimizer = nnx.Optimizer(model, tx, wrt=Codebook)   # moments split like codebooks
    loss = train_step(model, optimizer, shard_batch(batch, mesh))   # any nnx.jit step

`shard_model` annotates every `Codebook` and `Codes` with ``out_sharding`` and ``mesh``
metadata (rows over ``model_axis`` where that axis divides them), places every variable
by its metadata (`nnx.get_named_sharding`; variables without it are replicated, so
annotations made with `nnx.with_partitioning` are kept), and sets
`pallas_kernels.SketchSharding` on every `SketchedLinear` so that its kernel runs per
shard (`pallas_kernels.sharded_sketched_matmul`). Activations are split over
``data_axis`` by their leading (batch) dimension.

Sketched layers work on meshes with ``Auto`` or ``Explicit`` axes (the default of
`jax.make_mesh`), but `sketchtune_jax.models` needs ``Auto`` axes: under ``Explicit``
ones JAX asks every ambiguous op (the embedding gather first) for an ``out_sharding``.
"""

from __future__ import annotations

from typing import TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels import SketchSharding
from sketchtune_jax.layers import Codebook, Codes, SketchedLinear

__all__ = ["shard_batch", "shard_model"]

A = TypeVar("A")


def shard_model(
    node: A,
    mesh: Mesh,
    *,
    data_axis: str | tuple[str, ...] | None = "data",
    model_axis: str | tuple[str, ...] | None = "model",
) -> A:
    """Place ``node`` (any NNX graph: a model, or a module within one) on ``mesh``, in
    place; returns ``node``.

    Codebooks ``[out, groups, 2**bits]`` and codes ``[out, groups, words]`` are split by
    rows over ``model_axis`` (kept whole when the axis does not divide ``out``); variables
    with ``out_sharding`` metadata follow it; all others are replicated. An
    `nnx.Optimizer` made afterwards copies each codebook's metadata into its moments,
    and Flax places them the same way as it creates them.
    """
    sharding = SketchSharding(mesh, data_axis, model_axis)
    for _, value in nnx.iter_graph(node):
        if isinstance(value, SketchedLinear):
            value.sharding = sharding
        elif isinstance(value, (Codebook, Codes)):
            # With the mesh beside it, variables made from this one (optimizer moments)
            # are placed as they are created.
            value.set_metadata(out_sharding=tuple(sharding.rows_spec(value.shape)), mesh=mesh)
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    return node


def shard_batch(batch: A, mesh: Mesh, data_axis: str | tuple[str, ...] = "data") -> A:
    """Split every array of ``batch`` (any pytree) by its leading dimension over
    ``data_axis``; scalars are replicated.

    Single process only: with several processes, build each global array from the
    process's own rows with `jax.make_array_from_process_local_data`.
    """
    size = 1
    for axis in (data_axis,) if isinstance(data_axis, str) else data_axis:
        size *= mesh.shape[axis]

    def put(leaf):
        if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
            return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))
        if leaf.shape[0] % size:
            raise ValueError(
                f"batch dimension {leaf.shape[0]} is not divisible by the {size} devices of mesh axis {data_axis!r}"
            )
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec(data_axis)))

    return jax.tree.map(put, batch)
