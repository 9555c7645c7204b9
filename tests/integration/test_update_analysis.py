"""bench/update_analysis.py: the SVD and sketch-space errors on random matrices, and a run end to end
on a tiny random dense / fine-tuned / sketched model triple."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from model_utils import tiny_hf_model

from converters import from_state_dict
from sketchtune_jax._utils.module_paths import get_submodule, iter_modules, set_submodule
from sketchtune_jax.layers import Linear, SketchedLinear
from sketchtune_jax.models import ModelConfig

_BENCH = Path(__file__).resolve().parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("update_analysis", _BENCH / "update_analysis.py")
ua = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(_BENCH))  # bench scripts import their shared module, _common, from bench/
try:
    _spec.loader.exec_module(ua)
finally:
    sys.path.remove(str(_BENCH))


def test_svd_error_is_the_tail_singular_values_norm():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((24, 40))
    s = np.linalg.svd(delta, compute_uv=False)
    for rank in (1, 5, 23, 24):
        approx = ua.low_rank_approximation(delta, rank)
        assert np.linalg.matrix_rank(approx) == rank
        tail = np.sqrt(np.sum(s[rank:] ** 2)) / np.sqrt(np.sum(s**2))
        assert ua.relative_error(delta, approx) == pytest.approx(tail, rel=1e-9, abs=1e-12)
        assert ua.svd_relative_error(delta, rank) == pytest.approx(tail, rel=1e-9, abs=1e-12)
    # A rank-3 matrix is captured exactly at rank 3.
    low = rng.standard_normal((24, 3)) @ rng.standard_normal((3, 40))
    assert ua.svd_relative_error(low, 3) < 1e-7 and ua.svd_relative_error(low, 2) > 0.05


def _codes(rng, rows=12, groups=3, cols=10, n_codes=8):
    return rng.integers(0, n_codes, (rows, groups, cols))


def test_sketch_space_projection_is_the_cell_mean_and_idempotent():
    rng = np.random.default_rng(1)
    codes, n = _codes(rng), 8
    delta = rng.standard_normal((12, 30))
    update, approx = ua.sketch_space_update(delta, codes, n)
    # Entry (r, j) reads its own cell's value.
    groups, cols = codes.shape[1:]
    for r, j in [(0, 0), (5, 17), (11, 29)]:
        g = j // cols
        assert approx[r, j] == update[r, g, codes[r, g, j % cols]]
        members = delta[r, g * cols : (g + 1) * cols][codes[r, g] == codes[r, g, j % cols]]
        assert approx[r, j] == pytest.approx(members.mean(), rel=1e-12)
    update2, approx2 = ua.sketch_space_update(approx, codes, n)
    np.testing.assert_allclose(approx2, approx, rtol=0, atol=1e-12)
    # A matrix already in the sketch space is reproduced exactly.
    table = rng.standard_normal((12, groups, n))
    inside = np.take_along_axis(table, codes, axis=-1).reshape(12, 30)
    assert ua.relative_error(inside, ua.sketch_space_update(inside, codes, n)[1]) < 1e-12


def test_sketch_space_update_beats_any_other_codebook_update():
    rng = np.random.default_rng(2)
    codes, n = _codes(rng), 8
    delta = rng.standard_normal((12, 30))
    update, approx = ua.sketch_space_update(delta, codes, n)
    best = np.linalg.norm(delta - approx)
    rows, groups, cols = codes.shape
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(20):
            other = update + scale * rng.standard_normal(update.shape)
            other_approx = np.take_along_axis(other, codes, axis=-1).reshape(rows, groups * cols)
            assert np.linalg.norm(delta - other_approx) > best


def test_equal_param_rank():
    # SmolLM2-135M's q_proj (576 x 576) and down_proj (576 x 1536) at INT4, 4 groups a row.
    assert ua.equal_param_rank(576, 576, 4, 4) == 32
    assert ua.equal_param_rank(576, 1536, 4, 4) == 17
    assert ua.equal_param_rank(4, 1000, 1, 2) == 1


def _sketch_of(model, rng, bits=3, groups=2):
    for name, linear in list(iter_modules(model, Linear)):
        if name.endswith("lm_head"):
            continue
        out, d_in = linear.out_features, linear.in_features
        codebook = jnp.asarray(rng.standard_normal((out, groups, 2**bits)), jnp.float32)
        codes = jnp.asarray(rng.integers(0, 2**bits, (out, groups, d_in // groups)), jnp.uint8)
        set_submodule(model, name, SketchedLinear.from_linear(linear, codebook, codes))
    return model


def test_end_to_end_on_a_tiny_model_triple(tmp_path, capsys):
    from sketchtune_jax.io.sketched_dir import save_sketched

    dense = tiny_hf_model("llama_gqa", seed=4)
    dense.save_pretrained(tmp_path / "dense")
    config = ModelConfig.from_hf(dense.config.to_dict())
    sketched = _sketch_of(from_state_dict(config, dense.state_dict()), np.random.default_rng(5))
    save_sketched(sketched, config, None, tmp_path / "sketch")
    # The fine-tune's update is rank 2 in q_proj and lies in the sketch space in down_proj.
    torch.manual_seed(6)
    down = get_submodule(sketched, "model.layers.0.mlp.down_proj")
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "layers.0.self_attn.q_proj" in name:
                p += 0.05 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1])
            elif "layers.0.mlp.down_proj" in name:
                p += torch.tensor(np.asarray(down.dense_weight()))
            elif p.ndim == 2 and "embed" not in name:
                p += 0.05 * torch.randn_like(p)
    dense.save_pretrained(tmp_path / "finetuned")

    out = tmp_path / "res" / "analysis.json"
    assert (
        ua.main(
            [
                str(tmp_path / "dense"),
                str(tmp_path / "finetuned"),
                "--sketch",
                str(tmp_path / "sketch"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert list(result["per_type"]) == list(ua.LAYER_TYPES)
    assert len(result["per_module"]) == 7 * config.num_hidden_layers
    q0 = result["per_module"]["model.layers.0.self_attn.q_proj"]
    down0 = result["per_module"]["model.layers.0.mlp.down_proj"]
    assert q0["rank"] >= 2 and q0["svd_error"] < 1e-5 and q0["sketch_error"] > 0.5
    assert down0["sketch_error"] < 1e-5
    assert down0["rank_params"] == down0["rank"] * sum(down0["shape"])
    noise = result["per_module"]["model.layers.1.mlp.up_proj"]
    assert 0.3 < noise["svd_error"] < 1 and 0.3 < noise["sketch_error"] < 1
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(capsys.readouterr().out)["json"] == str(out)


def test_refuses_a_dense_model_as_the_sketch(tmp_path):
    tiny_hf_model("llama_gqa").save_pretrained(tmp_path / "dense")
    with pytest.raises(SystemExit):
        ua.main(
            [
                str(tmp_path / "dense"),
                str(tmp_path / "dense"),
                "--sketch",
                str(tmp_path / "dense"),
                "--out",
                str(tmp_path / "a.json"),
            ]
        )
    assert not (tmp_path / "a.json").exists()
