"""What settings dataclasses share: the error they raise and the dtype names they accept.

A `SettingError` names the field that is wrong (``field``) and what is wrong with it
(``problem``). Other settings its text mentions are written ``{name}`` and listed in
``mentions``. ``str(e)`` names settings as the library does; the command line renders the
same error with `SettingError.render`, naming each setting by its flag.

Settings dataclasses hold every default once: fields made with `setting` carry their help text,
and the command line builds its flags from them (`add_settings_arguments`, `settings_from_args`);
`named_as_flags` names a class's fields by those flags in any error of a block. An `Advice`
(a hint about settings) names settings the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import jax.numpy as jnp

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def name_settings(text: str, mentions: tuple[str, ...], name_of: Callable[[str], str]) -> str:
    """``text`` with each ``{name}`` of ``mentions`` replaced by ``name_of(name)``."""
    for name in mentions:
        text = text.replace("{" + name + "}", name_of(name))
    return text


class SettingError(ValueError):
    """A setting is out of range: ``str(e)`` is ``"<field> <problem>"``, settings named as fields."""

    def __init__(self, field: str, problem: str, mentions: tuple[str, ...] = ()):
        self.field = field
        self.problem = problem
        self.mentions = mentions
        super().__init__(self.render(str))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every setting it names (the field first) named by ``name_of``."""
        return f"{name_of(self.field)} {name_settings(self.problem, self.mentions, name_of)}"


class OutputExistsError(FileExistsError):
    """An output directory is in the way; ``{name}`` in ``message`` names a setting of ``mentions``
    that would allow it (e.g. ``overwrite``)."""

    def __init__(self, message: str, mentions: tuple[str, ...]):
        self.message = message
        self.mentions = mentions
        super().__init__(self.render(str))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every setting it names named by ``name_of``."""
        return name_settings(self.message, self.mentions, name_of)


@dataclasses.dataclass(frozen=True)
class Advice:
    """A suggestion about settings: ``text`` with each ``{name}`` of ``mentions`` a setting;
    ``str(advice)`` names them as the library does, `render` as the caller does (by flag)."""

    text: str
    mentions: tuple[str, ...] = ()

    def render(self, name_of: Callable[[str], str]) -> str:
        """The text with every setting it names named by ``name_of``."""
        return name_settings(self.text, self.mentions, name_of)

    def __str__(self) -> str:
        return self.render(str)


def dtype_from_name(name: str) -> Any:
    """The jnp dtype called ``name`` (a key of `DTYPES`)."""
    if name not in DTYPES:
        raise SettingError("dtype", f"must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def require(condition: bool, field: str, problem: str) -> None:
    """Raise `SettingError(field, problem)` unless ``condition``."""
    if not condition:
        raise SettingError(field, problem)


def fraction_range(value: str | tuple[float, float] | list[float], field: str) -> tuple[float, float]:
    """``value`` (``"START:END"`` or a pair) as the fractions ``(start, end)`` of a text, checked
    ``0 <= start < end <= 1``; `SettingError` naming ``field`` otherwise."""
    try:
        lo, hi = (float(x) for x in (value.split(":") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise SettingError(field, f"must be START:END fractions like 0.5:1, got {value!r}") from None
    require(0 <= lo < hi <= 1, field, f"must be fractions 0 <= START < END <= 1, got {lo:g}:{hi:g}")
    return lo, hi


def fraction_ranges_meet(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the text fractions ``a`` and ``b`` (``(start, end)``, end exclusive) share any part."""
    return max(a[0], b[0]) < min(a[1], b[1])


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


