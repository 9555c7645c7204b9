"""Whole jobs from files to files, as the command line runs them: sketch a model into a
directory, fine-tune a sketch into a run directory, check an evaluation text is held out.

Each checks its inputs and outputs before any work, and writes its outputs atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sketchtune_jax.checkpoint import SKETCH_CONFIG, is_sketched_dir, save_sketched
from sketchtune_jax.fileio import write_json_atomic
from sketchtune_jax.settings import DTYPES, SettingError
from sketchtune_jax.sketcher import SketchSettings, partial_dir_for, prepare_sketch_output, sketch_model
from sketchtune_jax.train.config import TrainConfig
from sketchtune_jax.methods import FinetuneMethod

logger = logging.getLogger(__name__)


def _dtype(dtype: str):
    if dtype not in DTYPES:
        raise SettingError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _load(model_ref: str, dtype: str, codebooks: str | None = None):
    from sketchtune_jax.loading import load_any

    return load_any(model_ref, dtype=_dtype(dtype), param_dtype=_dtype(dtype), codebooks=codebooks)


def _is_file_source(source: str) -> bool:
    return source != "self" and not source.startswith("hf:")


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
) -> dict[str, Any]:
    """Sketch ``model_ref`` calibrated on ``settings.calib`` and save it in ``out_dir``; returns the report.

    Finished layers are kept in ``<out_dir>.partial`` until the sketch is saved, so the
    same call after an interruption resumes; ``overwrite`` replaces a finished sketch
    and discards an unfinished one. The settings (``calib`` as an absolute path) go to
    ``sketch_config.json``, the report to ``sketch_report.json``. With ``streaming`` the
    checkpoint is read one decoder layer at a time (`sketchtune_jax.streaming`), except
    with calibration ``self``, which samples text from the whole model; the result is the same.
    """
    if _is_file_source(settings.calib):
        if not Path(settings.calib).is_file():
            raise FileNotFoundError(f"calibration file not found: {settings.calib}")
        settings = dataclasses.replace(settings, calib=str(Path(settings.calib).resolve()))
    if is_sketched_dir(model_ref):
        raise ValueError(f"{model_ref} is already sketched; sketch the dense model it came from")
    dtype_ = _dtype(dtype)
    partial = prepare_sketch_output(out_dir, overwrite=overwrite)
    if partial.exists():
        logger.info("resuming the unfinished sketch in %s", partial)
    from sketchtune_jax.calibration import calibration_windows

    if streaming and settings.calib != "self":
        from converters import open_tensors
        from sketchtune_jax.streaming import assemble_sketch, sketch_streaming

        tensors = open_tensors(model_ref)
        try:
            settings.validate(tensors.config)
            calib = calibration_windows(
                settings.calib, tensors.tokenizer, nsamples=settings.nsamples, seq_len=settings.seq_len,
                seed=settings.seed, text_range=settings.calib_range,
            )
            report = sketch_streaming(tensors, calib, settings, work_dir=partial, dtype=dtype_, param_dtype=dtype_,
                                      batch_size=batch_size, show_progress=show_progress)
            report["source"] = model_ref
            assemble_sketch(tensors, partial, out_dir, settings, report=report, dtype=dtype_, param_dtype=dtype_,
                            overwrite=True)
        finally:
            tensors.close()
    else:
        loaded = _load(model_ref, dtype)
        settings.validate(loaded.config)
        calib = calibration_windows(
            settings.calib, loaded.tokenizer, nsamples=settings.nsamples, seq_len=settings.seq_len,
            seed=settings.seed, model=loaded.model, text_range=settings.calib_range,
        )
        report = sketch_model(loaded.model, calib, settings, work_dir=partial, batch_size=batch_size,
                              show_progress=show_progress)
        report["source"] = model_ref
        save_sketched(loaded.model, loaded.config, loaded.tokenizer, out_dir,
                      settings=dataclasses.asdict(settings), report=report, overwrite=True)
    write_json_atomic(Path(out_dir) / "sketch_report.json", report)
    shutil.rmtree(partial_dir_for(out_dir), ignore_errors=True)
    return report


def check_run_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a non-empty ``out_dir`` unless ``resume`` or ``overwrite``."""
    if resume and overwrite:
        raise SettingError("resume", "and overwrite exclude each other: continue the run, or start it over")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise FileExistsError(
            f"{path} already holds a run; resume it (--resume), start it over (--overwrite), or pick a new directory"
        )


