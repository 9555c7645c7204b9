"""Fine-tuning: only codebooks move, accumulation is exact, NaN stops cleanly, a killed run resumes exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_lm import TinyCausalLM  # noqa: E402

from sketchtune_jax.data.batches import (
    DataPosition,  # noqa: E402
    pad_rows,  # noqa: E402
)
from sketchtune_jax.layers import Codebook  # noqa: E402
from sketchtune_jax.train import (  # noqa: E402
    CodebookMismatchError,
    NonFiniteLossError,
    TrainConfig,
    codebook_state,
    finetune,
    load_codebooks,
    loss_and_grads,
    make_optimizer,
    make_schedule,
    read_codebooks,
    read_log,
    save_codebooks,
    stack_micro_batches,
    train_step,
    trainable_parameter_count,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(os.path.dirname(HERE), "support")
VOCAB = 64


def make_batch(rows, length, *, seed=0, min_len=4):
    """Random right-padded batch: [rows, length] int32 dict with a loss mask on the second half."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (rows, length)).astype(np.int32)
    attn = np.zeros_like(ids)
    loss = np.zeros_like(ids)
    for r in range(rows):
        n = int(rng.integers(min_len, length + 1))
        attn[r, :n] = 1
        loss[r, n // 2 : n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def to_jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def non_codebook_leaves(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(Codebook)))}


def test_only_codebooks_change():
    model = TinyCausalLM()
    before_frozen = non_codebook_leaves(model)
    before_cb = codebook_state(model)
    kinds = {type(v).__name__ for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(Codebook)))}
    assert {"Codes", "Param"} <= kinds  # codes, embeddings, norms, head are all covered below
    codes, embed = model.layers[0].q.codes.get_value(), model.embed.get_value()
    config = TrainConfig(lr=1e-2, max_steps=3, weight_decay=0.1)
    opt = nnx.Optimizer(model, make_optimizer(config, 3), wrt=Codebook)
    for i in range(3):
        train_step(model, opt, to_jnp(make_batch(4, 16, seed=i)))
    # Frozen state is an input of the step only: the very same arrays, never copied.
    assert model.layers[0].q.codes.get_value() is codes and model.embed.get_value() is embed
    after_frozen = non_codebook_leaves(model)
    assert before_frozen.keys() == after_frozen.keys()
    for k in before_frozen:
        assert before_frozen[k].dtype == after_frozen[k].dtype
        assert np.array_equal(before_frozen[k], after_frozen[k]), k
    after_cb = codebook_state(model)
    assert all(not np.array_equal(before_cb[k], after_cb[k]) for k in before_cb)


def test_trainable_count():
    d, groups, bits, layers = 32, 2, 4, 2
    model = TinyCausalLM(d=d, layers=layers, groups=groups, bits=bits)
    rows_per_layer = 4 * d + 2 * d + d  # q, k, v, o; up (2d rows); down
    assert trainable_parameter_count(model) == layers * rows_per_layer * groups * 2**bits
    model3 = TinyCausalLM(d=d, layers=1, groups=4, bits=3)
    assert trainable_parameter_count(model3) == rows_per_layer * 4 * 8


def test_loss_falls_when_memorising():
    model = TinyCausalLM()
    batch = to_jnp(make_batch(4, 16, seed=0))
    config = TrainConfig(lr=1e-2, max_steps=40, schedule="constant")
    opt = nnx.Optimizer(model, make_optimizer(config, 40), wrt=Codebook)
    losses = [float(train_step(model, opt, batch)["loss"]) for _ in range(40)]
    assert losses[-1] < 0.4 * losses[0], losses


