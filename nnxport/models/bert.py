"""BERT (transformers ``BertModel`` / ``BertForMaskedLM``): post-LN encoder with absolute position and
token-type embeddings; the MLM head's decoder is tied to the word embeddings.

Target paths (what ``mappings/bert.yaml`` fills)::

    embeddings.word.embedding [vocab, hidden], embeddings.position.embedding, embeddings.token_type.embedding
    embeddings.norm.{scale,bias}
    layers.N.attn.{q,k,v,o}.{kernel,bias}, layers.N.attn_norm.{scale,bias}
    layers.N.mlp.up.{kernel,bias}, layers.N.mlp.down.{kernel,bias}, layers.N.mlp_norm.{scale,bias}
    pooler.dense.{kernel,bias}                           (BertModel saved with its pooler)
    mlm.transform.{kernel,bias}, mlm.norm.{scale,bias}   (BertForMaskedLM)
    mlm.bias [vocab]                                     (tied decoder: logits = word.attend(h) + bias)
    mlm.decoder.{kernel,bias}                            (only with tie_word_embeddings: false)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import Family, ParityInput, Tolerance, token_inputs, valid_positions
from nnxport.models.layers import ACTIVATIONS, attention, attention_mask

MLM = "BertForMaskedLM"
BASE = "BertModel"


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch computes the variance in two passes; flax's fast variance (E[x²] - E[x]²) loses digits.
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, vocab: int, positions: int, types: int, hidden: int, eps: float, *, rngs: nnx.Rngs):
        self.word = nnx.Embed(vocab, hidden, rngs=rngs)
        self.position = nnx.Embed(positions, hidden, rngs=rngs)
        self.token_type = nnx.Embed(types, hidden, rngs=rngs)
        self.norm = _layer_norm(hidden, eps, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)
        return self.norm(x)


class Attention(nnx.Module):
    """Bidirectional multi-head self-attention (separate q, k, v projections)."""

    def __init__(self, hidden: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.head_dim = hidden // heads
        self.q = nnx.Linear(hidden, hidden, rngs=rngs)
        self.k = nnx.Linear(hidden, hidden, rngs=rngs)
        self.v = nnx.Linear(hidden, hidden, rngs=rngs)
        self.o = nnx.Linear(hidden, hidden, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, hidden = x.shape
        shape = (b, t, self.heads, self.head_dim)
        out = attention(self.q(x).reshape(shape), self.k(x).reshape(shape), self.v(x).reshape(shape), mask)
        return self.o(out.reshape(b, t, hidden))


class Mlp(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(hidden, intermediate, rngs=rngs)
        self.down = nnx.Linear(intermediate, hidden, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(ACTIVATIONS[self.act](self.up(x)))


class Layer(nnx.Module):
    """Post-LN block: x = ln(x + attn(x)); x = ln(x + mlp(x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float, *, rngs: nnx.Rngs):
        self.attn = Attention(hidden, heads, rngs=rngs)
        self.attn_norm = _layer_norm(hidden, eps, rngs)
        self.mlp = Mlp(hidden, intermediate, act, rngs=rngs)
        self.mlp_norm = _layer_norm(hidden, eps, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.attn_norm(x + self.attn(x, mask))
        return self.mlp_norm(x + self.mlp(x))


class Pooler(nnx.Module):
    """dense + tanh on the first ([CLS]) token."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(hidden, hidden, rngs=rngs)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden_states[:, 0]))


class MlmHead(nnx.Module):
    """transform (dense + act + LayerNorm), then the decoder: the word embeddings' transpose plus ``bias``
    when tied, else its own ``decoder`` Linear."""

    def __init__(self, hidden: int, vocab: int, act: str, eps: float, tied: bool, *, rngs: nnx.Rngs):
        self.transform = nnx.Linear(hidden, hidden, rngs=rngs)
        self.norm = _layer_norm(hidden, eps, rngs)
        self.act = act
        self.bias = nnx.Param(jnp.zeros((vocab,), jnp.float32)) if tied else None
        self.decoder = None if tied else nnx.Linear(hidden, vocab, rngs=rngs)

    def __call__(self, h: jax.Array, word: nnx.Embed) -> jax.Array:
        h = self.norm(ACTIVATIONS[self.act](self.transform(h)))
        if self.decoder is not None:
            return self.decoder(h)
        assert self.bias is not None
        return word.attend(h) + self.bias[...]


class Bert(nnx.Module):
    """BERT encoder; ``__call__`` returns the final hidden states [batch, length, hidden]; :meth:`pool` the
    pooler output and :meth:`mlm_logits` the masked-LM logits (when the model has them)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        intermediate_size: int,
        hidden_act: str,
        max_position_embeddings: int,
        type_vocab_size: int,
        layer_norm_eps: float,
        pooler: bool,
        mlm: bool,
        tie_word_embeddings: bool,
        rngs: nnx.Rngs,
    ):
        self.embeddings = Embeddings(vocab_size, max_position_embeddings, type_vocab_size, hidden_size,
                                     layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([
            Layer(hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps, rngs=rngs)
            for _ in range(num_hidden_layers)
        ])
        self.pooler = Pooler(hidden_size, rngs=rngs) if pooler else None
        head = None
        if mlm:
            head = MlmHead(hidden_size, vocab_size, hidden_act, layer_norm_eps, tie_word_embeddings,
                           rngs=rngs)
        self.mlm = head

    def __call__(self, input_ids: jax.Array, attention_mask_: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask(attention_mask_, input_ids.shape[1], causal=False)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden_states: jax.Array) -> jax.Array:
        assert self.pooler is not None
        return self.pooler(hidden_states)

    def mlm_logits(self, hidden_states: jax.Array) -> jax.Array:
        assert self.mlm is not None
        return self.mlm(hidden_states, self.embeddings.word)


def _int(config: Mapping[str, Any], field: str, default: int, *, minimum: int = 1) -> int:
    value = config.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config.json: field '{field}' must be an integer >= {minimum}, got {value!r}")
    return value


def _is_mlm(config: Mapping[str, Any]) -> bool:
    return MLM in (config.get("architectures") or [])


class BertFamily(Family):
    name = "bert"
    description = "BERT encoders (transformers BertModel / BertForMaskedLM)"
    mappings = ("bert",)
    published: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "google-bert/bert-base-uncased": {
            "architectures": [MLM], "model_type": "bert", "attention_probs_dropout_prob": 0.1,
            "gradient_checkpointing": False, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
            "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12,
            "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2, "use_cache": True,
            "vocab_size": 30522,
        },
    }
    distributions = ("logits",)
    #: Parity inputs: [batch, length] token ids; the last row is right-padded.
    length = 16

    layer_keys: ClassVar[Mapping[str, str]] = {
        "num_hidden_layers": r"^(?:bert\.)?encoder\.layer\.(\d{1,9})\.",
    }

    def check_config(self, config: Mapping[str, Any]) -> None:
        archs = config.get("architectures") or []
        if archs and not {MLM, BASE} & set(archs):
            raise ConfigError(f"config.json: field 'architectures' {archs!r} is not supported by nnxport's "
                              f"bert family (supported: {BASE}, {MLM})")
        hidden = _int(config, "hidden_size", 768)
        heads = _int(config, "num_attention_heads", 12)
        if hidden % heads:
            raise ConfigError(f"config.json: field 'num_attention_heads' ({heads}) must divide 'hidden_size' "
                              f"({hidden})")
        for field, default in (("vocab_size", 30522), ("num_hidden_layers", 12), ("intermediate_size", 3072),
                               ("max_position_embeddings", 512), ("type_vocab_size", 2)):
            _int(config, field, default)
        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"config.json: field 'hidden_act' {act!r} is not supported "
                              f"(supported: {', '.join(sorted(ACTIVATIONS))})")
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(f"config.json: field 'position_embedding_type' {kind!r} is not supported "
                              "(nnxport's bert family has 'absolute' position embeddings only)")
        for field in ("is_decoder", "add_cross_attention"):
            if config.get(field, False) is not False:
                raise ConfigError(f"config.json: field '{field}' {config[field]!r} is not supported "
                                  "(nnxport's bert family is a bidirectional encoder, without "
                                  "cross-attention)")
        tie = config.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            raise ConfigError(f"config.json: field 'tie_word_embeddings' must be true or false, got {tie!r}")
        eps = config.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise ConfigError(f"config.json: field 'layer_norm_eps' must be a positive number, got {eps!r}")

    def options(self, config: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
        """``pooler``: whether a BertModel checkpoint carries its pooler (BertForMaskedLM has none)."""
        if _is_mlm(config):
            return {"pooler": False}
        return {"pooler": any(k == "pooler.dense.weight" or k.endswith(".pooler.dense.weight") for k in keys)}

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> nnx.Module:
        self.check_config(config)
        mlm = _is_mlm(config)
        return Bert(
            vocab_size=int(config.get("vocab_size", 30522)),
            hidden_size=int(config.get("hidden_size", 768)),
            num_hidden_layers=int(config.get("num_hidden_layers", 12)),
            num_attention_heads=int(config.get("num_attention_heads", 12)),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            hidden_act=str(config.get("hidden_act", "gelu")),
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            pooler=not mlm and bool(options.get("pooler", True)),
            mlm=mlm,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            rngs=rngs,
        )

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return MLM if _is_mlm(config) else BASE

    def reference_kwargs(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        if _is_mlm(config):
            return {}
        return {"add_pooling_layer": bool(options.get("pooler", True))}

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        length = min(self.length, int(config.get("max_position_embeddings", 512)))
        ids, mask = token_inputs(int(config.get("vocab_size", 30522)), seed, length=length,
                                 padding=min(5, length - 1))
        # A sentence pair: segment 0, then segment 1 (when the model has two token types).
        types = np.zeros_like(ids.value)
        if int(config.get("type_vocab_size", 2)) > 1:
            types[:, length // 2:] = 1
        return [ids, mask, ParityInput("token_type_ids", types, seed)]

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        assert isinstance(model, Bert)
        ids, mask, types = (jnp.asarray(i.value) for i in inputs)

        def forward(m: Bert, ids: jax.Array, mask: jax.Array, types: jax.Array) -> dict[str, jax.Array]:
            hidden = m(ids, mask, types)
            if m.mlm is not None:
                return {"logits": m.mlm_logits(hidden)}
            out = {"last_hidden_state": hidden}
            if m.pooler is not None:
                out["pooler_output"] = m.pool(hidden)
            return out

        got = nnx.jit(forward)(model, ids, mask, types)
        return self._select({k: np.asarray(v) for k, v in got.items()}, inputs[1].value)

    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import torch

        ids, mask, types = (torch.from_numpy(i.value.astype(np.int64)) for i in inputs)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if hasattr(out, "logits"):
            got = {"logits": out.logits.float().numpy()}
        else:
            got = {"last_hidden_state": out.last_hidden_state.float().numpy()}
            if out.pooler_output is not None:
                got["pooler_output"] = out.pooler_output.float().numpy()
        return self._select(got, inputs[1].value)

    @staticmethod
    def _select(out: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token outputs at valid (unpadded) positions only; per-sequence outputs as they are."""
        return {k: v if k == "pooler_output" else valid_positions(v, mask) for k, v in out.items()}

    def tolerance(self, dtype: str) -> Tolerance:
        # Measured on CPU with random replicas (2 and 12 layers, hidden 64-128, initializer_range 0.02 and
        # 0.1): fp32 max |Δ| <= 7.8e-6 (relative 2.1e-6); weights cast to bf16 vs the fp32 reference
        # max |Δ| up to 2.3% of max |logit| (12 layers, init 0.1; 1.0% at the published init 0.02: the
        # post-LN encoder accumulates the rounding), fp16 <= 0.23%. Checkpoints stored in bf16 compare at
        # fp32 level (the model computes in fp32 from the same rounded weights).
        if dtype == "bfloat16":
            return Tolerance(atol=5e-2, rtol=5e-2, atol_relative=True)
        if dtype == "float16":
            return Tolerance(atol=1e-2, rtol=1e-2, atol_relative=True)
        return Tolerance(atol=1e-4, rtol=1e-3)


FAMILY = BertFamily()
