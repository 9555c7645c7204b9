"""LoRA and QLoRA baselines on our NNX Llama/Mistral (through qwix), with adapters in PEFT's format.

::

    settings = LoraSettings(rank=16, alpha=32.0)                      # qtype="nf4" for QLoRA
    model = apply_lora(loaded.model, settings)                        # only nnx.LoRAParam trains
    save_adapter(model, settings, "run/adapter")                      # PEFT loads it as it is (io.adapters)
    model, settings = load_adapter(load_any("smollm2-135m").model, "run/adapter")
    dense = merge_lora(model)                                         # W + alpha/rank * (A B)^T

Every targeted `Linear` gets ``y += x @ A @ B * alpha / rank`` with ``A [in, rank]``
(he-uniform) and ``B [rank, out]`` (zeros), kept on the module as ``weight_lora_a`` /
``weight_lora_b`` (`nnx.LoRAParam`). For LoRA, qwix intercepts the module's einsum and adds
the product. With ``qtype`` (QLoRA) the projection becomes a `QLoraLinear`: the frozen base
is held packed at its real width (NF4/NF3/NF2 or INT4/INT3/INT2, one float16 absmax per
``tile_size`` input columns; `sketchtune_jax.train.quantized_base`) and dequantized inside the
matmul, with the same adapters. ``init="loftq"`` starts A, B and the quantized base from
LoftQ's alternating fit (`sketchtune_jax.train.loftq`) instead of ``B = 0``. PEFT's
``lora_A.weight [rank, in]`` and ``lora_B.weight [out, rank]`` are the transposes of A and B.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax._utils.module_paths import get_submodule, iter_modules, set_submodule
from sketchtune_jax.layers import Linear
from sketchtune_jax.models import LlamaForCausalLM
from sketchtune_jax.settings import require, setting
from sketchtune_jax.train.quantized_base import (
    QTYPES,
    QuantCodes,
    QuantScales,
    dequantize_blockwise,
    quantize_blockwise,
    quantized_bytes,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("default", "loftq")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What shapes a LoRA/QLoRA adapter.

    - ``rank``, ``alpha``: ``delta W = alpha / rank * (A B)^T``, as in PEFT (no rsLoRA).
    - ``dropout``: on the adapter's input while training (qwix applies it on every call,
      so adapters are loaded back with ``dropout=0`` for evaluation).
    - ``targets``: names of the projections that get adapters (the last part of the module path;
      also ``"q_proj,v_proj"`` text).
    - ``qtype``: None for LoRA; one of `QTYPES` (``nf4``, ``nf3``, ``nf2``, ``int4``, ``int3``,
      ``int2``) stores the frozen base quantized (QLoRA) with one scale per ``tile_size`` input columns.
    - ``init``: ``default`` (A he-uniform, B zero: the adapter starts at zero) or ``loftq``
      (QLoRA only: base and adapter fitted together so that base + adapter starts close to the
      dense weight, ``loftq_iters`` alternations as in LoftQ).
    - ``seed``: initialisation of A and of the dropout stream.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = setting(0.0, "dropout on the adapter's input while training")
    targets: tuple[str, ...] = setting(PROJECTIONS, "comma-separated projections that get adapters", show=",".join)
    qtype: str | None = None
    tile_size: int = setting(64, "input columns per QLoRA quantization scale", flag="qlora_tile_size")
    seed: int = 0
    init: Literal["default", "loftq"] = setting(
        "default",
        "default: the adapter starts at zero; loftq (qlora only): base and adapter fitted together so "
        "that they start close to the dense weights (the run also writes the quantized base as base/)",
    )
    loftq_iters: int = setting(1, "LoftQ alternations (LoftQ's paper reports 1 and 5)", flag="loftq_iters")

    def __post_init__(self):
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets if t.strip()))
        require(isinstance(self.rank, int) and self.rank > 0, "rank", f"must be a positive integer, got {self.rank!r}")
        require(math.isfinite(self.alpha) and self.alpha > 0, "alpha", f"must be positive, got {self.alpha!r}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        require(bool(self.targets), "targets", "are empty; name at least one projection, e.g. q_proj")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        require(not unknown, "targets", f"{unknown} are not projections; choose from {','.join(PROJECTIONS)}")
        require(self.qtype is None or self.qtype in QTYPES, "qtype", f"must be one of {QTYPES}, got {self.qtype!r}")
        require(self.tile_size > 0, "tile_size", f"must be positive, got {self.tile_size}")
        require(self.init in INITS, "init", f"must be one of {INITS}, got {self.init!r}")
        require(
            self.init != "loftq" or self.qtype is not None,
            "init",
            "loftq fits a quantized base and needs a qtype (method qlora)",
        )
        require(
            isinstance(self.loftq_iters, int) and self.loftq_iters >= 1,
            "loftq_iters",
            f"must be a positive integer, got {self.loftq_iters!r}",
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_linears(model: nnx.Module, targets: tuple[str, ...]) -> dict[str, Linear]:
    """The dense `Linear` projections under ``model.model`` whose last name is in ``targets``.

    Raises ValueError when a target matches no projection (a typo would otherwise train nothing).
    """
    found = {
        name: m
        for name, m in iter_modules(model, Linear)
        if name.startswith("model.") and name.rpartition(".")[2] in targets
    }
    matched = {name.rpartition(".")[2] for name in found}
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        names = sorted({n.rpartition(".")[2] for n, _ in iter_modules(model, Linear) if n.startswith("model.")})
        raise ValueError(
            f"LoRA targets {unmatched} match no dense projection of the model; its projections are {names}"
        )
    return found


def sketch_parameter_count(
    model: nnx.Module, targets: tuple[str, ...] = PROJECTIONS, *, bits: int = 4, groups_per_row: int = 4
) -> int:
    """Trainable scalars of a sketch of ``targets``: ``out * groups * 2**bits`` per projection."""
    return sum(m.out_features * groups_per_row * 2**bits for m in target_linears(model, targets).values())


def lora_parameter_count(model: nnx.Module, rank: int, targets: tuple[str, ...] = PROJECTIONS) -> int:
    """Trainable scalars of rank-``rank`` adapters on ``targets``: ``rank * (in + out)`` per projection."""
    return sum(rank * (m.in_features + m.out_features) for m in target_linears(model, targets).values())


def auto_rank(
    model: nnx.Module, targets: tuple[str, ...] = PROJECTIONS, *, bits: int = 4, groups_per_row: int = 4
) -> int:
    """The rank whose trainable count is closest to a ``bits``/``groups_per_row`` sketch's on the same
    projections (the smaller rank on a tie). SmolLM2-135M, all seven projections, INT4 GPR4: 33."""
    budget = sketch_parameter_count(model, targets, bits=bits, groups_per_row=groups_per_row)
    per_rank = lora_parameter_count(model, 1, targets)
    low = max(1, budget // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - budget), r))


class QLoraLinear(Linear):
    """A projection with a quantized frozen base and a LoRA adapter:
    ``y = x @ deq(codes, scales).T + bias + scale * (dropout(x) @ A) @ B``.

    ``weight_codes`` (`QuantCodes`) and ``weight_scales`` (`QuantScales`) hold the base at its
    real width (`sketchtune_jax.train.quantized_base`); ``weight_lora_a [in, rank]`` and
    ``weight_lora_b [rank, out]`` (`nnx.LoRAParam`) are the same adapters LoRA trains.
    """

    def __init__(
        self,
        linear: Linear,
        settings: LoraSettings,
        *,
        codes: jax.Array,
        scales: jax.Array,
        lora_a: jax.Array,
        lora_b: jax.Array,
        dropout_key: jax.Array,
    ):
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = linear.dtype
        self.qtype = settings.qtype
        self.block = settings.tile_size
        self.lora_scale = settings.scale
        self.lora_dropout = settings.dropout
        self.weight_codes = QuantCodes(codes)
        self.weight_scales = QuantScales(scales)
        self.weight_lora_a = nnx.LoRAParam(lora_a)
        self.weight_lora_b = nnx.LoRAParam(lora_b)
        self.bias = linear.bias
        self.lora_rngs = nnx.Rngs(dropout=dropout_key) if settings.dropout > 0 else None

    def base_weight(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """The dequantized frozen base ``[out, in]`` in ``dtype``."""
        return dequantize_blockwise(
            self.weight_codes[...], self.weight_scales[...], self.qtype, self.block, dtype=jnp.dtype(dtype)
        )

    def held_bytes(self) -> int:
        """Bytes the quantized base holds (packed codes and scales)."""
        return quantized_bytes(self.out_features, self.in_features, self.qtype, self.block)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = jnp.einsum("...i,oi->...o", x, self.base_weight(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.lora_rngs is not None:
            x = nnx.Dropout(self.lora_dropout, deterministic=False)(x, rngs=self.lora_rngs)
        a = self.weight_lora_a[...].astype(dtype)
        b = self.weight_lora_b[...].astype(dtype)
        return y + (x @ a @ b) * jnp.asarray(self.lora_scale, dtype)


def apply_lora(model: LlamaForCausalLM, settings: LoraSettings) -> LlamaForCausalLM:
    """A copy of ``model`` with adapters on ``settings.targets`` (and a quantized base for QLoRA).

    The dense ``model`` is left as it was; drop it to free its memory. Raises ValueError
    (before any work) for targets that match nothing or a tile size that does not divide
    a target's input width. With ``settings.init == "loftq"`` each base and adapter come from
    `sketchtune_jax.train.loftq.loftq_fit` of the dense weight.
    """
    linears = target_linears(model, settings.targets)
    if settings.qtype is not None:
        bad = sorted({m.in_features for m in linears.values() if m.in_features % settings.tile_size})
        if bad:
            raise ValueError(f"QLoRA tile size {settings.tile_size} does not divide input widths {bad}")
        return _apply_qlora(model, linears, settings)
    import qwix

    provider = qwix.LoraProvider(
        module_path=r"model/.*(" + "|".join(settings.targets) + ")",
        rank=settings.rank,
        alpha=float(settings.alpha),
        dropout=settings.dropout,
    )
    sample = jnp.zeros((1, 2), jnp.int32)
    lora_model = qwix.apply_lora_to_model(model, provider, sample, rngs=nnx.Rngs(settings.seed))
    adapted = adapter_modules(lora_model)
    if set(adapted) != set(linears):
        raise RuntimeError(f"qwix adapted {sorted(adapted)[:3]}..., expected {sorted(linears)[:3]}...")
    if settings.dropout > 0:
        for i, module in enumerate(adapted.values()):
            module.qwix_rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(settings.seed), i))
    return lora_model


def _apply_qlora(model: LlamaForCausalLM, linears: dict[str, Linear], settings: LoraSettings) -> LlamaForCausalLM:
    """A copy of ``model`` whose ``linears`` are `QLoraLinear` (quantized base, adapters)."""
    from sketchtune_jax.train.loftq import loftq_fit

    qmodel = nnx.clone(model)
    init_a = jax.nn.initializers.he_uniform(in_axis=0, out_axis=1)
    seed = jax.random.key(settings.seed)
    for i, name in enumerate(linears):
        linear = get_submodule(qmodel, name)
        weight = linear.weight[...]
        if settings.init == "loftq":
            codes, scales, a, b = loftq_fit(
                weight,
                settings.qtype,
                rank=settings.rank,
                scale=settings.scale,
                iters=settings.loftq_iters,
                block=settings.tile_size,
            )
        else:
            codes, scales = quantize_blockwise(weight, settings.qtype, settings.tile_size)
            a = init_a(jax.random.fold_in(seed, 2 * i), (linear.in_features, settings.rank), weight.dtype)
            b = jnp.zeros((settings.rank, linear.out_features), weight.dtype)
        a, b = a.astype(weight.dtype), b.astype(weight.dtype)
        qlinear = QLoraLinear(
            linear,
            settings,
            codes=codes,
            scales=scales,
            lora_a=a,
            lora_b=b,
            dropout_key=jax.random.fold_in(seed, 2 * i + 1),
        )
        set_submodule(qmodel, name, qlinear)
    return qmodel


def base_weight_bytes(model: nnx.Module, *, projections_only: bool = False) -> int:
    """Bytes of the frozen base as held, adapters (``weight_lora_a/b``) not counted: dense,
    sketched (codebooks and packed codes) or quantized (packed codes and scales) projections,
    and unless ``projections_only`` the embeddings, norms and head too."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = [str(p) for p in path]
        if names[-1] in ("weight_lora_a", "weight_lora_b"):
            continue
        if projections_only and not (len(names) >= 2 and names[-2] in PROJECTIONS):
            continue
        total += int(np.prod(var.shape)) * jnp.dtype(var.dtype).itemsize
    return total


