"""The streaming sketcher (checkpoint read one layer at a time) gives the in-memory sketcher's result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
from model_utils import random_ids, save_tiny_model_with_tokenizer, tiny_hf_model

from converters import HFTensors, load_hf
from sketchtune_jax.cli import main
from sketchtune_jax.io.sketched_dir import save_sketched
from sketchtune_jax.sketch.driver import SketchSettings, sketch_model
from sketchtune_jax.sketch.streaming import assemble_sketch, sketch_streaming

SETTINGS = SketchSettings(bits=3, groups_per_row=2, kmeans_iters=20)


def _assert_same_checkpoint(a, b):
    ta, tb = (
        safetensors.numpy.load_file(str(a / "model.safetensors")),
        safetensors.numpy.load_file(str(b / "model.safetensors")),
    )
    assert sorted(ta) == sorted(tb)
    assert sum(k.endswith(".codes") for k in ta) == 2 * 7
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
        if key.endswith(".codebook"):
            np.testing.assert_allclose(ta[key], tb[key], rtol=1e-6, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
    ca, cb = (json.loads((d / "sketch_config.json").read_text()) for d in (a, b))
    assert ca["modules"] == cb["modules"] and ca["bits"] == cb["bits"] == 3


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama with a bias and an untied head, saved as sharded safetensors."""
    path = tmp_path_factory.mktemp("sharded")
    tiny_hf_model("bias_untied").save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_streamed_sketch_equals_the_in_memory_sketch(sharded, tmp_path):
    calib = random_ids(8, 16, seed=1)
    model, config, _ = load_hf(sharded, load_tokenizer=False)
    report = sketch_model(model, calib, SETTINGS, show_progress=False)
    save_sketched(model, config, None, tmp_path / "memory", report=report)

    tensors = HFTensors(sharded, load_tokenizer=False)
    streamed = sketch_streaming(tensors, calib, SETTINGS, work_dir=tmp_path / "work", show_progress=False)
    assemble_sketch(tensors, tmp_path / "work", tmp_path / "stream", SETTINGS, report=streamed)
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert [r["rel_output_error"] for r in streamed["modules"]] == pytest.approx(
        [r["rel_output_error"] for r in report["modules"]], rel=1e-5
    )


def test_an_interrupted_streamed_sketch_resumes_to_the_same_result(sharded, tmp_path):
    calib = random_ids(8, 16, seed=2)
    tensors = HFTensors(sharded, load_tokenizer=False)
    whole = sketch_streaming(tensors, calib, SETTINGS, work_dir=tmp_path / "w1", show_progress=False)
    assemble_sketch(tensors, tmp_path / "w1", tmp_path / "whole", SETTINGS, report=whole)

    def stop(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sketch_streaming(tensors, calib, SETTINGS, work_dir=tmp_path / "w2", show_progress=False, on_layer_done=stop)
    assert (tmp_path / "w2" / "layer_0000.safetensors").is_file()
    assert not (tmp_path / "w2" / "layer_0001.safetensors").exists()
    with pytest.raises(ValueError, match="no finished layer 1"):
        assemble_sketch(tensors, tmp_path / "w2", tmp_path / "early", SETTINGS, report=whole)
    assert not (tmp_path / "early").exists()
    resumed = sketch_streaming(tensors, calib, SETTINGS, work_dir=tmp_path / "w2", show_progress=False)
    assemble_sketch(tensors, tmp_path / "w2", tmp_path / "resumed", SETTINGS, report=resumed)
    _assert_same_checkpoint(tmp_path / "whole", tmp_path / "resumed")


def test_the_cli_streams_by_default_and_matches_the_in_memory_path(tmp_path):
    words = " ".join(f"word{i % 50} thing{i % 7}" for i in range(400))
    save_tiny_model_with_tokenizer(tmp_path / "hf", [words], vocab_size=200)
    (tmp_path / "calib.txt").write_text(words)
    common = [
        "--calib",
        str(tmp_path / "calib.txt"),
        "--nsamples",
        "4",
        "--seq-len",
        "16",
        "--bits",
        "3",
        "--groups-per-row",
        "2",
        "--kmeans-iters",
        "10",
    ]
    assert main(["sketch", str(tmp_path / "hf"), "--out", str(tmp_path / "stream"), *common]) == 0
    assert main(["sketch", str(tmp_path / "hf"), "--out", str(tmp_path / "memory"), "--no-streaming", *common]) == 0
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert not (tmp_path / "stream.partial").exists()
    assert (tmp_path / "stream" / "tokenizer.json").is_file()


def test_converters_can_be_imported_before_the_library():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import converters; converters.open_tensors"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
