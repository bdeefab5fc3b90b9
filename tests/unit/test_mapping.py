"""nnxport.mapping (schema, analysis): loading and validating mapping YAML, planning over fake sources and
targets, selection."""

from __future__ import annotations

import hashlib
import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnxport.errors import MappingError
from nnxport.mapping.analysis import Analysis, TensorSpec, analyze
from nnxport.mapping.ops import Reshape, Transpose, infer_ops
from nnxport.mapping.schema import Mapping, load_mapping_file, load_mapping_text, select_mapping
from tests.helpers import spec

# Rule numbers and lines below are relied on by the tests.
TINY = r"""version: 1
model: tiny
match: {model_type: tiny}
ignore:
  - '\.position_ids$'
rules:
  - from: '^enc\.layers\.(\d+)\.attn\.weight$'
    to: 'layers.\1.attn.kernel'
    ops: [{reshape: [num_heads, hidden // num_heads, -1]}]
  - from: '^enc\.layers\.(?P<i>\d+)\.norm\.(weight|bias)$'
    to: 'layers.\g<i>.norm.\2'
  - from: '^head\.weight$'
    to: 'head.kernel'
    ops: [{transpose: [1, 0]}]
  - from: '^head\.bias$'
    to: 'head.bias'
"""
CONFIG = {"model_type": "tiny", "num_heads": 2, "hidden": 8}
RULE1 = r"rule 1 (line 7, from '^enc\.layers\.(\d+)\.attn\.weight$')"
RULE3 = r"rule 3 (line 12, from '^head\.weight$')"
RULE4 = r"rule 4 (line 15, from '^head\.bias$')"


def sources() -> dict[str, TensorSpec]:
    out = {"enc.position_ids": spec(1, 10, dtype="int64"), "head.weight": spec(3, 6), "head.bias": spec(3)}
    for i in range(2):
        out[f"enc.layers.{i}.attn.weight"] = spec(8, 6)
        out[f"enc.layers.{i}.norm.weight"] = spec(6)
        out[f"enc.layers.{i}.norm.bias"] = spec(6)
    return out


def targets() -> dict[str, TensorSpec]:
    """In model order (not sorted): assignments follow this order."""
    out: dict[str, TensorSpec] = {}
    for i in range(2):
        out[f"layers.{i}.attn.kernel"] = spec(2, 4, 6)
        out[f"layers.{i}.norm.weight"] = spec(6)
        out[f"layers.{i}.norm.bias"] = spec(6)
    out["head.kernel"] = spec(6, 3)
    out["head.bias"] = spec(3)
    return out


def load_problems(text: str) -> list[str]:
    with pytest.raises(MappingError) as err:
        load_mapping_text(text, name="m")
    assert err.value.where == "m"
    return err.value.problems


def analysis_of(text: str = TINY, srcs: dict[str, TensorSpec] | None = None,
                tgts: dict[str, TensorSpec] | None = None, config: dict[str, Any] | None = None) -> Analysis:
    return analyze(load_mapping_text(text, name="tiny"), sources() if srcs is None else srcs,
                   targets() if tgts is None else tgts, CONFIG if config is None else config)


# ------------------------------------------------------------------------------------------------ loading

def test_load_fields_and_sha256() -> None:
    m = load_mapping_text(TINY, name="tiny")
    assert (m.name, m.path, m.version, m.model, m.match) == ("tiny", None, 1, "tiny", {"model_type": "tiny"})
    assert m.text == TINY and m.sha256 == hashlib.sha256(TINY.encode("utf-8")).hexdigest()
    assert load_mapping_text(TINY + "# changed\n").sha256 != m.sha256
    assert [p.pattern for p in m.ignore] == [r"\.position_ids$"]
    assert [(r.index, r.line, r.target) for r in m.rules] == [
        (0, 7, r"layers.\1.attn.kernel"), (1, 10, r"layers.\g<i>.norm.\2"), (2, 12, "head.kernel"),
        (3, 15, "head.bias")]
    assert m.rules[2].ops == (Transpose((1, 0)),) and m.rules[1].ops == ()
    assert m.rules[0].label() == RULE1 and m.rules[3].label() == RULE4
    assert load_mapping_text(TINY).name == "<stdin>"


def test_load_file_uses_stem_and_path(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY, encoding="utf-8")
    m = load_mapping_file(path)
    assert (m.name, m.path, m.text) == ("tiny", path, TINY)


def test_load_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(MappingError, match=r"nope\.yaml: cannot read mapping file") as err:
        load_mapping_file(missing)
    assert err.value.where == str(missing)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(MappingError, match=r"bin.yaml: not UTF-8 text"):
        load_mapping_file(binary)
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("version: 1", "version: 7"))
    with pytest.raises(MappingError, match=r"bad.yaml: line 1: unsupported version 7") as err:
        load_mapping_file(bad)
    assert err.value.where == str(bad)


