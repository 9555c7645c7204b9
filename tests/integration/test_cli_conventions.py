"""Command-line conventions: --version, defaults in --help from the settings dataclasses, settings
checked before any model is loaded, exit status 2 / 1 / 130, each library log line once."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
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


def test_flags_are_built_from_the_settings_fields_with_their_defaults_and_help(capsys):
    parser = _parser()
    assert settings_from_args(_Example, parser.parse_args([])) == _Example()
    args = parser.parse_args(["--steps", "5", "--rate", "0.25", "--mode", "slow", "--limit", "9", "--verbose-log"])
    assert settings_from_args(_Example, args) == _Example(5, 0.25, "slow", 9, True)
    assert settings_from_args(_Example, parser.parse_args(["--no-verbose-log"])).verbose_log is False
    text = parser.format_help()
    assert "how many steps (default: 3)" in text and "{fast,slow}" in text
    assert "--internal" not in text  # a field without help is not a flag
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["--mode", "medium"])
    assert refused.value.code == 2
    assert "--mode: invalid choice: 'medium'" in capsys.readouterr().err


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


def test_require_enabled_names_the_settings_a_zero_switch_leaves_unused():
    from sketchtune_jax.settings import changed_settings, require_enabled

    @dataclasses.dataclass(frozen=True)
    class Job:
        steps: int = 0
        lr: float = 0.1
        batch: int = 4

    assert changed_settings(Job(lr=0.2, batch=4), ("batch", "lr")) == ("lr",)
    require_enabled(Job(), "steps", ("lr", "batch"))  # nothing changed: nothing to say
    require_enabled(Job(steps=3, lr=0.2), "steps", ("lr", "batch"))  # the switch is on
    with pytest.raises(SettingError) as caught:
        require_enabled(Job(lr=0.2, batch=8), "steps", ("batch", "lr"))
    assert str(caught.value) == "steps is 0, so batch, lr would do nothing; give N > 0"
    assert caught.value.mentions == ("batch", "lr")


CLI = Path(__file__).resolve().parents[2] / "sketchtune_jax" / "cli"


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command of ``parser``, as argv prefixes."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*path, name), *_commands(sub, (*path, name))]
    return found


def test_every_command_is_a_small_module_that_parses_and_calls():
    import sketchtune_jax.cli as cli

    assert {c.__name__.rsplit(".", 1)[1] for c in cli.COMMANDS} == {c[0] for c in _commands(build_parser())}
    for command in cli.COMMANDS:
        assert callable(command.add_parser) and callable(command.run), command.__name__
    for path in sorted(CLI.glob("*.py")):
        source = path.read_text()
        assert len(source.splitlines()) <= 200, f"{path.name} is over 200 lines: split what it does into the library"
        for node in ast.walk(ast.parse(source)):
            # Errors name settings by field; main renders them as flags (no flag typed by hand).
            if isinstance(node, ast.Raise):
                texts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                assert not [t for t in texts if re.search(r"--[a-z]", t)], (path.name, ast.unparse(node))


def test_every_command_has_help(capsys):
    commands = _commands(build_parser())
    assert {c for c in commands if len(c) == 2} == {("eval", t) for t in ("ppl", "math", "commonsense", "judge")}
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0, command
        out = capsys.readouterr().out
        assert out.startswith(f"usage: sketchtune {' '.join(command)} "), (command, out[:200])
        assert "-v, --verbose" in out, command


def test_the_command_runs_as_a_module_and_as_the_installed_entry_point():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="sketchtune")
    assert script.load() is main
    run = subprocess.run([sys.executable, "-m", "sketchtune_jax.cli", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"sketchtune {__version__}"
