"""Mapping analysis: a mapping's rules x the source's tensors x the model's leaves -> an Analysis.

Pure: shapes only (:class:`TensorSpec`), no tensor data, no jax. Every problem is collected (one line
each) and reported together; the plan (:mod:`nnxport.pipeline.plan`) raises them as one MappingError
before any tensor is read.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nnxport.errors import MappingError
from nnxport.mapping.ops import Op, OpError, infer_ops
from nnxport.mapping.schema import Rule, quoted

if TYPE_CHECKING:
    from nnxport.mapping.schema import Mapping, ShardSpec, Status, Tie


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
    Run the ops with :func:`nnxport.mapping.ops.apply_ops` over the source arrays (or the ``tied_from``
    value).
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

    def checked(self, where: str) -> tuple[Assignment, ...]:
        """The assignments, or a MappingError (``where``: the mapping) listing every problem together."""
        if self.problems:
            raise MappingError(where, self.problems)
        return self.assignments


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
        return f"key {quoted(keys[0])}"
    return f"keys {', '.join(map(quoted, keys[:-1]))} and {quoted(keys[-1])}"


def _targets_text(targets: Sequence[str]) -> str:
    return ("target " if len(targets) == 1 else "targets ") + ", ".join(map(quoted, targets))


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
        problem = f"ambiguous: key {quoted(key)} matched by {', '.join(names[:-1])} and {names[-1]}"
        status = "ambiguous"
    elif not any(p.search(key) for p in mapping.ignore):
        problem = f"unmatched source key {quoted(key)} (no rule or ignore pattern matches)"
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
        if getattr(gather, "indices", False):  # order: indices -> the pieces are exactly 0..N-1
            order = tuple(str(i) for i in range(len(pieces)))
        wrong: list[str] = []
        if order is not None:
            if missing := [p for p in order if p not in pieces]:
                wrong.append(f"missing piece{'s' * (len(missing) > 1)} {', '.join(map(quoted, missing))}")
            extra = sorted((p for p in pieces if p not in order), key=_natural)
            if extra:
                wrong.append(f"unexpected piece{'s' * (len(extra) > 1)} " + ", ".join(
                    f"{quoted(p)} ({_keys_text(pieces[p])})" for p in extra))
        for piece, keys in sorted(pieces.items(), key=lambda kv: _natural(kv[0])):
            if len(keys) > 1:
                wrong.append(f"piece {quoted(piece)} is given by {len(keys)} {_keys_text(keys)}")
        rank = {p: i for i, p in enumerate(order or ())}
        ordered = sorted(pieces, key=lambda p: (rank.get(p, len(rank)), _natural(p)))
        keys = [k for p in ordered for k in pieces[p]]
        if not wrong:
            return keys, None
        what = ("" if order is None else " (order: indices)" if getattr(gather, "indices", False)
                else f" (order: {', '.join(order)})")
        return keys, (f"{rule.label()}: {_targets_text(targets)} gathers pieces by "
                      f"{quoted(by) if by is not None else 'key'}: {'; '.join(wrong)}{what}")

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
                return f"{rule.label()}: key {quoted(key)} of shape {shape}: {e}"
        try:
            out = infer_ops(ops[cut:], shapes)
        except OpError as e:
            given = ", ".join(f"{quoted(k)} {s}" for k, s in zip(keys, shapes, strict=True))
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
                                 f"{_targets_text(twice)} more than once ({', '.join(map(quoted, targets))})")
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
                mixed = ", ".join(f"{quoted(k)} {self.sources[k].dtype}" for k in keys)
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
                hint = f"; closest: {', '.join(map(quoted, closest))}" if closest else ""
                mine.append(f"{rule.label()}: target {quoted(t)} (from {_keys_text(keys)}) does not exist in "
                            f"the model{hint}")
                self.problems.append(mine[-1])
            self.report(keys, "bad-target", targets, rule, ops, shapes, mine)
            self.mentioned.update(t for t in targets if t in self.targets)  # not also "unfilled"
            return
        for i, t in enumerate(targets):
            expected = self.targets[t].shape
            if status == "mapped" and shapes and shapes[i] != expected:
                given = f"source{'s' * (len(keys) > 1)} {_shapes_text([self.sources[k].shape for k in keys])}"
                part = f" (part {i + 1} of {len(targets)})" if len(targets) > 1 else ""
                mine.append(f"shape mismatch: {_keys_text(keys)} -> target {quoted(t)} ({rule.label()}): "
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
            mine.append(f"{rule.label()}: target {quoted(target)} (from {_keys_text(keys)}) does not exist "
                        f"in the model, and {tie.label()} ties it to {quoted(tie.source)}, which does not "
                        f"exist either")
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
                mine.append(f"{tie.label()}: target {quoted(tie.source)} of shape {source_shape}: {e}")
                self.problems.append(mine[-1])
                status = "op-error"
            else:
                if shapes[0] != expected:
                    given = _shapes_text([self.sources[k].shape for k in keys])
                    mine.append(f"shape mismatch: {_keys_text(keys)} -> tied target {quoted(target)} "
                                f"({rule.label()}, {tie.label()}): source {given} -> {_ops_text(ops)} -> "
                                f"{shapes[0]}, expected {expected} ({quoted(tie.source)} {source_shape} -> "
                                f"{_ops_text(tie_ops)})")
                    self.problems.append(mine[-1])
                    status = "shape-mismatch"
        note = None
        if status == "mapped":
            status = "tied"
            note = f"tied: the model shares {quoted(tie.source)} ({tie.label()}); not read"
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
                self.problems.append(f"{tie.label()}: target {quoted(tie.to)} is not filled by any key, and "
                                     f"its 'from' target {quoted(tie.source)} does not exist in the model")
            elif not (tie.source in self.claims or tie.source in mentioned or tie.source in handled):
                self.problems.append(f"{tie.label()}: target {quoted(tie.to)} is not filled by any key, and "
                                     f"its 'from' target {quoted(tie.source)} is not filled either")
        return handled

    def tie_fill(self, tie: Tie) -> Assignment | None:
        ops = self.resolve(tie)
        if isinstance(ops, str):
            return None
        source, target = self.targets[tie.source], self.targets[tie.to]
        try:
            (shape,) = infer_ops(ops, [source.shape])
        except OpError as e:
            self.problems.append(f"{tie.label()}: target {quoted(tie.source)} of shape {source.shape}: {e}")
            return None
        if shape != target.shape:
            self.problems.append(f"shape mismatch: {tie.label()}: {quoted(tie.source)} {source.shape} -> "
                                 f"{_ops_text(ops)} -> {shape}, expected {target.shape} for target "
                                 f"{quoted(tie.to)}")
            return None
        if not _shard_fits(tie.label(), tie.shard, (tie.to,), (target,), self.problems):
            return None
        return Assignment((tie.to,), (), None, ops, (), (target,), tied_from=tie.source, shard=tie.shard)


def _shard_fits(label: str, shard: ShardSpec | None, targets: Sequence[str], specs: Sequence[TensorSpec],
                problems: list[str]) -> bool:
    """Whether ``shard`` has one entry per dimension of every target; a problem naming the rule if not."""
    for target, spec in zip(targets, specs, strict=True):
        if shard is not None and len(shard) != len(spec.shape):
            problems.append(f"{label}: 'shard' has {len(shard)} entries, target {quoted(target)} has "
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
            who = [f"{quoted(k)} ({rule.label()})" for k, rule in named]
            state.problems.append(f"target {quoted(target)} is filled by {len(who)} keys: "
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
    state.problems += [f"target {quoted(t)} is not filled by any rule" for t in unfilled]
    return Analysis(
        keys=tuple(state.reports[k] for k in sorted(state.reports)),
        assignments=tuple(assignments),
        unfilled=unfilled,
        unused_rules=tuple(r for r in mapping.rules if r.index not in used),
        problems=tuple(state.problems),
    )
