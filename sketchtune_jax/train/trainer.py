"""The fine-tuning loop: progress bar, JSONL log, Orbax checkpoints, exact resume, validation.

::

    from sketchtune_jax.data import build_batches
    from sketchtune_jax.train import TrainConfig, finetune

    train, val = build_batches("math_data.train.json", tokenizer, batch_size=8, seq_len=512, val_fraction=0.05)
    config = TrainConfig(lr=1e-4, epochs=1, warmup_steps=50, save_every=200, eval_every=200)
    result = finetune(model, train, config, "runs/math", val_batches=val)
    # Running the same command again resumes from runs/math/checkpoints (same batches, same result).

Files in ``out_dir``: ``train_log.jsonl`` (one object per step, plus ``val_loss``
records), ``checkpoints/<step>/`` (Orbax: codebooks, optimizer state, model RNG
state, step, data position, config), ``codebooks.safetensors`` (the final
codebooks, see `save_codebooks`), ``loss_curve.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sketchtune_jax.data import DataPosition
from sketchtune_jax.layers import Codebook
from sketchtune_jax.train.codebooks import flat_state, save_codebooks
from sketchtune_jax.train.config import TrainConfig
from sketchtune_jax.train.optim import host_learning_rate, make_optimizer
from sketchtune_jax.train.step import _pure_train_step, _split_for_step, eval_step

# Config fields that decide which rows form which step: a resume with other
# values would silently see different batches.
_RESUME_FIELDS = ("batch_size", "grad_accum", "seed", "seq_len")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``step`` and ``position`` name the offending batch."""

    def __init__(self, message: str, step: int, position: DataPosition):
        super().__init__(message)
        self.step = step
        self.position = position


class BatchSource(Protocol):
    """A resumable source of batches (`sketchtune_jax.data.BucketedBatches` is one)."""

    @property
    def num_batches(self) -> int: ...

    def iterate(
        self, start: DataPosition = ..., *, epochs: int | None = ...
    ) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]: ...


class SequenceBatches:
    """A fixed list of batches as a `BatchSource` (same order every epoch)."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]):
        if not batches:
            raise ValueError("no batches")
        self.batches = list(batches)

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def iterate(
        self, start: DataPosition = DataPosition(), *, epochs: int | None = None
    ) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]:
        epoch, index = start.epoch, start.index
        while epochs is None or epoch < epochs:
            for i in range(index, len(self.batches)):
                yield DataPosition(epoch, i), self.batches[i]
            epoch, index = epoch + 1, 0


def as_batch_source(batches: Any) -> BatchSource:
    if hasattr(batches, "iterate") and hasattr(batches, "num_batches"):
        return batches
    if isinstance(batches, Sequence):
        return SequenceBatches(batches)
    raise TypeError(
        "train_batches must be a BatchSource (e.g. data.BucketedBatches) or a list of batch dicts; "
        f"got {type(batches).__name__} (a one-shot iterator cannot be resumed)"
    )


def stack_micro_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack ``A`` batches of ``[B_i, T_i]`` into ``[A, max B, max T]`` int32.

    Filler rows get one attended token and no loss tokens, so they add nothing to
    the loss or gradients and never produce an all-masked attention row.
    """
    if len(batches) == 1:
        return {k: np.asarray(v, np.int32) for k, v in batches[0].items()}
    rows = max(b["input_ids"].shape[0] for b in batches)
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {k: np.zeros((len(batches), rows, length), np.int32) for k in batches[0]}
    for a, b in enumerate(batches):
        r, t = b["input_ids"].shape
        for k, v in b.items():
            out[k][a, :r, :t] = v
        if "attention_mask" in out:
            out["attention_mask"][a, r:, 0] = 1
    return out


@dataclasses.dataclass
class TrainResult:
    """What a run produced: final step, last logged loss, paths of its outputs."""

    step: int
    loss: float | None
    val_loss: float | None
    out_dir: str
    codebooks_path: str
    log_path: str
    resumed_from: int | None


def _key_to_data(x: Any) -> Any:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


