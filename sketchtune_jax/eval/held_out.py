"""Whether evaluation text is held out from a sketch's calibration and healing text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sketchtune_jax.data.text import is_file_source
from sketchtune_jax.io.sketched_dir import SKETCH_CONFIG, is_sketched_dir
from sketchtune_jax.settings import fraction_ranges_meet


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
    if not is_sketched_dir(model_ref) or not is_file_source(text_source) or not Path(text_source).is_file():
        return None
    sketch_config = json.loads((Path(model_ref) / SKETCH_CONFIG).read_text())
    # The text may have calibrated the sketch, or healed it afterwards (the ``heal`` record).
    for use, saved in (("calibrated", sketch_config.get("settings", {})), ("healed", sketch_config.get("heal", {}))):
        calib = saved.get("calib", "")
        if not is_file_source(calib) or not Path(calib).is_file() or not os.path.samefile(calib, text_source):
            continue
        from sketchtune_jax.eval.perplexity import tokenize_windows

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
