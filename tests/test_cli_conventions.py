"""Command-line conventions: --version, defaults in --help from the settings dataclasses, settings
checked before any model is loaded, exit status 2 / 1 / 130, each library log line once."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from sketchtune_jax import __version__
from sketchtune_jax.cli import build_parser, main
from sketchtune_jax.settings import SettingError, add_settings_arguments, setting, settings_from_args
from sketchtune_jax.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class _Example:
    steps: int = setting(3, "how many steps")
    rate: float = setting(0.5, "a rate")
    mode: Literal["fast", "slow"] = setting("fast", "which mode")
    limit: int | None = setting(None, "an optional limit")
    verbose_log: bool = setting(False, "log more")
    internal: int = 7

    def __post_init__(self):
        if self.steps < 1:
            raise SettingError("steps", f"must be >= 1, got {self.steps}")


def _parser(prefix: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_settings_arguments(parser, _Example, prefix=prefix)
    return parser


def test_flags_are_built_from_the_settings_fields_with_their_defaults_and_help():
    parser = _parser()
    assert settings_from_args(_Example, parser.parse_args([])) == _Example()
    args = parser.parse_args(["--steps", "5", "--rate", "0.25", "--mode", "slow", "--limit", "9", "--verbose-log"])
    assert settings_from_args(_Example, args) == _Example(5, 0.25, "slow", 9, True)
    assert settings_from_args(_Example, parser.parse_args(["--no-verbose-log"])).verbose_log is False
    text = parser.format_help()
    assert "how many steps (default: 3)" in text and "{fast,slow}" in text
    assert "--internal" not in text  # a field without help is not a flag
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "medium"])


def test_a_prefixed_settings_error_names_the_prefixed_flag():
    parser = _parser(prefix="sub_")
    with pytest.raises(SettingError) as caught:
        settings_from_args(_Example, parser.parse_args(["--sub-steps", "0"]), prefix="sub_")
    assert caught.value.field == "sub_steps"
    assert caught.value.render(lambda name: "--" + name.replace("_", "-")) == "--sub-steps must be >= 1, got 0"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"sketchtune {__version__}"


def _help(*command: str) -> str:
    parser = build_parser()
    for action in parser._subparsers._group_actions:
        sub = action.choices[command[0]]
    for name in command[1:]:
        sub = sub._subparsers._group_actions[0].choices[name]
    return " ".join(sub.format_help().split())


def test_help_shows_defaults_and_model_commands_take_codebooks_adapter_and_json():
    generate = _help("generate")
    assert "tokens to generate after each prompt, at most (default: 64)" in generate
    assert "linear warmup (None: a tenth of the run, at most 100" in _help("finetune")
    for command in (("generate",), ("eval", "ppl"), ("eval", "math"), ("eval", "commonsense"), ("export",)):
        text = _help(*command)
        for flag in ("--codebooks", "--adapter", "--json"):
            assert flag in text, (command, flag)
    for command in (("finetune",), ("sketch",), ("heal",), ("info",), ("convert",)):
        assert "--json" in _help(*command), command


@pytest.fixture
def no_loading(monkeypatch):
    """Fail a test that loads a model: settings must be refused first."""
    import sketchtune_jax.io.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(sketchtune_jax.io.loading, "load_any", refuse)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    ],
)
def test_generate_settings_are_refused_before_loading_with_status_2(no_loading, capsys, flags, message):
    assert main(["generate", "smollm2-135m", "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sketchtune generate: error: {message}"


def test_runtime_failure_is_status_1_in_one_line_and_ctrl_c_130(monkeypatch, capsys):
    import sketchtune_jax.io.loading

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sketchtune_jax.io.loading, "load_any", broken)
    assert main(["info", "smollm2-135m"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "sketchtune info: error: disk on fire (RuntimeError; -v for the traceback)"
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["info", "smollm2-135m", "-v"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sketchtune_jax.io.loading, "load_any", interrupted)
    assert main(["info", "smollm2-135m"]) == 130


def test_library_log_lines_print_once_even_when_the_root_logger_prints_too():
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from sketchtune_jax.cli import _show_library_info\n"
        "_show_library_info(False)\n"
        "logging.getLogger('sketchtune_jax.somewhere').info('hello once')\n"
        "logging.getLogger('sketchtune_jax.somewhere').debug('debug hidden')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("hello once") == 1 and "debug hidden" not in err


def test_default_warmup_fits_short_and_long_runs_and_a_given_one_is_checked():
    assert TrainConfig(max_steps=3).warmup_for(3) == 0
    assert TrainConfig(max_steps=50).warmup_for(50) == 5
    assert TrainConfig(max_steps=5000).warmup_for(5000) == 100
    assert TrainConfig(max_steps=30, warmup_steps=20).warmup_for(30) == 20
    with pytest.raises(SettingError, match=r"warmup_steps must be shorter than the run \(3 steps\), got 5"):
        TrainConfig(max_steps=3, warmup_steps=5)
    with pytest.raises(SettingError, match="warmup_steps must be >= 0"):
        TrainConfig(max_steps=3, warmup_steps=-1)
