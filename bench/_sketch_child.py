"""`sketchtune sketch` of a checkpoint in a child process, at 4 bits and 4 groups a row, with the
child's peak resident memory and seconds: its flags, the run, and the record of its settings."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import WIKITEXT, child_env


def add_sketch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--calib --nsamples --seq-len --kmeans-iters`` of the child's sketch."""
    parser.add_argument("--calib", type=Path, default=WIKITEXT, help="calibration text")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--kmeans-iters", type=int, default=5)


def sketch_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every child sketch of a run was made with (for the result JSON)."""
    return {
        "bits": 4,
        "groups_per_row": 4,
        "nsamples": args.nsamples,
        "seq_len": args.seq_len,
        "kmeans_iters": args.kmeans_iters,
    }


def sketch_in_child(
    model: Path,
    out: Path,
    args: argparse.Namespace,
    *,
    streaming: bool = True,
    extra: tuple[str, ...] = (),
    host_devices: int | None = None,
) -> dict[str, float]:
    """Sketch ``model`` into ``out`` with `sketch_settings` (plus ``extra`` flags, on ``host_devices``
    forced CPU devices if given); ``{"peak_rss_mib", "seconds"}`` of the child (``wait4`` rusage
    ``ru_maxrss``). RuntimeError with the end of the child's stderr if it fails."""
    argv = [
        sys.executable,
        "-m",
        "sketchtune_jax.cli",
        "sketch",
        str(model),
        "--out",
        str(out),
        "--calib",
        str(args.calib),
        "--nsamples",
        str(args.nsamples),
        "--seq-len",
        str(args.seq_len),
        "--bits",
        "4",
        "--groups-per-row",
        "4",
        "--kmeans-iters",
        str(args.kmeans_iters),
        "--overwrite",
        "--streaming" if streaming else "--no-streaming",
        *extra,
    ]
    env = child_env(host_devices)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # stderr to a file, not a pipe: nobody reads a pipe while wait4 waits, and a full one stalls the child.
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            err.seek(0)
            raise RuntimeError(f"sketch of {model} failed ({child.returncode}): {err.read().decode()[-2000:]}")
    # ru_maxrss is in KiB on Linux.
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1)}
