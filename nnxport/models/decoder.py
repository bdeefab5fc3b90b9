"""Decoder-only language models: Llama (2, 3.x), Qwen2 / Qwen2.5, Qwen3 and Mistral, one implementation.

The four transformers classes (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``MistralForCausalLM``) share one architecture: token embedding, pre-norm blocks of grouped-query
self-attention with rotary position embeddings and a SwiGLU MLP, a final RMSNorm and a language-model head
(tied to the embedding or not). They differ only in switches, resolved from config.json by
:func:`resolve` into a :class:`DecoderSpec`:

================  ==========================  ============  ==========  ================================
model_type        q/k/v bias; o bias          MLP bias      q/k norm    sliding window
================  ==========================  ============  ==========  ================================
llama             attention_bias; same        mlp_bias      no          no
qwen2             always; never               no            no          use_sliding_window, layers >=
                                                                        max_window_layers (layer_types)
qwen3             attention_bias; same        no            yes         as qwen2
mistral           no; no                      no            no          sliding_window (every layer)
================  ==========================  ============  ==========  ================================

RoPE types ``default``, ``linear`` and ``llama3`` are implemented as in transformers' modeling_rope_utils;
both config layouts are read: the hub's (``rope_theta`` and ``rope_scaling`` at the top level) and what
transformers 5 writes (``rope_parameters: {rope_type, rope_theta, ...}``).

Numerics follow transformers: RMSNorm in float32 (``weight * normed.to(input_dtype)``), cos/sin in float32
cast to the activations' dtype, attention scores, softmax and weighted sum in float32; everything else in
the dtype the weights are stored in (bf16 weights: bf16 matmuls, as transformers runs a bf16 model).
Every config.json field that changes the forward pass is implemented or refused by :func:`resolve`.

Target paths (what ``mappings/decoder.yaml`` fills)::

    embed.embedding                                   [vocab, hidden]
    layers.N.input_norm.scale, layers.N.post_attn_norm.scale
    layers.N.attn.{q,k,v,o}.kernel                    [in, out]; .bias where the model has biases
    layers.N.attn.{q_norm,k_norm}.scale               (qwen3) [head_dim]
    layers.N.mlp.{gate,up,down}.kernel                (.bias with llama's mlp_bias)
    norm.scale
    lm_head.kernel                                    [hidden, vocab], only when tie_word_embeddings is false
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import (
    Family,
    ParityHarness,
    ParityInput,
    Tolerance,
    padding_idx_field,
    rate_field,
    token_inputs,
    valid_positions,
)
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

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
REFERENCE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

#: Defaults of the transformers 5.23 config classes for every field this module reads (a field missing
#: from config.json takes them). ``None`` head_dim / num_key_value_heads: derived as transformers does.
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096},
}
DEFAULT_ROPE_THETA = 10000.0


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Rope:
    """Rotary embedding parameters (transformers' ``rope_parameters`` after standardisation)."""

    rope_type: str
    theta: float
    head_dim: int
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim // 2] in float32, computed in float32 in transformers' order."""
        f32 = np.float32
        exponent = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(f32) / f32(self.head_dim)
        inv = f32(1.0) / np.power(f32(self.theta), exponent, dtype=f32)
        if self.rope_type == "linear":
            return (inv / f32(self.factor)).astype(f32)
        if self.rope_type != "llama3":
            return inv.astype(f32)
        # transformers.modeling_rope_utils._compute_llama3_parameters
        factor, low, high = f32(self.factor), f32(self.low_freq_factor), f32(self.high_freq_factor)
        old = f32(self.original_max_position_embeddings)
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = (f32(2 * math.pi) / inv).astype(f32)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f32)


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the NNX model needs, resolved from config.json (see :func:`resolve`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    rope: Rope
    #: Per layer: the sliding window W (query i sees keys i-W < j <= i), or None for full causal attention.
    windows: tuple[int | None, ...]
    #: ``attention_dropout``: dropout on the attention probabilities (train mode only); these models have
    #: no other dropout.
    attention_dropout: float = 0.0
    #: ``pad_token_id``: the embedding row that lookups pass no gradient to (torch's ``padding_idx``).
    pad_token_id: int | None = None


def _get(config: Mapping[str, Any], field: str) -> Any:
    """``config[field]``, or the config class's default when config.json does not have it."""
    defaults = DEFAULTS[config.get("model_type", "llama")]
    return config[field] if field in config else defaults.get(field)


def _int(config: Mapping[str, Any], field: str, *, minimum: int = 1) -> int:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.json: field '{field}' must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"config.json: field '{field}' must be a number, got {value!r}")
    return float(value)


