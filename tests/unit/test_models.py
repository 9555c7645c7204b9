"""Our Llama/Mistral forward against transformers (PyTorch fp32) on tiny random configs."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from model_utils import TINY_CONFIGS, hf_logits, jax_logits, random_ids, tiny_hf_model

from converters import from_state_dict
from sketchtune_jax.layers import Linear
from sketchtune_jax.models import ModelConfig, RopeScaling, init_cache

ATOL = 1e-4


def _pair(name: str, **overrides):
    hf = tiny_hf_model(name, **overrides)
    config = ModelConfig.from_hf(hf.config.to_dict())
    return hf, config, from_state_dict(config, hf.state_dict())


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name):
    hf, config, model = _pair(name)
    ids = random_ids(2, 24)
    np.testing.assert_allclose(jax_logits(model, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_config_fields_parsed():
    hf, config, model = _pair("llama3_rope")
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    assert config.rope_theta == 500000.0 and config.head_dim == 16 and config.num_key_value_heads == 2
    mistral = ModelConfig.from_hf(tiny_hf_model("mistral_window").config.to_dict())
    assert mistral.model_type == "mistral" and mistral.sliding_window == 5
    assert not hasattr(_pair("tied_mqa")[2], "lm_head")


def test_config_reads_transformers4_layout_and_round_trips():
    legacy = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "eos_token_id": [2, 7],
    }
    config = ModelConfig.from_hf(legacy)
    assert config.rope_theta == 5e5 and config.rope_scaling == RopeScaling("linear", 2.0)
    assert config.num_key_value_heads == 2 and config.head_dim == 4 and config.eos_token_ids == (2, 7)
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; supported: llama, mistral"),
        (
            {
                "model_type": "llama",
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
            },
            "unsupported RoPE type 'yarn'",
        ),
    ],
)
def test_config_rejects_unsupported(hf, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_left_padded_batch_equals_unpadded_rows(name):
    _, _, model = _pair(name)
    lengths = [16, 9, 4]
    rows = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    ids = np.zeros((3, 16), np.int32)
    mask = np.zeros((3, 16), np.int32)
    for i, row in enumerate(rows):
        ids[i, 16 - len(row) :] = row
        mask[i, 16 - len(row) :] = 1
    batch = jax_logits(model, ids, mask)
    assert np.isfinite(batch).all()
    for i, row in enumerate(rows):
        alone = jax_logits(model, row[None])
        np.testing.assert_allclose(batch[i, 16 - len(row) :], alone[0], atol=ATOL, rtol=0)


@nnx.jit
def _step(model, ids, mask, cache):
    return model(ids, attention_mask=mask, cache=cache)


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_kv_cache_decode_equals_full_forward(name):
    _, config, model = _pair(name)
    ids = random_ids(2, 14, seed=3)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded by 3
    full = jax_logits(model, ids, mask)
    cache = init_cache(config, batch=2, max_len=16)
    prefill = 6
    logits, cache = _step(model, ids[:, :prefill], mask[:, :prefill], cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, ids.shape[1]):
        logits, cache = _step(model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    assert int(cache.index) == 14 and cache.lengths.tolist() == [14, 11]
    decoded = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(decoded[0], full[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(decoded[1, 3:], full[1, 3:], atol=ATOL, rtol=0)


def test_layers_run_on_their_own():
    hf, config, model = _pair("mistral_window")
    ids = random_ids(2, 12)
    mask = np.ones_like(ids)
    mask[0, :4] = 0

    @nnx.jit
    def by_layer(model, ids, mask):
        hidden = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            hidden = layer(hidden, attention_mask=mask)
        return model.lm_head(model.model.norm(hidden))

    logits = np.asarray(by_layer(model, ids, mask))
    np.testing.assert_allclose(logits[:, 4:], jax_logits(model, ids, mask)[:, 4:], atol=ATOL, rtol=0)


def test_every_projection_is_a_swappable_linear():
    _, _, model = _pair("bias_untied")
    names = {".".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, Linear)}
    per_layer = {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    assert names == {f"model.layers.{i}.{n}" for i in range(2) for n in per_layer} | {"lm_head"}

    class Doubled(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            return 2 * self.inner(x)

    ids = random_ids(1, 5)
    before = jax_logits(model, ids)
    layer = model.model.layers[1]
    layer.mlp.down_proj = Doubled(layer.mlp.down_proj)
    assert not np.allclose(jax_logits(model, ids), before)


def test_bfloat16_compute_stays_close_to_float32():
    import jax.numpy as jnp

    hf = tiny_hf_model("llama_gqa")
    config = ModelConfig.from_hf(hf.config.to_dict())
    fp32 = from_state_dict(config, hf.state_dict())
    bf16 = from_state_dict(config, hf.state_dict(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = random_ids(2, 10)
    low = jax_logits(bf16, ids)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, jax_logits(fp32, ids), atol=0.1, rtol=0)


def test_remat_gives_the_same_gradients():
    import jax
    import jax.numpy as jnp

    _, config, model = _pair("llama_gqa")
    ids = jnp.asarray(random_ids(2, 16))

    def loss(m):
        logits, _ = m(ids)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    def jitted_grads():
        graphdef = nnx.graphdef(model)
        grads = jax.jit(lambda state: nnx.grad(loss)(nnx.merge(graphdef, state)))
        program = grads.lower(nnx.state(model)).as_text()
        return grads(nnx.state(model)), program.count("stablehlo.optimization_barrier")

    plain, plain_barriers = jitted_grads()
    model.model.remat = True
    remat, barriers = jitted_grads()
    # The program changes: each layer's recomputed forward sits behind an optimization barrier.
    assert barriers == plain_barriers + config.num_hidden_layers
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
