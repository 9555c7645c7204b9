"""Sketched layers under JAX SPMD on 8 fake CPU devices, against the unsharded model.

The sharded tests need 8 devices, which ``XLA_FLAGS`` must ask for before JAX starts;
the rest of the suite runs on one, so `test_sharded_in_subprocess` reruns this file in a
fresh interpreter with ``--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fake_devices import rerun_on_fake_devices
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import SketchSharding, sharded_sketched_matmul, sketched_matmul
from sketchtune_jax.layers import Codebook, Linear, SketchedLinear
from sketchtune_jax.parallel.sharding import make_mesh as mesh_from_spec
from sketchtune_jax.parallel.sharding import shard_batch, shard_model
from sketchtune_jax.settings import SettingError

DEVICES = 8
needs_8 = pytest.mark.skipif(jax.device_count() < DEVICES, reason="needs 8 devices (run by test_sharded_in_subprocess)")
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
TOL = dict(rtol=2e-5, atol=2e-5)


def test_sharded_in_subprocess():
    rerun_on_fake_devices(__file__, DEVICES, "test_sharded_in_subprocess")


def make_mesh(axis_type: str = "auto"):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AXIS_TYPES[axis_type],) * 2)


def sketched(
    in_features: int, out_features: int, seed: int, backend: str, groups: int = 2, bits: int = 4
) -> SketchedLinear:
    rng = np.random.default_rng(seed)
    codebook = rng.normal(size=(out_features, groups, 2**bits)).astype(np.float32)
    codes = rng.integers(0, 2**bits, (out_features, groups, in_features // groups), np.uint8)
    return SketchedLinear(
        in_features,
        out_features,
        bits=bits,
        groups=groups,
        codebook=jnp.asarray(codebook),
        codes=jnp.asarray(codes),
        bias=jnp.asarray(rng.normal(size=out_features), jnp.float32),
        backend=backend,
    )


def batch(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def assert_trees_close(a, b):
    """Leaf by leaf: the sharded tree's variables carry sharding metadata, the other's not."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert_close(x, y)


def layer_loss(layer: SketchedLinear, x: jax.Array, dy: jax.Array) -> jax.Array:
    return jnp.sum(layer(x) * dy)


@nnx.jit
def layer_grads(layer, x, dy):
    loss, (grads, dx) = nnx.value_and_grad(layer_loss, argnums=(0, 1))(layer, x, dy)
    return loss, layer(x), dx, grads.codebook[...]


@needs_8
@pytest.mark.parametrize(
    "backend, axis_type",
    [("reference", "auto"), ("reference", "explicit"), ("interpret", "explicit")],
)
def test_sketched_linear_forward_and_grads(backend, axis_type):
    mesh = make_mesh(axis_type)
    layer = sketched(24, 16, seed=0, backend=backend)
    x, dy = batch((4, 3, 24)), batch((4, 3, 16), seed=2)
    want = layer_grads(layer, x, dy)
    sharded = shard_model(nnx.clone(layer), mesh)
    assert sharded.sharding == SketchSharding(mesh)
    assert sharded.codebook[...].sharding.spec == P("model", None, None)
    assert sharded.codes[...].sharding.spec == P("model", None, None)
    xs, dys = shard_batch((x, dy), mesh)
    got = layer_grads(sharded, xs, dys)
    for g, w in zip(got, want):
        assert_close(g, w)
    _, y, dx, dcodebook = got
    assert y.sharding.spec == P("data", None, "model")
    assert dx.sharding.spec[0] == "data"
    assert dcodebook.sharding.spec[0] == "model"


@needs_8
def test_uneven_shapes_stay_whole():
    """Batch 3 over data=2 and 6 rows over model=4 do not divide: those dims stay whole."""
    mesh = make_mesh()
    layer = sketched(8, 6, seed=3, backend="reference", groups=1, bits=3)
    x, dy = batch((3, 8)), batch((3, 6), seed=4)
    want = layer_grads(layer, x, dy)
    sharded = shard_model(nnx.clone(layer), mesh)
    assert sharded.codebook[...].sharding.spec == P(None, None, None)
    for g, w in zip(layer_grads(sharded, x, dy), want):
        assert_close(g, w)


@needs_8
def test_reference_backend_partitions_under_gspmd():
    """Without the wrapper, GSPMD partitions the jnp twin itself: same numbers, and
    no all-gather (neither weights nor activations are gathered)."""
    mesh = make_mesh()
    layer = sketched(64, 32, seed=5, backend="reference", groups=4)
    x, dy = batch((8, 64)), batch((8, 32), seed=6)
    cb, codes = layer.codebook[...], layer.codes[...]

    def loss(x, cb):
        return jnp.sum(sketched_matmul(x, cb, codes, 4, backend="reference") * dy)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = grad(x, cb)
    rows = NamedSharding(mesh, P("model"))
    args = (jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(cb, rows))
    codes = jax.device_put(codes, rows)
    got = grad(*args)
    assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        assert_close(g, w)
    assert "all-gather" not in grad.lower(*args).compile().as_text()


