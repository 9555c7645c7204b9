"""Sketch a whole model, decoder layer by decoder layer (Algorithm 1 of the paper, per projection).

For each decoder layer, in order: run the layer on the calibration hidden states
with probes that accumulate ``H = 2 X Xᵀ / n`` of the input of each stage (q/k/v,
o, gate/up, down; the modules of one stage share their input and so one Hessian),
sketch every projection with its stage's H, swap in `SketchedLinear`, and run the
layer again, so the next layer is calibrated on sketched outputs. With
``true_sequential`` the stages are measured one after another instead, each after
the ones before it are sketched (four passes instead of one). Each finished layer is saved, so a killed run
started again with the same command resumes and ends with the same result.

On a device mesh (``mesh=``) the calibration samples are split over its ``data`` axis,
so each device runs the layer on its own samples and the Hessians are summed over them
by the compiler (an all-reduce), and every stage's rows are split over all its devices
(`sketch_matrix` under `jax.shard_map`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels import SUPPORTED_BITS
from sketchtune_jax._utils.fileio import atomic_write_bytes, check_output_dir, write_json_atomic
from sketchtune_jax._utils.module_paths import get_submodule, set_submodule
from sketchtune_jax._utils.reporting import progress
from sketchtune_jax.layers import Linear, SketchedLinear
from sketchtune_jax.models import DecoderLayer, ModelConfig
from sketchtune_jax.parallel.sharding import mesh_spec
from sketchtune_jax.settings import (
    Advice,
    OutputExistsError,
    SettingError,
    fraction_range,
    require,
    require_positive,
    setting,
    show_fraction_range,
)
from sketchtune_jax.sketch.layer_tune import tune_layer_codebooks
from sketchtune_jax.sketch.matrix import (
    accumulate_hessian,
    check_finite,
    init_hessian,
    relative_output_error,
    sketch_weight,
)

_NOT_FINITE_HINT = "check the checkpoint's weights and the dtype (float32 if a half dtype overflows)"
# The mesh axis the calibration samples are split over; rows split over every axis.
DATA_AXIS = "data"
# Layer-tuning steps recommended below 4 bits (docs/recipes.md).
RECOMMENDED_LAYER_TUNE_STEPS = 32


@dataclass(frozen=True)
class SketchSettings:
    """Everything that decides the result of a sketch; a resumed run must have the same.

    ``hessian_exponent`` is the paper's ``s``: k-means weighs each column by ``diag(H⁻¹)^-s``.
    ``calib`` and ``calib_range`` record which text (and which fraction of it) calibrated the sketch.
    ``layer_tune_steps`` > 0 trains each sketched layer's codebooks to the dense layer's output on the
    calibration rows (`sketchtune_jax.sketch.layer_tune`): that many Adam steps of ``layer_tune_rows``
    rows each, cosine-decayed from ``layer_tune_lr``.
    ``act_order`` sweeps each column group's columns by descending ``H_ii`` (`act_order_within_groups`);
    the groups, and so the sketch's size and layout, stay as they are. ``calib_range`` may be given
    as ``"START:END"`` text; it is kept as a pair of floats.
    """

    bits: int = setting(4, "bits per code: 2, 3 or 4")
    groups_per_row: int = setting(4, "codebooks per row (a divisor of the input widths)")
    hessian_exponent: float = setting(
        3.0, "exponent s of the Hessian weights diag(H^-1)^-s in k-means", aliases=("--s",)
    )
    percdamp: float = setting(0.01, "damping as a fraction of mean(diag H)")
    block_size: int = setting(128, "columns per error-feedback block")
    kmeans_iters: int = setting(100, "k-means iterations")
    kmeans_restarts: int = setting(1, "k-means++ restarts; the best fit is kept")
    refit_codebook: bool = setting(False, "re-fit codebooks by least squares after the sweep")
    act_order: bool = setting(
        False, "sweep each group's columns by descending Hessian diagonal (same groups, same size)"
    )
    error_feedback: bool = setting(True, "map weights with error feedback (--no-error-feedback: the ablation)")
    true_sequential: bool = setting(False, "measure each stage's Hessian after the stages before it are sketched")
    layer_tune_steps: int = setting(
        0,
        "then train each sketched layer's codebooks for N Adam steps to the dense layer's output "
        f"(0: no; {RECOMMENDED_LAYER_TUNE_STEPS} recommended below 4 bits, docs/recipes.md)",
    )
    layer_tune_lr: float = setting(1e-3, "peak learning rate of the layer tuning")
    layer_tune_rows: int = setting(4, "calibration windows per layer-tuning step")
    seed: int = setting(0, "seed of the calibration sample and k-means")
    calib: str = setting("", "text/JSON/JSONL file, hf:NAME[:CONFIG]:SPLIT, or 'self'")
    nsamples: int = setting(128, "calibration windows")
    seq_len: int = setting(2048, "tokens per calibration window")
    calib_range: tuple[float, float] = setting(
        (0.0, 1.0),
        "use only this fraction of a calibration text, e.g. 0.5:1 to hold out the first half",
        show=show_fraction_range,
    )

    def __post_init__(self):
        require(
            self.bits in SUPPORTED_BITS,
            "bits",
            f"must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}",
        )
        require_positive(
            self, "groups_per_row", "block_size", "kmeans_iters", "kmeans_restarts", "nsamples", "layer_tune_rows"
        )
        require_positive(self, "layer_tune_lr", finite=True)
        require(self.layer_tune_steps >= 0, "layer_tune_steps", f"must be >= 0, got {self.layer_tune_steps}")
        require_positive(self, "percdamp", finite=True)
        require(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        require(
            math.isfinite(self.hessian_exponent) and self.hessian_exponent >= 0,
            "hessian_exponent",
            f"must be a finite number >= 0, got {self.hessian_exponent}",
        )
        object.__setattr__(self, "calib_range", fraction_range(self.calib_range, "calib_range"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SketchSettings:
        """Settings as saved in ``sketch_config.json`` (older files name ``hessian_exponent`` ``s``)."""
        d = dict(d)
        if "s" in d:
            d.setdefault("hessian_exponent", d.pop("s"))
        if "calib_range" in d:
            d["calib_range"] = tuple(d["calib_range"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def recovery_hint(self, heal_steps: int = 0) -> Advice | None:
        """Below 4 bits, the levers left off that recover much of the loss to the dense model (layer
        tuning; act-order at 2 bits; a heal of ``heal_steps`` after the sketch, named ``heal_steps``,
        when another lever is off too); None when there is nothing to suggest."""
        levers = [] if self.layer_tune_steps else [f"{{layer_tune_steps}} {RECOMMENDED_LAYER_TUNE_STEPS}"]
        # act-order won every held-out comparison at 2 bits (README), by less than the noise at 3.
        levers += ["{act_order}"] if self.bits == 2 and not self.act_order else []
        if self.bits >= 4 or not levers:
            return None
        levers += [] if heal_steps else ["{heal_steps}"]
        return Advice(
            f"at {self.bits} bits, {', '.join(levers)} recover much of the loss to the dense model; "
            "see docs/recipes.md",
            ("layer_tune_steps", "act_order", "heal_steps"),
        )

    def validate(self, config) -> None:
        """Reject settings that cannot work for ``config`` before any work is done."""
        widths = {config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim}
        bad = sorted(w for w in widths if w % self.groups_per_row)
        if bad:
            raise SettingError(
                "groups_per_row",
                f"{self.groups_per_row} does not divide the input width(s) {bad} of this model; "
                f"pick a divisor of {sorted(widths)}",
            )


class HessianStat(nnx.Variable):
    """Running Hessian statistics of a probe (not a parameter)."""


class HessianProbe(nnx.Module):
    """Passes its input through ``inner`` and accumulates ``H = 2 X Xᵀ / n`` of it."""

    def __init__(self, inner: nnx.Module, in_features: int):
        self.inner = inner
        h, n = init_hessian(in_features)
        self.hessian = HessianStat(h)
        self.count = HessianStat(n)

    def __call__(self, x: jax.Array) -> jax.Array:
        self.hessian[...], self.count[...] = accumulate_hessian(self.hessian[...], self.count[...], x)
        return self.inner(x)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _run_layer(
    graphdef: nnx.GraphDef,
    stats: nnx.State,
    rest: nnx.State,
    hidden: jax.Array,
    start: jax.Array,
    shards: int,
    size: int,
) -> tuple[jax.Array, nnx.State]:
    # hidden [N, T, D] is split by samples into `shards` blocks (one per data device);
    # the micro-batch takes `size` samples from each block, so no sample changes device.
    n, t, d = hidden.shape
    blocks = hidden.reshape(shards, n // shards, t, d)
    chunk = lax.dynamic_slice_in_dim(blocks, start, size, axis=1).reshape(shards * size, t, d)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (shards * size, t))
    # Only the probe statistics go out again: the layer's weights are inputs only.
    layer = nnx.merge(graphdef, stats, rest)
    out = layer(chunk, positions=positions, attention_mask=None)
    return out, nnx.state(layer, HessianStat)


@functools.partial(jax.jit, static_argnums=1)
def _join_blocks(outs: list[jax.Array], shards: int) -> jax.Array:
    # The inverse of the micro-batching in `_run_layer`: each block's samples back in order.
    blocks = [o.reshape(shards, -1, *o.shape[1:]) for o in outs]
    return jnp.concatenate(blocks, axis=1).reshape(-1, *outs[0].shape[1:])


def _forward_layer(layer: nnx.Module, hidden: jax.Array, batch_size: int, shards: int = 1) -> jax.Array:
    """Run ``layer`` over all calibration rows in micro-batches: ``[N, T, D]`` -> ``[N, T, D]``.

    ``hidden`` is split by samples into ``shards`` equal blocks (the data devices of a
    mesh, 1 on one device); each micro-batch takes ``batch_size // shards`` (at least 1)
    samples from every block. Probes inside ``layer`` (if any) accumulate the inputs they see.
    """
    per_block = hidden.shape[0] // shards
    size = max(1, batch_size // shards)
    graphdef, stats, rest = nnx.split(layer, HessianStat, ...)
    outs = []
    for lo in range(0, per_block, size):
        out, stats = _run_layer(graphdef, stats, rest, hidden, jnp.int32(lo), shards, min(size, per_block - lo))
        outs.append(out)
    nnx.update(layer, stats)
    return _join_blocks(outs, shards)


def _stage_hessians(
    layer: nnx.Module, stages: tuple[tuple[str, ...], ...], hidden: jax.Array, batch_size: int, shards: int
) -> dict[tuple[str, ...], jax.Array]:
    """One pass of ``layer`` over the calibration rows with a probe on the first module of each stage."""
    probes = {}
    for stage in stages:
        inner = get_submodule(layer, stage[0])
        probes[stage] = HessianProbe(inner, inner.in_features)
        set_submodule(layer, stage[0], probes[stage])
    try:
        _forward_layer(layer, hidden, batch_size, shards)
    finally:
        for stage, probe in probes.items():
            set_submodule(layer, stage[0], probe.inner)
    return {stage: probe.hessian[...] for stage, probe in probes.items()}


def _sketch_stage(
    layer: nnx.Module,
    stage: tuple[str, ...],
    hessian: jax.Array,
    settings: SketchSettings,
    seed: int,
    mesh: Mesh | None,
) -> list[dict[str, Any]]:
    """Sketch the projections of one stage (one shared input, so one H) and swap them in.

    Rows are independent problems, so the stage's weights are stacked by rows and
    sketched in one call: one Cholesky and one compiled program per stage.
    """
    start = time.perf_counter()
    linears = [get_submodule(layer, name) for name in stage]
    for name, linear in zip(stage, linears):
        if not isinstance(linear, Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, expected a dense Linear to sketch")
    weights = [linear.weight[...].astype(jnp.float32) for linear in linears]
    try:
        result = sketch_weight(
            jnp.concatenate(weights, axis=0),
            hessian,
            bits=settings.bits,
            groups=settings.groups_per_row,
            percdamp=settings.percdamp,
            act_order=settings.act_order,
            s=settings.hessian_exponent,
            block_size=settings.block_size,
            kmeans_iters=settings.kmeans_iters,
            kmeans_restarts=settings.kmeans_restarts,
            seed=seed,
            error_feedback=settings.error_feedback,
            refit_codebook=settings.refit_codebook,
            mesh=mesh,
        )
    except ValueError as e:
        raise ValueError(f"{'/'.join(stage)}: {e}") from e
    seconds = (time.perf_counter() - start) / len(stage)
    rows, lo = [], 0
    for name, linear, w in zip(stage, linears, weights):
        hi = lo + w.shape[0]
        error = float(relative_output_error(w, result.w_hat[lo:hi], hessian))
        set_submodule(layer, name, SketchedLinear.from_linear(linear, result.codebook[lo:hi], result.codes[lo:hi]))
        rows.append({"module": name, "shape": list(w.shape), "rel_output_error": error, "seconds": seconds})
        lo = hi
    return rows


def _sketch_layer(
    layer: nnx.Module, hidden: jax.Array, settings: SketchSettings, batch_size: int, seed: int, mesh: Mesh | None
) -> list[dict[str, Any]]:
    """Sketch every projection of one decoder layer in place; one report row per module.

    With ``true_sequential`` each stage's Hessian is measured after the stages before
    it are sketched (one pass per stage); otherwise one pass measures them all.
    """
    stages = layer.sketch_stages()
    passes = tuple((stage,) for stage in stages) if settings.true_sequential else (stages,)
    rows = []
    for stages in passes:
        hessians = _stage_hessians(layer, stages, hidden, batch_size, data_shards(mesh))
        for stage in stages:
            rows += _sketch_stage(layer, stage, hessians[stage], settings, seed + len(rows), mesh)
    return rows


def sketch_model(
    model: nnx.Module,
    calib_ids: np.ndarray,
    settings: SketchSettings,
    *,
    work_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    on_layer_done: Callable[[int], None] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Sketch every decoder-layer projection of ``model`` in place; returns the report.

    ``calib_ids``: int32 ``[nsamples, seq_len]``; the report's settings record that shape (whatever
    ``settings.nsamples`` and ``seq_len`` say). With ``work_dir``, each finished layer
    is saved there and a later call with the same settings resumes from it; the report's
    ``seconds`` then adds the time the resumed layers took when they were made (``resumed_layers``
    counts them), so it is the sketch's time however often it was stopped.
    ``on_layer_done(index)`` is called after each decoder layer is finished (and saved).
    With ``mesh`` the work is split over its devices (see `check_sketch_mesh`) and the
    model ends up on it (`sketchtune_jax.parallel.sharding.shard_model` then lays it out for fine-tuning).
    """
    settings.validate(model.config)
    calib_ids = check_calibration_ids(calib_ids)
    settings = calibrated_settings(settings, calib_ids)
    if mesh is not None:
        check_sketch_mesh(mesh, model.config, calib_ids.shape[0])
        nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
    resume = ResumeDir(work_dir, settings, calib_ids) if work_dir is not None else None
    layers = model.model.layers
    return sketch_layers(
        model.model.embed_tokens,
        len(layers),
        lambda index: layers[index],
        calib_ids,
        settings,
        resume=resume,
        batch_size=batch_size,
        show_progress=show_progress,
        on_layer_done=on_layer_done,
        mesh=mesh,
    )


