"""NormalFloat-k and INT-k blockwise quantization of QLoRA bases: levels, round trip, bytes held, and
LoftQ's fit of base plus adapter."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sketchtune_jax.train.loftq import loftq_error, loftq_fit
from sketchtune_jax.train.quantized_base import (
    QTYPES,
    dequantize_blockwise,
    qtype_bits,
    quant_levels,
    quantize_blockwise,
    quantized_bytes,
)

# QLoRA's NF4 table (Dettmers et al. 2023, Appendix E).
QLORA_NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def _heavy_tailed(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_t(4, size=shape).astype(np.float32) * 0.02)


def test_nf4_levels_are_qloras_and_qwixs():
    from qwix._src.core import numerics

    np.testing.assert_allclose(quant_levels("nf4"), QLORA_NF4, atol=1e-6)
    np.testing.assert_allclose(quant_levels("nf4"), np.asarray(numerics.get_nf4_buckets()), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normalfloat_levels_have_one_more_positive_level_and_reach_both_ends(bits):
    levels = quant_levels(f"nf{bits}")
    assert len(levels) == 2**bits and np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels
    assert (levels > 0).sum() == 2 ** (bits - 1) and (levels < 0).sum() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_is_nearest_level_and_requantizes_to_itself(qtype):
    w = _heavy_tailed((48, 128))
    codes, scales = quantize_blockwise(w, qtype)
    deq = np.asarray(dequantize_blockwise(codes, scales, qtype))
    levels = quant_levels(qtype)
    blocks = np.asarray(w).reshape(48, 2, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    # Each entry is at the level nearest to it over its block's scale (the float16 absmax held).
    normed = blocks / np.asarray(scales, np.float32)[..., None]
    nearest = levels[np.abs(normed[..., None] - levels).argmin(-1)]
    np.testing.assert_allclose(deq.reshape(48, 2, 64), nearest * scales.astype(np.float32)[..., None], rtol=1e-6)
    assert np.abs(deq - np.asarray(w)).max() <= (np.diff(levels).max() / 2 + 2**-10) * absmax.max()
    again_codes, again_scales = quantize_blockwise(jnp.asarray(deq), qtype)
    np.testing.assert_array_equal(np.asarray(again_codes), np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(again_scales), np.asarray(scales))


@pytest.mark.parametrize("qtype", QTYPES)
def test_bytes_held_are_the_real_width_plus_a_float16_scale_a_block(qtype):
    codes, scales = quantize_blockwise(_heavy_tailed((96, 192)), qtype)
    held = codes.nbytes + scales.nbytes
    assert held == quantized_bytes(96, 192, qtype) == 96 * 192 * qtype_bits(qtype) // 8 + 2 * 96 * 3
    assert codes.dtype == jnp.uint32 and scales.dtype == jnp.float16


def test_bad_blocks_and_types_are_refused():
    with pytest.raises(ValueError, match="block size 48"):
        quantize_blockwise(_heavy_tailed((8, 64)), "nf4", 48)
    with pytest.raises(ValueError, match="qtype"):
        quant_levels("nf5")


@pytest.mark.parametrize("qtype", ["nf2", "nf3"])
def test_loftq_beats_plain_quantization_and_improves_with_iterations(qtype):
    w = _heavy_tailed((128, 192), seed=1)
    codes, scales = quantize_blockwise(w, qtype)
    plain = float(jnp.linalg.norm(w - dequantize_blockwise(codes, scales, qtype)))
    errors = [loftq_error(w, qtype, rank=8, scale=2.0, iters=t) for t in (1, 2, 5)]
    assert errors[0] < plain
    assert errors[2] < errors[1] < errors[0]


def test_loftq_adapter_is_the_best_low_rank_fit_of_the_last_residual():
    w = _heavy_tailed((64, 128), seed=2)
    codes, scales, a, b = loftq_fit(w, "nf2", rank=4, scale=0.5, iters=2)
    residual = np.asarray(w - dequantize_blockwise(codes, scales, "nf2"))
    u, s, vt = np.linalg.svd(residual, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(0.5 * np.asarray(a @ b).T, best, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["nf2", "nf3"])
def test_loftq_on_a_real_smollm2_projection(smollm2, qtype):
    w = smollm2.model.model.layers[3].mlp.down_proj.weight[...]
    codes, scales = quantize_blockwise(w, qtype)
    plain = float(jnp.linalg.norm(w - dequantize_blockwise(codes, scales, qtype)))
    errors = [loftq_error(w, qtype, rank=64, scale=2.0, iters=t) for t in (1, 5)]
    assert errors[0] < plain
    assert errors[1] < errors[0]