def _flag(config: Mapping[str, Any], field: str) -> bool:
    value = _get(config, field)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: field '{field}' must be true or false, got {value!r}")
    return value


def _rope(config: Mapping[str, Any], head_dim: int, max_positions: int) -> Rope:
    """RoPE parameters the way transformers 5 standardises them (``convert_rope_params_to_dict``): a
    hub ``rope_scaling`` wins over ``rope_parameters``; ``rope_theta`` comes from that dict, else the top
    level, else 10000; the type from ``rope_type``, else the older ``type``, else ``default``."""
    field = "rope_scaling" if config.get("rope_scaling") is not None else "rope_parameters"
    params = config.get(field) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: field '{field}' must be a mapping, got {params!r}")
    if any(k in LAYER_TYPES for k in params):
        raise ConfigError(f"config.json: field '{field}' holds per-layer-type RoPE parameters, which "
                          f"{config.get('model_type')} models do not have")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json: field '{field}' has rope_type {rope_type!r}, which nnxport's "
                          f"decoder family does not implement (supported: {', '.join(ROPE_TYPES)})")
    theta = params["rope_theta"] if "rope_theta" in params else config.get("rope_theta", DEFAULT_ROPE_THETA)
    theta = _number(theta, "rope_theta")
    for where, prf in (("partial_rotary_factor", config.get("partial_rotary_factor")),
                       (f"{field}.partial_rotary_factor", params.get("partial_rotary_factor"))):
        if prf is not None and prf != 1.0:
            raise ConfigError(f"config.json: field '{where}' is {prf!r}; only full rotary embeddings (1.0) "
                              f"are supported for {config.get('model_type')} models")
    if rope_type == "default":
        return Rope("default", theta, head_dim)

    def need(key: str) -> float:
        if params.get(key) is None:
            raise ConfigError(f"config.json: field '{field}' of rope_type {rope_type!r} needs '{key}'")
        return _number(params[key], f"{field}.{key}")

    factor = need("factor")
    if rope_type == "linear":
        return Rope("linear", theta, head_dim, factor=factor)
    low, high = need("low_freq_factor"), need("high_freq_factor")
    if high <= low:
        raise ConfigError(f"config.json: field '{field}': high_freq_factor ({high}) must exceed "
                          f"low_freq_factor ({low})")
    # transformers gives a top-level original_max_position_embeddings priority, then the dict's, then
    # max_position_embeddings.
    original = config.get("original_max_position_embeddings",
                          params.get("original_max_position_embeddings", max_positions))
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ConfigError(f"config.json: field '{field}.original_max_position_embeddings' must be a "
                          f"positive integer, got {original!r}")
    return Rope("llama3", theta, head_dim, factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=original)


