"""Healing: the distillation loss, codebook-only training against a frozen teacher, resume,
and the workflow's refusals of bad input before any work."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import assert_cli_refuses, sketch_tiny_with_cli, tiny_hf_model
from tiny_lm import TinyCausalLM

from sketchtune_jax.data.batches import window_batches
from sketchtune_jax.layers import Codebook, Codes
from sketchtune_jax.train import TrainConfig, Trainer, codebook_state, eval_step, loss_and_grads
from sketchtune_jax.train.distill import kl_from_logits, teacher_kl
from sketchtune_jax.train.heal import heal

VOCAB, T = 64, 12


class TinyTrunkHead(TinyCausalLM):
    """`TinyCausalLM` with the trunk/head split of `LlamaForCausalLM`, so the loss runs chunked."""

    def hidden_states(self, input_ids, *, attention_mask=None):
        t = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        x = jnp.take(self.embed[...], input_ids, axis=0)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)

    def logits_from_hidden(self, hidden):
        return (hidden @ self.head[...].T).astype(jnp.float32)


def _copy(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with buffers of its own (training donates, and so deletes, the trained arrays)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def _perturbed(model: nnx.Module, scale: float, seed: int = 1) -> nnx.Module:
    """A copy of ``model`` whose codebooks carry Gaussian noise of ``scale`` (codes untouched)."""
    out = nnx.clone(model)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(out, Codebook)):
        var.set_value(var[...] + scale * jnp.asarray(rng.standard_normal(var.shape), var.dtype))
    return out


def _batch(rows: int, seed: int) -> dict[str, jax.Array]:
    ids = np.random.default_rng(seed).integers(0, VOCAB, (rows, T)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in window_batches(ids, rows)[0].items()}


def _teacher_samples(teacher: nnx.Module, rows: int, seed: int) -> np.ndarray:
    """``[rows, T]`` windows sampled from ``teacher`` at temperature 1 (its own data)."""
    graphdef, state = nnx.split(teacher)

    @jax.jit
    def next_logits(state, ids, t):
        return nnx.merge(graphdef, state)(ids)[0][:, t]

    key = jax.random.key(seed)
    ids = jnp.zeros((rows, T), jnp.int32).at[:, 0].set(jax.random.randint(key, (rows,), 0, VOCAB))
    for t in range(T - 1):
        key, sub = jax.random.split(key)
        ids = ids.at[:, t + 1].set(jax.random.categorical(sub, next_logits(state, ids, t)))
    return np.asarray(ids)


def _mean(model, batches, **loss) -> float:
    sums = [eval_step(model, {k: jnp.asarray(v) for k, v in b.items()}, **loss) for b in batches]
    return float(sum(s["nll_sum"] for s in sums) / sum(s["tokens"] for s in sums))


@pytest.mark.parametrize("cls", [TinyCausalLM, TinyTrunkHead])
def test_kl_is_zero_for_the_teacher_itself_and_its_gradient_matches_the_reference(cls):
    teacher = cls(vocab=VOCAB)
    loss_fn, teacher_state = teacher_kl(teacher, chunk=5)  # 12 positions: chunks of 5, 5 and 2 padded
    batch = _batch(3, seed=0)
    same, _ = loss_and_grads(nnx.clone(teacher), batch, loss_fn=loss_fn, loss_inputs=teacher_state)
    assert abs(float(same)) < 1e-6

    student = _perturbed(teacher, 0.05)
    loss, grads = loss_and_grads(student, batch, loss_fn=loss_fn, loss_inputs=teacher_state)

    t_logits = teacher(batch["input_ids"])[0]
    weights = jnp.pad(batch["loss_mask"][:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))

    def reference(model):
        return kl_from_logits(t_logits, model(batch["input_ids"])[0], weights) / jnp.sum(weights)

    ref_loss, ref_grads = nnx.value_and_grad(reference, argnums=nnx.DiffState(0, Codebook))(student)
    assert float(loss) > 1e-3
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    got, want = nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, g), (_, w) in zip(got, want):
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(w[...]), rtol=1e-4, atol=1e-7, err_msg=str(path))


def test_kl_from_logits_matches_a_direct_sum():
    rng = np.random.default_rng(0)
    t, s = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 7))
    w = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    p, q = np.exp(t) / np.exp(t).sum(-1, keepdims=True), np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    want = float(np.sum(w * np.sum(p * np.log(p / q), -1)))
    assert float(kl_from_logits(jnp.asarray(t), jnp.asarray(s), jnp.asarray(w))) == pytest.approx(want, rel=1e-5)


def _heal_case():
    teacher = TinyTrunkHead(vocab=VOCAB)
    student = _perturbed(teacher, 0.08)
    data = _teacher_samples(teacher, 40, seed=3)
    return teacher, student, data[:32], data[32:]


def test_heal_lowers_kl_and_held_out_nll_and_keeps_codes(tmp_path):
    teacher, student, train, held_out = _heal_case()
    codes_before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(student, Codes))}
    frozen_before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(student, nnx.Not(Codebook)))}
    loss_fn, teacher_state = teacher_kl(teacher)
    val = window_batches(held_out, 8)
    kl_before = _mean(student, val, loss_fn=loss_fn, loss_inputs=teacher_state)
    nll_before, nll_teacher = _mean(student, val), _mean(teacher, val)

    config = TrainConfig(lr=3e-3, schedule="constant", batch_size=8, max_steps=24, seq_len=T, save_every=0)
    result = heal(student, teacher, train, config, tmp_path / "run", progress=False)

    kl_after = _mean(student, val, loss_fn=loss_fn, loss_inputs=teacher_state)
    nll_after = _mean(student, val)
    assert result.step == 24 and result.loss < 0.5 * kl_before
    assert kl_after < 0.5 * kl_before
    # Held-out text the teacher wrote: the student's NLL closes at least a quarter of its gap to the teacher's.
    assert nll_after - nll_teacher < 0.75 * (nll_before - nll_teacher), (nll_before, nll_after, nll_teacher)
    for p, v in nnx.to_flat_state(nnx.state(student, Codes)):
        assert np.array_equal(np.asarray(v[...]), codes_before[p])
    for p, v in nnx.to_flat_state(nnx.state(student, nnx.Not(Codebook))):
        assert np.array_equal(np.asarray(v[...]), frozen_before[p]), p


def test_interrupted_heal_resumes_to_the_unbroken_result(tmp_path):
    teacher, student, train, _ = _heal_case()
    config = TrainConfig(lr=3e-3, schedule="cosine", batch_size=8, max_steps=6, seq_len=T, save_every=2)
    unbroken = _copy(student)
    heal(unbroken, teacher, train, config, tmp_path / "a", progress=False)

    # Stop the run while the batch of step 4 is being read: steps 1-3 ran, step 2 was checkpointed.
    calls = []

    class Interrupt(Exception):
        pass

    def put_batch(b):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupt
        return {k: jnp.asarray(v) for k, v in b.items()}

    trainer = Trainer(
        _copy(student),
        window_batches(train, 8),
        config,
        tmp_path / "b",
        progress=False,
        put_batch=put_batch,
        **dict(zip(("loss_fn", "loss_inputs"), teacher_kl(teacher))),
    )
    with pytest.raises(Interrupt):
        trainer.run()
    resumed_model = _copy(student)
    result = heal(resumed_model, teacher, train, config, tmp_path / "b", progress=False)
    assert result.resumed_from == 2 and result.step == 6
    want = codebook_state(unbroken)
    for k, v in codebook_state(resumed_model).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_window_batches_and_seq_len_checked():
    with pytest.raises(ValueError, match="cannot fill one batch of 4"):
        window_batches(np.zeros((3, 8)), 4)
    batches = window_batches(np.arange(40).reshape(5, 8), 2)
    assert len(batches) == 2 and batches[1]["input_ids"][0, 0] == 16 and batches[0]["loss_mask"].all()
    teacher = TinyCausalLM(vocab=VOCAB)
    from sketchtune_jax.settings import SettingError

    with pytest.raises(SettingError, match="seq_len"):
        heal(
            nnx.clone(teacher),
            teacher,
            np.zeros((8, 5), np.int32),
            TrainConfig(max_steps=1, seq_len=6, batch_size=4),
            "/nonexistent/never-written",
        )


# ---------------------------------------------------------------- the workflow, from directories


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF model with a tokenizer, its 2-bit sketch (healed for 2 steps by `sketch --heal-steps`), and
    calibration text."""
    return sketch_tiny_with_cli(tmp_path_factory.mktemp("heal"), extra_args=["--heal-steps", "2"])


