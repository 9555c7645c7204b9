"""The real SmolLM2-135M-Instruct (GGUF, Q4_1) against transformers' own GGUF loader, fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_utils import DATA, SMOLLM2_DENSE_PPL, jax_logits

from sketchtune_jax.cli import main
from sketchtune_jax.models.generate import generate

pytestmark = pytest.mark.slow

SENTENCE = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris."
)


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' LlamaForCausalLM filled by its GGUF reader (dequantize + un-permute)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from converters import smollm2_path

    path = str(smollm2_path())
    config = load_gguf_checkpoint(path, return_tensors=False)["config"]
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    # from_pretrained(gguf_file=...) would do the same but needs accelerate.
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    model.tie_weights()
    return model


def test_config(smollm2):
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.eos_token_id == 2


def test_logits_match_transformers(smollm2, reference):
    ids = np.asarray([smollm2.tokenizer(SENTENCE)["input_ids"]], np.int32)
    ours = jax_logits(smollm2.model, ids)
    with torch.no_grad():
        theirs = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_generation_matches_transformers(smollm2, reference):
    prompt = smollm2.tokenizer("The Eiffel Tower is in the city of")["input_ids"]
    ours = generate(smollm2.model, [prompt], max_new_tokens=32, eos_token_id=2, pad_token_id=2)[0]
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
        )
    theirs = out[0, len(prompt) :].tolist()
    assert ours == theirs[: theirs.index(2) + 1] if 2 in theirs else ours == theirs
    assert len(ours) > 4


def test_dense_perplexity_matches_transformers(tmp_path):
    out = tmp_path / "ppl.json"
    assert (
        main(
            [
                "eval",
                "ppl",
                "smollm2-135m",
                "--text",
                str(DATA / "wikitext-2" / "test.txt"),
                "--seq-len",
                "512",
                "--max-windows",
                "20",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["tokens"] == 20 * 511 and result["tokens_per_s"] > 0
    assert abs(result["ppl"] / SMOLLM2_DENSE_PPL - 1) < 0.005
