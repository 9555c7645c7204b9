"""Training configuration."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from sketchtune_jax.models.remat import remat_name
from sketchtune_jax.settings import DTYPES, SettingError, require, require_non_negative, require_positive


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a fine-tuning run; stored with every checkpoint.

    One *step* is one optimizer update over ``grad_accum`` micro-batches of
    ``batch_size`` rows each. ``max_steps > 0`` overrides ``epochs``.

    - ``schedule``: after ``warmup_steps`` of linear warmup from 0, decay linearly or
      by cosine to 0 at the last step, or stay constant. ``warmup_steps=None`` (the default)
      warms up for a tenth of the run, at most 100 steps: the paper's 100 on its runs of
      thousands of steps, none on a run of fewer than 10. A number is taken as given, and must
      be shorter than the run.
    - ``max_grad_norm``: global-norm clipping (None or 0: off).
    - ``save_every``: checkpoint every N steps (0: only at the end); ``keep_checkpoints``
      most recent are kept. ``eval_every``: validation every N steps (0: at the end only).
    - ``compute_dtype``: set on every module with a ``dtype`` attribute (None: leave).
    - ``codebook_dtype``: storage dtype of the trained codebooks (float32 keeps an
      exact master copy when the model computes in bfloat16; None: leave).
    - ``remat``: the rematerialisation policy set on every module's ``remat`` attribute
      (the model's decoder layers must offer one), a name from
      `sketchtune_jax.models.REMAT_POLICIES`; True/False mean "full"/"none".
    - ``scan_layers``: stack the decoder layers for the run (`sketchtune_jax.models.scan`)
      so the step runs them as one scan: its compile time and program size stop growing
      with depth, at the cost of one copy of the layers when training starts and ends
      (none per step). Layers that are not alike (e.g. mixed bits) train unstacked, with
      a warning. Files keep their per-layer names either way.
    - ``seed``: the data order's seed; build the batches with it
      (``build_batches(..., seed=config.seed)``); the Trainer warns when they differ.
    - ``batch_size``, ``grad_accum``, ``seed``, ``seq_len`` must match to resume a run.
    """

    lr: float = 1e-4
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 8
    epochs: int = 1
    max_steps: int = 0
    seq_len: int = 512
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 1
    seed: int = 0
    compute_dtype: str | None = None
    codebook_dtype: str | None = "float32"
    remat: str | bool = "none"
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_name(self.remat))
        require(
            self.schedule in ("linear", "cosine", "constant"),
            "schedule",
            f"must be linear, cosine or constant, got {self.schedule!r}",
        )
        require_positive(self, "lr", "adam_eps", finite=True)
        require_positive(self, "grad_accum", "batch_size", "seq_len", "log_every", "keep_checkpoints")
        require_non_negative(self, "max_steps", "save_every", "eval_every", "epochs", "weight_decay")
        if self.warmup_steps is not None:
            require_non_negative(self, "warmup_steps")
        for name in ("adam_b1", "adam_b2"):
            value = getattr(self, name)
            require(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        if self.max_grad_norm is not None:
            require(
                self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm),
                "max_grad_norm",
                f"must be >= 0 (0 or None: no clipping), got {self.max_grad_norm}",
            )
        for name in ("compute_dtype", "codebook_dtype"):
            value = getattr(self, name)
            require(value is None or value in DTYPES, name, f"must be one of {sorted(DTYPES)} or None, got {value!r}")
        if self.max_steps == 0 and self.epochs == 0:
            raise SettingError("epochs", "or max_steps must be > 0")
        if self.max_steps > 0:
            self.check_warmup(self.max_steps)

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``: ``warmup_steps``, or when None a tenth of the
        run, at most 100."""
        return min(100, total_steps // 10) if self.warmup_steps is None else self.warmup_steps

    def check_warmup(self, total_steps: int) -> None:
        """Raise `SettingError` unless a warmup that was given is shorter than a run of ``total_steps``."""
        if self.warmup_steps is None:
            return
        require(
            self.warmup_steps < total_steps,
            "warmup_steps",
            f"must be shorter than the run ({total_steps} steps), got {self.warmup_steps}",
        )

    def dtype(self, name: str) -> Any:
        """The jnp dtype of field ``name`` (``compute_dtype`` or ``codebook_dtype``), or None."""
        value = getattr(self, name)
        return None if value is None else DTYPES[value]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
