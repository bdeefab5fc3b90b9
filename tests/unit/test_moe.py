"""The sparse MoE block against a direct numpy computation (router switches included), stacking in place
(the same values as numpy's stack, each key read once, a mesh part reading only its keys), and the
``order: indices`` gather option."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from nnxport.errors import MappingError
from nnxport.mapping.analysis import analyze
from nnxport.mapping.ops import apply_ops, parse_op
from nnxport.mapping.schema import load_mapping_text
from nnxport.models.decoder.moe import MoESpec, SparseMoE
from nnxport.pipeline.transfer import _Chain, _stack_part, stack_in_place
from tests.helpers import spec

# ------------------------------------------------------------------------------------------ the block


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _reference(moe: SparseMoE, x: np.ndarray, spec: MoESpec) -> np.ndarray:
    """Token by token: softmax over the router logits, the top-k kept (renormalised), their MLPs summed."""
    p = {k: np.asarray(v.get_value(), np.float64)
         for k, v in nnx.to_flat_state(nnx.state(moe, nnx.Param)) for k in [".".join(map(str, k))]}
    out = np.zeros_like(x, dtype=np.float64)
    for n, token in enumerate(x.astype(np.float64)):
        logits = token @ p["router.kernel"] + p.get("router.bias", 0.0)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[:spec.top_k]
        weights = probs[top] / (probs[top].sum() if spec.norm_topk_prob else 1.0)
        for e, w in zip(top, weights, strict=True):
            bias = {k: p[f"experts.{k}_bias"][e] if spec.expert_bias else 0.0 for k in ("gate", "up", "down")}
            h = _silu(token @ p["experts.gate"][e] + bias["gate"]) * (token @ p["experts.up"][e] + bias["up"])
            out[n] += w * (h @ p["experts.down"][e] + bias["down"])
    return out


@pytest.mark.parametrize("switches", [
    {},
    {"norm_topk_prob": False, "weights_dtype": "activations"},
    {"router_bias": True, "expert_bias": True},
], ids=["mixtral", "qwen3-moe", "biases"])
def test_sparse_moe_equals_a_direct_computation(switches: dict[str, Any]) -> None:
    spec = MoESpec(num_experts=6, top_k=2, intermediate_size=12, sparse=(True,), **switches)
    moe = SparseMoE(16, "silu", spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, leaf in nnx.to_flat_state(nnx.state(moe, nnx.Param)):  # biases non-zero, router decisive
        leaf.set_value(jnp.asarray(rng.normal(0, 0.5, leaf.get_value().shape), jnp.float32))
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    got = np.asarray(moe(jnp.asarray(x)))
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(10, 16), _reference(moe, x.reshape(10, 16), spec), rtol=2e-5,
                               atol=2e-5)


def test_the_expert_kernels_carry_the_mesh_layout() -> None:
    from nnxport.models.base import annotated_shards

    spec = MoESpec(num_experts=4, top_k=2, intermediate_size=8, sparse=(True,))
    moe = nnx.eval_shape(lambda: SparseMoE(16, "silu", spec, rngs=nnx.Rngs(0)))
    shards = annotated_shards(nnx.state(moe, nnx.Param))
    assert shards["experts.gate"] == shards["experts.up"] == (("model",), ("data",), None)
    assert shards["experts.down"] == (("model",), None, ("data",))
    assert "router.kernel" not in shards


# -------------------------------------------------------------------------------------------- stacking

class _Source:
    """The two reads transfer uses, counting them."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.reads = tensors, []  # type: ignore[var-annotated]

    def read(self, key: str) -> np.ndarray:
        self.reads.append((key, None))
        return self.tensors[key].copy()

    def read_box(self, key: str, box: Any) -> np.ndarray:
        self.reads.append((key, tuple(box)))
        return self.tensors[key][tuple(slice(a, b) for a, b in box)].copy()


def _chain(tensors: dict[str, np.ndarray], ops: list[dict[str, Any]]) -> _Chain:
    return _Chain(tuple(tensors), tuple(t.shape for t in tensors.values()), "float32",
                  tuple(parse_op(o) for o in ops), 0)


