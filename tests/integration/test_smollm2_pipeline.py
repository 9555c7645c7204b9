"""The real SmolLM2-135M through the command line: perplexity, sketch, export, fine-tune, evaluate.

Sizes are cut to what CI's two cores allow; the full-size figures are in bench/results/.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from model_utils import DATA, SMOLLM2_DENSE_PPL

from sketchtune_jax.cli import main

pytestmark = pytest.mark.slow

WIKI = DATA / "wikitext-2" / "test.txt"


def _stated_number(generation: str) -> float | None:
    """The number a generation gives, read as `sketchtune eval math` documents it (written out
    here, not taken from the code under test): the one after "The answer is", else the last one."""
    text = generation.replace(",", "")
    stated = re.search(r"answer is\s*:?\s*\$?\s*(-?\d+\.?\d*)", text, re.IGNORECASE)
    numbers = re.findall(r"-?\d+\.?\d*", text)
    return float(stated.group(1)) if stated else float(numbers[-1]) if numbers else None


@pytest.fixture(scope="module")
def sketch_dir(tmp_path_factory):
    """SmolLM2 sketched INT4, 4 groups per row, calibrated on the second half of WikiText-2 only."""
    out = tmp_path_factory.mktemp("smol") / "int4-g4"
    assert (
        main(
            [
                "sketch",
                "smollm2-135m",
                "--bits",
                "4",
                "--groups-per-row",
                "4",
                "--calib",
                str(WIKI),
                "--calib-range",
                "0.5:1",
                "--nsamples",
                "16",
                "--seq-len",
                "512",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_sketched_perplexity_on_held_out_text(sketch_dir, tmp_path):
    report = json.loads((sketch_dir / "sketch_report.json").read_text())
    assert len(report["modules"]) == 30 * 7
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(sketch_dir), "--text", str(WIKI), "--json", str(out)]) == 0
    ratio = json.loads(out.read_text())["ppl"] / SMOLLM2_DENSE_PPL
    # Required by the project: INT4 GPR=4 within 1.20x of dense (the paper's algorithm
    # re-implemented in PyTorch measures 1.20x); ours measures about 1.04x at this size.
    assert 1.0 < ratio < 1.10


def test_exported_dense_model_gives_the_same_logits_in_transformers(sketch_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sketchtune_jax import load_any

    assert main(["export", str(sketch_dir), "--out", str(tmp_path / "dense")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", torch_dtype=torch.float32)
    loaded = load_any(str(sketch_dir))
    ids = np.asarray(loaded.tokenizer("The tower is 324 metres tall, about the same height as")["input_ids"])[None]
    ours = np.asarray(loaded.model(ids)[0])
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-3 * np.abs(ours).max())


def test_finetuning_the_codebooks_lowers_the_loss_and_evaluates(sketch_dir, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                str(sketch_dir),
                "--data",
                str(DATA / "math" / "math_data.train.json"),
                "--out",
                str(run),
                "--max-steps",
                "30",
                "--batch-size",
                "4",
                "--seq-len",
                "256",
                "--lr",
                "3e-4",
                "--warmup-steps",
                "4",
                "--save-every",
                "15",
                "--pad-multiple",
                "256",
            ]
        )
        == 0
    )
    losses = [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5])
    assert (run / "codebooks.safetensors").is_file() and (run / "loss_curve.png").is_file()

    summary = tmp_path / "gsm8k.json"
    assert (
        main(
            [
                "eval",
                "math",
                str(sketch_dir),
                "--codebooks",
                str(run / "codebooks.safetensors"),
                "--data",
                str(DATA / "math" / "gsm8k.test.json"),
                "--limit",
                "4",
                "--max-new-tokens",
                "48",
                "--out",
                str(tmp_path / "eval"),
                "--json",
                str(summary),
            ]
        )
        == 0
    )
    result = json.loads(summary.read_text())
    items = [json.loads(line) for line in (tmp_path / "eval" / "gsm8k.predictions.jsonl").read_text().splitlines()]
    answers = [_stated_number(item["generation"]) for item in items]
    assert [item["prediction"] for item in items] == answers
    right = sum(a is not None and a == float(item["label"]) for a, item in zip(answers, items))
    assert result["n"] == len(items) == 4 and result["accuracy"] == right / 4
