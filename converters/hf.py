"""Load a Hugging Face checkpoint directory (safetensors or PyTorch ``.bin``) into our model.

Tensors are read one at a time into a model built with `nnx.eval_shape`, so the peak
host memory is about one copy of the model in ``param_dtype``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters._common import ConversionError, abstract_model, assign, check_names, fill_params, iter_params
from sketchtune_jax.models import LlamaForCausalLM, ModelConfig

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_config(directory: str | Path) -> ModelConfig:
    """`ModelConfig` from ``directory/config.json``; `ConversionError` if absent or unsupported."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    try:
        return ModelConfig.from_hf(hf)
    except (KeyError, TypeError) as e:
        raise ConversionError(f"{path} lacks a required field: {e}") from None
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None


def resolve_directory(source: str | Path) -> Path:
    """A local directory for ``source``; a hub name ``org/name`` is downloaded if it is not a local path
    (once, safetensors preferred over ``.bin``: `sketchtune_jax.data.hub.download_model`)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{source} is a file, expected a Hugging Face model directory or a .gguf file")
        return path
    if not _HUB_NAME.match(str(source)):
        raise ConversionError(f"{source} does not exist")
    try:
        from sketchtune_jax.data.hub import download_model

        return Path(download_model(str(source)))
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, gated, missing) means the same to the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"{source} is not a local path and could not be downloaded from the Hugging Face Hub "
            f"({type(e).__name__}: {reason})"
        ) from None


class _SafetensorsFile:
    """One safetensors file, read lazily; any format error becomes a `ConversionError`."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            # "flax" hands back jax arrays and so supports bfloat16, which numpy does not.
            self._ctx = safe_open(str(path), framework="flax")
            self._file = self._ctx.__enter__()
        except Exception as e:  # noqa: BLE001 - SafetensorError is not exported under a stable name
            raise ConversionError(f"corrupt or truncated safetensors file {path}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def get(self, name: str) -> jax.Array:
        try:
            return self._file.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"cannot read tensor {name!r} from {self.path}: {e}") from None

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


class _TorchFile:
    """A PyTorch ``.bin`` state dict, unpickled with ``weights_only=True`` (no arbitrary code)."""

    def __init__(self, path: Path):
        if importlib.util.find_spec("torch") is None:
            raise ConversionError(f"{path} is a PyTorch checkpoint; reading it needs torch (pip install torch)")
        import torch

        self.path = path
        try:
            try:
                self._state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Files in the legacy (pre-zip) format cannot be memory-mapped.
                self._state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"cannot read PyTorch checkpoint {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(self._state, Mapping):
            raise ConversionError(f"{path} does not hold a state dict")

    def keys(self) -> list[str]:
        return list(self._state.keys())

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._state[name]
        # numpy has no bfloat16: widen (exactly) and let the caller cast to param_dtype.
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.numpy()

    def close(self) -> None:
        self._state = {}


def _open(path: Path) -> _SafetensorsFile | _TorchFile:
    if not path.is_file():
        raise ConversionError(f"weight file {path} is missing")
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def _weight_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from an index or the single weight file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"cannot read shard index {index}: {e}") from None
            files = {f: directory / f for f in set(weight_map.values())}
            for f in sorted(files.values()):
                if not f.is_file():
                    raise ConversionError(f"shard {f.name} listed in {index} is missing")
            return {name: files[f] for name, f in weight_map.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        path = directory / single
        if path.is_file():
            reader = _open(path)
            try:
                return {name: path for name in reader.keys()}
            finally:
                reader.close()
    raise ConversionError(f"{directory} has no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def _ignorable(config: ModelConfig):
    def ignorable(name: str) -> bool:
        # Old Llama checkpoints store the RoPE table; tied checkpoints may still store the head.
        return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")

    return ignorable


class HFTensors:
    """The tensors of a HF directory by name, read one at a time on request.

    Files are opened (memory-mapped) when first read from; `release` closes them so the
    pages read so far leave the process, which keeps a layer-by-layer reader's memory flat.
    """

    def __init__(self, source: str | Path, *, load_tokenizer: bool = True):
        self.directory = resolve_directory(source)
        self.where = str(self.directory)
        self.config = read_config(self.directory)
        self._weight_map = _weight_map(self.directory)
        self._open: dict[Path, _SafetensorsFile | _TorchFile] = {}
        self.tokenizer = load_tokenizer_from(self.directory) if load_tokenizer else None

    def names(self) -> set[str]:
        return set(self._weight_map)

    def ignorable(self, name: str) -> bool:
        return _ignorable(self.config)(name)

    def file_of(self, name: str) -> str:
        return str(self._weight_map[name])

    def get(self, name: str) -> jax.Array | np.ndarray:
        path = self._weight_map[name]
        if path not in self._open:
            self._open[path] = _open(path)
        return self._open[path].get(name)

    def release(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open = {}

    def close(self) -> None:
        self.release()


def load_hf(
    source: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    load_tokenizer: bool = True,
) -> tuple[LlamaForCausalLM, ModelConfig, Any]:
    """Load a HF Llama/Mistral directory (or hub name) -> ``(model, config, tokenizer or None)``.

    Reads ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
    or ``pytorch_model*.bin`` (with torch, ``weights_only=True``). Raises `ConversionError`
    for a missing path, no ``config.json``, an unsupported model, a missing, unexpected or
    misshapen tensor, or a corrupt file.
    """
    tensors = HFTensors(source, load_tokenizer=load_tokenizer)
    try:
        model = abstract_model(tensors.config, dtype, param_dtype)
        check_names(dict(iter_params(model)), tensors.names(), tensors.where, tensors.ignorable)
        fill_params(model, "", tensors)
    finally:
        tensors.close()
    return model, tensors.config, tensors.tokenizer


def load_tokenizer_from(directory: Path) -> Any:
    """`transformers.AutoTokenizer` of the directory, or None (with a warning) if it has none."""
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - the weights are usable without a tokenizer
        warnings.warn(f"could not load the tokenizer of {directory}: {e}", stacklevel=2)
        return None


def from_state_dict(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
) -> LlamaForCausalLM:
    """Our model from an in-memory HF state dict (numpy/jax arrays, or torch tensors via ``.numpy()``)."""
    model = abstract_model(config, dtype, param_dtype)
    params = dict(iter_params(model))
    check_names(params, tensors.keys(), "the state dict", _ignorable(config))
    for name, var in params.items():
        value = tensors[name]
        if not isinstance(value, (np.ndarray, jax.Array)):
            value = value.detach().float().cpu().numpy()
        assign(var, name, value, "the state dict")
    return model
