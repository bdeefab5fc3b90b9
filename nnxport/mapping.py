"""Mapping files: YAML text -> validated rules -> a plan of which source key fills which model leaf.

Pure: no jax, no torch, and no I/O beyond :func:`load_mapping_file` reading its one file. Nothing here
sees tensor data, only shapes (:class:`TensorSpec`). Every problem found is collected and reported
together in one :class:`~nnxport.errors.MappingError`.

Matching semantics (see :func:`analyze`): each source key is tried against every rule with
``re.search`` (authors anchor with ``^``/``$``). Exactly one rule must match; ``ignore`` patterns are
consulted only for keys that no rule matches, so a broad ignore list never competes with a rule. The
rule's ``to`` template is expanded with the match (``\\1``, ``\\g<name>``) into a dotted target path; a
list of templates receives the parts of a ``split``. Keys of a rule with a ``concat``/``stack`` op are
gathered per expanded target. ``optional`` rules ignore keys whose target the model lacks, and ``tie``
entries declare model parameters that share a value (see docs/mappings.md for the whole format).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import re._constants as _sre_c  # the parsed form of a regex, for the static backtracking check
import re._parser as _sre
import stat
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nnxport.errors import MappingError
from nnxport.ops import Op, OpError, Split, infer_ops, parse_op, show_value

__all__ = [
    "Analysis",
    "Assignment",
    "KeyReport",
    "Mapping",
    "Rule",
    "TensorSpec",
    "Tie",
    "analyze",
    "load_mapping_file",
    "load_mapping_text",
    "plan",
    "select_mapping",
]

VERSION = 1
TOP_KEYS = ("version", "model", "match", "ignore", "rules", "tie")
REQUIRED_KEYS = ("version", "model", "rules")
RULE_KEYS = ("from", "to", "ops", "optional", "shard")
TIE_KEYS = ("to", "from", "ops", "shard")

ShardSpec = tuple[tuple[str, ...] | None, ...]
"""A rule's ``shard:``: per target dimension, None (not sharded) or the mesh axes it is split over."""

