"""Progress bars with an ETA for long work, and result tables for people and JSON for scripts."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None, disable: bool = False) -> Iterator[T]:
    """Iterate ``items`` under a tqdm bar that shows rate and ETA."""
    return iter(tqdm(items, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False))


def print_table(title: str, rows: Mapping[str, object] | list[Mapping[str, object]]) -> None:
    """Print a small rich table: one mapping as key/value rows, or a list of mappings as columns."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    if isinstance(rows, Mapping):
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in rows.items():
            table.add_row(str(key), _fmt(value))
    else:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for c in columns:
            table.add_column(c, justify="right")
        for row in rows:
            table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    Console().print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
