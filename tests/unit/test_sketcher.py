"""Whole-model sketching: every projection swapped, saved and loaded exactly, exported, resumed after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from model_utils import hf_logits, random_ids, tiny_hf_model

from converters import export_hf, from_state_dict
from sketchtune_jax._utils.module_paths import iter_modules
from sketchtune_jax.io.sketched_dir import load_sketched, save_sketched
from sketchtune_jax.layers import Linear, SketchedLinear
from sketchtune_jax.models import DecoderLayer, ModelConfig
from sketchtune_jax.sketch.driver import SketchSettings, sketch_model
from sketchtune_jax.train import trainable_parameter_count

SUPPORT = Path(__file__).resolve().parents[1] / "support"


def _tiny(name: str = "llama_gqa", **overrides):
    hf = tiny_hf_model(name, **overrides)
    config = ModelConfig.from_hf(hf.config.to_dict())
    return config, from_state_dict(config, hf.state_dict())


@pytest.fixture(scope="module")
def sketched():
    config, model = _tiny("bias_untied")
    ids = jnp.asarray(random_ids(2, 24))
    dense_logits, _ = model(ids)
    report = sketch_model(
        model, random_ids(16, 32, seed=1), SketchSettings(bits=3, groups_per_row=2), show_progress=False
    )
    return config, model, ids, np.asarray(dense_logits), report


def test_every_decoder_projection_is_sketched_and_the_head_is_not(sketched):
    config, model, _, _, report = sketched
    names = {name for name, _ in iter_modules(model, SketchedLinear)}
    expected = {
        f"model.layers.{i}.{m}" for i in range(config.num_hidden_layers) for m in sum(DecoderLayer.SKETCH_STAGES, ())
    }
    assert names == expected
    assert isinstance(model.lm_head, Linear)
    assert len(report["modules"]) == len(expected)
    assert all(0 <= r["rel_output_error"] < 0.05 for r in report["modules"])


def test_trainable_count_is_rows_times_groups_times_codebook_size(sketched):
    config, model, *_ = sketched
    rows_per_layer = (
        (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        + config.hidden_size
        + 2 * config.intermediate_size
        + config.hidden_size
    )
    assert trainable_parameter_count(model) == config.num_hidden_layers * rows_per_layer * 2 * 2**3


def test_sketched_logits_stay_close_to_dense(sketched):
    _, model, ids, dense, _ = sketched
    logits, _ = model(ids)
    rel = np.linalg.norm(np.asarray(logits) - dense) / np.linalg.norm(dense)
    assert rel < 0.1


def test_save_then_load_gives_identical_logits(sketched, tmp_path):
    config, model, ids, _, report = sketched
    save_sketched(model, config, None, tmp_path / "sk", settings={"bits": 3}, report=report)
    loaded = load_sketched(tmp_path / "sk")
    np.testing.assert_array_equal(np.asarray(loaded.model(ids)[0]), np.asarray(model(ids)[0]))
    with pytest.raises(FileExistsError, match="not empty"):
        save_sketched(model, config, None, tmp_path / "sk")


def test_dense_export_loads_in_transformers_with_the_same_logits(sketched, tmp_path):
    from transformers import AutoModelForCausalLM

    config, model, ids, _, _ = sketched
    export_hf(model, config, None, tmp_path / "dense")
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", torch_dtype=torch.float32, attn_implementation="eager"
    )
    np.testing.assert_allclose(hf_logits(hf, np.asarray(ids)), np.asarray(model(ids)[0]), atol=1e-4, rtol=0)


def test_load_refuses_a_checkpoint_with_a_wrong_tensor(sketched, tmp_path):
    import safetensors.numpy

    config, model, *_ = sketched
    save_sketched(model, config, None, tmp_path / "sk")
    weights = tmp_path / "sk" / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    tensors["model.layers.0.self_attn.q_proj.codebook"] = tensors["model.layers.0.self_attn.q_proj.codebook"][:-1]
    safetensors.numpy.save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="q_proj.codebook.*shape"):
        load_sketched(tmp_path / "sk")


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(bits=5), "bits must be one of 2, 3, 4"),
        (dict(hessian_exponent=-1.0), "hessian_exponent must be a finite number >= 0"),
        (dict(percdamp=0.0), "percdamp must be a finite number > 0"),
        (dict(calib_range=(0.5, 0.5)), "calib_range must be fractions"),
        (dict(layer_tune_steps=-1), "layer_tune_steps must be >= 0"),
        (dict(layer_tune_lr=float("nan")), "layer_tune_lr must be a finite number > 0"),
    ],
)
def test_impossible_settings_are_refused_when_made(fields, match):
    with pytest.raises(ValueError, match=match):
        SketchSettings(**fields)


def test_settings_that_do_not_fit_the_model_are_refused_before_any_work():
    _, model = _tiny()
    with pytest.raises(ValueError, match="does not divide"):
        sketch_model(model, random_ids(2, 8), SketchSettings(groups_per_row=7), show_progress=False)
    assert not list(iter_modules(model, SketchedLinear))


def test_settings_saved_with_the_old_name_s_still_read():
    old = {"bits": 3, "s": 2.0, "calib_range": [0.5, 1.0], "unknown_later_field": 1}
    assert SketchSettings.from_dict(old) == SketchSettings(bits=3, hessian_exponent=2.0, calib_range=(0.5, 1.0))


def test_nan_weights_are_refused_with_the_module_named():
    _, model = _tiny()
    w = model.model.layers[0].mlp.up_proj.weight
    w[...] = w[...].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        sketch_model(model, random_ids(2, 8), SketchSettings(bits=4, groups_per_row=2), show_progress=False)


def test_error_feedback_lowers_the_model_error():
    """On a whole (tiny) model, the full method beats mapping without error feedback."""
    errors = {}
    for name, settings in {
        "full": SketchSettings(bits=2, groups_per_row=1),
        "no_feedback": SketchSettings(bits=2, groups_per_row=1, error_feedback=False),
    }.items():
        _, model = _tiny()
        errors[name] = sketch_model(model, random_ids(16, 32, seed=1), settings, show_progress=False)[
            "mean_rel_output_error"
        ]
    assert errors["full"] < errors["no_feedback"]


def test_act_order_puts_every_column_back_where_it_was():
    """Sketched in act order, each projection's error stays that of a sketch: a code or
    weight left in the sweep's order would be a different matrix (errors near 1 or more)."""
    rows = {}
    for act_order in (False, True):
        _, model = _tiny()
        report = sketch_model(
            model,
            random_ids(16, 32, seed=1),
            SketchSettings(bits=3, groups_per_row=2, act_order=act_order),
            show_progress=False,
        )
        rows[act_order] = [(r["module"], r["rel_output_error"]) for r in report["modules"]]
    # Measured 0.91-1.05x the plain errors module by module; a column out of place costs ~100x.
    for (module, plain), (_, ordered) in zip(rows[False], rows[True]):
        assert ordered < 1.2 * plain, (module, ordered, plain)