def test_grad_accumulation_equals_one_large_batch():
    # Two micro-batches with different lengths and token counts: the sum of
    # token-weighted gradients must equal the gradient of the concatenated batch.
    a, b = make_batch(3, 16, seed=1), make_batch(3, 12, seed=2)
    stacked = stack_micro_batches([a, b])
    assert stacked["input_ids"].shape == (2, 3, 16)
    big = {k: np.concatenate([a[k], np.pad(b[k], ((0, 0), (0, 4)))]) for k in a}
    m1, m2 = TinyCausalLM(), TinyCausalLM()
    loss_acc, g_acc = loss_and_grads(m1, to_jnp(stacked))
    loss_big, g_big = loss_and_grads(m2, to_jnp(big))
    np.testing.assert_allclose(float(loss_acc), float(loss_big), rtol=1e-6)
    for (p, x), (_, y) in zip(nnx.to_flat_state(g_acc), nnx.to_flat_state(g_big)):
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), rtol=1e-5, atol=1e-7, err_msg=str(p))


def test_filler_rows_add_nothing():
    a, b = make_batch(4, 16, seed=3), make_batch(2, 16, seed=4)
    stacked = stack_micro_batches([a, b])
    assert stacked["input_ids"].shape == (2, 4, 16)
    assert stacked["loss_mask"][1, 2:].sum() == 0 and stacked["attention_mask"][1, 2:, 0].all()
    big = {k: np.concatenate([a[k], b[k]]) for k in a}
    l1, g1 = loss_and_grads(TinyCausalLM(), to_jnp(stacked))
    l2, g2 = loss_and_grads(TinyCausalLM(), to_jnp(big))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for (_, x), (_, y) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2)):
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), rtol=1e-5, atol=1e-7)


def test_padded_rows_add_nothing():
    """`pad_rows` fills a short batch up to a multiple of the data axis without changing loss or grads."""
    batch = make_batch(3, 16, seed=5)
    padded = pad_rows(batch, 4)
    assert padded["input_ids"].shape == (4, 16) and pad_rows(batch, 3) is batch
    assert padded["loss_mask"][3].sum() == 0 and padded["attention_mask"][3, 0] == 1
    stacked = pad_rows(stack_micro_batches([batch, make_batch(3, 16, seed=6)]), 2, dim=1)
    assert stacked["input_ids"].shape == (2, 4, 16) and stacked["attention_mask"][:, 3, 0].all()
    l1, g1 = loss_and_grads(TinyCausalLM(), to_jnp(padded))
    l2, g2 = loss_and_grads(TinyCausalLM(), to_jnp(batch))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for (_, x), (_, y) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2)):
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), rtol=1e-5, atol=1e-7)


def test_schedule_and_config():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="linear", max_steps=110)
    s = make_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and math.isclose(float(s(5)), 0.5) and math.isclose(float(s(10)), 1.0)
    assert math.isclose(float(s(60)), 0.5, rel_tol=1e-6) and float(s(110)) == 0.0
    cos = make_schedule(TrainConfig(lr=1.0, schedule="cosine", warmup_steps=0, max_steps=100), 100)
    assert math.isclose(float(cos(50)), 0.5, rel_tol=1e-6)
    assert float(make_schedule(TrainConfig(lr=2.0, schedule="constant", max_steps=5), 5)(4)) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


class PoisonedLM(TinyCausalLM):
    """Returns NaN logits for any batch containing token ``POISON``."""

    POISON = VOCAB - 1

    def __call__(self, input_ids, **kw):
        logits, cache = super().__call__(input_ids, **kw)
        return jnp.where(jnp.any(input_ids == self.POISON), jnp.nan, logits), cache


