"""Stacked decoder layers run as one scan: the same logits, losses and codebooks as the
per-layer model, the same file names, and a train step whose program does not grow with depth."""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_utils import assert_cli_refuses, jax_logits, random_ids, tiny_sketched_llama  # noqa: E402

from sketchtune_jax.layers import Codebook, SketchedLinear  # noqa: E402
from sketchtune_jax.models import init_cache  # noqa: E402
from sketchtune_jax.models.scan import is_stacked, stack_layers, unstack_layers  # noqa: E402
from sketchtune_jax.train import (  # noqa: E402
    TrainConfig,
    Trainer,
    checkpointing,  # noqa: E402
    codebook_state,
    finetune,
    load_codebooks,
    read_codebooks,
    read_log,
    save_codebooks,
)
from sketchtune_jax.train.checkpointing import saved_parts  # noqa: E402
from sketchtune_jax.train.step import pure_train_step, split_for_step  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def batch(rows: int = 2, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    ids = random_ids(rows, length, seed=seed)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}


def state_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_stacked_forward_and_decode_equal_per_layer_and_unstack_restores():
    model = tiny_sketched_llama(3)
    before = state_arrays(model)
    ids, mask = batch()["input_ids"], batch()["attention_mask"]
    want = jax_logits(model, ids, mask)
    stack_layers(model)
    assert is_stacked(model) and model.model.layers.mlp.down_proj.codes.shape[0] == 3
    np.testing.assert_allclose(jax_logits(model, ids, mask), want, **TOL)

    # The KV-cache path (decoding) slices the stacked layers.
    @nnx.jit
    def prefill(m, x, mk):
        return m(x, attention_mask=mk, cache=init_cache(m.config, x.shape[0], 16))[0]

    real = mask.astype(bool)  # pad queries attend over other slots with a cache
    np.testing.assert_allclose(np.asarray(prefill(model, ids, mask))[real], want[real], **TOL)
    unstack_layers(model)
    assert not is_stacked(model) and len(model.model.layers) == 3
    after = state_arrays(model)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_finetune_scanned_equals_per_layer_and_keeps_file_names(tmp_path):
    batches = [batch(seed=10 + i) for i in range(2)]
    runs = {}
    for scan in (False, True):
        model = tiny_sketched_llama(2)
        # Remat under the scan too: the same values, recomputed.
        config = TrainConfig(lr=1e-2, batch_size=2, seq_len=12, max_steps=2, scan_layers=scan, remat="full")
        result = finetune(model, batches, config, tmp_path / str(scan), progress=False)
        assert not is_stacked(model)  # handed back as it came
        losses = [r["loss"] for r in read_log(result.log_path) if "loss" in r]
        runs[scan] = (losses, *read_codebooks(result.result_path))
    (losses, books, meta), (s_losses, s_books, s_meta) = runs[False], runs[True]
    np.testing.assert_allclose(s_losses, losses, **TOL)
    assert list(s_books) == list(books) and s_meta == meta and "model.layers.1.mlp.down_proj.codebook" in books
    for k in books:
        np.testing.assert_allclose(s_books[k], books[k], **TOL)


def test_codebook_files_keep_per_layer_names(tmp_path):
    model = tiny_sketched_llama(2)
    save_codebooks(model, tmp_path / "plain.safetensors")
    stack_layers(model)
    save_codebooks(model, tmp_path / "stacked.safetensors")
    plain, meta = read_codebooks(tmp_path / "plain.safetensors")
    stacked, stacked_meta = read_codebooks(tmp_path / "stacked.safetensors")
    assert list(stacked) == list(plain) and stacked_meta == meta
    assert all(np.array_equal(stacked[k], plain[k]) for k in plain)
    # Loading per-layer names into stacked layers writes each layer's slice.
    other = tiny_sketched_llama(2, seed=1)
    stack_layers(other)
    load_codebooks(other, tmp_path / "plain.safetensors")
    unstack_layers(other)
    assert all(np.array_equal(v, plain[k]) for k, v in codebook_state(other).items())


def _trainer(model: nnx.Module, run, scan: bool) -> Trainer:
    config = TrainConfig(max_steps=4, batch_size=2, seq_len=12, scan_layers=scan)
    return Trainer(model, [batch()], config, run, progress=False)


