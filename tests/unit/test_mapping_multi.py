"""nnxport.mapping with several tensors per rule: split, concat/stack gathering, optional rules, ties.

Pure: fake sources and targets (TensorSpec), numpy arrays for the value-level checks; no model is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping as MappingABC
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnxport.errors import MappingError
from nnxport.mapping.analysis import Analysis, Assignment, TensorSpec, analyze
from nnxport.mapping.ops import Concat, Reshape, Split, Stack, Transpose, apply_ops, infer_ops
from nnxport.mapping.schema import load_mapping_text
from tests.helpers import ROOT, spec


def load_problems(text: str) -> list[str]:
    with pytest.raises(MappingError) as err:
        load_mapping_text(text, name="m")
    return err.value.problems


def analysis_of(rules: str, sources: dict[str, TensorSpec], targets: dict[str, TensorSpec],
                config: dict[str, Any] | None = None, extra: str = "") -> Analysis:
    text = "version: 1\nmodel: m\nrules:\n" + rules + extra
    return analyze(load_mapping_text(text, name="m"), sources, targets, config or {})


def rows(analysis: Analysis) -> dict[str, Any]:
    return {k.key: k for k in analysis.keys}


def materialize(analysis: Analysis, arrays: MappingABC[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What api.convert does with the assignments, on numpy arrays: target -> value."""
    assert analysis.ok, analysis.problems
    out: dict[str, np.ndarray] = {}
    for a in analysis.assignments:
        inputs = [out[a.tied_from]] if a.tied_from is not None else [arrays[k] for k in a.sources]
        for target, value, want in zip(a.targets, apply_ops(a.ops, inputs), a.target_specs, strict=True):
            assert value.shape == want.shape
            out[target] = value
    return out


def random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------- split

GPT2_SPLIT = r"""  - from: '^h\.(\d+)\.attn\.c_attn\.weight$'
    to: ['layers.\1.q.kernel', 'layers.\1.k.kernel', 'layers.\1.v.kernel']
    ops: [{split: {axis: 1, parts: 3}}]
"""
RULE_SPLIT = r"rule 1 (line 4, from '^h\.(\d+)\.attn\.c_attn\.weight$')"


def qkv_targets(layers: int = 2, dim: int = 4) -> dict[str, TensorSpec]:
    return {f"layers.{i}.{p}.kernel": spec(dim, dim) for i in range(layers) for p in "qkv"}


def test_split_parts_fills_targets_in_order_with_the_fused_thirds() -> None:
    srcs = {f"h.{i}.attn.c_attn.weight": spec(4, 12) for i in range(2)}
    result = analysis_of(GPT2_SPLIT, srcs, qkv_targets())
    assert result.ok, result.problems
    a = result.assignments[0]
    assert (a.targets, a.sources, a.ops) == (
        ("layers.0.q.kernel", "layers.0.k.kernel", "layers.0.v.kernel"), ("h.0.attn.c_attn.weight",),
        (Split(1, parts=3),))
    assert a.source_specs == (spec(4, 12),) and a.target_specs == (spec(4, 4),) * 3 and a.rule is not None
    row = rows(result)["h.1.attn.c_attn.weight"]
    assert row.status == "mapped" and row.targets == ("layers.1.q.kernel", "layers.1.k.kernel",
                                                      "layers.1.v.kernel")
    assert row.target == "layers.1.q.kernel, layers.1.k.kernel, layers.1.v.kernel"
    assert row.target_shapes == ((4, 4),) * 3 and row.target_shape is None
    assert row.ops == ("split(axis=1,parts=3)",)
    fused = {k: random((4, 12), i) for i, k in enumerate(srcs)}
    values = materialize(result, fused)
    np.testing.assert_array_equal(values["layers.1.q.kernel"], fused["h.1.attn.c_attn.weight"][:, :4])
    np.testing.assert_array_equal(values["layers.1.k.kernel"], fused["h.1.attn.c_attn.weight"][:, 4:8])
    np.testing.assert_array_equal(values["layers.1.v.kernel"], fused["h.1.attn.c_attn.weight"][:, 8:])


def test_split_sizes_from_config_expressions() -> None:
    rules = r"""  - from: '^qkv$'
    to: [q, k, v]
    ops: [{split: {axis: 0, sizes: [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]}}]
"""
    config = {"heads": 4, "kv_heads": 1, "head_dim": 2}
    result = analysis_of(rules, {"qkv": spec(12, 3)}, {"q": spec(8, 3), "k": spec(2, 3), "v": spec(2, 3)},
                         config)
    assert result.ok, result.problems
    assert result.assignments[0].ops == (Split(0, sizes=(8, 2, 2)),)
    arr = random((12, 3), 0)
    values = materialize(result, {"qkv": arr})
    np.testing.assert_array_equal(values["q"], arr[:8])
    np.testing.assert_array_equal(values["v"], arr[10:])
    wrong = analysis_of(rules, {"qkv": spec(12, 3)}, {"q": spec(8, 3), "k": spec(2, 3), "v": spec(2, 3)},
                        {**config, "kv_heads": 2})
    assert wrong.problems == (
        r"rule 1 (line 4, from '^qkv$'): key 'qkv' of shape (12, 3): split sizes [8, 4, 4] sum to 16, "
        "but axis 0 has length 12",)
    assert rows(wrong)["qkv"].status == "op-error" and rows(wrong)["qkv"].target_shapes == ()


