"""One entry point to load any model a command takes, and a summary of what it holds."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax._utils.module_paths import iter_modules
from sketchtune_jax.io.sketched_dir import is_sketched_dir, load_sketched
from sketchtune_jax.layers import Codebook, Codes, SketchedLinear
from sketchtune_jax.settings import SettingError


def load_any(
    source: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    codebooks: str | None = None,
    adapter: str | None = None,
):
    """Load a sketched directory, an HF directory, a GGUF file or ``smollm2-135m`` as a `LoadedModel`.

    ``codebooks``: a fine-tuned codebook file applied on top of a sketched model.
    ``adapter``: a LoRA/QLoRA adapter directory (PEFT format) applied, unmerged, on top of a dense model.
    """
    if adapter and is_sketched_dir(source):
        raise SettingError(
            "adapter", f"applies to a dense model, and {source} is sketched (use {{codebooks}})", ("codebooks",)
        )
    if adapter:
        from sketchtune_jax.train.adapters import load_adapter, read_adapter_settings

        read_adapter_settings(adapter)
    if is_sketched_dir(source):
        loaded = load_sketched(source, dtype=dtype, param_dtype=param_dtype)
        if codebooks:
            from sketchtune_jax.io.codebooks import load_codebooks

            load_codebooks(loaded.model, codebooks)
        return loaded
    if codebooks:
        raise ValueError(f"--codebooks applies to a sketched model, and {source} is not one")
    from converters import load_model

    loaded = load_model(source, dtype=dtype, param_dtype=param_dtype)
    if adapter:
        loaded.model, _ = load_adapter(loaded.model, adapter)
    return loaded


def _nbytes(variables) -> int:
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for _, v in nnx.to_flat_state(variables)))


def model_info(model: nnx.Module, config) -> dict[str, Any]:
    """Architecture, parameter counts and bytes of ``model`` (sketched or dense)."""
    total = nnx.state(model)
    sketched = dict(iter_modules(model, SketchedLinear))
    info: dict[str, Any] = {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "tied_embeddings": config.tie_word_embeddings,
        "bytes": _nbytes(total),
    }
    n_params = int(sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))))
    if sketched:
        dense_equiv = sum(m.in_features * m.out_features for m in sketched.values())
        n_codebook = int(sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, Codebook))))
        info.update(
            sketched_modules=len(sketched),
            bits=sorted({m.bits for m in sketched.values()}),
            groups_per_row=sorted({m.groups for m in sketched.values()}),
            trainable_codebook_params=n_codebook,
            codes_bytes=_nbytes(nnx.state(model, Codes)),
            dense_params_equivalent=n_params - n_codebook + dense_equiv,
        )
    info["params"] = n_params
    return info
