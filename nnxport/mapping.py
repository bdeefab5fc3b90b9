"""Mapping files: YAML text -> validated rules -> a plan of which source key fills which model leaf.

Pure: no jax, no torch, and no I/O beyond :func:`load_mapping_file` reading its one file. Nothing here
sees tensor data, only shapes (:class:`TensorSpec`). Every problem found is collected and reported
together in one :class:`~nnxport.errors.MappingError`.

Matching semantics (see :func:`analyze`): each source key is tried against every rule with
``re.search`` (authors anchor with ``^``/``$``). Exactly one rule must match; ``ignore`` patterns are
consulted only for keys that no rule matches, so a broad ignore list never competes with a rule. The
rule's ``to`` template is expanded with the match (``\\1``, ``\\g<name>``) into a dotted target path.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nnxport.errors import MappingError
from nnxport.ops import Op, OpError, parse_op, show_value

__all__ = [
    "Analysis",
    "Assignment",
    "KeyReport",
    "Mapping",
    "Rule",
    "TensorSpec",
    "analyze",
    "load_mapping_file",
    "load_mapping_text",
    "plan",
    "select_mapping",
]

VERSION = 1
TOP_KEYS = ("version", "model", "match", "ignore", "rules")
REQUIRED_KEYS = ("version", "model", "rules")
RULE_KEYS = ("from", "to", "ops")

Status = Literal["mapped", "ignored", "unmatched", "ambiguous", "bad-target", "duplicate-target",
                 "shape-mismatch", "op-error"]


def _text(s: str) -> str:
    """``s`` with control characters escaped, so that every message stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _q(s: str) -> str:
    return f"'{_text(s)}'"


def _at(line: int | None) -> str:
    return "" if line is None else f"line {line}: "


