"""The docs stay true to the code: every ``sketchtune ...`` command in README.md and docs/cli.md
parses with the real parser (parsed only, never run), and every relative link in README.md and
docs/**/*.md points to a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sketchtune_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMMAND_DOCS = [ROOT / "README.md", ROOT / "docs" / "cli.md"]
LINKED_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
# An inline code span that starts with the command's name; a span may run over a line break.
INLINE = re.compile(r"(?<!`)`(sketchtune [^`]+)`(?!`)")
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def fenced_commands(text: str) -> list[str]:
    """``sketchtune ...`` lines of fenced code blocks, continuation lines joined."""
    commands = []
    for block in FENCE.findall(text):
        lines = block.splitlines()[1:-1]
        joined, current = [], ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            joined.append(current + line)
            current = ""
        if current:
            joined.append(current)
        commands += [line.strip() for line in joined if line.strip().startswith("sketchtune ")]
    return commands


def inline_commands(text: str) -> list[str]:
    """Inline code spans starting with ``sketchtune `` outside fenced blocks."""
    prose = FENCE.sub("", text)
    return [" ".join(m.split()) for m in INLINE.findall(prose)]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in COMMAND_DOCS:
        text = doc.read_text()
        for command in fenced_commands(text) + inline_commands(text):
            found.append((doc.relative_to(ROOT).as_posix(), command))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_to_check():
    # Guards the extraction itself: if it broke, the parse test below would check nothing.
    assert len([c for doc, c in COMMANDS if doc == "README.md"]) >= 5
    assert len([c for doc, c in COMMANDS if doc == "docs/cli.md"]) >= 30
    subcommands = {shlex.split(c, comments=True)[1] for _, c in COMMANDS}
    assert {"info", "convert", "generate", "sketch", "heal", "finetune", "eval", "export"} <= subcommands


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:70]}" for d, c in COMMANDS])
def test_every_documented_command_parses(doc, command, capsys):
    argv = shlex.split(command, comments=True)
    assert argv[0] == "sketchtune"
    parser = build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as e:
        # --help and --version exit 0 after printing; anything else is argparse refusing the command.
        assert e.code == 0, f"{doc}: `{command}` does not parse:\n{capsys.readouterr().err}"
        return
    assert callable(args.func)


def relative_links(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text())
    text = re.sub(r"`[^`]*`", "", text)  # code spans are not links
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, https:, mailto: and anchors within the page
        targets.append(target)
    return targets


LINKS = [(doc, target) for doc in LINKED_DOCS for target in relative_links(doc)]


def test_the_docs_hold_links_to_check():
    assert len([1 for doc, _ in LINKS if doc.name == "README.md" and doc.parent == ROOT]) >= 10


@pytest.mark.parametrize(("doc", "target"), LINKS, ids=[f"{d.relative_to(ROOT).as_posix()}->{t}" for d, t in LINKS])
def test_every_relative_link_points_to_a_file(doc, target):
    path, _, anchor = target.partition("#")
    resolved = (doc.parent / path).resolve()
    assert resolved.exists(), f"{doc.relative_to(ROOT)}: link to {target} points to nothing ({resolved})"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), f"{doc.relative_to(ROOT)}: {target} names no heading of {path}"


def anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``doc``: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", doc.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_results_page_is_one_click_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    pages = sorted((ROOT / "docs" / "results").glob("*.md"))
    assert pages and [p.name for p in pages if p.resolve() not in linked] == []


def _python_names() -> list[tuple[str, str]]:
    names = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if "notebook" in doc.parts:
            continue
        text = doc.read_text()
        for match in re.finditer(r"\b(?:st|sketchtune_jax)\.((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)", text):
            names.add((doc.relative_to(ROOT).as_posix(), match.group(1)))
        for match in re.finditer(r"^from sketchtune_jax((?:\.\w+)*) import ([\w, ]+)$", text, re.M):
            for name in match.group(2).split(","):
                names.add((doc.relative_to(ROOT).as_posix(), f"{match.group(1)}.{name.strip()}".lstrip(".")))
    return sorted(names)


def test_the_docs_name_python_to_check():
    assert len(_python_names()) > 50


def test_every_python_name_in_the_docs_exists():
    import importlib

    import sketchtune_jax as st

    missing = []
    for doc, dotted in _python_names():
        obj = st
        try:
            for part in dotted.split("."):
                obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(f"{obj.__name__}.{part}")
        except (AttributeError, ImportError):
            missing.append(f"{doc}: st.{dotted}")
    assert missing == []
