"""`sketchtune finetune --method lora|qlora|full` on a dense model, `--adapter` on eval/generate/export,
and the bad inputs they refuse before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_utils import assert_cli_refuses, hf_logits, jax_logits, random_ids, tiny_hf_model, tiny_tokenizer

from sketchtune_jax.cli import main
from sketchtune_jax.io.loading import load_any
from sketchtune_jax.train.adapters import save_adapter
from sketchtune_jax.train.lora import LoraSettings, apply_lora, lora_parameter_count

STEPS = [
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--warmup-steps",
    "0",
    "--pad-multiple",
    "32",
    "--save-every",
    "0",
    "--lr",
    "1e-2",
]


def _save_dense(path: Path, **overrides) -> Path:
    tiny_hf_model("llama_gqa", **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return _save_dense(tmp_path_factory.mktemp("dense") / "tiny")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    records = [
        {
            "instruction": " ".join(f"w{i}" for i in rng.integers(3, 96, 6)),
            "input": "",
            "output": " ".join(f"w{i}" for i in rng.integers(3, 96, 4)),
        }
        for _ in range(16)
    ]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_lora_run_writes_a_peft_adapter_that_eval_and_export_apply(dense_dir, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                str(dense_dir),
                "--method",
                "lora",
                "--lora-rank",
                "2",
                "--data",
                str(data_file),
                "--out",
                str(run),
                *STEPS,
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    loaded = load_any(str(dense_dir))
    assert summary["method"] == "lora" and summary["step"] == 2
    assert summary["trainable_params"] == lora_parameter_count(loaded.model, 2)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0

    ids = random_ids(2, 9)
    adapted = load_any(str(dense_dir), adapter=str(run / "adapter"))
    unmerged = jax_logits(adapted.model, ids)
    assert np.abs(unmerged - jax_logits(loaded.model, ids)).max() > 1e-4  # training moved the adapters
    assert main(["export", str(dense_dir), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(merged, ids), unmerged, atol=1e-4 * np.abs(unmerged).max())
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(dense_dir),
                "--adapter",
                str(run / "adapter"),
                "--prompt",
                "w3 w4",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )


@pytest.mark.parametrize("method, result", [("qlora", "adapter"), ("full", "model")])
def test_qlora_and_full_runs_write_their_results(method, result, dense_dir, data_file, tmp_path):
    run = tmp_path / "run"
    extra = ["--lora-rank", "auto", "--qlora-tile-size", "16"] if method == "qlora" else []
    assert (
        main(
            [
                "finetune",
                str(dense_dir),
                "--method",
                method,
                "--data",
                str(data_file),
                "--out",
                str(run),
                *extra,
                *STEPS,
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    assert (run / result).is_dir() and summary["method"] == method
    if method == "qlora":
        assert summary["lora_qtype"] == "nf4"
        assert json.loads((run / "adapter" / "sketchtune_adapter.json").read_text())["qtype"] == "nf4"
    else:
        dense = load_any(str(dense_dir)).model
        assert summary["trainable_params"] == sum(
            int(np.prod(v.shape)) for _, v in __import__("flax").nnx.to_flat_state(__import__("flax").nnx.state(dense))
        )
        tuned = load_any(str(run / "model"))
        ids = random_ids(1, 6)
        assert np.abs(jax_logits(tuned.model, ids) - jax_logits(dense, ids)).max() > 1e-4


def test_bad_method_inputs_fail_before_any_work(dense_dir, data_file, tmp_path, capsys):
    out = tmp_path / "o"
    sketched = tmp_path / "sketched"
    sketched.mkdir()
    (sketched / "sketch_config.json").write_text("{}")
    base = ["--data", str(data_file), "--out", str(out), *STEPS]
    assert_cli_refuses(["finetune", str(sketched), "--method", "lora", *base], capsys, "trains a dense model")
    assert_cli_refuses(["finetune", str(dense_dir), "--method", "sketch", *base], capsys, "needs a sketched model")
    assert_cli_refuses(["finetune", str(dense_dir), *base], capsys, "--method is needed")
    assert_cli_refuses(
        ["finetune", str(dense_dir), "--method", "lora", "--lora-rank", "0", *base], capsys, "--lora-rank"
    )
    assert_cli_refuses(
        ["finetune", str(dense_dir), "--method", "lora", "--lora-targets", "qkv", *base], capsys, "not projections"
    )
    assert_cli_refuses(
        ["finetune", str(dense_dir), "--method", "qlora", "--qlora-tile-size", "24", *base], capsys, "tile size"
    )
    assert not out.exists()

    other = _save_dense(tmp_path / "wider", intermediate_size=64)
    settings = LoraSettings(rank=2)
    save_adapter(apply_lora(load_any(str(other)).model, settings), settings, tmp_path / "adapter")
    capsys.readouterr()
    assert_cli_refuses(
        ["generate", str(dense_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "w3"],
        capsys,
        "does not fit the model",
    )
    assert_cli_refuses(
        ["export", str(dense_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "e")],
        capsys,
        "does not fit the model",
    )
    assert not (tmp_path / "e").exists()