class Trainer:
    """Fine-tunes the `Codebook` leaves of ``model`` in place; see the module docstring.

    Args:
        model: NNX causal LM, ``model(input_ids, *, attention_mask=...) -> (logits, cache)``.
        train_batches: a `BatchSource` or a list of batch dicts.
        config: `TrainConfig`.
        out_dir: where logs, checkpoints and outputs go; a run found there is resumed.
        val_batches: optional held-out batches; evaluated every ``config.eval_every`` steps and at the end.
        progress: show a tqdm progress bar with ETA.
        wrt: which variables train (an NNX filter); `Codebook` by default. The final
            ``codebooks.safetensors`` holds codebooks only; checkpoints hold all of ``wrt``.
        put_batch: numpy batch -> device arrays; the default puts them on the default
            device. Pass e.g. ``lambda b: jax.device_put(b, sharding)`` for data parallelism
            (batches are ``[B, T]``, or ``[A, B, T]`` with ``grad_accum = A > 1``).
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
    ):
        self.model = model
        self.wrt = wrt
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
        os.makedirs(self.out_dir, exist_ok=True)
        self.log_path = os.path.join(self.out_dir, "train_log.jsonl")
        self.codebooks_path = os.path.join(self.out_dir, "codebooks.safetensors")
        self.total_steps = self._total_steps()
        self._prepare_model()
        self.optimizer = nnx.Optimizer(model, make_optimizer(config, self.total_steps), wrt=wrt)
        self.step = 0
        self.position = DataPosition()
        self.last_good_step: int | None = None
        self.manager = ocp.CheckpointManager(
            os.path.join(self.out_dir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.keep_checkpoints, create=True, cleanup_tmp_directories=True
            ),
        )

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
        if not flat_state(nnx.state(self.model, Codebook)):
            raise ValueError("the model has no Codebook variables: nothing to fine-tune")

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self) -> dict[str, jax.Array]:
        state = {}
        for prefix, st in (
            ("params", nnx.state(self.model, self.wrt)),
            ("opt", nnx.state(self.optimizer)),
            ("rng", nnx.state(self.model, nnx.RngState)),
        ):
            for k, v in flat_state(st).items():
                state[f"{prefix}/{k}"] = _key_to_data(v[...])
        return state

    def save(self) -> None:
        """Checkpoint the current step (atomic; Orbax writes to a temp dir then renames)."""
        meta = {
            "step": self.step,
            "data_position": self.position.to_dict(),
            "config": self.config.to_dict(),
            "total_steps": self.total_steps,
        }
        self.manager.save(
            self.step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(self._checkpoint_state()), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.last_good_step = self.step

    def restore(self) -> int | None:
        """Load the latest checkpoint in ``out_dir`` if there is one; return its step."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = self._checkpoint_state()
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None)) for k, v in target.items()}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        saved_cfg = restored.meta["config"]
        changed = [f for f in _RESUME_FIELDS if saved_cfg.get(f) != getattr(self.config, f)]
        if changed:
            raise ValueError(
                f"cannot resume from {self.manager.directory}: {', '.join(changed)} differ from the checkpoint's "
                f"({', '.join(f'{f}={saved_cfg.get(f)}' for f in changed)}); use a new out_dir"
            )
        values = restored.state
        for prefix, st in (
            ("params", nnx.state(self.model, self.wrt)),
            ("opt", nnx.state(self.optimizer)),
            ("rng", nnx.state(self.model, nnx.RngState)),
        ):
            for k, var in flat_state(st).items():
                v = values[f"{prefix}/{k}"]
                if jnp.issubdtype(var.dtype, jax.dtypes.prng_key):
                    v = jax.random.wrap_key_data(v)
                var.set_value(v)
        self.step = int(restored.meta["step"])
        self.position = DataPosition.from_dict(restored.meta["data_position"])
        self.last_good_step = self.step
        return self.step

    # ------------------------------------------------------------------ logging

    def _truncate_log(self, step: int) -> None:
        # Steps logged after the checkpoint we resume from will be run again.
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.log_path, "w") as f:
            f.writelines(keep)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

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
            out = eval_step(self.model, self.put_batch(batch))
            nll += float(out["nll_sum"])
            tokens += float(out["tokens"])
        return nll / max(tokens, 1.0)

    def _check(self, step: int, position: DataPosition, metrics: dict[str, jax.Array]) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # A non-finite gradient norm means this step's update already poisoned the
        # codebooks even if its loss (computed before the update) was finite.
        bad = [f"{name} is {values[key]}" for key, name in (("loss", "loss"), ("grad_norm", "gradient norm"))
               if not math.isfinite(values[key])]
        if bad:
            good = (
                f"the last good checkpoint is step {self.last_good_step} in {self.manager.directory}"
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

        resumed_from = self.restore()
        self._truncate_log(self.step)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.progress,
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
                }
                self._log(record)
                t_last, tokens_since = now, 0
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

        # Split once and carry the mutable state through the loop; the model is
        # brought up to date only when something reads it (eval, save, the end).
        # The step donates ``mutable``: only the latest one is ever read.
        graphdef, mutable, frozen = _split_for_step(self.model, self.optimizer)

        def sync():
            nnx.update((self.model, self.optimizer), mutable)

        try:
            groups = self._groups()
            while self.step < self.total_steps:
                try:
                    first, nxt, batch, real = next(groups)
                except StopIteration:
                    break
                lr = host_learning_rate(self.config, self.total_steps, self.step)
                mutable, metrics = _pure_train_step(graphdef, mutable, frozen, self.put_batch(batch))
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
                    self._log({"step": self.step, "val_loss": val_loss})
                if at_save:
                    self.save()
            if pending is not None:
                resolve(pending)
                pending = None
            sync()
            if self.val_batches is not None and not (self.config.eval_every and self.step % self.config.eval_every == 0):
                val_loss = self.evaluate()
                self._log({"step": self.step, "val_loss": val_loss})
            if self.last_good_step != self.step:
                self.save()
            self.manager.wait_until_finished()
            save_codebooks(self.model, self.codebooks_path, metadata={"step": self.step})
            plot_loss_curve(self.log_path, os.path.join(self.out_dir, "loss_curve.png"))
        finally:
            sync()
            bar.close()
            self.manager.close()
        return TrainResult(
            step=self.step,
            loss=last_loss,
            val_loss=val_loss,
            out_dir=self.out_dir,
            codebooks_path=self.codebooks_path,
            log_path=self.log_path,
            resumed_from=resumed_from,
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
) -> TrainResult:
    """Fine-tune ``model``'s codebooks in place; resumes from ``out_dir`` when a checkpoint is there.

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (names the step and batch; the
            NaN state is not saved).
    """
    return Trainer(model, train_batches, config, out_dir, val_batches=val_batches, progress=progress, wrt=wrt,
                   put_batch=put_batch).run()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Training (and validation) loss against step, as a PNG."""
    import matplotlib

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


__all__ = [
    "BatchSource",
    "NonFiniteLossError",
    "SequenceBatches",
    "TrainResult",
    "Trainer",
    "finetune",
    "plot_loss_curve",
    "read_log",
    "stack_micro_batches",
]
