"""The command line: bad input fails fast with a one-line error and writes nothing; info on a real directory."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import pytest
from model_utils import assert_cli_refuses, sketch_tiny_with_cli, tiny_hf_model

import sketchtune_jax as st
from sketchtune_jax.cli import main

WIKI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2" / "test.txt"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_hf_model("llama_gqa").save_pretrained(path)
    return path


def test_sketch_rejects_bad_bits_before_loading(tmp_path, capsys):
    assert_cli_refuses(
        ["sketch", "no/such/model", "--bits", "5", "--calib", str(WIKI), "--out", str(tmp_path / "o")],
        capsys,
        "--bits must be one of 2, 3, 4",
    )
    assert not (tmp_path / "o").exists()


def test_sketch_refuses_an_existing_output(tmp_path, capsys, hf_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_cli_refuses(["sketch", str(hf_dir), "--calib", str(WIKI), "--out", str(out)], capsys, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_sketch_names_a_missing_calibration_file(tmp_path, capsys, hf_dir):
    assert_cli_refuses(
        ["sketch", str(hf_dir), "--calib", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")],
        capsys,
        "calibration file not found",
    )
    assert_cli_refuses(
        ["sketch", str(hf_dir), "--calib", str(WIKI), "--calib-range", "0.9:0.1", "--out", str(tmp_path / "o")],
        capsys,
        "--calib-range",
    )
    assert not (tmp_path / "o").exists()


def test_sketch_rejects_groups_that_do_not_divide_the_widths(tmp_path, capsys, hf_dir):
    assert_cli_refuses(
        ["sketch", str(hf_dir), "--groups-per-row", "5", "--calib", str(WIKI), "--out", str(tmp_path / "o")],
        capsys,
        "does not divide",
    )
    assert not (tmp_path / "o").exists()


def test_model_errors_are_one_line(tmp_path, capsys):
    assert_cli_refuses(["info", str(tmp_path / "missing")], capsys, "missing")
    (tmp_path / "empty").mkdir()
    assert_cli_refuses(["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capsys, "config.json")
    assert not (tmp_path / "o").exists()


def test_finetune_of_a_dense_model_asks_for_a_method(tmp_path, capsys, hf_dir):
    assert_cli_refuses(
        ["finetune", str(hf_dir), "--data", str(WIKI), "--out", str(tmp_path / "run")], capsys, "--method is needed for"
    )
    assert_cli_refuses(
        ["finetune", str(hf_dir), "--data", str(WIKI), "--out", str(tmp_path / "run")],
        capsys,
        "a dense model: choose lora, qlora or full",
    )
    assert not (tmp_path / "run").exists()


def test_eval_commands_name_missing_files(tmp_path, capsys, hf_dir):
    assert_cli_refuses(["eval", "ppl", str(hf_dir), "--text", str(tmp_path / "t.txt")], capsys, "text file not found")
    assert_cli_refuses(["eval", "math", str(hf_dir), "--data", str(tmp_path / "g.json")], capsys, "data file not found")


def test_codebooks_only_apply_to_sketches(tmp_path, capsys, hf_dir):
    assert_cli_refuses(
        ["export", str(hf_dir), "--codebooks", str(tmp_path / "c.safetensors"), "--out", str(tmp_path / "o")],
        capsys,
        "not one",
    )


def test_info_prints_and_writes_json(tmp_path, capsys, hf_dir):
    assert main(["info", str(hf_dir), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    reference = tiny_hf_model("llama_gqa")
    assert info["layers"] == 2 and info["kv_heads"] == 2
    assert info["params"] == sum(p.numel() for p in reference.state_dict().values())
    assert info["bytes"] == 4 * info["params"]


def test_sketch_act_order_is_recorded_and_the_sketch_loads(tmp_path, capsys):
    made = sketch_tiny_with_cli(tmp_path, extra_args=["--act-order"])
    hint = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hint:")]
    assert hint == [
        "hint: at 2 bits, --layer-tune-steps 32, --heal-steps recover much of the loss "
        "to the dense model; see docs/recipes.md"
    ]
    settings = json.loads((made["sketch"] / "sketch_config.json").read_text())["settings"]
    assert settings["act_order"] is True
    assert st.SketchSettings.from_dict(settings).act_order
    assert st.io.sketched_dir.is_sketched_dir(made["sketch"])
    loaded = st.io.sketched_dir.load_sketched(made["sketch"])
    sketched = [m for _, m in loaded.model.iter_modules() if isinstance(m, st.SketchedLinear)]
    assert len(sketched) == 7 * loaded.config.num_hidden_layers
    logits, _ = loaded.model(jnp.ones((1, 8), jnp.int32))
    assert logits.shape == (1, 8, loaded.config.vocab_size) and bool(jnp.isfinite(logits).all())


def test_a_plain_two_bit_sketch_hints_at_layer_tuning_act_order_and_healing(tmp_path, capsys):
    sketch_tiny_with_cli(tmp_path)
    hint = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hint:")]
    assert len(hint) == 1 and "--layer-tune-steps 32, --act-order, --heal-steps recover" in hint[0]


@pytest.mark.parametrize(
    ("settings", "heal_steps", "levers"),
    [
        (dict(bits=2), 0, "{layer_tune_steps} 32, {act_order}, {heal_steps}"),
        (dict(bits=2), 8, "{layer_tune_steps} 32, {act_order}"),
        (dict(bits=2, layer_tune_steps=4), 0, "{act_order}, {heal_steps}"),
        (dict(bits=3, act_order=True), 0, "{layer_tune_steps} 32, {heal_steps}"),
        (dict(bits=3), 0, "{layer_tune_steps} 32, {heal_steps}"),  # act-order helps at 2 bits only
        (dict(bits=3, layer_tune_steps=32), 0, None),  # healing alone is not worth a hint
        (dict(bits=2, layer_tune_steps=32, act_order=True), 0, None),
        (dict(bits=4), 0, None),
    ],
)
def test_the_recovery_hint_is_the_librarys_and_names_the_levers_left_off(settings, heal_steps, levers):
    hint = st.SketchSettings(**settings).recovery_hint(heal_steps=heal_steps)
    if levers is None:
        assert hint is None
        return
    bits = settings["bits"]
    assert hint.text == f"at {bits} bits, {levers} recover much of the loss to the dense model; see docs/recipes.md"
    as_flags = hint.render(lambda name: "--" + name.replace("_", "-"))
    assert "{" not in as_flags and "{" not in str(hint)
    assert ("--act-order" in as_flags) == ("{act_order}" in levers)
