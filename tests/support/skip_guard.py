"""A pytest plugin that fails the run on any skip not on an allow list (CI sets ``SKETCHTUNE_STRICT_SKIPS=1``).

A skip can hide a regression: a test file that skips when a module is missing, or a fixture
that skips when a file was renamed, reports green while testing nothing. With the variable
set, every skip (at collection or in a test) is checked against `ALLOWED_SKIPS`, whose lines
read ``NODE_ID_GLOB  REASON_GLOB`` (`fnmatch` globs; ``#`` starts a comment), and any skip
no line matches makes the session fail with a list of them. Under pytest-xdist it runs in
the controller, which receives every worker's reports.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

STRICT_ENV = "SKETCHTUNE_STRICT_SKIPS"
ALLOWED_SKIPS = Path(__file__).with_name("allowed_skips.txt")


@dataclass(frozen=True)
class AllowedSkip:
    """One line of the allow list: skips of tests matching ``node_id`` for a reason matching ``reason``."""

    node_id: str
    reason: str

    def matches(self, node_id: str, reason: str) -> bool:
        return fnmatch.fnmatchcase(node_id, self.node_id) and fnmatch.fnmatchcase(reason, self.reason)


def read_allowed_skips(path: str | os.PathLike) -> list[AllowedSkip]:
    """The entries of an allow-list file; ValueError names a line without both globs."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: give a test id glob and a skip reason glob, got {line!r}")
        entries.append(AllowedSkip(parts[0], parts[1].strip()))
    return entries


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The message a skip was given (``pytest.skip(msg)``, ``skipif(reason=...)``, ``importorskip``)."""
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return message.removeprefix("Skipped: ")


class SkipGuard:
    """Collects skips that no allowed entry matches and fails the session if there are any."""

    def __init__(self, allowed: list[AllowedSkip], source: str):
        self.allowed, self.source = allowed, source
        self.unexpected: list[tuple[str, str]] = []

    def _check(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        # An xfail that failed as expected is reported as skipped too; it is not a skip.
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = skip_reason(report)
        if not any(entry.matches(report.nodeid, reason) for entry in self.allowed):
            self.unexpected.append((report.nodeid, reason))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._check(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._check(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unexpected and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.unexpected:
            return
        terminalreporter.section("skips not allowed", sep="=", red=True, bold=True)
        terminalreporter.line(
            f"{STRICT_ENV}=1: these tests skipped, and no line of {self.source} allows it "
            "(install what they need, or add a line saying why they may skip):"
        )
        for node_id, reason in self.unexpected:
            terminalreporter.line(f"  {node_id}: {reason}")


def install(config: pytest.Config, allowed_file: str | os.PathLike = ALLOWED_SKIPS) -> None:
    """Register the guard when ``SKETCHTUNE_STRICT_SKIPS=1``, in the process that reports (not an xdist worker)."""
    if os.environ.get(STRICT_ENV) != "1" or hasattr(config, "workerinput"):
        return
    config.pluginmanager.register(SkipGuard(read_allowed_skips(allowed_file), str(allowed_file)), "skip_guard")
