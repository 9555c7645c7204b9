"""Runs over several processes (hosts): `jax.distributed` with checked settings and
bounded waits, and the few rules the library follows in such a run.

Every process runs the same command with its own ``process_id``::

    import sketchtune_jax as st

    st.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # before any JAX work
    # jax.devices() now lists every process's devices; meshes span them all.

In a run of several processes every process computes, `is_primary` (process 0) alone
writes shared files (logs, codebooks, summaries, sketches; Orbax checkpoints are written
by all of them together), `barrier` keeps them in step around such writes, and
`to_host` fetches an array split over processes whole. With one process all of this is
a no-op, so the library calls it unconditionally. On CPU, JAX's collectives between
processes go through Gloo (the default of ``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sketchtune_jax.settings import SettingError, require, setting

__all__ = [
    "BARRIER_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "DistributedSettings",
    "barrier",
    "distributed_settings",
    "initialize",
    "is_primary",
    "to_host",
]

DEFAULT_TIMEOUT_S = 60.0
BARRIER_TIMEOUT_S = 3600.0
# Barriers passed so far: every process passes the same ones in the same order.
_barriers = 0
# The run this process joined (None: none).
_joined: DistributedSettings | None = None
# JAX's own deadline comes this much after ours, so that ours reports the failure first.
_JAX_GRACE_S = 30


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Where process ``process_id`` of ``num_processes`` finds the others; checked when made.

    ``coordinator`` is ``HOST:PORT`` of process 0 (which serves there); ``timeout_s``
    bounds every wait for the other processes while starting. The first three are given
    together (their defaults, None, only say that a flag was not given).
    """

    coordinator: str | None = setting(None, "address of process 0, which serves there", metavar="HOST:PORT")
    num_processes: int | None = setting(None, "how many processes take part")
    process_id: int | None = setting(None, "this process's number, 0 .. num-processes - 1")
    timeout_s: float = setting(
        DEFAULT_TIMEOUT_S,
        "seconds to wait for the coordinator, and then for all processes to join",
        flag="distributed_timeout",
    )

    def __post_init__(self) -> None:
        given = {"coordinator": self.coordinator, "num_processes": self.num_processes, "process_id": self.process_id}
        missing = tuple(name for name, value in given.items() if value is None)
        if len(missing) == len(given):
            raise SettingError("coordinator", "is needed, with {num_processes} and {process_id}", missing[1:])
        if missing:
            field = next(name for name, value in given.items() if value is not None)
            raise SettingError(
                field, f"needs {' and '.join('{' + m + '}' for m in missing)} too (a run of several processes)", missing
            )
        host, sep, port = self.coordinator.rpartition(":")
        require(
            bool(sep and host) and port.isdigit() and 0 < int(port) < 65536,
            "coordinator",
            f"must be HOST:PORT with a port in 1..65535, got {self.coordinator!r}",
        )
        require(self.num_processes >= 1, "num_processes", f"must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise SettingError(
                "process_id",
                f"must be one of 0..{self.num_processes - 1} ({{num_processes}} is {self.num_processes}), "
                f"got {self.process_id}",
                ("num_processes",),
            )
        require(
            self.timeout_s > 0 and math.isfinite(self.timeout_s),
            "timeout_s",
            f"must be a finite number of seconds > 0, got {self.timeout_s}",
        )

    @property
    def host(self) -> str:
        # ``[::1]:1234`` names an IPv6 host in brackets.
        return self.coordinator.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.coordinator.rpartition(":")[2])


def distributed_settings(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DistributedSettings | None:
    """`DistributedSettings` of the three values, or None when none is given (one process).

    Raises `SettingError` when only some are given, or when they are out of range.
    """
    if coordinator is None and num_processes is None and process_id is None:
        return None
    return DistributedSettings(coordinator, num_processes, process_id, timeout_s)


def _exit_with(error: SettingError) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    os._exit(2)


def initialize(
    coordinator: str,
    num_processes: int,
    process_id: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_timeout: Callable[[SettingError], Any] = _exit_with,
) -> DistributedSettings:
    """Join the run of ``num_processes`` processes coordinated at ``coordinator`` (``HOST:PORT``
    of process 0) as ``process_id``: `jax.distributed.initialize`, after checks that fail fast.

    Call it before any other JAX work. Raises `SettingError`, before anything starts, for
    settings out of range, a host that does not resolve, a port process 0 cannot serve on
    (already taken), and, for the other processes, a coordinator not reachable within
    ``timeout_s``. If the processes have not all joined after ``timeout_s`` more, JAX would
    abort the process with a stack trace; ``on_timeout`` (called from a watchdog thread with
    the error) reports it first, by default as one line on stderr and exit status 2.
    Joining again the run this process is in does nothing (so one process may run several
    commands); another run raises RuntimeError. Returns the settings.
    """
    global _joined
    settings = DistributedSettings(coordinator, num_processes, process_id, timeout_s)
    if _joined is not None and (coordinator, num_processes, process_id) == (
        _joined.coordinator,
        _joined.num_processes,
        _joined.process_id,
    ):
        return _joined
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process, for another run")
    try:
        socket.getaddrinfo(settings.host, settings.port)
    except OSError:
        raise SettingError("coordinator", f"host {settings.host!r} does not resolve") from None
    if process_id == 0:
        _check_port_free(settings)
    else:
        _wait_for_coordinator(settings)
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(timeout_s):
            on_timeout(
                SettingError(
                    "coordinator",
                    f"{coordinator}: not all {num_processes} processes joined within {timeout_s:g} s "
                    "(start each with the same coordinator and number of processes, and a distinct process id)",
                )
            )

    threading.Thread(target=watchdog, name="sketchtune-distributed-watchdog", daemon=True).start()
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        initialization_timeout=math.ceil(timeout_s) + _JAX_GRACE_S,
    )
    joined.set()
    _joined = settings
    return settings


def _check_port_free(settings: DistributedSettings) -> None:
    # JAX's coordination service binds every address on this port; find out now if it cannot.
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, settings.port))
        except OSError as e:
            raise SettingError(
                "coordinator",
                f"{settings.coordinator}: process 0 serves there and cannot listen on port {settings.port} "
                f"({e.strerror}); pick a free port",
            ) from None
        finally:
            probe.close()
        return


def _wait_for_coordinator(settings: DistributedSettings) -> None:
    deadline = time.monotonic() + settings.timeout_s
    while True:
        try:
            with socket.create_connection((settings.host, settings.port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise SettingError(
                    "coordinator",
                    f"{settings.coordinator} could not be reached within {settings.timeout_s:g} s "
                    "(is process 0 running there, with the same port?)",
                ) from None
            time.sleep(0.2)


def is_primary() -> bool:
    """Whether this process writes the run's shared files (process 0; always, with one process)."""
    return jax.process_index() == 0


def barrier(name: str, *, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process reaches the barrier ``name`` (at most ``timeout_s``); nothing
    with one process.

    It waits in JAX's coordination service, not in a collective: JAX's CPU collectives
    (Gloo) give up when processes arrive more than 30 s apart, so the library calls this
    where processes may drift apart (after loading, before the first step).
    """
    global _barriers
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        # A barrier's key may be used once.
        _barriers += 1
        multihost.get_barrier_sync_fn()(key=f"sketchtune:{name}:{_barriers}", timeout_ms=int(timeout_s * 1000))


def to_host(x: Any) -> np.ndarray:
    """``x`` whole as a numpy array, also when it is split over devices of several processes
    (then every process must call this: it gathers through a collective)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
