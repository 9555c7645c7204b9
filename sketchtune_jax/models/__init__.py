"""Llama-family models (Llama 1/2/3/3.1, Mistral) in Flax NNX, mirroring Hugging Face names."""

from sketchtune_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from sketchtune_jax.models.kv_cache import KVCache, init_cache
from sketchtune_jax.models.llama import (
    MLP,
    Attention,
    DecoderLayer,
    Embedding,
    LlamaForCausalLM,
    LlamaModel,
    RMSNorm,
    attention_mask_for,
    positions_from_mask,
)
from sketchtune_jax.models.loaded import LoadedModel
from sketchtune_jax.models.remat import REMAT_POLICIES, remat_name, with_remat
from sketchtune_jax.models.scan import is_stacked, stack_layers, unstack_layers

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Attention",
    "DecoderLayer",
    "Embedding",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "LoadedModel",
    "MLP",
    "REMAT_POLICIES",
    "ModelConfig",
    "RMSNorm",
    "RopeScaling",
    "attention_mask_for",
    "init_cache",
    "is_stacked",
    "positions_from_mask",
    "remat_name",
    "stack_layers",
    "unstack_layers",
    "with_remat",
]
