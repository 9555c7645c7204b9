"""The training log: one JSON object per line (``train_log.jsonl``), and its loss plot.

Records are ``{"step", "epoch", "loss", "lr", "grad_norm", "loss_tokens", "tokens_per_s", "elapsed_s"}``
per logged step (``elapsed_s``: training wall seconds so far, over every run a resume continued)
and ``{"step", "val_loss"}`` per validation. The plot needs the
``examples`` extra (matplotlib); without it `plot_loss_curve` logs one info line.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from sketchtune_jax._utils.fileio import atomic_write_bytes
from sketchtune_jax.parallel.distributed import is_primary

logger = logging.getLogger(__name__)

PLOT_SKIPPED = "loss plot skipped: matplotlib not installed (pip install 'sketchtune-jax[examples]')"


class MetricsLog:
    """Appends records to a JSONL file; `truncate_after` drops steps a resume will run again.

    In a run of several processes only process 0 writes; the others' calls do nothing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def append(self, record: dict[str, Any]) -> None:
        if not is_primary():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps ``<= step``."""
        if not is_primary() or not os.path.exists(self.path):
            return
        keep = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def elapsed_seconds(self) -> float:
        """Training seconds the log records so far (its last ``elapsed_s``; 0 if none, or off process 0)."""
        if not is_primary() or not os.path.exists(self.path):
            return 0.0
        return max((r["elapsed_s"] for r in read_log(self.path) if "elapsed_s" in r), default=0.0)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(log_path: str | os.PathLike, png_path: str | os.PathLike) -> bool:
    """Training (and validation) loss against step, as a PNG; False (and one info line) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        logger.info(PLOT_SKIPPED)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path) if os.path.exists(log_path) else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / response token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["MetricsLog", "PLOT_SKIPPED", "plot_loss_curve", "read_log"]