def test_split_count_from_config_must_match_the_targets() -> None:
    rules = "  - from: '^w$'\n    to: [a, b]\n    ops: [{split: {axis: 0, parts: n}}]\n"
    result = analysis_of(rules, {"w": spec(6)}, {"a": spec(2), "b": spec(2)}, {"n": 3})
    assert result.problems == (
        "rule 1 (line 4, from '^w$'): key 'w' gives 3 tensors after split(axis=0,parts=3), "
        "but 'to' lists 2 targets",)
    assert rows(result)["w"].status == "op-error" and result.assignments == ()
    assert result.unfilled == ()  # the claimed targets are not reported again
    ok = analysis_of(rules, {"w": spec(6)}, {"a": spec(3), "b": spec(3)}, {"n": 2})
    assert ok.ok and ok.assignments[0].ops == (Split(0, parts=2),)


def test_split_part_shape_mismatch_and_missing_target() -> None:
    srcs = {"h.0.attn.c_attn.weight": spec(4, 12)}
    tgts = {**qkv_targets(1), "layers.0.v.kernel": spec(4, 5)}
    result = analysis_of(GPT2_SPLIT, srcs, tgts)
    assert result.problems == (
        f"shape mismatch: key 'h.0.attn.c_attn.weight' -> target 'layers.0.v.kernel' ({RULE_SPLIT}): "
        "source (4, 12) -> split(axis=1,parts=3) -> (4, 4) (part 3 of 3), expected (4, 5)",)
    assert rows(result)["h.0.attn.c_attn.weight"].status == "shape-mismatch"
    missing = analysis_of(GPT2_SPLIT, srcs, {k: v for k, v in qkv_targets(1).items() if ".k." not in k})
    assert missing.problems == (
        f"{RULE_SPLIT}: target 'layers.0.k.kernel' (from key 'h.0.attn.c_attn.weight') does not exist in the "
        "model; closest: 'layers.0.v.kernel', 'layers.0.q.kernel'",)
    assert missing.unfilled == ()  # the other parts are not reported as unfilled as well
    assert rows(missing)["h.0.attn.c_attn.weight"].status == "bad-target"


def test_split_then_per_part_reshape() -> None:
    rules = r"""  - from: '^c_attn$'
    to: [q, k, v]
    ops: [{split: {axis: 1, parts: 3}}, {reshape: [-1, heads, hidden // heads]}]
"""
    tgts = {t: spec(4, 2, 2) for t in "qkv"}
    result = analysis_of(rules, {"c_attn": spec(4, 12)}, tgts, {"heads": 2, "hidden": 4})
    assert result.ok, result.problems
    arr = random((4, 12), 1)
    np.testing.assert_array_equal(materialize(result, {"c_attn": arr})["k"], arr[:, 4:8].reshape(4, 2, 2))


# ------------------------------------------------------------------------------------------------ gather

VIT_CONCAT = r"""  - from: '^enc\.(\d+)\.(query|key|value)\.weight$'
    to: 'layers.\1.qkv.kernel'
    ops: [{transpose: [1, 0]}, {concat: {axis: 1, by: '\2', order: [query, key, value]}}]
"""
RULE_CONCAT = r"rule 1 (line 4, from '^enc\.(\d+)\.(query|key|value)\.weight$')"


def vit_sources(layers: int = 2) -> dict[str, TensorSpec]:
    return {f"enc.{i}.{p}.weight": spec(5, 4) for i in range(layers) for p in ("query", "key", "value")}


def test_concat_in_declared_order_equals_numpy_concatenate_of_transposes() -> None:
    tgts = {f"layers.{i}.qkv.kernel": spec(4, 15) for i in range(2)}
    result = analysis_of(VIT_CONCAT, vit_sources(), tgts)
    assert result.ok, result.problems
    a = result.assignments[1]
    assert a.targets == ("layers.1.qkv.kernel",)
    assert a.sources == ("enc.1.query.weight", "enc.1.key.weight", "enc.1.value.weight")  # not sorted keys
    assert a.ops == (Transpose((1, 0)), Concat(1, "\\2", ("query", "key", "value")))
    assert a.source_specs == (spec(5, 4),) * 3 and a.target_specs == (spec(4, 15),)
    row = rows(result)["enc.1.value.weight"]
    assert (row.status, row.target, row.target_shape, row.problem) == (
        "mapped", "layers.1.qkv.kernel", (4, 15), None)
    arrays = {k: random((5, 4), i) for i, k in enumerate(vit_sources())}
    value = materialize(result, arrays)["layers.1.qkv.kernel"]
    expected = np.concatenate([arrays[f"enc.1.{p}.weight"].T for p in ("query", "key", "value")], axis=1)
    np.testing.assert_array_equal(value, expected)


def test_gather_problems_name_target_rule_and_pieces() -> None:
    tgts = {f"layers.{i}.qkv.kernel": spec(4, 15) for i in range(3)}
    srcs = vit_sources(3)
    del srcs["enc.0.key.weight"]
    srcs["enc.1.keys.weight"] = spec(5, 4)
    rules = VIT_CONCAT.replace("(query|key|value)", "(query|keys?|value)")
    rule = RULE_CONCAT.replace("(query|key|value)", "(query|keys?|value)")
    srcs["enc.2.keys.weight"] = spec(5, 4)
    del srcs["enc.2.key.weight"]
    result = analysis_of(rules, srcs, tgts)
    assert result.problems == (
        f"{rule}: target 'layers.0.qkv.kernel' gathers pieces by '\\2': missing piece 'key' "
        "(order: query, key, value)",
        f"{rule}: target 'layers.1.qkv.kernel' gathers pieces by '\\2': unexpected piece 'keys' "
        "(key 'enc.1.keys.weight') (order: query, key, value)",
        f"{rule}: target 'layers.2.qkv.kernel' gathers pieces by '\\2': missing piece 'key'; unexpected "
        "piece 'keys' (key 'enc.2.keys.weight') (order: query, key, value)",
    )
    by_key = rows(result)
    assert by_key["enc.0.query.weight"].status == "op-error"
    assert by_key["enc.0.query.weight"].problem == result.problems[0]
    assert by_key["enc.1.key.weight"].problem == result.problems[1]
    assert result.assignments == () and result.unfilled == ()


