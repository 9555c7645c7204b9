"""`sketchtune finetune --text`: language modelling on packed windows of a text file, for every method,
and a LoftQ QLoRA run that writes its base and adapter for `export --adapter`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_utils import assert_cli_refuses, jax_logits, random_ids, save_tiny_model_with_tokenizer, word_text

from sketchtune_jax.cli import main
from sketchtune_jax.data.batches import packed_windows, text_batches
from sketchtune_jax.data.text import read_text, text_fraction
from sketchtune_jax.eval.perplexity import perplexity
from sketchtune_jax.io.loading import load_any

TRAIN = ["--batch-size", "4", "--seq-len", "32", "--save-every", "0", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    text = root / "text.txt"
    text.write_text("\n".join(word_text(80, s) for s in range(60)))
    save_tiny_model_with_tokenizer(root / "hf", [text.read_text()])
    return root / "hf", text


def test_packed_windows_are_consecutive_and_drop_the_tail():
    windows = packed_windows(np.arange(70), 16)
    assert windows.shape == (4, 16) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows.reshape(-1), np.arange(64))


def test_text_batches_hold_out_the_last_windows_and_score_every_token(text_model):
    hf, text = text_model
    tokenizer = load_any(str(hf)).tokenizer
    train, val = text_batches(str(text), tokenizer, batch_size=4, seq_len=32, val_fraction=0.25, seed=0)
    ids = np.asarray(tokenizer(read_text(str(text)), add_special_tokens=False)["input_ids"])
    windows = packed_windows(ids, 32)
    n_val = round(len(windows) * 0.25)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in val]), windows[-n_val:])
    train_rows = np.concatenate([b["input_ids"] for b in train])
    assert len(train_rows) == (len(windows) - n_val) // 4 * 4
    # Shuffled once, and drawn from the training windows only (the text repeats, so compare rows).
    assert not np.array_equal(train_rows, windows[: len(train_rows)])
    allowed = {tuple(r) for r in windows[:-n_val]}
    assert all(tuple(r) in allowed for r in train_rows)
    assert all(b["loss_mask"].all() and b["attention_mask"].all() for b in train)
    with pytest.raises(ValueError, match="too few"):
        text_batches(str(text), tokenizer, batch_size=4, seq_len=32, text_range=(0.0, 0.01))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_text_finetuning_lowers_the_perplexity_of_held_out_text(text_model, tmp_path, method):
    hf, text = text_model
    held_out = text_fraction(read_text(str(text)), (0.8, 1.0))
    before = perplexity(load_any(str(hf)).model, load_any(str(hf)).tokenizer, held_out, seq_len=32, max_windows=8)
    run = tmp_path / "run"
    extra = ["--lora-rank", "4"] if method == "lora" else []
    argv = ["finetune", str(hf), "--method", method, *extra, "--text", str(text), "--text-range", "0:0.8"]
    assert main([*argv, "--out", str(run), "--max-steps", "12", "--lr", "3e-3", *TRAIN]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "text" and summary["text_range"] == [0.0, 0.8]
    tuned = load_any(str(run / "model")) if method == "full" else load_any(str(hf), adapter=str(run / "adapter"))
    after = perplexity(tuned.model, tuned.tokenizer, held_out, seq_len=32, max_windows=8)
    assert after.ppl < 0.8 * before.ppl, (before.ppl, after.ppl)


def test_loftq_run_writes_its_base_and_adapter_and_export_merges_them(text_model, tmp_path):
    hf, text = text_model
    run = tmp_path / "run"
    argv = ["finetune", str(hf), "--method", "qlora", "--qlora-qtype", "nf2", "--qlora-tile-size", "16"]
    argv += ["--lora-rank", "4", "--lora-init", "loftq", "--loftq-iters", "2", "--text", str(text)]
    assert main([*argv, "--out", str(run), "--max-steps", "2", "--lr", "1e-3", *TRAIN]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lora_init"] == "loftq" and summary["loftq_iters"] == 2 and summary["lora_qtype"] == "nf2"
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(run / "base")
    tuned = load_any(str(run / "base"), adapter=str(run / "adapter"))
    # The base written is the quantized one: dense and NF2 differ, and it quantizes back to itself.
    dense_w = np.asarray(load_any(str(hf)).model.model.layers[0].mlp.up_proj.weight[...])
    base_w = np.asarray(load_any(str(run / "base")).model.model.layers[0].mlp.up_proj.weight[...])
    held_w = np.asarray(tuned.model.model.layers[0].mlp.up_proj.base_weight())
    np.testing.assert_allclose(held_w, base_w, rtol=1e-6, atol=1e-7)
    assert np.abs(base_w - dense_w).max() > 1e-3
    merged = tmp_path / "merged"
    assert main(["export", str(run / "base"), "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    ids = random_ids(2, 16, 32)
    np.testing.assert_allclose(jax_logits(load_any(str(merged)).model, ids), jax_logits(tuned.model, ids), atol=2e-4)


def test_bad_text_flags_are_refused_before_any_work(text_model, tmp_path, capsys):
    hf, text = text_model
    out = tmp_path / "run"
    both = ["finetune", str(hf), "--method", "lora", "--text", str(text), "--data", str(text), "--out", str(out)]
    with pytest.raises(SystemExit) as refused:
        main(both)
    assert refused.value.code == 2 and "--data: not allowed with argument --text" in capsys.readouterr().err
    loftq = ["finetune", str(hf), "--method", "lora", "--lora-init", "loftq", "--text", str(text), "--out", str(out)]
    assert_cli_refuses(loftq, capsys, "--lora-init")
    short = ["finetune", str(hf), "--method", "lora", "--text", str(text), "--text-range", "0:0.01"]
    assert_cli_refuses([*short, "--out", str(out), *TRAIN], capsys, "--seq-len")
    assert not out.exists()
