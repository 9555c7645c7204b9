"""LoRA/QLoRA baselines: what trains, PEFT interop, merging, the quantized base held packed."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import jax_logits, random_ids, tiny_hf_model

from converters import from_state_dict
from pallas_kernels import packed_words
from sketchtune_jax._utils.module_paths import get_submodule
from sketchtune_jax.models import ModelConfig
from sketchtune_jax.settings import SettingError
from sketchtune_jax.train import TrainConfig, make_optimizer, train_step
from sketchtune_jax.train.adapters import AdapterMismatchError, load_adapter, save_adapter
from sketchtune_jax.train.lora import (
    LoraSettings,
    adapter_modules,
    apply_lora,
    auto_rank,
    base_weight,
    lora_parameter_count,
    merge_lora,
    sketch_parameter_count,
)
from sketchtune_jax.train.quantized_base import QTYPES, qtype_bits, quant_levels


def _pair(seed: int = 0, **overrides):
    hf = tiny_hf_model("llama_gqa", seed=seed, **overrides)
    config = ModelConfig.from_hf(hf.config.to_dict())
    return hf, config, from_state_dict(config, hf.state_dict())


def _randomise_adapters(model, seed: int = 0) -> None:
    """Non-zero B (A is random already) so the adapters change the output."""
    rng = np.random.default_rng(seed)
    for m in adapter_modules(model).values():
        m.weight_lora_b.set_value(jnp.asarray(0.2 * rng.standard_normal(m.weight_lora_b.shape), jnp.float32))


def _batch(vocab: int, seed: int = 0):
    ids = jnp.asarray(random_ids(2, 12, vocab, seed))
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}


def _frozen(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("qtype", [None, "nf4"])
def test_lora_step_changes_only_the_adapters(qtype):
    _, config, model = _pair()
    settings = LoraSettings(rank=4, alpha=8.0, qtype=qtype, tile_size=16)
    model = apply_lora(model, settings)
    _randomise_adapters(model)
    before, adapters = _frozen(model), nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    adapters_before = {str(p): np.asarray(v[...]) for p, v in adapters}
    optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(lr=1e-2, max_steps=2), 2), wrt=nnx.LoRAParam)
    for _ in range(2):
        metrics = train_step(model, optimizer, _batch(config.vocab_size))
    assert np.isfinite(float(metrics["loss"]))
    after = _frozen(model)
    assert before.keys() == after.keys() and len(before) > 0
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    adapters_after = {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert len(adapters_after) == 4 * 7
    assert all(not np.array_equal(adapters_before[k], adapters_after[k]) for k in adapters_before)


def test_peft_loads_our_adapter_with_the_same_logits(tmp_path):
    import peft  # the test extra has it

    hf, config, model = _pair()
    settings = LoraSettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    ids = random_ids(2, 10, config.vocab_size)
    base = jax_logits(model, ids)
    model = apply_lora(model, settings)
    _randomise_adapters(model)
    save_adapter(model, settings, tmp_path / "adapter", base_model="tiny")
    ours = jax_logits(model, ids)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    import torch

    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    assert np.abs(ours - base).max() > 1e-2  # the adapter does change the output
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel < 1e-4, rel


def test_merged_equals_unmerged_and_adapter_round_trips(tmp_path):
    _, config, dense = _pair()
    settings = LoraSettings(rank=3, alpha=6.0)
    model = apply_lora(dense, settings)
    _randomise_adapters(model, seed=1)
    ids = random_ids(2, 10, config.vocab_size)
    unmerged = jax_logits(model, ids)
    merged = merge_lora(model, settings)
    assert not adapter_modules(merged)
    np.testing.assert_allclose(jax_logits(merged, ids), unmerged, atol=2e-5 * np.abs(unmerged).max())
    save_adapter(model, settings, tmp_path / "adapter")
    reloaded, read = load_adapter(_pair()[2], tmp_path / "adapter")
    assert read == settings
    np.testing.assert_array_equal(jax_logits(reloaded, ids), unmerged)


@pytest.mark.parametrize("qtype", QTYPES)
def test_qlora_base_is_within_half_a_level_of_the_dense_weights_and_held_packed(qtype):
    _, _, dense = _pair()
    tile = 16
    model = apply_lora(dense, LoraSettings(rank=2, qtype=qtype, tile_size=tile))
    half_gap = np.max(np.diff(quant_levels(qtype))) / 2
    for name, m in adapter_modules(model).items():
        w = np.asarray(get_submodule(dense, name).weight[...])
        q = np.asarray(base_weight(m))
        out, inp = w.shape
        absmax = np.abs(w.reshape(out, inp // tile, tile)).max(-1, keepdims=True)
        err = np.abs((q - w).reshape(out, inp // tile, tile))
        # float16 scales add at most 2**-11 of the block's absmax to each entry's error.
        assert (err <= (half_gap + 2**-10) * absmax + 1e-6).all(), name
        assert err.max() > 0  # it is quantized, not a copy
        held = m.weight_codes[...].nbytes + m.weight_scales[...].nbytes
        assert held == m.held_bytes() == out * (inp // tile) * (4 * packed_words(tile, qtype_bits(qtype)) + 2)
        if qtype_bits(qtype) != 3:  # 3-bit codes pack exactly in blocks of 32 (test_quantized_base)
            assert held == out * inp * qtype_bits(qtype) // 8 + 2 * out * (inp // tile)
        assert not hasattr(m, "weight")


def test_adapter_for_another_model_is_refused_before_any_work(tmp_path):
    _, _, model = _pair()
    settings = LoraSettings(rank=2)
    save_adapter(apply_lora(model, settings), settings, tmp_path / "adapter")
    _, _, wider = _pair(intermediate_size=64)
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_adapter(wider, tmp_path / "adapter")


def test_bad_settings_are_refused():
    _, _, model = _pair()
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(SettingError, match=r"targets \['qkv_proj'\] are not projections"):
        LoraSettings(targets=("qkv_proj",))
    with pytest.raises(ValueError, match="tile size"):
        apply_lora(model, LoraSettings(qtype="nf4", tile_size=24))
    with pytest.raises(ValueError, match="qtype"):
        LoraSettings(qtype="nf5")
    with pytest.raises(SettingError, match="loftq"):
        LoraSettings(init="loftq")


def test_auto_rank_matches_the_int4_gpr4_sketch_budget():
    _, _, model = _pair()
    r = auto_rank(model)
    budget = sketch_parameter_count(model)
    for other in (r - 1, r + 1):
        if other > 0:
            assert abs(lora_parameter_count(model, r) - budget) <= abs(lora_parameter_count(model, other) - budget)
    # SmolLM2-135M: hidden 576, intermediate 1536, 9 heads / 3 kv heads of 64: 64 * 5184 / 10176 -> 33.
    smol = ModelConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    from sketchtune_jax.models import LlamaForCausalLM

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(smol, rngs=nnx.Rngs(0)))
    assert auto_rank(abstract) == 33
    assert dataclasses.replace(LoraSettings(), rank=auto_rank(abstract)).rank == 33
