"""Tiny random transformers models and helpers shared by the model, generation and converter tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# transformers (PyTorch fp32, GGUF loader) on SmolLM2-135M: the first 20 windows of 512 tokens of WikiText-2 test.
SMOLLM2_DENSE_PPL = 29.31

_BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",
)

TINY_CONFIGS = {
    "llama_gqa": dict(model_type="llama"),
    "llama3_rope": dict(
        model_type="llama",
        head_dim=16,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "linear_rope": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "mistral_window": dict(model_type="mistral", sliding_window=5),
    "bias_untied": dict(model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "tied_mqa": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True),
}


def tiny_hf_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A transformers model of config ``name`` with weights large enough to make attention non-uniform."""
    kwargs = {**_BASE, **TINY_CONFIGS[name], **overrides}
    model_type = kwargs.pop("model_type")
    config = (MistralConfig if model_type == "mistral" else LlamaConfig)(**kwargs)
    torch.manual_seed(seed)
    model = (MistralForCausalLM if model_type == "mistral" else LlamaForCausalLM)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.15)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def hf_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.float().numpy()


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask)[0]


def jax_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float32 logits of our model, jitted."""
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_forward(model, np.asarray(ids, np.int32), np.asarray(mask, np.int32)))


def random_ids(batch: int, length: int, vocab: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, size=(batch, length)).astype(np.int32)


def tiny_tokenizer():
    """A word-level tokenizer for the tiny configs: ``w3`` ... ``w95`` are ids 3-95 (others map to pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model_with_tokenizer(path, texts: list[str], vocab_size: int = 1000, **overrides) -> None:
    """A tiny Llama (config ``llama_gqa`` with ``overrides``) with a byte-level BPE tokenizer trained
    on ``texts``, saved as an HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tiny_hf_model("llama_gqa", **{**overrides, "vocab_size": len(tokenizer)}).save_pretrained(path)
    tokenizer.save_pretrained(path)


WORDS = "the cat sat on a mat while two dogs ran past the red barn and a bird sang in the old tree".split()


def word_text(n: int, seed: int) -> str:
    """``n`` words cycled from a fixed list, starting at ``seed``: text any tiny tokenizer covers."""
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def sketch_tiny_with_cli(root, *, extra_texts: list[str] = (), extra_args: list[str] = ()) -> dict:
    """Under ``root``: calibration text, a tiny HF model whose tokenizer also covers ``extra_texts``,
    and its 2-bit sketch made by ``sketchtune sketch`` (plus ``extra_args``).
    Returns the paths ``root``, ``calib``, ``hf`` and ``sketch``."""
    from sketchtune_jax.cli import main

    calib = root / "calib.txt"
    calib.write_text("\n".join(word_text(60, s) for s in range(40)))
    save_tiny_model_with_tokenizer(root / "hf", [calib.read_text(), *extra_texts])
    sketch = root / "sketch"
    argv = ["sketch", str(root / "hf"), "--bits", "2", "--groups-per-row", "2", "--calib", str(calib)]
    argv += ["--nsamples", "4", "--seq-len", "32", "--kmeans-iters", "5", "--out", str(sketch), *extra_args]
    assert main(argv) == 0
    return {"root": root, "calib": calib, "hf": root / "hf", "sketch": sketch}


def assert_cli_refuses(argv: list[str], capsys, match: str) -> str:
    """Run the CLI on ``argv``: it must exit 2 with one stderr line containing ``match``; returns that line."""
    from sketchtune_jax.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err, err
    assert len(err.splitlines()) == 1, err
    return err


def tiny_sketched_llama(layers: int = 2, *, bits: int = 4, groups: int = 2, seed: int = 0, **config):
    """A random `LlamaForCausalLM` (the tiny shape above) with every decoder projection a
    `SketchedLinear`; weights drawn with numpy (no per-shape compile of eager jax.random)."""
    import jax
    import jax.numpy as jnp

    from sketchtune_jax._utils.module_paths import iter_modules, set_submodule
    from sketchtune_jax.layers import Linear, SketchedLinear
    from sketchtune_jax.models import LlamaForCausalLM, ModelConfig

    shape = {k: v for k, v in _BASE.items() if k in ModelConfig.__dataclass_fields__}
    cfg = ModelConfig(**{**shape, "num_hidden_layers": layers, **config})
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    for name, lin in list(iter_modules(model.model, Linear)):
        codes = rng.integers(0, 2**bits, (lin.out_features, groups, lin.in_features // groups)).astype(np.uint8)
        codebook = (0.3 * rng.standard_normal((lin.out_features, groups, 2**bits))).astype(np.float32)
        sketched = SketchedLinear(
            lin.in_features, lin.out_features, bits=bits, groups=groups, codebook=codebook, codes=codes
        )
        set_submodule(model.model, name, sketched)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            # Norm scales near 1, embeddings and head like the codebooks.
            base, scale = (1.0, 0.1) if len(value.shape) == 1 else (0.0, 0.3)
            var.set_value(jnp.asarray(base + scale * rng.standard_normal(value.shape), value.dtype))
    return model
