"""The backend table (platform and chip -> kernel backend) and the ``backend=``/``interpret=``
overrides. The Mosaic GPU kernels' own tests are in test_kernels_mosaic_gpu.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backends, pack_codes, sketched_matmul, sketched_matmul_reference
from pallas_kernels.backends import Choice, backend_for, resolve


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
