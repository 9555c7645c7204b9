"""What settings dataclasses share: the error they raise and the dtype names they accept.

A `SettingError` names the field that is wrong (``field``) and what is wrong with it
(``problem``); the command line swaps the field for its flag.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class SettingError(ValueError):
    """A setting is out of range: ``str(e)`` is ``"<field> <problem>"``."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def dtype_from_name(name: str) -> Any:
    """The jnp dtype called ``name`` (a key of `DTYPES`)."""
    if name not in DTYPES:
        raise SettingError("dtype", f"must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def require(condition: bool, field: str, problem: str) -> None:
    """Raise `SettingError(field, problem)` unless ``condition``."""
    if not condition:
        raise SettingError(field, problem)


def require_positive(obj: Any, *fields: str, finite: bool = False) -> None:
    """Every named field of ``obj`` is > 0 (and finite with ``finite``)."""
    for name in fields:
        value = getattr(obj, name)
        ok = value > 0 and (not finite or math.isfinite(value))
        require(ok, name, f"must be {'a finite number ' if finite else ''}> 0, got {value}")


def require_non_negative(obj: Any, *fields: str) -> None:
    """Every named field of ``obj`` is >= 0 (and not NaN)."""
    for name in fields:
        value = getattr(obj, name)
        require(value >= 0 and value == value, name, f"must be >= 0, got {value}")
