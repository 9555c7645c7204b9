"""`sketched_matmul` on a device mesh: one kernel call per shard through `jax.shard_map`.

XLA cannot split a Pallas call across devices, so a sharded caller states how the
operands are laid out and every device runs the kernel on its own block. A projection
splits one of two ways over ``model_axis`` (`SketchSharding.split`); the batch (leading)
dimension of ``x`` and ``y`` is split over ``data_axis`` in both.

``split="rows"`` (output features; Megatron's column-parallel layer):

* ``x [..., in]`` replicated over ``model_axis``;
* ``codebook [out, groups, 2**bits]`` and packed ``codes [out, groups, words]`` split by
  rows over ``model_axis``, replicated over ``data_axis``;
* ``y [..., out]`` split on its last dimension over ``model_axis``; no reduction, since
  each row of ``W_hat`` makes one output feature.
* Backward: ``dx = dy @ W_hat`` sums over the rows, so the per-shard ``dx`` is summed
  over ``model_axis``.

``split="columns"`` (input features; Megatron's row-parallel layer):

* ``x [..., in]`` split on its last dimension over ``model_axis``;
* codebook and codes split by groups (dimension 1) over ``model_axis``: a group is a
  contiguous block of ``in / groups`` input columns, so a shard's groups are exactly
  the columns of its block of ``x``;
* ``y [..., out]`` replicated over ``model_axis``: each shard's product is a partial sum
  over its columns, summed by one ``psum`` over ``model_axis`` (in fp32).
* Backward: ``dy`` is replicated over ``model_axis``, so each shard's ``dx`` (its
  columns) is complete; no reduction over ``model_axis``.

Either way ``dcodebook`` sums ``dy^T x`` over the batch, so it is summed over
``data_axis`` (in fp32) and stays split like the codebook. Pairing a rows projection
with a columns one (``q/k/v`` then ``o``; ``gate/up`` then ``down``) leaves one
reduction per attention or MLP block instead of a gather after every projection.

A dimension that the mesh axis does not divide stays whole (replicated), so any shape
runs; ``"columns"`` where ``model_axis`` does not divide ``groups`` falls back to
``"rows"``. Operands laid out otherwise are resharded to the layout above first. Use it
via ``sharded_sketched_matmul(x, codebook, codes, bits, SketchSharding(mesh))``, or let
``sketchtune_jax.parallel.sharding.shard_model`` set it on every ``SketchedLinear``. Meshes with
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

from pallas_kernels.backends import Backend
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.sketched_matmul import sketched_matmul, sketched_matmul_grads

AxisName = str | tuple[str, ...] | None
SPLITS = ("rows", "columns")


@dataclasses.dataclass(frozen=True)
class SketchSharding:
    """How sketched matmuls split over ``mesh`` (static and hashable).

    ``data_axis`` splits the batch (leading) dimension of activations, ``model_axis`` the
    weights: their rows (output features) with ``split="rows"``, their groups (input
    features) with ``split="columns"``; either axis may be a tuple of mesh axes or
    ``None`` (not split).
    """

    mesh: Mesh | AbstractMesh
    data_axis: AxisName = "data"
    model_axis: AxisName = "model"
    split: str = "rows"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
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

    def columns_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """Spec of a codebook or codes of ``shape`` (``[out, groups, ...]``) under
        ``split="columns"``: groups over ``model_axis`` when it divides them, else
        `rows_spec` (the fallback layout)."""
        if self.splits_columns(shape[1]):
            return PartitionSpec(None, self.model_axis, *(None,) * (len(shape) - 2))
        return self.rows_spec(shape)

    def splits_columns(self, groups: int) -> bool:
        """Whether a ``groups``-group weight is split by columns (``split="columns"``
        and ``model_axis`` divides ``groups``)."""
        return self.split == "columns" and self._axis_if_divides(self.model_axis, groups) is not None

    def weight_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """Spec of a codebook or codes of ``shape`` under this sharding's ``split``."""
        return self.columns_spec(shape) if self.split == "columns" else self.rows_spec(shape)

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
    """Static per-call layout: the specs of x, codebook/codes and y, the axes each
    reduction runs over, and the kernel settings."""

    sharding: SketchSharding
    x_spec: PartitionSpec
    weight_spec: PartitionSpec
    y_spec: PartitionSpec
    # Axes y is summed over in the forward (columns split) and dx in the backward (rows split).
    y_sum_axis: AxisName
    dx_sum_axis: AxisName
    bits: int
    backend: Backend | None
    block_sizes: BlockSizes

    @classmethod
    def of(
        cls,
        sharding: SketchSharding,
        x_shape: tuple[int, ...],
        codebook_shape: tuple[int, ...],
        bits: int,
        backend: Backend | None,
        block_sizes: BlockSizes,
    ) -> _Plan:
        batch = sharding.batch_spec(x_shape)
        if sharding.splits_columns(codebook_shape[1]):
            weight_spec = sharding.columns_spec(codebook_shape)
            x_spec = PartitionSpec(*batch[:-1], sharding.model_axis)
            y_spec = PartitionSpec(*batch[:-1], None)
            y_sum, dx_sum = sharding.model_axis, None
        else:
            weight_spec = sharding.rows_spec(codebook_shape)
            x_spec = batch
            y_spec = PartitionSpec(*batch[:-1], weight_spec[0])
            y_sum, dx_sum = None, weight_spec[0]
        return cls(sharding, x_spec, weight_spec, y_spec, y_sum, dx_sum, bits, backend, block_sizes)

    @property
    def data_axis(self) -> AxisName:
        return self.x_spec[0] if len(self.x_spec) > 1 else None

    def shard_map(self, f, in_specs, out_specs):
        # check_vma=False: a pallas_call inside a vma-checked shard_map must declare how
        # each output varies over the mesh; the psums are explicit instead.
        return jax.shard_map(f, mesh=self.sharding.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _psum_fp32(a: jax.Array, axis: AxisName) -> jax.Array:
    """``a`` summed over ``axis`` in fp32 (partial sums in bf16 would lose precision)."""
    if axis is None:
        return a
    return lax.psum(a.astype(jnp.float32), axis).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sharded(x: jax.Array, codebook: jax.Array, codes: jax.Array, plan: _Plan) -> jax.Array:
    def body(x, codebook, codes):
        y = sketched_matmul(x, codebook, codes, plan.bits, backend=plan.backend, block_sizes=plan.block_sizes)
        # Columns split: each shard's y is a partial sum over its input columns.
        return _psum_fp32(y, plan.y_sum_axis)

    specs = (plan.x_spec, plan.weight_spec, plan.weight_spec)
    return plan.shard_map(body, specs, plan.y_spec)(x, codebook, codes)


def _sharded_fwd(x, codebook, codes, plan):
    return _sharded(x, codebook, codes, plan), (x, codebook, codes)


def _sharded_bwd(plan: _Plan, residuals, dy):
    x, codebook, codes = residuals
    dy = _reshard(dy, plan.sharding.mesh, plan.y_spec)

    def body(x, codebook, codes, dy):
        dx, dcb = sketched_matmul_grads(
            x, codebook, codes, plan.bits, dy, backend=plan.backend, block_sizes=plan.block_sizes
        )
        # Rows split: each shard holds some rows of W_hat, so its dx is a partial sum over them.
        if plan.dx_sum_axis is not None:
            dx = lax.psum(dx, plan.dx_sum_axis)
        # Each shard saw part of the batch; the (tiny) sum is taken in fp32.
        return dx, _psum_fp32(dcb, plan.data_axis)

    dx, dcb = plan.shard_map(
        body,
        (plan.x_spec, plan.weight_spec, plan.weight_spec, plan.y_spec),
        (plan.x_spec, plan.weight_spec),
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
    """`sketched_matmul` run per shard of ``sharding.mesh`` (layouts in the module docstring).

    Args:
      x: ``[..., in_features]``; the leading dimension is split over ``data_axis``, the
        last over ``model_axis`` when the weights are split by columns.
      codebook: ``[out, groups, 2**bits]``, split over ``model_axis`` by rows or by groups
        (``sharding.split``); differentiable.
      codes: packed ``uint32 [out, groups, words]``, split like the codebook.
      bits, backend, block_sizes: as in `sketched_matmul` (any backend; the block sizes
        apply to the per-shard shapes).
      sharding: the mesh, its axes and the split.

    Returns:
      ``[..., out]`` in ``x.dtype``, split over ``data_axis`` (leading) and, with a rows
      split, over ``model_axis`` (last). Differentiable in ``x`` and ``codebook`` with the
      same layouts as the inputs.
    """
    if x.ndim < 1:
        raise ValueError("x must be [..., in_features], got a scalar")
    if codebook.ndim != 3:
        raise ValueError(f"codebook must be [out, groups, 2**bits], got shape {codebook.shape}")
    plan = _Plan.of(sharding, x.shape, codebook.shape, bits, backend, BlockSizes.of(block_sizes))
    mesh = sharding.mesh
    return _sharded(
        _reshard(x, mesh, plan.x_spec),
        _reshard(codebook, mesh, plan.weight_spec),
        _reshard(codes, mesh, plan.weight_spec),
        plan,
    )