def data_shards(mesh: Mesh | None) -> int:
    """How many blocks the calibration samples are split into on ``mesh`` (its `DATA_AXIS` size)."""
    return 1 if mesh is None else mesh.shape.get(DATA_AXIS, 1)


def check_sketch_mesh(mesh: Mesh, config: ModelConfig | None, nsamples: int) -> None:
    """Reject a ``mesh`` the sketch of a model of ``config`` cannot be split over, before any work.

    The ``nsamples`` calibration samples are split over the mesh's ``data`` axis, so it
    must divide them; the rows of every stage (q/k/v together, o, gate/up together, down)
    are split over all its devices, so their number must divide each stage's rows (not
    checked with ``config`` None). Raises `SettingError` (field ``mesh``).
    """
    spec = mesh_spec(mesh)
    data = data_shards(mesh)
    if nsamples % data:
        raise SettingError(
            "mesh",
            f"{spec} splits the calibration samples over its {data} data devices, but there are {nsamples}; "
            f"make {{nsamples}} a multiple of {data} or the data axis smaller",
            ("nsamples",),
        )
    if config is None:
        return
    layer = nnx.eval_shape(lambda: DecoderLayer(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    rows = {
        "/".join(stage): sum(get_submodule(layer, name).out_features for name in stage)
        for stage in layer.sketch_stages()
    }
    bad = {stage: n for stage, n in rows.items() if n % mesh.size}
    if bad:
        stage, n = next(iter(bad.items()))
        raise SettingError(
            "mesh",
            f"{spec} splits every projection's rows over its {mesh.size} devices, but {stage} has {n} rows; "
            f"use a mesh whose device count divides {math.gcd(*rows.values())}",
        )


def check_calibration_ids(calib_ids: np.ndarray) -> np.ndarray:
    """``calib_ids`` as int32 ``[nsamples, seq_len]``, or a one-line error."""
    calib_ids = np.asarray(calib_ids, dtype=np.int32)
    if calib_ids.ndim != 2:
        raise ValueError(f"calibration ids must be [nsamples, seq_len], got shape {calib_ids.shape}")
    return calib_ids


def calibrated_settings(settings: SketchSettings, calib_ids: np.ndarray) -> SketchSettings:
    """``settings`` with the calibration ``calib_ids`` really is (``nsamples``, ``seq_len``), which a
    sketch records; windows made elsewhere need not match the settings' defaults."""
    nsamples, seq_len = calib_ids.shape
    return dataclasses.replace(settings, nsamples=int(nsamples), seq_len=int(seq_len))


def sketch_layers(
    embed: nnx.Module,
    num_layers: int,
    layer_at: Callable[[int], nnx.Module],
    calib_ids: np.ndarray,
    settings: SketchSettings,
    *,
    resume: ResumeDir | None,
    batch_size: int,
    show_progress: bool,
    on_layer_done: Callable[[int], None] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Sketch decoder layers ``layer_at(0) ... layer_at(num_layers - 1)`` in order, in place; returns the report.

    ``embed`` maps ``calib_ids`` to the first layer's input. ``layer_at(index)`` hands the dense
    layer; it is asked once, so it may build the layer there and then (the streaming sketcher
    reads it from the checkpoint) and the layer may be dropped once the next one is asked for.
    On a ``mesh`` (checked by the caller with `check_sketch_mesh`) each layer is replicated
    over it and the activations split by samples over its ``data`` axis.
    """
    hidden = embed(jnp.asarray(calib_ids)).astype(jnp.float32)
    check_finite(hidden, "the embeddings of the calibration tokens", _NOT_FINITE_HINT)
    if mesh is not None:
        split = PartitionSpec(DATA_AXIS) if DATA_AXIS in mesh.axis_names else PartitionSpec()
        hidden = jax.device_put(hidden, NamedSharding(mesh, split))
    tune = settings.layer_tune_steps > 0
    # Layer tuning aims each sketched layer at the dense model's own hidden states, so the
    # dense model runs alongside on the same rows.
    dense_hidden = hidden
    report: list[dict[str, Any]] = []
    start = time.perf_counter()
    resumed_seconds, resumed_layers = 0.0, 0
    for index in progress(range(num_layers), desc="sketching layers", disable=not show_progress):
        layer = layer_at(index)
        seed = settings.seed + 1000 * index
        if mesh is not None:
            _replicate(layer, mesh)
        if tune:
            dense_hidden = _forward_layer(layer, dense_hidden, batch_size, data_shards(mesh))
        done = resume.load_layer(index) if resume else None
        if done is not None:
            swap_in_sketches(layer, done[0])
            if mesh is not None:
                _replicate(layer, mesh)
            rows = done[1]
            resumed_seconds += rows[0].get("layer_seconds", 0.0)
            resumed_layers += 1
        else:
            layer_start = time.perf_counter()
            rows = [{"layer": index, **r} for r in _sketch_layer(layer, hidden, settings, batch_size, seed, mesh)]
            if tune:
                tuned = tune_layer_codebooks(
                    layer,
                    hidden,
                    dense_hidden,
                    steps=settings.layer_tune_steps,
                    lr=settings.layer_tune_lr,
                    batch_size=settings.layer_tune_rows,
                    seed=seed,
                )
                rows = [{**r, **tuned} for r in rows]
            # Kept with the layer, so that a resumed sketch still reports the time all its layers took.
            rows = [{**r, "layer_seconds": time.perf_counter() - layer_start} for r in rows]
            if resume:
                resume.save_layer(index, layer, rows)
        report += rows
        hidden = _forward_layer(layer, hidden, batch_size, data_shards(mesh))
        check_finite(hidden, f"the output of decoder layer {index}", _NOT_FINITE_HINT)
        del layer
        if on_layer_done is not None:
            on_layer_done(index)
    return {
        "settings": dataclasses.asdict(settings),
        "modules": report,
        "mean_rel_output_error": float(np.mean([r["rel_output_error"] for r in report])),
        **({"mean_layer_error_after_tuning": float(np.mean([r["layer_error_after"] for r in report]))} if tune else {}),
        "seconds": time.perf_counter() - start + resumed_seconds,
        "resumed_layers": resumed_layers,
    }


def _replicate(layer: nnx.Module, mesh: Mesh) -> None:
    nnx.update(layer, jax.device_put(nnx.state(layer), NamedSharding(mesh, PartitionSpec())))


def swap_in_sketches(layer: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    """Replace each projection of decoder ``layer`` by its sketch from ``<name>.codebook`` / ``<name>.codes``."""
    for name in layer.sketch_projections():
        linear = get_submodule(layer, name)
        set_submodule(
            layer, name, SketchedLinear.from_linear(linear, tensors[f"{name}.codebook"], tensors[f"{name}.codes"])
        )


class ResumeDir:
    """Per-layer results of an unfinished sketch, keyed to the settings and calibration data."""

    def __init__(self, path: str | os.PathLike, settings: SketchSettings, calib_ids: np.ndarray):
        self.path = Path(path)
        # Through JSON and back, so that it compares equal to what a previous run wrote.
        self.fingerprint = json.loads(
            json.dumps(
                {
                    "settings": dataclasses.asdict(settings),
                    "calib_sha": _sha(calib_ids.tobytes()),
                }
            )
        )
        meta = self.path / "settings.json"
        if meta.is_file():
            if json.loads(meta.read_text()) != self.fingerprint:
                raise OutputExistsError(
                    f"{self.path} holds an unfinished sketch made with other settings or calibration data; "
                    "delete it or set {overwrite} to start again",
                    ("overwrite",),
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(meta, self.fingerprint)

    @classmethod
    def existing(cls, path: str | os.PathLike) -> ResumeDir:
        """The finished layers in ``path``, to read back (its fingerprint is not checked)."""
        resume = cls.__new__(cls)
        resume.path = Path(path)
        return resume

    def _file(self, index: int) -> Path:
        return self.path / f"layer_{index:04d}.safetensors"

    def load_layer(self, index: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]] | None:
        import safetensors.numpy

        f = self._file(index)
        if not f.is_file():
            return None
        tensors = safetensors.numpy.load_file(str(f))
        rows = json.loads((self.path / f"layer_{index:04d}.json").read_text())
        return tensors, rows

    def save_layer(self, index: int, layer: nnx.Module, rows: list[dict[str, Any]]) -> None:
        import safetensors.numpy

        tensors = {}
        for name in layer.sketch_projections():
            m = get_submodule(layer, name)
            tensors[f"{name}.codebook"] = np.asarray(m.codebook[...], dtype=np.float32)
            tensors[f"{name}.codes"] = np.asarray(m.codes[...])
        # The report first, the tensors last: a layer counts as done only once its tensors exist.
        write_json_atomic(self.path / f"layer_{index:04d}.json", rows)
        atomic_write_bytes(self._file(index), safetensors.numpy.save(tensors))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def partial_dir_for(out_dir: str | os.PathLike) -> Path:
    """Where an unfinished sketch bound for ``out_dir`` keeps its finished layers."""
    out = Path(out_dir)
    return out.with_name(f"{out.name}.partial")


def prepare_sketch_output(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Check ``out_dir`` before any work: refuse a finished sketch there unless ``overwrite``."""
    partial = partial_dir_for(out_dir)
    if overwrite and partial.exists():
        shutil.rmtree(partial)
    check_output_dir(out_dir, overwrite=overwrite)
    return partial
