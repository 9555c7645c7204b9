"""bench/results/: every result sits in a topic directory with one row in the README index, and
every path to a result that the README or the docs name is there."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
INDEX = RESULTS / "README.md"
# A result path as the docs write it, globs (*) and brace lists ({before,after}) included.
RESULT_PATH = re.compile(r"bench/results/[\w.{},*/-]+\.(?:json|png)")


def _expand_braces(path: str) -> list[str]:
    """``a-{x,y}.json`` as ``["a-x.json", "a-y.json"]``; every brace list in ``path``."""
    parts = re.split(r"\{([^{}]*)\}", path)
    options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(choice) for choice in itertools.product(*options)]


def _doc_pages() -> list[Path]:
    """README.md and docs/; not docs/notebook/ (a dated record) nor the index (its recorded
    commands name the paths of their day)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in pages if "notebook" not in p.relative_to(ROOT).parts]


def test_every_result_is_in_a_topic_directory_with_one_row_in_the_index():
    files = sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*") if p.is_file() and p != INDEX)
    assert len(files) >= 50
    assert [f for f in files if "/" not in f] == [], "results belong in a topic directory"
    rows = re.findall(r"^\| \[[^\]]+\]\(([^)]+)\) \|", INDEX.read_text(), re.MULTILINE)
    assert sorted(rows) == files


def test_every_row_gives_what_command_commit_and_machine():
    for line in INDEX.read_text().splitlines():
        if line.startswith("| ["):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            assert len(cells) == 5 and all(cells), line
            assert re.fullmatch(r"[`*][0-9a-f]{7}[`*]", cells[3]), line


def test_result_paths_named_in_the_readme_and_docs_exist_in_topic_directories():
    missing = []
    for page in _doc_pages():
        text = page.read_text()
        for match in RESULT_PATH.finditer(text):
            path = match.group()
            if re.search(r"--(?:out|json)\s+$", text[: match.start()]):
                # Where a command would write: a file that may not be committed, in a topic directory.
                if "/" not in path.removeprefix("bench/results/"):
                    missing.append(f"{page.relative_to(ROOT)}: {path} (no topic directory)")
            elif not any(list(ROOT.glob(p)) for p in _expand_braces(path)):
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert missing == []