def test_yaml_syntax_error_has_line_and_column() -> None:
    (problem,) = load_problems(TINY.replace("    to: 'head.bias'", "    to: ['head.bias'"))
    assert problem.startswith("invalid YAML at line 17, column 1:"), problem
    (problem,) = load_problems("version: 1\nmodel: x\n  rules: 3\n")
    assert problem.startswith("invalid YAML at line 3, column 8:"), problem
    (problem,) = load_problems("version: 1\x00\n")
    assert problem.startswith("invalid YAML at line 1, column 11:") and "\n" not in problem, problem


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "a mapping file is a YAML mapping with keys version, model, rules; got nothing"),
     ("- 1\n- 2\n", "got a list"), ("just text\n", "got a string"), ("3\n", "got int 3"),
     ("a: 1\n---\nb: 2\n",
      "invalid YAML at line 2, column 1: expected a single document in the stream: but found another")],
)
def test_document_of_the_wrong_shape(text: str, fragment: str) -> None:
    (problem,) = load_problems(text)
    assert fragment in problem


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("version: !!int 1.5\n", "line 1, column 10: cannot read '1.5' as int (invalid literal"),
     ("version: 1\nmodel: !!timestamp x\n", "line 2, column 8: cannot read 'x' as timestamp"),
     ("version: 1\nx: 2001-02-30\n", "line 2, column 4: cannot read '2001-02-30' as timestamp (day is"),
     ("x: !!bool maybe\n", "cannot read 'maybe' as bool"), ("x: !!float ''\n", "cannot read '' as float"),
     ("x: " + "9" * 5000 + "\n", "as int (Exceeds the limit"),
     ("x: " + "[" * 5000 + "\n", "nested too deeply"),
     ("x: &a [*a]\nrules: *a\n", "line 1, column 8: alias *a refused")],
)
def test_malformed_yaml_values_are_mapping_errors(text: str, fragment: str) -> None:
    problems = load_problems(text)
    assert fragment in problems[0], problems


