"""DeepSeek-V3's MoE block, computed as transformers 5.24's ``DeepseekV3MoE`` does: sigmoid-scored,
group-limited top-k routing with ``e_score_correction_bias`` (used to choose experts, not to weight
them) and ``routed_scaling_factor``, expert-batched SwiGLU kernels, and always-on shared experts.

Experts are expert-batched kernels ``gate``, ``up`` [E, hidden, moe_intermediate] and ``down``
[E, moe_intermediate, hidden] (``nnx.Param``, annotated expert-parallel over ``model``), the layout a
shared MoE block can take over: what is DeepSeek's own is :class:`Router` (the choice) and the shared
experts. Every expert runs on every token and the outputs are combined with the routing weights (zero
for experts not chosen): the same sums as transformers' per-expert loop, at E times the compute, which
suits parity on small replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from nnxport.models.layers import ACTIVATIONS, COLUMN, ROW, sharded

EXPERTS = ("model", None, None)
"""Expert-parallel layout of the batched kernels: experts split over the ``model`` axis."""


@dataclass(frozen=True)
class MoeSpec:
    """``n_routed_experts``, ``num_experts_per_tok``, ``n_group``, ``topk_group``, ``norm_topk_prob``,
    ``routed_scaling_factor``, ``n_shared_experts`` and the sizes."""

    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_shared_experts: int
    hidden_act: str


class SwiGLU(nnx.Module):
    """``down(act(gate(x)) * up(x))`` without biases (DeepseekV3MLP: the dense layers and the shared
    experts)."""

    def __init__(self, hidden: int, intermediate: int, act: str, *, rngs: nnx.Rngs):
        column, row = sharded(COLUMN), sharded(ROW)
        self.gate = nnx.Linear(hidden, intermediate, use_bias=False, kernel_metadata=column, rngs=rngs)
        self.up = nnx.Linear(hidden, intermediate, use_bias=False, kernel_metadata=column, rngs=rngs)
        self.down = nnx.Linear(intermediate, hidden, use_bias=False, kernel_metadata=row, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(ACTIVATIONS[self.act](self.gate(x)) * self.up(x))


class Router(nnx.Module):
    """DeepseekV3TopkRouter: returns the routing weights [N, E] (zero for experts not chosen), in float32."""

    def __init__(self, spec: MoeSpec):
        self.kernel = nnx.Param(jnp.zeros((spec.hidden_size, spec.num_experts), jnp.float32))
        # A buffer in transformers (not trained by gradients; DeepSeek adjusts it to balance the load):
        # state, not a parameter, as BatchNorm statistics are.
        self.correction_bias = nnx.BatchStat(jnp.zeros((spec.num_experts,), jnp.float32))
        self.spec = spec

    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32))
        choice = scores + self.correction_bias[...].astype(jnp.float32)
        per_group = choice.reshape(-1, s.n_group, s.num_experts // s.n_group)
        group_scores = jax.lax.top_k(per_group, 2)[0].sum(axis=-1)
        _, groups = jax.lax.top_k(group_scores, s.topk_group)
        rows = jnp.arange(group_scores.shape[0])[:, None]
        keep = jnp.zeros_like(group_scores, bool).at[rows, groups].set(True)
        keep = jnp.repeat(keep, s.num_experts // s.n_group, axis=-1)
        choice = jnp.where(keep, choice, -jnp.inf)
        _, chosen = jax.lax.top_k(choice, s.top_k)
        weights = jnp.take_along_axis(scores, chosen, axis=-1)
        if s.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        weights = weights * s.routed_scaling_factor
        return jnp.zeros_like(scores).at[rows, chosen].set(weights)


class DeepseekMoE(nnx.Module):
    """Routed experts (expert-batched kernels) plus the shared experts' SwiGLU.

    Args:
        spec: the MoE sizes and routing switches.
        rngs: random streams.
    """

    def __init__(self, spec: MoeSpec, *, rngs: nnx.Rngs):
        e, h, i = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        init = nnx.initializers.lecun_normal()
        self.router = Router(spec)
        self.gate = nnx.Param(init(rngs.params(), (e, h, i)), **sharded(EXPERTS))
        self.up = nnx.Param(init(rngs.params(), (e, h, i)), **sharded(EXPERTS))
        self.down = nnx.Param(init(rngs.params(), (e, i, h)), **sharded(EXPERTS))
        self.shared = SwiGLU(h, i * spec.n_shared_experts, spec.hidden_act, rngs=rngs)
        self.act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, hidden] -> [B, T, hidden]."""
        flat = x.reshape(-1, x.shape[-1])
        routed = batched_experts(flat, self.router(flat), self.gate[...], self.up[...], self.down[...],
                                 self.act)
        return routed.reshape(x.shape).astype(x.dtype) + self.shared(x)


def batched_experts(x: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                    act: str) -> jax.Array:
    """SwiGLU experts on tokens x [N, hidden] combined by routing weights [N, E] (zero where not chosen):
    ``sum_e weights[n, e] * down_e(act(gate_e(x_n)) * up_e(x_n))`` with kernels gate, up [E, hidden, I] and
    down [E, I, hidden]. Nothing here is DeepSeek's: the router decides, this computes."""
    g = jnp.einsum("nh,ehi->eni", x, gate)
    u = jnp.einsum("nh,ehi->eni", x, up)
    out = jnp.einsum("eni,eih->enh", ACTIVATIONS[act](g) * u, down)
    return jnp.einsum("enh,ne->nh", out, weights.astype(out.dtype))
