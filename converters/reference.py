"""Import sketches and fine-tuned codebooks saved by the reference SketchTune code.

The reference saves, with ``torch.save`` (or plain ``pickle``):

* a sketch: ``{module_name: (quant_grid, codes)}``, ``quant_grid`` float
  ``[rows, groups, 2**bits]`` and ``codes`` uint8 ``[rows, groups, cols_per_group / 2]``
  holding two codes a byte, the even column in the high nibble;
* fine-tuned codebooks: ``{module_name: quant_grid}``.

Nothing in these files is executed: zip archives written by ``torch.save`` go through
``torch.load(weights_only=True)``; other pickles through an unpickler that only lets
numpy arrays and torch tensors be rebuilt and refuses every other global.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from pallas_kernels import SUPPORTED_BITS, pack_codes

# Module-level names a plain pickle of numpy arrays or torch tensors refers to.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "Size"),
}

# The magic number that opens torch's legacy (pre-zip) serialisation.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than arrays and tensors."""


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("this file holds torch tensors; install torch to read it") from e
    return torch


def _storage_from_bytes(data: bytes):
    # torch.storage._load_from_bytes would call torch.load(weights_only=False).
    return _torch().load(io.BytesIO(data), weights_only=True)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in _SAFE_GLOBALS:
            if module.startswith("torch"):
                _torch()
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: reference sketch files may only hold "
            "numpy arrays, torch tensors, tuples and dicts"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids are not allowed in a plain pickle")


def _load_object(path: str | os.PathLike) -> Any:
    if zipfile.is_zipfile(path):
        torch = _torch()
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {e}") from e
    with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f).load()
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        torch = _torch()
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {e}") from e
    return obj


def _to_numpy(a: Any, what: str) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("torch"):
        torch = _torch()
        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    raise TypeError(f"{what}: expected an array or tensor, got {type(a).__name__}")


def _check_dict(obj: Any, path: str | os.PathLike) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of modules, got {type(obj).__name__}")
    return obj


def _bits_of(grid: np.ndarray, name: str) -> int:
    if grid.ndim != 3:
        raise ValueError(f"{name}: quant_grid must be [rows, groups, 2**bits], got {grid.shape}")
    n = grid.shape[-1]
    bits = n.bit_length() - 1
    if n != 2**bits or bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: quant_grid has {n} centres; expected 4, 8 or 16")
    return bits


def unpack_reference_codes(codes: np.ndarray) -> np.ndarray:
    """Reference nibble codes ``uint8 [rows, groups, cols/2]`` to ``uint8 [rows, groups, cols]``."""
    codes = np.asarray(codes, dtype=np.uint8)
    out = np.empty(codes.shape[:-1] + (codes.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = codes >> 4
    out[..., 1::2] = codes & 0x0F
    return out


def load_reference_sketch(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a reference ``{module: (quant_grid, codes)}`` file.

    Returns ``{module: (codebook [rows, groups, 2**bits] in the file's float dtype,
    codes uint32 [rows, groups, words] packed by pallas_kernels.pack_codes)}``.
    """
    result = {}
    for name, entry in _check_dict(_load_object(path), path).items():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"{name}: expected a (quant_grid, codes) pair")
        grid = _to_numpy(entry[0], f"{name} quant_grid")
        raw = _to_numpy(entry[1], f"{name} codes")
        bits = _bits_of(grid, name)
        if raw.ndim != 3 or raw.shape[:2] != grid.shape[:2]:
            raise ValueError(
                f"{name}: codes must be [rows, groups, cols/2] matching quant_grid {grid.shape[:2]}, got {raw.shape}"
            )
        codes = unpack_reference_codes(raw)
        if codes.max(initial=0) >= 2**bits:
            raise ValueError(f"{name}: codes exceed the {2**bits} centres of the quant_grid")
        result[name] = (grid, pack_codes(codes, bits))
    return result


def load_reference_codebooks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read reference fine-tuned codebooks ``{module: quant_grid [rows, groups, 2**bits]}``."""
    result = {}
    for name, grid in _check_dict(_load_object(path), path).items():
        grid = _to_numpy(grid, f"{name} quant_grid")
        _bits_of(grid, name)
        result[name] = grid
    return result
