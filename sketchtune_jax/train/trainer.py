"""The fine-tuning loop: progress bar, JSONL log, Orbax checkpoints, exact resume, validation.

::

    from sketchtune_jax.data.records import build_batches
    from sketchtune_jax.train import TrainConfig, finetune

    train, val = build_batches("math_data.train.json", tokenizer, batch_size=8, seq_len=512, val_fraction=0.05)
    config = TrainConfig(lr=1e-4, epochs=1, warmup_steps=50, save_every=200, eval_every=200)
    result = finetune(model, train, config, "runs/math", val_batches=val)
    # Running the same command again resumes from runs/math/checkpoints (same batches, same result).

Files in ``out_dir``: ``train_log.jsonl`` (one object per step, plus ``val_loss``
records), ``checkpoints/<step>/`` (Orbax: codebooks, optimizer state, model RNG
state, step, data position, config), ``codebooks.safetensors`` (the final
codebooks, see `save_codebooks`), ``loss_curve.png`` (with matplotlib installed).
In a run of several processes (`sketchtune_jax.parallel.distributed`) every process runs the same
loop and process 0 alone writes these files and shows progress; checkpoints are saved
by all of them (Orbax), so ``out_dir`` must be one directory they all see.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax.data.batches import DataPosition, as_batch_source, stack_micro_batches
from sketchtune_jax.io.codebooks import flat_state, save_codebooks
from sketchtune_jax.layers import Codebook
from sketchtune_jax.models.scan import is_stacked, stack_layers, unstack_layers
from sketchtune_jax.parallel.distributed import barrier, is_primary
from sketchtune_jax.parallel.sharding import shard_optimizer_state
from sketchtune_jax.train.checkpointing import Checkpoints, saved_parts
from sketchtune_jax.train.config import TrainConfig
from sketchtune_jax.train.metrics_log import MetricsLog, plot_loss_curve
from sketchtune_jax.train.optim import host_learning_rate, make_optimizer
from sketchtune_jax.train.step import LossFn, eval_step, next_token_nll, pure_train_step, split_for_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``step`` and ``position`` name the offending batch."""

    def __init__(self, message: str, step: int, position: DataPosition):
        super().__init__(message)
        self.step = step
        self.position = position


@dataclasses.dataclass
class TrainResult:
    """What a run produced: final step, last logged loss, paths of its outputs; ``earlier_seconds`` is
    the training time of the runs this one resumed (0 for a fresh run)."""

    step: int
    loss: float | None
    val_loss: float | None
    out_dir: str
    result_path: str
    log_path: str
    resumed_from: int | None
    earlier_seconds: float = 0.0


