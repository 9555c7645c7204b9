"""LoRA/QLoRA adapters on disk in PEFT's format: ``adapter_config.json`` and
``adapter_model.safetensors`` (``peft.PeftModel.from_pretrained`` loads them as they are), plus our
``sketchtune_adapter.json`` for what PEFT has no field for (a quantized base, LoftQ).

PEFT's ``lora_A.weight [rank, in]`` and ``lora_B.weight [out, rank]`` are the transposes of our
``weight_lora_a [in, rank]`` and ``weight_lora_b [rank, out]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sketchtune_jax._utils.fileio import atomic_directory, write_json_atomic
from sketchtune_jax.models import LlamaForCausalLM
from sketchtune_jax.train.lora import LoraSettings, adapter_modules, apply_lora, target_linears

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's adapter_config.json has no field for a quantized base; ours lives beside it.
BASE_CONFIG = "sketchtune_adapter.json"
_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model (missing or unknown modules, wrong shapes)."""


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
        init=ours.get("init", "default"),
        loftq_iters=int(ours.get("loftq_iters", 1)),
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
    # The saved adapter replaces the initial one, so a LoftQ fit would be wasted work; the base
    # of a LoftQ run is its already quantized weight, which quantizes back to itself.
    lora_model = apply_lora(model, dataclasses.replace(settings, init="default"))
    for name, m in adapter_modules(lora_model).items():
        a = tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"].T
        b = tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"].T
        m.weight_lora_a.set_value(jnp.asarray(a, m.weight_lora_a.dtype))
        m.weight_lora_b.set_value(jnp.asarray(b, m.weight_lora_b.dtype))
    return lora_model, settings
