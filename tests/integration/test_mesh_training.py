"""Fine-tuning a sketched Llama on a device mesh (8 fake CPU devices), against one device:
the same losses and codebooks, and a run saved on one mesh resumes on another.

`test_mesh_training_in_subprocess` reruns this file with 8 devices (see `fake_devices`).
Meshes sum in other orders than one device does, so results agree to rounding, not bits.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from fake_devices import rerun_on_fake_devices
from flax import nnx
from model_utils import random_ids, tiny_hf_model

from converters import from_state_dict
from sketchtune_jax.layers import Codebook
from sketchtune_jax.models import ModelConfig
from sketchtune_jax.parallel.sharding import shard_batch, shard_model, shard_optimizer_state
from sketchtune_jax.sketch.driver import SketchSettings, sketch_model
from sketchtune_jax.train import TrainConfig, codebook_state, finetune, read_log

DEVICES = 8
needs_8 = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 devices (run by test_mesh_training_in_subprocess)"
)
# Losses and Adam-updated codebooks after 4 steps; fp32 sums in other orders differ by ~1e-6.
TOL = dict(rtol=1e-4, atol=1e-5)


def test_mesh_training_in_subprocess():
    rerun_on_fake_devices(__file__, DEVICES, "test_mesh_training_in_subprocess")


@functools.cache
def _sketch() -> nnx.Module:
    # 4 heads, 2 KV heads, hidden 32, MLP 48, vocab 96: rows divide model=4 and vocab data=2;
    # 4 groups per row let o_proj and down_proj split by columns over model=4.
    hf = tiny_hf_model("llama_gqa")
    model = from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())
    sketch_model(model, random_ids(16, 32, seed=1), SketchSettings(bits=3, groups_per_row=4), show_progress=False)
    return model


def fresh_sketch() -> nnx.Module:
    """A copy of the cached sketch with arrays of its own (training donates its buffers)."""
    model = nnx.clone(_sketch())
    nnx.update(model, jax.tree.map(lambda a: a.copy(), nnx.state(model)))
    return model


def batches() -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(4):
        ids = random_ids(4, 16, seed=10 + i)
        loss_mask = np.ones_like(ids)
        loss_mask[:, :4] = 0
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask})
    return out


def config(steps: int) -> TrainConfig:
    # A constant rate: a 2-step run is the first half of a 4-step one.
    return TrainConfig(lr=1e-2, schedule="constant", max_steps=steps, batch_size=4, seq_len=16, save_every=2)


def mesh_of(shape: tuple[int, int]) -> jax.sharding.Mesh:
    devices = jax.devices()[: shape[0] * shape[1]]
    return jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def train(out_dir, steps: int, shape: tuple[int, int] | None) -> nnx.Module:
    """Fine-tune a fresh sketch in ``out_dir`` (resuming a run there) on a ``(data, model)`` mesh, or one device."""
    model = fresh_sketch()
    put_batch = None
    if shape is not None:
        mesh = mesh_of(shape)
        shard_model(model, mesh)
        put_batch = functools.partial(shard_batch, mesh=mesh)
    finetune(model, batches(), config(steps), out_dir, progress=False, put_batch=put_batch)
    return model


def losses(out_dir) -> np.ndarray:
    return np.array([r["loss"] for r in read_log(out_dir / "train_log.jsonl") if "loss" in r])


def assert_codebooks_close(a: nnx.Module, b: nnx.Module) -> float:
    """Codebooks of ``a`` and ``b`` agree within `TOL`; returns the largest difference."""
    ca, cb = codebook_state(a), codebook_state(b)
    assert ca.keys() == cb.keys()
    for k in ca:
        np.testing.assert_allclose(ca[k], cb[k], **TOL, err_msg=k)
    return max(float(np.max(np.abs(ca[k] - cb[k]))) for k in ca)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference: 4 steps on one device, unbroken."""
    out = tmp_path_factory.mktemp("one") / "run"
    return train(out, 4, None), losses(out)


@needs_8
def test_sharded_training_matches_one_device(one_device, tmp_path):
    model, want = one_device
    sharded = train(tmp_path / "run", 4, (2, 4))
    assert sharded.model.layers[0].self_attn.o_proj.sharding.split == "columns"
    got = losses(tmp_path / "run")
    np.testing.assert_allclose(got, want, **TOL)
    assert not np.allclose(got[0], got[-1]), "training did not move the loss"
    diff = assert_codebooks_close(sharded, model)
    print(f"8 devices vs one: max |loss diff| {np.max(np.abs(got - want)):.2e}, max |codebook diff| {diff:.2e}")


