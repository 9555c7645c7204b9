"""Text sources: a local file, an ``hf:NAME[:CONFIG]:SPLIT`` dataset, ``self`` (sampled from the model),
or text given in memory; and the fraction of a text a job reads."""

from __future__ import annotations

from pathlib import Path

from sketchtune_jax.data.hub import load_hub_dataset
from sketchtune_jax.settings import fraction_range

_FILE_SUFFIXES = (".txt", ".json", ".jsonl")


def is_file_source(source: str) -> bool:
    """Whether a text source names a file: not ``self`` (sampled from the model) nor an ``hf:`` dataset."""
    return source != "self" and not source.startswith("hf:")


def is_text(source: str) -> bool:
    """Whether the str ``source`` is calibration text itself rather than a file name or source name."""
    if not is_file_source(source):
        return False
    looks_like_text = "\n" in source or (" " in source and not source.lower().endswith(_FILE_SUFFIXES))
    try:
        return looks_like_text and not Path(source).is_file()
    except OSError:  # longer than a file name can be
        return True


def text_fraction(text: str, text_range: tuple[float, float]) -> str:
    """The characters of ``text`` from fraction ``text_range[0]`` to ``text_range[1]`` of its length."""
    lo, hi = fraction_range(text_range, "text_range")
    return text[int(len(text) * lo) : int(len(text) * hi)]


def read_text(source: str) -> str:
    """Text of a local file, or of an HF dataset given as ``hf:NAME[:CONFIG]:SPLIT`` (joined with blank lines)."""
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"expected hf:NAME[:CONFIG]:SPLIT, got {source!r}")
        name, split = parts[0], parts[-1]
        config = parts[1] if len(parts) == 3 else None
        return "\n\n".join(load_hub_dataset(name, config, split, source=source)["text"])
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {source}")
    return path.read_text(encoding="utf-8")
