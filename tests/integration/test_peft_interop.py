"""PEFT itself loads the adapters ``sketchtune finetune --method lora|qlora`` writes: ``peft.PeftModel``
on the transformers model gives the logits of our merged model. A QLoRA adapter was trained on
the quantized base, so PEFT gets that base (dequantized); on the unquantized one it must differ."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_utils import hf_logits, jax_logits, random_ids, tiny_hf_model, tiny_tokenizer
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sketchtune_jax.cli import main
from sketchtune_jax.io.loading import load_any
from sketchtune_jax.train.adapters import read_adapter_settings
from sketchtune_jax.train.lora import adapter_modules, base_weight, merge_lora

# Largest |ours - PEFT's| over the largest |logit|: both fp32, summing in other orders (measured 1e-6).
TOL = 1e-5


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "tiny"
    tiny_hf_model("llama_gqa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(3, 96, n))  # noqa: E731
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps([{"instruction": words(6), "input": "", "output": words(4)} for _ in range(16)]))
    return path


def _finetune(dense_dir, data_file, run, method: str) -> None:
    argv = ["finetune", str(dense_dir), "--method", method, "--lora-rank", "2", "--data", str(data_file)]
    argv += ["--out", str(run), "--max-steps", "3", "--batch-size", "4", "--seq-len", "32", "--pad-multiple", "32"]
    argv += ["--warmup-steps", "0", "--save-every", "0", "--lr", "3e-2"]
    if method == "qlora":
        argv += ["--qlora-tile-size", "16"]
    assert main(argv) == 0


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peft_loads_the_cli_adapter_and_gives_our_merged_logits(dense_dir, data_file, tmp_path, method):
    run = tmp_path / "run"
    _finetune(dense_dir, data_file, run, method)
    adapter = run / "adapter"
    settings = read_adapter_settings(adapter)
    assert settings.rank == 2 and settings.qtype == ("nf4" if method == "qlora" else None)
    ids = random_ids(2, 12)
    adapted = load_any(str(dense_dir), adapter=str(adapter)).model
    ours = jax_logits(merge_lora(adapted, settings), ids)
    np.testing.assert_allclose(ours, jax_logits(adapted, ids), atol=TOL * np.abs(ours).max())

    hf = AutoModelForCausalLM.from_pretrained(dense_dir, attn_implementation="eager").eval()
    dense = hf_logits(hf, ids)
    if method == "qlora":
        with torch.no_grad():  # the base the adapter was trained on
            for name, linear in adapter_modules(adapted).items():
                hf.get_submodule(name).weight.copy_(torch.tensor(np.asarray(base_weight(linear))))
    base = hf_logits(hf, ids)
    peft_model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(settings.targets)
    theirs = hf_logits(peft_model, ids)

    assert _rel(ours, theirs) < TOL, _rel(ours, theirs)
    assert _rel(ours, base) > 100 * TOL  # the trained adapter moves the logits far beyond the tolerance
    if method == "qlora":
        assert _rel(base, dense) > 100 * TOL  # ... and so does quantizing the base
