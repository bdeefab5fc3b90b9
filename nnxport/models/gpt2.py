"""GPT-2 (transformers ``GPT2LMHeadModel`` / ``GPT2Model``): pre-LN decoder, learned positions, tied head.

Target paths (what ``mappings/gpt2.yaml`` fills)::

    wte.embedding [vocab, n_embd], wpe.embedding [n_positions, n_embd]
    layers.N.ln_1.{scale,bias}, layers.N.ln_2.{scale,bias}
    layers.N.attn.{q,k,v,o}.{kernel,bias}          (q, k, v split from the fused c_attn; o is c_proj)
    layers.N.mlp.{c_fc,c_proj}.{kernel,bias}
    ln_f.{scale,bias}
    lm_head.kernel [n_embd, vocab]                  (only with tie_word_embeddings: false)

With tied embeddings (the default) the model has no head leaf: logits are ``wte.attend(h)``.
transformers' Conv1D stores its weight as [in, out], which is already the nnx.Linear kernel layout.
"""

from __future__ import annotations

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
    check_length,
    check_token_ids,
    dropout,
    sharded,
    torch_layer_norm,
)

#: Architectures whose checkpoints hold exactly the weights this family maps (a base GPT2Model checkpoint
#: gets the tied LM head on top). Heads such as GPT2ForSequenceClassification are not implemented.
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")

#: GPT2Config defaults (transformers 5.23) for the fields that shape the forward pass.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    "add_cross_attention": False, "tie_word_embeddings": True,
}


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class GPT2Spec:
    """Everything the NNX model needs, resolved from config.json (see :func:`resolve`).

    Attributes:
        vocab_size: token embedding rows (and logits).
        n_positions: learned position embedding rows (the longest input).
        n_embd: hidden size.
        n_layer: number of blocks.
        n_head: attention heads (dividing ``n_embd``).
        n_inner: MLP hidden size (config.json's ``n_inner``, or ``4 * n_embd`` when null).
        activation_function: transformers' activation name (a key of ``ACTIVATIONS``).
        layer_norm_epsilon: LayerNorm epsilon.
        attention_scales: per layer, the softmax scale (:func:`attention_scales`).
        tie_word_embeddings: logits use ``wte`` (no ``lm_head`` leaf).
        embd_pdrop: dropout after the token + position embeddings (train mode only).
        attn_pdrop: dropout on the attention probabilities (train mode only).
        resid_pdrop: dropout after each attention projection and MLP (train mode only).
    """

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str
    layer_norm_epsilon: float
    attention_scales: tuple[float, ...]
    tie_word_embeddings: bool
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0


def _get(config: Mapping[str, Any], field: str) -> Any:
    value = config.get(field)
    return DEFAULTS[field] if value is None and field != "n_inner" else value


def _positive_int(config: Mapping[str, Any], field: str) -> int:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: field '{field}' must be a positive integer, got {value!r}")
    return value


def _flag(config: Mapping[str, Any], field: str) -> bool:
    value = _get(config, field)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: field '{field}' must be true or false, got {value!r}")
    return value


def attention_scales(config: Mapping[str, Any]) -> list[float]:
    """Per-layer softmax scale, transformers' rule: ``head_dim ** -0.5`` if ``scale_attn_weights`` (else
    1), divided by ``layer_idx + 1`` if ``scale_attn_by_inverse_layer_idx``."""
    head_dim = _positive_int(config, "n_embd") // _positive_int(config, "n_head")
    base = head_dim ** -0.5 if _flag(config, "scale_attn_weights") else 1.0
    by_layer = _flag(config, "scale_attn_by_inverse_layer_idx")
    return [base / float(i + 1) if by_layer else base for i in range(_positive_int(config, "n_layer"))]