def test_all_load_problems_reported_together_with_lines() -> None:
    text = (
        "version: 2\n"                                         # 1
        "modle: tiny\n"                                        # 2
        "match: {model_type: [a, {b: 1}]}\n"                   # 3
        "ignore:\n"                                            # 4
        "  - '(unclosed'\n"                                    # 5
        "  - 3\n"                                              # 6
        "rules:\n"                                             # 7
        "  - from: '^a(\\d)$'\n"                               # 8
        "    to: 'x.\\2'\n"                                    # 9
        "  - from: '^b(?P<n>\\d)$'\n"                          # 10
        "    to: 'y.\\g<m>'\n"                                 # 11
        "    ops:\n"                                           # 12
        "      - {flip: [0]}\n"                                # 13
        "      - {transpos: [1, 0]}\n"                         # 14
        "      - {transpose: [0, 0]}\n"                        # 15
        "      - {reshape: [\"__import__('os')\", -1]}\n"      # 16
        "      - transpose\n"                                  # 17
        "  - from: '[z'\n"                                     # 18
        "    too: 'z'\n"                                       # 19
        "  - 42\n"                                             # 20
        "  - {to: 'w'}\n"                                      # 21
        "  - {from: 1, to: ''}\n"                              # 22
        "  - {from: 'q', to: 'q', ops: {transpose: [1, 0]}}\n"  # 23
        "  - {from: 'r', to: 'r', to: 's'}\n"                  # 24
    )
    problems = load_problems(text)
    r1 = r"rule 1 (line 8, from '^a(\d)$')"
    r2 = r"rule 2 (line 10, from '^b(?P<n>\d)$')"
    r3 = "rule 3 (line 18, from '[z')"
    expected = [
        "line 24: duplicate key 'to'",
        "line 2: unknown key 'modle' (did you mean 'model'?); "
        "a mapping has version, model, match, ignore, rules, tie",
        "missing required key 'model'",
        "line 1: unsupported version 2 (this nnxport reads version 1)",
        "line 3: match 'model_type' must be a value or a list of values, got a list",
        "line 5: ignore pattern '(unclosed' is not a valid regex: "
        "missing ), unterminated subpattern at position 0",
        "line 6: ignore pattern 2 must be a regex string, got int 3",
        rf"{r1}: invalid target template 'x.\2': invalid group reference 2 at position 3",
        rf"{r2}: invalid target template 'y.\g<m>': unknown group name 'm'",
        f"{r2}: line 13: op 1: unknown op 'flip'; known ops: concat, reshape, split, stack, transpose",
        f"{r2}: line 14: op 2: unknown op 'transpos' (did you mean 'transpose'?); "
        "known ops: concat, reshape, split, stack, transpose",
        f"{r2}: line 15: op 3: transpose [0, 0] is not a permutation of 0..1",
        f"{r2}: line 16: op 4: expression \"__import__('os')\" may only use config names, integers, "
        "+ - * // and parentheses (found Call)",
        f"{r2}: line 17: op 5: an op is a one-key mapping like {{transpose: [1, 0]}}, got 'transpose'",
        f"{r3}: line 19: unknown key 'too' (did you mean 'to'?); a rule has from, to, ops, optional, shard",
        f"{r3}: invalid regex: unterminated character set at position 0",
        f"{r3}: 'to' must be a non-empty target path string (or a list of them for a split), "
        "got nothing",
        "rule 4 (line 20): a rule is a mapping with 'from' and 'to', got int 42",
        "rule 5 (line 21): 'from' must be a regex string, got nothing",
        "rule 6 (line 22): 'from' must be a regex string, got int 1",
        "rule 6 (line 22): 'to' must be a non-empty target path string (or a list of them for a split), "
        "got a string",
        "rule 7 (line 23, from 'q'): 'ops' must be a list like [{transpose: [1, 0]}], got a mapping",
    ]
    assert problems == expected
    with pytest.raises(MappingError) as err:
        load_mapping_text(text, name="m")
    assert str(err.value).splitlines()[0] == f"m: {len(expected)} problems"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("version: 1\nmodel: x\n", "missing required key 'rules'"),
     ("version: 1\nmodel: x\nrules: []\n", "line 3: 'rules' must be a non-empty list"),
     ("version: 1\nmodel: x\nrules: {from: a, to: b}\n", "'rules' must be a non-empty list"),
     ("version: true\nmodel: x\nrules: [{from: a, to: b}]\n", "unsupported version True"),
     ("version: '1'\nmodel: x\nrules: [{from: a, to: b}]\n", "unsupported version '1'"),
     ("version: 1\nmodel: ''\nrules: [{from: a, to: b}]\n", "'model' must be a family name"),
     ("version: 1\nmodel: x\nmatch: [a]\nrules: [{from: a, to: b}]\n", "line 3: 'match' must be a mapping"),
     ("version: 1\nmodel: x\nmatch: {1: a}\nrules: [{from: a, to: b}]\n",
      "'match' keys are config.json keys"),
     ("version: 1\nmodel: x\nignore: '\\.x$'\nrules: [{from: a, to: b}]\n",
      "line 3: 'ignore' must be a list of regexes, got a string"),
     ("version: 1\nmodel: x\nrules: [{from: a, to: b, ops: [{reshape: [-1, -1]}]}]\n", "at most one -1"),
     ("version: 1\nmodel: x\nrules: [{from: a, to: b, ops: [{reshape: [n / 2]}]}]\n", "found Div"),
     ("version: 1\nmodel: x\nrules: [{from: a, to: b, ops: [{transpose: [1, 0], reshape: [-1]}]}]\n",
      "one-key mapping"),
     ("version: 1\nmodel: x\nrules: [{from: a, to: b, ops: null}]\n", "'ops' must be a list"),
     ("version: 1\nmodel: x\nrules: [{from: a, to: b}]\nrules: [{from: a, to: b}]\n",
      "line 4: duplicate key"),
     ("version: 1\nmodel: x\n? [1]\n: 2\nrules: [{from: a, to: b}]\n", "found unhashable key")],
)
def test_single_load_problem(text: str, fragment: str) -> None:
    problems = load_problems(text)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_yaml_aliases_and_merge_keys_are_refused() -> None:
    # Aliases (and so merge keys) are refused: a few hundred bytes of nested aliases expand into billions
    # of nodes (issue 12). An anchor that nothing refers to is harmless and still accepted.
    text = ("version: 1\nmodel: x\nrules:\n  - &r {from: '^head\\.bias$', to: 'head.bias'}\n"
            "  - {<<: *r, from: '^h$', to: 'head.kernel'}\n")
    (problem,) = load_problems(text)
    assert problem.startswith("invalid YAML at line 5, column 10: alias *r refused"), problem
    m = load_mapping_text(text.split("  - {<<")[0])
    assert [(r.source, r.target, r.line) for r in m.rules] == [("^head\\.bias$", "head.bias", 4)]


# ------------------------------------------------------------------------------------------------ analysis