def finetune_to_dir(
    model_ref: str,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: TrainConfig,
    method: FinetuneMethod | None = None,
    auto_lora_rank: bool = False,
    lora_alpha: float | None = None,
    codebooks: str | None = None,
    dtype: str = "float32",
    val_fraction: float = 0.0,
    pad_multiple: int = 64,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model_ref`` on instruction records ``data`` by ``method``; outputs in ``out_dir``.

    ``method`` defaults to sketch tuning (``model_ref`` must be sketched); lora, qlora and full
    take a dense model (see `sketchtune_jax.methods`). ``auto_lora_rank`` replaces the adapter
    rank by `auto_rank` of the model; ``lora_alpha`` None means 2 x rank. ``resume`` continues the
    run found in ``out_dir`` (from its latest checkpoint); ``overwrite`` deletes it first.
    Returns the summary also written to ``summary.json``.
    """
    from sketchtune_jax.data import build_batches, load_instruction_data
    from sketchtune_jax.lora import auto_rank
    from sketchtune_jax.train import finetune, trainable_parameter_count

    method = method or FinetuneMethod("sketch")
    sketched = is_sketched_dir(model_ref)
    if method.name == "sketch" and not sketched:
        raise ValueError(f"{model_ref} is not a sketched model; make one first with `sketchtune sketch` "
                         "(or fine-tune it with method lora, qlora or full)")
    if method.name != "sketch" and sketched:
        raise ValueError(f"method {method.name} trains a dense model and {model_ref} is sketched")
    if codebooks and method.name != "sketch":
        raise ValueError("codebooks apply to sketch tuning only")
    if not Path(data).is_file():
        raise FileNotFoundError(f"data file not found: {data}")
    if not 0 <= val_fraction < 1:
        raise SettingError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
    records = load_instruction_data(data)
    loaded = _load(model_ref, dtype, codebooks)
    if method.lora is not None:
        rank = auto_rank(loaded.model, method.lora.targets) if auto_lora_rank else method.lora.rank
        alpha = 2.0 * rank if lora_alpha is None else lora_alpha
        method = FinetuneMethod(method.name, lora=dataclasses.replace(method.lora, rank=rank, alpha=alpha))
    model = method.prepare(loaded.model)
    train, val = build_batches(records, loaded.tokenizer, batch_size=config.batch_size, seq_len=config.seq_len,
                               val_fraction=val_fraction, seed=config.seed, on_long_prompt="skip",
                               pad_multiple=pad_multiple)
    if overwrite:
        shutil.rmtree(out_dir, ignore_errors=True)
    writer = method.result_writer(config=loaded.config, tokenizer=loaded.tokenizer, base_model=model_ref)
    result = finetune(model, train, config, out_dir, val_batches=val, progress=progress, wrt=method.wrt,
                      save_result=writer)
    summary = {
        "method": method.name,
        "step": result.step,
        "loss": result.loss,
        "val_loss": result.val_loss,
        "trainable_params": trainable_parameter_count(model, method.wrt),
        "resumed_from": result.resumed_from,
        "result": result.result_path,
        "log": result.log_path,
    }
    if method.lora is not None:
        summary.update(lora_rank=method.lora.rank, lora_alpha=method.lora.alpha, lora_qtype=method.lora.qtype)
    write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def calibration_overlap(model_ref: str, text_source: str, text: str, tokenizer: Any, *, seq_len: int,
                        max_windows: int | None) -> str | None:
    """Why the evaluation windows of ``text`` are not held out from ``model_ref``'s calibration, or None.

    Perplexity reads ``text`` from its start; a sketch calibrated on the same file with a
    ``calib_range`` starting before the end of what is read has seen those tokens.
    """
    if not is_sketched_dir(model_ref) or not _is_file_source(text_source) or not Path(text_source).is_file():
        return None
    saved = json.loads((Path(model_ref) / SKETCH_CONFIG).read_text()).get("settings", {})
    calib = saved.get("calib", "")
    if not _is_file_source(calib) or not Path(calib).is_file() or not os.path.samefile(calib, text_source):
        return None
    from sketchtune_jax.perplexity import tokenize_windows

    windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
    read = len(tokenizer.decode(windows.ravel().tolist())) / max(len(text), 1)
    lo, hi = tuple(saved.get("calib_range", (0.0, 1.0)))
    if lo >= min(read, 1.0):
        return None
    return (
        f"{text_source} also calibrated this sketch (calibration range {lo:g}:{hi:g}), and the evaluated "
        f"windows cover its first {min(read, 1.0):.0%}: this perplexity is not on held-out text "
        "(sketch with --calib-range 0.5:1 and evaluate fewer windows, or evaluate another text)"
    )