@pytest.mark.parametrize("ops", [
    [{"transpose": [1, 0]}, {"stack": {"axis": 0}}],
    [{"transpose": [1, 0]}, {"stack": {"axis": 1}}],
    [{"reshape": [2, 3, -1]}, {"transpose": [2, 0, 1]}, {"stack": {"axis": -1}}],
    [{"stack": {"axis": 0}}, {"transpose": [0, 2, 1]}],
], ids=["experts", "axis1", "reshape", "after"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stack_in_place_equals_numpy_stack_and_reads_each_key_once(ops: list[dict[str, Any]],
                                                                   dtype: str) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"experts.{i}.w1": rng.normal(size=(6, 4)).astype(np.float32) for i in range(5)}
    chain = _chain(tensors, ops)
    src = _Source(tensors)
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    got = stack_in_place(src, chain, want, "test", False)  # type: ignore[arg-type]
    assert got is not None and got.dtype == want
    (expected,) = apply_ops(chain.ops, list(tensors.values()))
    np.testing.assert_array_equal(got, expected.astype(want))
    assert src.reads == [(k, None) for k in tensors]


def test_stack_in_place_refuses_non_finite_values_naming_the_target() -> None:
    tensors = {f"e.{i}": np.ones((2, 2), np.float32) for i in range(3)}
    tensors["e.1"][0, 0] = np.nan
    from nnxport.errors import NnxportError

    with pytest.raises(NnxportError, match="stacked target: 1 NaN"):
        stack_in_place(_Source(tensors), _chain(tensors, [{"stack": {"axis": 0}}]),  # type: ignore[arg-type]
                       np.dtype(np.float32), "stacked target", False)


def test_a_mesh_part_of_a_stack_reads_only_its_experts() -> None:
    rng = np.random.default_rng(1)
    tensors = {f"experts.{i}.w1": rng.normal(size=(6, 4)).astype(np.float32) for i in range(4)}
    chain = _chain(tensors, [{"transpose": [1, 0]}, {"stack": {"axis": 0}}])
    src = _Source(tensors)
    box = ((2, 4), (0, 2), (0, 6))  # experts 2..3, hidden rows 0..1
    got = _stack_part(src, chain, box, __import__("nnxport.progress").progress.NO_PROGRESS)  # type: ignore[arg-type]
    (whole,) = apply_ops(chain.ops, list(tensors.values()))
    np.testing.assert_array_equal(got, whole[2:4, 0:2, :])
    assert src.reads == [("experts.2.w1", ((0, 6), (0, 2))), ("experts.3.w1", ((0, 6), (0, 2)))]


# ---------------------------------------------------------------------------------------- order: indices

MAPPING = """
version: 1
model: decoder
rules:
  - from: '^layers\\.(\\d+)\\.experts\\.(\\d+)\\.w1$'
    to: 'layers.\\1.experts.gate'
    ops: [{transpose: [1, 0]}, {stack: {axis: 0, by: '\\2', order: indices}}]
"""


def test_order_indices_joins_pieces_zero_to_n() -> None:
    mapping = load_mapping_text(MAPPING)
    (rule,) = mapping.rules
    assert rule.gather is not None and rule.gather.describe() == "stack(axis=0,by=\\2,order=indices)"
    sources = {f"layers.0.experts.{i}.w1": spec(8, 4) for i in (1, 0, 10, 2, 3, 4, 5, 6, 7, 8, 9)}
    analysis = analyze(mapping, sources, {"layers.0.experts.gate": spec(11, 4, 8)}, None)
    (a,) = analysis.checked(mapping.where)
    assert a.sources == tuple(f"layers.0.experts.{i}.w1" for i in range(11))


def test_order_indices_refuses_a_gap() -> None:
    mapping = load_mapping_text(MAPPING)
    sources = {f"layers.0.experts.{i}.w1": spec(8, 4) for i in (0, 1, 2, 5)}
    analysis = analyze(mapping, sources, {"layers.0.experts.gate": spec(4, 4, 8)}, None)
    with pytest.raises(MappingError) as err:
        analysis.checked(mapping.where)
    text = "\n".join(err.value.problems)
    assert "missing piece '3'" in text and "unexpected piece '5'" in text and "(order: indices)" in text


def test_order_must_be_a_list_or_indices() -> None:
    with pytest.raises(MappingError, match="'indices'"):
        load_mapping_text(MAPPING.replace("order: indices", "order: experts"))


def test_gradients_reach_every_parameter_and_match_finite_differences() -> None:
    """Training through the block: jax.grad of a loss reaches the router and every expert kernel, and
    agrees with a central finite difference along a random direction (float64-free: a loose check)."""
    import jax

    spec = MoESpec(num_experts=4, top_k=2, intermediate_size=8, sparse=(True,), router_bias=True)
    moe = SparseMoE(8, "silu", spec, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 8)), jnp.float32)
    graphdef, params = nnx.split(moe, nnx.Param)

    @jax.jit
    def loss(p: Any) -> jax.Array:
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))

    grads = jax.jit(jax.grad(loss))(params)
    flat = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
    assert set(flat) == {"router.kernel", "router.bias", "experts.gate", "experts.up", "experts.down"}
    assert all(np.abs(g).max() > 0 for g in flat.values())
    direction = jax.tree.map(lambda v: jnp.asarray(np.random.default_rng(4).normal(size=v.shape), v.dtype),
                             params)
    eps = 1e-3
    shifted = [jax.tree.map(lambda p, d, s=s: p + s * eps * d, params, direction) for s in (1, -1)]
    numeric = (loss(shifted[0]) - loss(shifted[1])) / (2 * eps)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction),
                                                  strict=True))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)