def test_valid_mapping_plans_every_key() -> None:
    m = load_mapping_text(TINY, name="tiny")
    result = analyze(m, sources(), targets(), CONFIG)
    assert result.ok and result.problems == () and result.unfilled == () and result.unused_rules == ()
    assert [k.key for k in result.keys] == sorted(sources())
    by_key = {k.key: k for k in result.keys}
    assert by_key["enc.position_ids"].status == "ignored" and by_key["enc.position_ids"].target is None
    attn = by_key["enc.layers.1.attn.weight"]
    assert (attn.status, attn.target, attn.ops, attn.target_shape, attn.problem, attn.rule) == (
        "mapped", "layers.1.attn.kernel", ("reshape(2,4,-1)",), (2, 4, 6), None, m.rules[0])
    assert by_key["head.weight"].ops == ("transpose(1,0)",) and by_key["head.weight"].target_shape == (6, 3)
    assigned = analyze(m, sources(), targets(), CONFIG).checked(m.where)
    assert assigned == result.assignments
    assert [(a.targets, a.sources) for a in assigned] == [
        (("layers.0.attn.kernel",), ("enc.layers.0.attn.weight",)),
        (("layers.0.norm.weight",), ("enc.layers.0.norm.weight",)),
        (("layers.0.norm.bias",), ("enc.layers.0.norm.bias",)),
        (("layers.1.attn.kernel",), ("enc.layers.1.attn.weight",)),
        (("layers.1.norm.weight",), ("enc.layers.1.norm.weight",)),
        (("layers.1.norm.bias",), ("enc.layers.1.norm.bias",)),
        (("head.kernel",), ("head.weight",)),
        (("head.bias",), ("head.bias",)),
    ]
    assert assigned[0].ops == (Reshape((2, 4, -1)),)  # config values substituted
    assert assigned[0].source_specs == (spec(8, 6),) and assigned[0].target_specs == (spec(2, 4, 6),)
    assert assigned[0].tied_from is None and attn.targets == ("layers.1.attn.kernel",)
    assert attn.target_shapes == ((2, 4, 6),)
    assert assigned[1].rule is m.rules[1]


def test_backrefs_numbered_named_and_unmatched_optional_group() -> None:
    text = ("version: 1\nmodel: x\nrules:\n"
            "  - from: '^(?P<block>\\w+)\\.(\\d+)(\\.extra)?\\.w$'\n    to: 'out.\\g<block>.\\2.k\\3'\n")
    m = load_mapping_text(text)
    result = analyze(m, {"blk.7.w": spec(1), "blk.8.extra.w": spec(1)},
                     {"out.blk.7.k": spec(1), "out.blk.8.k.extra": spec(1)}, None)
    assert result.ok, result.problems
    assert {(a.sources, a.targets) for a in result.assignments} == {
        (("blk.7.w",), ("out.blk.7.k",)), (("blk.8.extra.w",), ("out.blk.8.k.extra",))}


def test_unmatched_key_and_unfilled_targets() -> None:
    srcs = sources()
    del srcs["head.bias"]
    srcs["enc.extra"] = spec(2)
    tgts = {**targets(), "final.scale": spec(3)}
    result = analysis_of(srcs=srcs, tgts=tgts)
    assert result.problems == (
        "unmatched source key 'enc.extra' (no rule or ignore pattern matches)",
        "target 'head.bias' is not filled by any rule",
        "target 'final.scale' is not filled by any rule",
    )
    assert result.unfilled == ("head.bias", "final.scale") and not result.ok
    assert result.unused_rules == (load_mapping_text(TINY, name="tiny").rules[3],)
    (row,) = [k for k in result.keys if k.key == "enc.extra"]
    assert (row.status, row.target, row.problem) == ("unmatched", None, result.problems[0])
    assert len(result.assignments) == 7


def test_rule_wins_over_ignore_pattern() -> None:
    text = TINY.replace(r"'\.position_ids$'", r"'^head\.'")
    result = analysis_of(text, srcs={k: v for k, v in sources().items() if k != "enc.position_ids"})
    assert result.ok and {k.key: k.status for k in result.keys}["head.bias"] == "mapped"


def test_ambiguous_key_names_every_rule() -> None:
    text = TINY + "  - from: '^head\\.b'\n    to: 'head.bias'\n  - from: '^head'\n    to: 'head.bias'\n"
    result = analysis_of(text)
    rule5 = r"rule 5 (line 17, from '^head\.b')"
    rule6 = "rule 6 (line 19, from '^head')"
    assert result.problems == (
        f"ambiguous: key 'head.bias' matched by {RULE4}, {rule5} and {rule6}",
        f"ambiguous: key 'head.weight' matched by {RULE3} and {rule6}",
    )
    rows = {k.key: k for k in result.keys}
    assert rows["head.bias"].status == "ambiguous" and rows["head.bias"].target is None
    assert result.unfilled == ()  # the ambiguity is the problem, not "head.bias is not filled"


def test_ambiguity_over_layer_keys() -> None:
    result = analysis_of(TINY + "  - from: 'norm\\.bias$'\n    to: 'x'\n")
    assert [p.split(" matched")[0] for p in result.problems] == [
        "ambiguous: key 'enc.layers.0.norm.bias'", "ambiguous: key 'enc.layers.1.norm.bias'"]
    assert "rule 2 (line 10" in result.problems[0]
    assert "rule 5 (line 17, from 'norm\\.bias$')" in result.problems[0]


