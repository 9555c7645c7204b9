"""Bit-packing of codes: exact round trips, density, jit, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import codes_per_word, pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols", [1, 7, 10, 16, 37, 160])
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
    codes3 = np.full((1, 1, 10), 7, np.uint8)
    assert pack_codes(codes3, 3)[0, 0, 0] == (1 << 30) - 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_density(bits):
    # A realistic layer: 4096 columns in 4 groups.
    codes = np.zeros((8, 4, 1024), np.uint8)
    packed = pack_codes(codes, bits)
    bytes_per_code = packed.nbytes / codes.size
    # The format's own cost is 32 / codes_per_word(bits) bits a code (3.2 for 3-bit,
    # so that no code straddles two words); padding the last word may add 1% more.
    format_bits = 32 / codes_per_word(bits)
    assert bytes_per_code <= format_bits / 8 * 1.01
    if bits != 3:
        assert bytes_per_code <= bits / 8 * 1.07
    else:
        # 1024 columns pack into 103 words: 3.22 bits a code, 1.073x the 3-bit floor.
        assert bytes_per_code <= bits / 8 * 1.075
    assert codes_per_word(bits) == {2: 16, 3: 10, 4: 8}[bits]


def test_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros((1, 1, 4), np.uint8), 5)
    with pytest.raises(ValueError, match="words"):
        unpack_codes(np.zeros((1, 1, 3), np.uint32), 4, 8)
    with pytest.raises(ValueError, match=r"\[out, groups"):
        pack_codes(np.zeros((4, 8), np.uint8), 4)