def test_duplicate_pieces_are_a_problem() -> None:
    rules = r"""  - from: '^(a|b)\.(q|k)$'
    to: 'qk'
    ops: [{concat: {axis: 0, by: '\2'}}]
"""
    result = analysis_of(rules, {"a.q": spec(2), "b.q": spec(2), "a.k": spec(2)}, {"qk": spec(6)})
    assert result.problems == (
        r"rule 1 (line 4, from '^(a|b)\.(q|k)$'): target 'qk' gathers pieces by '\2': piece 'q' is given by "
        "2 keys 'a.q' and 'b.q'",)
    assert {k.status for k in result.keys} == {"op-error"}


def test_natural_order_without_order_and_stack_over_layers() -> None:
    rules = r"""  - from: '^layers\.(\d+)\.w$'
    to: 'stacked.w'
    ops: [{transpose: [1, 0]}, {stack: {axis: 0, by: '\1'}}]
"""
    srcs = {f"layers.{i}.w": spec(3, 2) for i in range(12)}
    result = analysis_of(rules, srcs, {"stacked.w": spec(12, 2, 3)})
    assert result.ok, result.problems
    (a,) = result.assignments
    assert a.sources == tuple(f"layers.{i}.w" for i in range(12))  # 2 before 10
    arrays = {k: random((3, 2), i) for i, k in enumerate(srcs)}
    np.testing.assert_array_equal(materialize(result, arrays)["stacked.w"],
                                  np.stack([arrays[f"layers.{i}.w"].T for i in range(12)]))
    # without 'by', pieces are the keys themselves, in natural order as well
    plain = analysis_of(rules.replace(", by: '\\1'", ""), srcs, {"stacked.w": spec(12, 2, 3)})
    assert plain.ok and plain.assignments[0].sources == a.sources
    # 'order' with integers (YAML ints are piece names too)
    reverse = "by: '\\1', order: [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]"
    ordered = analysis_of(rules.replace("by: '\\1'", reverse), srcs, {"stacked.w": spec(12, 2, 3)})
    assert ordered.ok and ordered.assignments[0].sources == a.sources[::-1]


def test_one_group_per_expanded_target() -> None:
    rules = r"""  - from: '^(\w)\.(\d+)$'
    to: '\1'
    ops: [{stack: {axis: 0}}]
"""
    srcs = {"a.1": spec(2), "a.2": spec(2), "b.1": spec(2)}
    result = analysis_of(rules, srcs, {"a": spec(2, 2), "b": spec(1, 2)})
    assert result.ok and [(x.targets, x.sources) for x in result.assignments] == [
        (("a",), ("a.1", "a.2")), (("b",), ("b.1",))]


def test_gather_shape_problems_name_keys() -> None:
    srcs = vit_sources(1)
    result = analysis_of(VIT_CONCAT, srcs, {"layers.0.qkv.kernel": spec(4, 12)})
    assert result.problems == (
        "shape mismatch: keys 'enc.0.query.weight', 'enc.0.key.weight' and 'enc.0.value.weight' -> target "
        f"'layers.0.qkv.kernel' ({RULE_CONCAT}): sources (5, 4), (5, 4), (5, 4) -> transpose(1,0) -> "
        "concat(axis=1,by=\\2,order=query,key,value) -> (4, 15), expected (4, 12)",)
    assert {k.status for k in result.keys} == {"shape-mismatch"}
    srcs["enc.0.key.weight"] = spec(5, 4, 1)  # the per-key transpose fails: the key is named
    bad = analysis_of(VIT_CONCAT, srcs, {"layers.0.qkv.kernel": spec(4, 15)})
    assert bad.problems == (f"{RULE_CONCAT}: key 'enc.0.key.weight' of shape (5, 4, 1): transpose [1,0] "
                            "needs a 2-d tensor, got shape (5, 4, 1)",)
    srcs["enc.0.key.weight"] = spec(4, 5)  # the concat fails: every key and its shape is named
    bad = analysis_of(VIT_CONCAT, srcs, {"layers.0.qkv.kernel": spec(4, 15)})
    assert bad.problems == (
        f"{RULE_CONCAT}: target 'layers.0.qkv.kernel' from keys 'enc.0.query.weight' (4, 5), "
        "'enc.0.key.weight' (5, 4), 'enc.0.value.weight' (4, 5): concat along axis 1 needs equal shapes "
        "except on that axis, got (4, 5), (5, 4), (4, 5)",)
    assert {k.status for k in bad.keys} == {"op-error"}


def test_gathered_keys_must_share_a_dtype() -> None:
    srcs = {**vit_sources(1), "enc.0.key.weight": spec(5, 4, dtype="bfloat16")}
    result = analysis_of(VIT_CONCAT, srcs, {"layers.0.qkv.kernel": spec(4, 15)})
    assert result.problems == (
        f"{RULE_CONCAT}: target 'layers.0.qkv.kernel': gathered keys have different dtypes: "
        "'enc.0.query.weight' float32, 'enc.0.key.weight' bfloat16, 'enc.0.value.weight' float32",)