class Trainer:
    """Fine-tunes the `Codebook` leaves of ``model`` in place; see the module docstring.

    Args:
        model: NNX causal LM, ``model(input_ids, *, attention_mask=...) -> (logits, cache)``.
        train_batches: a `BatchSource` or a list of batch dicts.
        config: `TrainConfig`.
        out_dir: where logs, checkpoints and outputs go; a run found there is resumed.
        val_batches: optional held-out batches; evaluated every ``config.eval_every`` steps and at the end.
        progress: show a tqdm progress bar with ETA.
        wrt: which variables train (an NNX filter); `Codebook` by default (see
            `sketchtune_jax.train.methods` for LoRA, QLoRA and full fine-tuning). Checkpoints hold all of ``wrt``.
        save_result: ``(model, out_dir) -> path`` writing what the finished run keeps; by
            default ``codebooks.safetensors`` (codebooks only).
        put_batch: numpy batch -> device arrays; the default puts them on the default
            device. Pass e.g. ``lambda b: jax.device_put(b, sharding)`` for data parallelism
            (batches are ``[B, T]``, or ``[A, B, T]`` with ``grad_accum = A > 1``).
        loss_fn: ``(model, batch, loss_inputs) -> (sum, count)`` minimised in training and
            reported by validation (``val_loss``); next-token NLL by default (see
            `sketchtune_jax.train.step.next_token_nll`). Static: a function or a hashable object.
        loss_inputs: a pytree of arrays ``loss_fn`` reads and nothing trains (e.g. a frozen
            teacher's state); passed to every step, never donated nor checkpointed.

    With ``config.scan_layers`` the model's decoder layers are stacked from construction
    until `run` returns (`sketchtune_jax.models.scan.stack_layers`); the optimizer's
    state stays stacked.
    """

    def __init__(
        self,
        model: nnx.Module,
        train_batches: Any,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        val_batches: Any | None = None,
        progress: bool = True,
        wrt: Any = Codebook,
        put_batch: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]] | None = None,
        save_result: Callable[[nnx.Module, str], str] | None = None,
        loss_fn: LossFn = next_token_nll,
        loss_inputs: Any = None,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.loss_inputs = loss_inputs
        self.wrt = wrt
        self.save_result = save_result or _save_codebooks
        self.put_batch = put_batch or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})
        self.config = config
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.train_batches = as_batch_source(train_batches)
        source_seed = getattr(self.train_batches, "seed", None)
        if source_seed is not None and source_seed != config.seed:
            warnings.warn(
                f"the batches were shuffled with seed {source_seed} but config.seed is {config.seed}; "
                "resume checks config.seed only, so keep them equal"
            )
        self.val_batches = None if val_batches is None else as_batch_source(val_batches)
        self.progress = progress
        self.total_steps = self._total_steps()
        config.check_warmup(self.total_steps)
        os.makedirs(self.out_dir, exist_ok=True)
        self.log_path = os.path.join(self.out_dir, "train_log.jsonl")
        self.log = MetricsLog(self.log_path)
        self.total_steps = self._total_steps()
        self._prepare_model()
        self.optimizer = shard_optimizer_state(nnx.Optimizer(model, make_optimizer(config, self.total_steps), wrt=wrt))
        self.step = 0
        self.position = DataPosition()
        self.last_good_step: int | None = None
        self.checkpoints = Checkpoints(os.path.join(self.out_dir, "checkpoints"), keep=config.keep_checkpoints)

    # ------------------------------------------------------------------ setup

    def _total_steps(self) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        per_epoch = math.ceil(self.train_batches.num_batches / self.config.grad_accum)
        return self.config.epochs * per_epoch

    def _prepare_model(self) -> None:
        cfg = self.config
        if trainable := cfg.dtype("codebook_dtype"):
            for var in flat_state(nnx.state(self.model, Codebook)).values():
                if var.dtype != trainable:
                    var.set_value(var[...].astype(trainable))
        modules = [m for _, m in nnx.iter_graph(self.model) if isinstance(m, nnx.Module)]
        if cfg.remat != "none":
            if not any(hasattr(m, "remat") for m in modules):
                raise ValueError(
                    f"config.remat={cfg.remat!r} but no module of the model has a `remat` attribute to set"
                )
            self.model.set_attributes(remat=cfg.remat, raise_if_not_found=False)
        if compute := cfg.dtype("compute_dtype"):
            if not any(hasattr(m, "dtype") for m in modules):
                warnings.warn("config.compute_dtype is set but no module of the model has a `dtype` attribute")
            self.model.set_attributes(dtype=compute, raise_if_not_found=False)
        if not flat_state(nnx.state(self.model, self.wrt)):
            raise ValueError(f"the model has no variables matching {self.wrt!r}: nothing to fine-tune")
        self._stacked_here = False
        if cfg.scan_layers:
            try:
                if not is_stacked(self.model):
                    stack_layers(self.model)
                    self._stacked_here = True
            except ValueError as e:
                warnings.warn(f"config.scan_layers: {e}; training the layers unstacked (compile time grows with depth)")

    def _unstack_layers(self) -> None:
        # Hand the model back as it came: layers stacked for the run become a list again.
        if self._stacked_here:
            unstack_layers(self.model)
            self._stacked_here = False

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Checkpoint the current step (atomic)."""
        meta = {
            "step": self.step,
            "data_position": self.position.to_dict(),
            "config": self.config.to_dict(),
            "total_steps": self.total_steps,
        }
        self.checkpoints.save(self.step, saved_parts(self.model, self.optimizer, self.wrt), meta)
        self.last_good_step = self.step

    def restore(self) -> int | None:
        """Load the latest checkpoint in ``out_dir`` if there is one; return its step."""
        meta = self.checkpoints.restore(saved_parts(self.model, self.optimizer, self.wrt), self.config)
        if meta is None:
            return None
        self.step = int(meta["step"])
        self.position = DataPosition.from_dict(meta["data_position"])
        self.last_good_step = self.step
        return self.step

    # ------------------------------------------------------------------ loop

    def _groups(self) -> Iterator[tuple[DataPosition, DataPosition, dict[str, np.ndarray], int]]:
        """Yield (first position, next position, stacked batch, real tokens) per optimizer step."""
        epochs = None if self.config.max_steps > 0 else self.config.epochs
        it = self.train_batches.iterate(self.position, epochs=epochs)
        n = self.train_batches.num_batches
        while True:
            group = []
            for pos, batch in it:
                group.append((pos, batch))
                if len(group) == self.config.grad_accum:
                    break
            if not group:
                return
            first, last = group[0][0], group[-1][0]
            nxt = DataPosition(last.epoch, last.index + 1) if last.index + 1 < n else DataPosition(last.epoch + 1, 0)
            batches = [b for _, b in group]
            real = int(sum(np.sum(b["attention_mask"]) for b in batches))
            yield first, nxt, stack_micro_batches(batches), real

    def evaluate(self) -> float | None:
        """Token-weighted mean validation loss (None without validation batches)."""
        if self.val_batches is None:
            return None
        nll, tokens = 0.0, 0.0
        for _, batch in self.val_batches.iterate(DataPosition(), epochs=1):
            out = eval_step(self.model, self.put_batch(batch), loss_fn=self.loss_fn, loss_inputs=self.loss_inputs)
            nll += float(out["nll_sum"])
            tokens += float(out["tokens"])
        return nll / max(tokens, 1.0)

    def _check(self, step: int, position: DataPosition, metrics: dict[str, jax.Array]) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # A non-finite gradient norm means this step's update already poisoned the
        # codebooks even if its loss (computed before the update) was finite.
        bad = [
            f"{name} is {values[key]}"
            for key, name in (("loss", "loss"), ("grad_norm", "gradient norm"))
            if not math.isfinite(values[key])
        ]
        if bad:
            good = (
                f"the last good checkpoint is step {self.last_good_step} in {self.checkpoints.directory}"
                if self.last_good_step is not None
                else "no checkpoint was saved yet"
            )
            raise NonFiniteLossError(
                f"{' and '.join(bad)} at step {step} (batch: epoch {position.epoch}, index {position.index}); "
                f"training stopped, {good}. The model in memory holds the bad update: reload it from a checkpoint.",
                step,
                position,
            )
        return values

    def run(self) -> TrainResult:
        """Train to ``total_steps`` (resuming from ``out_dir`` if possible) and write the outputs."""
        from tqdm.auto import tqdm

        try:
            resumed_from = self.restore()
        except BaseException:
            self._unstack_layers()
            raise
        self.log.truncate_after(self.step)
        earlier_seconds = self.log.elapsed_seconds()
        run_start = time.perf_counter()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.progress and is_primary()),
            desc="fine-tune",
            unit="step",
            dynamic_ncols=True,
        )
        last_loss = val_loss = None
        pending: tuple[int, DataPosition, dict[str, jax.Array], int, float] | None = None
        t_last = time.perf_counter()
        tokens_since = 0

        def resolve(p):
            nonlocal last_loss, t_last, tokens_since
            step, pos, metrics, real, lr = p
            values = self._check(step, pos, metrics)
            last_loss = values["loss"]
            tokens_since += real
            if step % self.config.log_every == 0 or step == self.total_steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "epoch": pos.epoch,
                    "loss": values["loss"],
                    "lr": lr,
                    "grad_norm": values["grad_norm"],
                    "loss_tokens": int(values["tokens"]),
                    "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                    "elapsed_s": earlier_seconds + now - run_start,
                }
                self.log.append(record)
                t_last, tokens_since = now, 0
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

        # Split once and carry the mutable state through the loop; the model is
        # brought up to date only when something reads it (eval, save, the end).
        # The step donates ``mutable``: only the latest one is ever read.
        graphdef, mutable, frozen = split_for_step(self.model, self.optimizer)

        def sync():
            if mutable is not None:
                nnx.update((self.model, self.optimizer), mutable)

        def finish():
            # After this the model is final and may change shape (unstacked layers), so the
            # split state above no longer describes it.
            nonlocal mutable
            sync()
            mutable = None
            self._unstack_layers()

        try:
            groups = self._groups()
            # Processes of a run start the first step together: its collectives wait 30 s at most.
            barrier("fine-tune: first step")
            while self.step < self.total_steps:
                try:
                    first, nxt, batch, real = next(groups)
                except StopIteration:
                    break
                lr = host_learning_rate(self.config, self.total_steps, self.step)
                mutable, metrics = pure_train_step(
                    graphdef, mutable, frozen, self.put_batch(batch), self.loss_inputs, loss_fn=self.loss_fn
                )
                self.step += 1
                self.position = nxt
                # Check the previous step while this one runs, so the host does not stall the device.
                if pending is not None:
                    resolve(pending)
                pending = (self.step, first, metrics, real, lr)
                at_save = self.config.save_every and self.step % self.config.save_every == 0
                at_eval = self.config.eval_every and self.step % self.config.eval_every == 0
                if at_save or at_eval or self.step == self.total_steps:
                    resolve(pending)
                    pending = None
                if at_eval or at_save:
                    sync()
                if at_eval and self.val_batches is not None:
                    val_loss = self.evaluate()
                    self.log.append({"step": self.step, "val_loss": val_loss})
                if at_save:
                    self.save()
            if pending is not None:
                resolve(pending)
                pending = None
            sync()
            if self.val_batches is not None and not (
                self.config.eval_every and self.step % self.config.eval_every == 0
            ):
                val_loss = self.evaluate()
                self.log.append({"step": self.step, "val_loss": val_loss})
            if self.last_good_step != self.step:
                self.save()
            self.checkpoints.wait_until_finished()
            finish()
            result_path = self.save_result(self.model, self.out_dir)
            if is_primary():
                plot_loss_curve(self.log_path, os.path.join(self.out_dir, "loss_curve.png"))
        finally:
            finish()
            bar.close()
            self.checkpoints.close()
        return TrainResult(
            step=self.step,
            loss=last_loss,
            val_loss=val_loss,
            out_dir=self.out_dir,
            result_path=result_path,
            log_path=self.log_path,
            resumed_from=resumed_from,
            earlier_seconds=earlier_seconds,
        )


def finetune(
    model: nnx.Module,
    train_batches: Any,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    val_batches: Any | None = None,
    progress: bool = True,
    wrt: Any = Codebook,
    put_batch: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]] | None = None,
    save_result: Callable[[nnx.Module, str], str] | None = None,
) -> TrainResult:
    """Fine-tune ``model``'s ``wrt`` variables (codebooks by default) in place; resumes from
    ``out_dir`` when a checkpoint is there. See `Trainer` for the arguments.

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (names the step and batch; the
            NaN state is not saved).
    """
    return Trainer(
        model,
        train_batches,
        config,
        out_dir,
        val_batches=val_batches,
        progress=progress,
        wrt=wrt,
        put_batch=put_batch,
        save_result=save_result,
    ).run()


def _save_codebooks(model: nnx.Module, out_dir: str) -> str:
    path = os.path.join(out_dir, "codebooks.safetensors")
    save_codebooks(model, path)
    return path


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "finetune"]