def test_target_missing_from_model_suggests_closest() -> None:
    result = analysis_of(TINY.replace("to: 'head.bias'", "to: 'head.bais'"))
    assert result.problems == (
        f"{RULE4}: target 'head.bais' (from key 'head.bias') does not exist in the model; "
        "closest: 'head.bias'",
        "target 'head.bias' is not filled by any rule",
    )
    row = next(k for k in result.keys if k.key == "head.bias")
    assert (row.status, row.target, row.problem) == ("bad-target", "head.bais", result.problems[0])
    far = analysis_of(TINY.replace("to: 'head.bias'", "to: 'zzzzzzzz'"))
    assert far.problems[0].endswith("does not exist in the model")


def test_backref_into_missing_layer_lists_up_to_three_close_targets() -> None:
    srcs = {**sources(), "enc.layers.9.norm.weight": spec(6)}
    result = analysis_of(srcs=srcs)
    (problem,) = result.problems
    assert problem.startswith("rule 2 (line 10, ") and "target 'layers.9.norm.weight' (from key " in problem
    closest = re.findall(r"'([^']+)'", problem.split("closest: ")[1])
    assert len(closest) == 3 and "layers.0.norm.weight" in closest and "layers.1.norm.weight" in closest


def test_target_filled_twice_names_both_keys() -> None:
    result = analysis_of(TINY.replace("to: 'head.bias'", "to: 'head.kernel'\n    ops: [{reshape: [3, 1]}]")
                         .replace("ops: [{transpose: [1, 0]}]", "ops: [{reshape: [-1, 1]}]"),
                         tgts={**targets(), "head.kernel": spec(3, 1)})
    assert result.problems == (
        f"shape mismatch: key 'head.weight' -> target 'head.kernel' ({RULE3}): "
        "source (3, 6) -> reshape(-1,1) -> (18, 1), expected (3, 1)",
        f"target 'head.kernel' is filled by 2 keys: 'head.bias' ({RULE4}) and 'head.weight' ({RULE3})",
        "target 'head.bias' is not filled by any rule",
    )
    rows = {k.key: k for k in result.keys}
    assert rows["head.bias"].status == rows["head.weight"].status == "duplicate-target"
    assert result.problems[1] in (rows["head.weight"].problem or "")
    assert "head.kernel" not in {t for a in result.assignments for t in a.targets}


def test_shape_mismatch_names_key_rule_shapes_and_ops() -> None:
    result = analysis_of(TINY.replace("    ops: [{transpose: [1, 0]}]\n", ""))
    (problem,) = result.problems
    assert problem == (f"shape mismatch: key 'head.weight' -> target 'head.kernel' ({RULE3}): "
                       "source (3, 6) -> no ops -> (3, 6), expected (6, 3)")
    row = next(k for k in result.keys if k.key == "head.weight")
    assert (row.status, row.target_shape, row.problem) == ("shape-mismatch", (3, 6), problem)


def test_op_failing_shape_inference_names_key_and_rule() -> None:
    srcs = {**sources(), "head.weight": spec(18)}
    result = analysis_of(srcs=srcs)
    assert result.problems == (
        f"{RULE3}: key 'head.weight' of shape (18,): transpose [1,0] needs a 2-d tensor, got shape (18,)",)
    row = next(k for k in result.keys if k.key == "head.weight")
    assert (row.status, row.target_shape, row.ops) == ("op-error", None, ("transpose(1,0)",))
    wrong_heads = analysis_of(config={**CONFIG, "num_heads": 3, "hidden": 9})
    assert len(wrong_heads.problems) == 2 and all(
        "reshape to (3, 3, -1) cannot take 48 elements (shape (8, 6))" in p for p in wrong_heads.problems)


def test_config_errors_name_rule_op_and_key_once() -> None:
    result = analysis_of(config={"model_type": "tiny", "num_heads": 2})
    assert result.problems == (
        f"{RULE1}: reshape(num_heads,hidden // num_heads,-1): config key 'hidden' is missing",)
    rows = [k for k in result.keys if k.status == "op-error"]
    assert [k.key for k in rows] == ["enc.layers.0.attn.weight", "enc.layers.1.attn.weight"]
    assert rows[0].ops == ("reshape(num_heads,hidden // num_heads,-1)",) and rows[0].target_shape is None
    assert result.unfilled == ()
    zero = analysis_of(config={**CONFIG, "num_heads": 0})
    assert zero.problems == (
        f"{RULE1}: reshape(num_heads,hidden // num_heads,-1): division by zero in 'hidden // num_heads'",)
    floaty = analysis_of(config={**CONFIG, "hidden": 8.0})
    assert "config key 'hidden' is 8.0, not an integer" in floaty.problems[0]
    unused = analysis_of(srcs={"head.weight": spec(3, 6), "head.bias": spec(3)},
                         tgts={"head.kernel": spec(6, 3), "head.bias": spec(3)}, config={"a": 1})
    assert unused.ok and unused.unused_rules[0].index == 0  # an unused rule's ops need not resolve


