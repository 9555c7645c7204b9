"""LoRA and QLoRA baselines on our NNX Llama/Mistral (through qwix), with adapters in PEFT's format.

::

    settings = LoraSettings(rank=16, alpha=32.0)                      # qtype="nf4" for QLoRA
    model = apply_lora(loaded.model, settings)                        # only nnx.LoRAParam trains
    save_adapter(model, settings, "run/adapter")                      # PEFT loads it as it is
    model = load_adapter(load_any("smollm2-135m").model, "run/adapter")
    dense = merge_lora(model)                                         # W + alpha/rank * (A B)^T

qwix intercepts the einsum of every targeted `Linear` and adds ``x @ A @ B * alpha / rank``
with ``A [in, rank]`` (he-uniform) and ``B [rank, out]`` (zeros), kept on the module as
``weight_lora_a`` / ``weight_lora_b`` (`nnx.LoRAParam`). With ``qtype`` the frozen base
weight is stored quantized (NF4 or INT4, one scale per ``tile_size`` input columns) and
dequantized inside the matmul: QLoRA. PEFT's ``lora_A.weight [rank, in]`` and
``lora_B.weight [out, rank]`` are the transposes of A and B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax.fileio import atomic_directory, write_json_atomic
from sketchtune_jax.layers import Linear
from sketchtune_jax.models import LlamaForCausalLM
from sketchtune_jax.module_paths import get_submodule, iter_modules
from sketchtune_jax.settings import require

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QTYPES = ("nf4", "int4")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's adapter_config.json has no field for a quantized base; ours lives beside it.
BASE_CONFIG = "sketchtune_adapter.json"
_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model (missing or unknown modules, wrong shapes)."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What shapes a LoRA/QLoRA adapter.

    - ``rank``, ``alpha``: ``delta W = alpha / rank * (A B)^T``, as in PEFT (no rsLoRA).
    - ``dropout``: on the adapter's input while training (qwix applies it on every call,
      so adapters are loaded back with ``dropout=0`` for evaluation).
    - ``targets``: names of the projections that get adapters (the last part of the module path).
    - ``qtype``: None for LoRA; ``"nf4"`` or ``"int4"`` stores the frozen base quantized (QLoRA)
      with one scale per ``tile_size`` input columns.
    - ``seed``: initialisation of A and of the dropout stream.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS
    qtype: str | None = None
    tile_size: int = 64
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        require(isinstance(self.rank, int) and self.rank > 0, "rank", f"must be a positive integer, got {self.rank!r}")
        require(math.isfinite(self.alpha) and self.alpha > 0, "alpha", f"must be positive, got {self.alpha!r}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        require(bool(self.targets), "targets", "are empty; name at least one projection, e.g. q_proj")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        require(not unknown, "targets", f"{unknown} are not projections; choose from {','.join(PROJECTIONS)}")
        require(self.qtype is None or self.qtype in QTYPES, "qtype", f"must be one of {QTYPES}, got {self.qtype!r}")
        require(self.tile_size > 0, "tile_size", f"must be positive, got {self.tile_size}")

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


def apply_lora(model: LlamaForCausalLM, settings: LoraSettings) -> LlamaForCausalLM:
    """A copy of ``model`` with adapters on ``settings.targets`` (and a quantized base for QLoRA).

    The dense ``model`` is left as it was; drop it to free its memory. Raises ValueError
    (before any work) for targets that match nothing or a tile size that does not divide
    a target's input width.
    """
    import qwix

    linears = target_linears(model, settings.targets)
    if settings.qtype is not None:
        bad = sorted({m.in_features for m in linears.values() if m.in_features % settings.tile_size})
        if bad:
            raise ValueError(f"QLoRA tile size {settings.tile_size} does not divide input widths {bad}")
    quant = dict(weight_qtype=settings.qtype, tile_size=settings.tile_size) if settings.qtype else {}
    provider = qwix.LoraProvider(
        module_path=r"model/.*(" + "|".join(settings.targets) + ")",
        rank=settings.rank,
        alpha=float(settings.alpha),
        dropout=settings.dropout,
        **quant,
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


def adapter_modules(model: nnx.Module) -> dict[str, Linear]:
    """``{dotted name: Linear}`` of every projection that carries an adapter, in definition order."""
    return {name: m for name, m in iter_modules(model, Linear) if hasattr(m, "weight_lora_a")}


def base_weight(linear: Linear) -> jax.Array:
    """The frozen base weight ``[out, in]`` of a projection, dequantized when QLoRA stores it quantized."""
    weight = linear.weight
    if isinstance(weight, nnx.Variable):
        return weight[...]
    import qwix

    array = jax.tree.map(
        lambda v: v[...] if isinstance(v, nnx.Variable) else v,
        weight.array,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    return qwix.dequantize(array)


def merged_weight(linear: Linear, scale: float) -> jax.Array:
    """``W + scale * (A B)^T`` ``[out, in]`` in the base weight's dtype."""
    w = base_weight(linear)
    a = linear.weight_lora_a[...].astype(jnp.float32)
    b = linear.weight_lora_b[...].astype(jnp.float32)
    return (w.astype(jnp.float32) + scale * (a @ b).T).astype(w.dtype)


