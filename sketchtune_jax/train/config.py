"""Training configuration: `TrainConfig` (the trainer's) and `FinetuneSettings` (the fine-tuning job's).

The defaults are the paper's math-reasoning recipe (Table 8 of the appendix: AdamW, lr 8e-5, batch
16, linear decay, 100 warmup steps) except the epochs (1 here, 4 there)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from sketchtune_jax.models.remat import REMAT_POLICIES, remat_name
from sketchtune_jax.settings import (
    DTYPES,
    SettingError,
    fraction_range,
    require,
    require_non_negative,
    require_positive,
    setting,
    show_fraction_range,
)
from sketchtune_jax.train.quantized_base import QTYPES


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

    lr: float = setting(8e-5, "peak learning rate (the paper's math-reasoning recipe, Table 8)")
    schedule: Literal["linear", "cosine", "constant"] = setting("linear", "learning-rate decay after the warmup")
    warmup_steps: int | None = setting(
        None, "steps of linear warmup (None: a tenth of the run, at most 100: the paper's 100 on long runs)"
    )
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_b1: float = setting(0.9, "Adam's first-moment decay")
    adam_b2: float = setting(0.999, "Adam's second-moment decay")
    adam_eps: float = setting(1e-8, "Adam's epsilon")
    max_grad_norm: float | None = setting(1.0, "clip the gradients' global norm to this (0: no clipping)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    batch_size: int = setting(16, "rows per micro-batch")
    epochs: int = setting(1, "passes over the data")
    max_steps: int = setting(0, "stop after this many steps (overrides --epochs; 0: epochs decide)")
    seq_len: int = setting(512, "tokens per row, at most")
    save_every: int = setting(200, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = setting(2, "most recent checkpoints kept")
    eval_every: int = setting(0, "validation every N steps (0: at the end only)")
    log_every: int = setting(1, "log every N steps")
    seed: int = setting(0, "seed of the data order (and of adapters' initialisation)")
    compute_dtype: str | None = None
    codebook_dtype: str | None = "float32"
    remat: str | bool = setting(
        "none",
        "recompute layer activations in the backward pass under this policy (--remat alone: full)",
        nargs="?",
        const="full",
        choices=REMAT_POLICIES,
    )
    scan_layers: bool = setting(
        False, "run the decoder layers as one scan (compile time independent of depth; files unchanged)"
    )

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


TEMPLATE_HELP = (
    "prompt format of instruction records: alpaca (the paper's protocols) or chat (the tokenizer's own "
    "chat template, for an instruct/chat model used as a chat model)"
)


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tuning job decides besides the trainer's `TrainConfig` and the adapter's
    `sketchtune_jax.train.lora.LoraSettings` (`sketchtune_jax.jobs.finetune_to_dir`, ``sketchtune
    finetune``); checked when built.

    - ``method``: None trains a sketch's codebooks (a dense model must name one).
    - ``lora_rank``: ``"auto"`` (the rank whose trainable count is closest to an INT4 GPR4 sketch's,
      the paper's like-for-like comparison) or a positive number; ``lora_alpha`` None: 2 x rank.
    - ``qlora_qtype``: how method qlora stores its frozen base.
    - ``text_range``: the fraction of a plain text trained on (also ``"START:END"`` text).
    - ``template``: the prompt format of instruction records (`sketchtune_jax.data.prompts.format_prompt`).
    """

    method: Literal["sketch", "lora", "qlora", "full"] | None = setting(
        None,
        "what trains: sketch (codebooks; the default for a sketched model), lora, qlora "
        "(adapters on an NF4/INT4 base) or full (every weight) for a dense model",
    )
    lora_rank: int | Literal["auto"] = setting(
        "auto", "adapter rank, or 'auto': the rank whose trainable count is closest to an INT4 GPR4 sketch's"
    )
    lora_alpha: float | None = setting(None, "adapter scale numerator (None: 2 x rank)")
    qlora_qtype: str = setting(
        "nf4",
        "storage of QLoRA's frozen base: NormalFloat or evenly spaced levels at 4, 3 or 2 bits",
        choices=QTYPES,
    )
    val_fraction: float = setting(0.0, "hold out this fraction of the data for validation")
    pad_multiple: int = setting(64, "pad batches to a multiple of this many tokens (each length compiles once)")
    text_range: tuple[float, float] = setting(
        (0.0, 1.0),
        "with --text: the fraction of the text to train on, e.g. 0.5:1 (held-out text stays unread)",
        show=show_fraction_range,
    )
    template: Literal["alpaca", "chat"] = setting("alpaca", TEMPLATE_HELP)

    def __post_init__(self):
        object.__setattr__(self, "text_range", fraction_range(self.text_range, "text_range"))
        rank = self.lora_rank
        if rank != "auto":
            try:
                rank = int(rank)
            except (TypeError, ValueError):
                rank = 0
            require(rank > 0, "lora_rank", f"must be a positive integer or 'auto', got {self.lora_rank!r}")
            object.__setattr__(self, "lora_rank", rank)
        if self.lora_alpha is not None:
            require_positive(self, "lora_alpha", finite=True)
        require(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require_positive(self, "pad_multiple")
        require(self.template in ("alpaca", "chat"), "template", f"must be alpaca or chat, got {self.template!r}")