def test_unused_rule_is_a_warning_only() -> None:
    text = TINY + "  - from: '^never$'\n    to: 'nowhere'\n"
    result = analysis_of(text)
    assert result.ok
    (unused,) = result.unused_rules
    assert unused.index == 4 and unused.label() == "rule 5 (line 17, from '^never$')"


def test_plan_raises_with_every_problem_together() -> None:
    m = load_mapping_text(TINY.replace("to: 'head.bias'", "to: 'head.bais'")
                          .replace("    ops: [{transpose: [1, 0]}]\n", ""), name="tiny")
    srcs = {**sources(), "stray": spec(1)}
    with pytest.raises(MappingError) as err:
        analyze(m, srcs, targets(), CONFIG).checked(m.where)
    assert err.value.where == "tiny"
    problems = err.value.problems
    assert len(problems) == 4
    assert any("does not exist" in p for p in problems) and any("shape mismatch" in p for p in problems)
    assert any("unmatched source key 'stray'" in p for p in problems)
    assert "target 'head.bias' is not filled by any rule" in problems
    assert str(err.value).splitlines()[0] == "tiny: 4 problems"
    assert problems == list(analyze(m, srcs, targets(), CONFIG).problems)


# ------------------------------------------------------------------------------------------------ selection

def mapping(name: str, match: str) -> Mapping:
    return load_mapping_text(f"version: 1\nmodel: {name}\nmatch: {match}\nrules: [{{from: a, to: b}}]\n",
                             name=name)


CANDIDATES = [
    mapping("resnet", "{model_type: resnet}"),
    mapping("bert-mlm", "{model_type: [bert, roberta], architectures: BertForMaskedLM}"),
    mapping("bert-any", "{model_type: bert, architectures: [BertModel, BertForSequenceClassification]}"),
    load_mapping_text("version: 1\nmodel: custom\nrules: [{from: a, to: b}]\n", name="custom"),
]


@pytest.mark.parametrize(
    ("config", "name"),
    [({"model_type": "resnet"}, "resnet"),
     ({"model_type": "resnet", "architectures": ["ResNetForImageClassification"]}, "resnet"),
     ({"model_type": "roberta", "architectures": ["BertForMaskedLM"]}, "bert-mlm"),
     ({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}, "bert-any"),
     ({"model_type": "bert", "architectures": ["Other", "BertModel"]}, "bert-any")],
)
def test_select_mapping_by_model_type_and_architectures(config: dict[str, Any], name: str) -> None:
    assert select_mapping(config, CANDIDATES).name == name


def test_select_mapping_none_matches() -> None:
    config = {"model_type": "vit", "architectures": ["ViTModel"]}
    with pytest.raises(MappingError) as err:
        select_mapping(config, CANDIDATES)
    (problem,) = err.value.problems
    assert "model_type 'vit'" in problem and "ViTModel" in problem and "pass mapping NAME" in problem
    assert all(name in problem for name in ("resnet", "bert-mlm", "bert-any", "custom"))
    with pytest.raises(MappingError, match=r"no config\.json"):
        select_mapping(None, CANDIDATES)
    with pytest.raises(MappingError, match="architectures None"):
        select_mapping({"model_type": "bert"}, CANDIDATES)  # architectures required by both bert mappings


def test_select_mapping_several_match() -> None:
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM", "BertModel"]}
    with pytest.raises(MappingError) as err:
        select_mapping(config, CANDIDATES)
    (problem,) = err.value.problems
    assert "several mappings match" in problem and "bert-mlm, bert-any" in problem


def test_mapping_without_match_is_never_auto_selected() -> None:
    custom = CANDIDATES[-1]
    assert custom.match == {} and not custom.matches({"model_type": "anything"})
    assert not CANDIDATES[0].matches(None)


# ------------------------------------------------------------------------------------------------ fuzzing

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12),
                    st.sampled_from(["^a$", "(", "\\1", "x.\\1", "[", "num_heads", "-1", "__import__('os')"]))
KEYS = st.one_of(st.sampled_from(["from", "to", "ops", "transpose", "reshape", "version", "model", "match",
                                  "ignore", "rules", "model_type", "optional", "tie", "split", "concat",
                                  "stack", "axis", "parts", "sizes", "by", "order"]), st.text(max_size=6))