def _hint(word: object, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _rule_label(index: int, line: int | None, source: str | None) -> str:
    parts = ([] if line is None else [f"line {line}"]) + ([] if source is None else [f"from {_q(source)}"])
    return f"rule {index + 1}" + (f" ({', '.join(parts)})" if parts else "")


# ----------------------------------------------------------------------------------------------- model

@dataclass(frozen=True)
class Rule:
    """One ``from`` regex -> ``to`` template rule, with its ops (config references not yet resolved)."""

    index: int
    line: int | None
    source: str
    pattern: re.Pattern[str]
    target: str
    ops: tuple[Op, ...]

    def label(self) -> str:
        """How messages name the rule: ``rule 3 (line 14, from '^fc\\.weight$')`` (1-based number)."""
        return _rule_label(self.index, self.line, self.source)


@dataclass(frozen=True)
class Mapping:
    """A validated mapping file. ``text`` and ``sha256`` are recorded in the output manifest."""

    name: str
    path: Path | None
    text: str
    sha256: str
    version: int
    model: str
    match: dict[str, Any] = field(hash=False)
    ignore: tuple[re.Pattern[str], ...]
    rules: tuple[Rule, ...]

    def matches(self, config: MappingABC[str, Any] | None) -> bool:
        """Whether ``config`` (config.json) satisfies every ``match`` entry.

        A list value means "any of"; for ``architectures`` it is enough that one wanted architecture is
        in ``config["architectures"]``. A mapping without ``match`` entries is never picked automatically.
        """
        if config is None or not self.match:
            return False
        for key, wanted in self.match.items():
            options = wanted if isinstance(wanted, list) else [wanted]
            if key not in config:
                return False
            have = config[key]
            if key == "architectures":
                archs = have if isinstance(have, list) else [have]
                if not any(a in archs for a in options):
                    return False
            elif have not in options:
                return False
        return True


# ------------------------------------------------------------------------------------------------ YAML

class _Dict(dict[Any, Any]):
    """A YAML mapping that remembers the 1-based line of each key."""

    key_lines: dict[Any, int]


class _List(list[Any]):
    """A YAML sequence that remembers the 1-based line of each item."""

    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    """SafeLoader building :class:`_Dict` / :class:`_List` and noting duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[_Dict]:
    data = _Dict()
    data.key_lines = {}
    yield data
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if (key_node.tag, key_node.value) in seen:
                loader.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key "
                                         f"{show_value(key_node.value)}")
            seen.add((key_node.tag, key_node.value))
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                    "found unhashable key", key_node.start_mark) from None
        data[key] = loader.construct_object(value_node)
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Iterator[_List]:
    data = _List()
    data.item_lines = [item.start_mark.line + 1 for item in node.value]
    yield data
    data.extend(loader.construct_sequence(node))


def _strict(construct: Callable[[_Loader, yaml.Node], object]) -> Callable[[_Loader, yaml.Node], object]:
    """A scalar constructor that reports bad values (``!!int 1.5``, ``2001-02-30``) as YAML errors.

    PyYAML's own raise ValueError, KeyError, AttributeError, ... for them.
    """

    def construct_strictly(loader: _Loader, node: yaml.Node) -> object:
        try:
            return construct(loader, node)
        except yaml.YAMLError:
            raise
        except Exception as e:
            why = f" ({e})" if type(e) is ValueError else ""
            problem = f"cannot read {show_value(node.value)} as {node.tag.rsplit(':', 1)[-1]}{why}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

    return construct_strictly


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
for _tag in [f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "binary", "timestamp")]:
    _Loader.add_constructor(_tag, _strict(yaml.SafeLoader.yaml_constructors[_tag]))


def _yaml_error(text: str, e: Exception) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        what = f"{e.context}: {e.problem}" if e.context else e.problem
        return _text(f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}")
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return _text(f"invalid YAML at line {line}, column {column}: {e.reason} (character {e.character!r})")
    if isinstance(e, RecursionError):
        return "invalid YAML: nested too deeply"
    return f"invalid YAML: {_text(str(e))}"


def _parse_yaml(text: str, where: str) -> tuple[object, list[str]]:
    """The YAML document (``None`` if empty) and its duplicate-key problems; MappingError if unparsable."""
    try:
        loader = _Loader(text)
        try:
            return loader.get_single_data(), loader.duplicates
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise MappingError(where, [_yaml_error(text, e)]) from None


def _key_line(d: object, key: object) -> int | None:
    return d.key_lines.get(key) if isinstance(d, _Dict) else None


def _item_line(seq: object, i: int) -> int | None:
    return seq.item_lines[i] if isinstance(seq, _List) else None


def _other_line(line: int | None, rule_line: int | None) -> int | None:
    """``line`` unless it is the rule's own line (already in the rule's label)."""
    return None if line == rule_line else line


def _type(value: object) -> str:
    if isinstance(value, list) and not value:
        return "an empty list"
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}
    for t, name in names.items():
        if isinstance(value, t):
            return name
    return f"{type(value).__name__} {show_value(value)}"


# ---------------------------------------------------------------------------------------------- loading

def _compile(regex: str) -> re.Pattern[str] | str:
    """The compiled regex, or why it is not one."""
    try:
        return re.compile(regex)
    except (re.error, OverflowError, RecursionError) as e:
        return str(e)


def _check_template(pattern: re.Pattern[str], template: str) -> str | None:
    """Why ``template`` cannot be expanded by matches of ``pattern`` (bad backref or escape), or None."""
    names = {i: n for n, i in pattern.groupindex.items()}
    groups = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1))
    try:
        re.compile(groups).sub(template, "", count=1)
    except (re.error, IndexError) as e:
        return str(e)
    return None


def _load_rule(index: int, line: int | None, spec: object, problems: list[str]) -> Rule | None:
    if not isinstance(spec, dict):
        problems.append(f"{_rule_label(index, line, None)}: a rule is a mapping with 'from' and 'to', "
                        f"got {_type(spec)}")
        return None
    source = spec.get("from")
    label = _rule_label(index, line, source if isinstance(source, str) else None)
    n = len(problems)
    for key in spec:
        if key not in RULE_KEYS:
            at = _at(_other_line(_key_line(spec, key), line))
            problems.append(f"{label}: {at}unknown key {show_value(key)}{_hint(key, RULE_KEYS)}; "
                            f"a rule has {', '.join(RULE_KEYS)}")
    pattern: re.Pattern[str] | None = None
    if not isinstance(source, str):
        problems.append(f"{label}: 'from' must be a regex string, got {_type(source)}")
    elif isinstance(compiled := _compile(source), str):
        problems.append(f"{label}: invalid regex: {compiled}")
    else:
        pattern = compiled
    target = spec.get("to")
    if not isinstance(target, str) or not target:
        problems.append(f"{label}: 'to' must be a non-empty target path string, got {_type(target)}")
    elif pattern is not None and (why := _check_template(pattern, target)):
        problems.append(f"{label}: invalid target template {_q(target)}: {why}")
    ops: list[Op] = []
    op_specs = spec.get("ops", [])
    if not isinstance(op_specs, list):
        problems.append(f"{label}: 'ops' must be a list like [{{transpose: [1, 0]}}], got {_type(op_specs)}")
    else:
        for j, op_spec in enumerate(op_specs):
            try:
                ops.append(parse_op(op_spec))
            except OpError as e:
                problems.append(f"{label}: {_at(_other_line(_item_line(op_specs, j), line))}op {j + 1}: {e}")
    if len(problems) > n or pattern is None or not isinstance(target, str):
        return None
    return Rule(index, line, pattern.pattern, pattern, target, tuple(ops))


def _load_match(doc: dict[Any, Any], problems: list[str]) -> dict[str, Any]:
    match = doc.get("match", {})
    line = _key_line(doc, "match")
    if not isinstance(match, dict):
        problems.append(f"{_at(line)}'match' must be a mapping like {{model_type: resnet}}, "
                        f"got {_type(match)}")
        return {}
    scalars = (str, int, float, bool, type(None))
    out: dict[str, Any] = {}
    for key, value in match.items():
        at = _at(_key_line(match, key) or line)
        if not isinstance(key, str):
            problems.append(f"{at}'match' keys are config.json keys (strings), got {show_value(key)}")
        elif isinstance(value, list) and all(isinstance(v, scalars) for v in value):
            out[key] = list(value)
        elif isinstance(value, scalars):
            out[key] = value
        else:
            problems.append(f"{at}match {_q(key)} must be a value or a list of values, got {_type(value)}")
    return out


def _load_ignore(doc: dict[Any, Any], problems: list[str]) -> list[re.Pattern[str]]:
    ignore = doc.get("ignore", [])
    if not isinstance(ignore, list):
        problems.append(f"{_at(_key_line(doc, 'ignore'))}'ignore' must be a list of regexes, "
                        f"got {_type(ignore)}")
        return []
    out: list[re.Pattern[str]] = []
    for i, regex in enumerate(ignore):
        at = _at(_item_line(ignore, i) or _key_line(doc, "ignore"))
        if not isinstance(regex, str):
            problems.append(f"{at}ignore pattern {i + 1} must be a regex string, got {_type(regex)}")
        elif isinstance(compiled := _compile(regex), str):
            problems.append(f"{at}ignore pattern {_q(regex)} is not a valid regex: {compiled}")
        else:
            out.append(compiled)
    return out


def load_mapping_text(text: str, name: str = "<stdin>", path: Path | None = None) -> Mapping:
    """Parse and validate a mapping; MappingError (naming ``path``, else ``name``) lists every problem."""
    where = str(path) if path is not None else name
    doc, problems = _parse_yaml(text, where)
    if not isinstance(doc, dict):
        raise MappingError(where, [*problems, f"a mapping file is a YAML mapping with keys "
                                               f"{', '.join(REQUIRED_KEYS)}; got {_type(doc)}"])
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"{_at(_key_line(doc, key))}unknown key {show_value(key)}{_hint(key, TOP_KEYS)}; "
                            f"a mapping has {', '.join(TOP_KEYS)}")
    problems += [f"missing required key '{key}'" for key in REQUIRED_KEYS if key not in doc]
    version = doc.get("version", VERSION)
    if type(version) is not int or version != VERSION:
        problems.append(f"{_at(_key_line(doc, 'version'))}unsupported version {show_value(version)} "
                        f"(this nnxport reads version {VERSION})")
    model = doc.get("model", "?")
    if not isinstance(model, str) or not model.strip():
        problems.append(f"{_at(_key_line(doc, 'model'))}'model' must be a family name or "
                        f"'package.module:Class', got {_type(model)}")
    match = _load_match(doc, problems)
    ignore = _load_ignore(doc, problems)
    rules: list[Rule] = []
    specs = doc.get("rules")
    if "rules" in doc and (not isinstance(specs, list) or not specs):
        problems.append(f"{_at(_key_line(doc, 'rules'))}'rules' must be a non-empty list of "
                        f"{{from: REGEX, to: TARGET}} rules, got {_type(specs)}")
    elif isinstance(specs, list):
        for i, spec in enumerate(specs):
            rule = _load_rule(i, _item_line(specs, i), spec, problems)
            if rule is not None:
                rules.append(rule)
    if problems:
        raise MappingError(where, problems)
    return Mapping(name=name, path=path, text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   version=version, model=model, match=match, ignore=tuple(ignore), rules=tuple(rules))


def load_mapping_file(path: Path) -> Mapping:
    """Read a UTF-8 mapping file and load it (named by its stem); MappingError if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MappingError(str(path), [f"cannot read mapping file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise MappingError(str(path), [f"not UTF-8 text: {e.reason} at byte {e.start}"]) from None
    return load_mapping_text(text, name=path.stem, path=path)


_SELECT = "cannot pick a mapping"


def select_mapping(config: MappingABC[str, Any] | None, candidates: Sequence[Mapping]) -> Mapping:
    """The one candidate whose ``match`` fits ``config``; MappingError if none or several do."""
    found = [m for m in candidates if m.matches(config)]
    if len(found) == 1:
        return found[0]
    if config is None:
        what = "no config.json to match against"
    else:
        what = (f"model_type {show_value(config.get('model_type'))}, "
                f"architectures {show_value(config.get('architectures'))}")
    if not found:
        available = ", ".join(f"{m.name} {show_value(m.match)}" for m in candidates) or "none"
        reason = what if config is None else f"no mapping matches {what}"
        raise MappingError(_SELECT, [f"{reason} (available: {available}); "
                                     "pass --mapping NAME|PATH to choose one"])
    names = ", ".join(m.name for m in found)
    raise MappingError(_SELECT, [f"several mappings match {what}: {names}; pass --mapping to choose one"])


# --------------------------------------------------------------------------------------------- analysis

@dataclass(frozen=True)
class TensorSpec:
    """Shape and numpy-style dtype name of a tensor (source key or target leaf)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Assignment:
    """One target leaf filled from one source key through ``ops`` (config values substituted)."""

    target: str
    source: str
    rule: Rule
    ops: tuple[Op, ...]
    source_spec: TensorSpec
    target_spec: TensorSpec


@dataclass(frozen=True)
class KeyReport:
    """What the mapping does with one source key (a line of ``inspect-keys``)."""

    key: str
    spec: TensorSpec
    status: Status
    target: str | None
    rule: Rule | None
    ops: tuple[str, ...]
    target_shape: tuple[int, ...] | None
    problem: str | None


@dataclass(frozen=True)
class Analysis:
    """Every source key's fate, the valid assignments, and every problem (one line each)."""

    keys: tuple[KeyReport, ...]
    assignments: tuple[Assignment, ...]
    unfilled: tuple[str, ...]
    unused_rules: tuple[Rule, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """No problems: every key mapped or ignored, every target filled exactly once, shapes agree."""
        return not self.problems


@dataclass
class _Claim:
    """A key whose one rule gave an existing target: it fills that target, validly or not."""

    key: str
    target: str
    rule: Rule
    ops: tuple[Op, ...]
    target_shape: tuple[int, ...] | None
    problems: list[str]
    status: Status


def _resolve_ops(rule: Rule, config: MappingABC[str, Any] | None) -> tuple[Op, ...] | str:
    """The rule's ops with config values substituted, or the problem that prevents it."""
    resolved: list[Op] = []
    for op in rule.ops:
        try:
            resolved.append(op.resolve(config))
        except OpError as e:
            return f"{rule.label()}: {op.describe()}: {e}"
    return tuple(resolved)


def _infer(ops: Sequence[Op], shape: tuple[int, ...]) -> tuple[int, ...] | OpError:
    for op in ops:
        try:
            shape = op.infer(shape)
        except OpError as e:
            return e
    return shape


def _ops_text(ops: Sequence[Op]) -> str:
    return " -> ".join(op.describe() for op in ops) if ops else "no ops"


def _unplaced(key: str, spec: TensorSpec, hits: list[tuple[Rule, re.Match[str]]], mapping: Mapping,
              problems: list[str]) -> KeyReport:
    """The report of a key matched by no rule (ignored or unmatched) or by several (ambiguous)."""
    problem: str | None = None
    status: Status = "ignored"
    if hits:
        names = [rule.label() for rule, _ in hits]
        problem = f"ambiguous: key {_q(key)} matched by {', '.join(names[:-1])} and {names[-1]}"
        status = "ambiguous"
    elif not any(p.search(key) for p in mapping.ignore):
        problem = f"unmatched source key {_q(key)} (no rule or ignore pattern matches)"
        status = "unmatched"
    if problem:
        problems.append(problem)
    return KeyReport(key, spec, status, None, None, (), None, problem)


def _place(key: str, spec: TensorSpec, rule: Rule, target: str, resolved: tuple[Op, ...] | str,
           targets: MappingABC[str, TensorSpec], problems: list[str]) -> KeyReport | _Claim:
    """A key matched by one rule: its claim on an existing target, or the report of a missing one.

    ``resolved`` is the rule's resolved ops, or its (already reported) config problem.
    """
    ops = rule.ops if isinstance(resolved, str) else resolved
    mine: list[str] = []
    status: Status = "mapped"
    shape: tuple[int, ...] | None = None
    if isinstance(resolved, str):
        mine.append(resolved)
        status = "op-error"
    elif isinstance(inferred := _infer(ops, spec.shape), OpError):
        mine.append(f"{rule.label()}: key {_q(key)} of shape {spec.shape}: {inferred}")
        problems.append(mine[-1])
        status = "op-error"
    else:
        shape = inferred
    if target not in targets:
        closest = difflib.get_close_matches(target, list(targets), n=3)
        hint = f"; closest: {', '.join(map(_q, closest))}" if closest else ""
        mine.append(f"{rule.label()}: target {_q(target)} (from key {_q(key)}) does not exist in the model"
                    f"{hint}")
        problems.append(mine[-1])
        return KeyReport(key, spec, "bad-target", target, rule, tuple(op.describe() for op in ops), shape,
                         "; ".join(mine))
    expected = targets[target].shape
    if shape is not None and shape != expected:
        mine.append(f"shape mismatch: key {_q(key)} -> target {_q(target)} ({rule.label()}): "
                    f"source {spec.shape} -> {_ops_text(ops)} -> {shape}, expected {expected}")
        problems.append(mine[-1])
        status = "shape-mismatch"
    return _Claim(key, target, rule, ops, shape, mine, status)


def analyze(mapping: Mapping, sources: MappingABC[str, TensorSpec], targets: MappingABC[str, TensorSpec],
            config: MappingABC[str, Any] | None) -> Analysis:
    """Match every source key to rules and targets and check shapes; collect every problem.

    A key must be matched by exactly one rule, or by no rule and some ``ignore`` pattern (ignore patterns
    are consulted only for keys no rule matches). Each target leaf must be filled by exactly one key, with
    the shape after the rule's ops equal to the leaf's. Rules matching no key are only reported in
    ``unused_rules``, and their ops need not resolve against ``config``; a rule's config problem is
    reported once. Targets named by an ambiguous key are not also reported as unfilled.
    """
    problems: list[str] = []
    resolved: dict[int, tuple[Op, ...] | str] = {}  # per rule, on first use
    used: set[int] = set()
    mentioned: set[str] = set()  # targets of ambiguous keys
    claims: dict[str, list[_Claim]] = {}
    reports: dict[str, KeyReport] = {}
    for key in sorted(sources):
        hits = [(rule, m) for rule in mapping.rules if (m := rule.pattern.search(key))]
        used.update(rule.index for rule, _ in hits)
        if len(hits) != 1:
            mentioned.update(m.expand(rule.target) for rule, m in hits)
            reports[key] = _unplaced(key, sources[key], hits, mapping, problems)
            continue
        ((rule, m),) = hits
        if rule.index not in resolved:
            resolved[rule.index] = outcome = _resolve_ops(rule, config)
            if isinstance(outcome, str):
                problems.append(outcome)
        placed = _place(key, sources[key], rule, m.expand(rule.target), resolved[rule.index], targets,
                        problems)
        if isinstance(placed, KeyReport):
            reports[key] = placed
        else:
            claims.setdefault(placed.target, []).append(placed)
    order = {t: i for i, t in enumerate(targets)}
    assignments: list[Assignment] = []
    for target in sorted(claims, key=order.__getitem__):
        group = claims[target]
        if len(group) > 1:
            who = [f"{_q(c.key)} ({c.rule.label()})" for c in group]
            problems.append(f"target {_q(target)} is filled by {len(group)} keys: "
                            f"{', '.join(who[:-1])} and {who[-1]}")
            for c in group:
                c.problems.append(problems[-1])
                c.status = "duplicate-target"
        for c in group:
            reports[c.key] = KeyReport(c.key, sources[c.key], c.status, target, c.rule,
                                       tuple(op.describe() for op in c.ops), c.target_shape,
                                       "; ".join(c.problems) or None)
            if c.status == "mapped":
                assignments.append(Assignment(target, c.key, c.rule, c.ops, sources[c.key], targets[target]))
    unfilled = tuple(t for t in targets if t not in claims and t not in mentioned)
    problems += [f"target {_q(t)} is not filled by any rule" for t in unfilled]
    return Analysis(
        keys=tuple(reports[k] for k in sorted(reports)),
        assignments=tuple(assignments),
        unfilled=unfilled,
        unused_rules=tuple(r for r in mapping.rules if r.index not in used),
        problems=tuple(problems),
    )


def plan(mapping: Mapping, sources: MappingABC[str, TensorSpec], targets: MappingABC[str, TensorSpec],
         config: MappingABC[str, Any] | None) -> tuple[Assignment, ...]:
    """The assignments of :func:`analyze`; MappingError (named after the mapping) listing every problem."""
    analysis = analyze(mapping, sources, targets, config)
    if analysis.problems:
        raise MappingError(mapping.name, analysis.problems)
    return analysis.assignments