def _saved(trainer: Trainer) -> dict[str, np.ndarray]:
    return {
        k: np.asarray(v)
        for k, v in checkpointing._flatten(saved_parts(trainer.model, trainer.optimizer, Codebook)).items()
    }


def test_checkpoints_keep_per_layer_names_and_restore_either_way(tmp_path):
    # Saved stacked, restored per-layer and stacked; nothing trains (no step to compile).
    source = _trainer(tiny_sketched_llama(2), tmp_path, scan=True)
    assert is_stacked(source.model)
    layers = source.model.model.layers
    layers.self_attn.q_proj.codebook.set_value(layers.self_attn.q_proj.codebook[...] + 1.0)
    source.step = 2
    source.save()
    source.checkpoints.close()
    want = _saved(source)
    assert "params/model.layers.1.self_attn.q_proj.codebook" in want
    assert any(k.startswith("opt/") and ".layers.1." in k for k in want)
    for scan in (False, True):
        target = _trainer(tiny_sketched_llama(2, seed=1), tmp_path, scan=scan)
        assert target.restore() == 2 and is_stacked(target.model) == scan
        got = _saved(target)
        target.checkpoints.close()
        assert list(got) == list(want)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_unlike_layers_are_refused_by_name_and_train_unstacked(tmp_path):
    model = tiny_sketched_llama(2)
    lin = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = SketchedLinear(
        lin.in_features,
        lin.out_features,
        bits=3,
        groups=2,
        codebook=np.zeros((lin.out_features, 2, 8), np.float32),
        codes=np.zeros((lin.out_features, 2, lin.in_features // 2), np.uint8),
    )
    with pytest.raises(ValueError, match=r"layer 1 .*mlp\.down_proj"):
        stack_layers(model)
    assert not is_stacked(model) and model.model.layers[0].mlp.down_proj.codes.shape[0] == lin.out_features
    with pytest.warns(UserWarning, match="scan_layers.*unstacked"):
        trainer = _trainer(model, tmp_path, scan=True)
    trainer.checkpoints.close()
    assert not is_stacked(model)


def _train_step_program(layers: int, scan: bool, remat: str = "none") -> str:
    """The lowered (StableHLO) text of a train step of a tiny sketched model."""
    model = tiny_sketched_llama(layers)
    model.model.remat = remat
    if scan:
        stack_layers(model)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=Codebook)
    graphdef, mutable, frozen = split_for_step(model, opt)
    b = {k: jnp.asarray(v) for k, v in batch().items()}
    return pure_train_step.lower(graphdef, mutable, frozen, b).as_text()


def test_scanned_train_step_program_does_not_grow_with_depth():
    shallow, deep = len(_train_step_program(2, True)), len(_train_step_program(6, True))
    assert deep < 1.1 * shallow, (shallow, deep)
    shallow, deep = len(_train_step_program(2, False)), len(_train_step_program(6, False))
    assert deep > 2 * shallow, (shallow, deep)


def test_remat_applies_under_the_scan():
    # The scan's body, one layer, is traced once: remat puts its recomputed forward behind one
    # optimization barrier (per-layer models get one per layer).
    def barriers(scan: bool, remat: str) -> int:
        return _train_step_program(3, scan, remat).count("stablehlo.optimization_barrier")

    assert barriers(True, "full") == barriers(True, "none") + 1
    assert barriers(False, "full") == barriers(False, "none") + 3


def test_cli_flag_sets_scan_layers_and_lora_refuses_it(tmp_path, capsys):
    from sketchtune_jax.cli import build_parser
    from sketchtune_jax.settings import settings_from_args

    base = ["finetune", str(tmp_path), "--data", "d.json", "--out", str(tmp_path / "o")]
    assert settings_from_args(TrainConfig, build_parser().parse_args([*base, "--scan-layers"])).scan_layers
    assert not settings_from_args(TrainConfig, build_parser().parse_args(base)).scan_layers
    line = assert_cli_refuses([*base, "--method", "lora", "--scan-layers"], capsys, "--scan-layers")
    assert "sketch and full" in line
