"""A sketched model trains in Tunix's `PeftTrainer` as it is: `Codebook` is an `nnx.LoRAParam`, so
Tunix's LoRA filter trains the codebooks and nothing else. Skipped where Tunix is not installed
(it is not a dependency: .ci/setup installs the part this test needs); in CI, which sets
``SKETCHTUNE_STRICT_SKIPS=1``, that skip fails the run (tests/allowed_skips.txt does not list it)."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from flax import nnx
from model_utils import random_ids, tiny_hf_model

from converters import from_state_dict
from sketchtune_jax.layers import Codebook
from sketchtune_jax.models import ModelConfig
from sketchtune_jax.sketch.driver import SketchSettings, sketch_model
from sketchtune_jax.train import token_nll_sum

peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")


def _loss(model, input_ids, loss_mask):
    logits, _ = model(input_ids)
    nll, count = token_nll_sum(logits, {"input_ids": input_ids, "loss_mask": loss_mask})
    return nll / count


def test_tunix_peft_trainer_trains_only_the_codebooks_of_a_sketch(tmp_path):
    hf = tiny_hf_model("llama_gqa")
    model = from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())
    sketch_model(model, random_ids(16, 32, seed=1), SketchSettings(bits=3, groups_per_row=2), show_progress=False)
    flat = lambda f: {k: np.array(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, f))}  # noqa: E731
    codebooks, frozen = flat(Codebook), flat(nnx.Not(Codebook))
    assert set(flat(nnx.LoRAParam)) == set(codebooks)

    ids = random_ids(4, 24, seed=2)
    batches = [peft_trainer.TrainingInput(input_tokens=ids, input_mask=np.ones_like(ids))] * 4
    before = float(_loss(model, ids, np.ones_like(ids)))
    config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=4, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model, optax.adam(1e-2), config)
    trainer = trainer.with_loss_fn(_loss).with_gen_model_input_fn(
        lambda x: {"input_ids": x.input_tokens, "loss_mask": x.input_mask}
    )
    trainer.train(batches)

    after = float(_loss(model, ids, np.ones_like(ids)))
    assert after < before - 0.05, (before, after)
    assert all(not np.array_equal(v, flat(Codebook)[k]) for k, v in codebooks.items())
    now = flat(nnx.Not(Codebook))
    assert all(np.array_equal(v, now[k]) for k, v in frozen.items()), "Tunix changed a frozen variable"
