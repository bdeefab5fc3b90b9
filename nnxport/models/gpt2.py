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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import Family, ParityInput, Tolerance, token_inputs, valid_positions
from nnxport.models.layers import ACTIVATIONS, attention, attention_mask

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


class Attention(nnx.Module):
    """Causal multi-head self-attention; q, k, v are the three parts of GPT-2's fused ``c_attn``."""

    def __init__(self, dim: int, heads: int, scale: float, *, rngs: nnx.Rngs):
        self.q = nnx.Linear(dim, dim, rngs=rngs)
        self.k = nnx.Linear(dim, dim, rngs=rngs)
        self.v = nnx.Linear(dim, dim, rngs=rngs)
        self.o = nnx.Linear(dim, dim, rngs=rngs)
        self.heads = heads
        self.scale = scale

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, dim = x.shape
        shape = (b, t, self.heads, dim // self.heads)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, mask, scale=self.scale)
        return self.o(out.reshape(b, t, dim))


class MLP(nnx.Module):
    def __init__(self, dim: int, inner: int, act: str, *, rngs: nnx.Rngs):
        self.c_fc = nnx.Linear(dim, inner, rngs=rngs)
        self.c_proj = nnx.Linear(inner, dim, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch's LayerNorm computes the variance as E[(x - mean)^2], not E[x^2] - mean^2.
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Block(nnx.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, dim: int, heads: int, inner: int, act: str, eps: float, scale: float, *,
                 rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(dim, eps, rngs)
        self.attn = Attention(dim, heads, scale, rngs=rngs)
        self.ln_2 = _layer_norm(dim, eps, rngs)
        self.mlp = MLP(dim, inner, act, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nnx.Module):
    """GPT-2 language model: token ids [batch, length] (+ padding mask) -> logits [batch, length, vocab]."""

    def __init__(
        self,
        *,
        vocab_size: int,
        n_positions: int,
        n_embd: int,
        n_layer: int,
        n_head: int,
        n_inner: int,
        activation_function: str,
        layer_norm_epsilon: float,
        scales: list[float],
        tie_word_embeddings: bool,
        rngs: nnx.Rngs,
    ):
        self.wte = nnx.Embed(vocab_size, n_embd, rngs=rngs)
        self.wpe = nnx.Embed(n_positions, n_embd, rngs=rngs)
        self.layers = nnx.List([
            Block(n_embd, n_head, n_inner, activation_function, layer_norm_epsilon, scales[i], rngs=rngs)
            for i in range(n_layer)
        ])
        self.ln_f = _layer_norm(n_embd, layer_norm_epsilon, rngs)
        self.lm_head = None if tie_word_embeddings else nnx.Linear(n_embd, vocab_size, use_bias=False,
                                                                   rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Final hidden states (after ``ln_f``), [batch, length, n_embd]."""
        length = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(jnp.arange(length))[None]
        allowed = attention_mask(mask, length, causal=True)
        for block in self.layers:
            x = block(x, allowed)
        return self.ln_f(x)

    def __call__(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = self.hidden_states(input_ids, mask)
        return self.wte.attend(h) if self.lm_head is None else self.lm_head(h)


def attention_scales(config: Mapping[str, Any]) -> list[float]:
    """Per-layer softmax scale, transformers' rule: ``head_dim ** -0.5`` if ``scale_attn_weights`` (else
    1), divided by ``layer_idx + 1`` if ``scale_attn_by_inverse_layer_idx``."""
    head_dim = _positive_int(config, "n_embd") // _positive_int(config, "n_head")
    base = head_dim ** -0.5 if _flag(config, "scale_attn_weights") else 1.0
    by_layer = _flag(config, "scale_attn_by_inverse_layer_idx")
    return [base / float(i + 1) if by_layer else base for i in range(_positive_int(config, "n_layer"))]


class GPT2Family(Family):
    name = "gpt2"
    description = "GPT-2 small/medium/large/xl (transformers GPT2LMHeadModel / GPT2Model, tied LM head)"
    mappings = ("gpt2",)
    published: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "openai-community/gpt2": {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
            "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "n_ctx": 1024, "n_embd": 768,
            "n_head": 12, "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
            "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
            "summary_use_proj": True, "vocab_size": 50257,
        },
    }

    layer_keys: ClassVar[Mapping[str, str]] = {
        "n_layer": r"^(?:transformer\.)?h\.(\d{1,9})\.",
    }

    def check_config(self, config: Mapping[str, Any]) -> None:
        archs = config.get("architectures") or []
        unsupported = [a for a in archs if a not in ARCHITECTURES]
        if unsupported:
            raise ConfigError(f"config.json: field 'architectures' names {unsupported[0]!r}, which the gpt2 "
                              f"family does not implement (supported: {', '.join(ARCHITECTURES)})")
        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            _positive_int(config, field)
        if _positive_int(config, "n_embd") % _positive_int(config, "n_head"):
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

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> nnx.Module:
        self.check_config(config)
        n_embd = _positive_int(config, "n_embd")
        inner = config.get("n_inner")
        return GPT2(
            vocab_size=_positive_int(config, "vocab_size"),
            n_positions=_positive_int(config, "n_positions"),
            n_embd=n_embd,
            n_layer=_positive_int(config, "n_layer"),
            n_head=_positive_int(config, "n_head"),
            n_inner=4 * n_embd if inner is None else int(inner),
            activation_function=str(_get(config, "activation_function")),
            layer_norm_epsilon=float(_get(config, "layer_norm_epsilon")),
            scales=attention_scales(config),
            tie_word_embeddings=_flag(config, "tie_word_embeddings"),
            rngs=rngs,
        )

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return "GPT2LMHeadModel"

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        length = min(16, _positive_int(config, "n_positions"))
        return token_inputs(_positive_int(config, "vocab_size"), seed, length=length,
                            padding=min(5, length - 1))

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


FAMILY = GPT2Family()
