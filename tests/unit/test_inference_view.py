"""CPU inference view: sketched weights rebuilt once per call give the same logits, tokens and
perplexity as the per-call rebuild, the compiled decode loop holds no dequantisation, and
a view over the memory budget falls back to the per-call path with a warning."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import random_ids, tiny_sketched_llama, tiny_tokenizer

from pallas_kernels import dense_matmul_reference, dequantize_reference, pack_codes, sketched_matmul_reference
from sketchtune_jax._utils.module_paths import iter_modules
from sketchtune_jax.eval.perplexity import perplexity
from sketchtune_jax.layers import SketchedLinear
from sketchtune_jax.models import stack_layers
from sketchtune_jax.models.generate import _generate, generate
from sketchtune_jax.models.inference_view import (
    DenseWeight,
    PrecomputedSketchedLinear,
    dense_weight_bytes,
    inference_view,
    precompute_weights,
)

pytestmark = pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the view is for CPU inference")


@pytest.fixture(scope="module")
def model():
    return tiny_sketched_llama(bits=3, groups=2, seed=3)


def test_dense_product_is_the_twin_bit_for_bit():
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.normal(size=(24, 2, 16)), jnp.float32)
    codes = pack_codes(jnp.asarray(rng.integers(0, 16, (24, 2, 16)), jnp.uint8), 4)
    x = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.bfloat16)
    w = dequantize_reference(codebook, codes, 4, 32)
    np.testing.assert_array_equal(dense_matmul_reference(x, w), sketched_matmul_reference(x, codebook, codes, 4))
    with pytest.raises(ValueError, match=r"w_hat must be \[out, 32\]"):
        dense_matmul_reference(x, w.T)


def test_view_replaces_every_sketched_layer_and_leaves_the_model(model):
    view = inference_view(model)
    sketched = dict(iter_modules(model, SketchedLinear))
    assert sketched and not list(iter_modules(view, SketchedLinear))
    precomputed = dict(iter_modules(view, PrecomputedSketchedLinear))
    assert precomputed.keys() == sketched.keys()
    name, layer = next(iter(sketched.items()))
    np.testing.assert_array_equal(precomputed[name].weight[...], layer.dense_weight())
    assert dense_weight_bytes(model) == sum(4 * m.in_features * m.out_features for m in sketched.values())
    # Nothing trains the rebuilt weights: they are no Param.
    assert len(nnx.to_flat_state(nnx.state(view, DenseWeight))) == len(sketched)
    assert not any(isinstance(v, DenseWeight) for _, v in nnx.to_flat_state(nnx.state(view, nnx.Param)))


def test_same_logits(model):
    ids = jnp.asarray(random_ids(2, 9, seed=1))
    np.testing.assert_array_equal(inference_view(model)(ids)[0], model(ids)[0])


def test_same_logits_with_stacked_layers():
    stacked = stack_layers(tiny_sketched_llama(bits=2, groups=2, seed=4))
    ids = jnp.asarray(random_ids(2, 8, seed=2))
    view = inference_view(stacked)
    layer = next(m for _, m in iter_modules(view, PrecomputedSketchedLinear))
    assert layer.weight[...].shape == (2, layer.out_features, layer.in_features)
    np.testing.assert_array_equal(view(ids)[0], stacked(ids)[0])


def test_same_generated_tokens(model):
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 9)]
    kwargs = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    with precompute_weights(False):
        before = generate(model, prompts, **kwargs)
    assert generate(model, prompts, **kwargs) == before
    sampled = dict(kwargs, temperature=0.8, top_p=0.9, seed=5)
    with precompute_weights(False):
        before = generate(model, prompts, **sampled)
    assert generate(model, prompts, **sampled) == before


def test_same_perplexity(model):
    text = " ".join(f"w{i}" for i in np.random.default_rng(0).integers(3, 96, 200))
    kwargs = dict(seq_len=32, max_windows=3, batch_size=2, show_progress=False)
    with precompute_weights(False):
        before = perplexity(model, tiny_tokenizer(), text, **kwargs)
    after = perplexity(model, tiny_tokenizer(), text, **kwargs)
    assert after.window_nll == before.window_nll and after.ppl == before.ppl


def _decode_program(model) -> str:
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(random_ids(1, 8, seed=0))
    return _generate.lower(
        graphdef,
        state,
        ids,
        jnp.ones_like(ids),
        jnp.asarray([-1], jnp.int32),
        jax.random.key(0),
        jnp.float32(1.0),
        jnp.float32(1.0),
        max_new_tokens=4,
        pad=0,
        sample=False,
    ).as_text()


def test_the_generate_program_holds_no_dequantisation(model):
    # Unpacking codes is the only shift in a greedy generate program (prefill and decode loop).
    assert "shift_right_logical" in _decode_program(model)
    view_program = _decode_program(inference_view(model))
    assert "shift_right_logical" not in view_program and "ui32" not in view_program


def test_over_budget_falls_back_with_a_warning(model, caplog):
    with precompute_weights(max_bytes=dense_weight_bytes(model) - 1), caplog.at_level(logging.WARNING):
        assert inference_view(model) is model
    assert "over the budget" in caplog.text and "rebuilds them instead" in caplog.text
    with precompute_weights(max_bytes=dense_weight_bytes(model)):
        assert inference_view(model) is not model
    with pytest.raises(ValueError, match="max_bytes"):
        with precompute_weights(max_bytes=-1):
            pass


def test_layers_on_a_kernel_backend_are_left_alone():
    model = tiny_sketched_llama(layers=1, bits=2, groups=2, seed=5)
    for _, layer in iter_modules(model, SketchedLinear):
        layer.backend = "mosaic_tpu"
    assert inference_view(model) is model