def _windows(config: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows, as the transformers 5.23 classes decide them."""
    if model_type == "llama":
        return (None,) * num_layers
    window = _get(config, "sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"config.json: field 'sliding_window' must be a positive integer or null, "
                          f"got {window!r}")
    if model_type == "mistral":  # MistralModel: one mask for every layer (layer_types is ignored)
        return (window,) * num_layers
    # Qwen2Config / Qwen3Config.__post_init__: the window exists only with use_sliding_window; layer_types
    # (written by transformers 5) wins over max_window_layers.
    if not _flag(config, "use_sliding_window"):
        window = None
    layer_types = config.get("layer_types")
    if layer_types is None:
        first = _int(config, "max_window_layers", minimum=0)
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) < num_layers:
        raise ConfigError(f"config.json: field 'layer_types' must list one type per layer "
                          f"({num_layers}), got {layer_types!r}")
    out: list[int | None] = []
    for t in layer_types[:num_layers]:
        if t not in LAYER_TYPES:
            raise ConfigError(f"config.json: field 'layer_types' has {t!r} "
                              f"(supported: {', '.join(LAYER_TYPES)})")
        if t == "sliding_attention" and window is None:
            raise ConfigError("config.json: field 'layer_types' asks for sliding_attention but "
                              "'sliding_window' is not set (or use_sliding_window is false)")
        out.append(window if t == "sliding_attention" else None)
    return tuple(out)


def resolve(config: Mapping[str, Any]) -> DecoderSpec:
    """The :class:`DecoderSpec` of ``config``; ConfigError naming the field for anything not implemented."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config.json: field 'model_type' is {model_type!r}; the decoder family covers "
                          f"{', '.join(MODEL_TYPES)}")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json: field 'architectures' must be a list of class names, got {archs!r}")
    if archs and not any(a.lower().endswith("forcausallm") for a in archs):
        raise ConfigError(f"config.json: field 'architectures' is {archs}; the decoder family converts "
                          f"causal language models ({REFERENCE[model_type]})")
    if config.get("quantization_config") is not None:
        raise ConfigError("config.json: field 'quantization_config' is set; quantized checkpoints are not "
                          "supported (convert the unquantized weights)")
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads")
    kv_heads = heads if kv_heads is None else _int(config, "num_key_value_heads")
    if heads % kv_heads:
        raise ConfigError(f"config.json: field 'num_key_value_heads' ({kv_heads}) must divide "
                          f"num_attention_heads ({heads})")
    head_dim = _get(config, "head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"config.json: field 'hidden_size' ({hidden}) is not a multiple of "
                              f"num_attention_heads ({heads}) and 'head_dim' is not set")
        head_dim = hidden // heads
    else:
        head_dim = _int(config, "head_dim")
    if head_dim % 2:
        raise ConfigError(f"config.json: field 'head_dim' ({head_dim}) must be even for rotary embeddings")
    if model_type == "llama" and hidden % heads:  # LlamaConfig.validate_architecture
        raise ConfigError(f"config.json: field 'hidden_size' ({hidden}) must be a multiple of "
                          f"num_attention_heads ({heads}) for llama models")
    act = _get(config, "hidden_act")
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json: field 'hidden_act' is {act!r}, which nnxport's decoder family does "
                          f"not implement (supported: {', '.join(sorted(ACTIVATIONS))})")
    eps = _number(_get(config, "rms_norm_eps"), "rms_norm_eps")
    num_layers = _int(config, "num_hidden_layers")
    max_positions = _int(config, "max_position_embeddings")
    if model_type == "llama":
        qkv_bias = o_bias = _flag(config, "attention_bias")
        mlp_bias = _flag(config, "mlp_bias")
    elif model_type == "qwen3":
        qkv_bias = o_bias = _flag(config, "attention_bias")
        mlp_bias = False
    else:
        qkv_bias, o_bias, mlp_bias = model_type == "qwen2", False, False
    return DecoderSpec(
        model_type=model_type,
        vocab_size=_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        hidden_act=act,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=_flag(config, "tie_word_embeddings"),
        rope=_rope(config, head_dim, max_positions),
        windows=_windows(config, model_type, num_layers),
        attention_dropout=rate_field(config, "attention_dropout", 0.0),
        pad_token_id=padding_idx_field(config, _int(config, "vocab_size"), None),
    )


# -------------------------------------------------------------------------------------------- model

class RMSNorm(nnx.Module):
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then multiply by ``scale``.

    Args:
        dim: the normalised (last) dimension.
        eps: ``rms_norm_eps``.
    """

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise ``x`` [..., dim]; the result has x's dtype (the scale's where that is wider)."""
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * h.astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; cos, sin [B|1, T, D] (already in x's dtype)."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


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
        self.q_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.dropout = dropout(spec.attention_dropout, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """Attend and project back.

        Args:
            x: hidden states [B, T, hidden_size].
            cos: rotary cosines [T, head_dim], in x's dtype.
            sin: rotary sines [T, head_dim], in x's dtype.
            mask: boolean [B|1, 1, T, T], True where query i may attend to key j.
        """
        q, k, v = self._qkv(x, cos, sin)
        out = attention(q, k, v, mask, scale=self.head_dim ** -0.5, dropout=self.dropout)
        return self.o(out.reshape(*x.shape[:2], self.heads * self.head_dim))

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

    def step(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache,
             layer: int) -> tuple[jax.Array, KVCache]:
        """:meth:`__call__` for new tokens x [B, T, hidden] against the cache (``mask`` from
        ``cache.mask``); writes this layer's keys and values."""
        q, k, v = self._qkv(x, cos, sin)
        out, cache = cache.attend(layer, q, k, v, mask, scale=self.head_dim ** -0.5)
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
    """Pre-norm block: ``x + attn(input_norm(x))``, then ``x + mlp(post_attn_norm(x))``.

    Args:
        spec: the model's spec.
        rngs: random streams.
    """

    def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = Attention(spec, rngs=rngs)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """Apply the block (arguments as :meth:`Attention.__call__`)."""
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_attn_norm(x))

    def step(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache,
             layer: int) -> tuple[jax.Array, KVCache]:
        """The block on new tokens against the KV cache (see :meth:`Attention.step`)."""
        h, cache = self.attn.step(self.input_norm(x), cos, sin, mask, cache, layer)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), cache


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
        self.layers = nnx.List([Block(spec, rngs=rngs) for _ in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
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
        x = padding_no_grad(jnp.take(self.embed.embedding[...], input_ids, axis=0), input_ids,
                            self.spec.pad_token_id)
        length = input_ids.shape[1]
        cos, sin = self._rope(jnp.arange(length)[None], x.dtype)
        masks = {w: attention_mask(mask, length, causal=True, sliding_window=w)
                 for w in set(self.spec.windows)}
        for layer, window in zip(self.layers, self.spec.windows, strict=True):
            x = layer(x, cos, sin, masks[window])
        return self.norm(x)

    def __call__(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, vocab_size] (arguments as :meth:`hidden_states`)."""
        return self._logits(self.hidden_states(input_ids, mask))

    def _logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:  # tied: the embedding's transpose
            return h @ self.embed.embedding[...].T
        return self.lm_head(h)

    def _rope(self, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B|1, T, head_dim] of position ids [B|1, T], computed in float32, cast to ``dtype``."""
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.spec.rope.inv_freq())
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)

    #: Rotary positions have no table: generation is limited by memory only.
    max_positions: int | None = None

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
        x = jnp.take(self.embed.embedding[...], input_ids, axis=0)
        cos, sin = self._rope(positions, x.dtype)
        cache = cache.admit(mask)
        length = input_ids.shape[1]
        masks = {w: cache.mask(length, w) for w in set(self.spec.windows)}
        for i, (layer, window) in enumerate(zip(self.layers, self.spec.windows, strict=True)):
            x, cache = layer.step(x, cos, sin, masks[window], cache, i)
        return self._logits(self.norm(x)), cache.advance(length)


