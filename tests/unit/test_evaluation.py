"""Answer extraction on real generations from the shared data, scoring, and the evaluation driver."""

from __future__ import annotations

import json
import os

import pytest

from sketchtune_jax.data.prompts import format_prompt
from sketchtune_jax.eval.tasks import (
    answer_kind,
    evaluate_task,
    extract_answer,
    extract_choice,
    extract_letter,
    extract_number,
    infer_task,
    is_correct,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def load(rel):
    with open(os.path.join(DATA, rel)) as f:
        return json.load(f)


def find(records, needle):
    return next(r for r in records if needle in r["output"])


def test_numbers_from_real_gsm8k_outputs():
    gsm = load("math/gsm8k.test.json")
    first = gsm[0]["output"]  # "... so he needs 24 * 24 = 576 tiles. The answer is 576."
    assert extract_number(first) == 576.0 and extract_number(first, strict=False) == 576.0
    assert is_correct(extract_number(first), gsm[0]["answer"], "gsm8k")
    # The strict rule reads "The answer is X"; the reference takes the last number.
    two = find(gsm, "The answer is 110 tomatoes and 32 eggplants.")["output"]
    assert extract_number(two) == 110.0 and extract_number(two, strict=False) == 32.0
    # Over the whole file the generations' answers match the labels at the same rate either way.
    agree = sum(is_correct(extract_number(r["output"]), r["answer"], "gsm8k") for r in gsm)
    assert 0.5 < agree / len(gsm) < 0.7


def test_number_rules():
    assert extract_number("She has 1,234 apples. The answer is 1,234.") == 1234.0
    assert extract_number("It drops by 3.5 degrees to -2.5") == -2.5
    assert extract_number("The answer is $12.50 per hour, so 3 hours") == 12.5
    assert extract_number("The answer is 7.") == 7.0
    assert extract_number("no digits here") is None
    assert not is_correct(None, "3.0", "gsm8k") and not is_correct(float("inf"), "3", "gsm8k")
    assert is_correct(576, "576.0", "gsm8k") and is_correct(1.83333, "1.8333333333333335", "mawps")
    assert not is_correct(1.83, "1.8333333333333335", "mawps")
    assert is_correct(0.00005, "0", "gsm8k") and not is_correct(0.001, "0", "gsm8k")


def test_letters_from_real_aqua_outputs():
    aqua = load("math/AQuA.test.json")
    out = aqua[0]["output"]  # "... The difference ... is $1.23.The answer is (D)."
    assert out.endswith("The answer is (D).")
    assert extract_letter(out) == "D"
    # The reference rule takes the first capital A-E anywhere.
    windy = find(aqua, "3.85 miles.The answer is (D).")["output"]
    assert extract_letter(windy) == "D" and extract_letter(windy, strict=False) == "B"
    assert extract_letter("the answer is e") == "E" and extract_letter("nothing") == ""


def test_choices_from_real_commonsense_outputs():
    for rel, task in [
        ("commonsense/ARC-Easy.test.json", "arc-easy"),
        ("commonsense/ARC-Challenge.test.json", "arc-challenge"),
        ("commonsense/openbookqa.test.json", "openbookqa"),
        ("commonsense/boolq.test.json", "boolq"),
    ]:
        records = load(rel)[:200]
        for r in records:
            for strict in (True, False):
                assert extract_answer(r["output"], task, strict=strict) == r["answer"]
    assert extract_choice("The correct answer is False.", "boolean") == "false"
    assert extract_choice("The correct answer is False.", "boolean", strict=False) == ""
    assert extract_choice("answer3 or maybe answer1", "answer") == "answer3"
    assert extract_choice("solution2", "solution") == "solution2"
    assert extract_choice("option1 is right", "option") == "option1"
    assert extract_choice("I pick ending4, not ending2", "ending") == "ending4"
    assert extract_choice("answer10", "answer") == ""


def test_task_inference():
    names = {
        "math/gsm8k.test.json": "gsm8k",
        "math/AQuA.test.json": "aqua",
        "math/mawps.test.json": "mawps",
        "commonsense/ARC-Easy.test.json": "arc-easy",
        "commonsense/ARC-Challenge.train.json": "arc-challenge",
        "commonsense/openbookqa.test.json": "openbookqa",
        "commonsense/boolq.test.json": "boolq",
    }
    for rel, task in names.items():
        assert infer_task(os.path.join(DATA, rel)) == task
    assert infer_task("my_eval.json", load("math/gsm8k.test.json")[:50]) == "number"
    assert infer_task(None, load("math/AQuA.test.json")) == "letter"
    assert infer_task(None, load("commonsense/boolq.test.json")[:50]) == "boolean"
    assert answer_kind("ARC-Easy") == "answer" and answer_kind("letter") == "letter"
    with pytest.raises(ValueError, match="cannot infer"):
        infer_task("mix.json", load("math/math_data.train.json"))
    with pytest.raises(ValueError, match="unknown task"):
        answer_kind("sudoku")


class FakeTokenizer:
    eos_token = "</s>"

    def encode(self, text, add_special_tokens=False):
        return text.split()


def oracle(records, suffix=""):
    by_prompt = {format_prompt(r["instruction"], r["input"]): r["output"] for r in records}
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return [by_prompt[p] + suffix for p in prompts]

    return generate, calls


def test_evaluate_task_with_injected_generation(tmp_path):
    path = os.path.join(DATA, "commonsense", "ARC-Easy.test.json")
    records = load("commonsense/ARC-Easy.test.json")
    generate, calls = oracle(records, suffix="</s> answer4 answer4")
    out = tmp_path / "preds" / "arc.jsonl"
    summary = evaluate_task(generate, path, FakeTokenizer(), batch_size=16, limit=40, out_jsonl=out)
    assert summary["task"] == "arc-easy" and summary["n"] == 40 and summary["accuracy"] == 1.0
    assert calls == [16, 16, 8] and summary["prompt_tokens"] > 0
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == 40 and lines[0]["prediction"] == records[0]["answer"] and "</s>" not in lines[0]["generation"]

    gsm = load("math/gsm8k.test.json")[:30]
    generate, _ = oracle(gsm)
    summary = evaluate_task(generate, gsm, task="gsm8k", batch_size=8)
    # Read by hand: 18 of the 30 generations end "The answer is N" with N the label; the others
    # give another number there (10), or have no "The answer is" and a wrong last number (items 8 and 18).
    assert summary["correct"] == 18 and summary["accuracy"] == 18 / 30 and summary["out_jsonl"] is None

    with pytest.raises(ValueError, match="returned 1 generations for 2 prompts"):
        evaluate_task(lambda ps: ["x"], gsm[:2], task="gsm8k")
