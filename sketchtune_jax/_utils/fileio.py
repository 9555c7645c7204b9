"""Atomic writes and output-directory checks: nothing a reader sees is ever half-written.

Outputs are staged in `tempfile` files and directories, which are created private (0600 and
0700) whatever the umask; before they are renamed into place they are given the mode a plain
``open`` or ``mkdir`` would have (0644 and 0755 under the usual umask 022), so that others who
may read the output (on a shared file system, say) can.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sketchtune_jax.settings import OutputExistsError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file mode creation mask (e.g. ``0o022``), read without changing it for long.

    Linux reports it in ``/proc/self/status``; elsewhere it is set and restored under a lock
    (`os.umask` can only be read by setting it).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one, never half.

    The file has the mode ``open`` would give a new file under the current umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse a non-empty existing ``path`` unless ``overwrite``; call before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"{path} exists and is not empty; set {{overwrite}} to replace it", ("overwrite",))
    return path


def _umask_modes(root: Path, umask: int) -> None:
    """Give ``root``, its directories and files the default modes under ``umask`` (executables keep
    their execute bits)."""
    root.chmod(0o777 & ~umask)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~umask)
        for name in files:
            file = os.path.join(directory, name)
            executable = os.stat(file, follow_symlinks=False).st_mode & 0o111
            if not os.path.islink(file):
                os.chmod(file, (0o777 if executable else 0o666) & ~umask)


@contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    Before the rename, the directory and everything in it get the modes ``mkdir`` and ``open``
    give under the current umask: libraries that stage their own files (safetensors writes 0600
    files) would otherwise leave them private.
    """
    path = check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _umask_modes(tmp, current_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
