"""SketchedLinear: construction, forward, and the JAX/NNX transforms through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import pack_codes
from sketchtune_jax.layers import Codebook, Codes, Linear, SketchedLinear

IN, OUT, GROUPS, BITS = 24, 10, 2, 4


def sketch_parts(seed=0, bits=BITS, groups=GROUPS):
    rng = np.random.default_rng(seed)
    codebook = jnp.asarray(rng.normal(size=(OUT, groups, 2**bits)), jnp.float32)
    codes = rng.integers(0, 2**bits, (OUT, groups, IN // groups), dtype=np.uint8)
    return codebook, codes


def naive(layer_codebook, codes, x, bias=None):
    w = jnp.take_along_axis(layer_codebook, jnp.asarray(codes, jnp.int32), axis=2).reshape(OUT, IN)
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), precision=jax.lax.Precision.HIGHEST)
    return y if bias is None else y + bias


@pytest.fixture
def layer_and_parts():
    linear = Linear(IN, OUT, use_bias=True, rngs=nnx.Rngs(0))
    linear.bias[...] = jnp.arange(OUT, dtype=jnp.float32)
    codebook, codes = sketch_parts()
    return SketchedLinear.from_linear(linear, codebook, codes), codebook, codes, linear


def test_from_linear_and_state(layer_and_parts):
    layer, codebook, codes, linear = layer_and_parts
    assert (layer.in_features, layer.out_features, layer.bits, layer.groups) == (IN, OUT, 4, 2)
    assert isinstance(layer.codebook, Codebook) and isinstance(layer.codes, Codes)
    assert layer.codes[...].dtype == jnp.uint32
    np.testing.assert_array_equal(layer.bias[...], linear.bias[...])
    assert jax.tree.leaves(nnx.state(layer, nnx.Param))  # codebook and bias
    np.testing.assert_array_equal(
        np.asarray(layer.dense_weight()),
        np.take_along_axis(np.asarray(codebook), codes.astype(int), 2).reshape(OUT, IN),
    )


def test_constructor_accepts_packed_codes_and_checks_shapes():
    codebook, codes = sketch_parts(bits=3)
    a = SketchedLinear(IN, OUT, bits=3, groups=GROUPS, codebook=codebook, codes=codes)
    b = SketchedLinear(IN, OUT, bits=3, groups=GROUPS, codebook=codebook, codes=pack_codes(codes, 3))
    np.testing.assert_array_equal(a.codes[...], b.codes[...])
    with pytest.raises(ValueError, match="codebook must be"):
        SketchedLinear(IN, OUT, bits=4, groups=GROUPS, codebook=codebook, codes=codes)
    with pytest.raises(ValueError, match="must divide"):
        SketchedLinear(IN, OUT, bits=3, groups=5, codebook=codebook, codes=codes)
    with pytest.raises(ValueError, match="codes must be"):
        SketchedLinear(IN, OUT, bits=3, groups=GROUPS, codebook=codebook, codes=codes[:, :, :5])


def test_empty_under_eval_shape():
    abstract = nnx.eval_shape(
        lambda: SketchedLinear.empty(IN, OUT, 3, GROUPS, dtype=jnp.bfloat16, codebook_dtype=jnp.bfloat16)
    )
    assert abstract.codebook.shape == (OUT, GROUPS, 8)
    assert abstract.codebook.dtype == jnp.bfloat16
    # 12 columns a group at 3 bits: one block of 32 codes, three words.
    assert abstract.codes.shape == (OUT, GROUPS, 3) and abstract.codes.dtype == jnp.uint32
    layer = SketchedLinear.empty(IN, OUT, 2, GROUPS)
    assert layer(jnp.ones((1, IN))).shape == (1, OUT) and layer.bias is None


def test_forward_dtype_and_batch(layer_and_parts):
    layer, codebook, codes, _ = layer_and_parts
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, IN)), jnp.float32)
    y = layer(x)
    assert y.shape == (2, 3, OUT) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, naive(codebook, codes, x, layer.bias[...]), rtol=1e-5, atol=1e-5)
    assert layer(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    layer.dtype = jnp.bfloat16
    assert layer(x).dtype == jnp.bfloat16


def test_jit_grad_vmap_remat(layer_and_parts):
    layer, codebook, codes, _ = layer_and_parts
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, IN)), jnp.float32)

    @nnx.jit
    def nnx_forward(m, x):
        return m(x)

    np.testing.assert_allclose(nnx_forward(layer, x), layer(x), rtol=1e-6)

    graphdef, state = nnx.split(layer)
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(y, layer(x), rtol=1e-6)

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, Codebook))(layer, x)
    ref = jax.grad(lambda cb: jnp.sum(naive(cb, codes, x, layer.bias[...]) ** 2))(codebook)
    np.testing.assert_allclose(grads["codebook"][...], ref, rtol=1e-5, atol=1e-5)
    assert "bias" not in grads and "codes" not in grads

    cb_state, rest = nnx.state(layer, Codebook, ...)
    g = jax.jit(jax.grad(lambda cbs: loss(nnx.merge(graphdef, cbs, rest), x)))(cb_state)
    np.testing.assert_allclose(g["codebook"][...], ref, rtol=1e-5, atol=1e-5)

    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(layer)(xs), layer(xs), rtol=1e-6)

    remat_loss = nnx.remat(loss)
    g2 = nnx.grad(remat_loss, argnums=nnx.DiffState(0, Codebook))(layer, x)
    np.testing.assert_allclose(g2["codebook"][...], ref, rtol=1e-5, atol=1e-5)


def test_interpret_backend_forward_and_grad():
    codebook, codes = sketch_parts(bits=2)
    layer = SketchedLinear(IN, OUT, bits=2, groups=GROUPS, codebook=codebook, codes=codes, backend="interpret")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, IN)), jnp.float32)
    np.testing.assert_allclose(layer(x), naive(codebook, codes, x), rtol=1e-5, atol=1e-5)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, Codebook))(layer)
    ref = jax.grad(lambda cb: jnp.sum(naive(cb, codes, x) ** 2))(codebook)
    np.testing.assert_allclose(g["codebook"][...], ref, rtol=1e-5, atol=1e-5)