def changed_settings(settings: Any, names: Iterable[str]) -> tuple[str, ...]:
    """The fields among ``names`` (in that order) whose value in the dataclass ``settings`` differs
    from the field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    return tuple(n for n in names if getattr(settings, n) != defaults[n])


def require_enabled(settings: Any, switch: str, dependents: Iterable[str]) -> None:
    """Raise `SettingError` naming ``switch`` when it is 0 (off) in ``settings`` while a field of
    ``dependents`` is set away from its default: that setting would do nothing."""
    unused = changed_settings(settings, dependents)
    if not getattr(settings, switch) and unused:
        named = ", ".join("{" + name + "}" for name in unused)
        raise SettingError(switch, f"is 0, so {named} would do nothing; give N > 0", unused)


# ----------------------------------------------------------------------------- settings -> command line
#
# A settings dataclass holds each default once; a field made with `setting` also carries its help
# text, and `add_settings_arguments` turns such fields into flags (``--name-with-dashes``, or
# ``--PREFIX-name``), so the command line neither repeats a default nor disagrees with the library.


def setting(
    default: Any, help: str, *, flag: str | None = None, show: Callable[[Any], str] | None = None, **kw: Any
) -> Any:
    """A dataclass field with ``default`` whose flag shows ``help``.

    ``flag``: the flag's name as an argparse dest (``"qlora_qtype"`` gives ``--qlora-qtype``) when it
    is not the field's name after the prefix; ``show``: how ``--help`` and the flag write the default
    (the flag's value then reaches the dataclass as text, which ``__post_init__`` parses); ``kw``:
    more argparse keywords (``choices``, ``metavar``, ``type``, ``aliases``: other spellings).
    """
    metadata = {"help": help, **kw}
    if flag is not None:
        metadata["flag"] = flag
    if show is not None:
        metadata["show"] = show
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field, prefix: str = "") -> str:
    """The argparse dest of ``field``'s flag: its own ``flag``, else ``prefix + name``."""
    return field.metadata.get("flag") or prefix + field.name


def _flag_kind(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """``(type, argparse keywords)`` for a field annotated ``annotation`` (int, float, str, bool,
    ``X | None``, ``X | Literal[...]`` or a `Literal`)."""
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return type(choices[0]), {"choices": choices}
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _flag_kind(inner[0])
        # e.g. ``int | Literal["auto"]``: the text reaches the dataclass, which parses it.
        return str, {}
    return annotation, {}


def add_settings_arguments(
    parser: argparse._ActionsContainer,
    cls: type,
    *,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    required: tuple[str, ...] = (),
) -> None:
    """Add a flag for every field of the dataclass ``cls`` made with `setting` (less ``skip``; only
    ``only`` when given): ``--{prefix}{name}`` (or the field's own ``flag``) with the field's
    default, type, help and choices; the fields of ``required`` must be given. A bool field gives
    ``--name`` and ``--no-name``."""
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata or field.name in skip or (only is not None and field.name not in only):
            continue
        extra = {k: v for k, v in field.metadata.items() if k not in ("help", "flag", "show", "aliases")}
        kind, found = _flag_kind(hints[field.name])
        dest = flag_name(field, prefix)
        flags = ["--" + dest.replace("_", "-"), *field.metadata.get("aliases", ())]
        show = field.metadata.get("show")
        default = show(field.default) if show is not None and field.default is not None else field.default
        common: dict[str, Any] = {"dest": dest, "help": field.metadata["help"]}
        if field.name in required:
            common["required"] = True
        else:
            common["default"] = default
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
            continue
        if show is not None:
            kind = str
        parser.add_argument(*flags, type=kind, **common, **{**found, **extra})


def settings_from_args(
    cls: type, args: argparse.Namespace, *, prefix: str = "", build: Callable[..., Any] | None = None, **values: Any
) -> Any:
    """``cls`` built (and so checked) from the flags `add_settings_arguments` added, plus ``values``;
    ``build`` (default ``cls``) makes it from those fields by name. A `SettingError` names each field
    by its flag's dest (`named_as_flags`)."""
    given = vars(args)
    fields = dataclasses.fields(cls)
    # Only fields made with `setting` have flags; another class's flag may share a plain field's name.
    flagged = {f.name: flag_name(f, prefix) for f in fields if "help" in f.metadata}
    found = {name: given[dest] for name, dest in flagged.items() if dest in given}
    with named_as_flags(cls, args, prefix=prefix):
        return (build or cls)(**{**found, **values})


@contextmanager
def named_as_flags(cls: type, args: argparse.Namespace, *, prefix: str = "") -> Iterator[None]:
    """Re-raise a `SettingError` of the block with every field of the dataclass ``cls`` it names
    named by its flag's dest in ``args`` (``prefix`` + field, or the field's own ``flag``); with a
    ``prefix``, every field is renamed, flag or not, so that none passes for another class's."""
    given = vars(args)
    dests = {f.name: flag_name(f, prefix) for f in dataclasses.fields(cls)}
    with renamed_settings({name: dest for name, dest in dests.items() if dest in given or prefix}):
        yield


@contextmanager
def renamed_settings(names: dict[str, str]) -> Iterator[None]:
    """Re-raise a `SettingError` of the block with every setting it names renamed by ``names``
    (others kept): the fields of a settings class, named as the flags that fill them."""
    try:
        yield
    except SettingError as e:
        if not names:
            raise
        mentions = tuple(names.get(m, m) for m in e.mentions)
        problem = name_settings(e.problem, e.mentions, lambda m: "{" + names.get(m, m) + "}")
        raise SettingError(names.get(e.field, e.field), problem, mentions) from None


def show_fraction_range(value: tuple[float, float]) -> str:
    """``(start, end)`` written as the ``START:END`` a flag takes (``0.5:1``)."""
    lo, hi = value
    return f"{lo:g}:{hi:g}"
