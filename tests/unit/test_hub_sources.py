"""Hub sources without a network fail once, at once, in one line; a model repository is downloaded
once, safetensors preferred; calibration from text or token ids in memory, and a sketch records the
calibration it really used. No test here touches the network."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from model_utils import tiny_tokenizer

import sketchtune_jax.data.hub as hub
from sketchtune_jax.data.calibration import calibration_windows
from sketchtune_jax.settings import SettingError


def test_an_unreachable_hub_fails_a_dataset_source_once_in_one_line(monkeypatch, caplog):
    from sketchtune_jax.data.text import read_text

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    caplog.set_level(logging.WARNING)
    start = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        read_text("hf:nobody/no-such-dataset:wikitext-2-raw-v1:test")
    message = str(caught.value)
    assert time.perf_counter() - start < 20, "retried instead of failing at once"
    assert "\n" not in message and "cannot be reached" in message and message.startswith("hf:nobody/")
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_weight_patterns_take_one_format_safetensors_first():
    allow, ignore = hub.weight_patterns(["config.json", "model.safetensors", "pytorch_model.bin"])
    assert "*.safetensors" in allow and not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in allow)
    assert "*.bin.index.json" in ignore
    allow, _ = hub.weight_patterns(["config.json", "pytorch_model.bin"])
    assert "*.bin" in allow and "*.safetensors" not in allow


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A repository ``org/tiny`` holding a config, a tokenizer and the weights in both formats; the
    hub library's listing and snapshot download are stubs that copy what the patterns allow."""
    import huggingface_hub

    remote = tmp_path / "remote"
    remote.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin"):
        (remote / name).write_text(name)
    calls = []

    def snapshot_download(repo, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        calls.append({"repo": repo, "allow": allow_patterns, "local_files_only": local_files_only})
        local = tmp_path / "snapshot"
        local.mkdir(exist_ok=True)
        for f in remote.iterdir():
            allowed = allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns)
            if allowed and not any(fnmatch.fnmatch(f.name, p) for p in ignore_patterns or ()):
                shutil.copy(f, local / f.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: sorted(p.name for p in remote.iterdir()))
    return calls


def test_a_repository_with_both_formats_is_downloaded_once_as_safetensors(fake_hub, monkeypatch):
    from converters.hf import resolve_directory

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
    local = resolve_directory("org/tiny")
    assert len(fake_hub) == 1
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_an_unreachable_hub_reads_the_cached_snapshot_without_asking(fake_hub, monkeypatch):
    from converters.hf import resolve_directory

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    resolve_directory("org/tiny")
    assert [c["local_files_only"] for c in fake_hub] == [True]


# ----------------------------------------------------------------------------- calibration in memory


def test_calibration_windows_take_text_in_memory_like_a_file(tmp_path):
    tokenizer = tiny_tokenizer()
    text = "\n".join(" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(40)) for i in range(20))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    from_file = calibration_windows(str(path), tokenizer, nsamples=4, seq_len=16, seed=3)
    from_text = calibration_windows(text, tokenizer, nsamples=4, seq_len=16, seed=3)
    np.testing.assert_array_equal(from_text, from_file)
    with pytest.raises(FileNotFoundError):
        calibration_windows(str(tmp_path / "missing.txt"), tokenizer, nsamples=1, seq_len=4)


def test_calibration_windows_take_token_ids():
    stream = np.arange(3, 203, dtype=np.int64)
    windows = calibration_windows(stream, None, nsamples=5, seq_len=8, seed=1)
    assert windows.shape == (5, 8) and windows.dtype == np.int32
    assert all(np.array_equal(w, np.arange(w[0], w[0] + 8)) for w in windows)  # contiguous runs of the stream
    second_half = calibration_windows(list(stream), None, nsamples=2, seq_len=8, text_range=(0.5, 1.0))
    assert second_half.min() >= 103
    rows = np.arange(60).reshape(6, 10)
    picked = calibration_windows(rows, None, nsamples=3, seq_len=4, seed=0)
    assert picked.shape == (3, 4) and {tuple(r) for r in picked} <= {tuple(r[:4]) for r in rows}
    with pytest.raises(SettingError, match="nsamples of 7 windows"):
        calibration_windows(rows, None, nsamples=7, seq_len=4)


def test_a_sketch_records_the_calibration_it_really_used(tmp_path):
    from model_utils import tiny_hf_model

    import sketchtune_jax as st

    tiny_hf_model("llama_gqa").save_pretrained(tmp_path / "hf")
    loaded = st.load_any(str(tmp_path / "hf"))
    windows = np.random.default_rng(0).integers(3, 90, size=(3, 12)).astype(np.int32)
    report = st.sketch_model(loaded.model, windows, st.SketchSettings(bits=2, groups_per_row=2, kmeans_iters=2))
    assert (report["settings"]["nsamples"], report["settings"]["seq_len"]) == (3, 12)
    assert json.loads(json.dumps(report["settings"]))["bits"] == 2
    assert Path(tmp_path / "hf" / "config.json").is_file()