def test_two_rules_into_one_target_are_still_a_duplicate() -> None:
    rules = VIT_CONCAT + "  - from: '^fused$'\n    to: 'layers.0.qkv.kernel'\n"
    result = analysis_of(rules, {**vit_sources(1), "fused": spec(4, 15)},
                         {"layers.0.qkv.kernel": spec(4, 15)})
    (problem,) = result.problems
    assert problem.startswith("target 'layers.0.qkv.kernel' is filled by 4 keys: 'enc.0.key.weight' (rule 1")
    assert problem.endswith("and 'fused' (rule 2 (line 7, from '^fused$'))")
    assert {k.status for k in result.keys} == {"duplicate-target"} and result.assignments == ()


def test_concat_then_split_regroups() -> None:
    rules = r"""  - from: '^(a|b)$'
    to: [x, y]
    ops: [{concat: {axis: 0, order: [a, b], by: '\1'}}, {split: {axis: 0, sizes: [1, 3]}}]
"""
    result = analysis_of(rules, {"a": spec(2), "b": spec(2)}, {"x": spec(1), "y": spec(3)})
    assert result.ok, result.problems
    values = materialize(result, {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0])})
    np.testing.assert_array_equal(values["x"], [1.0])
    np.testing.assert_array_equal(values["y"], [2.0, 3.0, 4.0])
    assert rows(result)["b"].target == "x, y"


# ---------------------------------------------------------------------------------------------- optional

POOLER = r"""  - from: '^pooler\.weight$'
    to: 'pooler.kernel'
    optional: true
    ops: [{transpose: [1, 0]}]
"""


def test_optional_rule_ignores_keys_without_a_target() -> None:
    result = analysis_of(POOLER, {"pooler.weight": spec(3, 2)}, {})
    assert result.ok and result.assignments == () and result.unused_rules == ()
    row = rows(result)["pooler.weight"]
    assert (row.status, row.problem, row.note, row.targets) == (
        "ignored", None, "optional: model has no target 'pooler.kernel'", ("pooler.kernel",))


def test_optional_rule_with_a_target_is_a_normal_rule() -> None:
    result = analysis_of(POOLER, {"pooler.weight": spec(3, 2)}, {"pooler.kernel": spec(2, 3)})
    assert result.ok and result.assignments[0].targets == ("pooler.kernel",)
    assert rows(result)["pooler.weight"].status == "mapped"
    bad = analysis_of(POOLER, {"pooler.weight": spec(3, 2)}, {"pooler.kernel": spec(3, 2)})
    assert bad.problems == (
        r"shape mismatch: key 'pooler.weight' -> target 'pooler.kernel' (rule 1 (line 4, from "
        r"'^pooler\.weight$')): source (3, 2) -> transpose(1,0) -> (2, 3), expected (3, 2)",)


def test_optional_ops_need_not_resolve_when_the_target_is_missing() -> None:
    rules = "  - from: '^p$'\n    to: 'p'\n    optional: true\n    ops: [{reshape: [missing_key, -1]}]\n"
    assert analysis_of(rules, {"p": spec(4)}, {}).ok
    assert analysis_of(rules, {"p": spec(4)}, {"p": spec(2, 2)}).problems == (
        "rule 1 (line 4, from '^p$'): reshape(missing_key,-1): config key 'missing_key' is missing",)


# -------------------------------------------------------------------------------------------------- ties

HEAD = r"""  - from: '^wte$'
    to: 'embed.embedding'
  - from: '^lm_head\.weight$'
    to: 'lm_head.kernel'
    ops: [{transpose: [1, 0]}]
"""
TIE = """tie:
  - to: 'lm_head.kernel'
    from: 'embed.embedding'
    ops: [{transpose: [1, 0]}]
"""
TIE_LABEL = "tie 1 (line 10, to 'lm_head.kernel')"
RULE_HEAD = r"rule 2 (line 6, from '^lm_head\.weight$')"


def test_tie_fills_an_unfilled_leaf_from_its_source() -> None:
    tgts = {"lm_head.kernel": spec(4, 10), "embed.embedding": spec(10, 4)}
    result = analysis_of(HEAD, {"wte": spec(10, 4)}, tgts, extra=TIE)
    assert result.ok, result.problems
    assert result.unfilled == () and result.unused_rules[0].index == 1
    embed, head = result.assignments  # the tie fill after the assignment it reads
    assert embed.targets == ("embed.embedding",)
    assert head == Assignment(("lm_head.kernel",), (), None, (Transpose((1, 0)),), (), (spec(4, 10),),
                              tied_from="embed.embedding")
    wte = random((10, 4), 0)
    values = materialize(result, {"wte": wte})
    np.testing.assert_array_equal(values["lm_head.kernel"], wte.T)
    assert _checked(load_mapping_text("version: 1\nmodel: m\nrules:\n" + HEAD + TIE), {"wte": spec(10, 4)},
                tgts, {}) == result.assignments


