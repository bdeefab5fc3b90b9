"""The decoder family's NNX modules: :class:`Decoder` and its blocks (numerics: the package docstring)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.models.decoder.config import DecoderSpec, Rope
from nnxport.models.decoder.moe import SparseMoE
from nnxport.models.layers import (
    ACTIVATIONS,
    COLUMN,
    EMBEDDING,
    ROW,
    KVCache,
    attention,
    attention_mask,
    check_token_ids,
    dropout,
    padding_no_grad,
    sharded,
)
from nnxport.models.rope import apply_rope, cos_sin


class RMSNorm(nnx.Module):
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then multiply by ``scale``; with
    ``scale_first`` (GptOssRMSNorm) multiply by the scale in float32, then cast back; ``plus_one``
    (Gemma's) multiply by ``1 + scale`` in float32, then cast (the scale starts at zeros).

    Args:
        dim: the normalised (last) dimension.
        eps: ``rms_norm_eps``.
        plus_one: Gemma's variant.
        scale_first: the GPT-OSS order.
    """

    def __init__(self, dim: int, eps: float, plus_one: bool = False, scale_first: bool = False):
        self.scale = nnx.Param((jnp.zeros if plus_one else jnp.ones)((dim,), jnp.float32))
        self.eps = eps
        self.plus_one = plus_one
        self.scale_first = scale_first

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise ``x`` [..., dim]; the result has x's dtype (Llama's: the scale's where that is wider)."""
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (h * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        if self.scale_first:
            return (self.scale[...].astype(jnp.float32) * h).astype(x.dtype)
        return self.scale[...] * h.astype(x.dtype)


def _norm(spec: DecoderSpec, dim: int | None = None) -> RMSNorm:
    return RMSNorm(spec.hidden_size if dim is None else dim, spec.rms_norm_eps, spec.norm_plus_one,
                   spec.norm_scale_first)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), in x's dtype; x itself when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (and Qwen3's per-head q/k RMSNorm).

    Args:
        spec: the model's spec (sizes, biases, ``qk_norm``).
        rngs: random streams.
    """

    def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs):
        h, d = spec.hidden_size, spec.head_dim
        qh, kvh, bias = spec.num_heads * d, spec.num_kv_heads * d, spec.qkv_bias
        self.q = nnx.Linear(h, qh, use_bias=bias, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.k = nnx.Linear(h, kvh, use_bias=bias, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.v = nnx.Linear(h, kvh, use_bias=bias, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.o = nnx.Linear(qh, h, use_bias=spec.o_bias, kernel_metadata=sharded(ROW), rngs=rngs)
        self.q_norm = _norm(spec, d) if spec.qk_norm else None
        self.k_norm = _norm(spec, d) if spec.qk_norm else None
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.scale = d ** -0.5 if spec.query_scale is None else spec.query_scale
        self.softcap = spec.attn_softcap
        self.dropout = dropout(spec.attention_dropout, rngs)
        # GPT-OSS: a learned per-head logit in every softmax (layers.attention's ``sinks``)
        self.sinks = nnx.Param(jnp.zeros((spec.num_heads,), jnp.float32)) if spec.attention_sinks else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """Attend and project back.

        Args:
            x: hidden states [B, T, hidden_size].
            cos: rotary cosines [T, head_dim], in x's dtype.
            sin: rotary sines [T, head_dim], in x's dtype.
            mask: boolean [B|1, 1, T, T], True where query i may attend to key j.
        """
        q, k, v = self._qkv(x, cos, sin)
        out = attention(q, k, v, mask, scale=self.scale, dropout=self.dropout, softcap=self.softcap,
                        sinks=None if self.sinks is None else self.sinks[...])
        return self.o(out.reshape(*x.shape[:2], self.heads * self.head_dim))

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3, Gemma 3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def step(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache,
             layer: int) -> tuple[jax.Array, KVCache]:
        """:meth:`__call__` for new tokens x [B, T, hidden] against the cache (``mask`` from
        ``cache.mask``); writes this layer's keys and values."""
        q, k, v = self._qkv(x, cos, sin)
        out, cache = cache.attend(layer, q, k, v, mask, scale=self.scale, softcap=self.softcap,
                                  sinks=None if self.sinks is None else self.sinks[...])
        return self.o(out.reshape(*x.shape[:2], self.heads * self.head_dim)), cache


