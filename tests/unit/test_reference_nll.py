"""`reference_nll`: the likelihood of reference solutions, scored as fine-tuning scores a response."""

from __future__ import annotations

import numpy as np
from model_utils import jax_logits, tiny_tokenizer

from converters import from_state_dict
from sketchtune_jax.data.records import tokenize_example
from sketchtune_jax.eval.tasks import reference_nll
from sketchtune_jax.models import ModelConfig

RECORDS = [
    {"instruction": "w5 w6 w7", "input": "", "output": "w8 w9"},
    {"instruction": "w10 w11", "input": "w12", "output": "w13 w14 w15 w16"},
    {"instruction": "w20", "input": "", "output": "w21"},
]


def test_reference_nll_is_the_token_weighted_nll_of_response_and_eos():
    from model_utils import tiny_hf_model

    hf = tiny_hf_model("llama_gqa")
    model = from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())
    tokenizer = tiny_tokenizer()
    got = reference_nll(model, tokenizer, RECORDS, seq_len=64, batch_size=2)
    sums, counts = [], []
    for record in RECORDS:
        ex = tokenize_example(record, tokenizer, seq_len=64)
        logits = jax_logits(model, ex.input_ids[None])[0].astype(np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        scored = np.nonzero(ex.loss_mask[1:])[0]
        sums.append(-sum(logp[t, ex.input_ids[t + 1]] for t in scored))
        counts.append(len(scored))
    np.testing.assert_allclose(got["record_nll"], sums, rtol=1e-4)
    assert got["record_tokens"] == counts and counts[1] == 5  # four response tokens and EOS
    np.testing.assert_allclose(got["nll"], sum(sums) / sum(counts), rtol=1e-4)
    assert got["n"] == 3 and got["stderr"] > 0
    assert reference_nll(model, tokenizer, RECORDS, seq_len=64, limit=1)["n"] == 1
