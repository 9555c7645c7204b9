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
import tempfile
from pathlib import Path
from typing import Any

import jax

from sketchtune_jax.checkpoint import SKETCH_CONFIG, is_sketched_dir, save_sketched
from sketchtune_jax.distributed import barrier, is_primary
from sketchtune_jax.fileio import check_output_dir, write_json_atomic
from sketchtune_jax.heal import HealSettings
from sketchtune_jax.methods import FinetuneMethod, check_method_fits, default_method
from sketchtune_jax.settings import DTYPES, OutputExistsError, SettingError, fraction_range, fraction_ranges_meet
from sketchtune_jax.sharding import mesh_spec
from sketchtune_jax.sketcher import (
    SketchSettings,
    check_sketch_mesh,
    partial_dir_for,
    prepare_sketch_output,
    sketch_model,
)
from sketchtune_jax.train.config import FinetuneSettings, TrainConfig

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
    mesh: str | None = None,
) -> dict[str, Any]:
    """Sketch ``model_ref`` calibrated on ``settings.calib`` and save it in ``out_dir``; returns the report.

    Finished layers are kept in ``<out_dir>.partial`` until the sketch is saved, so the
    same call after an interruption resumes; ``overwrite`` replaces a finished sketch
    and discards an unfinished one. The settings (``calib`` as an absolute path) go to
    ``sketch_config.json``, the report to ``sketch_report.json``. With ``streaming`` the
    checkpoint is read one decoder layer at a time (`sketchtune_jax.streaming`), except
    with calibration ``self``, which samples text from the whole model; the result is the same.
    ``mesh`` (e.g. ``"data=2,model=4"``) sketches on a mesh of all local devices: calibration
    samples split over ``data``, every stage's rows over all devices (`check_sketch_mesh`
    says what must divide what); a sketch resumes on any mesh or none.
    In a run of several processes (`sketchtune_jax.distributed`) every process computes the
    same sketch on its own devices and process 0 alone writes it; the others work in a
    temporary directory of their own, removed at the end.
    """
    if _is_file_source(settings.calib):
        if not Path(settings.calib).is_file():
            raise FileNotFoundError(f"calibration file not found: {settings.calib}")
        settings = dataclasses.replace(settings, calib=str(Path(settings.calib).resolve()))
    if is_sketched_dir(model_ref):
        raise ValueError(f"{model_ref} is already sketched; sketch the dense model it came from")
    _dtype(dtype)
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
    dtype_ = _dtype(dtype)
    device_mesh = _sketch_mesh(mesh, settings) if mesh is not None else None
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
            if device_mesh is not None:
                check_sketch_mesh(device_mesh, tensors.config, settings.nsamples)
            calib = calibration_windows(
                settings.calib,
                tensors.tokenizer,
                nsamples=settings.nsamples,
                seq_len=settings.seq_len,
                seed=settings.seed,
                text_range=settings.calib_range,
            )
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
        loaded = _load(model_ref, dtype)
        settings.validate(loaded.config)
        if device_mesh is not None:
            check_sketch_mesh(device_mesh, loaded.config, settings.nsamples)
        calib = calibration_windows(
            settings.calib,
            loaded.tokenizer,
            nsamples=settings.nsamples,
            seq_len=settings.seq_len,
            seed=settings.seed,
            model=loaded.model,
            text_range=settings.calib_range,
        )
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


