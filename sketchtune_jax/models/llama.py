"""Llama-family decoder (Llama 1/2/3/3.1, Mistral) in Flax NNX.

The module tree mirrors the Hugging Face one, so the flat path of every parameter,
joined with dots, is its key in a transformers checkpoint
(``model.layers.3.self_attn.q_proj.weight``). Every projection is a
`sketchtune_jax.layers.Linear` called only as ``proj(x)``, so the sketcher can
replace it by attribute assignment::

    model.model.layers[i].self_attn.q_proj = SketchedLinear(...)

Layer-by-layer use (the sketcher's calibration pass)::

    h = model.model.embed_tokens(input_ids)                # [B, T, D], compute dtype
    for layer in model.model.layers:
        h = layer(h, positions=positions, attention_mask=attention_mask)   # [B, T, D]

`positions` and `attention_mask` are ``[B, T]``; when `positions` is omitted it is
derived from the mask (0, 1, 2, ... over the real tokens of each row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sketchtune_jax.layers import Linear
from sketchtune_jax.models.config import ModelConfig
from sketchtune_jax.models.kv_cache import KVCache
from sketchtune_jax.models.remat import remat_name, with_remat
from sketchtune_jax.models.rope import apply_rope, inverse_frequencies, rope_angles
from sketchtune_jax.models.scan import is_stacked, layer_slice, scan_layers

Rope = tuple[jax.Array, jax.Array]


class Embedding(nnx.Module):
    """Token embedding, ``weight [vocab, hidden]`` (HF's `embed_tokens.weight`)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=0.02)
        self.weight = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids [B, T]`` int -> ``[B, T, hidden]`` in the compute dtype."""
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: ``x [..., hidden] -> [..., vocab]``."""
        return jnp.einsum("...d,vd->...v", x, self.weight[...].astype(x.dtype))


class RMSNorm(nnx.Module):
    """RMS normalisation computed in float32, then scaled by ``weight [dim]``."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; ``q/k/v/o_proj`` as in HF."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd = config.hidden_size, config.head_dim
        kw = dict(use_bias=config.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, self.num_heads * hd, **kw)
        self.k_proj = Linear(d, self.num_kv_heads * hd, **kw)
        self.v_proj = Linear(d, self.num_kv_heads * hd, **kw)
        self.o_proj = Linear(self.num_heads * hd, d, **kw)

    def __call__(
        self, x: jax.Array, rope: Rope, mask: jax.Array, past: tuple[jax.Array, jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attend ``x [B, T, D]``; returns the output and the keys and values attended over.

        Without `past`, keys are the T new tokens and ``mask`` is bool ``[B, T, T]``.
        With ``past = (k_layer, v_layer, index)`` (``[B, S, kv_heads, head_dim]`` and the
        slot to write at), the new keys are placed at ``[index, index + T)``, ``mask`` is
        ``[B, T, S]``, and the returned keys and values are the updated cache arrays.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        keys, values = k, v
        if past is not None:
            k_layer, v_layer, index = past
            keys = jax.lax.dynamic_update_slice(k_layer, k.astype(k_layer.dtype), (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(v_layer, v.astype(v_layer.dtype), (0, index, 0, 0))
        out = _attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), (keys, values)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``q [B,T,H,Dh]``, ``k, v [B,S,KH,Dh]``, bool ``mask [B,T,S]`` -> ``[B,T,H,Dh]``.

    `jax.nn.dot_product_attention` takes the grouped kv heads as they are and lets JAX
    pick the kernel for the platform. Its masked fill is finite, so fully masked rows
    (left-pad queries) come out as a uniform average, never NaN.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.down_proj = Linear(f, d, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    # Projections that read the same activation share one Hessian, so they are sketched
    # as one stage; stages run in forward order.
    SKETCH_STAGES: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

    def sketch_stages(self) -> tuple[tuple[str, ...], ...]:
        """Dotted names of the layer's projections, grouped by the activation they read, in forward order."""
        return self.SKETCH_STAGES

    def sketch_projections(self) -> tuple[str, ...]:
        """Every projection the sketcher replaces, in `sketch_stages` order."""
        return tuple(name for stage in self.sketch_stages() for name in stage)

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, hidden: jax.Array, positions: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Run the layer on its own (no cache): ``hidden [B, T, D]`` -> ``[B, T, D]``.

        ``positions [B, T]`` int (derived from the mask when None) and
        ``attention_mask [B, T]`` (1 = real token, 0 = pad; None = all real).
        """
        b, t, _ = hidden.shape
        token_mask = _token_mask(attention_mask, b, t)
        if positions is None:
            positions = positions_from_mask(token_mask)
        slots = jnp.arange(t)
        mask = attention_mask_for(slots, slots, token_mask, self.config.sliding_window)
        out, _ = self.forward(hidden.astype(self.dtype), rope_for(self.config, positions), mask)
        return out

    def forward(
        self, hidden: jax.Array, rope: Rope, mask: jax.Array, past: tuple[jax.Array, jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The model's entry: precomputed RoPE and mask; see `Attention.__call__`."""
        attn, kv = self.self_attn(self.input_layernorm(hidden), rope, mask, past)
        hidden = hidden + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, kv


class LlamaModel(nnx.Module):
    """Embeddings, decoder layers and final norm (HF's `model.` prefix).

    ``remat`` names the rematerialisation policy of each decoder layer in a cache-free
    forward (training); see `sketchtune_jax.models.remat.REMAT_POLICIES`. ``layers`` is
    an ``nnx.List`` of `DecoderLayer`, or one `DecoderLayer` with a leading layer axis
    on every variable after `sketchtune_jax.models.scan.stack_layers`; the cache-free
    forward then runs the layers as one scan.
    """

    runs_stacked_layers = True

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        remat: str | bool = "none",
    ):
        remat = remat_name(remat)  # an unknown name fails before anything is built
        self.config = config
        self.embed_tokens = Embedding(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [
                DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None, attention_mask: jax.Array | None, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None]:
        """``input_ids [B, T]`` -> final-normed hidden ``[B, T, D]`` and the updated cache.

        Without a cache the keys are the ``T`` new tokens; with one they are its ``max_len``
        slots, the new tokens written at ``[index, index + T)``. One loop serves both.
        """
        b, t = input_ids.shape
        token_mask = _token_mask(attention_mask, b, t)
        if cache is None:
            start, index = jnp.zeros((b,), jnp.int32), 0
            key_valid, key_slots = token_mask, jnp.arange(t)
        else:
            start, index = cache.lengths, cache.index
            key_valid = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, index))
            key_slots = jnp.arange(cache.max_len)
            pasts = [(k, v, index) for k, v in zip(cache.k, cache.v)]
        if positions is None:
            positions = start[:, None] + positions_from_mask(token_mask)
        mask = attention_mask_for(index + jnp.arange(t), key_slots, key_valid, self.config.sliding_window)
        rope = rope_for(self.config, positions)
        hidden = self.embed_tokens(input_ids)
        if cache is None:
            # Training recomputes layers by the remat policy and needs no keys back.
            run = with_remat(lambda layer, h: layer.forward(h, rope, mask)[0], self.remat)
            if is_stacked(self):
                hidden = scan_layers(run, self.layers, hidden)
            else:
                for layer in self.layers:
                    hidden = run(layer, hidden)
            return self.norm(hidden), None
        # Decoding keeps one loop over the layers (a stacked model's are sliced out) and
        # carries each layer's cache arrays as they are.
        layers = (
            [layer_slice(self.layers, i) for i in range(self.config.num_hidden_layers)]
            if is_stacked(self)
            else self.layers
        )
        kv = []
        for layer, past in zip(layers, pasts):
            hidden, layer_kv = layer.forward(hidden, rope, mask, past)
            kv.append(layer_kv)
        new_cache = KVCache(
            k=tuple(k for k, _ in kv),
            v=tuple(v for _, v in kv),
            mask=key_valid,
            index=index + t,
            lengths=cache.lengths + token_mask.sum(axis=-1, dtype=jnp.int32),
        )
        return self.norm(hidden), new_cache


