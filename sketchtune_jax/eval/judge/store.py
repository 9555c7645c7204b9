"""The judge's output directory: what was asked, every answer and verdict, kept as it arrives.

Layout of ``DIR``:

- ``run.json``: what the answers and verdicts depend on (models, generation, judge); a later
  run in the same directory must agree with it, so cached work is never mixed across setups.
- ``answers_a.jsonl``, ``answers_b.jsonl``: one ``{id, question, answer}`` a line per model.
- ``verdicts.jsonl``: one line per judge request, appended (and fsynced) as each reply
  arrives, so an interrupted run resumes without paying for a reply twice.
- ``pairs.jsonl`` and ``summary.json``: the combined verdicts and the counts, rewritten
  (atomically) at the end of each run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sketchtune_jax._utils.fileio import atomic_write_bytes, write_json_atomic

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
VERDICTS_FILE = "verdicts.jsonl"


class JudgeStore:
    """The cache and results of one pairwise judgement in ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any]):
        """Open ``path`` for a run described by ``identity`` (JSON-serialisable).

        A new or empty directory gets ``run.json``. An existing run must have the same identity.

        Raises:
            FileExistsError: ``path`` is a file, or a non-empty directory that holds no judge run,
                or a run whose identity differs (the message names the differing keys).
        """
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a directory; choose another --out")
        run_file = self.path / RUN_FILE
        identity = json.loads(json.dumps(identity))
        if run_file.is_file():
            saved = json.loads(run_file.read_text())
            differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
            if differ:
                raise FileExistsError(
                    f"{self.path} holds a judge run with other settings ({', '.join(differ)}: "
                    f"{', '.join(f'{saved.get(k)!r} there, {identity.get(k)!r} now' for k in differ)}); "
                    "choose another --out to compare these, or rerun with the settings it has"
                )
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise FileExistsError(f"{self.path} is not empty and holds no judge run; choose another --out")
        else:
            write_json_atomic(run_file, identity)
        self.identity = identity

    def answers(self, side: str) -> dict[str, str]:
        """``{question id: answer}`` saved for model ``side`` (``"a"`` or ``"b"``)."""
        return {r["id"]: r["answer"] for r in _read_jsonl(self.path / f"answers_{side}.jsonl")}

    def add_answers(self, side: str, records: Iterable[dict[str, Any]]) -> None:
        """Append ``{id, question, answer}`` records of model ``side``."""
        _append_jsonl(self.path / f"answers_{side}.jsonl", records)

    def verdicts(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """Saved verdict records by ``(question id, order, key)``; ``key`` hashes what the judge saw."""
        return {(r["id"], r["order"], r["key"]): r for r in _read_jsonl(self.path / VERDICTS_FILE)}

    def add_verdict(self, record: dict[str, Any]) -> None:
        """Append one verdict record (it must have ``id``, ``order`` and ``key``)."""
        _append_jsonl(self.path / VERDICTS_FILE, [record])

    def write_results(self, pairs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Replace ``pairs.jsonl`` and ``summary.json``."""
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        atomic_write_bytes(self.path / "pairs.jsonl", lines.encode())
        write_json_atomic(self.path / "summary.json", summary)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A line cut short when a run was killed mid-write: that item is simply done again.
            log.warning("%s: line %d is incomplete and is ignored", path, lineno)
    return records


def _append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not payload:
        return
    with open(path, "a+b") as f:
        # After a write cut short by a kill the file does not end in a newline: end that line
        # first, so the new record is not glued onto it.
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                payload = "\n" + payload
        f.write(payload.encode())
        f.flush()
        os.fsync(f.fileno())