def test_layer_tuning_brings_held_out_logits_closer_to_dense_and_keeps_the_codes():
    """Tuning each layer's codebooks to the dense layer's output (codes frozen) lowers the
    error of the whole model's logits on token rows the calibration never saw."""
    held_out = jnp.asarray(random_ids(4, 32, seed=7))
    _, dense = _tiny()
    dense_logits = np.asarray(dense(held_out)[0])
    results = {}
    for steps in (0, 30):
        _, model = _tiny()
        settings = SketchSettings(bits=2, groups_per_row=1, layer_tune_steps=steps, layer_tune_lr=3e-3)
        report = sketch_model(model, random_ids(16, 32, seed=1), settings, show_progress=False)
        logits = np.asarray(model(held_out)[0])
        codes = {name: np.asarray(m.codes[...]) for name, m in iter_modules(model, SketchedLinear)}
        results[steps] = (np.mean((logits - dense_logits) ** 2), codes, report)
    (untuned, codes0, _), (tuned, codes1, report) = results[0], results[30]
    # Tuning moves codebooks only; later layers see tuned inputs, so only layer 0's codes must match.
    first = [k for k in codes0 if k.startswith("model.layers.0.")]
    assert first and all(np.array_equal(codes0[k], codes1[k]) for k in first)
    assert all(r["layer_error_after"] < 0.9 * r["layer_error_before"] for r in report["modules"])
    assert tuned < 0.9 * untuned, (tuned, untuned)