def resolve(config: Mapping[str, Any]) -> GPT2Spec:
    """The :class:`GPT2Spec` of ``config``; ConfigError naming the field for anything not implemented."""
    archs = config.get("architectures") or []
    unsupported = [a for a in archs if a not in ARCHITECTURES]
    if unsupported:
        raise ConfigError(f"config.json: field 'architectures' names {unsupported[0]!r}, which the gpt2 "
                          f"family does not implement (supported: {', '.join(ARCHITECTURES)})")
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        _positive_int(config, field)
    n_embd = _positive_int(config, "n_embd")
    if n_embd % _positive_int(config, "n_head"):
        raise ConfigError(f"config.json: field 'n_embd' ({config.get('n_embd')}) must be a multiple of "
                          f"'n_head' ({config.get('n_head')})")
    inner = config.get("n_inner")
    if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner <= 0):
        raise ConfigError(f"config.json: field 'n_inner' must be null or a positive integer, "
                          f"got {inner!r}")
    act = _get(config, "activation_function")
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json: field 'activation_function' is {act!r}, which the gpt2 family "
                          f"does not implement (supported: {', '.join(sorted(ACTIVATIONS))})")
    eps = _get(config, "layer_norm_epsilon")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ConfigError(f"config.json: field 'layer_norm_epsilon' must be a positive number, "
                          f"got {eps!r}")
    # Implemented: the softmax scale rules, and both head layouts. reorder_and_upcast_attn only changes
    # the precision of the scores in eager mixed precision; nnxport's attention is always float32.
    for field in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                  "tie_word_embeddings"):
        _flag(config, field)
    if _flag(config, "add_cross_attention"):
        raise ConfigError("config.json: field 'add_cross_attention' is true: GPT-2 with cross-attention "
                          "(an encoder-decoder component) is not implemented by the gpt2 family")
    return GPT2Spec(
        vocab_size=_positive_int(config, "vocab_size"),
        n_positions=_positive_int(config, "n_positions"),
        n_embd=n_embd,
        n_layer=_positive_int(config, "n_layer"),
        n_head=_positive_int(config, "n_head"),
        n_inner=4 * n_embd if inner is None else int(inner),
        activation_function=str(act),
        layer_norm_epsilon=float(eps),
        attention_scales=tuple(attention_scales(config)),
        tie_word_embeddings=_flag(config, "tie_word_embeddings"),
        # GPT2Config's defaults: 0.1 each.
        embd_pdrop=rate_field(config, "embd_pdrop", 0.1),
        attn_pdrop=rate_field(config, "attn_pdrop", 0.1),
        resid_pdrop=rate_field(config, "resid_pdrop", 0.1),
    )


# -------------------------------------------------------------------------------------------- model

