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
    int_field,
    padding_idx_field,
    positive_float_field,
    rate_field,
    token_inputs,
    valid_positions,
)
from nnxport.models.layers import (
    ACTIVATIONS,
    COLUMN,
    EMBEDDING,
    ROW,
    attention,
    attention_mask,
    check_length,
    check_token_ids,
    dropout,
    padding_no_grad,
    sharded,
    torch_layer_norm,
)

MLM = "BertForMaskedLM"
BASE = "BertModel"


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class BertSpec:
    """Everything the NNX model needs, resolved from config.json (see :func:`resolve`).

    Attributes:
        vocab_size: word embedding rows.
        hidden_size: hidden size.
        num_hidden_layers: number of encoder layers.
        num_attention_heads: attention heads (dividing ``hidden_size``).
        intermediate_size: MLP hidden size.
        hidden_act: transformers' activation name, of the MLP and the MLM head's transform.
        max_position_embeddings: absolute position embedding rows.
        type_vocab_size: token-type (segment) embedding rows.
        layer_norm_eps: LayerNorm epsilon.
        mlm: the model is ``BertForMaskedLM`` (has the MLM head, no pooler).
        tie_word_embeddings: the MLM decoder is the word embeddings' transpose (plus ``mlm.bias``).
        hidden_dropout_prob: dropout after the embeddings and after each attention output and MLP (train
            mode only).
        attention_probs_dropout_prob: dropout on the attention probabilities (train mode only).
        pad_token_id: the word embedding row that lookups pass no gradient to (torch's ``padding_idx``);
            None for none.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    mlm: bool
    tie_word_embeddings: bool
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    pad_token_id: int | None = None


def _is_mlm(config: Mapping[str, Any]) -> bool:
    return MLM in (config.get("architectures") or [])


def resolve(config: Mapping[str, Any]) -> BertSpec:
    """The :class:`BertSpec` of ``config``; ConfigError naming the field for anything not implemented."""
    archs = config.get("architectures") or []
    if archs and not {MLM, BASE} & set(archs):
        raise ConfigError(f"config.json: field 'architectures' {archs!r} is not supported by nnxport's "
                          f"bert family (supported: {BASE}, {MLM})")
    hidden = int_field(config, "hidden_size", 768)
    heads = int_field(config, "num_attention_heads", 12)
    if hidden % heads:
        raise ConfigError(f"config.json: field 'num_attention_heads' ({heads}) must divide 'hidden_size' "
                          f"({hidden})")
    vocab, layers = int_field(config, "vocab_size", 30522), int_field(config, "num_hidden_layers", 12)
    intermediate = int_field(config, "intermediate_size", 3072)
    positions = int_field(config, "max_position_embeddings", 512)
    types = int_field(config, "type_vocab_size", 2)
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
    eps = positive_float_field(config, "layer_norm_eps", 1e-12)
    return BertSpec(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=intermediate, hidden_act=str(act), max_position_embeddings=positions,
                    type_vocab_size=types, layer_norm_eps=eps, mlm=_is_mlm(config), tie_word_embeddings=tie,
                    hidden_dropout_prob=rate_field(config, "hidden_dropout_prob", 0.1),
                    attention_probs_dropout_prob=rate_field(config, "attention_probs_dropout_prob", 0.1),
                    pad_token_id=padding_idx_field(config, vocab, 0))


# -------------------------------------------------------------------------------------------- model

class Embeddings(nnx.Module):
    """Word + token-type + absolute position embeddings, then LayerNorm and dropout.

    Args:
        spec: the model's spec.
        rngs: random streams.
    """

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs):
        self.word = nnx.Embed(spec.vocab_size, spec.hidden_size, embedding_metadata=sharded(EMBEDDING),
                              rngs=rngs)
        self.position = nnx.Embed(spec.max_position_embeddings, spec.hidden_size, rngs=rngs)
        self.token_type = nnx.Embed(spec.type_vocab_size, spec.hidden_size, rngs=rngs)
        self.norm = torch_layer_norm(spec.hidden_size, spec.layer_norm_eps, rngs)
        self.dropout = dropout(spec.hidden_dropout_prob, rngs)
        self.pad_token_id = spec.pad_token_id

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """Embedded tokens [B, T, hidden_size].

        Args:
            input_ids: token ids [B, T] (T <= max_position_embeddings; ids < vocab_size, checked in
                eager calls).
            token_type_ids: segment ids [B, T].

        Raises:
            ValueError: T exceeds ``max_position_embeddings`` (when traced), or an id is outside the
                vocabulary (eager calls).
        """
        check_length(input_ids.shape[1], self.position.num_embeddings, "max_position_embeddings")
        check_token_ids(input_ids, self.word.num_embeddings)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        words = padding_no_grad(self.word(input_ids), input_ids, self.pad_token_id)
        x = words + self.token_type(token_type_ids) + self.position(positions)
        return self.dropout(self.norm(x))


class Attention(nnx.Module):
    """Bidirectional multi-head self-attention (separate q, k, v projections).

    Args:
        spec: the model's spec (``hidden_size``, ``num_attention_heads``).
        rngs: random streams.
    """

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs):
        hidden = spec.hidden_size
        self.heads = spec.num_attention_heads
        self.head_dim = hidden // self.heads
        self.q = nnx.Linear(hidden, hidden, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.k = nnx.Linear(hidden, hidden, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.v = nnx.Linear(hidden, hidden, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.o = nnx.Linear(hidden, hidden, kernel_metadata=sharded(ROW), rngs=rngs)
        self.dropout = dropout(spec.attention_probs_dropout_prob, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Attend and project back.

        Args:
            x: hidden states [B, T, hidden_size].
            mask: boolean [B|1, 1, T, T], True where query i may attend to key j.
        """
        b, t, hidden = x.shape
        shape = (b, t, self.heads, self.head_dim)
        out = attention(self.q(x).reshape(shape), self.k(x).reshape(shape), self.v(x).reshape(shape), mask,
                        dropout=self.dropout)
        return self.o(out.reshape(b, t, hidden))


