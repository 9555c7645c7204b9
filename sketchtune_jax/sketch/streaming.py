"""Sketch a checkpoint read one decoder layer at a time, never holding the dense model.

Host memory holds the current decoder layer, the calibration activations and, while
the activations are first computed, the embeddings. Each finished layer goes to the
resume directory as the in-memory sketcher writes it; `assemble_sketch` then streams
the sketched checkpoint out of the resume directory and the source, one tensor at a time.
Same settings and calibration give the same codes and codebooks as `sketch_model`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sketchtune_jax._utils.module_paths import get_submodule, set_submodule
from sketchtune_jax.io.sketched_dir import sketched_modules, write_sketched_dir
from sketchtune_jax.layers import SketchedLinear
from sketchtune_jax.models.llama import DecoderLayer, Embedding
from sketchtune_jax.sketch.driver import (
    ResumeDir,
    SketchSettings,
    calibrated_settings,
    check_calibration_ids,
    check_sketch_mesh,
    sketch_layers,
    swap_in_sketches,
)

if TYPE_CHECKING:
    from converters import TensorSource

LAYER_PREFIX = "model.layers."


def sketch_streaming(
    tensors: TensorSource,
    calib_ids: np.ndarray,
    settings: SketchSettings,
    *,
    work_dir: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    batch_size: int = 8,
    show_progress: bool = True,
    on_layer_done: Callable[[int], None] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Sketch every decoder layer of the checkpoint ``tensors``, each read when its turn comes; returns the report.

    ``calib_ids``: int32 ``[nsamples, seq_len]``. Finished layers are written to ``work_dir``
    (and a run with the same settings resumes from it, on any mesh or none); `assemble_sketch`
    makes the checkpoint. With ``mesh`` the work is split over its devices (`check_sketch_mesh`).
    """
    # converters imports this package, so it is imported when first used.
    from converters import abstract_model, check_names, fill_params, iter_params

    config = tensors.config
    settings.validate(config)
    check_names(
        dict(iter_params(abstract_model(config, dtype, param_dtype))), tensors.names(), tensors.where, tensors.ignorable
    )
    calib_ids = check_calibration_ids(calib_ids)
    settings = calibrated_settings(settings, calib_ids)
    if mesh is not None:
        check_sketch_mesh(mesh, config, calib_ids.shape[0])
    resume = ResumeDir(work_dir, settings, calib_ids)
    embed = nnx.eval_shape(
        lambda: Embedding(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    fill_params(embed, "model.embed_tokens.", tensors)
    tensors.release()
    return sketch_layers(
        embed,
        config.num_hidden_layers,
        lambda index: _dense_layer(tensors, index, dtype, param_dtype),
        calib_ids,
        settings,
        resume=resume,
        batch_size=batch_size,
        show_progress=show_progress,
        on_layer_done=on_layer_done,
        mesh=mesh,
    )


def assemble_sketch(
    tensors: TensorSource,
    work_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: SketchSettings,
    *,
    report: dict[str, Any],
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    overwrite: bool = False,
) -> None:
    """Write the sketched checkpoint of ``tensors`` from the finished layers in ``work_dir``, layer by layer.

    The result is the directory `save_sketched` writes for the same model sketched in memory.
    """
    from converters import abstract_model

    config = tensors.config
    resume_layers = ResumeDir.existing(work_dir)
    globals_ = [
        (name, var)
        for name, var in _flat(abstract_model(config, dtype, param_dtype))
        if not name.startswith(LAYER_PREFIX)
    ]
    layer = _abstract_sketched_layer(config, dtype, param_dtype, settings)
    layer_specs = [(name, _spec(var)) for name, var in _flat(layer)]
    specs = {name: _spec(var) for name, var in globals_}
    modules = {}
    for index in range(config.num_hidden_layers):
        specs.update({f"{LAYER_PREFIX}{index}.{name}": spec for name, spec in layer_specs})
        modules.update({f"{LAYER_PREFIX}{index}.{name}": m for name, m in sketched_modules(layer).items()})

    def arrays() -> Iterator[tuple[str, Any]]:
        for name, var in globals_:
            yield name, jnp.asarray(tensors.get(name), dtype=var.dtype)
            tensors.release()
        for index in range(config.num_hidden_layers):
            done = resume_layers.load_layer(index)
            if done is None:
                raise ValueError(f"{work_dir} has no finished layer {index}; run the sketch to the end first")
            finished = _dense_layer(tensors, index, dtype, param_dtype)
            swap_in_sketches(finished, done[0])
            for name, var in _flat(finished):
                yield f"{LAYER_PREFIX}{index}.{name}", var[...]

    write_sketched_dir(
        out_dir,
        config,
        tensors.tokenizer,
        modules,
        specs,
        arrays(),
        # The report's settings record the calibration the layers really saw.
        settings=(report or {}).get("settings") or dataclasses.asdict(settings),
        report=report,
        overwrite=overwrite,
    )


def _dense_layer(tensors: TensorSource, index: int, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nnx.Module:
    """Decoder layer ``index`` read from ``tensors``; the pages read are handed back at once."""
    from converters import fill_params

    layer = nnx.eval_shape(lambda: DecoderLayer(tensors.config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    fill_params(layer, f"{LAYER_PREFIX}{index}.", tensors)
    tensors.release()
    return layer


def _abstract_sketched_layer(config, dtype: jnp.dtype, param_dtype: jnp.dtype, settings: SketchSettings) -> nnx.Module:
    """A decoder layer with every projection a `SketchedLinear` of ``settings``, shapes only."""

    def build() -> nnx.Module:
        layer = DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        for name in layer.sketch_projections():
            linear = get_submodule(layer, name)
            set_submodule(
                layer,
                name,
                SketchedLinear.empty(
                    linear.in_features,
                    linear.out_features,
                    settings.bits,
                    settings.groups_per_row,
                    use_bias=linear.bias is not None,
                    dtype=linear.dtype,
                    codebook_dtype=jnp.float32,
                    bias_dtype=param_dtype,
                ),
            )
        return layer

    return nnx.eval_shape(build)


def _flat(module: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    _, state = nnx.split(module)
    return [(".".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def _spec(var: nnx.Variable) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(var.shape), np.dtype(var.dtype)
