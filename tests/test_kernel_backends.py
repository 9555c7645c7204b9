"""The backend table (platform and chip -> kernel backend) and the ``backend=``/``interpret=``
overrides; the Mosaic GPU kernel's lowering for CUDA."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    backends,
    mosaic_gpu,
    pack_codes,
    sketched_matmul,
    sketched_matmul_grads_reference,
    sketched_matmul_reference,
)
from pallas_kernels.backends import Choice, backend_for, resolve
from pallas_kernels.block_sizes import DcodebookBlockSizes
from pallas_kernels.mosaic_gpu import supports_forward


@pytest.mark.parametrize(
    "platform,cc,want",
    [
        ("tpu", None, "mosaic_tpu"),
        ("cuda", (8, 0), "triton"),
        ("cuda", (8, 9), "triton"),
        ("rocm", None, "triton"),
        ("cpu", None, "reference"),
    ],
)
def test_backend_table(platform, cc, want):
    assert backend_for(platform, cc) == want


def test_hopper_gets_mosaic_gpu_only_once_verified(monkeypatch):
    assert backend_for("cuda", (9, 0)) == "triton"
    monkeypatch.setattr(backends, "MOSAIC_GPU_AUTOMATIC", True)
    assert backend_for("cuda", (9, 0)) == "mosaic_gpu"
    assert backend_for("cuda", (10, 0)) == "mosaic_gpu"
    assert backend_for("cuda", (8, 9)) == "triton"


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the default device is not a CPU")
def test_this_host_runs_the_reference():
    assert backends.default_backend() == "reference"
    described = backends.describe()
    assert described["kernel_backend"] == "reference"
    assert "jnp twin" in described["reason"]
    assert described["chip_bandwidth_bytes_per_s"] is None


def test_reasons_name_the_chip_and_the_gate(monkeypatch):
    assert "Mosaic TPU" in backends.reason_for("tpu")
    assert "sm80" in backends.reason_for("cuda", (8, 0)) and "sm90 or newer" in backends.reason_for("cuda", (8, 0))
    assert "gpu_check.sh" in backends.reason_for("cuda", (9, 0))
    monkeypatch.setattr(backends, "MOSAIC_GPU_AUTOMATIC", True)
    assert "Mosaic GPU" in backends.reason_for("cuda", (9, 0))


def test_chip_bandwidth_takes_the_longest_match():
    assert backends.chip_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert backends.chip_bandwidth("TPU v5 lite") == 8.19e11
    assert backends.chip_bandwidth("cpu") is None


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the default device is not a CPU")
def test_info_prints_the_kernel_backend(tmp_path, capsys):
    from model_utils import tiny_hf_model

    from sketchtune_jax.cli import main

    tiny_hf_model("llama_gqa").save_pretrained(tmp_path / "tiny")
    assert main(["info", str(tmp_path / "tiny"), "--json", str(tmp_path / "info.json")]) == 0
    assert "kernel_backend" in capsys.readouterr().out
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["kernel_backend"].startswith("reference (cpu: ")


def test_overrides():
    assert resolve(None) == Choice(None, False)
    assert resolve("pallas") == Choice("triton", False)
    assert resolve("interpret") == Choice("triton", True)
    assert resolve("interpret", interpret=True) == Choice("triton", True)
    assert resolve("mosaic_tpu", interpret=True) == Choice("mosaic_tpu", True)
    assert resolve("reference", interpret=False) == Choice("reference", False)
    with pytest.raises(ValueError, match="'cuda'"):
        resolve("cuda")
    with pytest.raises(ValueError, match="interpret=False"):
        resolve("interpret", interpret=False)
    with pytest.raises(ValueError, match="backend=None"):
        resolve(None, interpret=True)
    with pytest.raises(ValueError, match="backend='reference'"):
        resolve("reference", interpret=True)


def test_legacy_and_new_names_run_the_same_triton_kernel():
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.normal(size=(24, 2, 16)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 16, (24, 2, 16)), jnp.uint8), 4)
    x = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
    old = sketched_matmul(x, codebook, codes, 4, backend="interpret")
    new = sketched_matmul(x, codebook, codes, 4, backend="triton", interpret=True)
    np.testing.assert_array_equal(old, new)
    np.testing.assert_allclose(new, sketched_matmul_reference(x, codebook, codes, 4), rtol=1e-5, atol=1e-5)


def test_mosaic_gpu_forward_coverage():
    assert supports_forward(jnp.bfloat16, 128, 512, 4)
    assert supports_forward(jnp.float16, 64, 1024, 2)
    assert not supports_forward(jnp.float32, 128, 512, 4)  # wgmma takes 16-bit registers
    assert not supports_forward(jnp.bfloat16, 128, 512, 3)  # bit planes: Triton
    assert not supports_forward(jnp.bfloat16, 96, 512, 4)  # out not a multiple of 64
    assert not supports_forward(jnp.bfloat16, 128, 576, 4)  # 72 words a group


@pytest.mark.parametrize("bits", [2, 4])
def test_mosaic_gpu_forward_lowers_for_cuda(bits):
    out, k, groups = 128, 2048, 2
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, k // groups)), jnp.uint8), bits)
    x = jax.ShapeDtypeStruct((5, k), jnp.bfloat16)
    exported = jax.export.export(
        jax.jit(lambda x, cb: sketched_matmul(x, cb, codes, bits, backend="mosaic_gpu")), platforms=["cuda"]
    )(x, codebook)
    module = exported.mlir_module()
    assert module.count("stablehlo.custom_call @mosaic_gpu_v2(") == 1
    assert "__gpu$xla.gpu.triton" not in module


@pytest.mark.parametrize("bits", [2, 4])
def test_mosaic_gpu_vjp_lowers_for_cuda(bits):
    out, k, groups = 128, 2048, 2
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, k // groups)), jnp.uint8), bits)

    def forward_and_vjp(x, cb, dy):
        y, vjp = jax.vjp(lambda x, cb: sketched_matmul(x, cb, codes, bits, backend="mosaic_gpu"), x, cb)
        return y, vjp(dy)

    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(forward_and_vjp),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(jax.ShapeDtypeStruct((70, k), jnp.bfloat16), codebook, jax.ShapeDtypeStruct((70, out), jnp.bfloat16))
    module = exported.mlir_module()
    # Forward and codebook gradient in Mosaic GPU; dx still Triton.
    assert module.count("stablehlo.custom_call @mosaic_gpu_v2(") == 2
    assert module.count(f"@{triton}(") == 1 and "sketch_matmul_dx" in module


@pytest.mark.parametrize("bits", [2, 4])
def test_mosaic_gpu_dcodebook_matches_the_reference_in_its_interpreter(bits):
    # 80 tokens (two 64-token steps, the second padded), 2 groups of 64 words: 2 chunks.
    out, groups, m = 64, 2, 80
    cols = 64 * (32 // bits)
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.normal(size=(m, groups * cols)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(m, out)), jnp.bfloat16)
    codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, cols)), jnp.uint8), bits)
    got = mosaic_gpu.dcodebook(x, dy, codebook, codes, bits, cols, True, DcodebookBlockSizes())
    _, want = sketched_matmul_grads_reference(x.astype(jnp.float32), codebook, codes, bits, dy.astype(jnp.float32))
    assert got.shape == codebook.shape and got.dtype == codebook.dtype
    # bf16 operands are exact in f32; only the order of the f32 sums differs.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