def merge_lora(model: LlamaForCausalLM, settings: LoraSettings) -> LlamaForCausalLM:
    """A plain `LlamaForCausalLM` whose targeted weights are ``W + alpha/rank (A B)^T``."""
    param_dtype = model.model.embed_tokens.weight.dtype
    merged = nnx.eval_shape(
        lambda: LlamaForCausalLM(model.config, dtype=model.dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    adapted = adapter_modules(model)
    for path, var in nnx.to_flat_state(nnx.state(merged)):
        name = ".".join(str(p) for p in path)
        parent, _, leaf = name.rpartition(".")
        if parent in adapted and leaf == "weight":
            value = merged_weight(adapted[parent], settings.scale)
        else:
            value = getattr(get_submodule(model, parent), leaf)[...]
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    return merged


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them: ``base_model.model.<module>.lora_A.weight [rank, in]`` and
    ``...lora_B.weight [out, rank]``, float32 numpy."""
    tensors = {}
    for name, m in adapter_modules(model).items():
        a = np.asarray(jax.device_get(m.weight_lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(m.weight_lora_b[...]), np.float32)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if not tensors:
        raise ValueError("the model carries no LoRA adapters to save")
    return tensors


def peft_config(settings: LoraSettings, base_model: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for a causal-LM LoRA."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(settings.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "revision": None,
    }


def save_adapter(
    model: nnx.Module,
    settings: LoraSettings,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format,
    loadable by ``peft.PeftModel.from_pretrained``) plus our ``sketchtune_adapter.json`` (QLoRA base)."""
    from safetensors.numpy import save_file

    tensors = adapter_tensors(model)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json_atomic(tmp / ADAPTER_CONFIG, peft_config(settings, base_model))
        write_json_atomic(tmp / BASE_CONFIG, {"format_version": 1, **dataclasses.asdict(settings)})
    return Path(out_dir)


def read_adapter_settings(adapter_dir: str | os.PathLike) -> LoraSettings:
    """The `LoraSettings` of an adapter directory (ours or PEFT's; PEFT's base is taken as unquantized)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{config_path}: DoRA and rsLoRA adapters are not supported")
    ours = json.loads((adapter_dir / BASE_CONFIG).read_text()) if (adapter_dir / BASE_CONFIG).is_file() else {}
    targets = config["target_modules"]
    return LoraSettings(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=tuple([targets] if isinstance(targets, str) else targets),
        qtype=ours.get("qtype"),
        tile_size=int(ours.get("tile_size", 64)),
        seed=int(ours.get("seed", 0)),
    )


def load_adapter(
    model: LlamaForCausalLM, adapter_dir: str | os.PathLike, *, for_training: bool = False
) -> tuple[LlamaForCausalLM, LoraSettings]:
    """``model`` with the adapter in ``adapter_dir`` applied (unmerged), and its settings.

    Every key and shape is checked against the model before anything is built. Dropout
    is switched off unless ``for_training``.

    Raises:
        AdapterMismatchError: listing missing, unexpected and mis-shaped entries.
    """
    from safetensors.numpy import load_file

    settings = read_adapter_settings(adapter_dir)
    if not for_training:
        settings = dataclasses.replace(settings, dropout=0.0)
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    try:
        linears = target_linears(model, settings.targets)
    except ValueError as e:
        raise AdapterMismatchError(f"{adapter_dir} does not fit the model: {e}") from None
    expected = {}
    for name, m in linears.items():
        expected[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (settings.rank, m.in_features)
        expected[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, settings.rank)
    problems = []
    if unexpected := sorted(set(tensors) - set(expected)):
        problems.append(f"not in the model: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    if missing := sorted(set(expected) - set(tensors)):
        problems.append(f"missing from the adapter: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    shapes = [
        f"{k}: shape {tuple(tensors[k].shape)} in the adapter, {v} in the model"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != v
    ]
    problems += shapes[:3] + ([f"... {len(shapes) - 3} more shape mismatches"] if len(shapes) > 3 else [])
    if problems:
        raise AdapterMismatchError(
            f"{adapter_dir} does not fit the model (an adapter for another model?): " + "; ".join(problems)
        )
    lora_model = apply_lora(model, settings)
    for name, m in adapter_modules(lora_model).items():
        a = tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"].T
        b = tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"].T
        m.weight_lora_a.set_value(jnp.asarray(a, m.weight_lora_a.dtype))
        m.weight_lora_b.set_value(jnp.asarray(b, m.weight_lora_b.dtype))
    return lora_model, settings
