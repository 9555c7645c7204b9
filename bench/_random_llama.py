"""Random-weight Llamas for the scaling benches: their shape flags and the record of them in a
result, the checkpoint on disk (sharded safetensors, one shard per decoder layer, a small BPE
tokenizer trained on the calibration text) and the sketched model a train step is compiled for.
Random weights: what these benches measure (memory, bytes moved, compile time, agreement between
two runs) does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER = "byte-level BPE trained on the calibration text, --vocab entries at most"


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--hidden --intermediate --heads --kv-heads --vocab``, the same defaults in every scaling bench."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512, help="target vocabulary of the trained tokenizer")


def shape_record(shape: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The model of a result JSON: the flags of `add_shape_arguments`, float32 random weights, and ``extra``."""
    return {
        "hidden": shape.hidden,
        "intermediate": shape.intermediate,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "vocab": shape.vocab,
        "dtype": "float32",
        "weights": "random",
        **extra,
    }


def write_checkpoint(path: Path, shape: argparse.Namespace, layers: int, calib_text: str, seed: int = 0) -> int:
    """A random ``layers``-deep Llama HF directory at ``path`` of ``shape`` (`add_shape_arguments`),
    one safetensors shard per decoder layer plus one of embeddings, ``lm_head`` and the final norm;
    returns its weight bytes (float32)."""
    import safetensors.numpy
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hidden, intermediate, heads, kv_heads = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads
    path.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [calib_text],
        trainers.BpeTrainer(
            vocab_size=shape.vocab,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(str(path))
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (1.0 / np.sqrt(cols))).astype(np.float32)

    weight_map, total = {}, 0
    names = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    for i, file in enumerate(names):
        if i == 0:
            tensors = {
                "model.embed_tokens.weight": dense(len(tokenizer), hidden),
                "lm_head.weight": dense(len(tokenizer), hidden),
                "model.norm.weight": np.ones(hidden, np.float32),
            }
        else:
            p = f"model.layers.{i - 1}."
            tensors = {
                p + "self_attn.q_proj.weight": dense(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": dense(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": dense(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": dense(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": dense(intermediate, hidden),
                p + "mlp.up_proj.weight": dense(intermediate, hidden),
                p + "mlp.down_proj.weight": dense(hidden, intermediate),
                p + "input_layernorm.weight": np.ones(hidden, np.float32),
                p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            }
        safetensors.numpy.save_file(tensors, str(path / file))
        weight_map.update({name: file for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
        del tensors  # one shard in memory at a time
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total


def sketched_train_model(shape: argparse.Namespace, layers: int, remat: str = "none"):
    """``(model, wrt)``: a random 4-bit sketched Llama of ``shape`` and ``layers`` decoder layers,
    float32, ``shape.groups`` codebooks a row, as bench/train_step.py builds it for its sketch method."""
    from train_step import build

    return build(
        argparse.Namespace(**{**vars(shape), "layers": layers, "bits": 4, "dtype": "float32", "remat": remat}), "sketch"
    )
