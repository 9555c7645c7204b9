"""Mosaic GPU kernels (forward, dx, codebook gradient): run in the Mosaic GPU interpreter
against the ``jnp`` twins, and lowered for CUDA with ``jax.export`` from this CPU host.
Beside an NVIDIA GPU they run compiled instead (``SKETCHTUNE_KERNEL_INTERPRET=1`` forces
the interpreter; `bench/gpu_check.sh`).

The interpreted cases use small integers for activations, gradients and codebooks: every
product and sum is exact in fp32 whatever the order, so the kernels must equal the twins
bit for bit (one mislaid code or column changes the result)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    BlockSizes,
    DcodebookBlockSizes,
    DxBlockSizes,
    ForwardBlockSizes,
    mosaic_gpu,
    pack_codes,
    packed_words,
    sketched_matmul,
    sketched_matmul_grads_reference,
    sketched_matmul_reference,
)
from pallas_kernels.mosaic_gpu import _STAGE_BYTES, _fit_forward, _forward_stage_bytes, _GpuLayout

ON_GPU = jax.devices()[0].platform == "gpu"
INTERPRET = os.environ.get("SKETCHTUNE_KERNEL_INTERPRET", "0" if ON_GPU else "1") != "0"
TRITON = "__gpu$xla.gpu.triton"


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    # A kernel that raised leaves the interpreter's simulated GPU dirty for the next one.
    if INTERPRET:
        mosaic_gpu.reset_interpreter()
    yield


def integer_case(m, out, groups, cols, bits, seed=0, dtype=jnp.bfloat16):
    """``(x [m, in], dy [m, out], codebook, codes)`` of small integers (exact in bf16 and in
    any fp32 order of summation)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(-3, 4, (m, groups * cols)), dtype)
    dy = jnp.asarray(rng.integers(-3, 4, (m, out)), dtype)
    codebook = jnp.asarray(rng.integers(-8, 9, (out, groups, 2**bits)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, cols)), jnp.uint8), bits)
    return x, dy, codebook, codes


# (m, out, groups, cols per group, bits, K step in input features or None): rows, tokens
# and columns that need padding (out=72: a second, padded row tile; 100 columns: a partial
# word or block, 7 or 4 lanes padded to 16), several K steps per group (`group_of`), and
# a 3-bit group of 32 whole lanes.
CASES = [
    (5, 72, 2, 100, 2, None),
    (3, 64, 1, 1024, 3, None),
    (20, 72, 1, 100, 3, None),
    (5, 64, 2, 256, 4, 128),
]
IDS = [f"{bits}bit-m{m}-out{out}-{groups}x{cols}" for m, out, groups, cols, bits, _ in CASES]


def assert_equal(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("m,out,groups,cols,bits,step", CASES, ids=IDS)
def test_forward_equals_reference(m, out, groups, cols, bits, step):
    x, _, codebook, codes = integer_case(m, out, groups, cols, bits)
    blocks = BlockSizes(forward=ForwardBlockSizes(block_k=step))
    y = sketched_matmul(x, codebook, codes, bits, backend="mosaic_gpu", interpret=INTERPRET, block_sizes=blocks)
    assert_equal(y, sketched_matmul_reference(x, codebook, codes, bits))


@pytest.mark.parametrize("m,out,groups,cols,bits,step", CASES, ids=IDS)
def test_dx_equals_reference(m, out, groups, cols, bits, step):
    x, dy, codebook, codes = integer_case(m, out, groups, cols, bits)
    dx = mosaic_gpu.dx(dy, codebook, codes, bits, cols, INTERPRET, DxBlockSizes(block_k=step))
    want, _ = sketched_matmul_grads_reference(x, codebook, codes, bits, dy)
    assert_equal(dx, want)


@pytest.mark.parametrize("m,out,groups,cols,bits,step", CASES, ids=IDS)
def test_dcodebook_equals_reference(m, out, groups, cols, bits, step):
    x, dy, codebook, codes = integer_case(m, out, groups, cols, bits)
    dcb = mosaic_gpu.dcodebook(x, dy, codebook, codes, bits, cols, INTERPRET, DcodebookBlockSizes(block_k=step))
    _, want = sketched_matmul_grads_reference(x, codebook, codes, bits, dy)
    assert_equal(dcb, want)


def test_normal_data_within_bf16_rounding():
    # Non-integer data: the kernels accumulate in another order than the twin, so only the
    # final bf16 rounding may differ (a relative 2**-8 of the largest entry).
    rng = np.random.default_rng(7)
    m, out, groups, cols, bits = 6, 64, 1, 128, 4
    x = jnp.asarray(rng.normal(size=(m, groups * cols)), jnp.bfloat16)
    codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, cols)), jnp.uint8), bits)
    y = np.asarray(sketched_matmul(x, codebook, codes, bits, backend="mosaic_gpu", interpret=INTERPRET), np.float32)
    want = np.asarray(sketched_matmul_reference(x, codebook, codes, bits), np.float32)
    assert np.abs(y - want).max() <= 2**-8 * np.abs(want).max()


