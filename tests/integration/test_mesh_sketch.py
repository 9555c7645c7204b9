"""Sketching on a device mesh (8 fake CPU devices) against one device: rows split over all
devices, Hessians summed over the calibration samples split over ``data``.

`test_mesh_sketch_in_subprocess` reruns this file with 8 devices (see `fake_devices`).
A stage's rows are sketched with the one device's arithmetic, so `sketch_matrix` on a mesh
is bit-identical. The Hessian is not: summed per device and then across devices (an
all-reduce), its float32 sums run in another order, so H, and through the Cholesky
factor the codebooks, differ by rounding. A code flips where a weight is within rounding
of the midpoint of two centers, and a flip moves the rest of its row (error feedback) and
every later layer's inputs: on this tiny model no code flips; on a larger one the mesh is
as far from one device as one device with another ``batch_size`` is (``python
bench/mesh_sketch_agreement.py``, README "Scaling out").
"""

from __future__ import annotations

import functools
import json
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
from fake_devices import rerun_on_fake_devices
from flax import nnx
from model_utils import random_ids, save_tiny_model_with_tokenizer, tiny_hf_model

from converters import from_state_dict
from pallas_kernels.packing import unpack_codes
from sketchtune_jax._utils.module_paths import flat_arrays, get_submodule, set_submodule
from sketchtune_jax.layers import Codebook, Codes
from sketchtune_jax.models import ModelConfig
from sketchtune_jax.parallel.sharding import make_mesh
from sketchtune_jax.settings import SettingError
from sketchtune_jax.sketch.driver import SketchSettings, sketch_model
from sketchtune_jax.sketch.matrix import accumulate_hessian, init_hessian, prepare_hessian, sketch_matrix

DEVICES = 8
needs_8 = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 devices (run by test_mesh_sketch_in_subprocess)"
)
MESH = "data=2,model=4"
SETTINGS = SketchSettings(bits=3, groups_per_row=2, kmeans_iters=20)
# MLP width = hidden width: q/k/v and gate/up are both [64, 32] stages, o and down [32, 32],
# so there are only two shapes to compile.
TINY = dict(intermediate_size=32)
# Codes of the mesh sketch that may differ from one device's (a rounding tie), and how far
# the codebooks of row-groups whose codes agree may be (measured: no code differs, 3e-7).
MAX_CODE_MISMATCH = 1e-3
CODEBOOK_ATOL = 1e-5


def test_mesh_sketch_in_subprocess():
    rerun_on_fake_devices(__file__, DEVICES, "test_mesh_sketch_in_subprocess")


def _model():
    hf = tiny_hf_model("llama_gqa", **TINY)
    return from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())


def _sketch(mesh: str | None, **kwargs) -> dict[str, np.ndarray]:
    """Codebooks and codes of the tiny Llama sketched on ``mesh`` (None: one device)."""
    model = _model()
    sketch_model(
        model,
        random_ids(16, 32, seed=1),
        SETTINGS,
        show_progress=False,
        mesh=None if mesh is None else make_mesh(mesh),
        **kwargs,
    )
    return {**flat_arrays(model, Codebook), **flat_arrays(model, Codes)}


@functools.cache
def one_device() -> dict[str, np.ndarray]:
    return _sketch(None)