def test_tie_fill_problems() -> None:
    wrong = analysis_of(HEAD, {"wte": spec(10, 4)},
                        {"lm_head.kernel": spec(10, 4), "embed.embedding": spec(10, 4)}, extra=TIE)
    assert wrong.problems == (f"shape mismatch: {TIE_LABEL}: 'embed.embedding' (10, 4) -> transpose(1,0) -> "
                              "(4, 10), expected (10, 4) for target 'lm_head.kernel'",)
    assert wrong.unfilled == () and len(wrong.assignments) == 1
    no_source = analysis_of(HEAD, {}, {"lm_head.kernel": spec(4, 10)}, extra=TIE)
    assert no_source.problems == (f"{TIE_LABEL}: target 'lm_head.kernel' is not filled by any key, and its "
                                  "'from' target 'embed.embedding' does not exist in the model",)
    unfilled_source = analysis_of(HEAD, {}, {"lm_head.kernel": spec(4, 10), "embed.embedding": spec(10, 4)},
                                  extra=TIE)
    assert unfilled_source.problems == (
        f"{TIE_LABEL}: target 'lm_head.kernel' is not filled by any key, and its 'from' target "
        "'embed.embedding' is not filled either",
        "target 'embed.embedding' is not filled by any rule")
    assert unfilled_source.unfilled == ("embed.embedding",)
    # the source is claimed but invalid: that problem alone is reported
    bad_source = analysis_of(HEAD, {"wte": spec(10, 5)},
                             {"lm_head.kernel": spec(4, 10), "embed.embedding": spec(10, 4)}, extra=TIE)
    assert len(bad_source.problems) == 1 and bad_source.problems[0].startswith("shape mismatch: key 'wte'")
    assert bad_source.unfilled == ()
    tie_op = analysis_of(HEAD, {"wte": spec(10, 4)}, {"lm_head.kernel": spec(4, 10),
                                                      "embed.embedding": spec(10, 4)},
                         extra=TIE.replace("transpose: [1, 0]", "reshape: [n, -1]"))
    assert tie_op.problems == (f"{TIE_LABEL}: reshape(n,-1): config key 'n' is missing",)
    assert tie_op.unfilled == ()


def test_tied_key_is_not_read_when_the_model_shares_the_weight() -> None:
    tgts = {"embed.embedding": spec(10, 4)}
    srcs = {"wte": spec(10, 4), "lm_head.weight": spec(10, 4)}
    result = analysis_of(HEAD, srcs, tgts, extra=TIE)
    assert result.ok, result.problems
    row = rows(result)["lm_head.weight"]
    assert (row.status, row.problem, row.targets, row.target_shape) == (
        "tied", None, ("lm_head.kernel",), (4, 10))
    assert row.note == f"tied: the model shares 'embed.embedding' ({TIE_LABEL}); not read"
    assert [a.sources for a in result.assignments] == [("wte",)]
    mismatch = analysis_of(HEAD, {**srcs, "lm_head.weight": spec(11, 4)}, tgts, extra=TIE)
    assert mismatch.problems == (
        f"shape mismatch: key 'lm_head.weight' -> tied target 'lm_head.kernel' ({RULE_HEAD}, {TIE_LABEL}): "
        "source (11, 4) -> transpose(1,0) -> (4, 11), expected (4, 10) ('embed.embedding' (10, 4) -> "
        "transpose(1,0))",)
    assert rows(mismatch)["lm_head.weight"].status == "shape-mismatch"
    nowhere = analysis_of(HEAD, srcs, {"embed.embeddings": spec(10, 4)}, extra=TIE)
    assert f"{RULE_HEAD}: target 'lm_head.kernel' (from key 'lm_head.weight') does not exist in the model, " \
           f"and {TIE_LABEL} ties it to 'embed.embedding', which does not exist either" in nowhere.problems
    assert rows(nowhere)["lm_head.weight"].status == "bad-target"


def test_key_filling_an_existing_tied_leaf_is_used() -> None:
    tgts = {"lm_head.kernel": spec(4, 10), "embed.embedding": spec(10, 4)}
    result = analysis_of(HEAD, {"wte": spec(10, 4), "lm_head.weight": spec(10, 4)}, tgts, extra=TIE)
    assert result.ok
    assert [(a.targets, a.sources, a.tied_from) for a in result.assignments] == [
        (("lm_head.kernel",), ("lm_head.weight",), None), (("embed.embedding",), ("wte",), None)]


def test_tie_that_never_applies_is_silent_and_chains_resolve_in_order() -> None:
    silent = analysis_of(HEAD, {"wte": spec(10, 4)}, {"embed.embedding": spec(10, 4)}, extra=TIE)
    assert silent.ok and len(silent.assignments) == 1
    chain = TIE + "  - to: 'c'\n    from: 'lm_head.kernel'\n"
    tgts = {"c": spec(4, 10), "lm_head.kernel": spec(4, 10), "embed.embedding": spec(10, 4)}
    result = analysis_of(HEAD, {"wte": spec(10, 4)}, tgts, extra=chain)
    assert result.ok, result.problems
    assert [(a.targets, a.tied_from) for a in result.assignments] == [
        (("embed.embedding",), None), (("lm_head.kernel",), "embed.embedding"), (("c",), "lm_head.kernel")]
    wte = random((10, 4), 3)
    np.testing.assert_array_equal(materialize(result, {"wte": wte})["c"], wte.T)


# ----------------------------------------------------------------------------------------------- loading