class Attention(nnx.Module):
    """Causal multi-head self-attention; q, k, v are the three parts of GPT-2's fused ``c_attn``.

    Args:
        spec: the model's spec (``n_embd``, ``n_head``).
        scale: this layer's softmax scale.
        rngs: random streams.
    """

    def __init__(self, spec: GPT2Spec, scale: float, *, rngs: nnx.Rngs):
        dim = spec.n_embd
        self.q = nnx.Linear(dim, dim, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.k = nnx.Linear(dim, dim, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.v = nnx.Linear(dim, dim, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.o = nnx.Linear(dim, dim, kernel_metadata=sharded(ROW), rngs=rngs)
        self.heads = spec.n_head
        self.scale = scale
        self.attn_dropout = dropout(spec.attn_pdrop, rngs)
        self.resid_dropout = dropout(spec.resid_pdrop, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Attend and project back.

        Args:
            x: hidden states [B, T, n_embd].
            mask: boolean [B|1, 1, T, T], True where query i may attend to key j.
        """
        q, k, v = self._qkv(x)
        out = attention(q, k, v, mask, scale=self.scale, dropout=self.attn_dropout)
        return self.resid_dropout(self.o(out.reshape(x.shape)))

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, dim = x.shape
        shape = (b, t, self.heads, dim // self.heads)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
        return q, k, v

    def step(self, x: jax.Array, mask: jax.Array, cache: KVCache, layer: int) -> tuple[jax.Array, KVCache]:
        """:meth:`__call__` for new tokens x [B, T, n_embd] against the cache (``mask`` from
        ``cache.mask``); writes this layer's keys and values."""
        q, k, v = self._qkv(x)
        out, cache = cache.attend(layer, q, k, v, mask, scale=self.scale)
        return self.o(out.reshape(x.shape)), cache


class MLP(nnx.Module):
    """``drop(c_proj(act(c_fc(x))))``.

    Args:
        spec: the model's spec (``n_embd``, ``n_inner``, ``activation_function``).
        rngs: random streams.
    """

    def __init__(self, spec: GPT2Spec, *, rngs: nnx.Rngs):
        self.c_fc = nnx.Linear(spec.n_embd, spec.n_inner, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.c_proj = nnx.Linear(spec.n_inner, spec.n_embd, kernel_metadata=sharded(ROW), rngs=rngs)
        self.act = spec.activation_function
        self.dropout = dropout(spec.resid_pdrop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the MLP.

        Args:
            x: hidden states [..., n_embd].
        """
        return self.dropout(self.c_proj(ACTIVATIONS[self.act](self.c_fc(x))))


class Block(nnx.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Args:
        spec: the model's spec.
        scale: this layer's softmax scale (``spec.attention_scales[layer]``).
        rngs: random streams.
    """

    def __init__(self, spec: GPT2Spec, scale: float, *, rngs: nnx.Rngs):
        self.ln_1 = torch_layer_norm(spec.n_embd, spec.layer_norm_epsilon, rngs)
        self.attn = Attention(spec, scale, rngs=rngs)
        self.ln_2 = torch_layer_norm(spec.n_embd, spec.layer_norm_epsilon, rngs)
        self.mlp = MLP(spec, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Apply the block.

        Args:
            x: hidden states [B, T, n_embd].
            mask: boolean attention mask [B|1, 1, T, T].
        """
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

    def step(self, x: jax.Array, mask: jax.Array, cache: KVCache, layer: int) -> tuple[jax.Array, KVCache]:
        """The block on new tokens against the KV cache (see :meth:`Attention.step`)."""
        h, cache = self.attn.step(self.ln_1(x), mask, cache, layer)
        x = x + h
        return x + self.mlp(self.ln_2(x)), cache


class GPT2(nnx.Module):
    """GPT-2 language model (transformers' ``GPT2LMHeadModel``).

    Args:
        spec: the resolved config (:func:`resolve`).
        rngs: random streams for the initialisers.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from nnxport.models.gpt2 import GPT2, resolve
        >>> spec = resolve({"n_embd": 32, "n_head": 4, "n_layer": 2, "vocab_size": 100, "n_positions": 16})
        >>> model = GPT2(spec, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 8), jnp.int32)).shape
        (2, 8, 100)
    """

    def __init__(self, spec: GPT2Spec, *, rngs: nnx.Rngs):
        self.wte = nnx.Embed(spec.vocab_size, spec.n_embd, embedding_metadata=sharded(EMBEDDING), rngs=rngs)
        self.wpe = nnx.Embed(spec.n_positions, spec.n_embd, rngs=rngs)
        self.drop = dropout(spec.embd_pdrop, rngs)
        self.layers = nnx.List([Block(spec, scale, rngs=rngs) for scale in spec.attention_scales])
        self.ln_f = torch_layer_norm(spec.n_embd, spec.layer_norm_epsilon, rngs)
        self.lm_head = None if spec.tie_word_embeddings else nnx.Linear(
            spec.n_embd, spec.vocab_size, use_bias=False, kernel_metadata=sharded(COLUMN), rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Final hidden states (after ``ln_f``).

        Args:
            input_ids: token ids [B, T] (T <= n_positions).
            mask: padding mask [B, T] (1 = token), or None.

        Returns:
            [B, T, n_embd].

        Raises:
            ValueError: T exceeds ``n_positions`` (when traced), or an id is outside the vocabulary
                (eager calls: concrete ids).
        """
        length = input_ids.shape[1]
        check_length(length, self.wpe.num_embeddings, "n_positions")
        check_token_ids(input_ids, self.wte.num_embeddings)
        x = self.drop(self.wte(input_ids) + self.wpe(jnp.arange(length))[None])
        allowed = attention_mask(mask, length, causal=True)
        for block in self.layers:
            x = block(x, allowed)
        return self.ln_f(x)

    def __call__(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, vocab_size].

        Args:
            input_ids: token ids [B, T] (T <= n_positions).
            mask: padding mask [B, T] (1 = token), or None.
        """
        h = self.hidden_states(input_ids, mask)
        return self._logits(h)

    def _logits(self, h: jax.Array) -> jax.Array:
        return self.wte.attend(h) if self.lm_head is None else self.lm_head(h)

    @property
    def max_positions(self) -> int:
        """The longest sequence (prompt + generated tokens): the rows of the position table."""
        return int(self.wpe.num_embeddings)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache of ``max_len`` slots for ``batch`` rows (for :meth:`decode`)."""
        attn = self.layers[0].attn
        dim = attn.k.kernel.shape[1]
        return KVCache.empty(batch, max_len, len(self.layers), attn.heads, dim // attn.heads,
                             attn.k.kernel.dtype)

    def decode(self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache
               ) -> tuple[jax.Array, KVCache]:
        """Incremental decoding: logits [B, T, vocab_size] of T new tokens written at the cache's next
        slots (the prompt at once, then one token per step), and the updated cache.

        Args:
            input_ids: new token ids [B, T].
            positions: their position ids [B, T] (:func:`nnxport.models.layers.generation_positions`).
            mask: [B, T], 1 for tokens, 0 for padding (never attended to).
            cache: from :meth:`init_cache` or the previous call.
        """
        x = self.wte(input_ids) + self.wpe(positions)
        cache = cache.admit(mask)
        allowed = cache.mask(input_ids.shape[1])
        for i, block in enumerate(self.layers):
            x, cache = block.step(x, allowed, cache, i)
        return self._logits(self.ln_f(x)), cache.advance(input_ids.shape[1])


# ------------------------------------------------------------------------------------------- family

class GPT2Parity(ParityHarness):
    """GPT-2 parity against ``GPT2LMHeadModel``: seeded token ids with a right-padded last row; logits
    at the unpadded positions; then 8 greedy tokens from the same prompts left-padded."""

    generation_tokens = 8

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return "GPT2LMHeadModel"

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        spec = resolve(config)
        length = min(16, spec.n_positions)
        return token_inputs(spec.vocab_size, seed, length=length, padding=min(5, length - 1))

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        assert isinstance(model, GPT2)
        ids, mask = (jnp.asarray(i.value) for i in inputs)
        logits = nnx.jit(lambda m, ids, mask: m(ids, mask))(model, ids, mask)
        return {"logits": valid_positions(np.asarray(logits.astype(jnp.float32)), inputs[1].value)}

    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import torch

        ids, mask = (torch.from_numpy(i.value.astype(np.int64)) for i in inputs)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return {"logits": valid_positions(logits.float().numpy(), inputs[1].value)}

    def tolerance(self, dtype: str) -> Tolerance:
        # Measured on CPU against GPT2LMHeadModel (float32), random replicas with 2-4 layers, n_embd 64-128,
        # initializer_range 0.02-0.2 (max |logit| 0.5-10): float32 max |Δ| up to 2.2e-6 of max |logit|.
        # Weights cast to bfloat16 (the reference keeps the float32 source): up to 1.8% of max |logit|
        # (2.8% if the activations were bfloat16 too); float16: up to 0.16%. Logit scales differ by orders
        # of magnitude between checkpoints, so atol is relative to max |logit| for every dtype.
        if dtype == "bfloat16":
            return Tolerance(atol=4e-2, rtol=4e-2, atol_relative=True)
        if dtype == "float16":
            return Tolerance(atol=1e-2, rtol=1e-2, atol_relative=True)
        return Tolerance(atol=2e-5, rtol=1e-3, atol_relative=True)


class GPT2Family(Family):
    """The ``gpt2`` family: config.json of ``model_type: gpt2`` -> :class:`GPT2Spec` -> :class:`GPT2`.

    Mapping: ``mappings/gpt2.yaml``; parity: :class:`GPT2Parity`; tests: tests/e2e/test_family_gpt2.py.
    """

    name = "gpt2"
    description = "GPT-2 small/medium/large/xl (transformers GPT2LMHeadModel / GPT2Model, tied LM head)"
    mappings = ("gpt2",)
    layer_keys: ClassVar[Mapping[str, str]] = {
        "n_layer": r"^(?:transformer\.)?h\.(\d{1,9})\.",
    }
    parity = GPT2Parity()

    def resolve(self, config: Mapping[str, Any]) -> GPT2Spec:
        """See :func:`resolve`."""
        return resolve(config)

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> GPT2:
        return GPT2(resolve(config), rngs=rngs)


FAMILY = GPT2Family()