YAMLISH = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=20)
EXPR = st.text(alphabet=string.ascii_lowercase + " +-*/()_0123456789", max_size=20)
GATHER = st.fixed_dictionaries(
    {}, optional={"axis": st.one_of(st.integers(-3, 3), SCALARS),
                  "by": st.one_of(st.sampled_from(["\\1", "\\2", "\\g<x>", ""]), SCALARS),
                  "order": st.one_of(st.lists(st.one_of(st.text(max_size=3), st.integers(0, 3)), max_size=3),
                                     YAMLISH)})
OP = st.one_of(st.fixed_dictionaries({"transpose": st.lists(st.integers(-1, 3), max_size=4)}),
               st.fixed_dictionaries({"reshape": st.lists(st.one_of(st.integers(-3, 9), EXPR), max_size=4)}),
               st.fixed_dictionaries({"split": st.fixed_dictionaries(
                   {}, optional={"axis": st.one_of(st.integers(-3, 3), SCALARS),
                                 "parts": st.one_of(st.integers(-1, 4), EXPR, SCALARS),
                                 "sizes": st.one_of(st.lists(st.one_of(st.integers(-1, 4), EXPR), max_size=3),
                                                    YAMLISH)})}),
               st.sampled_from(["concat", "stack"]).flatmap(lambda n: st.fixed_dictionaries({n: GATHER})),
               YAMLISH)
RULE = st.one_of(st.fixed_dictionaries({"from": st.one_of(st.text(max_size=10), SCALARS),
                                        "to": st.one_of(st.text(max_size=10), SCALARS,
                                                        st.lists(st.text(max_size=6), max_size=3))},
                                       optional={"ops": st.one_of(st.lists(OP, max_size=3), YAMLISH),
                                                 "optional": st.one_of(st.booleans(), SCALARS)}),
                 YAMLISH)
TIE_ENTRY = st.one_of(st.fixed_dictionaries({"to": st.one_of(st.text(max_size=6), SCALARS),
                                             "from": st.one_of(st.text(max_size=6), SCALARS)},
                                            optional={"ops": st.one_of(st.lists(OP, max_size=2), YAMLISH)}),
                      YAMLISH)
DOC = st.fixed_dictionaries(
    {},
    optional={"version": st.one_of(st.just(1), SCALARS), "model": st.one_of(st.just("m"), SCALARS),
              "match": st.one_of(st.dictionaries(st.text(max_size=5), YAMLISH, max_size=3), YAMLISH),
              "ignore": st.one_of(st.lists(st.text(max_size=8), max_size=3), YAMLISH),
              "rules": st.one_of(st.lists(RULE, max_size=4), YAMLISH),
              "tie": st.one_of(st.lists(TIE_ENTRY, max_size=3), YAMLISH), "extra": YAMLISH},
)


def _only_mapping_errors(text: str) -> None:
    try:
        m = load_mapping_text(text, name="fuzz")
    except MappingError as e:
        assert e.problems and all(isinstance(p, str) and "\n" not in p for p in e.problems)
    else:
        assert isinstance(m, Mapping) and m.version == 1 and m.rules


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    _only_mapping_errors(text)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(DOC, YAMLISH))
def test_fuzz_yaml_structures(doc: object) -> None:
    _only_mapping_errors(yaml.safe_dump(doc, allow_unicode=True))


LINES = [
    "version: 1", "model: m", "rules:", "  - from: 'a(b)'", "    to: 'x.\\1'",
    "    ops: [{transpose: [1, 0]}]", "  - {from: '[', to: 1}", "match: {a: [1]}", "ignore: ['(']",
    "&a [*a]", "x: &a [*a]", "- ", ": :", "'", "\t", "{", "!!set", "!!python/object:os.system", "? [1]",
    "<<: 3", "d: 2001-02-30", "n: 0x" + "f" * 9000,
    "r: !!binary '%%'", "---", "...", "%YAML 1.1", "a: !!timestamp x", "a: !!int 1.5", "a: !!bool x",
    "a: !!float",
    "a: !!omap [1]", "    - b", "  - {from: 'x', to: 'y', ops: [{reshape: ['a b', -1]}]}",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=12))
def test_fuzz_yaml_line_soup(lines: list[str]) -> None:
    _only_mapping_errors("\n".join(lines) + "\n")