class LlamaForCausalLM(nnx.Module):
    """Causal LM: `model` (`LlamaModel`) and `lm_head` (absent when embeddings are tied).

    Args:
      config: the architecture.
      dtype: compute dtype of activations (norms and softmax always run in float32).
      param_dtype: storage dtype of parameters.
      remat: rematerialisation policy of the decoder layers in training, a name from
        `sketchtune_jax.models.REMAT_POLICIES` ("none", "full", "dots_saveable", ...).
      rngs: initialisation randomness (use `nnx.eval_shape` to build without allocating).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: str | bool = "none",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def __call__(
        self,
        inputs: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        stage: str = "all",
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits for ``input_ids [B, T]`` (int32), or one half of that computation.

        Args:
          inputs: ``input_ids [B, T]`` int32; for ``stage="head"``, hidden states ``[..., D]``.
          positions: ``[B, T]`` RoPE positions; by default counted over the real tokens
            of each row (continuing from the cache when one is given).
          attention_mask: ``[B, T]``, 1 for real tokens and 0 for (left) padding.
          cache: a `KVCache`; this call's tokens go into its next ``T`` slots.
          stage: ``"all"``; ``"trunk"`` stops before the head and returns the final-normed
            hidden states ``[B, T, D]``; ``"head"`` applies only the head. Both halves
            go through ``__call__`` so that wrappers which intercept it (qwix LoRA and
            QLoRA) see every matmul; the loss uses them to run the head chunk by chunk.

        Returns:
          float32 logits ``[B, T, vocab]`` (hidden states for ``"trunk"``) and the
          updated cache (None without one, and always for ``"head"``).
        """
        if stage == "head":
            if self.config.tie_word_embeddings:
                logits = self.model.embed_tokens.attend(inputs)
            else:
                logits = self.lm_head(inputs)
            return logits.astype(jnp.float32), None
        if stage not in ("all", "trunk"):
            raise ValueError(f"stage must be 'all', 'trunk' or 'head', got {stage!r}")
        hidden, cache = self.model(inputs, positions, attention_mask, cache)
        if stage == "trunk":
            return hidden, cache
        return self(hidden, stage="head")[0], cache

    def hidden_states(
        self, input_ids: jax.Array, *, positions: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Final-normed hidden states ``[B, T, D]`` (compute dtype) for ``input_ids [B, T]``, no cache."""
        return self(input_ids, positions=positions, attention_mask=attention_mask, stage="trunk")[0]

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """The head: ``hidden [..., D]`` -> float32 logits ``[..., vocab]``."""
        return self(hidden, stage="head")[0]


def _token_mask(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    if attention_mask is None:
        return jnp.ones((batch, length), jnp.bool_)
    return attention_mask.astype(jnp.bool_)


def positions_from_mask(token_mask: jax.Array) -> jax.Array:
    """``[B, T]`` positions 0, 1, ... over the real tokens of each row (pads get 0)."""
    return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_for(
    q_slots: jax.Array, k_slots: jax.Array, key_valid: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Bool ``[B, T, S]``: causal over slots, within the sliding window, real keys only.

    ``q_slots [T]`` and ``k_slots [S]`` are sequence slots; ``key_valid [B, S]``.
    As in transformers, a window of ``w`` lets a query see itself and ``w - 1`` earlier slots.
    """
    allowed = k_slots[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        allowed &= k_slots[None, :] > q_slots[:, None] - sliding_window
    return allowed[None] & key_valid[:, None, :]


def rope_for(config: ModelConfig, positions: jax.Array) -> Rope:
    """cos/sin float32 ``[B, T, head_dim]`` for ``positions [B, T]``."""
    return rope_angles(positions, inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling))
