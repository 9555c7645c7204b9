"""What every bench script shares: this checkout on ``sys.path``, the shared data directory, the
header a result JSON opens with, atomic result writing, the printed summary, and the ways a bench
runs the library (`run_cli` in this process, `child_env` for a child).

Bench scripts run as ``python bench/NAME.py``, so ``bench/`` leads ``sys.path`` and ``import _common``
finds this module; its leading underscore keeps it from shadowing an installed module. Nothing
here imports JAX or the library until it is called, so ``--help`` stays quick.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This checkout's packages (sketchtune_jax, pallas_kernels, converters) ahead of any installed copy.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Data sets live beside the checkout, in ../shared/data (as for the tests and examples).
DATA = ROOT.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2" / "test.txt"


def force_host_devices(env: MutableMapping[str, str], count: int) -> None:
    """Give JAX in the process that reads ``env`` ``count`` CPU devices; XLA reads the flag once,
    when its CPU backend starts, so set it before then."""
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"


def child_env(host_devices: int | None = None) -> dict[str, str]:
    """``os.environ`` for a child process that imports this checkout first (``PYTHONPATH``), on
    ``host_devices`` forced CPU devices when given."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    if host_devices is not None:
        force_host_devices(env, host_devices)
    return env


def checkout_commit() -> str | None:
    """HEAD of this checkout, with ``-dirty`` when tracked files differ from it; None outside git."""
    try:
        head, changes = (
            subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True).stdout.strip()
            for cmd in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if changes else "")


def machine() -> str:
    """The host's CPU model and core count, and the JAX devices this process sees."""
    import jax

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        cpuinfo = []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    device = jax.devices()[0]
    kind = (
        device.device_kind
        if device.platform in device.device_kind.lower()
        else f"{device.platform} {device.device_kind}"
    )
    return f"{cpu}, {os.cpu_count()} cores; {jax.device_count()} x {kind}"


def result_header(script: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The keys a result JSON opens with: the bench (``script``'s name), the command that made it
    (``argv``, by default this process's arguments), the commit, the machine, the date, jax, and the
    kernel backend the automatic choice takes on this machine (and why)."""
    import jax

    from pallas_kernels import describe

    kernels = describe()

    name = Path(script).stem
    return {
        "bench": name,
        "command": shlex.join(["python", f"bench/{name}.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": checkout_commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "kernel_backend": kernels["kernel_backend"],
        "kernel_backend_reason": kernels["reason"],
    }


def run_cli(argv: Sequence[str]) -> None:
    """``sketchtune ARGV`` in this process (programs compiled for one step serve the next);
    SystemExit if it fails."""
    from sketchtune_jax.cli import main as sketchtune

    if sketchtune(list(argv)) != 0:
        raise SystemExit(f"failed: sketchtune {shlex.join(argv)}")


def write_result(result: Mapping[str, Any], out: str | os.PathLike | None) -> None:
    """Write ``result`` as JSON to ``out`` (nothing when None) through a temporary file and a rename."""
    if out:
        from sketchtune_jax._utils.fileio import write_json_atomic

        write_json_atomic(out, result)


def report(
    result: Mapping[str, Any],
    out: str | os.PathLike | None,
    *,
    summary: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    title: str | None = None,
) -> None:
    """Write ``result`` to ``out`` (`write_result`), then print the summary: ``summary`` (by default
    ``result``) as JSON on stdout, or with a ``title`` as a table. gpu_check.sh and tpu_check.sh keep a
    bench's stdout as its JSON."""
    write_result(result, out)
    shown = result if summary is None else summary
    if title is None:
        print(json.dumps(shown, indent=2), flush=True)
    else:
        from sketchtune_jax._utils.reporting import print_table

        print_table(title, shown)


def progress(record: Mapping[str, Any]) -> None:
    """One JSON line on stderr while a long bench runs (stdout is kept for the result)."""
    print(json.dumps(record), file=sys.stderr, flush=True)
