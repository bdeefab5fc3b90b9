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
import stat
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nnxport.errors import MappingError, option
from nnxport.mapping.loader import (
    MAX_MAPPING_BYTES,
    compile_regex,
    escaped,
    item_line,
    key_line,
    other_line,
    parse_yaml,
)
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


def quoted(s: str) -> str:
    return f"'{escaped(s)}'"


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


def _type(value: object) -> str:
    if isinstance(value, list) and not value:
        return "an empty list"
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}
    for t, name in names.items():
        if isinstance(value, t):
            return name
    return f"{type(value).__name__} {show_value(value)}"


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
    at = _at(other_line(key_line(spec, "shard"), line))
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
            at = _at(other_line(key_line(spec, key), line))
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
        at = _at(other_line(key_line(spec, "optional"), line))
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
            at_line = other_line(item_line(op_specs, j), line)
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
        problems.append(f"{_at(key_line(doc, 'tie'))}'tie' must be a list of {{to: TARGET, from: TARGET}} "
                        f"entries, got {_type(specs)}")
        return []
    ties: list[Tie] = []
    seen: dict[str, str] = {}
    for i, spec in enumerate(specs):
        line = item_line(specs, i) or key_line(doc, "tie")
        if not isinstance(spec, dict):
            problems.append(f"{_tie_label(i, line, None)}: a tie is a mapping with 'to' and 'from', "
                            f"got {_type(spec)}")
            continue
        to, source = spec.get("to"), spec.get("from")
        label = _tie_label(i, line, to if isinstance(to, str) else None)
        n = len(problems)
        for key in spec:
            if key not in TIE_KEYS:
                at = _at(other_line(key_line(spec, key), line))
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
                at = _at(other_line(item_line(op_specs, j), line))
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
    line = key_line(doc, "match")
    if not isinstance(match, dict):
        problems.append(f"{_at(line)}'match' must be a mapping like {{model_type: resnet}}, "
                        f"got {_type(match)}")
        return {}
    scalars = (str, int, float, bool, type(None))
    out: dict[str, Any] = {}
    for key, value in match.items():
        at = _at(key_line(match, key) or line)
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
        problems.append(f"{_at(key_line(doc, 'ignore'))}'ignore' must be a list of regexes, "
                        f"got {_type(ignore)}")
        return []
    out: list[re.Pattern[str]] = []
    for i, regex in enumerate(ignore):
        at = _at(item_line(ignore, i) or key_line(doc, "ignore"))
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
    doc, problems = parse_yaml(text, where)
    if not isinstance(doc, dict):
        raise MappingError(where, [*problems, f"a mapping file is a YAML mapping with keys "
                                               f"{', '.join(REQUIRED_KEYS)}; got {_type(doc)}"])
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"{_at(key_line(doc, key))}unknown key {show_value(key)}{_hint(key, TOP_KEYS)}; "
                            f"a mapping has {', '.join(TOP_KEYS)}")
    problems += [f"missing required key '{key}'" for key in REQUIRED_KEYS if key not in doc]
    version = doc.get("version", VERSION)
    if type(version) is not int or version != VERSION:
        problems.append(f"{_at(key_line(doc, 'version'))}unsupported version {show_value(version)} "
                        f"(this nnxport reads version {VERSION})")
    model = doc.get("model", "?")
    if not isinstance(model, str) or not model.strip():
        problems.append(f"{_at(key_line(doc, 'model'))}'model' must be a family name or "
                        f"'package.module:Class', got {_type(model)}")
    match = _load_match(doc, problems)
    ignore = _load_ignore(doc, problems)
    rules: list[Rule] = []
    specs = doc.get("rules")
    if "rules" in doc and (not isinstance(specs, list) or not specs):
        problems.append(f"{_at(key_line(doc, 'rules'))}'rules' must be a non-empty list of "
                        f"{{from: REGEX, to: TARGET}} rules, got {_type(specs)}")
    elif isinstance(specs, list):
        for i, spec in enumerate(specs):
            rule = _load_rule(i, item_line(specs, i), spec, problems)
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
                                     f"pass {option('mapping')} NAME|PATH to choose one"])
    names = ", ".join(m.name for m in found)
    raise MappingError(_SELECT, [f"several mappings match {what}: {names}; "
                                 f"pass {option('mapping')} to choose one"])
