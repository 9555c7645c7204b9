"""Run ``sketchtune ARGS`` in this process and SIGKILL it at a known point; for test_cli_resume.py.

    python tests/support/cli_kill_script.py POINT N ARGS...

POINT is where the run is counted: ``layer`` each time the sketch saves a finished decoder
layer in its ``.partial`` directory, ``checkpoint`` each time a training run (fine-tune or
heal) has written a checkpoint. After the N-th the process kills itself, as a crash or an
out-of-memory kill would, leaving what was on disk; N = 0 runs to the end. Either way the
exit prints ``POINT passed K times`` on stderr, so a test can see how much a resumed run redid.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys

from sketchtune_jax.cli import main
from sketchtune_jax.sketch.driver import ResumeDir
from sketchtune_jax.train.checkpointing import Checkpoints

# Where each point is counted, and what makes its write land on disk before the kill.
POINTS = {
    "layer": (ResumeDir, "save_layer", lambda resume_dir: None),
    "checkpoint": (Checkpoints, "save", Checkpoints.wait_until_finished),
}


def count_and_kill(point: str, kill_after: int) -> None:
    """Wrap the method ``point`` names so that its ``kill_after``-th return, once on disk, kills this process."""
    cls, name, land = POINTS[point]
    original = getattr(cls, name)
    passed = 0

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        nonlocal passed
        result = original(self, *args, **kwargs)
        passed += 1
        if passed == kill_after:
            land(self)
            print(f"{point} passed {passed} times; killing", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(cls, name, wrapped)
    atexit.register(lambda: print(f"{point} passed {passed} times", file=sys.stderr, flush=True))


if __name__ == "__main__":
    count_and_kill(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