# ------------------------------------------------------------------------------------------- family

class DecoderParity(ParityHarness):
    """Decoder parity against the model type's transformers class (``LlamaForCausalLM``, ...): seeded
    token ids with a right-padded last row; logits at the unpadded positions (float32); then 8 greedy tokens
    from the same prompts left-padded."""

    generation_tokens = 8

    distributions = ("logits",)

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return REFERENCE[resolve(config).model_type]

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        return token_inputs(resolve(config).vocab_size, seed)

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        assert isinstance(model, Decoder)
        ids, mask = (jnp.asarray(i.value) for i in inputs)
        logits = nnx.jit(lambda m, ids, mask: m(ids, mask))(model, ids, mask)
        return {"logits": valid_positions(np.asarray(logits.astype(jnp.float32)), inputs[1].value)}

    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import torch

        ids, mask = (torch.from_numpy(i.value.astype(np.int64)) for i in inputs)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return {"logits": valid_positions(logits.float().numpy(), inputs[1].value)}

    def tolerance(self, dtype: str) -> Tolerance:
        # Measured on CPU against the float32 reference, random replicas, logits at 27 valid positions:
        # float32 max |Δ| <= 3.6e-7 (|logits| up to 1.3; tiny configs of all four model types). Weights
        # in bf16 (the model then computes in bf16, norms and softmax in float32): max |Δ| 0.3-0.6% of
        # max |logit| with 2 layers, growing with depth: 0.9% (8 layers), 1.2% (16), 1.7% (28 layers,
        # hidden 128), 1.0% with hidden 512 and 8 layers; KL <= 1e-5.
        if dtype in ("bfloat16", "float16"):
            return Tolerance(atol=5e-2, rtol=5e-2, atol_relative=True)
        return Tolerance(atol=1e-4, rtol=1e-3)


class DecoderFamily(Family):
    """The ``decoder`` family: config.json of a llama / qwen2 / qwen3 / mistral model -> :class:`DecoderSpec`
    -> :class:`Decoder`.

    Mapping: ``mappings/decoder.yaml``; parity: :class:`DecoderParity`;
    tests: tests/e2e/test_family_decoder.py.
    """

    name = "decoder"
    description = ("Decoder-only LMs: Llama 2/3.x, Qwen2/2.5, Qwen3, Mistral "
                   "(transformers LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM)")
    mappings = ("decoder",)
    layer_keys: ClassVar[Mapping[str, str]] = {
        "num_hidden_layers": r"^model\.layers\.(\d{1,9})\.",
    }
    parity = DecoderParity()

    def resolve(self, config: Mapping[str, Any]) -> DecoderSpec:
        """See :func:`resolve`."""
        return resolve(config)

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> Decoder:
        return Decoder(resolve(config), rngs=rngs)


FAMILY = DecoderFamily()