def check_run_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a non-empty ``out_dir`` unless ``resume`` or ``overwrite``."""
    if resume and overwrite:
        raise SettingError("resume", "and overwrite exclude each other: continue the run, or start it over")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(
            f"{path} already holds a run; continue it ({{resume}}), start it over ({{overwrite}}), "
            "or pick a new directory",
            ("resume", "overwrite"),
        )


# finetune_to_dir's defaults are FinetuneSettings' (one source; the command line reads them too).
_FINETUNE = FinetuneSettings()


def finetune_to_dir(
    model_ref: str,
    data: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    config: TrainConfig,
    text: str | None = None,
    text_range: tuple[float, float] | str = _FINETUNE.text_range,
    method: FinetuneMethod | None = None,
    auto_lora_rank: bool = False,
    lora_alpha: float | None = _FINETUNE.lora_alpha,
    codebooks: str | None = None,
    adapter: str | None = None,
    dtype: str = "float32",
    val_fraction: float = _FINETUNE.val_fraction,
    pad_multiple: int = _FINETUNE.pad_multiple,
    template: str = _FINETUNE.template,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    mesh: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_ref`` on instruction records ``data``, or on plain ``text``, by ``method``;
    outputs in ``out_dir``.

    With ``text`` (a text/JSON/JSONL file or ``hf:`` source; ``data`` None) the ``text_range``
    fraction of it is cut into packed windows of ``config.seq_len`` tokens and every token is
    scored (language modelling; `sketchtune_jax.batches.text_batches`); ``val_fraction`` holds
    out the last windows. Instruction records score the response tokens only, after a prompt in
    ``template`` (``alpaca``, the paper's, or ``chat``: the tokenizer's own chat template).
    The defaults are `FinetuneSettings`'.

    ``adapter`` (methods lora and qlora) starts from that adapter directory, whose settings (rank,
    alpha, quantized base) then replace ``method``'s: e.g. a LoftQ initialisation made once and
    trained several times (`loftq_to_dir`).
    ``method`` None means sketch tuning, which only a sketched ``model_ref`` has as its default;
    lora, qlora and full take a dense model (see `sketchtune_jax.methods`). ``auto_lora_rank`` replaces the adapter
    rank by `auto_rank` of the model; ``lora_alpha`` None means 2 x rank. ``resume`` continues the
    run found in ``out_dir`` (from its latest checkpoint); ``overwrite`` deletes it first.
    ``mesh`` (e.g. ``"data=2,model=4"``, sketch tuning only) trains on a mesh of all
    devices: batches split over ``data``, projections Megatron-style over ``model``
    (`sketchtune_jax.sharding.shard_model`); a run resumes on any mesh. ``config.scan_layers``
    (methods sketch and full) runs the decoder layers as one scan. In a run of several
    processes (`sketchtune_jax.distributed.initialize` first, then this same call in each)
    the mesh spans every process's devices (``data=<all devices>`` when ``mesh`` is None),
    each process transfers only its rows of every batch, and process 0 alone writes.
    Returns the summary also written to ``summary.json``.
    """
    from sketchtune_jax.data import build_batches, load_instruction_data
    from sketchtune_jax.lora import auto_rank
    from sketchtune_jax.train import finetune, trainable_parameter_count

    sketched = is_sketched_dir(model_ref)
    method = method or FinetuneMethod(default_method(sketched, model_ref))
    check_method_fits(method.name, sketched=sketched, model=model_ref)
    if codebooks and method.name != "sketch":
        raise SettingError("codebooks", "apply to method sketch only")
    if adapter is not None:
        from sketchtune_jax.lora import read_adapter_settings

        start = read_adapter_settings(adapter)
        if method.name not in ("lora", "qlora") or (start.qtype is not None) != (method.name == "qlora"):
            raise SettingError(
                "adapter",
                f"{adapter} is a {'QLoRA' if start.qtype else 'LoRA'} adapter; train it with method "
                f"{'qlora' if start.qtype else 'lora'}, not {method.name}",
            )
        method = FinetuneMethod(method.name, lora=start)
    if config.scan_layers and method.lora is not None:
        # qwix records each adapted module's own path on it, so no two layers are alike.
        raise SettingError("scan_layers", f"applies to methods sketch and full, not {method.name}")
    if (data is None) == (text is None):
        raise SettingError("data", "or {text} is needed, not both: instruction records or plain text", ("text",))
    source = data if text is None else text
    if (text is None or _is_file_source(text)) and not Path(source).is_file():
        raise FileNotFoundError(f"{'data' if text is None else 'text'} file not found: {source}")
    text_range = fraction_range(text_range, "text_range")
    if not 0 <= val_fraction < 1:
        raise SettingError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    if mesh is None and jax.process_count() > 1:
        mesh = f"data={jax.device_count()}"
    device_mesh = _training_mesh(mesh, method.name, config) if mesh is not None else None
    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
    # Every process has looked at out_dir before process 0 changes it.
    barrier("finetune: output checked")
    records = load_instruction_data(data) if text is None else None
    loaded = _load(model_ref, dtype, codebooks)
    if text is None:
        from sketchtune_jax.data import check_template

        check_template(template, loaded.tokenizer)
    if method.lora is not None and adapter is None:
        rank = auto_rank(loaded.model, method.lora.targets) if auto_lora_rank else method.lora.rank
        alpha = 2.0 * rank if lora_alpha is None else lora_alpha
        method = FinetuneMethod(method.name, lora=dataclasses.replace(method.lora, rank=rank, alpha=alpha))
    if adapter is None:
        model = method.prepare(loaded.model)
    else:
        from sketchtune_jax.lora import load_adapter

        method.check_model(loaded.model)
        model, _ = load_adapter(loaded.model, adapter, for_training=True)
    put_batch = None
    if device_mesh is not None:
        from sketchtune_jax.sharding import shard_model

        shard_model(model, device_mesh)
        put_batch = _mesh_put_batch(device_mesh)
    if text is None:
        train, val = build_batches(
            records,
            loaded.tokenizer,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            val_fraction=val_fraction,
            seed=config.seed,
            on_long_prompt="skip",
            pad_multiple=pad_multiple,
            template=template,
        )
    else:
        from sketchtune_jax.batches import text_batches

        train, val = text_batches(
            text,
            loaded.tokenizer,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            text_range=text_range,
            val_fraction=val_fraction,
            seed=config.seed,
        )
    if overwrite and is_primary():
        shutil.rmtree(out_dir, ignore_errors=True)
    barrier("finetune: output cleared")
    writer = method.result_writer(config=loaded.config, tokenizer=loaded.tokenizer, base_model=model_ref)
    result = finetune(
        model,
        train,
        config,
        out_dir,
        val_batches=val,
        progress=progress and is_primary(),
        wrt=method.wrt,
        save_result=writer,
        put_batch=put_batch,
    )
    summary = {
        "method": method.name,
        "data": str(source),
        "objective": "instruction" if text is None else "text",
        "step": result.step,
        "loss": result.loss,
        "val_loss": result.val_loss,
        "trainable_params": trainable_parameter_count(model, method.wrt),
        "resumed_from": result.resumed_from,
        "result": result.result_path,
        "log": result.log_path,
    }
    if device_mesh is not None:
        summary["mesh"] = mesh_spec(device_mesh)
    if method.lora is not None:
        summary.update(lora_rank=method.lora.rank, lora_alpha=method.lora.alpha, lora_qtype=method.lora.qtype)
        if method.lora.init == "loftq":
            summary.update(lora_init="loftq", loftq_iters=method.lora.loftq_iters)
    if text is None:
        summary["template"] = template
    else:
        summary["text_range"] = list(text_range)
    if is_primary():
        write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def loftq_to_dir(
    model_ref: str,
    settings: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """LoftQ-initialise a QLoRA adapter on ``model_ref`` once: writes ``out_dir/base`` (the quantized
    base, dequantized, as an HF directory) and ``out_dir/adapter`` (the initial adapter, PEFT format).

    ``settings`` is a `LoraSettings` with a ``qtype`` and ``init="loftq"``. Fine-tune from it with
    ``finetune_to_dir(out_dir/base, ..., method=FinetuneMethod("qlora", ...), adapter=out_dir/adapter)``.
    Returns the paths and the seconds LoftQ took.
    """
    import time

    from sketchtune_jax.lora import apply_lora, save_adapter
    from sketchtune_jax.methods import LOFTQ_BASE, write_loftq_base

    if settings.init != "loftq" or settings.qtype is None:
        raise SettingError("lora_init", "loftq_to_dir needs QLoRA settings with init='loftq'")
    check_output_dir(out_dir, overwrite=overwrite)
    loaded = _load(model_ref, dtype)
    check_method_fits("qlora", sketched=is_sketched_dir(model_ref), model=model_ref)
    start = time.perf_counter()
    model = apply_lora(loaded.model, settings)
    seconds = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = write_loftq_base(model, loaded.config, loaded.tokenizer, str(out))
    save_adapter(model, settings, out / "adapter", base_model=base, overwrite=True)
    summary = {"base": str(out / LOFTQ_BASE), "adapter": str(out / "adapter"), "loftq_seconds": seconds}
    write_json_atomic(out / "loftq.json", {**summary, "settings": dataclasses.asdict(settings), "source": model_ref})
    return summary


def _sketch_mesh(spec: str, settings: SketchSettings):
    """The mesh ``spec`` names, once its data axis is known to divide the calibration samples
    (the model's rows are checked when its config has been read)."""
    from sketchtune_jax.sharding import make_mesh

    mesh = make_mesh(spec)
    check_sketch_mesh(mesh, None, settings.nsamples)
    return mesh


def _training_mesh(spec: str, method: str, config: TrainConfig):
    """The mesh ``spec`` names, after checking that ``method`` and ``config`` can train on it."""
    from sketchtune_jax.sharding import make_mesh

    if method != "sketch":
        if jax.process_count() > 1:
            raise SettingError("method", f"{method} cannot run over several processes (for now); use sketch")
        raise SettingError("mesh", "is supported for method sketch only (for now)")
    mesh = make_mesh(spec)
    data = mesh.shape["data"]
    if config.batch_size % data:
        raise SettingError(
            "batch_size",
            f"must be divisible by the {data} devices of the data axis of {{mesh}}, got {config.batch_size}",
            ("mesh",),
        )
    return mesh


def _mesh_put_batch(mesh):
    """Numpy batch -> arrays split over ``mesh``'s data axis by their batch dimension
    (dimension 1 of stacked micro-batches ``[A, B, T]``); a short last batch gets filler rows."""
    from sketchtune_jax.batches import pad_rows
    from sketchtune_jax.sharding import shard_batch

    def put(batch):
        dim = batch["input_ids"].ndim - 2
        return shard_batch(pad_rows(batch, mesh.shape["data"], dim=dim), mesh, dim=dim)

    return put


def calibration_overlap(
    model_ref: str,
    text_source: str,
    text: str,
    tokenizer: Any,
    *,
    seq_len: int,
    max_windows: int | None,
    text_range: tuple[float, float] = (0.0, 1.0),
) -> str | None:
    """Why the evaluation windows of ``text`` are not held out from ``model_ref``'s calibration, or None.

    ``text`` is the ``text_range`` fraction of ``text_source``; perplexity reads it from its
    start. A sketch calibrated (or healed) on the same file with a ``calib_range`` that meets
    the part read has seen those tokens.
    """
    if not is_sketched_dir(model_ref) or not _is_file_source(text_source) or not Path(text_source).is_file():
        return None
    sketch_config = json.loads((Path(model_ref) / SKETCH_CONFIG).read_text())
    # The text may have calibrated the sketch, or healed it afterwards (the ``heal`` record).
    for use, saved in (("calibrated", sketch_config.get("settings", {})), ("healed", sketch_config.get("heal", {}))):
        calib = saved.get("calib", "")
        if not _is_file_source(calib) or not Path(calib).is_file() or not os.path.samefile(calib, text_source):
            continue
        from sketchtune_jax.perplexity import tokenize_windows

        windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
        read = min(len(tokenizer.decode(windows.ravel().tolist())) / max(len(text), 1), 1.0)
        start, end = text_range
        read_lo, read_hi = start, start + read * (end - start)
        lo, hi = tuple(saved.get("calib_range", (0.0, 1.0)))
        if not fraction_ranges_meet((lo, hi), (read_lo, read_hi)):
            continue
        return (
            f"{text_source} also {use} this sketch (calibration range {lo:g}:{hi:g}), and the evaluated "
            f"windows cover {read_lo:.0%} to {read_hi:.0%} of it: this perplexity is not on held-out text "
            "(sketch with --calib-range 0.5:1 and evaluate fewer windows, or evaluate another text)"
        )
    return None


def heal_run_dir(out_dir: str | os.PathLike) -> Path:
    """Where an unfinished heal bound for ``out_dir`` keeps its log and checkpoints."""
    out = Path(out_dir)
    return out.with_name(f"{out.name}.heal")


def heal_to_dir(
    sketch_dir: str | os.PathLike,
    teacher_ref: str,
    calib: str,
    out_dir: str | os.PathLike,
    settings: HealSettings,
    *,
    dtype: str = "float32",
    eval_text: str | None = None,
    eval_seq_len: int = 512,
    allow_sketched_teacher: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Heal the sketch in ``sketch_dir`` against ``teacher_ref`` on ``calib`` text; write it to ``out_dir``.

    Trains the codebooks, with ``settings.train_norms`` the RMSNorm scales too
    (`sketchtune_jax.heal.heal`), as the `HealSettings` say: ``steps`` steps of ``batch_size``
    windows of ``seq_len`` tokens, drawn from the ``calib_range`` fraction of ``calib`` (a
    text/JSON/JSONL file, ``hf:...``, or ``self``: sampled from the teacher).
    ``windows`` distinct windows (default ``steps * batch_size``, at most what the text
    holds without overlap) are cycled over. ``out_dir`` receives a sketched directory with
    the same codes and the healed codebooks, and ``sketch_config.json`` gains a ``heal``
    record (settings, seconds, first and final KL, and with ``eval_text`` the held-out
    perplexity of ``eval_windows`` windows of ``eval_seq_len`` tokens before and after); the step log is
    ``heal_log.jsonl``. ``out_dir`` may be ``sketch_dir`` itself (healed in place; needs
    ``overwrite``). Checkpoints live in ``<out_dir>.heal`` until the end, so the same call
    after an interruption resumes. A teacher that is itself a sketch is refused unless
    ``allow_sketched_teacher`` (distilling from a sketch copies its errors).
    Returns the ``heal`` record.
    """
    import time

    from sketchtune_jax.calibration import calibration_token_ids, self_generated_windows
    from sketchtune_jax.checkpoint import load_sketched
    from sketchtune_jax.fileio import check_output_dir
    from sketchtune_jax.heal import architecture_mismatch, heal, heal_windows

    settings.require_steps()
    config = settings.train_config()
    steps, batch_size, seq_len, seed = settings.steps, settings.batch_size, settings.seq_len, settings.seed
    lo, hi = settings.calib_range
    windows, eval_windows, train_norms = settings.windows, settings.eval_windows, settings.train_norms
    if eval_text is not None and eval_seq_len < 2:
        raise SettingError("eval_seq_len", f"must be >= 2, got {eval_seq_len}")
    if not is_sketched_dir(sketch_dir):
        raise ValueError(
            f"{sketch_dir} is not a sketched model (no {SKETCH_CONFIG}); make one with `sketchtune sketch`"
        )
    if is_sketched_dir(teacher_ref) and not allow_sketched_teacher:
        raise SettingError(
            "allow_sketched_teacher",
            f"is off and the teacher {teacher_ref} is itself a sketch; "
            "heal against the dense model the sketch was made from",
        )
    if _is_file_source(calib):
        if not Path(calib).is_file():
            raise FileNotFoundError(f"calibration file not found: {calib}")
        calib = str(Path(calib).resolve())
    if eval_text is not None and _is_file_source(eval_text) and not Path(eval_text).is_file():
        raise FileNotFoundError(f"evaluation text not found: {eval_text}")
    in_place = Path(out_dir).resolve() == Path(sketch_dir).resolve()
    if in_place and not overwrite:
        raise OutputExistsError(
            f"healing {sketch_dir} in place replaces it; set {{overwrite}}, or write the healed sketch elsewhere",
            ("overwrite",),
        )
    if not in_place:
        check_output_dir(out_dir, overwrite=overwrite)
    run_dir = heal_run_dir(out_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)

    sketch_config = json.loads((Path(sketch_dir) / SKETCH_CONFIG).read_text())
    student = load_sketched(
        sketch_dir, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], codebook_dtype=DTYPES["float32"]
    )
    tokenizer = student.tokenizer
    if tokenizer is None:
        raise ValueError(f"{sketch_dir} has no tokenizer files, and the calibration text must be tokenized")
    wanted = windows or steps * batch_size
    if calib != "self":
        ids = calibration_token_ids(calib, tokenizer, text_range=(lo, hi))
        calib_windows = heal_windows(
            ids,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            windows=windows,
            seed=seed,
            source=f"calibration text {calib} (range {lo:g}:{hi:g})",
        )
    teacher = _load(teacher_ref, dtype)
    if mismatch := architecture_mismatch(student.config, teacher.config):
        raise ValueError(
            f"the teacher {teacher_ref} differs from the sketch {sketch_dir} ({mismatch}); "
            "heal against the dense model the sketch was made from"
        )
    if teacher.tokenizer is not None and teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the teacher {teacher_ref} and the sketch {sketch_dir} have different vocabularies; "
            "heal against the dense model the sketch was made from"
        )
    if calib == "self":
        calib_windows = self_generated_windows(teacher.model, tokenizer, nsamples=wanted, seq_len=seq_len, seed=seed)

    def held_out_ppl() -> float:
        from sketchtune_jax.perplexity import perplexity, read_text

        return perplexity(
            student.model, tokenizer, read_text(eval_text), seq_len=eval_seq_len, max_windows=eval_windows
        ).ppl

    record: dict[str, Any] = {}
    if eval_text is not None:
        record["ppl_before"] = held_out_ppl()
    wall, cpu = time.perf_counter(), time.process_time()
    result = heal(
        student.model, teacher.model, calib_windows, config, run_dir, progress=progress, train_norms=train_norms
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    from sketchtune_jax.train import read_log

    losses = [r["loss"] for r in read_log(result.log_path) if "loss" in r]
    record.update(
        teacher=teacher_ref,
        calib=calib,
        calib_range=[lo, hi],
        windows=len(calib_windows),
        steps=result.step,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=config.lr,
        schedule=config.schedule,
        warmup_steps=config.warmup_steps,
        train_norms=train_norms,
        seed=seed,
        seconds=wall,
        cpu_seconds=cpu,
        resumed_from=result.resumed_from,
        first_kl=losses[0] if losses else None,
        final_kl=result.loss,
    )
    if eval_text is not None:
        record.update(
            ppl_after=held_out_ppl(), eval_text=eval_text, eval_windows=eval_windows, eval_seq_len=eval_seq_len
        )
    save_sketched(
        student.model,
        student.config,
        student.tokenizer,
        out_dir,
        settings=sketch_config.get("settings"),
        report=sketch_config.get("report"),
        heal=record,
        overwrite=True,
    )
    shutil.copyfile(result.log_path, Path(out_dir) / "heal_log.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)
    return record