class TinyModel(nnx.Module):
    """``x [batch, seq, 16] -> [batch, seq, 8]``: sketched up, dense mid, sketched down."""

    def __init__(self, backend: str):
        self.up = sketched(16, 32, seed=10, backend=backend)
        self.mid = Linear(32, 32, use_bias=True, rngs=nnx.Rngs(0))
        self.down = sketched(32, 8, seed=11, backend=backend, groups=4, bits=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.mid(jax.nn.gelu(self.up(x)))))


def model_loss(model: TinyModel, x: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - target) ** 2)


@nnx.jit
def train_step(model, optimizer, x, target):
    loss, grads = nnx.value_and_grad(model_loss, argnums=nnx.DiffState(0, Codebook))(model, x, target)
    optimizer.update(model, grads)
    return loss, grads


@needs_8
@pytest.mark.parametrize("backend, axis_type", [("reference", "explicit"), ("interpret", "auto")])
def test_tiny_model_grads_and_optax_step(backend, axis_type):
    mesh = make_mesh(axis_type)
    tx = optax.adam(1e-2)
    x, target = batch((4, 2, 16)), batch((4, 2, 8), seed=7)

    model = TinyModel(backend)
    sharded = shard_model(nnx.clone(model), mesh)
    optimizer = nnx.Optimizer(model, tx, wrt=Codebook)
    sharded_optimizer = nnx.Optimizer(sharded, tx, wrt=Codebook)

    loss, grads = train_step(model, optimizer, x, target)
    xs, targets = shard_batch((x, target), mesh)
    sharded_loss, sharded_grads = train_step(sharded, sharded_optimizer, xs, targets)

    assert_close(sharded_loss, loss)
    assert_trees_close(sharded_grads, grads)
    assert_trees_close(nnx.state(sharded), nnx.state(model))
    assert_trees_close(nnx.state(sharded_optimizer), nnx.state(optimizer))
    for layer in (sharded.up, sharded.down):
        assert layer.codebook[...].sharding.spec[0] == "model"
    assert sharded.mid.weight[...].sharding.is_fully_replicated
    mu = sharded_optimizer.opt_state[0].mu["up"]["codebook"]
    assert mu[...].sharding.spec[0] == "model"


@needs_8
def test_shard_batch_checks_divisibility():
    mesh = make_mesh()
    out = shard_batch({"tokens": jnp.zeros((4, 5), jnp.int32), "step": 3}, mesh)
    assert out["tokens"].sharding.spec == P("data")
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch(jnp.zeros((3, 5)), mesh)


@needs_8
def test_sketch_sharding_checks_axes():
    mesh = make_mesh()
    with pytest.raises(ValueError, match="not in the mesh"):
        SketchSharding(mesh, model_axis="tensor")
    with pytest.raises(ValueError, match="share an axis"):
        SketchSharding(mesh, data_axis=("data", "model"))
    x = batch((4, 24))
    layer = sketched(24, 16, seed=0, backend="reference")
    y = sharded_sketched_matmul(x, layer.codebook[...], layer.codes[...], 4, SketchSharding(mesh, data_axis=None))
    assert y.sharding.spec == P(None, "model")


def assert_layout(a: jax.Array, mesh, spec: P) -> None:
    """``a`` is laid out as ``spec`` (trailing ``None`` entries are optional in JAX's specs)."""
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (a.sharding, spec)


def matmul_grads(x, codebook, codes, dy, bits, sharding=None):
    """Loss, y, dx and dcodebook of ``sum(y * dy)``, sharded when ``sharding`` is given."""

    def loss(x, codebook):
        if sharding is None:
            y = sketched_matmul(x, codebook, codes, bits, backend="reference")
        else:
            y = sharded_sketched_matmul(x, codebook, codes, bits, sharding, backend="reference")
        return jnp.sum(y * dy), y

    (value, y), (dx, dcb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, codebook)
    return value, y, dx, dcb


@needs_8
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_columns_split_forward_and_grads(axis_type):
    """Input features over model: a partial product per shard and one psum give the unsharded numbers."""
    mesh = make_mesh(axis_type)
    layer = sketched(64, 16, seed=20, backend="reference", groups=8)
    cb, codes = layer.codebook[...], layer.codes[...]
    x, dy = batch((4, 3, 64)), batch((4, 3, 16), seed=21)
    want = matmul_grads(x, cb, codes, dy, 4)
    sharding = SketchSharding(mesh, split="columns")
    assert sharding.weight_spec(cb.shape) == P(None, "model", None)
    xs, dys = shard_batch((x, dy), mesh)
    got = matmul_grads(xs, cb, codes, dys, 4, sharding)
    for g, w in zip(got, want):
        assert_close(g, w)
    _, y, dx, dcb = got
    assert_layout(y, mesh, P("data", None, None))
    # dx comes back in the layout x was given in (under Explicit axes, exactly that).
    assert dx.sharding.spec[0] == "data"
    assert_layout(dcb, mesh, P(None, "model", None))


