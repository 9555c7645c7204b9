"""Every job's flags are built from its settings dataclass: one default, shown by --help, and errors
named by the flag whatever the field is called."""

from __future__ import annotations

import dataclasses

import pytest

from sketchtune_jax.cli import build_parser
from sketchtune_jax.eval.settings import PerplexitySettings, TaskSettings
from sketchtune_jax.settings import SettingError, flag_name, settings_from_args
from sketchtune_jax.sketch.driver import SketchSettings
from sketchtune_jax.train.config import FinetuneSettings, TrainConfig
from sketchtune_jax.train.heal import HealSettings, heal_config
from sketchtune_jax.train.lora import LoraSettings

COMMANDS = {
    "sketch": (["sketch", "m", "--calib", "c", "--out", "o"], [(SketchSettings, "")]),
    "heal": (
        ["heal", "m", "--teacher", "t", "--calib", "c", "--out", "o", "--steps", "1"],
        [(HealSettings, "")],
    ),
    "finetune": (
        ["finetune", "m", "--data", "d", "--out", "o"],
        [(FinetuneSettings, ""), (TrainConfig, ""), (LoraSettings, "lora_")],
    ),
    "eval ppl": (["eval", "ppl", "m", "--text", "t"], [(PerplexitySettings, "")]),
    "eval commonsense": (["eval", "commonsense", "m", "--data", "d"], [(TaskSettings, "")]),
}


def _flagged(cls):
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_default_to_the_dataclass_and_build_it_unchanged(command):
    argv, classes = COMMANDS[command]
    args = build_parser().parse_args(argv)
    for cls, prefix in classes:
        assert _flagged(cls), cls
        built = settings_from_args(cls, args, prefix=prefix, **({"steps": 3} if cls is HealSettings else {}))
        expected = cls(**({"steps": 3} if cls is HealSettings else {}))
        if cls is SketchSettings:
            expected = dataclasses.replace(expected, calib="c")
        assert built == expected, cls


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command, capsys):
    argv, classes = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command.split(), "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls, prefix in classes:
        for field in _flagged(cls):
            flag = "--" + flag_name(field, prefix).replace("_", "-")
            assert flag in text, flag
    assert text.count("(default:") >= sum(len(_flagged(c)) for c, _ in classes) - 1  # --steps is required


def test_train_defaults_are_the_papers_math_recipe():
    config = TrainConfig()
    assert (config.lr, config.batch_size, config.schedule) == (8e-5, 16, "linear")
    assert config.warmup_for(5000) == 100 and config.warmup_for(3) == 0


def test_heal_config_takes_its_defaults_from_heal_settings():
    config, settings = heal_config(steps=7), HealSettings(steps=7)
    assert (config.lr, config.batch_size, config.seq_len, config.schedule, config.save_every) == (
        settings.lr,
        settings.batch_size,
        settings.seq_len,
        settings.schedule,
        settings.save_every,
    )
    assert heal_config(steps=7, lr=1e-3, compute_dtype="bfloat16").compute_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "qlora", "--qlora-tile-size", "0"], "--qlora-tile-size must be positive"),
        (["--method", "lora", "--lora-targets", "qkv"], "--lora-targets ['qkv'] are not projections"),
        (["--method", "qlora", "--loftq-iters", "0"], "--loftq-iters must be a positive integer"),
        (["--method", "lora", "--lora-rank", "x"], "--lora-rank must be a positive integer or 'auto'"),
        (["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
        (["--remat", "nope"], None),
    ],
)
def test_finetune_errors_name_the_flag(tmp_path, capsys, extra, message):
    from model_utils import assert_cli_refuses

    from sketchtune_jax.cli import main

    argv = ["finetune", "no/model", "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "o"), *extra]
    if message is None:  # a choice argparse refuses itself
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "--remat: invalid choice" in capsys.readouterr().err
        return
    assert_cli_refuses(argv, capsys, message)
    assert not (tmp_path / "o").exists()


def test_remat_flag_alone_means_full_and_takes_a_policy():
    base = ["finetune", "m", "--data", "d", "--out", "o"]
    assert settings_from_args(TrainConfig, build_parser().parse_args([*base, "--remat"])).remat == "full"
    assert settings_from_args(TrainConfig, build_parser().parse_args([*base, "--remat", "dots_saveable"])).remat == (
        "dots_saveable"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "ppl", "no/model", "--text", "t.txt", "--max-windows", "0"], "--max-windows must be > 0"),
        (["eval", "math", "no/model", "--data", "d.json", "--batch-size", "0"], "--batch-size must be > 0"),
        (["eval", "commonsense", "no/model", "--data", "d.json", "--limit", "-1"], "--limit must be > 0"),
        (
            ["heal", "no/s", "--teacher", "t", "--calib", "c", "--out", "o", "--steps", "2", "--windows", "1"],
            "--windows",
        ),
    ],
)
def test_evaluation_and_heal_settings_are_checked_before_any_work(argv, message, capsys):
    from model_utils import assert_cli_refuses

    assert_cli_refuses(argv, capsys, message)


@pytest.mark.parametrize("command", ["sketch", "finetune"])
def test_distributed_flags_are_built_from_distributed_settings(command):
    from sketchtune_jax.parallel.distributed import DEFAULT_TIMEOUT_S, DistributedSettings, distributed_settings

    argv = COMMANDS[command][0]
    one_process = build_parser().parse_args(argv)
    assert one_process.distributed_timeout == DEFAULT_TIMEOUT_S == DistributedSettings.timeout_s
    assert settings_from_args(DistributedSettings, one_process, build=distributed_settings) is None
    flags = ["--coordinator", "h:9", "--num-processes", "3", "--process-id", "2", "--distributed-timeout", "5"]
    built = settings_from_args(
        DistributedSettings, build_parser().parse_args([*argv, *flags]), build=distributed_settings
    )
    assert built == DistributedSettings("h:9", 3, 2, 5.0) and (built.host, built.port) == ("h", 9)
    partial = build_parser().parse_args([*argv, "--num-processes", "3", "--distributed-timeout", "0"])
    with pytest.raises(SettingError) as caught:
        settings_from_args(DistributedSettings, partial, build=distributed_settings)
    assert caught.value.field == "num_processes" and caught.value.mentions == ("coordinator", "process_id")
    with pytest.raises(SettingError, match="distributed_timeout must be a finite number of seconds > 0, got 0.0"):
        settings_from_args(DistributedSettings, build_parser().parse_args([*argv, *flags[:-1], "0"]))
