"""A loaded model with what is needed to use and re-export it."""

from __future__ import annotations

import dataclasses
from typing import Any

from sketchtune_jax.models.config import ModelConfig
from sketchtune_jax.models.llama import LlamaForCausalLM


@dataclasses.dataclass
class LoadedModel:
    """``model`` (NNX, dense or sketched), its ``config``, its ``tokenizer`` (or None) and where it came from."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any
    source: str