@needs_8
def test_columns_split_falls_back_to_rows():
    """Two groups over model=4 cannot split by columns: the weights split by rows instead."""
    mesh = make_mesh()
    layer = sketched(24, 16, seed=22, backend="reference", groups=2)
    cb, codes = layer.codebook[...], layer.codes[...]
    sharding = SketchSharding(mesh, split="columns")
    assert sharding.weight_spec(cb.shape) == P("model", None, None)
    x, dy = batch((4, 24)), batch((4, 16), seed=23)
    got = matmul_grads(x, cb, codes, dy, 4, sharding)
    for g, w in zip(got, matmul_grads(x, cb, codes, dy, 4)):
        assert_close(g, w)
    assert_layout(got[1], mesh, P("data", "model"))


class VocabTable(nnx.Module):
    def __init__(self, vocab: int, hidden: int):
        self.weight = nnx.Param(batch((vocab, hidden), seed=vocab))


class TinyBlock(nnx.Module):
    """A Llama-named MLP between an embedding and an ``lm_head``: ids ``[B, T]`` -> logits."""

    def __init__(self, vocab: int = 16, hidden: int = 32, inner: int = 64):
        self.embed_tokens = VocabTable(vocab, hidden)
        self.gate_proj = sketched(hidden, inner, seed=30, backend="reference", groups=4)
        self.up_proj = sketched(hidden, inner, seed=31, backend="reference", groups=4)
        self.down_proj = sketched(inner, hidden, seed=32, backend="reference", groups=8)
        self.lm_head = Linear(hidden, vocab, rngs=nnx.Rngs(1))

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed_tokens.weight[...][ids]
        h = h + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.lm_head(h)


def block_loss(model: TinyBlock, ids: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.log_softmax(model(ids))[..., 0])


@nnx.jit
def block_grads(model, ids):
    return nnx.value_and_grad(block_loss, argnums=nnx.DiffState(0, Codebook))(model, ids)


@needs_8
def test_shard_model_pairs_projections_megatron_style():
    """gate/up split by rows, down by columns: the MLP needs no all-gather of activations,
    where splitting every projection by rows gathers the hidden state before down_proj."""
    mesh = make_mesh()
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 16, (4, 5)), jnp.int32)
    model = TinyBlock()
    want = block_grads(model, ids)
    paired = shard_model(nnx.clone(model), mesh)
    assert paired.gate_proj.sharding.split == "rows" and paired.down_proj.sharding.split == "columns"
    assert_layout(paired.up_proj.codebook[...], mesh, P("model", None, None))
    assert_layout(paired.down_proj.codebook[...], mesh, P(None, "model", None))
    assert_layout(paired.down_proj.codes[...], mesh, P(None, "model", None))
    assert_layout(paired.embed_tokens.weight[...], mesh, P("data", None))
    assert_layout(paired.lm_head.weight[...], mesh, P("data", None))
    ids_s = shard_batch(ids, mesh)
    got = block_grads(paired, ids_s)
    assert_close(got[0], want[0])
    assert_trees_close(got[1], want[1])

    def gathers(model) -> list[str]:
        hlo = block_grads.lower(model, ids_s).compile().as_text()
        return [line for line in hlo.splitlines() if "all-gather(" in line and "f32[2,5," in line]

    # Activations (per device [2, 5, features]) are gathered over model only by the all-rows layout.
    assert not gathers(paired)
    assert gathers(shard_model(nnx.clone(model), mesh, splits={}))


@needs_8
def test_vocab_stays_whole_when_data_axis_does_not_divide():
    mesh = make_mesh()
    model = shard_model(TinyBlock(vocab=15), mesh)
    assert model.embed_tokens.weight[...].sharding.is_fully_replicated


@needs_8
def test_make_mesh_from_spec():
    mesh = mesh_from_spec("data=2,model=4")
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert set(mesh.axis_types) == {AxisType.Auto}
    assert dict(mesh_from_spec("model=8").shape) == {"data": 1, "model": 8}
    small = mesh_from_spec(" data = 2 , model=2", devices=jax.devices()[:4])
    assert small.devices.size == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=2,tensor=4", "unknown axis 'tensor'"),
        ("data=0", "positive integer size"),
        ("data=-2", "positive integer size"),
        ("data=2,data=1", "twice"),
        ("data2", "axis=size pairs"),
        ("data=3,model=5", "multiplies to 15 but the number of devices is"),
    ],
)
def test_make_mesh_refuses(spec, message):
    with pytest.raises(SettingError, match=message) as error:
        mesh_from_spec(spec)
    assert error.value.field == "mesh"
    assert "\n" not in str(error.value)
