"""Sparse mixture-of-experts MLP blocks shared by the decoder family's MoE model types (Mixtral, Qwen3-MoE).

A sparse MoE layer replaces a block's MLP: a *router* scores every token against ``num_experts`` experts
and keeps ``top_k`` of them with routing weights; each kept expert (a gated MLP) runs on the token and the
outputs are summed with those weights. The experts are stored *expert-batched*: one ``[E, in, out]``
kernel per projection (``experts.gate``, ``experts.up`` [E, hidden, moe_intermediate], ``experts.down``
[E, moe_intermediate, hidden]); mappings gather a checkpoint's per-expert keys into them with a ``stack``
(or split transformers 5's fused ``gate_up_proj``), and ``--mesh`` splits the expert dimension over
``model`` (expert parallelism) and the hidden dimension over ``data``.

Numerics follow transformers 5.24's default experts implementation (``grouped_mm``,
transformers/integrations/moe.py) and its routers:

* router logits ``x @ W (+ b)`` in the activations' dtype; softmax in float32; ``top_k`` of the
  probabilities; with ``norm_topk_prob`` divided by their sum (Mixtral always, Qwen3-MoE by config);
  Qwen3-MoE casts the kept weights to the activations' dtype, Mixtral keeps them in float32
  (:attr:`MoESpec.weights_dtype`);
* each (token, expert) pair through ``down(act(gate(x)) * up(x))`` in the activations' dtype (tokens
  grouped by expert: ``jax.lax.ragged_dot``, so only the chosen experts compute);
* ``expert output * routing weight`` (promoted to float32 for float32 weights), summed over the top-k in
  float32 and cast back to the activations' dtype.

Extension points: :data:`ROUTERS` maps :attr:`MoESpec.router` to a :class:`Router` subclass (a new scoring
rule, e.g. DeepSeek-V3's sigmoid group-limited routing with ``e_score_correction_bias``, is a subclass
registered with :func:`register_router` plus the spec fields it reads); :data:`GATINGS` maps
:attr:`MoESpec.gating` to how an expert combines its gate and up projections.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.layers import ACTIVATIONS, sharded

#: Mesh layout of expert-batched kernels: experts over ``model``, the hidden dimension over ``data``
#: (gate / up are [E, hidden, inner], down is [E, inner, hidden]).
EXPERTS_IN = ("model", "data", None)
EXPERTS_OUT = ("model", None, "data")

#: model types with sparse MoE layers -> the config.json field counting the experts. Qwen3-MoE's config
#: class calls it ``num_experts`` but maps it to ``num_local_experts`` (and save_pretrained writes that).
EXPERT_FIELDS = {"mixtral": ("num_local_experts",), "qwen3_moe": ("num_experts", "num_local_experts"),
                 "gpt_oss": ("num_local_experts", "num_experts")}

#: Defaults of the transformers 5.24 config classes for the MoE fields read here.
MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "router_jitter_noise": 0.0},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": False,
                  "decoder_sparse_step": 1, "moe_intermediate_size": 768, "mlp_only_layers": None},
    "gpt_oss": {"num_local_experts": 128, "num_experts_per_tok": 4, "swiglu_alpha": 1.702,
                "swiglu_limit": 7.0},
}


@dataclass(frozen=True)
class MoESpec:
    """A model's sparse MoE layers, resolved from config.json (:func:`resolve_moe`)."""

    num_experts: int
    top_k: int
    #: The experts' inner size (Mixtral: ``intermediate_size``; Qwen3-MoE: ``moe_intermediate_size``).
    intermediate_size: int
    #: Per layer: True where the block's MLP is a sparse MoE layer (else the dense MLP).
    sparse: tuple[bool, ...]
    #: Key of :data:`ROUTERS`.
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    #: Whether the router has a bias.
    router_bias: bool = False
    #: The dtype routing weights multiply the expert outputs in: "float32" (Mixtral) or "activations"
    #: (Qwen3-MoE: cast to the activations' dtype first).
    weights_dtype: Literal["float32", "activations"] = "float32"
    #: Whether the expert projections have biases ([E, out]).
    expert_bias: bool = False
    #: Key of :data:`GATINGS`.
    gating: str = "glu"
    #: GPT-OSS's clamped SwiGLU (gating "clamped_swiglu"): ``swiglu_alpha``, ``swiglu_limit``.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


# ------------------------------------------------------------------------------------------ config.json

def _get(config: Mapping[str, Any], model_type: str, field: str) -> Any:
    return config[field] if field in config else MOE_DEFAULTS[model_type].get(field)


