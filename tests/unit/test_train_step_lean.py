"""The lean training step: donated state, host-side learning rate, chunked loss, attention, remat policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_lm import TinyCausalLM

from sketchtune_jax.layers import Codebook
from sketchtune_jax.models import REMAT_POLICIES, LlamaForCausalLM, ModelConfig
from sketchtune_jax.train import (
    TrainConfig,
    apply_train_step,
    compile_train_step,
    make_optimizer,
    make_schedule,
    token_nll_sum,
    train_step,
)
from sketchtune_jax.train.optim import host_learning_rate
from sketchtune_jax.train.step import chunked_token_nll_sum


def tiny_llama(vocab: int = 96, **kw) -> LlamaForCausalLM:
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return LlamaForCausalLM(config, rngs=nnx.Rngs(0), **kw)


def random_batch(rows: int, length: int, vocab: int, *, seed: int = 0, left_pad: bool = False) -> dict:
    """``[rows, length]`` int32 batch; row r has ``r`` pad tokens (right, or left with ``left_pad``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    attn = np.ones_like(ids)
    for r in range(1, rows):
        if left_pad:
            attn[r, :r] = 0
        else:
            attn[r, length - r :] = 0
    loss = attn.copy()
    loss[:, : length // 3] = 0
    return {k: jnp.asarray(v) for k, v in {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}.items()}


def test_train_step_donates_trained_state_and_matches_an_undonated_step():
    model, reference = TinyCausalLM(), TinyCausalLM()
    config = TrainConfig(lr=1e-2, max_steps=2)
    opt = nnx.Optimizer(model, make_optimizer(config, 2), wrt=Codebook)
    ref_opt = nnx.Optimizer(reference, make_optimizer(config, 2), wrt=Codebook)
    ref_step = nnx.jit(apply_train_step)
    for seed in range(2):
        batch = random_batch(3, 12, 64, seed=seed)
        old_codebooks = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, Codebook))]
        old_moments = [x for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim > 0]
        metrics = train_step(model, opt, batch)
        ref_metrics = ref_step(reference, ref_opt, batch)
        assert old_codebooks and all(x.is_deleted() for x in old_codebooks)
        assert old_moments and all(x.is_deleted() for x in old_moments)
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, Codebook)), nnx.to_flat_state(nnx.state(reference, Codebook))
    ):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_compiled_step_aliases_its_state_to_its_outputs():
    model = TinyCausalLM()
    opt = nnx.Optimizer(model, make_optimizer(TrainConfig(max_steps=1), 1), wrt=Codebook)
    hlo = compile_train_step(model, opt, random_batch(2, 8, 64)).as_text()
    assert "input_output_alias" in hlo


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 9), (3, 9), (9, 9), (4, 1)])
def test_host_learning_rate_equals_the_optax_schedule(schedule, warmup, total):
    # An epoch-based config (max_steps=0) lets warmup reach the run's length, so the
    # schedules' clamping of warmup to total - 1 is compared too.
    config = TrainConfig(lr=3e-4, schedule=schedule, warmup_steps=warmup, max_steps=0, epochs=1)
    optax_schedule = make_schedule(config, total)
    for step in range(total + 2):
        np.testing.assert_allclose(
            host_learning_rate(config, total, step),
            float(optax_schedule(step)),
            rtol=1e-6,
            atol=1e-12,
            err_msg=f"step {step}",
        )


def _loss_fn(chunk: int | None):
    def loss(model: LlamaForCausalLM, batch: dict) -> jax.Array:
        if chunk is None:
            nll, n = token_nll_sum(model(batch["input_ids"], attention_mask=batch["attention_mask"])[0], batch)
        else:
            hidden = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
            nll, n = chunked_token_nll_sum(hidden, model.logits_from_hidden, batch, chunk)
        return nll / n

    return loss


@pytest.mark.parametrize("chunk", [5, 13])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(chunk):
    model = tiny_llama()
    batch = random_batch(3, 13, 96, seed=1)
    full_loss, full_grads = nnx.jit(nnx.value_and_grad(_loss_fn(None)))(model, batch)
    loss, grads = nnx.jit(nnx.value_and_grad(_loss_fn(chunk)))(model, batch)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(full_grads)):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))


