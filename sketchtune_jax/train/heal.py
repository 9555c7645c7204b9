"""Healing: distil a sketch's codebooks from the dense model it was made from.

After sketching, only the codebooks train, minimising KL(teacher || student) of the
next-token distributions on generic text (AQLM's global fine-tuning, codebook-only).
Codes never change. The teacher (the dense model) runs inside the same jitted step as
the student; see `sketchtune_jax.train.distill` for why its logits are not cached::

    import sketchtune_jax as st

    teacher = st.load_any("smollm2-135m").model
    student = st.io.sketched_dir.load_sketched("smol-int3")
    windows = st.calibration_windows("wiki.txt", student.tokenizer, nsamples=64, seq_len=512)
    st.train.heal.heal(student.model, teacher, windows, st.TrainConfig(lr=5e-4, batch_size=4, max_steps=16,
            seq_len=512), "runs/heal")

`sketchtune_jax.jobs.heal_to_dir` does the same from directories to a healed
sketched directory (``sketchtune heal``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from flax import nnx

from sketchtune_jax.data.batches import window_batches
from sketchtune_jax.layers import Codebook
from sketchtune_jax.settings import (
    SettingError,
    fraction_range,
    require,
    require_non_negative,
    require_positive,
    setting,
    show_fraction_range,
)
from sketchtune_jax.train.config import TrainConfig
from sketchtune_jax.train.distill import teacher_kl
from sketchtune_jax.train.trainer import Trainer, TrainResult

# What must agree between a sketch and its teacher for next-token distributions to be comparable.
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
)


def architecture_mismatch(student_config: Any, teacher_config: Any) -> str | None:
    """``"field: student X, teacher Y; ..."`` for the architecture fields two `ModelConfig` differ in, or None."""
    diffs = [
        f"{name}: sketch {getattr(student_config, name)!r}, teacher {getattr(teacher_config, name)!r}"
        for name in ARCHITECTURE_FIELDS
        if getattr(student_config, name) != getattr(teacher_config, name)
    ]
    return "; ".join(diffs) or None


def is_norm_scale(path: tuple[Any, ...], value: Any) -> bool:
    """NNX filter: the ``weight`` of an RMSNorm (a `nnx.Param` under a ``*norm`` attribute)."""
    return isinstance(value, nnx.Param) and len(path) >= 2 and str(path[-2]).endswith("norm")


def heal_targets(train_norms: bool = False) -> Any:
    """What a heal trains: the `Codebook` leaves, and with ``train_norms`` the RMSNorm scales too."""
    return nnx.Any(Codebook, is_norm_scale) if train_norms else Codebook


def heal_windows(
    ids: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    windows: int | None = None,
    seed: int = 0,
    source: str = "the calibration text",
) -> np.ndarray:
    """``[N, seq_len]`` windows of token ``ids`` for a heal: ``windows`` of them (default ``steps * batch_size``,
    each seen once), at most as many as ``ids`` holds without overlap; ValueError if not one batch's worth."""
    from sketchtune_jax.data.calibration import sample_windows

    room = len(ids) // seq_len
    if room < batch_size:
        raise SettingError(
            "seq_len",
            f"of {seq_len} leaves room for {room} windows in the {len(ids)} tokens of "
            f"{source}, fewer than one batch of {batch_size}; give more text or lower {{seq_len}} "
            "or {batch_size}",
            ("seq_len", "batch_size"),
        )
    return sample_windows(ids, nsamples=min(windows or steps * batch_size, room), seq_len=seq_len, seed=seed)