def _count(config: Mapping[str, Any], model_type: str, field: str, minimum: int = 1) -> int:
    value = _get(config, model_type, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.json: field '{field}' must be an integer >= {minimum}, got {value!r}")
    return value


def _float(config: Mapping[str, Any], model_type: str, field: str) -> float:
    value = _get(config, model_type, field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(f"config.json: field '{field}' must be a positive number, got {value!r}")
    return float(value)


def _num_experts(config: Mapping[str, Any], model_type: str) -> tuple[str, int]:
    """The expert count and the field it came from (either spelling; both must agree)."""
    fields = EXPERT_FIELDS[model_type]
    given = [f for f in fields if f in config]
    if len(given) > 1 and config[given[0]] != config[given[1]]:
        raise ConfigError(f"config.json: fields '{given[0]}' ({config[given[0]]!r}) and '{given[1]}' "
                          f"({config[given[1]]!r}) disagree on the number of experts")
    field = given[0] if given else fields[0]
    minimum = 0 if model_type == "qwen3_moe" else 1  # Qwen3-MoE with 0 experts: every layer dense
    return field, _count(config, model_type, field, minimum)


def _sparse_layers(config: Mapping[str, Any], model_type: str, num_layers: int, experts: int
                   ) -> tuple[bool, ...]:
    """Which layers are sparse: every Mixtral and GPT-OSS layer; Qwen3-MoE's rule (Qwen3MoeDecoderLayer):
    not in ``mlp_only_layers``, and ``(layer + 1) % decoder_sparse_step == 0``, when there are experts."""
    if model_type != "qwen3_moe":  # Mixtral, GPT-OSS: every layer
        return (True,) * num_layers
    step = _count(config, model_type, "decoder_sparse_step")
    only = _get(config, model_type, "mlp_only_layers")
    only = [] if only is None else only
    if not isinstance(only, list) or not all(type(i) is int and i >= 0 for i in only):
        raise ConfigError(f"config.json: field 'mlp_only_layers' must be a list of layer indices, "
                          f"got {only!r}")
    return tuple(experts > 0 and i not in only and (i + 1) % step == 0 for i in range(num_layers))


def resolve_moe(config: Mapping[str, Any], model_type: str, num_layers: int,
                intermediate_size: int) -> MoESpec | None:
    """The MoE layers of ``config`` (None for model types without them, or a Qwen3-MoE model whose
    layers are all dense); ConfigError naming the field for anything not implemented."""
    if model_type not in EXPERT_FIELDS:
        return None
    field, experts = _num_experts(config, model_type)
    top_k = _count(config, model_type, "num_experts_per_tok")
    sparse = _sparse_layers(config, model_type, num_layers, experts)
    if not any(sparse):
        return None
    if top_k > experts:
        raise ConfigError(f"config.json: field 'num_experts_per_tok' ({top_k}) exceeds '{field}' ({experts})")
    if model_type == "gpt_oss":
        return MoESpec(num_experts=experts, top_k=top_k, intermediate_size=intermediate_size, sparse=sparse,
                       router="topk_softmax", router_bias=True, expert_bias=True, weights_dtype="activations",
                       gating="clamped_swiglu", swiglu_alpha=_float(config, model_type, "swiglu_alpha"),
                       swiglu_limit=_float(config, model_type, "swiglu_limit"))
    if model_type == "mixtral":
        jitter = _get(config, model_type, "router_jitter_noise")
        if jitter not in (0, 0.0, None):
            raise ConfigError(f"config.json: field 'router_jitter_noise' is {jitter!r}; nnxport does not "
                              "implement router jitter (training only): set it to 0.0")
        return MoESpec(num_experts=experts, top_k=top_k, intermediate_size=intermediate_size, sparse=sparse)
    norm = _get(config, model_type, "norm_topk_prob")
    if not isinstance(norm, bool):
        raise ConfigError(f"config.json: field 'norm_topk_prob' must be true or false, got {norm!r}")
    return MoESpec(num_experts=experts, top_k=top_k,
                   intermediate_size=_count(config, model_type, "moe_intermediate_size"), sparse=sparse,
                   norm_topk_prob=norm, weights_dtype="activations")


# ---------------------------------------------------------------------------------------------- routers

class Router(nnx.Module):
    """Scores tokens against the experts: ``kernel`` [hidden, E] (+ ``bias`` [E]). Subclasses define
    :meth:`select`, from the logits to the kept experts and their weights."""

    def __init__(self, hidden: int, spec: MoESpec, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (hidden, spec.num_experts), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((spec.num_experts,), jnp.float32)) if spec.router_bias else None
        self.spec = spec

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Routing of tokens x [N, hidden]: (weights [N, top_k] float32, expert indices [N, top_k])."""
        logits = x @ self.kernel[...].astype(x.dtype)  # F.linear in the activations' dtype
        if self.bias is not None:
            logits = logits + self.bias[...].astype(x.dtype)
        return self.select(logits)

    def select(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError


class SoftmaxTopK(Router):
    """Softmax over the experts in float32, the top-k probabilities kept (renormalised with
    ``norm_topk_prob``): Mixtral's and Qwen3-MoE's routers."""

    def select(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, indices = jax.lax.top_k(probs, self.spec.top_k)
        if self.spec.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights, indices


class TopKSoftmax(Router):
    """The top-k logits kept, then a softmax over them (in float32): GPT-OSS's router."""

    def select(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        top, indices = jax.lax.top_k(logits, self.spec.top_k)
        return jax.nn.softmax(top.astype(jnp.float32), axis=-1), indices


#: MoESpec.router -> the Router class that implements it.
ROUTERS: dict[str, type[Router]] = {"softmax_topk": SoftmaxTopK, "topk_softmax": TopKSoftmax}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make a :class:`Router` subclass available as ``MoESpec(router=name)``."""
    def add(cls: type[Router]) -> type[Router]:
        ROUTERS[name] = cls
        return cls
    return add


# ---------------------------------------------------------------------------------------------- experts

Combine = Callable[[jax.Array, jax.Array], jax.Array]


def _glu(act: str, spec: MoESpec) -> Combine:
    fn = ACTIVATIONS[act]
    return lambda gate, up: fn(gate) * up


def _clamped_swiglu(act: str, spec: MoESpec) -> Combine:
    """GptOssExperts._apply_gate: the gate clamped above and the up projection on both sides at
    ``swiglu_limit``, then ``(up + 1) * gate * sigmoid(alpha * gate)`` (``hidden_act`` is not used)."""
    alpha, limit = spec.swiglu_alpha, spec.swiglu_limit

    def combine(gate: jax.Array, up: jax.Array) -> jax.Array:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))

    return combine


#: MoESpec.gating -> ((hidden_act, spec) -> how an expert combines its gate and up projections).
GATINGS: dict[str, Callable[[str, MoESpec], Combine]] = {"glu": _glu, "clamped_swiglu": _clamped_swiglu}


class Experts(nnx.Module):
    """``num_experts`` gated MLPs as expert-batched kernels: ``gate``, ``up`` [E, hidden, inner],
    ``down`` [E, inner, hidden] (and ``*_bias`` [E, out] with ``expert_bias``)."""

    names: ClassVar[tuple[str, ...]] = ("gate", "up", "down")

    def __init__(self, hidden: int, act: str, spec: MoESpec, *, rngs: nnx.Rngs):
        e, i = spec.num_experts, spec.intermediate_size
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        for name, shape, axes in (("gate", (e, hidden, i), EXPERTS_IN), ("up", (e, hidden, i), EXPERTS_IN),
                                  ("down", (e, i, hidden), EXPERTS_OUT)):
            setattr(self, name, nnx.Param(init(rngs.params(), shape, jnp.float32), **sharded(axes)))
            bias = nnx.Param(jnp.zeros((e, shape[2]), jnp.float32)) if spec.expert_bias else None
            setattr(self, f"{name}_bias", bias)
        self.combine = GATINGS[spec.gating](act, spec)
        self.spec = spec

    def _project(self, name: str, x: jax.Array, sizes: jax.Array, experts: jax.Array) -> jax.Array:
        kernel: nnx.Param = getattr(self, name)
        y = jax.lax.ragged_dot(x, kernel[...].astype(x.dtype), sizes)
        bias: nnx.Param | None = getattr(self, f"{name}_bias")
        return y if bias is None else y + jnp.take(bias[...].astype(x.dtype), experts, axis=0)

    def __call__(self, x: jax.Array, weights: jax.Array, indices: jax.Array) -> jax.Array:
        """Tokens x [N, hidden] through their experts ``indices`` [N, k], summed with ``weights`` [N, k]."""
        n, k = indices.shape
        flat = indices.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        experts = flat[order]
        sizes = jnp.bincount(flat, length=self.spec.num_experts).astype(jnp.int32)
        xs = jnp.take(x, order // k, axis=0)
        h = self.combine(self._project("gate", xs, sizes, experts), self._project("up", xs, sizes, experts))
        y = self._project("down", h, sizes, experts)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
        y = jnp.take(y, inverse, axis=0).reshape(n, k, -1)
        w = weights if self.spec.weights_dtype == "float32" else weights.astype(x.dtype)
        return jnp.sum(y * w[..., None], axis=1, dtype=jnp.float32).astype(x.dtype)


class SparseMoE(nnx.Module):
    """A sparse MoE layer in place of a block's MLP: ``router`` then ``experts``.

    Args:
        hidden: the model's hidden size.
        act: ``hidden_act`` of the experts.
        spec: the resolved MoE fields.
        rngs: random streams.
    """

    def __init__(self, hidden: int, act: str, spec: MoESpec, *, rngs: nnx.Rngs):
        self.router = ROUTERS[spec.router](hidden, spec, rngs=rngs)
        self.experts = Experts(hidden, act, spec, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Hidden states [..., hidden] -> the same shape and dtype."""
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.router(flat)
        return self.experts(flat, weights, indices).reshape(x.shape)
