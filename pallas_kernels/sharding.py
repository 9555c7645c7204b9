"""`sketched_matmul` on a device mesh: one kernel call per shard through `jax.shard_map`.

XLA cannot split a Pallas call across devices, so a sharded caller states how the
operands are laid out and every device runs the kernel on its own block:

* ``x [..., in]``: the leading dimension split over ``data_axis`` (data parallelism),
  replicated over ``model_axis``;
* ``codebook [out, groups, 2**bits]`` and packed ``codes [out, groups, words]``: split by
  rows (output features) over ``model_axis``, replicated over ``data_axis``;
* ``y [..., out]``: leading dimension over ``data_axis``, last over ``model_axis``; no
  reduction, since each row of ``W_hat`` makes one output feature.

The backward pass runs per shard as well: ``dx = dy @ W_hat`` sums over the rows, so the
per-shard ``dx`` is summed over ``model_axis``; ``dcodebook`` sums ``dy^T x`` over the
batch, so it is summed over ``data_axis`` and stays split by rows.

A dimension that the mesh axis does not divide stays whole (replicated), so any shape
runs; operands laid out otherwise are resharded to the layout above first. Use it via
``sharded_sketched_matmul(x, codebook, codes, bits, SketchSharding(mesh))``, or let
``sketchtune_jax.sharding.shard_model`` set it on every ``SketchedLinear``. Meshes with
``Auto`` or ``Explicit`` axes both work.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from pallas_kernels.sketched_matmul import (
    Backend,
    BlockSizes,
    sketched_matmul,
    sketched_matmul_grads,
)

AxisName = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class SketchSharding:
    """How sketched matmuls split over ``mesh`` (static and hashable).

    ``data_axis`` splits the batch (leading) dimension of activations, ``model_axis`` the
    rows of codebooks and codes; either may be a tuple of mesh axes or ``None`` (not split).
    """

    mesh: Mesh | AbstractMesh
    data_axis: AxisName = "data"
    model_axis: AxisName = "model"

    def __post_init__(self) -> None:
        for axis in (*_names(self.data_axis), *_names(self.model_axis)):
            if axis not in self.mesh.axis_names:
                raise ValueError(f"axis {axis!r} is not in the mesh axes {self.mesh.axis_names}")
        if set(_names(self.data_axis)) & set(_names(self.model_axis)):
            raise ValueError(f"data_axis {self.data_axis!r} and model_axis {self.model_axis!r} share an axis")

    def _axis_if_divides(self, axis: AxisName, dim: int) -> AxisName:
        size = math.prod(self.mesh.shape[a] for a in _names(axis))
        return axis if _names(axis) and dim % size == 0 else None

    def rows_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """Spec of a codebook or codes of ``shape`` (``[out, ...]``): rows over
        ``model_axis`` when it divides ``out``, else replicated."""
        return PartitionSpec(self._axis_if_divides(self.model_axis, shape[0]), *(None,) * (len(shape) - 1))

    def batch_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """Spec of an activation of ``shape`` (``[batch, ..., features]``): the leading
        dimension over ``data_axis`` when it divides it, else replicated."""
        if len(shape) < 2:
            return PartitionSpec(*(None,) * len(shape))
        return PartitionSpec(self._axis_if_divides(self.data_axis, shape[0]), *(None,) * (len(shape) - 1))


def _names(axis: AxisName) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _reshard(a: jax.Array, mesh: Mesh | AbstractMesh, spec: PartitionSpec) -> jax.Array:
    """Gives ``a`` the layout ``spec`` on the mesh's ``Explicit`` axes, where the layout is
    part of the type and `jax.shard_map` checks it; ``Auto`` axes are resharded by
    `jax.shard_map` itself."""
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}
    if not explicit:
        return a

    def keep(entry):
        names = tuple(n for n in _names(entry) if n in explicit)
        return names[0] if len(names) == 1 else (names or None)

    target = PartitionSpec(*(keep(e) for e in spec))
    if isinstance(mesh, Mesh):
        return jax.reshard(a, NamedSharding(mesh, target))
    return jax.reshard(a, target)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static per-call layout: the specs of x, codebook/codes and y, and the kernel settings."""

    sharding: SketchSharding
    x_spec: PartitionSpec
    rows_spec: PartitionSpec
    y_spec: PartitionSpec
    bits: int
    backend: Backend | None
    block_sizes: BlockSizes

    def shard_map(self, f, in_specs, out_specs):
        # check_vma=False: a pallas_call inside a vma-checked shard_map must declare how
        # each output varies over the mesh; the psums in the backward are explicit instead.
        return jax.shard_map(f, mesh=self.sharding.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sharded(x: jax.Array, codebook: jax.Array, codes: jax.Array, plan: _Plan) -> jax.Array:
    def body(x, codebook, codes):
        return sketched_matmul(x, codebook, codes, plan.bits, backend=plan.backend, block_sizes=plan.block_sizes)

    return plan.shard_map(body, (plan.x_spec, plan.rows_spec, plan.rows_spec), plan.y_spec)(x, codebook, codes)


def _sharded_fwd(x, codebook, codes, plan):
    return _sharded(x, codebook, codes, plan), (x, codebook, codes)


def _sharded_bwd(plan: _Plan, residuals, dy):
    x, codebook, codes = residuals
    dy = _reshard(dy, plan.sharding.mesh, plan.y_spec)
    model_axis = plan.rows_spec[0]
    data_axis = plan.x_spec[0] if len(plan.x_spec) else None

    def body(x, codebook, codes, dy):
        dx, dcb = sketched_matmul_grads(
            x, codebook, codes, plan.bits, dy, backend=plan.backend, block_sizes=plan.block_sizes
        )
        if model_axis is not None:
            # Each shard holds some rows of W_hat: its dx is a partial sum over them.
            dx = lax.psum(dx, model_axis)
        if data_axis is not None:
            # Each shard saw part of the batch; the (tiny) sum is taken in fp32.
            dcb = lax.psum(dcb.astype(jnp.float32), data_axis).astype(codebook.dtype)
        return dx, dcb

    dx, dcb = plan.shard_map(
        body,
        (plan.x_spec, plan.rows_spec, plan.rows_spec, plan.y_spec),
        (plan.x_spec, plan.rows_spec),
    )(x, codebook, codes, dy)
    # Codes are integers: their cotangent is symbolically zero.
    return dx, dcb, None


_sharded.defvjp(_sharded_fwd, _sharded_bwd)


def sharded_sketched_matmul(
    x: jax.Array,
    codebook: jax.Array,
    codes: jax.Array,
    bits: int,
    sharding: SketchSharding,
    *,
    backend: Backend | None = None,
    block_sizes: BlockSizes | tuple[int, int, int] | None = None,
) -> jax.Array:
    """`sketched_matmul` run per shard of ``sharding.mesh`` (layout in the module docstring).

    Args:
      x: ``[..., in_features]``; the leading dimension is split over ``data_axis``.
      codebook: ``[out, groups, 2**bits]``, split by rows over ``model_axis``; differentiable.
      codes: packed ``uint32 [out, groups, words]``, split like the codebook.
      bits, backend, block_sizes: as in `sketched_matmul` (any backend; the block sizes
        apply to the per-shard shapes).
      sharding: the mesh and its axes.

    Returns:
      ``[..., out]`` in ``x.dtype``, split over ``data_axis`` (leading) and ``model_axis``
      (last). Differentiable in ``x`` and ``codebook`` with the same layouts.
    """
    if x.ndim < 1:
        raise ValueError("x must be [..., in_features], got a scalar")
    if codebook.ndim != 3:
        raise ValueError(f"codebook must be [out, groups, 2**bits], got shape {codebook.shape}")
    x_spec = sharding.batch_spec(x.shape)
    rows_spec = sharding.rows_spec(codebook.shape)
    y_spec = PartitionSpec(*x_spec[:-1], rows_spec[0])
    plan = _Plan(sharding, x_spec, rows_spec, y_spec, bits, backend, BlockSizes.of(block_sizes))
    mesh = sharding.mesh
    return _sharded(
        _reshard(x, mesh, x_spec),
        _reshard(codebook, mesh, rows_spec),
        _reshard(codes, mesh, sharding.rows_spec(codes.shape)),
        plan,
    )
