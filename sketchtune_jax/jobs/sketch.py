"""The sketch job: a model source in, a sketched directory out, resumable from ``<out>.partial``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sketchtune_jax._utils.fileio import check_output_dir, write_json_atomic
from sketchtune_jax.data.text import is_file_source
from sketchtune_jax.io.sketched_dir import SKETCH_CONFIG, is_sketched_dir, save_sketched
from sketchtune_jax.jobs._common import dtype_named, load_model
from sketchtune_jax.parallel.distributed import is_primary
from sketchtune_jax.parallel.sharding import mesh_spec
from sketchtune_jax.settings import OutputExistsError
from sketchtune_jax.sketch.driver import (
    SketchSettings,
    check_sketch_mesh,
    partial_dir_for,
    prepare_sketch_output,
    sketch_model,
)

logger = logging.getLogger(__name__)


def sketch_to_dir(
    model_ref: str,
    out_dir: str | os.PathLike,
    settings: SketchSettings,
    *,
    dtype: str = "float32",
    batch_size: int = 8,
    overwrite: bool = False,
    show_progress: bool = True,
    streaming: bool = True,
    mesh: str | None = None,
) -> dict[str, Any]:
    """Sketch ``model_ref`` calibrated on ``settings.calib`` and save it in ``out_dir``; returns the report.

    Finished layers are kept in ``<out_dir>.partial`` until the sketch is saved, so the
    same call after an interruption resumes; ``overwrite`` replaces a finished sketch (and any heal of it left unfinished)
    and discards an unfinished one. The settings (``calib`` as an absolute path) go to
    ``sketch_config.json``, the report to ``sketch_report.json``. With ``streaming`` the
    checkpoint is read one decoder layer at a time (`sketchtune_jax.sketch.streaming`), except
    with calibration ``self``, which samples text from the whole model; the result is the same.
    ``mesh`` (e.g. ``"data=2,model=4"``) sketches on a mesh of all local devices: calibration
    samples split over ``data``, every stage's rows over all devices (`check_sketch_mesh`
    says what must divide what); a sketch resumes on any mesh or none.
    In a run of several processes (`sketchtune_jax.parallel.distributed`) every process computes the
    same sketch on its own devices and process 0 alone writes it; the others work in a
    temporary directory of their own, removed at the end.
    """
    settings = _with_absolute_calib(settings)
    if is_sketched_dir(model_ref):
        raise ValueError(f"{model_ref} is already sketched; sketch the dense model it came from")
    dtype_named(dtype)
    args = (model_ref, settings, dtype, batch_size, streaming, mesh)
    if is_primary():
        return _sketch_into(*args, out_dir, overwrite=overwrite, show_progress=show_progress)
    check_output_dir(out_dir, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="sketchtune-sketch-") as scratch:
        return _sketch_into(*args, Path(scratch) / "sketch", overwrite=False, show_progress=False)


def _sketch_into(
    model_ref: str,
    settings: SketchSettings,
    dtype: str,
    batch_size: int,
    streaming: bool,
    mesh: str | None,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool,
    show_progress: bool,
) -> dict[str, Any]:
    dtype_ = dtype_named(dtype)
    device_mesh = _sketch_mesh(mesh, settings) if mesh is not None else None
    partial = prepare_sketch_output(out_dir, overwrite=overwrite)
    if overwrite:
        from sketchtune_jax.jobs.heal import heal_run_dir

        # A heal left unfinished belongs to the sketch being replaced.
        shutil.rmtree(heal_run_dir(out_dir), ignore_errors=True)
    if partial.exists():
        logger.info("resuming the unfinished sketch in %s", partial)
    if streaming and settings.calib != "self":
        from converters import open_tensors
        from sketchtune_jax.sketch.streaming import assemble_sketch, sketch_streaming

        tensors = open_tensors(model_ref)
        try:
            calib = _checked_calibration(settings, tensors.config, tensors.tokenizer, None, device_mesh)
            report = sketch_streaming(
                tensors,
                calib,
                settings,
                work_dir=partial,
                dtype=dtype_,
                param_dtype=dtype_,
                batch_size=batch_size,
                show_progress=show_progress,
                mesh=device_mesh,
            )
            report["source"] = model_ref
            assemble_sketch(
                tensors, partial, out_dir, settings, report=report, dtype=dtype_, param_dtype=dtype_, overwrite=True
            )
        finally:
            tensors.close()
    else:
        loaded = load_model(model_ref, dtype)
        calib = _checked_calibration(settings, loaded.config, loaded.tokenizer, loaded.model, device_mesh)
        report = sketch_model(
            loaded.model,
            calib,
            settings,
            work_dir=partial,
            batch_size=batch_size,
            show_progress=show_progress,
            mesh=device_mesh,
        )
        report["source"] = model_ref
        save_sketched(
            loaded.model,
            loaded.config,
            loaded.tokenizer,
            out_dir,
            settings=report["settings"],
            report=report,
            overwrite=True,
        )
    if device_mesh is not None:
        report["mesh"] = mesh_spec(device_mesh)
    write_json_atomic(Path(out_dir) / "sketch_report.json", report)
    shutil.rmtree(partial_dir_for(out_dir), ignore_errors=True)
    return report


def _with_absolute_calib(settings: SketchSettings) -> SketchSettings:
    """``settings`` with a calibration file named by its absolute path (as a sketch records it);
    `FileNotFoundError` when the file is not there."""
    if not is_file_source(settings.calib):
        return settings
    if not Path(settings.calib).is_file():
        raise FileNotFoundError(f"calibration file not found: {settings.calib}")
    return dataclasses.replace(settings, calib=str(Path(settings.calib).resolve()))


def _checked_calibration(settings: SketchSettings, config: Any, tokenizer: Any, model: Any, device_mesh: Any):
    """The calibration windows, once ``settings`` (and the mesh) are known to fit the model's ``config``;
    ``model`` samples the text for calibration ``self``."""
    from sketchtune_jax.data.calibration import calibration_windows

    settings.validate(config)
    if device_mesh is not None:
        check_sketch_mesh(device_mesh, config, settings.nsamples)
    return calibration_windows(
        settings.calib,
        tokenizer,
        nsamples=settings.nsamples,
        seq_len=settings.seq_len,
        seed=settings.seed,
        model=model,
        text_range=settings.calib_range,
    )


def _sketch_mesh(spec: str, settings: SketchSettings):
    """The mesh ``spec`` names, once its data axis is known to divide the calibration samples
    (the model's rows are checked when its config has been read)."""
    from sketchtune_jax.parallel.sharding import make_mesh

    mesh = make_mesh(spec)
    check_sketch_mesh(mesh, None, settings.nsamples)
    return mesh


def resumed_sketch_report(out_dir: str | os.PathLike, settings: SketchSettings) -> dict[str, Any] | None:
    """The report of the finished sketch in ``out_dir`` whose in-place heal was interrupted
    (``<out_dir>.heal`` left behind), so that ``sketch --heal-steps`` run again resumes the heal
    instead of sketching again; None when there is no such heal. Refuses (`OutputExistsError`)
    a sketch made with other settings than ``settings``.
    """
    from sketchtune_jax.jobs.heal import heal_run_dir

    out = Path(out_dir)
    if not heal_run_dir(out).is_dir() or not is_sketched_dir(out):
        return None
    settings = _with_absolute_calib(settings)
    saved = json.loads((out / SKETCH_CONFIG).read_text())
    if SketchSettings.from_dict(saved.get("settings", {})) != settings:
        raise OutputExistsError(
            f"{out} holds a sketch made with other settings, and its heal is unfinished; rerun with the "
            "settings it was made with to resume the heal, or start over ({overwrite})",
            ("overwrite",),
        )
    # sketch_config.json carries the report too, also once a heal has rewritten the directory.
    return saved["report"]