RULE_POOL = [
    ("^s\\.(\\w)\\.(\\d)$", "'\\1.\\2'", ""),
    ("^s\\.a\\.(\\d)$", "'a.\\1'", "[{transpose: [1, 0]}]"),
    ("^s\\.b", "'b.0'", "[{reshape: [-1]}]"),
    ("^s\\.c\\.(\\d)$", "'c.\\1'", "[{reshape: [n, -1]}]"),
    ("\\.9$", "zz", ""),
    ("^s\\.(\\w)\\.(\\d)$", "'\\1.0'", "[{stack: {axis: 0}}]"),
    ("^s\\.(a|b)\\.(\\d)$", "'c.\\2'", "[{concat: {axis: -1, by: '\\1', order: [a, b]}}]"),
    ("^s\\.c\\.(\\d)$", "['a.\\1', 'b.\\1']", "[{split: {axis: 0, parts: 2}}]"),
    ("^s\\.c\\.(\\d)$", "['a.\\1', 'b.\\1']", "[{split: {axis: 0, sizes: [n, 2]}}]"),
    ("^s\\.b\\.(\\d)$", "'b.\\1'", "[{transpose: [1, 0]}]\n    optional: true"),
]
NAMES = [f"{g}.{i}" for g in "abc" for i in (0, 1, 9)]
SHAPES = st.sampled_from([(2, 3), (2, 2), (4,), (2,), (1, 2, 2), (2, 4), (2, 2, 2)])
TIES = ["  - {to: 'a.0', from: 'b.0'}\n", "  - {to: 'b.1', from: 'a.1', ops: [{transpose: [1, 0]}]}\n",
        "  - {to: 'c.9', from: 'c.1', ops: [{reshape: [n, -1]}]}\n", "  - {to: 'a.9', from: 'b.9'}\n"]


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(st.sampled_from(RULE_POOL), min_size=1, max_size=4, unique=True),
       srcs=st.dictionaries(st.sampled_from([f"s.{n}" for n in NAMES]), SHAPES, max_size=6),
       tgts=st.dictionaries(st.sampled_from(NAMES), SHAPES, max_size=6),
       ignore=st.booleans(), config=st.sampled_from([None, {}, {"n": 2}, {"n": 0}]),
       ties=st.lists(st.sampled_from(TIES), unique=True, max_size=3))
def test_analysis_invariants(rules: list[tuple[str, str, str]], srcs: dict[str, tuple[int, ...]],
                             tgts: dict[str, tuple[int, ...]], ignore: bool,
                             config: dict[str, int] | None, ties: list[str]) -> None:
    text = "version: 1\nmodel: m\n" + ("ignore: ['1$']\n" if ignore else "") + "rules:\n" + "".join(
        f"  - from: '{f}'\n    to: {t}\n" + (f"    ops: {o}\n" if o else "") for f, t, o in rules)
    text += ("tie:\n" + "".join(ties)) if ties else ""
    m = load_mapping_text(text)
    sources_ = {k: spec(*v) for k, v in srcs.items()}
    targets_ = {k: spec(*v) for k, v in tgts.items()}
    result = analyze(m, sources_, targets_, config)
    assert [k.key for k in result.keys] == sorted(srcs)
    assert result.ok == (result.problems == ())
    assigned = [t for a in result.assignments for t in a.targets]
    read = [k for a in result.assignments for k in a.sources]
    assert len(assigned) == len(set(assigned)) and len(read) == len(set(read))
    assert sorted(read) == sorted(k.key for k in result.keys if k.status == "mapped")
    position = {t: i for i, t in enumerate(tgts)}
    first = [min(position[t] for t in a.targets) for a in result.assignments if a.tied_from is None]
    assert first == sorted(first)  # model order (of each assignment's earliest target), tie fills after
    assert all(a.tied_from is not None for a in result.assignments[len(first):])
    for i, a in enumerate(result.assignments):
        if a.tied_from is None:
            shapes = [s.shape for s in a.source_specs]
            assert a.rule is not None and a.source_specs == tuple(sources_[k] for k in a.sources)
        else:
            shapes = [targets_[a.tied_from].shape]
            assert a.rule is None and a.sources == () and a.tied_from in {
                t for b in result.assignments[:i] for t in b.targets}  # filled before
        assert infer_ops(a.ops, shapes) == [targets_[t].shape for t in a.targets]
        assert a.target_specs == tuple(targets_[t] for t in a.targets)
    assert not set(result.unfilled) & set(assigned)
    for k in result.keys:
        assert (k.problem is not None) == (k.status not in ("mapped", "ignored", "tied"))
        assert all(p in (k.problem or "") for p in result.problems if f"key '{k.key}'" in p)
        assert (k.note is not None) == (k.status == "tied" or (k.status == "ignored" and k.rule is not None))
        if k.status == "tied":
            assert k.target in {t.to for t in m.ties} and k.target not in tgts
    for rule in result.unused_rules:
        assert not any(rule.pattern.search(k) for k in srcs)
    if result.ok:
        assert set(assigned) == set(tgts)
        assert analyze(m, sources_, targets_, config).checked(m.where) == result.assignments
    else:
        with pytest.raises(MappingError) as err:
            analyze(m, sources_, targets_, config).checked(m.where)
        assert tuple(err.value.problems) == result.problems
