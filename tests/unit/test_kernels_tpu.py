"""Mosaic TPU kernels: run in the TPU interpreter (``pltpu.InterpretParams``) against the
``jnp`` twins, and lowered for TPU with ``jax.export`` from this CPU host. On a TPU,
``SKETCHTUNE_KERNEL_INTERPRET=0`` runs the same cases compiled (`bench/tpu_check.sh`)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    BlockSizes,
    DequantizeBlockSizes,
    dequantize,
    dequantize_reference,
    pack_codes,
    sketched_matmul,
    sketched_matmul_grads,
    sketched_matmul_grads_reference,
    sketched_matmul_reference,
)
from pallas_kernels.mosaic_tpu import _TpuLayout

INTERPRET = os.environ.get("SKETCHTUNE_KERNEL_INTERPRET", "1") != "0"


def make_sketch(out, k, groups, bits, seed=0):
    rng = np.random.default_rng(seed)
    codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, k // groups)), jnp.uint8), bits)
    return codebook, codes


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# (rows of x, out, in, groups, bits, dtype, block sizes): odd sizes (rows, out, columns per
# group not multiples of 8/128/32), whole-row chunks, and K split into 128-lane chunks over
# a partial last row tile (out=300 with 128-row tiles).
CASES = [
    (5, 24, 40, 2, 4, jnp.float32, None),
    (9, 33, 96, 3, 3, jnp.float32, None),
    (3, 20, 64, 4, 2, jnp.bfloat16, None),
    (20, 300, 2048, 1, 4, jnp.float32, (16, 128, 1024)),
    (7, 136, 4096, 1, 2, jnp.float32, (16, 128, 2048)),
    (6, 130, 8192, 2, 3, jnp.bfloat16, (16, 128, 4096)),
]


@pytest.mark.parametrize("m,out,k,groups,bits,dtype,blocks", CASES)
def test_tpu_kernels_match_reference_in_interpreter(m, out, k, groups, bits, dtype, blocks):
    codebook, codes = make_sketch(out, k, groups, bits)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    dy = jnp.asarray(rng.normal(size=(m, out)), dtype)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    run = dict(backend="mosaic_tpu", interpret=INTERPRET)

    w = dequantize(codebook, codes, bits, k, **run, block_sizes=blocks and DequantizeBlockSizes(*blocks[1:]))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(dequantize_reference(codebook, codes, bits, k)))

    y = sketched_matmul(x, codebook, codes, bits, **run, block_sizes=blocks)
    assert y.dtype == dtype and y.shape == (m, out)
    assert rel_err(y, sketched_matmul_reference(x, codebook, codes, bits)) < tol

    dx, dcb = sketched_matmul_grads(x, codebook, codes, bits, dy, **run, block_sizes=blocks)
    rdx, rdcb = sketched_matmul_grads_reference(x, codebook, codes, bits, dy)
    assert dx.dtype == dtype and dcb.dtype == codebook.dtype
    assert rel_err(dx, rdx) < tol
    assert rel_err(dcb, rdcb) < tol


def test_tpu_custom_vjp_under_jit():
    codebook, codes = make_sketch(40, 96, 2, 4)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 96)), jnp.float32)

    def loss(f):
        return lambda x, cb: jnp.sum(jnp.sin(f(x, cb)))

    kernel = jax.jit(
        jax.grad(
            loss(lambda x, cb: sketched_matmul(x, cb, codes, 4, backend="mosaic_tpu", interpret=INTERPRET)), (0, 1)
        )
    )
    reference = jax.grad(loss(lambda x, cb: sketched_matmul_reference(x, cb, codes, 4)), (0, 1))
    for got, want in zip(kernel(x, codebook), reference(x, codebook)):
        assert rel_err(got, want) < 1e-5


def test_tpu_chunk_layout():
    # 4-bit, 4096 columns: 512 word-lanes a group, cut into 128-lane chunks of 1024 columns.
    layout = _TpuLayout(bits=4, groups=2, cols=4096, chunk_cols=1024)
    assert (layout.lanes, layout.chunk_lanes, layout.chunks, layout.whole_rows) == (512, 128, 8, False)
    # 3-bit, 576 columns: 18 plane-lanes, not a multiple of 128 -> one chunk of whole rows.
    layout = _TpuLayout(bits=3, groups=1, cols=576, chunk_cols=4096)
    assert (layout.slots, layout.planes, layout.lanes, layout.chunks, layout.whole_rows) == (32, 3, 18, 1, True)
    x = jnp.arange(2 * 1152, dtype=jnp.float32).reshape(2, 1152)
    layout = _TpuLayout(bits=2, groups=2, cols=576, chunk_cols=512)
    np.testing.assert_array_equal(layout.from_slots(layout.to_slots(x, 8), 2), x)


def tpu_calls(f, *args) -> list[str]:
    module = jax.export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
    return re.findall(r'stablehlo.custom_call @tpu_custom_call\(.*?\).*?kernel_name = "([\w.]+)"', module)


@pytest.mark.parametrize("bits,k,groups", [(2, 4096, 1), (3, 576, 1), (4, 8192, 4), (4, 14336, 1)])
@pytest.mark.parametrize("rows", [1, 512], ids=["decode", "prefill"])
def test_tpu_kernels_lower_for_tpu(bits, k, groups, rows):
    out = 384
    codebook, codes = make_sketch(out, k, groups, bits)
    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((rows, out), jnp.bfloat16)

    # backend=None: lowering for TPU picks the Mosaic TPU kernels.
    def forward_and_vjp(x, cb, dy):
        y, vjp = jax.vjp(lambda x, cb: sketched_matmul(x, cb, codes, bits), x, cb)
        return y, vjp(dy)

    calls = tpu_calls(forward_and_vjp, x, codebook, dy)
    assert sorted(calls) == ["sketch_matmul_dcodebook_tpu", "sketch_matmul_dx_tpu", "sketch_matmul_tpu"]
    assert tpu_calls(lambda cb: dequantize(cb, codes, bits, k), codebook) == ["sketch_dequantize_tpu"]


def test_tpu_default_tiles_are_tpu_shaped():
    assert BlockSizes().forward.tpu(1) == (1, 512, 8192)
    assert BlockSizes().forward.tpu(4096) == (256, 256, 4096)
    assert BlockSizes.uniform(16, 128, 1024).dx.tpu() == (16, 128, 1024)