def _run(work: Path, out: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, str(SUPPORT / "sketch_resume_script.py"), str(work), str(out), str(pause)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_a_killed_sketch_resumes_to_the_same_result(tmp_path):
    unbroken = _run(tmp_path / "w_full", tmp_path / "full.npz", 0.0)
    killed = _run(tmp_path / "w_kill", tmp_path / "kill.npz", 600.0)
    first_layer = tmp_path / "w_kill" / "layer_0000.safetensors"
    deadline = time.time() + 300
    while not first_layer.exists():
        assert killed.poll() is None, killed.stdout.read().decode()
        assert time.time() < deadline, "the first layer was never saved"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "w_kill" / "layer_0001.safetensors").exists()
    resumed = _run(tmp_path / "w_kill", tmp_path / "kill.npz", 0.0)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    assert unbroken.wait(timeout=300) == 0, unbroken.stdout.read().decode()
    full, kill = np.load(tmp_path / "full.npz"), np.load(tmp_path / "kill.npz")
    assert sorted(full.files) == sorted(kill.files) and len(full.files) == 3 * 7 * 2
    for key in full.files:
        np.testing.assert_array_equal(full[key], kill[key], err_msg=key)


def test_a_resumed_sketch_reports_the_time_its_resumed_layers_took(tmp_path):
    ids, settings = random_ids(8, 16, seed=1), SketchSettings(bits=2, groups_per_row=1)
    first = sketch_model(_tiny()[1], ids, settings, work_dir=tmp_path, show_progress=False)
    (tmp_path / "layer_0001.safetensors").unlink()  # as if stopped before the second layer was saved
    again = sketch_model(_tiny()[1], ids, settings, work_dir=tmp_path, show_progress=False)
    per_layer = {r["layer"]: r["layer_seconds"] for r in first["modules"]}
    assert first["resumed_layers"] == 0 and again["resumed_layers"] == len(per_layer) - 1
    assert {r["layer"]: r["layer_seconds"] for r in again["modules"] if r["layer"] != 1} == {
        k: v for k, v in per_layer.items() if k != 1
    }
    assert all(v > 0 for v in per_layer.values())
    assert again["seconds"] > sum(v for k, v in per_layer.items() if k != 1)


def test_whole_model_gradients_match_between_pallas_and_the_jnp_twins(sketched):
    """Codebook gradients of a whole sketched model: Pallas kernels (interpret mode) = jnp reference."""
    import jax

    from sketchtune_jax.layers import Codebook

    _, model, ids, _, _ = sketched

    def loss(m):
        logits, _ = m(ids)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 1])

    grad = nnx.grad(loss, argnums=nnx.DiffState(0, Codebook))
    model = nnx.clone(model)
    model.set_attributes(backend="reference", raise_if_not_found=False)
    reference = nnx.to_flat_state(grad(model))
    model.set_attributes(backend="interpret", raise_if_not_found=False)
    kernels = nnx.to_flat_state(grad(model))
    assert len(reference) == 2 * 7
    for (path, a), (_, b) in zip(reference, kernels):
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), rtol=1e-4, atol=1e-6, err_msg=str(path))
        assert np.abs(np.asarray(a[...])).max() > 0


def test_fraction_ranges_parse_from_text_or_pairs_and_refuse_what_is_not_a_slice_of_a_text():
    from sketchtune_jax.data.text import text_fraction
    from sketchtune_jax.settings import SettingError, fraction_range, fraction_ranges_meet

    assert fraction_range("0.25:0.5", "text_range") == (0.25, 0.5) == fraction_range([0.25, 0.5], "text_range")
    for bad, match in [("0.5", "START:END fractions"), ("a:b", "START:END"), ("0.7:0.2", "0 <= START < END <= 1")]:
        with pytest.raises(SettingError, match=f"calib_range must be .*{match}"):
            fraction_range(bad, "calib_range")
    assert fraction_ranges_meet((0.25, 0.5), (0.4, 1.0)) and fraction_ranges_meet((0.0, 1.0), (0.3, 0.4))
    assert not fraction_ranges_meet((0.25, 0.5), (0.5, 1.0)) and not fraction_ranges_meet((0.5, 1.0), (0.0, 0.25))
    assert text_fraction("abcdefghij", (0.2, 0.5)) == "cde"
    with pytest.raises(SettingError, match="text_range must be fractions"):
        text_fraction("abcdefghij", (0.5, 1.5))