def test_sketch_then_heal_in_one_command(tiny):
    sketch_config = json.loads((tiny["sketch"] / "sketch_config.json").read_text())
    record = sketch_config["heal"]
    assert record["steps"] == 2 and record["teacher"] == str(tiny["hf"]) and record["seq_len"] == 32
    assert record["calib"] == str(tiny["calib"].resolve()) and sketch_config["settings"]["bits"] == 2
    assert not (tiny["root"] / "sketch.heal").exists() and not (tiny["root"] / "sketch.partial").exists()


def test_sketch_then_heal_in_one_command_takes_the_heal_settings(tmp_path):
    root = sketch_tiny_with_cli(
        tmp_path,
        extra_args=["--heal-steps", "2", "--heal-batch-size", "2", "--heal-lr", "1e-3", "--heal-train-norms"],
    )
    record = json.loads((root["sketch"] / "sketch_config.json").read_text())["heal"]
    assert record["steps"] == 2 and record["batch_size"] == 2 and record["lr"] == 1e-3
    assert record["train_norms"] is True and record["windows"] == 4


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--heal-lr 1e-3 --heal-train-norms", "--heal-steps is 0, so --heal-lr, --heal-train-norms would do nothing"),
        ("--heal-steps 2 --heal-lr -1", "--heal-lr must be a finite number > 0"),
        ("--heal-steps 2 --heal-batch-size 0", "--heal-batch-size must be"),
    ],
)
def test_bad_heal_flags_of_the_sketch_command_are_refused_before_it_sketches(tmp_path, capsys, flags, message):
    argv = ["sketch", str(tmp_path / "no-such-model"), "--calib", str(tmp_path / "no-such.txt")]
    err = assert_cli_refuses([*argv, "--out", str(tmp_path / "out"), *flags.split()], capsys, message)
    assert err.startswith("sketchtune sketch: error: ") and not (tmp_path / "out").exists()


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def _heal_argv(tiny, out: Path) -> list[str]:
    return [
        "heal",
        str(tiny["sketch"]),
        "--teacher",
        str(tiny["hf"]),
        "--calib",
        str(tiny["calib"]),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--lr",
        "1e-3",
        "--calib-range",
        "0.5:1",
        "--eval-text",
        str(tiny["calib"]),
        "--eval-windows",
        "2",
    ]