def heal(
    student: nnx.Module,
    teacher: nnx.Module,
    windows: np.ndarray,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    val_windows: np.ndarray | None = None,
    progress: bool = True,
    save_result: Callable[[nnx.Module, str], str] | None = None,
    train_norms: bool = False,
) -> TrainResult:
    """Train ``student``'s `Codebook` leaves in place to minimise KL(teacher || student) on ``windows``.

    Args:
        student: a sketched causal LM; only its codebooks change.
        teacher: the dense model of the same architecture; frozen, never copied into the
            trained state.
        windows: ``[N, T]`` int token ids, ``T == config.seq_len``, read ``config.batch_size``
            at a time (epochs repeat them when ``config.max_steps`` asks for more).
        config: the run's `TrainConfig`; the loss logged is the mean KL per token (nats).
        out_dir: run directory (log, checkpoints); a run found there is resumed exactly.
        val_windows: optional held-out windows; their mean KL is logged as ``val_loss``.
        save_result: what the finished run writes (default: ``codebooks.safetensors``).
        train_norms: also train the RMSNorm scales (one float per channel, stored dense in
            every sketch already, so the sketch's size does not change).
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] != config.seq_len:
        raise SettingError("seq_len", f"is {config.seq_len} but the windows are {windows.shape}; they must agree")
    if hasattr(student, "config") and hasattr(teacher, "config"):
        if mismatch := architecture_mismatch(student.config, teacher.config):
            raise ValueError(
                f"the teacher's architecture differs from the sketch's ({mismatch}); "
                "heal against the dense model the sketch was made from"
            )
    loss_fn, teacher_state = teacher_kl(teacher)
    val = None if val_windows is None else window_batches(val_windows, min(config.batch_size, len(val_windows)))
    trainer = Trainer(
        student,
        window_batches(windows, config.batch_size),
        config,
        out_dir,
        val_batches=val,
        progress=progress,
        wrt=heal_targets(train_norms),
        save_result=save_result,
        loss_fn=loss_fn,
        loss_inputs=teacher_state,
    )
    return trainer.run()


@dataclasses.dataclass(frozen=True)
class HealSettings:
    """How a sketch is healed (`sketchtune_jax.jobs.heal_to_dir`, ``sketchtune heal``); checked
    when built, before any work. `train_config` gives the trainer's `TrainConfig`.

    ``steps`` 0 means no healing (``sketchtune sketch --heal-steps``); a heal needs ``steps >= 1``.
    ``windows`` distinct windows (None: ``steps * batch_size``, as the text allows) are cycled over.
    The learning rate 5e-4 comes from the held-out figures in the README.
    """

    steps: int = setting(0, "optimizer steps (0: no healing)")
    batch_size: int = setting(4, "windows per step")
    seq_len: int = setting(512, "tokens per window")
    lr: float = setting(5e-4, "peak learning rate (5e-4 from held-out figures, README)")
    schedule: Literal["linear", "cosine", "constant"] = setting("cosine", "learning-rate decay after the warmup")
    warmup_steps: int = setting(0, "steps of linear warmup")
    save_every: int = setting(50, "checkpoint every N steps (a rerun resumes)")
    seed: int = setting(0, "seed of the window order")
    windows: int | None = setting(None, "distinct windows (None: steps x batch size, as the text allows)")
    train_norms: bool = setting(
        False, "also train the RMSNorm scales (stored in every sketch already: the size does not change)"
    )
    calib_range: tuple[float, float] = setting(
        (0.0, 1.0), "use only this fraction of the text, e.g. 0.5:1", show=show_fraction_range
    )
    eval_windows: int = setting(20, "512-token windows of --eval-text measured before and after")

    def __post_init__(self):
        object.__setattr__(self, "calib_range", fraction_range(self.calib_range, "calib_range"))
        require_non_negative(self, "steps")
        require_positive(self, "eval_windows")
        if self.windows is not None:
            require(
                self.windows >= self.batch_size,
                "windows",
                f"must be at least one batch ({self.batch_size}), got {self.windows}",
            )
        self.train_config()

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The `TrainConfig` of this heal (``overrides``: other `TrainConfig` fields); `SettingError`
        names the field."""
        if self.steps == 0:
            return dataclasses.replace(self, steps=1).train_config(**overrides)
        return TrainConfig(
            lr=self.lr,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            batch_size=self.batch_size,
            max_steps=self.steps,
            seq_len=self.seq_len,
            save_every=self.save_every,
            seed=self.seed,
            **overrides,
        )

    def require_steps(self) -> None:
        """Raise `SettingError` unless the settings ask for a heal (``steps >= 1``)."""
        require(self.steps >= 1, "steps", f"must be a positive number of optimizer steps, got {self.steps!r}")


def heal_config(*, steps: int, **fields: Any) -> TrainConfig:
    """The `TrainConfig` of a heal of ``steps`` optimizer steps: `HealSettings` fields by name, other
    `TrainConfig` fields as overrides (validated; `SettingError` names the field)."""
    if not isinstance(steps, int) or steps < 1:
        raise SettingError("steps", f"must be a positive number of optimizer steps, got {steps!r}")
    names = {f.name for f in dataclasses.fields(HealSettings)}
    settings = HealSettings(steps=steps, **{k: v for k, v in fields.items() if k in names})
    return settings.train_config(**{k: v for k, v in fields.items() if k not in names})


__all__ = [
    "ARCHITECTURE_FIELDS",
    "HealSettings",
    "architecture_mismatch",
    "heal",
    "heal_config",
    "heal_targets",
    "heal_windows",
    "is_norm_scale",
]
