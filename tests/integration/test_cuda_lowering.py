"""The GPU and TPU paths, checked on a CPU-only host: every kernel and a whole sketched model
lower for CUDA (Triton kernels; the Mosaic GPU kernels' lowering is in test_kernels_mosaic_gpu.py)
and for TPU (Mosaic TPU kernels), with no dense weight buffer.

``jax.export`` with ``platforms=["cuda"]`` runs the Pallas Triton lowering (kernel jaxpr to
Triton IR, serialised into a ``__gpu$xla.gpu.triton`` custom call) without a GPU. What it
does not reach is Triton's own compilation to PTX, which happens when XLA compiles the
module on a GPU (`bench/gpu_check.sh`). Run these alone with ``pytest -k cuda``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pallas_kernels import (
    SketchSharding,
    dequantize,
    pack_codes,
    sharded_sketched_matmul,
    sketched_matmul,
    sketched_matmul_grads,
)
from sketchtune_jax._utils.module_paths import iter_modules, set_submodule
from sketchtune_jax.layers import Codebook, Linear, SketchedLinear
from sketchtune_jax.models import LlamaForCausalLM, ModelConfig, init_cache
from sketchtune_jax.train import apply_train_step

TRITON = "__gpu$xla.gpu.triton"
NO_TRITON_CHECK = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]


def cuda_module(f, *args) -> str:
    """StableHLO text of ``jax.jit(f)`` exported for CUDA with ``args`` (arrays or structs)."""
    exported = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=NO_TRITON_CHECK)(*args)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def triton_calls(module: str) -> list[str]:
    """Names of the Pallas kernels called in ``module`` (one entry per custom call)."""
    calls = re.findall(rf'stablehlo.custom_call @{re.escape(TRITON)}\(.*?\).*?name = "([\w.]+)"', module)
    assert len(calls) == module.count(f"@{TRITON}("), "a Triton call whose kernel name was not found"
    return calls


def sketch_arrays(out, k, groups, bits, dtype, seed=0):
    rng = np.random.default_rng(seed)
    codebook = jnp.asarray(rng.normal(size=(out, groups, 2**bits)), dtype)
    codes = pack_codes(jnp.asarray(rng.integers(0, 2**bits, (out, groups, k // groups)), jnp.uint8), bits)
    return codebook, codes


# Kernels: bits x dtype x rows (decode m=1, prefill m=512) on a 96x128 layer, 2 groups.
OUT, IN, GROUPS = 96, 128, 2


@pytest.mark.parametrize("rows", [1, 512], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernels_lower_for_cuda(bits, dtype, rows):
    codebook, codes = sketch_arrays(OUT, IN, GROUPS, bits, dtype)
    x = jax.ShapeDtypeStruct((rows, IN), dtype)
    dy = jax.ShapeDtypeStruct((rows, OUT), dtype)

    # backend=None: the automatic choice follows the lowering platform, so it must be Pallas here.
    def forward_and_vjp(x, cb, dy):
        y, vjp = jax.vjp(lambda x, cb: sketched_matmul(x, cb, codes, bits), x, cb)
        return y, vjp(dy)

    vjp = cuda_module(forward_and_vjp, x, codebook, dy)
    assert sorted(triton_calls(vjp)) == ["sketch_matmul", "sketch_matmul_dcodebook", "sketch_matmul_dx"]

    if rows == 1:  # dequantize does not see x
        w = cuda_module(lambda cb: dequantize(cb, codes, bits, IN), codebook)
        assert triton_calls(w) == ["sketch_dequantize"]


def test_grads_entry_point_lowers_for_cuda():
    codebook, codes = sketch_arrays(OUT, IN, GROUPS, 4, jnp.bfloat16)
    x = jax.ShapeDtypeStruct((5, IN), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((5, OUT), jnp.bfloat16)
    grads = cuda_module(lambda x, cb, dy: sketched_matmul_grads(x, cb, codes, 4, dy), x, codebook, dy)
    assert sorted(triton_calls(grads)) == ["sketch_matmul_dcodebook", "sketch_matmul_dx"]


def test_automatic_backend_is_reference_when_lowering_for_cpu():
    codebook, codes = sketch_arrays(OUT, IN, GROUPS, 4, jnp.float32)
    text = jax.jit(lambda x, cb: sketched_matmul(x, cb, codes, 4)).lower(jnp.ones((3, IN)), codebook).as_text()
    assert "triton" not in text and "custom_call" not in text


def test_sharded_kernels_lower_for_cuda():
    mesh = jax.sharding.AbstractMesh((1, 1), ("data", "model"))
    codebook, codes = sketch_arrays(OUT, IN, GROUPS, 4, jnp.bfloat16)
    sharding = SketchSharding(mesh)

    def loss(x, cb):
        return jnp.sum(sharded_sketched_matmul(x, cb, codes, 4, sharding).astype(jnp.float32))

    module = cuda_module(jax.value_and_grad(loss, (0, 1)), jax.ShapeDtypeStruct((8, IN), jnp.bfloat16), codebook)
    assert sorted(triton_calls(module)) == ["sketch_matmul", "sketch_matmul_dcodebook", "sketch_matmul_dx"]


# A whole sketched Llama. Projection shapes [out, in] are chosen to be unlike any other
# 2-D tensor of the step (16 tokens, vocab 96, padded kernel operands are multiples of 16
# rows of tokens), so finding one in the module means a dequantized W_hat buffer.
CONFIG = ModelConfig(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    tie_word_embeddings=False,
)
PROJECTION_SHAPES = {(48, 48), (24, 48), (80, 48), (48, 80)}


def sketched_llama(dtype, backend=None) -> LlamaForCausalLM:
    model = LlamaForCausalLM(CONFIG, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    projections = [(name, m) for name, m in iter_modules(model, Linear) if not name.startswith("lm_head")]
    for i, (name, linear) in enumerate(projections):
        codebook, codes = sketch_arrays(linear.out_features, linear.in_features, 4, 3, jnp.float32, seed=i)
        layer = SketchedLinear(
            linear.in_features,
            linear.out_features,
            bits=3,
            groups=4,
            codebook=codebook,
            codes=codes,
            dtype=dtype,
            backend=backend,
        )
        set_submodule(model, name, layer)
    assert {(m.out_features, m.in_features) for _, m in iter_modules(model, SketchedLinear)} == PROJECTION_SHAPES
    return model


def weight_buffers(module: str) -> set[tuple[int, int]]:
    """The projection shapes found as 2-D float tensors in ``module``."""
    found = set()
    for out, k in PROJECTION_SHAPES:
        if re.search(rf"tensor<{out}x{k}x(f32|bf16|f16)>", module):
            found.add((out, k))
    return found


def train_step_module(dtype, backend=None, lower=None) -> str:
    model = sketched_llama(dtype, backend)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=Codebook)
    graphdef, state = nnx.split((model, optimizer))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, 96, (2, 8)), jnp.int32),
        "attention_mask": jnp.ones((2, 8), jnp.int32),
        "loss_mask": jnp.ones((2, 8), jnp.int32),
    }

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = apply_train_step(model, optimizer, batch)
        return nnx.state((model, optimizer)), metrics

    return (lower or cuda_module)(step, state, batch)


def test_sketched_llama_train_step_lowers_for_cuda_without_dense_weights():
    module = train_step_module(jnp.bfloat16)
    calls = triton_calls(module)
    # Identical kernels (same shapes) share one function in the module: one forward, dx and
    # dcodebook kernel per distinct projection shape.
    assert sorted(calls) == sorted(
        ["sketch_matmul", "sketch_matmul_dcodebook", "sketch_matmul_dx"] * len(PROJECTION_SHAPES)
    )
    assert weight_buffers(module) == set(), "a dequantized W_hat [out, in] buffer reaches HBM"


def test_dense_weight_detector_sees_the_reference_path():
    # The check above can fail: the jnp path, lowered for CUDA too, builds every W_hat.
    module = train_step_module(jnp.float32, backend="reference")
    assert not triton_calls(module)
    assert weight_buffers(module) == PROJECTION_SHAPES


def test_sketched_llama_decode_step_lowers_for_cuda():
    model = sketched_llama(jnp.bfloat16)
    graphdef, state = nnx.split(model)
    cache = init_cache(CONFIG, 2, 16, jnp.bfloat16)

    def decode(state, token, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        return jnp.argmax(logits[:, 0], axis=-1), cache

    module = cuda_module(decode, state, jnp.zeros((2,), jnp.int32), cache)
    assert triton_calls(module) == ["sketch_matmul"] * len(PROJECTION_SHAPES)
    assert weight_buffers(module) == set()


# The same whole steps lowered for TPU: backend=None picks the Mosaic TPU kernels.
TPU_KERNELS = ["sketch_matmul_tpu", "sketch_matmul_dcodebook_tpu", "sketch_matmul_dx_tpu"]


def tpu_module(f, *args) -> str:
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
    assert exported.platforms == ("tpu",)
    return exported.mlir_module()


def tpu_calls(module: str) -> list[str]:
    calls = re.findall(r'stablehlo.custom_call @tpu_custom_call\(.*?\).*?kernel_name = "([\w.]+)"', module)
    assert len(calls) == module.count("@tpu_custom_call("), "a TPU kernel whose name was not found"
    return calls


def test_sketched_llama_train_step_lowers_for_tpu_without_dense_weights():
    module = train_step_module(jnp.bfloat16, lower=tpu_module)
    assert sorted(set(tpu_calls(module))) == sorted(TPU_KERNELS)
    assert len(tpu_calls(module)) >= len(TPU_KERNELS) * len(PROJECTION_SHAPES)
    assert weight_buffers(module) == set(), "a dequantized W_hat [out, in] buffer reaches HBM"


def test_sketched_llama_decode_step_lowers_for_tpu():
    model = sketched_llama(jnp.bfloat16)
    graphdef, state = nnx.split(model)
    cache = init_cache(CONFIG, 2, 16, jnp.bfloat16)

    def decode(state, token, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        return jnp.argmax(logits[:, 0], axis=-1), cache

    module = tpu_module(decode, state, jnp.zeros((2,), jnp.int32), cache)
    assert set(tpu_calls(module)) == {"sketch_matmul_tpu"}
    assert weight_buffers(module) == set()
