"""Reading the reference implementation's pickles, and refusing unsafe ones."""

import os
import pickle

import numpy as np
import pytest
import torch

from converters.reference import (
    UnsafePickleError,
    load_reference_codebooks,
    load_reference_sketch,
)
from pallas_kernels import dequantize

ROWS, GROUPS, COLS = 6, 4, 10  # COLS per group, even as in the reference


def reference_layout(seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(ROWS, GROUPS, 16, generator=g, dtype=torch.float16)
    codes = torch.randint(0, 16, (ROWS, GROUPS, COLS), generator=g, dtype=torch.uint8)
    # The reference's nibble packing: even column in the high nibble.
    packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return grid, codes, packed


def expected_weight(grid, codes):
    return np.take_along_axis(grid.numpy(), codes.numpy().astype(int), 2).reshape(ROWS, -1)


def test_torch_saved_sketch_dequantizes_exactly(tmp_path):
    grid, codes, packed = reference_layout()
    path = tmp_path / "sketch.pt"
    torch.save({"model.layers.0.self_attn.q_proj": (grid, packed)}, path)
    sketch = load_reference_sketch(path)
    codebook, packed_codes = sketch["model.layers.0.self_attn.q_proj"]
    assert codebook.dtype == np.float16 and codebook.shape == (ROWS, GROUPS, 16)
    assert packed_codes.dtype == np.uint32
    w = dequantize(codebook, packed_codes, 4, GROUPS * COLS, backend="reference")
    np.testing.assert_array_equal(np.asarray(w), expected_weight(grid, codes))
    w_interp = dequantize(codebook, packed_codes, 4, GROUPS * COLS, backend="interpret")
    np.testing.assert_array_equal(np.asarray(w_interp), expected_weight(grid, codes))


@pytest.mark.parametrize("as_numpy", [False, True])
def test_plain_pickle_sketch_and_codebooks(tmp_path, as_numpy):
    grid, codes, packed = reference_layout(1)
    g, p = (grid.numpy(), packed.numpy()) if as_numpy else (grid, packed)
    path = tmp_path / "sketch.pkl"
    with open(path, "wb") as f:
        pickle.dump({"mlp.up_proj": (g, p)}, f, protocol=2)
    codebook, packed_codes = load_reference_sketch(path)["mlp.up_proj"]
    w = dequantize(codebook, packed_codes, 4, GROUPS * COLS, backend="reference")
    np.testing.assert_array_equal(np.asarray(w), expected_weight(grid, codes))

    tuned = tmp_path / "tuned.pkl"
    with open(tuned, "wb") as f:
        pickle.dump({"mlp.up_proj": g * 2}, f)
    np.testing.assert_array_equal(load_reference_codebooks(tuned)["mlp.up_proj"], grid.numpy() * 2)


def test_torch_saved_codebooks_bf16(tmp_path):
    grid = torch.randn(ROWS, GROUPS, 16).to(torch.bfloat16)
    path = tmp_path / "tuned.pt"
    torch.save({"q": grid}, path)
    out = load_reference_codebooks(path)["q"]
    np.testing.assert_array_equal(out.astype(np.float32), grid.float().numpy())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"q": (_Evil(), np.zeros((1, 1, 1), np.uint8))}, f)
    with pytest.raises(UnsafePickleError, match="system"):
        load_reference_sketch(path)


def test_malicious_torch_file_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"q": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_reference_codebooks(path)


def test_bad_layout_errors(tmp_path):
    path = tmp_path / "bad.pkl"
    with open(path, "wb") as f:
        pickle.dump({"q": (np.zeros((2, 1, 5), np.float32), np.zeros((2, 1, 2), np.uint8))}, f)
    with pytest.raises(ValueError, match="centres"):
        load_reference_sketch(path)