def test_nan_loss_stops_naming_step_and_batch(tmp_path):
    batches = []
    for i in range(6):
        b = make_batch(2, 16, seed=10 + i)
        b["input_ids"] = np.where(b["input_ids"] == PoisonedLM.POISON, 0, b["input_ids"])
        batches.append(b)
    batches[4]["input_ids"][0, 0] = PoisonedLM.POISON
    config = TrainConfig(lr=1e-3, max_steps=6, save_every=2, batch_size=2, seq_len=16)
    model = PoisonedLM()
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan.* at step 5 \(batch: epoch 0, index 4\).*step 4"
    ) as info:
        finetune(model, batches, config, tmp_path / "run", progress=False)
    assert info.value.step == 5 and info.value.position == DataPosition(0, 4)
    steps = sorted(int(p) for p in os.listdir(tmp_path / "run" / "checkpoints") if p.isdigit())
    assert steps == [2, 4]
    assert [r["step"] for r in read_log(tmp_path / "run" / "train_log.jsonl")] == [1, 2, 3, 4]
    # The last good checkpoint restores finite codebooks.
    fresh = PoisonedLM()
    from sketchtune_jax.train import Trainer

    trainer = Trainer(fresh, batches, config, tmp_path / "run", progress=False)
    assert trainer.restore() == 4 and trainer.position == DataPosition(0, 4)
    trainer.checkpoints.close()
    assert all(np.isfinite(v).all() for v in codebook_state(fresh).values())


def test_finetune_outputs_and_resume_in_process(tmp_path):
    batches = [make_batch(2, 16, seed=20 + i) for i in range(4)]
    val = [make_batch(2, 16, seed=40)]
    config = TrainConfig(lr=1e-2, epochs=2, batch_size=2, seq_len=16, save_every=3, eval_every=4)
    model = TinyCausalLM()
    result = finetune(model, batches, config, tmp_path / "run", val_batches=val, progress=False)
    assert result.step == 8 and result.resumed_from is None and result.val_loss is not None
    for name in ("train_log.jsonl", "codebooks.safetensors", "loss_curve.png"):
        assert os.path.getsize(tmp_path / "run" / name) > 0
    log = read_log(result.log_path)
    train_records = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    assert {"lr", "grad_norm", "tokens_per_s", "loss_tokens", "elapsed_s"} <= set(train_records[0])
    elapsed = [r["elapsed_s"] for r in train_records]
    assert 0 < elapsed[0] and all(a < b for a, b in zip(elapsed, elapsed[1:]))
    assert result.earlier_seconds == 0.0
    assert [r["step"] for r in log if "val_loss" in r] == [4, 8]
    # Same command again: resumes from step 8, does nothing more, same codebooks.
    again = TinyCausalLM()
    result2 = finetune(again, batches, config, tmp_path / "run", val_batches=val, progress=False)
    assert result2.resumed_from == 8 and result2.step == 8
    assert result2.earlier_seconds == elapsed[-1]  # a resumed run knows how long the runs before it trained
    for k, v in codebook_state(model).items():
        assert np.array_equal(v, codebook_state(again)[k])
    with pytest.raises(ValueError, match="batch_size"):
        finetune(
            TinyCausalLM(), batches, TrainConfig(batch_size=3, epochs=2, seq_len=16), tmp_path / "run", progress=False
        )


def _optimization_barriers(model, batch) -> int:
    """Optimization barriers in the lowered gradient program: one per rematerialised layer, which
    keeps XLA from merging the recomputed forward with the original."""
    graphdef, state = nnx.split(model)
    program = jax.jit(lambda s: loss_and_grads(nnx.merge(graphdef, s), batch)).lower(state).as_text()
    return program.count("stablehlo.optimization_barrier")


def test_remat_and_dtypes_switch_on(tmp_path):
    from sketchtune_jax.train import Trainer

    model = TinyCausalLM()
    batch = to_jnp(make_batch(2, 16, seed=5))
    ref, _ = loss_and_grads(model, batch)
    plain = _optimization_barriers(model, batch)
    Trainer(model, [make_batch(1, 4)], TrainConfig(remat="full", max_steps=1), tmp_path / "on").checkpoints.close()
    assert [layer.remat for layer in model.layers] == ["full", "full"]
    assert _optimization_barriers(model, batch) == plain + 2  # the program did change
    remat, _ = loss_and_grads(model, batch)
    np.testing.assert_allclose(float(remat), float(ref), rtol=1e-6)

    class NoRemat(nnx.Module):
        def __init__(self):
            self.codebook = Codebook(jnp.zeros((2, 1, 4)))

    with pytest.raises(ValueError, match="remat"):
        Trainer(NoRemat(), [make_batch(1, 4)], TrainConfig(remat=True, max_steps=1), tmp_path / "remat")
    bf = TinyCausalLM()
    for _, var in nnx.to_flat_state(nnx.state(bf, Codebook)):
        var.set_value(var[...].astype(jnp.bfloat16))
    Trainer(
        bf, [make_batch(1, 4)], TrainConfig(max_steps=1, codebook_dtype="float32"), tmp_path / "dtype"
    ).checkpoints.close()
    assert all(v.dtype == np.float32 for v in codebook_state(bf).values())


