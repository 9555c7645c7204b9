"""Linear projections of the model: the one interface every projection goes through.

Every projection in the model is a module with ``__call__(x) -> y`` where
``x: [..., in_features]`` and ``y: [..., out_features]``. `Linear` keeps a dense
weight in the Hugging Face layout ``[out_features, in_features]``; `SketchedLinear`
keeps a trainable `Codebook` and frozen packed `Codes` instead. The sketcher swaps
one for the other by attribute assignment, without touching the model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import (
    SUPPORTED_BITS,
    Backend,
    SketchSharding,
    dequantize,
    pack_codes,
    packed_words,
    sharded_sketched_matmul,
    sketched_matmul,
)


class Codebook(nnx.LoRAParam):
    """Trainable sketched parameters, ``[out_features, groups, 2**bits]``.

    A `nnx.LoRAParam` (itself a `nnx.Param`), so NNX tools that train LoRA parameters
    (e.g. Tunix's ``PeftTrainer``) train a sketch's codebooks as they are.
    """


class Codes(nnx.Variable):
    """Frozen packed integer codes, ``[out_features, groups, words]`` (not a `Param`)."""


class Linear(nnx.Module):
    """Dense projection ``y = x @ weight.T + bias``; weight ``[out, in]`` as in HF checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=0.02)
        self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __setattr__(self, name: str, value) -> None:
        # qwix's LoRA records its einsum string on the module at every call; skipping the
        # unchanged write keeps calls from nested traces (the decode loop) legal in NNX.
        if name.endswith("_lora_einsum_str") and getattr(self, name, None) == value:
            return
        super().__setattr__(name, value)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        weight = self.weight[...]
        # Leave the weight as it is when no cast is needed: qwix's QLoRA hands the
        # einsum a quantized array here, which has no `astype` of its own.
        if weight.dtype != dtype:
            weight = weight.astype(dtype)
        y = jnp.einsum("...i,oi->...o", x.astype(dtype), weight)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class SketchedLinear(nnx.Module):
    """Sketched projection ``y = x @ W_hat.T + bias`` with ``W_hat[r, j] =
    codebook[r, j // (in_features // groups), code[r, j]]``.

    ``codebook`` (`Codebook`, ``[out, groups, 2**bits]``) is the only trainable state;
    ``codes`` (`Codes`) are packed ``uint32 [out, groups, words]`` and stay frozen, as
    does ``bias``. ``dtype`` is the compute dtype (``None``: the input's); the product
    runs through `pallas_kernels.sketched_matmul` (``backend`` forces its backend), or
    per shard through `pallas_kernels.sharded_sketched_matmul` when ``sharding`` is set
    (`sketchtune_jax.parallel.sharding.shard_model` sets it).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        groups: int,
        codebook: jax.Array,
        codes: jax.Array,
        bias: jax.Array | None = None,
        dtype: jnp.dtype | None = None,
        backend: Backend | None = None,
        sharding: SketchSharding | None = None,
    ):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if groups <= 0 or in_features % groups:
            raise ValueError(f"groups={groups} must divide in_features={in_features}")
        cols = in_features // groups
        codebook = jnp.asarray(codebook)
        if codebook.shape != (out_features, groups, 2**bits):
            raise ValueError(f"codebook must be {(out_features, groups, 2**bits)}, got {codebook.shape}")
        codes = jnp.asarray(codes)
        unpacked_shape = (out_features, groups, cols)
        packed_shape = (out_features, groups, packed_words(cols, bits))
        # Packed codes are uint32 of the packed shape; anything else of the unpacked
        # shape is one code per entry (the shapes only coincide when cols == 1).
        if codes.dtype == jnp.uint32 and codes.shape == packed_shape:
            pass
        elif codes.shape == unpacked_shape and jnp.issubdtype(codes.dtype, jnp.integer):
            codes = pack_codes(codes, bits)
        else:
            raise ValueError(
                f"codes must be unpacked integers {unpacked_shape} or packed uint32 "
                f"{packed_shape}, got {codes.dtype} {codes.shape}"
            )
        if bias is not None and jnp.shape(bias) != (out_features,):
            raise ValueError(f"bias must be ({out_features},), got {jnp.shape(bias)}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.groups = groups
        self.dtype = dtype
        self.backend = backend
        self.sharding = sharding
        self.codebook = Codebook(codebook)
        self.codes = Codes(codes)
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bits: int,
        groups: int,
        *,
        use_bias: bool = False,
        dtype: jnp.dtype | None = None,
        codebook_dtype: jnp.dtype = jnp.float32,
        bias_dtype: jnp.dtype = jnp.float32,
        backend: Backend | None = None,
    ) -> SketchedLinear:
        """A zero sketch of the given shape, to be filled from a checkpoint;
        cheap under `nnx.eval_shape`."""
        if groups <= 0 or in_features % groups:
            raise ValueError(f"groups={groups} must divide in_features={in_features}")
        words = packed_words(in_features // groups, bits)
        return cls(
            in_features,
            out_features,
            bits=bits,
            groups=groups,
            codebook=jnp.zeros((out_features, groups, 2**bits), codebook_dtype),
            codes=jnp.zeros((out_features, groups, words), jnp.uint32),
            bias=jnp.zeros((out_features,), bias_dtype) if use_bias else None,
            dtype=dtype,
            backend=backend,
        )

    @classmethod
    def from_linear(
        cls,
        linear: Linear,
        codebook: jax.Array,
        codes_unpacked: jax.Array,
        *,
        backend: Backend | None = None,
    ) -> SketchedLinear:
        """Sketch of ``linear``: bits and groups from ``codebook [out, groups, 2**bits]``,
        codes ``uint8 [out, groups, in // groups]`` (or already packed uint32); bias and
        dtype copied from ``linear``."""
        n = jnp.shape(codebook)[-1]
        bits = n.bit_length() - 1
        if n != 2**bits:
            raise ValueError(f"codebook's last dimension must be 2**bits, got {n}")
        return cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            groups=jnp.shape(codebook)[1],
            codebook=codebook,
            codes=codes_unpacked,
            bias=None if linear.bias is None else linear.bias[...],
            dtype=linear.dtype,
            backend=backend,
        )

    def dense_weight(self) -> jax.Array:
        """``W_hat [out, in]`` in the codebook's dtype."""
        return dequantize(self.codebook[...], self.codes[...], self.bits, self.in_features, backend=self.backend)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        if self.sharding is None:
            y = sketched_matmul(
                x.astype(dtype),
                self.codebook[...],
                self.codes[...],
                self.bits,
                backend=self.backend,
            )
        else:
            y = sharded_sketched_matmul(
                x.astype(dtype),
                self.codebook[...],
                self.codes[...],
                self.bits,
                self.sharding,
                backend=self.backend,
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
