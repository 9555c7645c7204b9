"""What the jobs share: the dtype named on the command line, loading a model source, and refusing to
overwrite a run directory by accident."""

from __future__ import annotations

import os
from pathlib import Path

from sketchtune_jax.settings import DTYPES, OutputExistsError, SettingError


def dtype_named(dtype: str):
    """The jax dtype called ``dtype`` (``float32``, ``bfloat16``, ...); a `SettingError` names the choices."""
    if dtype not in DTYPES:
        raise SettingError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_ref: str, dtype: str, codebooks: str | None = None):
    """`load_any` with compute and parameter dtype both ``dtype``."""
    from sketchtune_jax.io.loading import load_any

    return load_any(model_ref, dtype=dtype_named(dtype), param_dtype=dtype_named(dtype), codebooks=codebooks)


def check_run_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a non-empty ``out_dir`` unless ``resume`` or ``overwrite``."""
    if resume and overwrite:
        raise SettingError("resume", "and overwrite exclude each other: continue the run, or start it over")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(
            f"{path} already holds a run; continue it ({{resume}}), start it over ({{overwrite}}), "
            "or pick a new directory",
            ("resume", "overwrite"),
        )