def test_codebook_file_roundtrip_and_validation(tmp_path):
    model = TinyCausalLM()
    path = tmp_path / "cb.safetensors"
    save_codebooks(model, path)
    tensors, meta = read_codebooks(path)
    assert "layers.0.q.codebook" in tensors and meta["format"] == "sketchtune-codebooks"
    assert json.loads(meta["bits"])["layers.0.q.codebook"] == 4
    assert json.loads(meta["shapes"])["layers.1.up.codebook"] == [64, 2, 16]
    assert not any(name.startswith(".codebooks-") for name in os.listdir(tmp_path))

    other = TinyCausalLM(seed=1)
    load_codebooks(other, path)
    for k, v in codebook_state(model).items():
        assert np.array_equal(v, codebook_state(other)[k])

    untouched = codebook_state(TinyCausalLM(seed=2))
    wrong_shape = TinyCausalLM(d=32, groups=4, seed=2)
    with pytest.raises(
        CodebookMismatchError, match=r"layers.0.q.codebook: shape \(32, 2, 16\) in the file, \(32, 4, 16\)"
    ):
        load_codebooks(wrong_shape, path)
    fewer = TinyCausalLM(layers=1, seed=2)
    before = codebook_state(fewer)
    with pytest.raises(CodebookMismatchError, match=r"not in the model: layers.1"):
        load_codebooks(fewer, path)
    for k, v in codebook_state(fewer).items():  # nothing changed on error
        assert np.array_equal(v, before[k])
    deeper = TinyCausalLM(layers=3, seed=2)
    with pytest.raises(CodebookMismatchError, match=r"missing from the file: layers.2"):
        load_codebooks(deeper, path)
    load_codebooks(deeper, path, strict=False)
    assert np.array_equal(codebook_state(deeper)["layers.0.q.codebook"], codebook_state(model)["layers.0.q.codebook"])
    assert untouched  # seed-2 model built fine


def _finalized_steps(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return []
    return [int(p) for p in os.listdir(ckpt_dir) if p.isdigit()]


@pytest.mark.parametrize(
    "method, result", [("sketch", "codebooks.safetensors"), ("lora", "adapter/adapter_model.safetensors")]
)
def test_kill_and_resume_matches_unbroken_run(tmp_path, method, result):
    script = os.path.join(SUPPORT, "resume_script.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    unbroken = subprocess.run(
        [sys.executable, script, str(tmp_path / "a"), "--method", method],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unbroken.returncode == 0, unbroken.stderr
    assert "resumed_from=None step=6" in unbroken.stdout

    cmd = [sys.executable, script, str(tmp_path / "b"), "--method", method]
    proc = subprocess.Popen(cmd + ["--sleep", "0.4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not _finalized_steps(tmp_path / "b" / "checkpoints"):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "b" / result)

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    first = int(resumed.stdout.split("resumed_from=")[1].split()[0])
    assert 2 <= first < 6 and "step=6" in resumed.stdout

    a, _ = read_codebooks(tmp_path / "a" / result)
    b, _ = read_codebooks(tmp_path / "b" / result)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    log_a = [r for r in read_log(tmp_path / "a" / "train_log.jsonl")]
    log_b = [r for r in read_log(tmp_path / "b" / "train_log.jsonl")]
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a] == list(range(1, 7))
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]
