"""A GGUF file's tokenizer, rebuilt from its metadata with the `tokenizers` library (no torch).

llama.cpp stores a tokenizer as metadata: the vocabulary (``tokenizer.ggml.tokens``), each
token's type, BPE merges or SentencePiece scores, special token ids, a pre-tokenizer name
(``tokenizer.ggml.pre``) and the chat template. From these we build the `tokenizers.Tokenizer`
that the model's own ``tokenizer.json`` describes and wrap it in transformers'
`PreTrainedTokenizerFast` (the interface the rest of the library calls; it needs no torch,
while transformers' own GGUF reader does).

Two tokenizer models are built, the ones Llama-architecture GGUF files use:

- ``gpt2``: byte-level BPE (SmolLM, Llama 3), split first by the pre-tokenizer's regex;
- ``llama``: SentencePiece BPE with byte fallback (Llama 1/2, Mistral, TinyLlama).

Anything else is refused with a `ConversionError` that says what to do instead.
"""

from __future__ import annotations

from typing import Any

from converters._common import ConversionError

# llama.cpp's token types (``tokenizer.ggml.token_type``).
_CONTROL, _USER_DEFINED = 3, 4

# The split before byte-level BPE, by llama.cpp's pre-tokenizer name: None is GPT-2's own regex
# (`ByteLevel(use_regex=True)`), "digits" splits every numeric character apart first (llama.cpp's
# "\p{N}" expression; Hugging Face's `Digits(individual_digits=True)`), a string is a regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": "digits",
    "starcoder": "digits",
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
}
SUPPORTED_MODELS = ("gpt2", "llama")


def _get(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    field = fields.get(key)
    return default if field is None else field.contents()


def _byte_level(meta: dict[str, Any], where: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta["pre"] or "default"
    if pre not in BYTE_LEVEL_SPLITS:
        raise ConversionError(
            f"cannot build the tokenizer of {where}: pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(BYTE_LEVEL_SPLITS))}); use the model's Hugging Face directory instead"
        )
    if not meta["merges"]:
        raise ConversionError(f"cannot build the tokenizer of {where}: its byte-level vocabulary has no merges")
    vocab = {token: i for i, token in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = BYTE_LEVEL_SPLITS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens of
    the vocabulary, best-scored merged token first (ties: longer left part first), as transformers derives them."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges.extend((left, right, score) for left, right in pairs)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(meta: dict[str, Any], where: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokens"]
    if meta["merges"]:
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    elif meta["scores"] is not None:
        merges = sentencepiece_merges(tokens, meta["scores"])
    else:
        raise ConversionError(f"cannot build the tokenizer of {where}: its SentencePiece vocabulary has no scores")
    unk = meta["unk"] if meta["unk"] is not None else None
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = meta["add_space_prefix"]
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _add_special_tokens(tok: Any, meta: dict[str, Any]) -> None:
    """Control tokens stay whole and are special; user-defined ones stay whole but are text.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a mislabel
    (adding it would grow the vocabulary past the embedding), so it is skipped.
    """
    from tokenizers import AddedToken

    types = meta["types"] or [0] * len(meta["tokens"])
    alphabet = None
    if meta["model"] == "gpt2":
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(meta["tokens"], types)
        if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(meta["tokens"], types)
        if kind == _USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _post_processor(meta: dict[str, Any]):
    from tokenizers import processors

    bos = meta["bos"] if meta["add_bos"] else None
    eos = meta["eos"] if meta["add_eos"] else None
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    specials = [(t, meta["tokens"].index(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def read_tokenizer_metadata(reader: Any, where: str) -> dict[str, Any] | None:
    """The tokenizer fields of an open `gguf.GGUFReader`, or None when the file has no tokenizer."""
    fields = reader.fields
    model = _get(fields, "tokenizer.ggml.model")
    if model is None:
        return None
    tokens = _get(fields, "tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(f"cannot build the tokenizer of {where}: tokenizer.ggml.tokens is missing")

    def token(key: str) -> str | None:
        index = _get(fields, f"tokenizer.ggml.{key}")
        return None if index is None or not 0 <= int(index) < len(tokens) else tokens[int(index)]

    return {
        "model": model,
        "pre": _get(fields, "tokenizer.ggml.pre"),
        "tokens": tokens,
        "types": _get(fields, "tokenizer.ggml.token_type"),
        "merges": _get(fields, "tokenizer.ggml.merges"),
        "scores": _get(fields, "tokenizer.ggml.scores"),
        "bos": token("bos_token_id"),
        "eos": token("eos_token_id"),
        "unk": token("unknown_token_id"),
        "pad": token("padding_token_id"),
        # llama.cpp's defaults: a SentencePiece vocabulary adds BOS and a leading space unless it says not to.
        "add_bos": bool(_get(fields, "tokenizer.ggml.add_bos_token", model == "llama")),
        "add_eos": bool(_get(fields, "tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": bool(_get(fields, "tokenizer.ggml.add_space_prefix", model == "llama")),
        "chat_template": _get(fields, "tokenizer.chat_template"),
    }


def build_tokenizer(meta: dict[str, Any], where: str):
    """A transformers `PreTrainedTokenizerFast` from `read_tokenizer_metadata`'s fields."""
    if meta["model"] not in SUPPORTED_MODELS:
        raise ConversionError(
            f"cannot build the tokenizer of {where}: tokenizer model {meta['model']!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODELS)}); use the model's Hugging Face directory instead"
        )
    tok = _byte_level(meta, where) if meta["model"] == "gpt2" else _sentencepiece(meta, where)
    _add_special_tokens(tok, meta)
    tok.post_processor = _post_processor(meta)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=meta["bos"],
        eos_token=meta["eos"],
        unk_token=meta["unk"],
        pad_token=meta["pad"],
        chat_template=meta["chat_template"],
        add_bos_token=meta["add_bos"],
        add_eos_token=meta["add_eos"],
        clean_up_tokenization_spaces=False,
    )


__all__ = [
    "BYTE_LEVEL_SPLITS",
    "SUPPORTED_MODELS",
    "build_tokenizer",
    "read_tokenizer_metadata",
    "sentencepiece_merges",
]
