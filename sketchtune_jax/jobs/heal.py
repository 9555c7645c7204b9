"""The heal job: a sketch and its dense teacher in, a sketched directory with healed codebooks out,
resumable from ``<out>.heal``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sketchtune_jax.data.text import is_file_source
from sketchtune_jax.io.sketched_dir import SKETCH_CONFIG, is_sketched_dir, save_sketched
from sketchtune_jax.jobs._common import load_model
from sketchtune_jax.settings import DTYPES, OutputExistsError, SettingError
from sketchtune_jax.train.heal import HealSettings


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
    (`sketchtune_jax.train.heal.heal`), as the `HealSettings` say: ``steps`` steps of ``batch_size``
    windows of ``seq_len`` tokens, drawn from the ``calib_range`` fraction of ``calib`` (a
    text/JSON/JSONL file, ``hf:...``, or ``self``: sampled from the teacher).
    ``windows`` distinct windows (default ``steps * batch_size``, at most what the text
    holds without overlap) are cycled over. ``out_dir`` receives a sketched directory with
    the same codes and the healed codebooks, and ``sketch_config.json`` gains a ``heal``
    record (settings, seconds (a resumed heal's included the runs it continued), first and final KL, and with ``eval_text`` the held-out
    perplexity of ``eval_windows`` windows of ``eval_seq_len`` tokens before and after); the step log is
    ``heal_log.jsonl``. ``out_dir`` may be ``sketch_dir`` itself (healed in place; needs
    ``overwrite``). Checkpoints live in ``<out_dir>.heal`` until the end, so the same call
    after an interruption resumes; ``overwrite`` discards an unfinished heal, except in place,
    where it only permits replacing the sketch (delete ``<out_dir>.heal`` to start over). A teacher that is itself a sketch is refused unless
    ``allow_sketched_teacher`` (distilling from a sketch copies its errors).
    Returns the ``heal`` record.
    """
    import time

    from sketchtune_jax._utils.fileio import check_output_dir
    from sketchtune_jax.data.calibration import calibration_token_ids, self_generated_windows
    from sketchtune_jax.io.sketched_dir import load_sketched
    from sketchtune_jax.train.heal import architecture_mismatch, heal, heal_windows

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
    if is_file_source(calib):
        if not Path(calib).is_file():
            raise FileNotFoundError(f"calibration file not found: {calib}")
        calib = str(Path(calib).resolve())
    if eval_text is not None and is_file_source(eval_text) and not Path(eval_text).is_file():
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
    if overwrite and run_dir.exists() and not in_place:
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
    teacher = load_model(teacher_ref, dtype)
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
        from sketchtune_jax.data.text import read_text
        from sketchtune_jax.eval.perplexity import perplexity

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
        seconds=wall + result.earlier_seconds,
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
