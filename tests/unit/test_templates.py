"""--template alpaca|chat: the chat template is the tokenizer's own, used alike by fine-tuning,
evaluation and generation; alpaca stays the default; a tokenizer without one is refused up front."""

from __future__ import annotations

import json

import pytest
from model_utils import assert_cli_refuses, save_tiny_model_with_tokenizer, word_text

from sketchtune_jax.cli import main
from sketchtune_jax.data.prompts import format_prompt
from sketchtune_jax.data.records import tokenize_example
from sketchtune_jax.settings import SettingError

# Starts with the BOS text, as Llama-3's and SmolLM2's templates do: BOS must not be doubled.
CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    records = [
        {"instruction": word_text(6, i), "input": "", "output": " " + word_text(4, i + 1), "answer": "cat"}
        for i in range(8)
    ]
    (root / "data.json").write_text(json.dumps(records))
    save_tiny_model_with_tokenizer(root / "plain", [word_text(400, 0), "user assistant: The answer is"])
    save_tiny_model_with_tokenizer(root / "hf", [word_text(400, 0), "user assistant: The answer is"])
    config = json.loads((root / "hf" / "tokenizer_config.json").read_text())
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    return root


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_the_chat_template_formats_a_record_as_one_user_turn_with_one_bos(chat_model):
    tokenizer = _tokenizer(chat_model / "hf")
    prompt = format_prompt("the cat", "a mat", template="chat", tokenizer=tokenizer)
    assert prompt == "<s>user: the cat\n\na mat\nassistant:"
    example = tokenize_example({"instruction": "the cat", "output": " sat"}, tokenizer, seq_len=64, template="chat")
    ids = example.input_ids.tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id and example.loss_mask.sum() == len(ids) - example.prompt_len
    alpaca = tokenize_example({"instruction": "the cat", "output": " sat"}, tokenizer, seq_len=256)
    assert alpaca.input_ids.tolist() != ids  # alpaca is the default
    with pytest.raises(SettingError, match="no chat template"):
        format_prompt("the cat", template="chat", tokenizer=_tokenizer(chat_model / "plain"))


def test_finetune_eval_and_generate_take_the_chat_template(chat_model, tmp_path, capsys):
    model, data = str(chat_model / "hf"), str(chat_model / "data.json")
    run = ["finetune", model, "--method", "full", "--data", data, "--max-steps", "1", "--batch-size", "2"]
    assert main([*run, "--seq-len", "64", "--template", "chat", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["template"] == "chat"

    scores = {}
    for template in ("alpaca", "chat"):
        argv = [
            "eval",
            "commonsense",
            model,
            "--data",
            data,
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--task-name",
            "answer",
        ]
        assert main([*argv, "--template", template, "--json", str(tmp_path / f"{template}.json")]) == 0
        scores[template] = json.loads((tmp_path / f"{template}.json").read_text())
    tokenizer = _tokenizer(chat_model / "hf")
    records = json.loads((chat_model / "data.json").read_text())[:2]
    chat_tokens = sum(
        len(
            tokenizer.encode(
                format_prompt(r["instruction"], template="chat", tokenizer=tokenizer), add_special_tokens=False
            )
        )
        for r in records
    )
    assert scores["chat"]["prompt_tokens"] == chat_tokens != scores["alpaca"]["prompt_tokens"]

    outputs = {}
    for flags in (["--template", "chat"], ["--chat"], ["--template", "alpaca"], []):
        capsys.readouterr()
        out = tmp_path / "gen.json"
        assert (
            main(["generate", model, "--prompt", "the cat", "--max-new-tokens", "3", *flags, "--json", str(out)]) == 0
        )
        outputs[" ".join(flags)] = json.loads(out.read_text())["outputs"][0]["output"]
    assert outputs["--template chat"] == outputs["--chat"]


def test_the_chat_template_is_refused_before_training_when_the_tokenizer_has_none(chat_model, tmp_path, capsys):
    argv = ["finetune", str(chat_model / "plain"), "--method", "full", "--data", str(chat_model / "data.json")]
    assert_cli_refuses([*argv, "--template", "chat", "--out", str(tmp_path / "r")], capsys, "--template is chat")
    assert not (tmp_path / "r").exists()
