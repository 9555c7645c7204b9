"""Multiple-choice scoring by log-likelihood: choice parsing on the shared data, batched scores
against an unbatched brute-force computation, and SmolLM2-135M above chance on ARC-Easy."""

from __future__ import annotations

import json
import os
import re
import zlib

import numpy as np
import pytest
from model_utils import hf_logits, tiny_hf_model

from converters import from_state_dict
from sketchtune_jax.data.prompts import format_prompt
from sketchtune_jax.eval.multiple_choice import (
    RESPONSE_TEMPLATE,
    evaluate_multiple_choice,
    parse_choices,
    question_of,
    sequence_logliks,
)
from sketchtune_jax.models import ModelConfig

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "commonsense")


def load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


class WordTokenizer:
    """One token per word or punctuation mark (whitespace dropped), ids 3..95 by CRC; BOS 1, EOS 2, PAD 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=False):
        return [3 + zlib.crc32(w.encode()) % 93 for w in re.findall(r"\w+|[^\w\s]", text)]


@pytest.fixture(scope="module")
def tiny_pair():
    """A tiny random transformers Llama and our model with its weights (logits equal to ~1e-5)."""
    hf = tiny_hf_model("llama_gqa", seed=3)
    return hf, from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())


@pytest.fixture(scope="module")
def tiny(tiny_pair):
    return tiny_pair[1]


def short_records():
    """Real ARC-Easy and BoolQ records."""
    return load("ARC-Easy.test.json")[:3] + load("boolq.test.json")[:2]


def test_parse_choices_real_records():
    arc = parse_choices(load("ARC-Easy.train.json")[0]["instruction"])
    assert arc.words == ("answer1", "answer2", "answer3", "answer4")
    assert arc.texts[1] == "a bacterial population in the bloodstream"
    assert arc.texts[3] == "carbohydrates being digested in the stomach"
    boolq = parse_choices(load("boolq.test.json")[0]["instruction"])
    assert boolq.words == boolq.texts == ("true", "false")
    for name in ("ARC-Challenge.test.json", "openbookqa.test.json", "boolq.train.json"):
        for r in load(name)[:300]:
            choices = parse_choices(r["instruction"])
            assert r["answer"] in choices.words and all(choices.texts)
            assert r["output"] == RESPONSE_TEMPLATE.format(r["answer"])
    assert (
        question_of(load("ARC-Easy.train.json")[0]["instruction"])
        == "Which factor will most likely cause a person to develop a fever?"
    )
    assert question_of(load("boolq.test.json")[0]["instruction"]) == "does ethanol take more energy make that produces?"
    piqa = parse_choices(
        "Pick one: x\n\nSolution1: heat it\n\nSolution2: cool it\n\nAnswer format: solution1/solution2"
    )
    assert piqa.texts == ("heat it", "cool it")


def test_bad_records_fail_before_any_forward_pass():
    with pytest.raises(ValueError, match="Answer format"):
        parse_choices("Which is it? Answer1: a Answer2: b")
    with pytest.raises(ValueError, match="answer3"):
        parse_choices("Which? Answer1: a Answer2: b\n\nAnswer format: answer1/answer2/answer3")
    good = load("ARC-Easy.test.json")[0]
    bad = [good, {**good, "instruction": "no options here"}]
    with pytest.raises(ValueError, match="record 1: cannot find the choices"):
        evaluate_multiple_choice(None, WordTokenizer(), bad)
    with pytest.raises(ValueError, match="record 0: answer 'answer9'"):
        evaluate_multiple_choice(None, WordTokenizer(), [{**good, "answer": "answer9"}])


def brute_force_loglik(hf, prompt: str, continuation: str) -> float:
    """log p(continuation | BOS + prompt) by transformers on one unpadded row, log-softmax in float64."""
    tok = WordTokenizer()
    p = [tok.bos_token_id] + tok.encode(prompt)
    c = tok.encode(continuation)
    logits = hf_logits(hf, np.asarray([p + c]))[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(logp[len(p) + j - 1, t] for j, t in enumerate(c)))


@pytest.mark.parametrize("continuation", ["response", "option", "question"])
def test_batched_choice_equals_brute_force(tiny_pair, continuation, tmp_path):
    hf, tiny = tiny_pair
    records = short_records()
    out = tmp_path / "items.jsonl"
    summary = evaluate_multiple_choice(
        tiny, WordTokenizer(), records, continuation=continuation, batch_size=4, out_jsonl=out
    )
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["n"] == len(items) == len(records) and summary["choices"] == [2, 4]
    correct = correct_norm = 0
    for r, item in zip(records, items):
        choices = parse_choices(r["instruction"])
        prompt = format_prompt(r["instruction"], r["input"])
        texts = (
            [RESPONSE_TEMPLATE.format(w) for w in choices.words] if continuation == "response" else list(choices.texts)
        )
        if continuation == "question":
            prompt = f"Question: {question_of(r['instruction'])}\nAnswer:"
            texts = [" " + t for t in texts]
        ref = np.asarray([brute_force_loglik(hf, prompt, t) for t in texts])
        np.testing.assert_allclose(item["logliks"], ref, rtol=1e-4, atol=1e-3)
        assert item["lengths"] == [len(t) for t in texts]
        assert item["prediction"] == choices.words[int(np.argmax(ref))]
        assert item["prediction_norm"] == choices.words[int(np.argmax(ref / np.asarray(item["lengths"])))]
        correct += item["prediction"] == r["answer"]
        correct_norm += item["prediction_norm"] == r["answer"]
    assert summary["acc"] == correct / len(records) and summary["acc_norm"] == correct_norm / len(records)


def test_padding_and_batch_size_do_not_change_scores(tiny):
    rng = np.random.default_rng(0)
    rows = []
    for length in (5, 17, 63, 64, 65, 90, 9, 30, 41):
        ids = rng.integers(3, 96, length).astype(np.int32)
        mask = np.zeros(length, np.int32)
        mask[length // 2 :] = 1
        rows.append((ids, mask))
    one = sequence_logliks(tiny, rows, batch_size=1)
    # Four rows a batch: rows of width 64 and 128 share batches, short batches are filled up.
    four = sequence_logliks(tiny, rows, batch_size=4, pad_token_id=7)
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-4)
    assert np.all(one < 0) and np.all(np.isfinite(one))


@pytest.mark.slow
def test_smollm2_above_chance_on_arc_easy(smollm2):
    # Measured: acc 20/40, acc_norm 19/40 (chance 10/40). A chance-level scorer reaches 17/40 with p ~ 0.015.
    summary = evaluate_multiple_choice(
        smollm2.model,
        smollm2.tokenizer,
        os.path.join(DATA, "ARC-Easy.test.json"),
        continuation="question",
        limit=40,
        batch_size=16,
    )
    assert summary["n"] == 40 and summary["chance"] == pytest.approx(0.25)
    assert summary["correct"] >= 17 and summary["correct_norm"] >= 17


def test_cli_rejects_unparseable_records_before_loading(tmp_path, capsys):
    from sketchtune_jax.cli import main

    good = load("ARC-Easy.test.json")[0]
    data = tmp_path / "mc.json"
    data.write_text(json.dumps([good, {**good, "answer": "answer7"}]))
    out = tmp_path / "out"
    argv = [
        "eval",
        "commonsense",
        str(tmp_path / "no-such-model"),
        "--data",
        str(data),
        "--scoring",
        "loglik",
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "record 1: answer 'answer7' is not one of" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    assert main(argv + ["--limit", "1"]) == 2
    assert "no-such-model" in capsys.readouterr().err and not out.exists()
