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
from nnxport.mapping.ops import Op, OpError, Split, parse_op, show_value

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


def quoted(s: str) -> str:
    return f"'{_text(s)}'"


def _at(line: int | None) -> str:
    return "" if line is None else f"line {line}: "


def _hint(word: object, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _rule_label(index: int, line: int | None, source: str | None) -> str:
    parts = [f"line {line}"] if line is not None else []
    parts += [f"from {quoted(source)}"] if source is not None else []
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

def compile_regex(regex: str) -> re.Pattern[str] | str:
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
        problems.append(f"{label}: 'to' lists {', '.join(map(quoted, repeated))} more than once")
        ok = False
    for t in templates:
        if pattern is not None and (why := _check_template(pattern, t)):
            problems.append(f"{label}: invalid target template {quoted(t)}: {why}")
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
            problems.append(f"{label}: {_at(lines[j])}op {j + 1}: invalid 'by' template {quoted(by)}: {why}")


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
    elif isinstance(compiled := compile_regex(source), str):
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
    parts = ([] if line is None else [f"line {line}"]) + ([] if to is None else [f"to {quoted(to)}"])
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
                problems.append(f"{label}: target {quoted(to)} is already tied by {seen[to]}")
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
            problems.append(f"{at}match {quoted(key)} must be a value or a list of values, got "
                            f"{_type(value)}")
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
        elif isinstance(compiled := compile_regex(regex), str):
            problems.append(f"{at}ignore pattern {quoted(regex)} is not a valid regex: {compiled}")
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
