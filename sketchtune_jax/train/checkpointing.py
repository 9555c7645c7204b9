"""Orbax checkpoints of a fine-tuning run, driven by one table of what is saved.

A checkpoint ``checkpoints/<step>/`` holds ``state`` (a flat dict ``"<prefix>/<path>" -> array``
for every prefix of `saved_parts`) and ``meta`` (JSON: step, data position, config,
total steps). PRNG keys are stored as their raw key data. Arrays are restored in the
live model's layout (`restore_target`), so a run resumes on another mesh shape.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sketchtune_jax.io.codebooks import entry_value, layer_entries, set_entries

# Config fields that decide which rows form which step: a resume with other
# values would silently see different batches.
RESUME_FIELDS = ("batch_size", "grad_accum", "seed", "seq_len")


def saved_parts(model: nnx.Module, optimizer: nnx.Optimizer, wrt: Any) -> dict[str, nnx.State]:
    """What a checkpoint holds: prefix -> the live state it is read from and restored into."""
    return {
        "params": nnx.state(model, wrt),
        "opt": nnx.state(optimizer),
        "rng": nnx.state(model, nnx.RngState),
    }


def _key_to_data(x: Any) -> Any:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _flatten(parts: dict[str, nnx.State]) -> dict[str, jax.Array]:
    # Per-layer names even when the layers are stacked in memory: a run resumes either way.
    return {
        f"{prefix}/{k}": _key_to_data(entry_value(e))
        for prefix, st in parts.items()
        for k, e in layer_entries(st).items()
    }


def restore_target(values: dict[str, jax.Array]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays that place each restored value where the live one is now, so a
    checkpoint saved on any mesh (or one device) loads onto the current layout.

    A value not committed to a device (an optimizer's step count, made on the default
    device) is replicated over the mesh the others live on: committed to one device, it
    could not meet them in one step.
    """
    mesh = next((v.sharding.mesh for v in values.values() if isinstance(v.sharding, NamedSharding)), None)

    def sharding(v: jax.Array) -> jax.sharding.Sharding:
        if mesh is not None and not v.committed:
            return NamedSharding(mesh, PartitionSpec())
        return v.sharding

    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding(v)) for k, v in values.items()}


def check_resumable(saved_config: dict[str, Any], config: Any, directory: Any) -> None:
    """Raise ValueError when ``config`` differs from the checkpoint's in a field that fixes the data order."""
    changed = [f for f in RESUME_FIELDS if saved_config.get(f) != getattr(config, f)]
    if changed:
        raise ValueError(
            f"cannot resume from {directory}: {', '.join(changed)} differ from the checkpoint's "
            f"({', '.join(f'{f}={saved_config.get(f)}' for f in changed)}); use a new out_dir"
        )


class Checkpoints:
    """The ``checkpoints/`` directory of a run: save and restore the state of `saved_parts`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int):
        self.manager = ocp.CheckpointManager(
            os.fspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        )

    @property
    def directory(self) -> Any:
        return self.manager.directory

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, parts: dict[str, nnx.State], meta: dict[str, Any]) -> None:
        """Checkpoint ``parts`` and ``meta`` as ``step`` (atomic; Orbax writes to a temp dir then renames)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_flatten(parts)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, parts: dict[str, nnx.State], config: Any) -> dict[str, Any] | None:
        """Load the latest checkpoint into ``parts`` in place and return its meta (None if there is none).

        Raises ValueError, before changing anything, when ``config`` cannot resume it (`RESUME_FIELDS`).
        """
        step = self.latest_step()
        if step is None:
            return None
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(restore_target(_flatten(parts))), meta=ocp.args.JsonRestore()
            ),
        )
        check_resumable(restored.meta["config"], config, self.directory)
        for prefix, st in parts.items():
            entries = layer_entries(st)
            values = {}
            for k, (var, _) in entries.items():
                v = restored.state[f"{prefix}/{k}"]
                if jnp.issubdtype(var.dtype, jax.dtypes.prng_key):
                    v = jax.random.wrap_key_data(v)
                values[k] = v
            set_entries(entries, values)
        return restored.meta

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