def test_new_keys_load_into_rules_and_ties() -> None:
    explicit = VIT_CONCAT.replace("  - from", "  - optional: false\n    from")
    text = "version: 1\nmodel: m\nrules:\n" + GPT2_SPLIT + explicit + POOLER + TIE
    m = load_mapping_text(text)
    split, concat, pooler = m.rules
    assert split.targets == (r"layers.\1.q.kernel", r"layers.\1.k.kernel", r"layers.\1.v.kernel")
    assert split.target == r"layers.\1.q.kernel, layers.\1.k.kernel, layers.\1.v.kernel"
    assert split.gather is None and isinstance(concat.gather, Concat) and concat.line == 7
    assert (split.optional, concat.optional, pooler.optional) == (False, False, True)
    (tie,) = m.ties
    assert (tie.index, tie.line, tie.to, tie.source, tie.ops) == (
        0, 16, "lm_head.kernel", "embed.embedding", (Transpose((1, 0)),))
    assert tie.label() == "tie 1 (line 16, to 'lm_head.kernel')"
    assert load_mapping_text("version: 1\nmodel: m\nrules: [{from: a, to: b}]\n").ties == ()


def test_every_new_key_is_validated_with_lines() -> None:
    text = (
        "version: 1\n"                                                          # 1
        "model: m\n"                                                            # 2
        "rules:\n"                                                              # 3
        "  - from: '^a(\\d)$'\n"                                                # 4
        "    to: ['x.\\1', 3]\n"                                                # 5
        "    ops: [{split: {axis: 0, parts: 2}}]\n"                             # 6
        "  - from: '^b(\\d)$'\n"                                                # 7
        "    to: ['x.\\1', 'y.\\2']\n"                                          # 8
        "    ops: [{split: {axis: 0, parts: 2}}]\n"                             # 9
        "  - from: '^c$'\n"                                                     # 10
        "    to: [x, y]\n"                                                      # 11
        "    optional: 'yes'\n"                                                 # 12
        "  - from: '^d$'\n"                                                     # 13
        "    to: x\n"                                                           # 14
        "    ops:\n"                                                            # 15
        "      - {split: {axis: 0, parts: 2}}\n"                                # 16
        "  - from: '^e$'\n"                                                     # 17
        "    to: [x, y]\n"                                                      # 18
        "    ops:\n"                                                            # 19
        "      - {split: {axis: 0, parts: 2}}\n"                                # 20
        "      - {concat: {axis: 0}}\n"                                         # 21
        "      - {stack: {axis: 0}}\n"                                          # 22
        "      - {split: {axis: 0, parts: 2}}\n"                                # 23
        "  - from: '^f(\\d)$'\n"                                                # 24
        "    to: [x, y, z]\n"                                                   # 25
        "    ops: [{concat: {axis: 0, by: '\\2'}}, {split: {axis: 0, sizes: [1, 1]}}]\n"  # 26
        "  - from: '^g$'\n"                                                     # 27
        "    to: []\n"                                                          # 28
        "  - from: '^h$'\n"                                                     # 29
        "    to: x\n"                                                           # 30
        "    ops: [{split: {axes: 0}}]\n"                                       # 31
        "tie:\n"                                                                # 32
        "  - {to: 'lm_head.kernel', from: 'embed', ops: [{split: {axis: 0, parts: 2}}]}\n"  # 33
        "  - to: 'lm_head.kernel'\n"                                            # 34
        "    form: 'embed'\n"                                                   # 35
        "  - 7\n"                                                               # 36
        "  - {to: '', from: 3, ops: {transpose: [1, 0]}}\n"                     # 37
        "  - {to: a, from: b, ops: [{flip: 1}]}\n"                              # 38
    )
    problems = load_problems(text)
    r = [r"rule 1 (line 4, from '^a(\d)$')", r"rule 2 (line 7, from '^b(\d)$')",
         "rule 3 (line 10, from '^c$')", "rule 4 (line 13, from '^d$')", "rule 5 (line 17, from '^e$')",
         r"rule 6 (line 24, from '^f(\d)$')", "rule 7 (line 27, from '^g$')", "rule 8 (line 29, from '^h$')"]
    assert problems == [
        f"{r[0]}: 'to' list items must be non-empty target path strings, got int 3",
        f"{r[1]}: invalid target template 'y.\\2': invalid group reference 2 at position 3",
        f"{r[2]}: line 12: 'optional' must be true or false, got a string",
        f"{r[2]}: 'to' is a list of 2 targets but the rule has no split op; use a single target, or add "
        "{split: {axis: A, parts: 2}}",
        f"{r[3]}: line 16: a split gives several tensors, so 'to' must be a list of targets, one per part",
        f"{r[4]}: line 22: a rule has at most one concat/stack op (ops 2, 3 are)",
        f"{r[4]}: line 23: a rule has at most one split op (ops 1, 4 are)",
        f"{r[4]}: line 20: op 1 (split) comes before op 3 (stack); a concat/stack must come before a split",
        f"{r[5]}: line 26: split(axis=0,sizes=1,1) gives 2 tensors but 'to' lists 3 targets",
        f"{r[5]}: line 26: op 1: invalid 'by' template '\\2': invalid group reference 2 at position 1",
        f"{r[6]}: 'to' must be a non-empty target path string (or a list of them for a split), "
        "got an empty list",
        f"{r[7]}: line 31: op 1: split: unknown argument 'axes' (did you mean 'axis'?); "
        "split takes axis, parts, sizes",
        "tie 1 (line 33, to 'lm_head.kernel'): op 1: a tie takes one-tensor ops only (transpose, reshape), "
        "not split",
        "tie 2 (line 34, to 'lm_head.kernel'): line 35: unknown key 'form' (did you mean 'from'?); "
        "a tie has to, from, ops, shard",
        "tie 2 (line 34, to 'lm_head.kernel'): 'from' must be a non-empty target path string, got nothing",
        "tie 2 (line 34, to 'lm_head.kernel'): target 'lm_head.kernel' is already tied by "
        "tie 1 (line 33, to 'lm_head.kernel')",
        "tie 3 (line 36): a tie is a mapping with 'to' and 'from', got int 7",
        "tie 4 (line 37, to ''): 'to' must be a non-empty target path string, got a string",
        "tie 4 (line 37, to ''): 'from' must be a non-empty target path string, got int 3",
        "tie 4 (line 37, to ''): 'ops' must be a list like [{transpose: [1, 0]}], got a mapping",
        "tie 5 (line 38, to 'a'): op 1: unknown op 'flip'; "
        "known ops: concat, reshape, split, stack, transpose",
    ]