def adapter_modules(model: nnx.Module) -> dict[str, Linear]:
    """``{dotted name: Linear}`` of every projection that carries an adapter, in definition order."""
    return {name: m for name, m in iter_modules(model, Linear) if hasattr(m, "weight_lora_a")}


def base_weight(linear: Linear) -> jax.Array:
    """The frozen base weight ``[out, in]`` of a projection, dequantized when QLoRA stores it quantized."""
    if isinstance(linear, QLoraLinear):
        return linear.base_weight(linear.weight_lora_a.dtype)
    return linear.weight[...]


def merged_weight(linear: Linear, scale: float) -> jax.Array:
    """``W + scale * (A B)^T`` ``[out, in]`` in the base weight's dtype."""
    w = base_weight(linear)
    a = linear.weight_lora_a[...].astype(jnp.float32)
    b = linear.weight_lora_b[...].astype(jnp.float32)
    return (w.astype(jnp.float32) + scale * (a @ b).T).astype(w.dtype)


def merge_lora(model: LlamaForCausalLM, settings: LoraSettings) -> LlamaForCausalLM:
    """A plain `LlamaForCausalLM` whose targeted weights are ``W + alpha/rank (A B)^T``."""
    return _with_weights(model, settings.scale)


def dense_base(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A plain `LlamaForCausalLM` of the frozen base alone (a QLoRA base dequantized), adapters left out."""
    return _with_weights(model, 0.0)


def _with_weights(model: LlamaForCausalLM, scale: float) -> LlamaForCausalLM:
    """A plain model whose adapted projections hold ``base + scale * (A B)^T``."""
    param_dtype = model.model.embed_tokens.weight.dtype
    merged = nnx.eval_shape(
        lambda: LlamaForCausalLM(model.config, dtype=model.dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    adapted = adapter_modules(model)
    for path, var in nnx.to_flat_state(nnx.state(merged)):
        name = ".".join(str(p) for p in path)
        parent, _, leaf = name.rpartition(".")
        if parent in adapted and leaf == "weight":
            value = merged_weight(adapted[parent], scale)
        else:
            value = getattr(get_submodule(model, parent), leaf)[...]
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    return merged