Status = Literal["mapped", "ignored", "tied", "unmatched", "ambiguous", "bad-target", "duplicate-target",
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
    """One ``from`` regex -> ``to`` template(s) rule, with its ops (config references not yet resolved).

    ``targets`` has one template, or several when the rule splits one key into several targets.
    """

    index: int
    line: int | None
    source: str
    pattern: re.Pattern[str]
    targets: tuple[str, ...]
    ops: tuple[Op, ...]
    optional: bool = False
    shard: ShardSpec | None = None

    @property
    def target(self) -> str:
        """The ``to`` template(s), joined by ", " when there are several."""
        return ", ".join(self.targets)

    @property
    def gather(self) -> Op | None:
        """The rule's concat/stack op, if any."""
        return next((op for op in self.ops if op.kind == "gather"), None)

    def label(self) -> str:
        """How messages name the rule: ``rule 3 (line 14, from '^fc\\.weight$')`` (1-based number)."""
        return _rule_label(self.index, self.line, self.source)


@dataclass(frozen=True)
class Tie:
    """A declared alias between model targets: ``to`` holds the value of ``from`` through ``ops``."""

    index: int
    line: int | None
    to: str
    source: str
    ops: tuple[Op, ...]
    shard: ShardSpec | None = None

    def label(self) -> str:
        """How messages name the tie: ``tie 1 (line 30, to 'lm_head.kernel')``."""
        return _tie_label(self.index, self.line, self.to)


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
    ties: tuple[Tie, ...] = ()

    @property
    def where(self) -> str:
        """How errors name this mapping: its file, or its name when it has none (stdin, text)."""
        return str(self.path) if self.path is not None else self.name

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


MAX_MAPPING_BYTES = 1_000_000
"""The largest mapping file read (the built-in ones are under 10 kB)."""


class NoAliasLoader(yaml.SafeLoader):
    """SafeLoader refusing YAML aliases (``*name``, and so ``<<: *name`` merges): a few hundred bytes of
    nested aliases expand into billions of nodes (an "alias bomb"), and nnxport's YAML files need none."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} refused: nnxport's YAML "
                                              "files may not use aliases (write the value out)",
                                              event.start_mark)
        return super().compose_node(parent, index)


class _Loader(NoAliasLoader):
    """SafeLoader building :class:`_Dict` / :class:`_List`, noting duplicate keys, refusing aliases."""

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
    """The compiled regex, or why it is not one (or why it could take exponential time)."""
    try:
        compiled = re.compile(regex)
        backtracks = _backtracks(_sre.parse(regex).data, in_repeat=False)
    except (re.error, OverflowError, RecursionError) as e:
        return str(e)
    if backtracks:
        return (f"{backtracks} inside a repeat (like (a+)+ or (a|ab)*) can take exponential time to match "
                "a long key; use a single repeat, or make the inner one possessive (a++) or atomic (?>...)")
    return compiled


_REPEATS = (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, _sre_c.POSSESSIVE_REPEAT)


def _backtracks(items: Any, *, in_repeat: bool) -> str | None:
    """Static check against catastrophic backtracking on a parsed regex: what, inside a repeat, could
    match one string in many ways ("a repeat", "an alternation"), or None. ``re`` cannot be time-bound
    (it holds the GIL while it matches), so such regexes are refused at load time."""
    for op, av in items:
        if op in _REPEATS:
            _low, high, body = av
            repeats = high > 1 or high == _sre_c.MAXREPEAT
            if repeats and in_repeat and op is not _sre_c.POSSESSIVE_REPEAT:
                return "a repeat"
            found = _backtracks(body, in_repeat=in_repeat or (repeats and op is not _sre_c.POSSESSIVE_REPEAT))
        elif op is _sre_c.ATOMIC_GROUP:
            found = _backtracks(av, in_repeat=False)
        elif op is _sre_c.SUBPATTERN:
            found = _backtracks(av[-1], in_repeat=in_repeat)
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            found = _backtracks(av[1], in_repeat=in_repeat)
        elif op is _sre_c.BRANCH:
            if in_repeat and _overlapping(av[1]):
                return "an alternation whose branches can start alike"
            found = next((f for b in av[1] if (f := _backtracks(b, in_repeat=in_repeat))), None)
        elif op is _sre_c.GROUPREF_EXISTS:
            found = next((f for b in av[1:] if b is not None and (f := _backtracks(b, in_repeat=in_repeat))),
                         None)
        else:
            continue
        if found:
            return found
    return None


def _overlapping(branches: Sequence[Any]) -> bool:
    """Whether two alternatives of a branch may start with the same character (unknown counts as yes)."""
    seen: set[int] = set()
    for branch in branches:
        items = list(branch)
        while items and items[0][0] is _sre_c.SUBPATTERN:  # (?:...) / (...) around the first item
            items = list(items[0][1][-1]) + items[1:]
        if not items:
            return True
        op, av = items[0]
        if op is _sre_c.LITERAL:
            first = {av}
        elif op is _sre_c.IN and all(o is _sre_c.LITERAL for o, _ in av):
            first = {v for _, v in av}
        else:
            return True
        if first & seen:
            return True
        seen |= first
    return False


def _check_template(pattern: re.Pattern[str], template: str) -> str | None:
    """Why ``template`` cannot be expanded by matches of ``pattern`` (bad backref or escape), or None."""
    names = {i: n for n, i in pattern.groupindex.items()}
    groups = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1))
    try:
        re.compile(groups).sub(template, "", count=1)
    except (re.error, IndexError) as e:
        return str(e)
    return None


def _load_targets(label: str, target: object, pattern: re.Pattern[str] | None,
                  problems: list[str]) -> tuple[str, ...] | None:
    """The rule's ``to`` templates (a string, or a list for a split), or None after reporting why not."""
    if isinstance(target, list) and target:
        bad = [t for t in target if not isinstance(t, str) or not t]
        if bad:
            problems.append(f"{label}: 'to' list items must be non-empty target path strings, "
                            f"got {_type(bad[0])}")
            return None
        templates = tuple(target)
    elif isinstance(target, str) and target:
        templates = (target,)
    else:
        problems.append(f"{label}: 'to' must be a non-empty target path string (or a list of them for a "
                        f"split), got {_type(target)}")
        return None
    ok = True
    if len(set(templates)) < len(templates):
        repeated = sorted({t for t in templates if templates.count(t) > 1})
        problems.append(f"{label}: 'to' lists {', '.join(map(_q, repeated))} more than once")
        ok = False
    for t in templates:
        if pattern is not None and (why := _check_template(pattern, t)):
            problems.append(f"{label}: invalid target template {_q(t)}: {why}")
            ok = False
    return templates if ok else None


def _check_op_order(label: str, ops: Sequence[Op], lines: list[int | None], listed: bool | None,
                    n_targets: int, pattern: re.Pattern[str] | None, problems: list[str]) -> None:
    """At most one gather before at most one split; a list ``to`` exactly with a split; ``by`` templates."""
    gathers = [j for j, op in enumerate(ops) if op.kind == "gather"]
    splits = [j for j, op in enumerate(ops) if op.kind == "split"]
    if len(gathers) > 1:
        problems.append(f"{label}: {_at(lines[gathers[1]])}a rule has at most one concat/stack op "
                        f"(ops {', '.join(str(j + 1) for j in gathers)} are)")
    if len(splits) > 1:
        problems.append(f"{label}: {_at(lines[splits[1]])}a rule has at most one split op "
                        f"(ops {', '.join(str(j + 1) for j in splits)} are)")
    if gathers and splits and splits[0] < gathers[-1]:
        problems.append(f"{label}: {_at(lines[splits[0]])}op {splits[0] + 1} (split) comes before op "
                        f"{gathers[-1] + 1} ({ops[gathers[-1]].name}); "
                        f"a concat/stack must come before a split")
    if listed is True and not splits:
        problems.append(f"{label}: 'to' is a list of {n_targets} targets but the rule has no split op; "
                        f"use a single target, or add {{split: {{axis: A, parts: {n_targets}}}}}")
    if listed is False and splits:
        problems.append(f"{label}: {_at(lines[splits[0]])}a split gives several tensors, so 'to' must be a "
                        f"list of targets, one per part")
    if listed is True and len(splits) == 1:
        split = ops[splits[0]]
        count = split.count if isinstance(split, Split) else None
        if count is not None and count != n_targets:
            problems.append(f"{label}: {_at(lines[splits[0]])}{split.describe()} gives {count} tensors but "
                            f"'to' lists {n_targets} targets")
    for j in gathers:
        by = getattr(ops[j], "by", None)
        if by is not None and pattern is not None and (why := _check_template(pattern, by)):
            problems.append(f"{label}: {_at(lines[j])}op {j + 1}: invalid 'by' template {_q(by)}: {why}")


def _load_shard(label: str, spec: dict[Any, Any], line: int | None, problems: list[str]) -> ShardSpec | None:
    """The ``shard:`` entry of a rule or tie: a list with, per target dimension, null, an axis name or a
    list of axis names (``[null, model]``, ``[[data, model], null]``)."""
    if "shard" not in spec:
        return None
    value = spec["shard"]
    at = _at(_other_line(_key_line(spec, "shard"), line))
    example = "e.g. shard: [null, model]"
    if not isinstance(value, list):
        problems.append(f"{label}: {at}'shard' must be a list with one entry per target dimension "
                        f"({example}), got {_type(value)}")
        return None
    dims: list[tuple[str, ...] | None] = []
    used: set[str] = set()
    for entry in value:
        axes = [entry] if isinstance(entry, str) else entry if isinstance(entry, list) else None
        if entry is None:
            dims.append(None)
            continue
        if axes is None or not axes or not all(isinstance(a, str) and re.fullmatch(r"[A-Za-z_]\w*", a)
                                               for a in axes):
            problems.append(f"{label}: {at}'shard' entries are null, a mesh axis name or a list of them "
                            f"({example}), got {show_value(entry)}")
            return None
        if used & set(axes):
            problems.append(f"{label}: {at}'shard' names mesh axis {sorted(used & set(axes))[0]!r} twice")
            return None
        used.update(axes)
        dims.append(tuple(axes))
    return tuple(dims)


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
    templates = _load_targets(label, target, pattern, problems)
    optional = spec.get("optional", False)
    if not isinstance(optional, bool):
        at = _at(_other_line(_key_line(spec, "optional"), line))
        problems.append(f"{label}: {at}'optional' must be true or false, got {_type(optional)}")
    ops: list[Op] = []
    lines: list[int | None] = []
    op_specs = spec.get("ops", [])
    ops_ok = True
    if not isinstance(op_specs, list):
        problems.append(f"{label}: 'ops' must be a list like [{{transpose: [1, 0]}}], got {_type(op_specs)}")
        ops_ok = False
    else:
        for j, op_spec in enumerate(op_specs):
            at_line = _other_line(_item_line(op_specs, j), line)
            try:
                ops.append(parse_op(op_spec))
                lines.append(at_line)
            except OpError as e:
                problems.append(f"{label}: {_at(at_line)}op {j + 1}: {e}")
                ops_ok = False
    if ops_ok:
        listed = None if templates is None else isinstance(target, list)
        _check_op_order(label, ops, lines, listed, len(templates or ()), pattern, problems)
    shard = _load_shard(label, spec, line, problems)
    if len(problems) > n or pattern is None or templates is None:
        return None
    return Rule(index, line, pattern.pattern, pattern, templates, tuple(ops), optional is True, shard)


def _tie_label(index: int, line: int | None, to: str | None) -> str:
    parts = ([] if line is None else [f"line {line}"]) + ([] if to is None else [f"to {_q(to)}"])
    return f"tie {index + 1}" + (f" ({', '.join(parts)})" if parts else "")


def _load_ties(doc: dict[Any, Any], problems: list[str]) -> list[Tie]:
    specs = doc.get("tie", [])
    if not isinstance(specs, list):
        problems.append(f"{_at(_key_line(doc, 'tie'))}'tie' must be a list of {{to: TARGET, from: TARGET}} "
                        f"entries, got {_type(specs)}")
        return []
    ties: list[Tie] = []
    seen: dict[str, str] = {}
    for i, spec in enumerate(specs):
        line = _item_line(specs, i) or _key_line(doc, "tie")
        if not isinstance(spec, dict):
            problems.append(f"{_tie_label(i, line, None)}: a tie is a mapping with 'to' and 'from', "
                            f"got {_type(spec)}")
            continue
        to, source = spec.get("to"), spec.get("from")
        label = _tie_label(i, line, to if isinstance(to, str) else None)
        n = len(problems)
        for key in spec:
            if key not in TIE_KEYS:
                at = _at(_other_line(_key_line(spec, key), line))
                problems.append(f"{label}: {at}unknown key {show_value(key)}{_hint(key, TIE_KEYS)}; "
                                f"a tie has {', '.join(TIE_KEYS)}")
        for what, value in (("to", to), ("from", source)):
            if not isinstance(value, str) or not value:
                problems.append(f"{label}: {what!r} must be a non-empty target path string, "
                                f"got {_type(value)}")
        ops: list[Op] = []
        op_specs = spec.get("ops", [])
        if not isinstance(op_specs, list):
            problems.append(f"{label}: 'ops' must be a list like [{{transpose: [1, 0]}}], "
                            f"got {_type(op_specs)}")
        else:
            for j, op_spec in enumerate(op_specs):
                at = _at(_other_line(_item_line(op_specs, j), line))
                try:
                    op = parse_op(op_spec)
                except OpError as e:
                    problems.append(f"{label}: {at}op {j + 1}: {e}")
                    continue
                if op.kind != "map":
                    problems.append(f"{label}: {at}op {j + 1}: a tie takes one-tensor ops only (transpose, "
                                    f"reshape), not {op.name}")
                ops.append(op)
        if isinstance(to, str) and to:
            if to in seen:
                problems.append(f"{label}: target {_q(to)} is already tied by {seen[to]}")
            else:
                seen[to] = label
        shard = _load_shard(label, spec, line, problems)
        if len(problems) == n and isinstance(to, str) and isinstance(source, str):
            ties.append(Tie(i, line, to, source, tuple(ops), shard))
    return ties


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
    if len(text) > MAX_MAPPING_BYTES:
        raise MappingError(where, [f"{len(text)} characters: larger than {MAX_MAPPING_BYTES // 1_000_000} "
                                   "MB, too large for a mapping file"])
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
    ties = _load_ties(doc, problems)
    if problems:
        raise MappingError(where, problems)
    return Mapping(name=name, path=path, text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   version=version, model=model, match=match, ignore=tuple(ignore), rules=tuple(rules),
                   ties=tuple(ties))


def load_mapping_file(path: Path) -> Mapping:
    """Read a UTF-8 mapping file and load it (named by its stem); MappingError if it cannot be read."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):  # a FIFO would block: opened without waiting, refused here
                what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
                raise MappingError(str(path), [f"cannot read mapping file: it is {what}"])
            raw = fh.read(MAX_MAPPING_BYTES + 1)
        if len(raw) > MAX_MAPPING_BYTES:
            raise MappingError(str(path), [f"larger than {MAX_MAPPING_BYTES // 1_000_000} MB, too large "
                                           "for a mapping file"])
        text = raw.decode("utf-8")
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
    """Target leaves filled from source keys through ``ops`` (config values substituted).

    Usually one key -> one target. A split rule fills several ``targets`` (in order) from one key; a
    gathering rule (concat/stack) fills one target from several ``sources`` (in gather order). A tie fill
    has no sources and no rule: its one target is computed from the already-filled target ``tied_from``.
    Run the ops with :func:`nnxport.ops.apply_ops` over the source arrays (or the ``tied_from`` value).
    """

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    rule: Rule | None
    ops: tuple[Op, ...]
    source_specs: tuple[TensorSpec, ...]
    target_specs: tuple[TensorSpec, ...]
    tied_from: str | None = None
    shard: ShardSpec | None = None


@dataclass(frozen=True)
class KeyReport:
    """What the mapping does with one source key (a line of ``inspect-keys``).

    ``targets`` are the expanded targets of its rule (several for a split); ``target_shapes`` the shapes
    the rule's ops give (empty when they cannot be inferred). ``note`` explains an ``ignored`` key of an
    optional rule or a ``tied`` key; ``problem`` is None exactly for mapped, ignored and tied keys.
    """

    key: str
    spec: TensorSpec
    status: Status
    targets: tuple[str, ...]
    rule: Rule | None
    ops: tuple[str, ...]
    target_shapes: tuple[tuple[int, ...], ...]
    problem: str | None
    note: str | None = None

    @property
    def target(self) -> str | None:
        """The target(s) joined by ", ", or None."""
        return ", ".join(self.targets) or None

    @property
    def target_shape(self) -> tuple[int, ...] | None:
        """The shape after the ops when the key has exactly one target (and it is known), else None."""
        return self.target_shapes[0] if len(self.targets) == 1 and len(self.target_shapes) == 1 else None


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
        """No problems: every key mapped, ignored or tied, every target filled exactly once, shapes agree."""
        return not self.problems


@dataclass
class _Claim:
    """The keys of one rule that fill existing targets together (one key, or a gathered group)."""

    keys: list[str]
    targets: tuple[str, ...]
    rule: Rule
    ops: tuple[Op, ...]
    shapes: tuple[tuple[int, ...], ...]
    problems: list[str]
    status: Status


def _resolve_ops(rule: Rule | Tie, config: MappingABC[str, Any] | None) -> tuple[Op, ...] | str:
    """The rule's (or tie's) ops with config values substituted, or the problem that prevents it."""
    resolved: list[Op] = []
    for op in rule.ops:
        try:
            resolved.append(op.resolve(config))
        except OpError as e:
            return f"{rule.label()}: {op.describe()}: {e}"
    return tuple(resolved)


def _ops_text(ops: Sequence[Op]) -> str:
    return " -> ".join(op.describe() for op in ops) if ops else "no ops"


def _keys_text(keys: Sequence[str]) -> str:
    if len(keys) == 1:
        return f"key {_q(keys[0])}"
    return f"keys {', '.join(map(_q, keys[:-1]))} and {_q(keys[-1])}"


def _targets_text(targets: Sequence[str]) -> str:
    return ("target " if len(targets) == 1 else "targets ") + ", ".join(map(_q, targets))


def _shapes_text(shapes: Sequence[tuple[int, ...]]) -> str:
    return str(shapes[0]) if len(shapes) == 1 else ", ".join(map(str, shapes))


def _natural(text: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key comparing runs of ASCII digits as numbers: 'layer.2' < 'layer.10'."""
    return tuple((0, int(part), part) if part.isascii() and part.isdigit() else (1, 0, part)
                 for part in re.split(r"([0-9]+)", text) if part)


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
    return KeyReport(key, spec, status, (), None, (), (), problem)


