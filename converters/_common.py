"""Shared pieces of the converters: the error type and filling an abstract model tensor by tensor."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax.models import LlamaForCausalLM, ModelConfig


class ConversionError(ValueError):
    """A checkpoint could not be read or written; the message names the file or tensor."""


def hf_name(path: tuple) -> str:
    """HF checkpoint key of an NNX state path: ``('model', 'layers', 0, ...)`` -> ``model.layers.0...``."""
    return ".".join(str(p) for p in path)


def iter_params(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    """``(hf_key, variable)`` for every `nnx.Param` of the model, in graph order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield hf_name(path), node


def abstract_model(config: ModelConfig, dtype: jnp.dtype, param_dtype: jnp.dtype) -> LlamaForCausalLM:
    """The model with shape-only parameters: nothing is allocated until each is filled."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def check_names(
    expected: Iterable[str], available: Iterable[str], where: str, ignorable: Callable[[str], bool] = lambda name: False
) -> None:
    """Raise `ConversionError` for the first missing or unexpected tensor name."""
    expected, available = set(expected), set(available)
    missing = sorted(expected - available)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"tensor {missing[0]!r} is missing from {where}{more}")
    unexpected = sorted(n for n in available - expected if not ignorable(n))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"unexpected tensor {unexpected[0]!r} in {where}{more}: not part of this architecture")


def assign(var: nnx.Variable, name: str, value: np.ndarray | jax.Array, where: str) -> None:
    """Set an abstract parameter from ``value`` after checking its shape; casts to the param dtype."""
    expected = tuple(var.get_value().shape)
    if tuple(value.shape) != expected:
        raise ConversionError(f"tensor {name!r} in {where} has shape {tuple(value.shape)}, expected {expected}")
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))


class TensorSource(Protocol):
    """A checkpoint read lazily: HF-named tensors one at a time, plus the config and tokenizer.

    `release` drops what was read or mapped so far (open files, mapped pages) without
    closing the source for good; a streaming reader calls it after each decoder layer.
    """

    config: ModelConfig
    tokenizer: Any
    where: str

    def names(self) -> set[str]: ...
    def ignorable(self, name: str) -> bool: ...
    def get(self, name: str) -> np.ndarray | jax.Array: ...
    def file_of(self, name: str) -> str: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


def fill_params(module: nnx.Module, prefix: str, tensors: TensorSource) -> None:
    """Set every `nnx.Param` of ``module`` (abstract or not) from ``tensors.get(prefix + name)``."""
    params = {prefix + name: var for name, var in iter_params(module)}
    missing = sorted(set(params) - tensors.names())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"tensor {missing[0]!r} is missing from {tensors.where}{more}")
    for name, var in params.items():
        assign(var, name, tensors.get(name), tensors.file_of(name))