def assert_sketches_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[float, float]:
    """Codes (packed) agree but for `MAX_CODE_MISMATCH` of them; codebooks of row-groups whose codes
    all agree within `CODEBOOK_ATOL`. Returns (fraction of codes that differ, largest codebook difference)."""
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
    differ = total = 0
    diff = 0.0
    # Every projection of the TINY model reads 32 features.
    unpack = functools.partial(unpack_codes, bits=SETTINGS.bits, cols_per_group=32 // SETTINGS.groups_per_row)
    for key in (k for k in want if k.endswith(".codes")):
        same = unpack(got[key]) == unpack(want[key])
        differ += int(np.sum(~same))
        total += same.size
        book = key.removesuffix(".codes") + ".codebook"
        agree = np.all(same, axis=-1)
        np.testing.assert_allclose(got[book][agree], want[book][agree], rtol=0, atol=CODEBOOK_ATOL, err_msg=book)
        diff = max(diff, float(np.max(np.abs(got[book][agree] - want[book][agree]))))
    assert differ <= MAX_CODE_MISMATCH * total, f"{differ} of {total} codes differ"
    return differ / total, diff


@needs_8
def test_sketch_matrix_split_by_rows_gives_the_same_codes_and_codebooks_to_float32_rounding():
    """Codes exactly; codebooks and W_hat to a few float32 ulps, since XLA's CPU kernels may sum a
    16-row shard in another order than 64 rows, depending on the CPU's vector width."""
    rng = np.random.default_rng(0)
    h, n = init_hessian(32)
    h, _ = accumulate_hessian(h, n, rng.standard_normal((256, 32)).astype(np.float32))
    u, w = prepare_hessian(h, rng.standard_normal((64, 32)).astype(np.float32))
    kwargs = dict(bits=3, groups=2, kmeans_iters=20)
    want = sketch_matrix(w, u, **kwargs)
    got = sketch_matrix(w, u, mesh=make_mesh(MESH), **kwargs)
    assert len(got.codes.sharding.device_set) == DEVICES
    assert got.codes.sharding.shard_shape(got.codes.shape)[0] == 64 // DEVICES
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    for name in ("codebook", "w_hat"):
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
        np.testing.assert_allclose(a, b, rtol=4e-7, atol=4e-7 * np.abs(b).max(), err_msg=name)


@needs_8
def test_the_hessian_pass_sums_per_device_hessians_and_moves_nothing_else():
    """One micro-batch of the calibration pass on data=2,model=4: each data device runs the layer
    on its own samples; the only collective is one all-reduce of the four stages' [32, 32] Hessians."""
    from jax.sharding import NamedSharding, PartitionSpec

    from sketchtune_jax.sketch import driver as sketcher

    mesh = make_mesh(MESH)
    layer = _model().model.layers[0]
    nnx.update(layer, jax.device_put(nnx.state(layer), NamedSharding(mesh, PartitionSpec())))
    for stage in layer.sketch_stages():
        inner = get_submodule(layer, stage[0])
        set_submodule(layer, stage[0], sketcher.HessianProbe(inner, inner.in_features))
    hidden = jax.device_put(np.ones((16, 32, 32), np.float32), NamedSharding(mesh, PartitionSpec("data")))
    graphdef, stats, rest = nnx.split(layer, sketcher.HessianStat, ...)
    hlo = sketcher._run_layer.lower(graphdef, stats, rest, hidden, np.int32(0), 2, 4).compile().as_text()
    collectives = re.findall(r"= (.*) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", hlo)
    assert collectives == [("(" + ", ".join(["f32[32,32]{1,0}"] * 4) + ")", "all-reduce")], collectives


@needs_8
def test_mesh_sketch_matches_one_device():
    fraction, diff = assert_sketches_close(_sketch(MESH), one_device())
    print(f"{MESH} vs one device: {fraction:.2%} of codes differ, codebooks within {diff:.2e}")


class _Stop(Exception):
    pass


def _stop_after_first_layer(index: int) -> None:
    raise _Stop(index)


@needs_8
def test_a_sketch_left_unfinished_on_one_device_resumes_on_a_mesh(tmp_path):
    with pytest.raises(_Stop):
        _sketch(None, work_dir=tmp_path, on_layer_done=_stop_after_first_layer)
    assert (tmp_path / "layer_0000.safetensors").is_file() and not (tmp_path / "layer_0001.safetensors").exists()
    resumed = _sketch(MESH, work_dir=tmp_path)
    want = one_device()
    for key in (k for k in want if k.startswith("model.layers.0.")):
        np.testing.assert_array_equal(resumed[key], want[key], err_msg=key)
    assert_sketches_close(resumed, want)


@needs_8
def test_a_mesh_that_does_not_divide_the_rows_is_refused_before_any_work():
    hf = tiny_hf_model("llama_gqa", intermediate_size=42)
    model = from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())
    before = flat_arrays(model)
    with pytest.raises(SettingError, match="mlp.gate_proj/mlp.up_proj has 84 rows; use a mesh whose device count"):
        sketch_model(model, random_ids(16, 8), SketchSettings(bits=3, groups_per_row=2), mesh=make_mesh(MESH))
    after = flat_arrays(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


WORDS = "the cat sat on a mat while two dogs ran past the red barn and a bird sang in the old tree".split()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer on disk, and a calibration text."""
    root = tmp_path_factory.mktemp("cli")
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(WORDS[(i * 7 + s) % len(WORDS)] for i in range(60)) for s in range(40)))
    save_tiny_model_with_tokenizer(root / "hf", [calib.read_text()], **TINY)
    return root / "hf", calib


def _cli_sketch(hf_dir, out, *extra: str) -> int:
    from sketchtune_jax.cli import main

    model, calib = hf_dir
    argv = ["sketch", str(model), "--bits", "3", "--groups-per-row", "2", "--kmeans-iters", "20", "--calib", str(calib)]
    return main([*argv, "--nsamples", "16", "--seq-len", "32", "--out", str(out), *extra])


@needs_8
def test_cli_sketch_on_a_mesh_matches_one_device(hf_dir, tmp_path):
    assert _cli_sketch(hf_dir, tmp_path / "mesh", "--mesh", MESH) == 0
    assert _cli_sketch(hf_dir, tmp_path / "one") == 0
    report = json.loads((tmp_path / "mesh" / "sketch_report.json").read_text())
    assert report["mesh"] == MESH and not (tmp_path / "mesh.partial").exists()
    got, want = (
        {
            k: v
            for k, v in safetensors.numpy.load_file(str(tmp_path / d / "model.safetensors")).items()
            if k.endswith((".codes", ".codebook"))
        }
        for d in ("mesh", "one")
    )
    assert_sketches_close(got, want)


@needs_8
@pytest.mark.parametrize(
    "mesh, message",
    [
        (
            "data=8",
            "--mesh data=8,model=1 splits the calibration samples over its 8 data devices, but there are 4; "
            "make --nsamples a multiple of 8 or the data axis smaller",
        ),
        ("data=3", "--mesh 'data=3' multiplies to 3 but the number of devices is 8"),
        ("rows=8", "--mesh has an unknown axis 'rows'"),
    ],
)
def test_cli_refuses_a_mesh_before_any_work(hf_dir, tmp_path, capsys, mesh, message):
    assert _cli_sketch(hf_dir, tmp_path / "out", "--mesh", mesh, "--nsamples", "4") == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