class _Analyzer:
    """State of one :func:`analyze` run."""

    def __init__(self, mapping: Mapping, sources: MappingABC[str, TensorSpec],
                 targets: MappingABC[str, TensorSpec], config: MappingABC[str, Any] | None) -> None:
        self.mapping, self.sources, self.targets, self.config = mapping, sources, targets, config
        self.problems: list[str] = []
        self.resolved: dict[tuple[str, int], tuple[Op, ...] | str] = {}  # per rule / tie, on first use
        self.reports: dict[str, KeyReport] = {}
        self.claims: dict[str, list[_Claim]] = {}
        self.ties = {t.to: t for t in mapping.ties}
        self.mentioned: set[str] = set()  # targets not to report as unfilled: named by ambiguous keys, ...

    def resolve(self, what: Rule | Tie) -> tuple[Op, ...] | str:
        """``what``'s resolved ops (its problem reported once, on first use)."""
        slot = ("rule" if isinstance(what, Rule) else "tie", what.index)
        if slot not in self.resolved:
            self.resolved[slot] = outcome = _resolve_ops(what, self.config)
            if isinstance(outcome, str):
                self.problems.append(outcome)
        return self.resolved[slot]

    def report(self, keys: Sequence[str], status: Status, targets: tuple[str, ...], rule: Rule,
               ops: Sequence[Op], shapes: tuple[tuple[int, ...], ...], problems: Sequence[str],
               note: str | None = None) -> None:
        for key in keys:
            self.reports[key] = KeyReport(key, self.sources[key], status, targets, rule,
                                          tuple(op.describe() for op in ops), shapes,
                                          "; ".join(problems) or None, note)

    def order_pieces(self, rule: Rule, gather: Op, targets: tuple[str, ...],
                     members: list[tuple[str, re.Match[str]]]) -> tuple[list[str], str | None]:
        """The group's keys in gather order, and the problem with its pieces (or None)."""
        by: str | None = getattr(gather, "by", None)
        order: tuple[str, ...] | None = getattr(gather, "order", None)
        pieces: dict[str, list[str]] = {}
        for key, m in members:
            pieces.setdefault(key if by is None else m.expand(by), []).append(key)
        wrong: list[str] = []
        if order is not None:
            if missing := [p for p in order if p not in pieces]:
                wrong.append(f"missing piece{'s' * (len(missing) > 1)} {', '.join(map(_q, missing))}")
            extra = sorted((p for p in pieces if p not in order), key=_natural)
            if extra:
                wrong.append(f"unexpected piece{'s' * (len(extra) > 1)} " + ", ".join(
                    f"{_q(p)} ({_keys_text(pieces[p])})" for p in extra))
        for piece, keys in sorted(pieces.items(), key=lambda kv: _natural(kv[0])):
            if len(keys) > 1:
                wrong.append(f"piece {_q(piece)} is given by {len(keys)} {_keys_text(keys)}")
        rank = {p: i for i, p in enumerate(order or ())}
        ordered = sorted(pieces, key=lambda p: (rank.get(p, len(rank)), _natural(p)))
        keys = [k for p in ordered for k in pieces[p]]
        if not wrong:
            return keys, None
        what = "" if order is None else f" (order: {', '.join(order)})"
        return keys, (f"{rule.label()}: {_targets_text(targets)} gathers pieces by "
                      f"{_q(by) if by is not None else 'key'}: {'; '.join(wrong)}{what}")

    def infer(self, rule: Rule, ops: tuple[Op, ...], keys: list[str], targets: tuple[str, ...]
              ) -> tuple[tuple[int, ...], ...] | str:
        """The shapes the ops give for the keys (in order), or the problem."""
        cut = next((j for j, op in enumerate(ops) if op.kind == "gather"), len(ops))
        shapes: list[tuple[int, ...]] = []
        for key in keys:
            shape = self.sources[key].shape
            try:
                shapes += infer_ops(ops[:cut], [shape])
            except OpError as e:
                return f"{rule.label()}: key {_q(key)} of shape {shape}: {e}"
        try:
            out = infer_ops(ops[cut:], shapes)
        except OpError as e:
            given = ", ".join(f"{_q(k)} {s}" for k, s in zip(keys, shapes, strict=True))
            return f"{rule.label()}: {_targets_text(targets)} from keys {given}: {e}"
        if len(out) != len(targets):
            return (f"{rule.label()}: {_keys_text(keys)} gives {len(out)} tensors after {_ops_text(ops)}, "
                    f"but 'to' lists {len(targets)} targets")
        return tuple(out)

    def place(self, rule: Rule, targets: tuple[str, ...], members: list[tuple[str, re.Match[str]]]) -> None:
        """One key, or the gathered keys of one rule expanding to the same targets."""
        keys = [k for k, _ in members]
        if len(set(targets)) < len(targets):
            twice = sorted({t for t in targets if targets.count(t) > 1})
            self.problems.append(f"{rule.label()}: {_keys_text(keys)}: 'to' expands to "
                                 f"{_targets_text(twice)} more than once ({', '.join(map(_q, targets))})")
            self.report(keys, "bad-target", targets, rule, rule.ops, (), [self.problems[-1]])
            self.mentioned.update(targets)
            return
        missing = [t for t in targets if t not in self.targets]
        tie = self.ties.get(targets[0]) if missing and len(targets) == 1 else None
        if missing and rule.optional and tie is None:
            self.report(keys, "ignored", targets, rule, rule.ops, (), (),
                        f"optional: model has no {_targets_text(missing)}")
            return
        resolved = self.resolve(rule)
        ops = rule.ops if isinstance(resolved, str) else resolved
        mine: list[str] = []
        status: Status = "mapped"
        if isinstance(resolved, str):
            mine.append(resolved)
            status = "op-error"
        gather = rule.gather
        if gather is not None:
            keys, wrong = self.order_pieces(rule, gather, targets, members)
            dtypes = {self.sources[k].dtype for k in keys}
            if len(dtypes) > 1:
                mixed = ", ".join(f"{_q(k)} {self.sources[k].dtype}" for k in keys)
                wrong = "; ".join(filter(None, [wrong, f"{rule.label()}: {_targets_text(targets)}: gathered "
                                                       f"keys have different dtypes: {mixed}"]))
            if wrong:
                mine.append(wrong)
                self.problems.append(wrong)
                status = "op-error"
        shapes: tuple[tuple[int, ...], ...] = ()
        if not isinstance(resolved, str):
            inferred = self.infer(rule, ops, keys, targets)
            if isinstance(inferred, str):
                mine.append(inferred)
                self.problems.append(inferred)
                status = "op-error"
            else:
                shapes = inferred
        if tie is not None:
            self.tied(rule, tie, keys, ops, shapes, mine, status)
            return
        if missing:
            for t in missing:
                closest = difflib.get_close_matches(t, list(self.targets), n=3)
                hint = f"; closest: {', '.join(map(_q, closest))}" if closest else ""
                mine.append(f"{rule.label()}: target {_q(t)} (from {_keys_text(keys)}) does not exist in the "
                            f"model{hint}")
                self.problems.append(mine[-1])
            self.report(keys, "bad-target", targets, rule, ops, shapes, mine)
            self.mentioned.update(t for t in targets if t in self.targets)  # not also "unfilled"
            return
        for i, t in enumerate(targets):
            expected = self.targets[t].shape
            if status == "mapped" and shapes and shapes[i] != expected:
                given = f"source{'s' * (len(keys) > 1)} {_shapes_text([self.sources[k].shape for k in keys])}"
                part = f" (part {i + 1} of {len(targets)})" if len(targets) > 1 else ""
                mine.append(f"shape mismatch: {_keys_text(keys)} -> target {_q(t)} ({rule.label()}): "
                            f"{given} -> {_ops_text(ops)} -> {shapes[i]}{part}, expected {expected}")
                self.problems.append(mine[-1])
                status = "shape-mismatch"
        claim = _Claim(keys, targets, rule, ops, shapes, mine, status)
        for t in targets:
            self.claims.setdefault(t, []).append(claim)

    def tied(self, rule: Rule, tie: Tie, keys: list[str], ops: tuple[Op, ...],
             shapes: tuple[tuple[int, ...], ...], mine: list[str], status: Status) -> None:
        """Keys whose target the model does not have but shares (a tie): checked, not read."""
        target = tie.to
        if tie.source not in self.targets:
            mine.append(f"{rule.label()}: target {_q(target)} (from {_keys_text(keys)}) does not exist in "
                        f"the model, and {tie.label()} ties it to {_q(tie.source)}, which does not exist "
                        f"either")
            self.problems.append(mine[-1])
            self.report(keys, "bad-target", (target,), rule, ops, shapes, mine)
            return
        tie_ops = self.resolve(tie)
        if isinstance(tie_ops, str):
            mine.append(tie_ops)
            status = "op-error"
        elif shapes:
            source_shape = self.targets[tie.source].shape
            try:
                (expected,) = infer_ops(tie_ops, [source_shape])
            except OpError as e:
                mine.append(f"{tie.label()}: target {_q(tie.source)} of shape {source_shape}: {e}")
                self.problems.append(mine[-1])
                status = "op-error"
            else:
                if shapes[0] != expected:
                    given = _shapes_text([self.sources[k].shape for k in keys])
                    mine.append(f"shape mismatch: {_keys_text(keys)} -> tied target {_q(target)} "
                                f"({rule.label()}, {tie.label()}): source {given} -> {_ops_text(ops)} -> "
                                f"{shapes[0]}, expected {expected} ({_q(tie.source)} {source_shape} -> "
                                f"{_ops_text(tie_ops)})")
                    self.problems.append(mine[-1])
                    status = "shape-mismatch"
        note = None
        if status == "mapped":
            status = "tied"
            note = f"tied: the model shares {_q(tie.source)} ({tie.label()}); not read"
        self.report(keys, status, (target,), rule, ops, shapes, mine, note)

    def fill_ties(self, assignments: list[Assignment], mentioned: set[str]) -> set[str]:
        """Append tie fills for leaves no key fills; the targets the ties took care of."""
        valid = {t for a in assignments for t in a.targets}
        handled: set[str] = set()
        pending = [t for t in self.mapping.ties if t.to in self.targets and t.to not in self.claims
                   and t.to not in mentioned]
        progress = True
        while progress:
            progress = False
            for tie in [t for t in pending if t.source in valid]:
                pending.remove(tie)
                progress = True
                handled.add(tie.to)
                if (filled := self.tie_fill(tie)) is not None:
                    assignments.append(filled)
                    valid.add(tie.to)
        for tie in pending:
            handled.add(tie.to)
            if tie.source not in self.targets:
                self.problems.append(f"{tie.label()}: target {_q(tie.to)} is not filled by any key, and its "
                                     f"'from' target {_q(tie.source)} does not exist in the model")
            elif not (tie.source in self.claims or tie.source in mentioned or tie.source in handled):
                self.problems.append(f"{tie.label()}: target {_q(tie.to)} is not filled by any key, and its "
                                     f"'from' target {_q(tie.source)} is not filled either")
        return handled

    def tie_fill(self, tie: Tie) -> Assignment | None:
        ops = self.resolve(tie)
        if isinstance(ops, str):
            return None
        source, target = self.targets[tie.source], self.targets[tie.to]
        try:
            (shape,) = infer_ops(ops, [source.shape])
        except OpError as e:
            self.problems.append(f"{tie.label()}: target {_q(tie.source)} of shape {source.shape}: {e}")
            return None
        if shape != target.shape:
            self.problems.append(f"shape mismatch: {tie.label()}: {_q(tie.source)} {source.shape} -> "
                                 f"{_ops_text(ops)} -> {shape}, expected {target.shape} for target "
                                 f"{_q(tie.to)}")
            return None
        if not _shard_fits(tie.label(), tie.shard, (tie.to,), (target,), self.problems):
            return None
        return Assignment((tie.to,), (), None, ops, (), (target,), tied_from=tie.source, shard=tie.shard)


