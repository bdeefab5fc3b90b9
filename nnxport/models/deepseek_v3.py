"""DeepSeek-V3 (transformers ``DeepseekV3ForCausalLM``): the decoder's embedding, RMSNorm, pre-norm blocks,
KV-cache generation and parity, with multi-head latent attention (:mod:`nnxport.models.decoder.mla`),
YaRN RoPE with mscale, ``first_k_dense_replace`` dense SwiGLU layers, then MoE layers
(:mod:`nnxport.models.decoder.deepseek_moe`: group-limited sigmoid routing, shared experts).

Every config.json field that changes the forward pass is implemented or refused by :func:`resolve`.
Not implemented: the multi-token-prediction layer (``num_mtp_layers``): not part of the transformers model
either; its ``model.layers.61.*`` keys in the published checkpoint are ignored by the mapping, as
transformers ignores them.
Mapping: ``mappings/deepseek_v3.yaml`` (per-expert keys stacked into expert-batched kernels, or the fused
3-D tensors transformers 5 keeps internally). The published weights are fp8 with 128 x 128 blocks:
they convert dequantized (docs/quantized.md).
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
    ParityInput,
    padding_idx_field,
    rate_field,
    token_inputs,
    valid_positions,
)
from nnxport.models.decoder.deepseek_moe import DeepseekMoE, MoeSpec, SwiGLU
from nnxport.models.decoder.family import DecoderParity
from nnxport.models.decoder.mla import MLA, MlaRope, MlaSpec
from nnxport.models.decoder.modules import RMSNorm
from nnxport.models.layers import COLUMN, EMBEDDING, KVCache, attention_mask, check_token_ids, sharded
from nnxport.models.rope import parse_rope

#: DeepseekV3Config defaults (transformers 5.24) for the fields read here.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": None, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_interleave": True, "attention_bias": False,
}
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class DeepseekSpec:
    """What :class:`DeepseekV3` needs, resolved from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    first_dense: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    attention: MlaSpec
    moe: MoeSpec
    pad_token_id: int | None = None


def _get(config: Mapping[str, Any], field: str) -> Any:
    return config[field] if field in config else DEFAULTS.get(field)


def _int(config: Mapping[str, Any], field: str, minimum: int = 1) -> int:
    value = _get(config, field)
    if type(value) is not int or value < minimum:
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


def _rope(config: Mapping[str, Any], dim: int) -> MlaRope:
    """``rope_scaling`` (the hub's) or ``rope_parameters`` (what transformers 5 writes), read by
    :func:`nnxport.models.rope.parse_rope`; yarn needs the dict's own original_max_position_embeddings."""
    field = "rope_scaling" if config.get("rope_scaling") is not None else "rope_parameters"
    params = config.get(field) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: field '{field}' must be a mapping, got {params!r}")
    prf = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if prf is not None and prf != 1.0:
        raise ConfigError(f"config.json: field 'partial_rotary_factor' is {prf!r}; only 1.0 is supported")
    rope = parse_rope(params, field, model_type="deepseek_v3", types=ROPE_TYPES,
                      theta=config.get("rope_theta", 10000.0), head_dim=dim,
                      max_positions=_int(config, "max_position_embeddings"),
                      original=params.get("original_max_position_embeddings"))
    all_dim = params.get("mscale_all_dim")
    return MlaRope(rope, None if all_dim is None else _number(all_dim, f"{field}.mscale_all_dim"))


def _moe(config: Mapping[str, Any], hidden: int, act: str) -> MoeSpec:
    experts, groups = _int(config, "n_routed_experts"), _int(config, "n_group")
    top_k, topk_group = _int(config, "num_experts_per_tok"), _int(config, "topk_group")
    if experts % groups or experts // groups < 2:
        raise ConfigError(f"config.json: field 'n_group' ({groups}) must divide n_routed_experts ({experts}) "
                          "into groups of at least 2 (the group score sums each group's top 2)")
    if topk_group > groups:
        raise ConfigError(f"config.json: field 'topk_group' ({topk_group}) exceeds n_group ({groups})")
    if top_k > topk_group * (experts // groups):
        raise ConfigError(f"config.json: field 'num_experts_per_tok' ({top_k}) exceeds the experts of the "
                          f"{topk_group} groups kept")
    return MoeSpec(hidden, _int(config, "moe_intermediate_size"), experts, top_k, groups, topk_group,
                   _flag(config, "norm_topk_prob"),
                   _number(_get(config, "routed_scaling_factor"), "routed_scaling_factor"),
                   _int(config, "n_shared_experts", minimum=0), act)


def resolve(config: Mapping[str, Any]) -> DeepseekSpec:
    """The :class:`DeepseekSpec` of ``config``; ConfigError naming the field for anything not implemented."""
    if config.get("model_type") != "deepseek_v3":
        raise ConfigError(f"config.json: field 'model_type' is {config.get('model_type')!r}, not deepseek_v3")
    archs = config.get("architectures") or []
    if archs and "DeepseekV3ForCausalLM" not in archs:
        raise ConfigError(f"config.json: field 'architectures' is {archs}; the deepseek_v3 family converts "
                          "DeepseekV3ForCausalLM")
    # Fields of DeepSeek's own modelling code that transformers implements one way only.
    for field, allowed in (("scoring_func", ("sigmoid",)), ("topk_method", ("noaux_tc",)),
                           ("moe_layer_freq", (1,))):
        if config.get(field) is not None and config[field] not in allowed:
            raise ConfigError(f"config.json: field '{field}' is {config[field]!r}; DeepseekV3ForCausalLM "
                              f"(and nnxport) implement {allowed[0]!r} only")
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise ConfigError(f"config.json: field 'num_key_value_heads' ({kv_heads!r}) must equal "
                          f"num_attention_heads ({heads}): multi-head latent attention expands every head")
    act = _get(config, "hidden_act")
    if act != "silu":
        raise ConfigError(f"config.json: field 'hidden_act' is {act!r}; the deepseek_v3 family implements "
                          "silu")
    q_lora = _get(config, "q_lora_rank")
    q_lora = None if q_lora is None else _int(config, "q_lora_rank")
    rope_dim = _int(config, "qk_rope_head_dim")
    if rope_dim % 2:
        raise ConfigError(f"config.json: field 'qk_rope_head_dim' ({rope_dim}) must be even")
    eps = _number(_get(config, "rms_norm_eps"), "rms_norm_eps")
    attn = MlaSpec(hidden, heads, q_lora, _int(config, "kv_lora_rank"), _int(config, "qk_nope_head_dim"),
                   rope_dim, _int(config, "v_head_dim"), eps, _flag(config, "attention_bias"),
                   _flag(config, "rope_interleave"), _rope(config, rope_dim),
                   rate_field(config, "attention_dropout", 0.0))
    layers = _int(config, "num_hidden_layers")
    first = _get(config, "first_k_dense_replace")
    first = 0 if first is None else _int(config, "first_k_dense_replace", minimum=0)
    vocab = _int(config, "vocab_size")
    return DeepseekSpec(vocab, hidden, _int(config, "intermediate_size"), layers, min(first, layers), eps,
                        act, _flag(config, "tie_word_embeddings"), attn, _moe(config, hidden, act),
                        padding_idx_field(config, vocab, None))


class DeepseekBlock(nnx.Module):
    """Pre-norm block: MLA, then a dense SwiGLU (``dense``) or the MoE."""

    def __init__(self, spec: DeepseekSpec, dense: bool, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = MLA(spec.attention, rngs=rngs)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp: SwiGLU | DeepseekMoE = (SwiGLU(spec.hidden_size, spec.intermediate_size, spec.hidden_act,
                                                 rngs=rngs) if dense else DeepseekMoE(spec.moe, rngs=rngs))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_attn_norm(x))

    def step(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache,
             layer: int) -> tuple[jax.Array, KVCache]:
        h, cache = self.attn.step(self.input_norm(x), cos, sin, mask, cache, layer)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), cache


