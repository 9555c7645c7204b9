"""GGUF tokenizers rebuilt from metadata (no torch) give transformers' ids, text and chat prompts."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters import ConversionError
from converters.gguf import GGUFTensors
from converters.gguf_tokenizer import build_tokenizer, read_tokenizer_metadata

WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "test.txt"
CHATTY = [
    "Hello <|im_start|>user\nWhat is 12345 + 6.78?<|im_end|>\n<|im_start|>assistant\n",
    "  two  spaces\t a tab\n\n\nnewlines, 😀 naïve café — it's I'M we'll they'd",
    "### Instruction:\nSum 3 and 4.\n\n### Response:\nThe answer is 7<|endoftext|>",
    "Ünïcödé 漢字 テスト   trailing   ",
]


def _reference(path: Path):
    """transformers' own GGUF tokenizer (its reader needs torch, which the test extra has)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _ours(path: Path):
    reader = gguf.GGUFReader(str(path))
    return build_tokenizer(read_tokenizer_metadata(reader, str(path)), str(path))


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    return _ours(smollm2_gguf), _reference(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_ids_match_transformers_on_wikitext_and_chat_text(smollm2_pair):
    ours, ref = smollm2_pair
    # transformers splits SmolLM2's text with GPT-2's regex alone; the model's own tokenizer (and
    # llama.cpp, for pre-tokenizer "smollm") first splits every numeric character apart. The two
    # agree except on numerals that are not digits (WikiText-2 has one: a "½").
    text = "".join(c for c in WIKITEXT.read_text() if unicodedata.category(c) not in ("No", "Nl"))
    for sample in [text, *CHATTY]:
        for special in (False, True):
            expected = ref(sample, add_special_tokens=special)["input_ids"]
            assert ours(sample, add_special_tokens=special)["input_ids"] == expected
    ids = ref(text[:20000], add_special_tokens=False)["input_ids"] + [2, 1]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
def test_smollm2_splits_numerals_apart_as_the_model_does(smollm2_pair):
    from tokenizers import pre_tokenizers

    ours, ref = smollm2_pair
    # SmolLM2's tokenizer.json: Digits(individual_digits=True) then ByteLevel; transformers with that
    # pre-tokenizer is the model's own tokenizer.
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    text = WIKITEXT.read_text()
    assert "\u00bd" in text
    assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.convert_ids_to_tokens(ours(" 4 ½ months")["input_ids"]) == ["Ġ", "4", "Ġ", "Â½", "Ġmonths"]


@pytest.mark.slow
def test_smollm2_special_tokens_and_chat_template_match_transformers(smollm2_pair):
    ours, ref = smollm2_pair
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref) == 49152
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    for tokenize in (False, True):
        got = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)
        assert got == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)


# ---------------------------------------------------------------- synthetic SentencePiece file

_PIECES = {
    "\u2581": -1.0,
    "\u2581t": -2.0,
    "he": -3.0,
    "\u2581the": -4.0,
    "\u2581a": -5.0,
    "in": -6.0,
    "\u2581in": -7.0,
    "at": -8.0,
    "\u2581cat": -9.0,
    "\u2581\u2581": -10.0,
}


def _write_tokenizer_gguf(path: Path, *, model: str = "llama", pre: str | None = None, **flags) -> None:
    """A GGUF with a tiny Llama config, a 1-layer-free body and a tokenizer: SentencePiece
    (``<unk> <s> </s>``, 256 byte tokens, a-z, the pieces above) unless ``model`` says otherwise."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(_PIECES)
    types += [1] * (26 + len(_PIECES))
    scores = [0.0] * 259 + [-20.0 - i for i in range(26)] + list(_PIECES.values())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(0)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, value in flags.items():
        getattr(writer, f"add_{name}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_tokenizer_gguf(path)
    ours, ref = _ours(path), _reference(path)
    for text in ["the cat in the hat", " the  cat", "Zebra ÿ 😀 at</s>tin", "a", "  leading", "x<s>y"]:
        for special in (False, True):
            expected = ref(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == expected, (text, special)
        ids = ref(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    # A SentencePiece vocabulary adds BOS unless the file says not to (llama.cpp's default too).
    assert ours("the cat")["input_ids"][0] == 1


def test_sentencepiece_gguf_without_space_prefix_adds_none(tmp_path):
    # transformers ignores tokenizer.ggml.add_space_prefix = false; llama.cpp honours it, as we do.
    path = tmp_path / "spm.gguf"
    _write_tokenizer_gguf(path)
    with_prefix = _ours(path)
    _write_tokenizer_gguf(path, add_space_prefix=False, add_bos_token=False)
    ours = _ours(path)
    assert ours.convert_ids_to_tokens(ours("the cat")["input_ids"]) == ["t", "he", "\u2581", "c", "at"]
    for text in ["the cat in the hat", "Zebra ÿ 😀 at", "a  b"]:
        ids = ours(text)["input_ids"]
        assert ours.decode(ids) == text
        assert ours(" " + text)["input_ids"] == with_prefix(text, add_special_tokens=False)["input_ids"]


def test_gguf_without_tokenizer_metadata_has_no_tokenizer(tmp_path):
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (("block_count", 0), ("embedding_length", 8), ("feed_forward_length", 16), ("head_count", 2)):
        getattr(writer, f"add_{add}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GGUFTensors(path).tokenizer is None


@pytest.mark.parametrize(
    ("model", "pre", "message"),
    [
        ("bert", None, r"tokenizer model 'bert' is not supported \(supported: gpt2, llama\)"),
        ("gpt2", "deepseek-coder", r"pre-tokenizer 'deepseek-coder' is not supported"),
        ("gpt2", "smollm", r"byte-level vocabulary has no merges"),
    ],
)
def test_tokenizer_that_cannot_be_built_is_refused_in_one_line(tmp_path, model, pre, message):
    path = tmp_path / "odd.gguf"
    _write_tokenizer_gguf(path, model=model, pre=pre)
    with pytest.raises(ConversionError, match=message) as caught:
        GGUFTensors(path)
    text = str(caught.value)
    assert "\n" not in text and os.fspath(path) in text


def test_sentencepiece_merges_prefer_better_scored_tokens():
    from converters.gguf_tokenizer import sentencepiece_merges

    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = sentencepiece_merges(tokens, [0, 0, 0, -2.0, -1.0, -3.0])
    # Ties (the two splits of "abc") go to the longer left part, as transformers orders them.
    assert merges == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
