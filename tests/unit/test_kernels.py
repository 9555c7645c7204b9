"""Kernels against their jnp twins and against jax.grad of the naive formula.

Interpret-mode (Pallas on CPU) cases are few and small: each one runs the real kernel
code through the Pallas interpreter, which is slow. On a GPU,
``SKETCHTUNE_KERNEL_BACKEND=pallas`` runs the same cases compiled (`bench/gpu_check.sh`).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    BlockSizes,
    DxBlockSizes,
    ForwardBlockSizes,
    dequantize,
    dequantize_reference,
    pack_codes,
    sketched_matmul,
    sketched_matmul_grads,
    sketched_matmul_reference,
)


def make_sketch(out, in_features, groups, bits, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), dtype)
    codes = rng.integers(0, 2**bits, (out, groups, in_features // groups), dtype=np.uint8)
    return codebook, jnp.asarray(pack_codes(codes, bits)), codes


def naive_weight(codebook, codes_unpacked):
    out = codebook.shape[0]
    w = jnp.take_along_axis(codebook, jnp.asarray(codes_unpacked, jnp.int32), axis=2)
    return w.reshape(out, -1)


def naive_matmul(x, codebook, codes_unpacked):
    w = naive_weight(codebook, codes_unpacked).astype(x.dtype)
    y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# The Pallas backend of the kernel cases: the interpreter on CPU, "pallas" on a GPU.
KERNEL_BACKEND = os.environ.get("SKETCHTUNE_KERNEL_BACKEND", "interpret")
if KERNEL_BACKEND not in ("interpret", "pallas"):
    raise ValueError(f"SKETCHTUNE_KERNEL_BACKEND must be interpret or pallas, got {KERNEL_BACKEND!r}")


# (batch shape of x, out, in, groups, bits): odd sizes that are not tile multiples.
REFERENCE_CASES = [
    ((3,), 5, 12, 1, 4),
    ((2, 3), 17, 40, 2, 3),
    ((7,), 33, 48, 4, 2),
    ((1, 1, 4), 9, 64, 8, 4),
    ((), 6, 30, 2, 3),
]

# Interpret mode: small, but spanning several tiles in every dimension (block 16).
INTERPRET_CASES = [
    ((20,), 40, 48, 2, 4, jnp.float32),
    ((2, 9), 24, 80, 8, 3, jnp.float32),
    ((5,), 33, 64, 4, 2, jnp.bfloat16),
]


@pytest.mark.parametrize("batch,out,k,groups,bits", REFERENCE_CASES)
def test_reference_dequantize_is_exact(batch, out, k, groups, bits):
    codebook, codes, raw = make_sketch(out, k, groups, bits)
    w = dequantize(codebook, codes, bits, k, backend="reference")
    np.testing.assert_array_equal(np.asarray(w), np.asarray(naive_weight(codebook, raw)))


@pytest.mark.parametrize("batch,out,k,groups,bits", REFERENCE_CASES)
def test_reference_forward_and_grads(batch, out, k, groups, bits):
    codebook, codes, raw = make_sketch(out, k, groups, bits)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(*batch, k)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(*batch, out)), jnp.float32)
    y = sketched_matmul(x, codebook, codes, bits, backend="reference")
    assert y.shape == (*batch, out) and y.dtype == jnp.float32
    assert rel_err(y, naive_matmul(x, codebook, raw)) < 1e-5

    def loss(f):
        return lambda x, cb: jnp.sum(f(x, cb) * dy)

    dx, dcb = jax.grad(loss(lambda x, cb: sketched_matmul(x, cb, codes, bits, backend="reference")), (0, 1))(
        x, codebook
    )
    ndx, ndcb = jax.grad(loss(lambda x, cb: naive_matmul(x, cb, raw)), (0, 1))(x, codebook)
    assert rel_err(dx, ndx) < 1e-5
    assert rel_err(dcb, ndcb) < 1e-5


@pytest.mark.parametrize("batch,out,k,groups,bits,dtype", INTERPRET_CASES)
def test_interpret_matches_reference(batch, out, k, groups, bits, dtype):
    codebook, codes, raw = make_sketch(out, k, groups, bits, dtype=dtype)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(*batch, k)), dtype)
    dy = jnp.asarray(rng.normal(size=(*batch, out)), dtype)
    blocks = (16, 16, 16)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2

    w = dequantize(codebook, codes, bits, k, backend=KERNEL_BACKEND)
    assert w.dtype == dtype
    np.testing.assert_array_equal(np.asarray(w), np.asarray(dequantize_reference(codebook, codes, bits, k)))

    y = sketched_matmul(x, codebook, codes, bits, backend=KERNEL_BACKEND, block_sizes=blocks)
    assert y.dtype == dtype and y.shape == (*batch, out)
    assert rel_err(y, sketched_matmul_reference(x, codebook, codes, bits)) < tol

    dx, dcb = sketched_matmul_grads(x, codebook, codes, bits, dy, backend=KERNEL_BACKEND, block_sizes=blocks)
    f32 = lambda a: a.astype(jnp.float32)
    ndx, ndcb = jax.grad(lambda x, cb: jnp.sum(naive_matmul(x, cb, raw) * f32(dy)), (0, 1))(f32(x), f32(codebook))
    assert dx.dtype == dtype and dcb.dtype == dtype
    assert rel_err(dx, ndx) < tol
    assert rel_err(dcb, ndcb) < tol


def test_interpret_default_tiles_and_custom_vjp_under_jit():
    # Default block sizes, and the Pallas backward reached through jax.grad in jit.
    codebook, codes, raw = make_sketch(20, 36, 2, 4)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 36)), jnp.float32)

    @jax.jit
    def grads(x, cb):
        return jax.grad(
            lambda x, cb: jnp.sum(jnp.sin(sketched_matmul(x, cb, codes, 4, backend=KERNEL_BACKEND))), (0, 1)
        )(x, cb)

    dx, dcb = grads(x, codebook)
    ndx, ndcb = jax.grad(lambda x, cb: jnp.sum(jnp.sin(naive_matmul(x, cb, raw))), (0, 1))(x, codebook)
    assert rel_err(dx, ndx) < 1e-5
    assert rel_err(dcb, ndcb) < 1e-5
    # More than 64 rows takes the prefill tiling (no split K).
    x_long = jnp.asarray(np.random.default_rng(4).normal(size=(70, 36)), jnp.float32)
    y = sketched_matmul(x_long, codebook, codes, 4, backend=KERNEL_BACKEND)
    assert rel_err(y, naive_matmul(x_long, codebook, raw)) < 1e-5


def test_bf16_reference_rounds_weights_to_x_dtype():
    codebook, codes, raw = make_sketch(16, 32, 2, 4)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 32)), jnp.bfloat16)
    y = sketched_matmul(x, codebook, codes, 4, backend="reference")
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, naive_matmul(x, codebook, raw)) < 1e-2
    dcb = jax.grad(lambda cb: jnp.sum(sketched_matmul(x, cb, codes, 4, backend="reference").astype(jnp.float32)))(
        codebook
    )
    assert dcb.dtype == jnp.float32


def test_vmap_and_remat():
    codebook, codes, raw = make_sketch(12, 24, 2, 2)
    xs = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4, 24)), jnp.float32)
    f = lambda x: sketched_matmul(x, codebook, codes, 2, backend="reference")
    np.testing.assert_allclose(jax.vmap(f)(xs), f(xs), rtol=1e-6)
    g = jax.grad(
        lambda cb: jnp.sum(jax.checkpoint(lambda cb: sketched_matmul(xs, cb, codes, 2, backend="reference"))(cb) ** 2)
    )(codebook)
    ng = jax.grad(lambda cb: jnp.sum(naive_matmul(xs, cb, raw) ** 2))(codebook)
    assert rel_err(g, ng) < 1e-5
    # Codebooks and codes batched together (e.g. a stack of layers).
    cbs = jnp.stack([codebook, 2 * codebook])
    cds = jnp.stack([codes, codes])
    ys = jax.vmap(lambda cb, c: sketched_matmul(xs[0], cb, c, 2, backend="reference"))(cbs, cds)
    np.testing.assert_allclose(ys[1], 2 * f(xs[0]), rtol=1e-5)


def test_vmap_interpret():
    codebook, codes, _ = make_sketch(16, 32, 2, 4)
    xs = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 32)), jnp.float32)
    f = lambda x: sketched_matmul(x, codebook, codes, 4, backend=KERNEL_BACKEND)
    assert rel_err(jax.vmap(f)(xs), sketched_matmul_reference(xs, codebook, codes, 4)) < 1e-5


def test_default_backend_on_cpu_is_reference():
    codebook, codes, raw = make_sketch(8, 16, 1, 4)
    x = jnp.ones((2, 16), jnp.float32)
    assert rel_err(sketched_matmul(x, codebook, codes, 4), naive_matmul(x, codebook, raw)) < 1e-6


def test_bad_inputs():
    codebook, codes, _ = make_sketch(8, 32, 2, 4)
    x = jnp.ones((2, 32), jnp.float32)
    with pytest.raises(ValueError, match="bits"):
        sketched_matmul(x, codebook, codes, 5)
    with pytest.raises(ValueError, match="codebook must be"):
        sketched_matmul(x, codebook, codes, 3)
    with pytest.raises(ValueError, match="codes must be packed"):
        sketched_matmul(x, codebook, codes[:4], 4)
    with pytest.raises(ValueError, match="uint32"):
        sketched_matmul(x, codebook, codes.astype(jnp.int32), 4)
    with pytest.raises(ValueError, match="must divide"):
        dequantize(codebook, codes, 4, 33)
    with pytest.raises(ValueError, match="words"):
        sketched_matmul(jnp.ones((2, 48)), codebook, codes, 4)
    with pytest.raises(ValueError, match="backend"):
        sketched_matmul(x, codebook, codes, 4, backend="cuda")
    with pytest.raises(ValueError, match="block_sizes"):
        sketched_matmul(x, codebook, codes, 4, backend="interpret", block_sizes=(16, 24, 16))
    with pytest.raises(ValueError, match=r"DxBlockSizes.block_k=8"):
        DxBlockSizes(block_k=8)
    with pytest.raises(ValueError, match="float"):
        sketched_matmul(jnp.ones((2, 32), jnp.int32), codebook, codes, 4)
    with pytest.raises(ValueError, match="dy must be"):
        sketched_matmul_grads(x, codebook, codes, 4, jnp.ones((2, 9)))


def test_block_sizes_are_upper_bounds_per_kernel():
    # Defaults by rows of x (decode, mid, prefill), shrunk to the dimension's next power of two.
    assert ForwardBlockSizes().resolve(1, 4096, 4096) == (16, 64, 128)
    assert ForwardBlockSizes().resolve(40, 4096, 4096) == (64, 64, 64)
    assert ForwardBlockSizes().resolve(512, 4096, 4096) == (128, 128, 32)
    assert ForwardBlockSizes(block_n=256).resolve(512, 100, 20) == (128, 128, 32)
    assert DxBlockSizes().resolve(3, 20, 1000) == (16, 32, 128)
    assert BlockSizes.of((16, 32, 64)) == BlockSizes.uniform(16, 32, 64)
    assert BlockSizes.of(None) == BlockSizes()
    assert hash(BlockSizes()) == hash(BlockSizes())


def test_explicit_block_sizes_per_kernel():
    codebook, codes, raw = make_sketch(40, 48, 2, 4)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(20, 48)), jnp.float32)
    blocks = BlockSizes(forward=ForwardBlockSizes(16, 32, 16), dx=DxBlockSizes(16, 16, 32))
    y, vjp = jax.vjp(
        lambda x, cb: sketched_matmul(x, cb, codes, 4, backend=KERNEL_BACKEND, block_sizes=blocks), x, codebook
    )
    dy = jnp.ones_like(y)
    dx, dcb = vjp(dy)
    ny, nvjp = jax.vjp(lambda x, cb: naive_matmul(x, cb, raw), x, codebook)
    ndx, ndcb = nvjp(dy)
    assert rel_err(y, ny) < 1e-5 and rel_err(dx, ndx) < 1e-5 and rel_err(dcb, ndcb) < 1e-5
