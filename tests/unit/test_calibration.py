"""Calibration windows: shapes, seeding, held-out ranges, record files and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sketchtune_jax.data.calibration import calibration_windows


class ByteTokenizer:
    """One token per byte: enough to check where windows come from."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a" * 5000 + "b" * 5000)
    return path


def test_windows_are_seeded_and_shaped(text_file):
    a = calibration_windows(str(text_file), ByteTokenizer(), nsamples=6, seq_len=64, seed=1)
    b = calibration_windows(str(text_file), ByteTokenizer(), nsamples=6, seq_len=64, seed=1)
    c = calibration_windows(str(text_file), ByteTokenizer(), nsamples=6, seq_len=64, seed=2)
    assert a.shape == (6, 64) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_text_range_holds_out_the_rest(text_file):
    windows = calibration_windows(str(text_file), ByteTokenizer(), nsamples=20, seq_len=64, text_range=(0.5, 1.0))
    assert set(np.unique(windows)) == {ord("b")}


def test_too_little_text_says_how_much_there_is(text_file):
    with pytest.raises(ValueError, match=r"nsamples of 20 windows of 1024 do not fit .*: its 10000 tokens hold 9"):
        calibration_windows(str(text_file), ByteTokenizer(), nsamples=20, seq_len=1024)


def test_json_records_are_joined(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "x" * 300, "input": "", "output": "y" * 300}, {"text": "z" * 300}]))
    windows = calibration_windows(str(path), ByteTokenizer(), nsamples=4, seq_len=100)
    assert set(np.unique(windows)) <= {ord(c) for c in "xyz\n"}


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        calibration_windows(str(tmp_path / "none.txt"), ByteTokenizer(), nsamples=1, seq_len=8)
    with pytest.raises(ValueError, match="no tokenizer"):
        calibration_windows(str(tmp_path / "none.txt"), None, nsamples=1, seq_len=8)


def test_self_calibration_samples_the_model():
    from model_utils import tiny_hf_model

    from converters import from_state_dict
    from sketchtune_jax.models import ModelConfig

    class VocabTokenizer:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 96

    hf = tiny_hf_model("llama_gqa")
    model = from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())
    a = calibration_windows("self", VocabTokenizer(), nsamples=3, seq_len=12, seed=0, model=model)
    b = calibration_windows("self", VocabTokenizer(), nsamples=3, seq_len=12, seed=0, model=model)
    assert a.shape == (3, 12) and (a[:, 0] == 1).all()
    np.testing.assert_array_equal(a, b)
    assert len({tuple(row) for row in a}) == 3