class DeepseekV3(nnx.Module):
    """``model(input_ids [B, T], attention_mask [B, T] | None) -> logits [B, T, V]``; :meth:`decode` for
    generation with a KV cache, as :class:`nnxport.models.decoder.Decoder`."""

    max_positions: int | None = None

    def __init__(self, spec: DeepseekSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = nnx.Embed(spec.vocab_size, spec.hidden_size, embedding_metadata=sharded(EMBEDDING),
                               rngs=rngs)
        self.layers = nnx.List([DeepseekBlock(spec, i < spec.first_dense, rngs=rngs)
                                for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = (None if spec.tie_word_embeddings
                        else nnx.Linear(spec.hidden_size, spec.vocab_size, use_bias=False,
                                        kernel_metadata=sharded(COLUMN), rngs=rngs))

    def __call__(self, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        check_token_ids(input_ids, self.spec.vocab_size)
        x = jnp.take(self.embed.embedding[...], input_ids, axis=0)
        cos, sin = self.spec.attention.rope.tables(jnp.arange(input_ids.shape[1])[None], x.dtype)
        causal = attention_mask(mask, input_ids.shape[1], causal=True)
        for layer in self.layers:
            x = layer(x, cos, sin, causal)
        return self._logits(self.norm(x))

    def _logits(self, h: jax.Array) -> jax.Array:
        return h @ self.embed.embedding[...].T if self.lm_head is None else self.lm_head(h)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        first = self.layers[0]
        assert isinstance(first, DeepseekBlock)
        return first.attn.empty_cache(batch, max_len, self.spec.num_layers, self.embed.embedding.dtype)

    def decode(self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache
               ) -> tuple[jax.Array, KVCache]:
        x = jnp.take(self.embed.embedding[...], input_ids, axis=0)
        cos, sin = self.spec.attention.rope.tables(positions, x.dtype)
        cache = cache.admit(mask)
        causal = cache.mask(input_ids.shape[1])
        for i, layer in enumerate(self.layers):
            x, cache = layer.step(x, cos, sin, causal, cache, i)
        return self._logits(self.norm(x)), cache.advance(input_ids.shape[1])


class DeepseekParity(DecoderParity):
    """As the decoder's: logits at the unpadded positions, then 8 greedy tokens."""

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return "DeepseekV3ForCausalLM"

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        return token_inputs(resolve(config).vocab_size, seed)

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        assert isinstance(model, DeepseekV3)
        ids, mask = (jnp.asarray(i.value) for i in inputs)
        logits = nnx.jit(lambda m, ids, mask: m(ids, mask))(model, ids, mask)
        return {"logits": valid_positions(np.asarray(logits.astype(jnp.float32)), inputs[1].value)}


class DeepseekV3Family(Family):
    """The ``deepseek_v3`` family: DeepSeek-V3 (and V3.1 / R1, which share the architecture)."""

    name = "deepseek_v3"
    description = "DeepSeek-V3 / R1: multi-head latent attention, group-routed MoE (DeepseekV3ForCausalLM)"
    mappings = ("deepseek_v3",)
    layer_keys: ClassVar[Mapping[str, str]] = {"num_hidden_layers": r"^model\.layers\.(\d{1,9})\."}
    parity = DeepseekParity()

    def resolve(self, config: Mapping[str, Any]) -> DeepseekSpec:
        return resolve(config)

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> DeepseekV3:
        return DeepseekV3(resolve(config), rngs=rngs)


FAMILY = DeepseekV3Family()