def test_training_gradients_under_jit():
    # The custom VJP with backend="mosaic_gpu" (forward, dx and dcodebook all interpreted)
    # against the VJP's twin; autodiff through the jnp forward would round dW to bf16.
    x, _, codebook, codes = integer_case(4, 64, 1, 128, 4)
    weights = jnp.arange(64, dtype=jnp.float32)

    def loss(x, cb):
        y = sketched_matmul(x, cb, codes, 4, backend="mosaic_gpu", interpret=INTERPRET)
        return jnp.sum(y.astype(jnp.float32) * weights)

    got = jax.jit(jax.grad(loss, (0, 1)))(x, codebook)
    dy = jnp.broadcast_to(weights, (4, 64)).astype(x.dtype)
    for g, w in zip(got, sketched_matmul_grads_reference(x, codebook, codes, 4, dy)):
        assert_equal(g, w)


def test_float32_activations_go_to_triton():
    assert mosaic_gpu.supports(jnp.bfloat16) and mosaic_gpu.supports(jnp.float16)
    assert not mosaic_gpu.supports(jnp.float32)  # wgmma takes 16-bit operands
    codebook = jax.ShapeDtypeStruct((64, 1, 16), jnp.float32)
    codes = jax.ShapeDtypeStruct((64, 1, 16), jnp.uint32)
    module = cuda_module(codebook, codes, 4, jax.ShapeDtypeStruct((5, 128), jnp.float32))
    assert "mosaic_gpu_v2" not in module and module.count(f"@{TRITON}(") == 3


def cuda_module(codebook, codes, bits, x):
    """The CUDA module of a forward and its VJP with backend="mosaic_gpu" (abstract arguments)."""

    def forward_and_vjp(x, cb, codes, dy):
        y, vjp = jax.vjp(lambda x, cb: sketched_matmul(x, cb, codes, bits, backend="mosaic_gpu"), x, cb)
        return y, vjp(dy)

    dy = jax.ShapeDtypeStruct((*x.shape[:-1], codebook.shape[0]), x.dtype)
    exported = jax.export.export(
        jax.jit(forward_and_vjp),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)],
    )(x, codebook, codes, dy)
    return exported.mlir_module()


# Odd shapes, SmolLM2-135M's (576 and 1536 columns) and Llama-3-8B's (4096 and 14336), for
# decode (1-16 rows) and prefill (hundreds of rows: more tokens a program, narrower steps).
@pytest.mark.parametrize(
    "bits,out,k,groups,m",
    [
        (2, 128, 2048, 2, 1),
        (3, 72, 300, 3, 5),
        (4, 576, 576, 1, 33),
        (3, 1536, 576, 1, 512),
        (2, 4096, 14336, 1, 16),
        (4, 14336, 4096, 1, 300),
    ],
)
def test_forward_and_vjp_lower_for_cuda_without_triton(bits, out, k, groups, m):
    codebook = jax.ShapeDtypeStruct((out, groups, 2**bits), jnp.float32)
    codes = jax.ShapeDtypeStruct((out, groups, packed_words(k // groups, bits)), jnp.uint32)
    module = cuda_module(codebook, codes, bits, jax.ShapeDtypeStruct((m, k), jnp.bfloat16))
    # Forward, dx and the codebook gradient, each one Mosaic GPU kernel; no Triton call.
    assert module.count("stablehlo.custom_call @mosaic_gpu_v2(") == 3
    assert TRITON not in module


def test_layout_pads_lanes_and_fits_shared_memory():
    # SmolLM2's 576 columns at 4 bits: 72 words a group, padded to 80, so 16-lane steps.
    layout = _GpuLayout(bits=4, groups=1, cols=576, chunk=16)
    assert (layout.lanes, layout.lanes_pad, layout.chunks) == (72, 80, 5)
    x = jnp.arange(3 * 2 * 100, dtype=jnp.float32).reshape(3, 200)
    layout = _GpuLayout(bits=3, groups=2, cols=100, chunk=16)
    slots = layout.to_slots(x, 4, layout.lanes_pad)
    assert slots.shape == (32, 4, 2 * 16)
    np.testing.assert_array_equal(layout.from_slots(slots, 3, layout.lanes_pad), x)
    # Every pipeline stage the forward picks fits its share of shared memory.
    for bits in (2, 3, 4):
        for m in (1, 16, 64, 4096):
            tokens, _ = ForwardBlockSizes().mosaic_gpu(m)
            layout, fitted = _fit_forward(bits, 1, 4096, m, ForwardBlockSizes())
            assert fitted <= tokens and layout.lanes_pad == 4096 // layout.slots
            assert _forward_stage_bytes(fitted)(layout) <= _STAGE_BYTES


def test_default_tiles():
    assert [ForwardBlockSizes().mosaic_gpu(m)[0] for m in (1, 16, 17, 64, 65, 4096)] == [16, 16, 32, 64, 128, 128]
    assert ForwardBlockSizes(block_m=512, block_k=256).mosaic_gpu(1) == (256, 256)
    assert DxBlockSizes().mosaic_gpu() is None and DcodebookBlockSizes(block_k=512).mosaic_gpu() == 512