def test_heal_command_writes_a_healed_sketch_with_the_same_codes(tiny, tmp_path):
    from sketchtune_jax.cli import main

    out = tmp_path / "healed"
    argv = _heal_argv(tiny, out)
    assert main(argv) == 0
    record = json.loads((out / "sketch_config.json").read_text())["heal"]
    assert record["steps"] == 4 and record["batch_size"] == 2 and record["calib_range"] == [0.5, 1.0]
    assert record["final_kl"] < record["first_kl"] and record["seconds"] > 0
    assert record["ppl_after"] < record["ppl_before"]
    assert (out / "heal_log.jsonl").is_file() and not (tmp_path / "healed.heal").exists()
    before, after = _tensors(tiny["sketch"]), _tensors(out)
    assert before.keys() == after.keys()
    for key in before:
        if key.endswith(".codebook"):
            continue
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.endswith(".codebook"))
    assert main(argv) == 2  # a finished heal is not overwritten without --overwrite


def test_heal_with_train_norms_also_trains_the_norm_scales_and_nothing_else(tiny, tmp_path):
    from sketchtune_jax.cli import main

    out = tmp_path / "healed"
    assert main([*_heal_argv(tiny, out), "--train-norms"]) == 0
    record = json.loads((out / "sketch_config.json").read_text())["heal"]
    assert record["train_norms"] is True and record["ppl_after"] < record["ppl_before"]
    before, after = _tensors(tiny["sketch"]), _tensors(out)
    norms = [k for k in before if k.endswith("norm.weight")]
    assert len(norms) >= 3  # every layer's two norms and the final one
    assert all(not np.array_equal(before[k], after[k]) for k in norms)
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.endswith(".codebook"))
    for key in before:
        if key in norms or key.endswith(".codebook"):
            continue
        assert np.array_equal(before[key], after[key]), key