def _temp_bytes(model: nnx.Module, batch: dict, chunk: int | None) -> int:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad = jax.jit(jax.grad(lambda p, r, b: _loss_fn(chunk)(nnx.merge(graphdef, p, r), b)))
    return grad.lower(params, rest, batch).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_never_holds_the_whole_logits():
    # A big vocabulary against a small model: the [B, T, V] float32 logits dominate.
    vocab, rows, length = 8192, 2, 256
    model = tiny_llama(vocab)
    batch = random_batch(rows, length, vocab)
    logits_bytes = rows * length * vocab * 4
    full, chunked = _temp_bytes(model, batch, None), _temp_bytes(model, batch, 32)
    # The full loss keeps the logits and their gradient; the chunked one neither.
    assert full - chunked > 2 * logits_bytes, (full, chunked)


class FullLogitsOnly(nnx.Module):
    """The same model seen only through ``__call__``: the step falls back to the full logits."""

    def __init__(self, model: nnx.Module):
        self.inner = model

    def __call__(self, input_ids, **kw):
        return self.inner(input_ids, **kw)


def test_llama_train_step_uses_the_chunked_loss():
    vocab, rows, length = 8192, 2, 256
    batch = random_batch(rows, length, vocab)

    def temp_bytes(model):
        opt = nnx.Optimizer(model, make_optimizer(TrainConfig(max_steps=1), 1), wrt=nnx.Param)
        return compile_train_step(model, opt, batch).memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(FullLogitsOnly(tiny_llama(vocab))), temp_bytes(tiny_llama(vocab))
    assert full - chunked > rows * length * vocab * 4, (full, chunked)


def test_fully_masked_pad_queries_stay_finite():
    model = tiny_llama()
    batch = random_batch(3, 10, 96, left_pad=True)
    logits = nnx.jit(lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"])[0])(model, batch)
    assert np.isfinite(np.asarray(logits)).all()
    loss, grads = nnx.jit(nnx.value_and_grad(_loss_fn(4)))(model, batch)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_each_remat_policy_gives_the_same_gradients(policy):
    plain, remat = tiny_llama(), tiny_llama(remat=policy)
    assert remat.model.remat == policy
    batch = random_batch(2, 9, 96, seed=2)

    def program(model):
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s: nnx.grad(_loss_fn(4))(nnx.merge(graphdef, s), batch)), state

    def grads(model):
        fn, state = program(model)
        return fn(state)

    def count(model, op: str) -> int:
        fn, state = program(model)
        return fn.lower(state).as_text().count(f"stablehlo.{op}")

    for (path, a), (_, b) in zip(nnx.to_flat_state(grads(remat)), nnx.to_flat_state(grads(plain))):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))
    # The program changes as the policy says: each layer's recomputed forward sits behind an
    # optimization barrier; "full" recomputes matmuls, "dots_saveable" keeps them all, and
    # "dots_with_no_batch_dims_saveable" recomputes the two attention einsums (they have a batch dim).
    layers = plain.config.num_hidden_layers
    assert count(remat, "optimization_barrier") == count(plain, "optimization_barrier") + layers
    recomputed = count(remat, "dot_general") - count(plain, "dot_general")
    if policy == "full":
        assert recomputed > 2 * layers, recomputed
    else:
        assert recomputed == {"dots_saveable": 0, "dots_with_no_batch_dims_saveable": 2 * layers}[policy]


def test_remat_option_accepts_booleans_and_rejects_unknown_names():
    assert TrainConfig(remat=True).remat == "full" and TrainConfig(remat=False).remat == "none"
    assert TrainConfig.from_dict({"remat": True, "max_steps": 1}).remat == "full"
    with pytest.raises(ValueError, match="remat must be one of none, full"):
        TrainConfig(remat="everything")
    with pytest.raises(ValueError, match="remat must be one of"):
        tiny_llama(remat="sometimes")
