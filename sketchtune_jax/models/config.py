"""Model configuration: the subset of a Hugging Face Llama/Mistral `config.json` we run."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`llama3` as in Llama 3.1+, or `linear` position interpolation).

    `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings`
    are used by `llama3` only.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any]:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


# Frozen (hence hashable) so that it can live in an NNX graphdef and be a static jit argument.
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 1/2/3/3.1, Mistral)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; only 'silu' is supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (Llama 3 configs list several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 layout).

        Raises ValueError for a model type, activation or RoPE type we do not implement.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope_theta, rope_scaling = _parse_rope(hf)
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos) if len(eos) != 1 else int(eos[0])
        is_mistral = model_type == "mistral"
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # transformers' Mistral has no bias options; a stray key there must not add biases.
            attention_bias=False if is_mistral else bool(hf.get("attention_bias", False)),
            mlp_bias=False if is_mistral else bool(hf.get("mlp_bias", False)),
            sliding_window=(int(hf["sliding_window"]) if is_mistral and hf.get("sliding_window") else None),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            hidden_act=hf.get("hidden_act", "silu"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers 4.x and 5.x both load as this architecture.

        RoPE settings are written in both layouts: `rope_theta`/`rope_scaling` (4.x) and
        `rope_parameters` (5.x).
        """
        rope = self.rope_scaling.to_hf() if self.rope_scaling else {"rope_type": "default"}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        else:
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        return out


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 nests everything (theta included) under `rope_parameters`;
    # 4.x used top-level `rope_theta` plus an optional `rope_scaling` dict.
    params = hf.get("rope_parameters") or {}
    if params and not isinstance(params, dict):
        raise ValueError(f"unsupported rope_parameters {params!r}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(params) if params.get("rope_type", params.get("type")) else dict(hf.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    return theta, RopeScaling(
        "llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
