"""Bit-packing of codes: exact round trips, density, jit, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols", [1, 7, 10, 16, 31, 32, 37, 65, 160])
def test_round_trip_numpy(bits, cols):
    rng = np.random.default_rng(bits * 1000 + cols)
    codes = rng.integers(0, 2**bits, (5, 3, cols), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert isinstance(packed, np.ndarray)
    assert packed.dtype == np.uint32
    assert packed.shape == (5, 3, packed_words(cols, bits))
    out = unpack_codes(packed, bits, cols)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_round_trip_jit_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (4, 2, 45), dtype=np.uint8)
    packed = jax.jit(pack_codes, static_argnums=1)(jnp.asarray(codes), bits)
    np.testing.assert_array_equal(np.asarray(packed), pack_codes(codes, bits))
    out = jax.jit(unpack_codes, static_argnums=(1, 2))(packed, bits, 45)
    np.testing.assert_array_equal(np.asarray(out), codes)


def test_layout_is_little_end_first():
    codes = np.arange(8, dtype=np.uint8).reshape(1, 1, 8)
    assert pack_codes(codes, 4)[0, 0, 0] == 0x76543210
    codes2 = np.array([[[1, 2, 3]]], np.uint8)
    assert pack_codes(codes2, 2)[0, 0, 0] == 1 | 2 << 2 | 3 << 4


def test_three_bit_codes_are_bit_planes_of_32():
    codes = np.zeros((1, 1, 40), np.uint8)
    codes[0, 0, 0] = 0b001
    codes[0, 0, 5] = 0b110
    codes[0, 0, 33] = 0b101
    words = pack_codes(codes, 3)[0, 0]
    assert words.tolist() == [1, 1 << 5, 1 << 5, 1 << 1, 0, 1 << 1]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols", [512, 1024, 1792])
def test_density(bits, cols):
    # Realistic row-groups: 4096 or 14336 columns in 8, 4 or 8 groups.
    codes = np.zeros((8, 4, cols), np.uint8)
    bytes_per_code = pack_codes(codes, bits).nbytes / codes.size
    assert bytes_per_code == bits / 8


def test_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros((1, 1, 4), np.uint8), 5)
    with pytest.raises(ValueError, match="words"):
        unpack_codes(np.zeros((1, 1, 3), np.uint32), 4, 8)
    with pytest.raises(ValueError, match=r"\[out, groups"):
        pack_codes(np.zeros((4, 8), np.uint8), 4)
