"""Batched generation with the KV cache against transformers' generate and our own full forward."""

from __future__ import annotations

import pytest
import torch
from model_utils import random_ids, tiny_hf_model, tiny_tokenizer

from converters import from_state_dict
from sketchtune_jax.models import ModelConfig
from sketchtune_jax.models.generate import generate, generate_text


def _models(name="llama_gqa"):
    hf = tiny_hf_model(name, seed=1)
    config = ModelConfig.from_hf(hf.config.to_dict())
    return hf, from_state_dict(config, hf.state_dict())


def _hf_greedy(hf, prompts, max_new_tokens, eos):
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    rows = []
    for row in out[:, width:].tolist():
        stop = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:stop])
    return rows


def test_greedy_matches_transformers_with_left_padding_and_eos():
    hf, model = _models("mistral_window")
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (11, 4, 7)]
    free = _hf_greedy(hf, prompts, 12, eos=-1)
    assert generate(model, prompts, max_new_tokens=12, eos_token_id=None, pad_token_id=0) == free
    # Make row 1 stop early: its 4th greedy token becomes the EOS.
    eos = free[1][3]
    ours = generate(model, prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert ours == _hf_greedy(hf, prompts, 12, eos=eos)
    assert ours[1][-1] == eos and len(ours[1]) <= 4


def test_sampling_is_seeded_and_top_p_keeps_the_top_token():
    _, model = _models()
    prompts = [random_ids(1, 6, seed=2)[0].tolist(), random_ids(1, 3, seed=3)[0].tolist()]
    greedy = generate(model, prompts, max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    nucleus = generate(
        model, prompts, max_new_tokens=8, eos_token_id=2, pad_token_id=0, temperature=1.0, top_p=1e-6, seed=5
    )
    assert nucleus == greedy
    a = generate(model, prompts, max_new_tokens=8, eos_token_id=None, pad_token_id=0, temperature=1.5, seed=7)
    b = generate(model, prompts, max_new_tokens=8, eos_token_id=None, pad_token_id=0, temperature=1.5, seed=7)
    c = generate(model, prompts, max_new_tokens=8, eos_token_id=None, pad_token_id=0, temperature=1.5, seed=8)
    assert a == b and a != c and all(len(r) == 8 for r in a)


def test_chat_generation_with_a_tokenizer_without_a_chat_template_is_refused():
    _, model = _models()
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="no chat template"):
        generate_text(model, tokenizer, ["w3 w4"], max_new_tokens=2, chat=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chatted = generate_text(model, tokenizer, ["w3 w4"], max_new_tokens=2, chat=True)
    assert chatted == generate_text(model, tokenizer, ["w3 w4"], max_new_tokens=2, add_bos=False)