def _shard_fits(label: str, shard: ShardSpec | None, targets: Sequence[str], specs: Sequence[TensorSpec],
                problems: list[str]) -> bool:
    """Whether ``shard`` has one entry per dimension of every target; a problem naming the rule if not."""
    for target, spec in zip(targets, specs, strict=True):
        if shard is not None and len(shard) != len(spec.shape):
            problems.append(f"{label}: 'shard' has {len(shard)} entries, target {_q(target)} has "
                            f"{len(spec.shape)} dimensions {spec.shape}")
            return False
    return True


def analyze(mapping: Mapping, sources: MappingABC[str, TensorSpec], targets: MappingABC[str, TensorSpec],
            config: MappingABC[str, Any] | None) -> Analysis:
    """Match every source key to rules and targets and check shapes; collect every problem.

    A key must be matched by exactly one rule, or by no rule and some ``ignore`` pattern (ignore patterns
    are consulted only for keys no rule matches). Each target leaf must be filled by exactly one key (or
    one gathered group of keys, or a tie), with the shape after the rule's ops equal to the leaf's. Keys of
    a rule with a concat/stack op are grouped by their expanded target(s) and joined in piece order. A key
    whose target is missing is ``ignored`` when its rule is ``optional`` and ``tied`` when a tie declares
    that target an alias of an existing one. Rules matching no key are only reported in ``unused_rules``,
    and their ops need not resolve against ``config``; a rule's config problem is reported once. Targets
    named by an ambiguous key are not also reported as unfilled. Tie fills come last among the
    assignments, each after the assignment filling its ``from``.
    """
    state = _Analyzer(mapping, sources, targets, config)
    used: set[int] = set()
    mentioned = state.mentioned
    groups: dict[tuple[int, tuple[str, ...], str], tuple[Rule, list[tuple[str, re.Match[str]]]]] = {}
    for key in sorted(sources):
        hits = [(rule, m) for rule in mapping.rules if (m := rule.pattern.search(key))]
        used.update(rule.index for rule, _ in hits)
        if len(hits) != 1:
            mentioned.update(m.expand(t) for rule, m in hits for t in rule.targets)
            state.reports[key] = _unplaced(key, sources[key], hits, mapping, state.problems)
            continue
        ((rule, m),) = hits
        expanded = tuple(m.expand(t) for t in rule.targets)
        if rule.gather is None:
            state.place(rule, expanded, [(key, m)])
        else:
            groups.setdefault((rule.index, expanded, ""), (rule, []))[1].append((key, m))
    for (_, expanded, _), (rule, members) in groups.items():
        state.place(rule, expanded, members)
    order = {t: i for i, t in enumerate(targets)}
    claims: list[_Claim] = []
    for target in sorted(state.claims, key=order.__getitem__):
        group = state.claims[target]
        claims += [c for c in group if c not in claims]
        if len(group) > 1:
            named = sorted(((k, c.rule) for c in group for k in c.keys), key=lambda kr: kr[0])
            who = [f"{_q(k)} ({rule.label()})" for k, rule in named]
            state.problems.append(f"target {_q(target)} is filled by {len(who)} keys: "
                                  f"{', '.join(who[:-1])} and {who[-1]}")
            for c in group:
                c.problems.append(state.problems[-1])
                c.status = "duplicate-target"
    assignments: list[Assignment] = []
    for c in claims:
        state.report(c.keys, c.status, c.targets, c.rule, c.ops, c.shapes, c.problems)
        specs = tuple(targets[t] for t in c.targets)
        if c.status == "mapped" and _shard_fits(c.rule.label(), c.rule.shard, c.targets, specs,
                                                state.problems):
            assignments.append(Assignment(c.targets, tuple(c.keys), c.rule, c.ops,
                                          tuple(sources[k] for k in c.keys), specs, shard=c.rule.shard))
    tie_filled = state.fill_ties(assignments, mentioned)
    covered = state.claims.keys() | mentioned | tie_filled
    unfilled = tuple(t for t in targets if t not in covered)
    state.problems += [f"target {_q(t)} is not filled by any rule" for t in unfilled]
    return Analysis(
        keys=tuple(state.reports[k] for k in sorted(state.reports)),
        assignments=tuple(assignments),
        unfilled=unfilled,
        unused_rules=tuple(r for r in mapping.rules if r.index not in used),
        problems=tuple(state.problems),
    )


def plan(mapping: Mapping, sources: MappingABC[str, TensorSpec], targets: MappingABC[str, TensorSpec],
         config: MappingABC[str, Any] | None) -> tuple[Assignment, ...]:
    """The assignments of :func:`analyze`; MappingError (named after the mapping) listing every problem."""
    analysis = analyze(mapping, sources, targets, config)
    if analysis.problems:
        raise MappingError(mapping.where, analysis.problems)
    return analysis.assignments
