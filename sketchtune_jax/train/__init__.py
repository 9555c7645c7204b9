"""Fine-tuning of sketched models: only `Codebook` leaves train.

- Config and optimizer: `TrainConfig`, `make_optimizer`, `make_schedule`.
- Steps: `train_step` (jitted; frozen state is never copied), `apply_train_step`
  (unjitted body for your own jit), `eval_step`, `loss_and_grads`,
  `compile_train_step` (for memory analysis), `token_nll_sum`; the loss is
  pluggable (`LossFn`, default `next_token_nll`).
- The loop: `finetune` / `Trainer` (progress bar, JSONL log, Orbax checkpoints,
  exact resume, validation, loss curve), `NonFiniteLossError`, `read_log`.
- Codebook files: `trainable_parameter_count`, `codebook_state`, `save_codebooks`,
  `load_codebooks`, `CodebookMismatchError`.

See `sketchtune_jax.train.step` for a ten-line loop of your own and
`sketchtune_jax.train.trainer` for the full loop; `checkpointing` (Orbax, one
table of what is saved) and `metrics_log` (JSONL log, loss plot) are its parts;
batch sources live in `sketchtune_jax.data.batches`.
"""

from sketchtune_jax.data.batches import BatchSource, SequenceBatches, stack_micro_batches
from sketchtune_jax.io.codebooks import (
    CodebookMismatchError,
    apply_codebooks,
    codebook_state,
    load_codebooks,
    read_codebooks,
    save_codebooks,
    trainable_parameter_count,
)
from sketchtune_jax.train.checkpointing import Checkpoints
from sketchtune_jax.train.config import TrainConfig
from sketchtune_jax.train.metrics_log import MetricsLog, plot_loss_curve, read_log
from sketchtune_jax.train.optim import make_optimizer, make_schedule
from sketchtune_jax.train.step import (
    LossFn,
    apply_train_step,
    compile_train_step,
    eval_step,
    loss_and_grads,
    next_token_nll,
    token_nll_sum,
    train_step,
)
from sketchtune_jax.train.trainer import NonFiniteLossError, Trainer, TrainResult, finetune

__all__ = [
    "BatchSource",
    "Checkpoints",
    "LossFn",
    "CodebookMismatchError",
    "NonFiniteLossError",
    "SequenceBatches",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "apply_codebooks",
    "apply_train_step",
    "codebook_state",
    "compile_train_step",
    "eval_step",
    "finetune",
    "load_codebooks",
    "loss_and_grads",
    "make_optimizer",
    "make_schedule",
    "MetricsLog",
    "next_token_nll",
    "plot_loss_curve",
    "read_codebooks",
    "read_log",
    "save_codebooks",
    "stack_micro_batches",
    "token_nll_sum",
    "train_step",
    "trainable_parameter_count",
]