@pytest.mark.parametrize(
    ("tail", "fragment"),
    [("tie: {to: a, from: b}\n", "line 4: 'tie' must be a list of {to: TARGET, from: TARGET} entries, "
                                 "got a mapping"),
     ("tie:\n  - {to: a, from: b, ops: [{transpose: [1, 0]}, {concat: {axis: 0}}]}\n",
      "tie 1 (line 5, to 'a'): op 2: a tie takes one-tensor ops only (transpose, reshape), not concat"),
     ("tie:\n  - {to: a}\n", "tie 1 (line 5, to 'a'): 'from' must be a non-empty target path string"),
     ("ties: []\n", "line 4: unknown key 'ties' (did you mean 'tie'?)")],
)
def test_single_tie_problem(tail: str, fragment: str) -> None:
    problems = load_problems("version: 1\nmodel: m\nrules: [{from: a, to: b}]\n" + tail)
    assert problems == [problems[0]] and fragment in problems[0], problems


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [("{from: a, to: b, optional: 1}", "'optional' must be true or false, got int 1"),
     ("{from: a, to: b, optional: null}", "'optional' must be true or false, got nothing"),
     ("{from: a, to: [b, c], ops: [{split: {axis: 0, parts: 3}}]}",
      "split(axis=0,parts=3) gives 3 tensors but 'to' lists 2 targets"),
     ("{from: a, to: [b, ''], ops: [{split: {axis: 0, parts: 2}}]}", "'to' list items must be non-empty"),
     ("{from: a, to: b, ops: [{concat: {axis: 0}}, {concat: {axis: 0}}]}",
      "at most one concat/stack op (ops 1, 2 are)"),
     ("{from: a, to: b, ops: [{concat: {axis: 0, by: '\\g<x>'}}]}", "invalid 'by' template"),
     ("{from: a, to: b, optinal: true}", "unknown key 'optinal' (did you mean 'optional'?)")],
)
def test_single_rule_problem(rule: str, fragment: str) -> None:
    problems = load_problems(f"version: 1\nmodel: m\nrules: [{rule}]\n")
    assert len(problems) == 1 and fragment in problems[0], problems
    assert problems[0].startswith("rule 1 (line 3"), problems


# -------------------------------------------------------------------------------------------------- docs

DOCS = ROOT / "docs" / "mappings.md"


def doc_blocks() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", DOCS.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_docs_yaml_examples_load() -> None:
    """Every ```yaml block of docs/mappings.md is a complete mapping that loads (the docs cannot rot)."""
    blocks = doc_blocks()
    assert len(blocks) >= 10
    for i, block in enumerate(blocks):
        try:
            mapping = load_mapping_text(block, name=f"docs/mappings.md yaml block {i + 1}")
        except MappingError as e:
            pytest.fail(str(e))
        assert mapping.rules


def test_readme_yaml_example_loads() -> None:
    readme = ROOT / "README.md"
    (block,) = re.findall(r"^```yaml\n(.*?)^```", readme.read_text(encoding="utf-8"), flags=re.S | re.M)
    mapping = load_mapping_text(block, name="README.md")
    assert mapping.model == "gpt2" and len(mapping.rules) == 2 and len(mapping.ties) == 1


def test_docs_worked_examples_plan() -> None:
    """The doc's worked examples, applied to the shapes they state, give the shapes they state."""
    blocks = {b.split("\n", 1)[0]: b for b in doc_blocks()}
    checks: list[tuple[str, dict[str, TensorSpec], dict[str, TensorSpec], dict[str, Any]]] = [
        ("# conv", {"embedder.convolution.weight": spec(64, 3, 7, 7)},
         {"stem.conv.kernel": spec(7, 7, 3, 64)}, {}),
        ("# linear", {"classifier.weight": spec(1000, 2048), "classifier.bias": spec(1000)},
         {"classifier.kernel": spec(2048, 1000), "classifier.bias": spec(1000)}, {}),
        ("# heads", {"encoder.layer.0.attention.self.query.weight": spec(768, 768)},
         {"layers.0.attn.query.kernel": spec(768, 12, 64)}, {"hidden_size": 768, "num_attention_heads": 12}),
        ("# gpt2", {"h.0.attn.c_attn.weight": spec(768, 2304), "h.0.attn.c_attn.bias": spec(2304)},
         {f"layers.0.attn.{p}.{w}": spec(768, 768) if w == "kernel" else spec(768)
          for p in ("q", "k", "v") for w in ("kernel", "bias")}, {}),
        ("# vit", {f"vit.encoder.layer.0.attention.attention.{p}.weight": spec(768, 768)
                   for p in ("query", "key", "value")}, {"layers.0.attn.qkv.kernel": spec(768, 2304)}, {}),
        ("# scan", {f"encoder.layer.{i}.output.dense.weight": spec(768, 3072) for i in range(12)},
         {"layers.mlp.out.kernel": spec(12, 3072, 768)}, {}),
        ("# tied", {"transformer.wte.weight": spec(50257, 768), "lm_head.weight": spec(50257, 768)},
         {"embed.embedding": spec(50257, 768)}, {}),
        ("# tied", {"transformer.wte.weight": spec(50257, 768)},
         {"embed.embedding": spec(50257, 768), "lm_head.kernel": spec(768, 50257)}, {}),
        ("# optional", {"bert.pooler.dense.weight": spec(768, 768)}, {}, {}),
        ("# gqa", {"model.layers.0.self_attn.qkv_proj.weight": spec(64, 32)},
         {"layers.0.attn.q.kernel": spec(32, 32), "layers.0.attn.k.kernel": spec(32, 16),
          "layers.0.attn.v.kernel": spec(32, 16)},
         {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}),
    ]
    for head, srcs, tgts, config in checks:
        result = analyze(load_mapping_text(blocks[head]), srcs, tgts, config)
        assert result.ok, (head, result.problems)
        for a in result.assignments:
            shapes = infer_ops(a.ops, [s.shape for s in a.source_specs] or [tgts[a.tied_from or ""].shape])
            assert shapes == [s.shape for s in a.target_specs]