class MLP(nnx.Module):
    """SwiGLU MLP: ``down(act(gate(x)) * up(x))``.

    Args:
        spec: the model's spec (sizes, ``mlp_bias``, ``hidden_act``).
        rngs: random streams.
    """

    def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs):
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate = nnx.Linear(h, i, use_bias=spec.mlp_bias, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.up = nnx.Linear(h, i, use_bias=spec.mlp_bias, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.down = nnx.Linear(i, h, use_bias=spec.mlp_bias, kernel_metadata=sharded(ROW), rngs=rngs)
        self.act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the MLP.

        Args:
            x: hidden states [..., hidden_size].
        """
        return self.down(ACTIVATIONS[self.act](self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm block: ``x + attn(input_norm(x))``, then ``x + mlp(post_attn_norm(x))``; the MLP is a
    sparse MoE layer where ``spec.moe`` says so for this layer. With ``sandwich_norms`` (Gemma) the
    outputs are normed too: ``x + post_attn_norm(attn(input_norm(x)))``, then
    ``x + post_mlp_norm(mlp(pre_mlp_norm(x)))``. With ``resid_dropout`` (Phi-3) the attention and MLP
    outputs go through dropout before their residual adds (train mode only).

    Args:
        spec: the model's spec.
        rngs: random streams.
        layer: the block's index (which layers are sparse: ``spec.moe.sparse``).
    """

    def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs, layer: int = 0):
        self.input_norm = _norm(spec)
        self.attn = Attention(spec, rngs=rngs)
        self.post_attn_norm = _norm(spec)
        self.mlp: MLP | SparseMoE = (
            SparseMoE(spec.hidden_size, spec.hidden_act, spec.moe, rngs=rngs)
            if spec.moe is not None and spec.moe.sparse[layer] else MLP(spec, rngs=rngs))
        self.pre_mlp_norm = _norm(spec) if spec.sandwich_norms else None
        self.post_mlp_norm = _norm(spec) if spec.sandwich_norms else None
        self.resid_dropout = None if spec.resid_dropout is None else dropout(spec.resid_dropout, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """Apply the block (arguments as :meth:`Attention.__call__`)."""
        return self._rest(x, self.attn(self.input_norm(x), cos, sin, mask))

    def step(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache,
             layer: int) -> tuple[jax.Array, KVCache]:
        """The block on new tokens against the KV cache (see :meth:`Attention.step`)."""
        h, cache = self.attn.step(self.input_norm(x), cos, sin, mask, cache, layer)
        return self._rest(x, h), cache

    def _rest(self, x: jax.Array, h: jax.Array) -> jax.Array:
        """The residual adds and the MLP, given the attention output ``h``."""
        if self.pre_mlp_norm is not None and self.post_mlp_norm is not None:
            x = x + self.post_attn_norm(h)
            return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        drop = (lambda t: t) if self.resid_dropout is None else self.resid_dropout
        x = x + drop(h)
        return x + drop(self.mlp(self.post_attn_norm(x)))


#: Vocabulary rows per piece of the head when the model runs eagerly (see :meth:`Decoder._logits`).
HEAD_CHUNK = 16384


class Decoder(nnx.Module):
    """A decoder-only LM: ``model(input_ids [B, T] int, attention_mask [B, T] or None) -> logits [B, T, V]``
    in the weights' dtype. ``__call__`` runs the whole sequence at positions 0..T-1 (the mask only hides
    padded keys); :meth:`decode` runs new tokens against a KV cache at given positions (generation).

    Args:
        spec: the resolved config (:func:`resolve`).
        rngs: random streams for the initialisers.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from nnxport.models.decoder import Decoder, resolve
        >>> spec = resolve({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
        ...                 "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64,
        ...                 "vocab_size": 100})
        >>> model = Decoder(spec, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 8), jnp.int32)).shape
        (2, 8, 100)
    """

    def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = nnx.Embed(spec.vocab_size, spec.hidden_size, embedding_metadata=sharded(EMBEDDING),
                               rngs=rngs)
        self.layers = nnx.List([Block(spec, rngs=rngs, layer=i) for i in range(spec.num_layers)])
        self.norm = _norm(spec)
        self.lm_head = (None if spec.tie_word_embeddings
                        else nnx.Linear(spec.hidden_size, spec.vocab_size, use_bias=False,
                                        kernel_metadata=sharded(COLUMN), rngs=rngs))

    def hidden_states(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The final normed hidden states.

        Args:
            input_ids: token ids [B, T].
            mask: padding mask [B, T] (1 = token), or None.

        Returns:
            [B, T, hidden_size], in the weights' dtype.
        """
        check_token_ids(input_ids, self.spec.vocab_size)  # eager calls only (concrete ids)
        # Not nnx.Embed.__call__: it computes in the dtype the module was built with (float32), while the
        # model runs in the dtype of the stored weights, as transformers does.
        x = padding_no_grad(self._embed(input_ids), input_ids, self.spec.pad_token_id)
        length = input_ids.shape[1]
        ropes = self._ropes(jnp.arange(length)[None], x.dtype)
        masks = {w: attention_mask(mask, length, causal=True, sliding_window=w)
                 for w in set(self.spec.windows)}
        for layer, window, (cos, sin) in zip(self.layers, self.spec.windows, ropes, strict=True):
            x = layer(x, cos, sin, masks[window])
        return self.norm(x)

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed.embedding[...], input_ids, axis=0)
        if self.spec.embed_scale is None:
            return x
        # Gemma: the scale as a float32 tensor cast to the weights' dtype (bf16: sqrt(3072) becomes 55.5)
        return x * jnp.asarray(np.float32(self.spec.embed_scale)).astype(x.dtype)

    def __call__(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, vocab_size] (arguments as :meth:`hidden_states`)."""
        return self._logits(self.hidden_states(input_ids, mask))

    def _logits(self, h: jax.Array) -> jax.Array:
        """The head: the embedding's transpose when tied, else ``lm_head`` (then Gemma 2's soft-cap).

        Run eagerly (streamed parity, :mod:`nnxport.parity.streamed`) it goes through the vocabulary
        :data:`HEAD_CHUNK` rows at a time: XLA on CPU computes a bf16 matmul in float32, and one eager
        matmul over the whole table would hold a float32 copy of it (1 GB for Llama-3.2-1B's, 2 GB for
        Llama-3.1-8B's head). Traced (jit), it is one contraction, as XLA fuses it.
        """
        head, cap = self.lm_head, self.spec.final_softcap
        table = self.embed.embedding[...] if head is None else head.kernel[...]
        spec, axis = ("...d,vd->...v", 0) if head is None else ("...d,dv->...v", 1)
        size = table.shape[axis]
        if isinstance(h, jax.core.Tracer) or size <= HEAD_CHUNK:
            return _softcap(jnp.einsum(spec, h, table) if head is None else head(h), cap)
        parts = [jnp.einsum(spec, h, jax.lax.slice_in_dim(table, i, min(size, i + HEAD_CHUNK), axis=axis))
                 for i in range(0, size, HEAD_CHUNK)]
        return _softcap(jnp.concatenate(parts, axis=-1), cap)

    def _ropes(self, positions: jax.Array, dtype: Any) -> list[tuple[jax.Array, jax.Array]]:
        """Per layer, cos and sin [B|1, T, rotary dim] of position ids [B|1, T] (:func:`cos_sin`; one
        table per distinct RoPE)."""
        tables: dict[Rope, tuple[jax.Array, jax.Array]] = {}
        for rope in self.spec.layer_ropes():
            if rope not in tables:
                tables[rope] = cos_sin(rope, positions, dtype)
        return [tables[rope] for rope in self.spec.layer_ropes()]

    #: Rotary positions have no table: generation is limited by memory only.
    max_positions: int | None = None

    @property
    def reencode_at(self) -> int | None:
        """Longrope (Phi-3): the cache length at which transformers' generate re-encodes the whole sequence
        (its long factors take over past ``original_max_position_embeddings``); None otherwise. Read by
        :func:`nnxport.generate`."""
        rope = self.spec.rope
        return rope.original_max_position_embeddings if rope.rope_type == "longrope" else None

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache of ``max_len`` slots for ``batch`` rows (for :meth:`decode`), in the dtype of
        the weights."""
        dtype = self.embed.embedding.dtype
        return KVCache.empty(batch, max_len, self.spec.num_layers, self.spec.num_kv_heads,
                             self.spec.head_dim, dtype)

    def decode(self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache
               ) -> tuple[jax.Array, KVCache]:
        """Incremental decoding: logits [B, T, vocab_size] of T new tokens written at the cache's next
        slots (the prompt at once, then one token per step), and the updated cache. Each layer's sliding
        window (``spec.windows``) applies to the cache's slots as in :meth:`hidden_states`.

        Args:
            input_ids: new token ids [B, T].
            positions: their position ids [B, T] (:func:`nnxport.models.layers.generation_positions`).
            mask: [B, T], 1 for tokens, 0 for padding (never attended to).
            cache: from :meth:`init_cache` or the previous call.
        """
        x = self._embed(input_ids)
        ropes = self._ropes(positions, x.dtype)
        cache = cache.admit(mask)
        length = input_ids.shape[1]
        masks = {w: cache.mask(length, w) for w in set(self.spec.windows)}
        for i, (layer, window, (cos, sin)) in enumerate(zip(self.layers, self.spec.windows, ropes,
                                                             strict=True)):
            x, cache = layer.step(x, cos, sin, masks[window], cache, i)
        return self._logits(self.norm(x)), cache.advance(length)
