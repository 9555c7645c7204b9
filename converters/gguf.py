"""Load a llama.cpp GGUF file of a Llama-family model: config, dequantized weights, tokenizer.

llama.cpp stores q_proj and k_proj with the rows of each head interleaved for its
rotary layout; we undo that so weights are in the Hugging Face layout again.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from converters._common import ConversionError, abstract_model, check_names, fill_params, iter_params
from sketchtune_jax.models import LlamaForCausalLM, ModelConfig, RopeScaling
from sketchtune_jax.models.rope import inverse_frequencies

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF key of a GGUF tensor name (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of q/k weights ``[heads * head_dim, ...]`` (or biases)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader_class():
    import gguf

    class FastReader(gguf.GGUFReader):
        """`gguf.GGUFReader` over a plain ndarray view of its memory map.

        Every field is parsed by slicing the map, and slicing an `np.memmap` builds a
        new memmap object each time; a 49k-token vocabulary took seconds that way.
        """

        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            if isinstance(value, np.memmap):
                self.file_map = value._mmap
                value = value.view(np.ndarray)
            self._data = value

        def drop_pages(self) -> None:
            """Hand the pages read so far back to the page cache (they stay valid, read again on use)."""
            file_map = getattr(self, "file_map", None)
            if file_map is not None and hasattr(mmap, "MADV_DONTNEED"):
                file_map.madvise(mmap.MADV_DONTNEED)

    return FastReader


def _open_reader(path: Path):
    try:
        return _reader_class()(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises plain ValueError/IndexError on bad bytes
        raise ConversionError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
        ):
            continue
        out[key] = field.contents()
    return out


def config_from_gguf(reader: Any, path: str = "the GGUF file") -> ModelConfig:
    """`ModelConfig` from GGUF metadata (``llama.*`` keys) and the tensors present."""
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ConversionError(f"{path}: metadata key {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{path}: tensor 'token_embd.weight' is missing")
    # ggml lists dimensions innermost first: [hidden, vocab].
    vocab = int(tensors["token_embd.weight"].shape[-1])
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = _rope_scaling(meta, arch, tensors, head_dim, theta, path)
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _rope_scaling(meta: dict, arch: str, tensors: dict, head_dim: int, theta: float, path: str) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return RopeScaling("linear", float(meta[f"{arch}.rope.scaling.factor"]))
    if kind not in ("none", ""):
        raise ConversionError(f"{path}: unsupported RoPE scaling {kind!r}; supported: linear, llama3")
    if "rope_freqs.weight" not in tensors:
        return None
    # Llama 3.1+ GGUFs carry per-frequency divisors instead of the llama3 parameters; recover
    # the parameters (the factor is the largest divisor) and check they reproduce the table.
    import gguf

    t = tensors["rope_freqs.weight"]
    divisors = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64)
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    scaling = RopeScaling("llama3", float(divisors.max()), 1.0, 4.0, original)
    expected = inverse_frequencies(head_dim, theta, None) / inverse_frequencies(head_dim, theta, scaling)
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-3):
        raise ConversionError(f"{path}: rope_freqs.weight does not match any llama3 RoPE scaling we support")
    return scaling


class GGUFTensors:
    """The tensors of a GGUF file by HF name, dequantized (and un-interleaved) one at a time on request.

    The file stays memory-mapped; `release` hands the pages read so far back to the
    page cache, which keeps a layer-by-layer reader's memory flat.
    """

    def __init__(self, path: str | Path, *, load_tokenizer: bool = True):
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConversionError(f"{path} does not exist")
        self.where = str(path)
        self._reader = _open_reader(path)
        self.config = config_from_gguf(self._reader, self.where)
        self._by_hf = {}
        for t in self._reader.tensors:
            if t.name == "rope_freqs.weight":
                continue
            name = hf_tensor_name(t.name)
            if name is None:
                raise ConversionError(f"unexpected tensor {t.name!r} in {path}: not part of a Llama model")
            self._by_hf[name] = t
        self.tokenizer = _tokenizer(path, self._reader) if load_tokenizer else None

    def names(self) -> set[str]:
        return set(self._by_hf)

    def ignorable(self, name: str) -> bool:
        return False

    def file_of(self, name: str) -> str:
        return self.where

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._by_hf[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001 - unsupported quant types raise NotImplementedError
            raise ConversionError(
                f"cannot dequantize tensor {t.name!r} ({t.tensor_type.name}) in {self.where}: {e}"
            ) from None
        if ".q_proj." in name:
            w = unpermute_rotary(w, self.config.num_attention_heads)
        elif ".k_proj." in name:
            w = unpermute_rotary(w, self.config.num_key_value_heads)
        return w

    def release(self) -> None:
        self._reader.drop_pages()

    def close(self) -> None:
        self.release()


def load_gguf(
    path: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    load_tokenizer: bool = True,
) -> tuple[LlamaForCausalLM, ModelConfig, Any]:
    """Load a Llama-family ``.gguf`` -> ``(model, config, tokenizer or None)``.

    Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 and cast to
    ``param_dtype``. The tokenizer is rebuilt from the file's metadata (`converters.gguf_tokenizer`);
    a file without one gives None, one that cannot be rebuilt is refused before the weights are read.
    """
    tensors = GGUFTensors(path, load_tokenizer=load_tokenizer)
    model = abstract_model(tensors.config, dtype, param_dtype)
    check_names(dict(iter_params(model)), tensors.names(), tensors.where)
    fill_params(model, "", tensors)
    tensors.close()
    return model, tensors.config, tensors.tokenizer


def _tokenizer(path: Path, reader: Any) -> Any:
    """The file's tokenizer (None when it has none), built from its metadata without torch."""
    from converters.gguf_tokenizer import build_tokenizer, read_tokenizer_metadata

    meta = read_tokenizer_metadata(reader, str(path))
    return None if meta is None else build_tokenizer(meta, str(path))


__all__ = ["GGUFTensors", "config_from_gguf", "hf_tensor_name", "load_gguf", "unpermute_rotary"]