@needs_8
def test_optimizer_moments_are_split_over_data_as_well():
    """ZeRO-1: each codebook is split 4 ways (over model) but its Adam moments 8 ways (model x data)."""
    import optax

    model = shard_model(fresh_sketch(), mesh_of((2, 4)))
    optimizer = shard_optimizer_state(nnx.Optimizer(model, optax.adam(1e-3), wrt=Codebook))
    moments = [v[...] for _, v in nnx.to_flat_state(nnx.state(optimizer, nnx.OptState)) if v.ndim == 3]
    books = [v[...] for _, v in nnx.to_flat_state(nnx.state(model, Codebook))]
    assert len(moments) == 2 * len(books) == 2 * 7 * 2
    for a in books:
        assert a.addressable_shards[0].data.size * 4 == a.size
    for a in moments:
        assert a.addressable_shards[0].data.size * 8 == a.size, a.sharding


@needs_8
@pytest.mark.parametrize("resume_shape", [(2, 2), None], ids=["data2-model2", "one-device"])
def test_resume_on_another_mesh(one_device, tmp_path, resume_shape):
    """Saved at step 2 on data=2,model=4; resumed to step 4 on 4 devices, or on one."""
    model, want = one_device
    first = tmp_path / "first"
    train(first, 2, (2, 4))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(first, resumed_dir)
    resumed = train(resumed_dir, 4, resume_shape)
    got = losses(resumed_dir)
    assert len(got) == 4
    np.testing.assert_allclose(got, want, **TOL)
    diff = assert_codebooks_close(resumed, model)
    print(f"resume on {resume_shape}: max |loss diff| {np.max(np.abs(got - want)):.2e}, codebooks {diff:.2e}")
    if resume_shape is not None:
        assert resumed.model.layers[0].mlp.down_proj.codebook[...].sharding.mesh.devices.size == 4


WORDS = "the cat sat on a mat while two dogs ran past the red barn and a bird sang in the old tree".split()


def _text(n: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def sketch_dir(tmp_path_factory):
    """A sketched tiny Llama on disk (4 groups per row) and 7 instruction records (a short last batch)."""
    from model_utils import save_tiny_model_with_tokenizer

    from sketchtune_jax.cli import main

    root = tmp_path_factory.mktemp("cli")
    calib = root / "calib.txt"
    calib.write_text("\n".join(_text(60, s) for s in range(40)))
    from sketchtune_jax.data.prompts import format_prompt

    save_tiny_model_with_tokenizer(root / "hf", [calib.read_text(), format_prompt("x", "") * 20])
    argv = ["sketch", str(root / "hf"), "--bits", "3", "--groups-per-row", "4", "--calib", str(calib)]
    assert (
        main([*argv, "--nsamples", "4", "--seq-len", "32", "--kmeans-iters", "3", "--out", str(root / "sketch")]) == 0
    )
    data = root / "data.json"
    records = [{"instruction": _text(6, s), "input": "", "output": _text(4, s + 1)} for s in range(7)]
    data.write_text(json.dumps(records))
    return root / "sketch", data


def _cli_finetune(sketch_dir, out, *extra: str) -> int:
    from sketchtune_jax.cli import main

    sketch, data = sketch_dir
    argv = ["finetune", str(sketch), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4"]
    return main([*argv, "--seq-len", "128", "--warmup-steps", "0", "--lr", "1e-2", "--pad-multiple", "128", *extra])


@needs_8
def test_cli_finetune_on_a_mesh_matches_one_device(sketch_dir, tmp_path):
    """Two steps (the second a short batch of 3 rows, padded to split over data=2) give one device's losses."""
    assert _cli_finetune(sketch_dir, tmp_path / "mesh", "--mesh", "data=2,model=4") == 0
    with jax.default_device(jax.devices()[0]):
        assert _cli_finetune(sketch_dir, tmp_path / "one") == 0
    summary = json.loads((tmp_path / "mesh" / "summary.json").read_text())
    assert summary["mesh"] == "data=2,model=4" and summary["step"] == 2
    np.testing.assert_allclose(losses(tmp_path / "mesh"), losses(tmp_path / "one"), **TOL)


@needs_8
def test_cli_refuses_a_batch_the_data_axis_does_not_divide(sketch_dir, tmp_path, capsys):
    assert _cli_finetune(sketch_dir, tmp_path / "run", "--mesh", "data=2,model=4", "--batch-size", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "--batch-size must be divisible by the 2 devices of the data axis of --mesh, got 3" in err, err
    assert not (tmp_path / "run").exists()