class Mlp(nnx.Module):
    """``down(act(up(x)))``.

    Args:
        spec: the model's spec (``hidden_size``, ``intermediate_size``, ``hidden_act``).
        rngs: random streams.
    """

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(spec.hidden_size, spec.intermediate_size, kernel_metadata=sharded(COLUMN),
                             rngs=rngs)
        self.down = nnx.Linear(spec.intermediate_size, spec.hidden_size, kernel_metadata=sharded(ROW),
                               rngs=rngs)
        self.act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the MLP.

        Args:
            x: hidden states [..., hidden_size].
        """
        return self.down(ACTIVATIONS[self.act](self.up(x)))


class Layer(nnx.Module):
    """Post-LN block: x = ln(x + drop(attn(x))); x = ln(x + drop(mlp(x))).

    Args:
        spec: the model's spec.
        rngs: random streams.
    """

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs):
        self.attn = Attention(spec, rngs=rngs)
        self.attn_norm = torch_layer_norm(spec.hidden_size, spec.layer_norm_eps, rngs)
        self.mlp = Mlp(spec, rngs=rngs)
        self.mlp_norm = torch_layer_norm(spec.hidden_size, spec.layer_norm_eps, rngs)
        self.dropout = dropout(spec.hidden_dropout_prob, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Apply the block.

        Args:
            x: hidden states [B, T, hidden_size].
            mask: boolean attention mask [B|1, 1, T, T].
        """
        x = self.attn_norm(x + self.dropout(self.attn(x, mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Pooler(nnx.Module):
    """dense + tanh on the first ([CLS]) token.

    Args:
        spec: the model's spec (``hidden_size``).
        rngs: random streams.
    """

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(spec.hidden_size, spec.hidden_size, rngs=rngs)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        """The pooled output [B, hidden_size].

        Args:
            hidden_states: the encoder's output [B, T, hidden_size].
        """
        return jnp.tanh(self.dense(hidden_states[:, 0]))


class MlmHead(nnx.Module):
    """transform (dense + act + LayerNorm), then the decoder: the word embeddings' transpose plus ``bias``
    when tied, else its own ``decoder`` Linear.

    Args:
        spec: the model's spec (``tie_word_embeddings`` decides which decoder).
        rngs: random streams.
    """

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs):
        hidden, vocab, tied = spec.hidden_size, spec.vocab_size, spec.tie_word_embeddings
        self.transform = nnx.Linear(hidden, hidden, rngs=rngs)
        self.norm = torch_layer_norm(hidden, spec.layer_norm_eps, rngs)
        self.act = spec.hidden_act
        self.bias = nnx.Param(jnp.zeros((vocab,), jnp.float32)) if tied else None
        self.decoder = None if tied else nnx.Linear(hidden, vocab, kernel_metadata=sharded(COLUMN), rngs=rngs)

    def __call__(self, h: jax.Array, word: nnx.Embed) -> jax.Array:
        """Masked-LM logits [B, T, vocab_size].

        Args:
            h: the encoder's output [B, T, hidden_size].
            word: the word embeddings (the tied decoder).
        """
        h = self.norm(ACTIVATIONS[self.act](self.transform(h)))
        if self.decoder is not None:
            return self.decoder(h)
        assert self.bias is not None
        return word.attend(h) + self.bias[...]


class Bert(nnx.Module):
    """BERT encoder (transformers' ``BertModel`` / ``BertForMaskedLM``).

    ``__call__`` returns the final hidden states; :meth:`pool` the pooler output and :meth:`mlm_logits`
    the masked-LM logits (when the model has them).

    Args:
        spec: the resolved config (:func:`resolve`).
        pooler: whether a ``BertModel`` has its pooler (the family's ``pooler`` option); ignored for
            ``BertForMaskedLM``, which has none.
        rngs: random streams for the initialisers.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from nnxport.models.bert import Bert, resolve
        >>> spec = resolve({"architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_hidden_layers": 2,
        ...                 "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100})
        >>> model = Bert(spec, rngs=nnx.Rngs(0))
        >>> model.mlm_logits(model(jnp.zeros((2, 8), jnp.int32))).shape
        (2, 8, 100)
    """

    def __init__(self, spec: BertSpec, *, pooler: bool = True, rngs: nnx.Rngs):
        self.embeddings = Embeddings(spec, rngs=rngs)
        self.layers = nnx.List([Layer(spec, rngs=rngs) for _ in range(spec.num_hidden_layers)])
        self.pooler = Pooler(spec, rngs=rngs) if pooler and not spec.mlm else None
        self.mlm = MlmHead(spec, rngs=rngs) if spec.mlm else None

    def __call__(self, input_ids: jax.Array, attention_mask_: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        """The final hidden states [B, T, hidden_size].

        Args:
            input_ids: token ids [B, T].
            attention_mask_: padding mask [B, T] (1 = token), or None.
            token_type_ids: segment ids [B, T]; None: all 0.
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask(attention_mask_, input_ids.shape[1], causal=False)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden_states: jax.Array) -> jax.Array:
        """The pooler output [B, hidden_size] of :meth:`__call__`'s ``hidden_states``."""
        assert self.pooler is not None
        return self.pooler(hidden_states)

    def mlm_logits(self, hidden_states: jax.Array) -> jax.Array:
        """The masked-LM logits [B, T, vocab_size] of :meth:`__call__`'s ``hidden_states``."""
        assert self.mlm is not None
        return self.mlm(hidden_states, self.embeddings.word)


# ------------------------------------------------------------------------------------------- family

class BertParity(ParityHarness):
    """BERT parity: seeded sentence pairs with a right-padded last row; MLM logits, or the base model's
    hidden states and pooler output, at the unpadded positions."""

    distributions = ("logits",)
    #: Parity inputs: [batch, length] token ids; the last row is right-padded.
    length = 16

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


class BertFamily(Family):
    """The ``bert`` family: config.json of ``model_type: bert`` -> :class:`BertSpec` -> :class:`Bert`.

    Mapping: ``mappings/bert.yaml``; parity: :class:`BertParity`; tests: tests/e2e/test_family_bert.py.
    """

    name = "bert"
    description = "BERT encoders (transformers BertModel / BertForMaskedLM)"
    mappings = ("bert",)
    layer_keys: ClassVar[Mapping[str, str]] = {
        "num_hidden_layers": r"^(?:bert\.)?encoder\.layer\.(\d{1,9})\.",
    }
    parity = BertParity()

    def resolve(self, config: Mapping[str, Any]) -> BertSpec:
        """See :func:`resolve`."""
        return resolve(config)

    def options(self, config: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
        """``pooler``: whether a BertModel checkpoint carries its pooler (BertForMaskedLM has none)."""
        if _is_mlm(config):
            return {"pooler": False}
        return {"pooler": any(k == "pooler.dense.weight" or k.endswith(".pooler.dense.weight") for k in keys)}

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> Bert:
        return Bert(resolve(config), pooler=bool(options.get("pooler", True)), rngs=rngs)


FAMILY = BertFamily()
