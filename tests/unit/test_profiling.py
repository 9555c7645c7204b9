"""What the benches measure (`sketchtune_jax.train.profiling`), on a tiny Llama: bytes held, train-step
memory and speed per method, serving speed."""

from __future__ import annotations

import numpy as np
from flax import nnx
from test_train_step_lean import random_batch, tiny_llama

from sketchtune_jax.train import TrainConfig, make_optimizer
from sketchtune_jax.train.lora import LoraSettings
from sketchtune_jax.train.methods import FinetuneMethod
from sketchtune_jax.train.profiling import serving_speed, state_bytes, train_step_memory, train_step_speed


def _prepared(name: str):
    lora = LoraSettings(rank=2, alpha=4.0, qtype="nf4" if name == "qlora" else None, tile_size=16)
    method = FinetuneMethod(name, lora=lora if name in ("lora", "qlora") else None)
    model = method.prepare(tiny_llama())
    config = TrainConfig(lr=1e-2, max_steps=8)
    return model, nnx.Optimizer(model, make_optimizer(config, 8), wrt=method.wrt)


def test_state_bytes_count_every_variable_as_held():
    model = tiny_llama()
    params = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert state_bytes(model) == 4 * params  # fp32, nothing else held
    lora, _ = _prepared("lora")
    qlora, _ = _prepared("qlora")
    adapters = state_bytes(lora, nnx.LoRAParam)
    assert adapters > 0 and state_bytes(lora) == state_bytes(model) + adapters
    # An NF4 base (4 bits and a scale per 16 weights) holds the projections in a fraction of fp32's bytes.
    assert state_bytes(qlora) < 0.6 * state_bytes(lora)


def test_train_step_memory_and_speed_per_method():
    batch = random_batch(2, 16, 96)
    full, full_opt = _prepared("full")
    lora, lora_opt = _prepared("lora")
    full_mem = train_step_memory(full, full_opt, batch)
    lora_mem = train_step_memory(lora, lora_opt, batch)
    # Full fine-tuning's optimizer holds two moments of every weight; LoRA's only of the adapters.
    assert full_mem["argument_bytes"] > 2 * state_bytes(full)
    assert lora_mem["argument_bytes"] < full_mem["argument_bytes"]
    before = nnx.state(lora, nnx.LoRAParam)
    before = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(before)]
    speed = train_step_speed(lora, lora_opt, batch, steps=2, warmup=0)
    assert speed["tokens_per_s"] > 0 and speed["step_ms"] > 0 and np.isfinite(speed["loss"])
    after = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam))]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # the timed steps trained


def test_serving_speed_reports_first_token_and_decode_rate():
    out = serving_speed(tiny_llama(), prompt_len=8, new_tokens=4, repeats=1)
    assert out["ttft_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert (out["prompt_len"], out["new_tokens"], out["batch"]) == (8, 4, 1)
