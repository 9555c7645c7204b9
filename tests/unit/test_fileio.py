"""Atomic writes and output-directory checks."""

import json
import os
import stat

import pytest

from sketchtune_jax._utils.fileio import atomic_directory, check_output_dir, write_json_atomic


def test_write_json_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": [1, 2]})
    assert json.loads(target.read_text()) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_check_output_dir_refuses_non_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="set overwrite to replace it") as refused:
        check_output_dir(tmp_path / "out")
    # The library names its own setting; the CLI renders the same error with the flag.
    assert "--overwrite" not in str(refused.value)
    assert "set --overwrite to replace it" in refused.value.render(lambda name: f"--{name}")
    check_output_dir(tmp_path / "out", overwrite=True)
    check_output_dir(tmp_path / "new")


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_overwrite_swaps_contents(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_setting_errors_name_settings_as_the_library_does_and_render_flags_for_the_cli():
    from sketchtune_jax.settings import SettingError

    e = SettingError("nsamples", "of 9 windows do not fit; lower {nsamples} or {seq_len}", ("nsamples", "seq_len"))
    assert str(e) == "nsamples of 9 windows do not fit; lower nsamples or seq_len"
    flags = e.render(lambda name: "--" + name.replace("_", "-"))
    assert flags == "--nsamples of 9 windows do not fit; lower --nsamples or --seq-len"


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_outputs_get_the_modes_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    from sketchtune_jax._utils.fileio import atomic_write_bytes, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        atomic_write_bytes(tmp_path / "b.bin", b"x")
        with atomic_directory(tmp_path / "out") as staged:
            (staged / "inside.txt").write_text("1")
            # As safetensors' save_file leaves its files: private, whatever the umask.
            (staged / "sub").mkdir(mode=0o700)
            (staged / "sub" / "weights.safetensors").write_bytes(b"w")
            (staged / "sub" / "weights.safetensors").chmod(0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "out" / "inside.txt").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "out" / "sub" / "weights.safetensors").stat().st_mode) == file_mode