def test_ops_round_trip_reshape_example() -> None:
    """The per-head reshape of the docs, on values: [out, in] -> [in, heads, head_dim]."""
    w = random((8, 8), 5)
    (out,) = apply_ops([Transpose((1, 0)), Reshape((8, 2, 4))], [w])
    np.testing.assert_array_equal(out[:, 1, :], w.T[:, 4:])
    (stacked,) = apply_ops([Stack(0)], [w, w.T])
    np.testing.assert_array_equal(stacked[1], w.T)


# ------------------------------------------------------------------------------------------ property test

@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 12), d=st.integers(1, 4), seed=st.integers(0, 2**16), shuffle=st.randoms())
def test_gather_split_stack_and_tie_values(layers: int, d: int, seed: int, shuffle: Any) -> None:
    """Per-layer q/k/v [d, d] -> concat of transposes -> split q | kv; layers stacked; a tied copy."""
    text = r"""version: 1
model: m
rules:
  - from: '^l\.(\d+)\.(q|k|v)$'
    to: ['q.\1', 'kv.\1']
    ops: [{transpose: [1, 0]}, {concat: {axis: 1, by: '\2', order: [q, k, v]}},
          {split: {axis: 1, sizes: [d, 2 * d]}}]
  - from: '^w\.(\d+)$'
    to: 'stacked'
    ops: [{reshape: [d, -1]}, {stack: {axis: 0, by: '\1'}}]
tie:
  - {to: 'copy', from: 'stacked', ops: [{reshape: [-1]}]}
"""
    rng = np.random.default_rng(seed)
    arrays = {f"l.{i}.{p}": rng.standard_normal((d, d)).astype(np.float32)
              for i in range(layers) for p in "qkv"}
    arrays |= {f"w.{i}": rng.standard_normal(d * 3).astype(np.float32) for i in range(layers)}
    keys = list(arrays)
    shuffle.shuffle(keys)
    sources = {k: spec(*arrays[k].shape) for k in keys}
    targets = {**{f"q.{i}": spec(d, d) for i in range(layers)},
               **{f"kv.{i}": spec(d, 2 * d) for i in range(layers)},
               "stacked": spec(layers, d, 3), "copy": spec(layers * d * 3)}
    result = analyze(load_mapping_text(text), sources, targets, {"d": d})
    values = materialize(result, arrays)
    assert result.assignments[-1].tied_from == "stacked"
    for i in range(layers):
        fused = np.concatenate([arrays[f"l.{i}.{p}"].T for p in "qkv"], axis=1)
        np.testing.assert_array_equal(values[f"q.{i}"], fused[:, :d])
        np.testing.assert_array_equal(values[f"kv.{i}"], fused[:, d:])
    stacked = np.stack([arrays[f"w.{i}"].reshape(d, -1) for i in range(layers)])
    np.testing.assert_array_equal(values["stacked"], stacked)
    np.testing.assert_array_equal(values["copy"], stacked.ravel())


def test_split_targets_must_differ() -> None:
    (problem,) = load_problems("version: 1\nmodel: m\nrules:\n  - {from: a, to: [x, x], "
                               "ops: [{split: {axis: 0, parts: 2}}]}\n")
    assert problem == "rule 1 (line 4, from 'a'): 'to' lists 'x' more than once"
    rules = r"""  - from: '^(\w)(\w)$'
    to: ['t.\1', 't.\2']
    ops: [{split: {axis: 0, parts: 2}}]
"""
    tgts = {"t.a": spec(1), "t.b": spec(1), "t.c": spec(1)}
    result = analysis_of(rules, {"ab": spec(2), "cc": spec(2)}, tgts)
    assert result.problems == (
        r"rule 1 (line 4, from '^(\w)(\w)$'): key 'cc': 'to' expands to target 't.c' more than once "
        "('t.c', 't.c')",)
    assert rows(result)["cc"].status == "bad-target" and result.unfilled == ()


def _checked(mapping: Any, *args: Any) -> Any:
    """The assignments of ``mapping`` over sources / targets / config, or its MappingError."""
    return analyze(mapping, *args).checked(mapping.where)