def test_bad_heal_inputs_are_refused_before_any_work(tiny, tmp_path, capsys):
    from sketchtune_jax.cli import main

    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    other = tmp_path / "other"
    tiny_hf_model("llama_gqa", hidden_size=48).save_pretrained(other)
    base = [
        "heal",
        str(tiny["sketch"]),
        "--teacher",
        str(tiny["hf"]),
        "--calib",
        str(tiny["calib"]),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--seq-len",
        "32",
    ]

    def refused(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("sketchtune heal: error: ") and message in last and "Traceback" not in err, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.heal").exists()

    refused(base[:-4] + ["--steps", "0", "--seq-len", "32"], "--steps must be a positive number")
    refused(base + ["--lr", "-1"], "--lr must be a finite number > 0")
    refused(base + ["--calib-range", "0.7:0.2"], "--calib-range must be fractions")
    refused(base[:3] + [str(tiny["sketch"])] + base[4:], "is itself a sketch")
    refused(base[:3] + [str(other)] + base[4:], "hidden_size: sketch 32, teacher 48")
    refused(base[:5] + [str(short)] + base[6:], "fewer than one batch")
    refused(base[:1] + [str(tiny["hf"])] + base[2:], "is not a sketched model")


def test_eval_warns_when_the_evaluated_text_healed_the_sketch(tiny, tmp_path):
    from transformers import AutoTokenizer

    from sketchtune_jax.eval.held_out import calibration_overlap

    sketch = tmp_path / "s"
    sketch.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny["hf"]))
    text = tiny["calib"].read_text()

    def overlap(heal_range: list[float]) -> str | None:
        record = {"settings": {"calib": "self"}, "heal": {"calib": str(tiny["calib"]), "calib_range": heal_range}}
        (sketch / "sketch_config.json").write_text(json.dumps(record))
        return calibration_overlap(str(sketch), str(tiny["calib"]), text, tokenizer, seq_len=32, max_windows=2)

    assert "also healed this sketch" in overlap([0.0, 1.0])
    assert overlap([0.5, 1.0]) is None

    def overlap_of_range(heal_range: list[float], text_range: tuple[float, float]) -> str | None:
        from sketchtune_jax.data.text import text_fraction

        record = {"settings": {"calib": "self"}, "heal": {"calib": str(tiny["calib"]), "calib_range": heal_range}}
        (sketch / "sketch_config.json").write_text(json.dumps(record))
        part = text_fraction(text, text_range)
        return calibration_overlap(
            str(sketch), str(tiny["calib"]), part, tokenizer, seq_len=32, max_windows=2, text_range=text_range
        )

    assert "cover 50% to" in overlap_of_range([0.5, 1.0], (0.5, 1.0))
    assert overlap_of_range([0.0, 0.5], (0.5, 1.0)) is None
    assert overlap_of_range([0.9, 1.0], (0.0, 0.5)) is None
