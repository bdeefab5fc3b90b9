"""Placements of the drafter (nnxport/mapping/draft.py) and how they become regex rules: numbers of the keys
become ``(\\d+)`` groups that the targets refer to with backreferences, as long as every instance agrees and
no rule matches another rule's keys; gathered pieces (concat) and stacked experts get their own group."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_NUM = re.compile(r"(\d+)")

@dataclass
class _Placement:
    keys: tuple[str, ...]                  # one key, or the gathered pieces in order
    targets: tuple[str, ...]               # one target, or the split parts in order
    ops: list[dict[str, Any]]              # ops before the gather / split
    gather: tuple[int, int] | None = None  # (component position of the pieces, concat axis)
    pieces: tuple[str, ...] = ()
    split: tuple[int, int, list[int]] | None = None  # (component position of the parts, axis, sizes)
    notes: list[str] = field(default_factory=list)
    stack: int | None = None               # component position of the expert index of stacked keys



# ---------------------------------------------------------------------------------------- generalising

@dataclass
class _Rule:
    members: list[_Placement]
    regex: str
    to: list[str]
    ops: list[dict[str, Any]]
    notes: list[str]


def _pattern_text(p: _Placement) -> str:
    """The key with the gathered pieces' (or stacked experts') component replaced by a marker."""
    if p.gather is None and p.stack is None:
        return p.keys[0]
    parts = p.keys[0].split(".")
    if p.stack is not None:
        parts[p.stack] = "\x01"
    else:
        parts[p.gather[0]] = "\x00"  # type: ignore[index]
    return ".".join(parts)


def _targets_text(p: _Placement) -> list[str]:
    return list(p.targets)


def _split_nums(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    pieces = _NUM.split(text)
    return tuple(pieces[0::2]), tuple(int(x) for x in pieces[1::2])


def _generalise(group: list[_Placement], restrict: bool) -> tuple[str, list[str], int | None] | None:
    """(regex, target templates, number of the gathered pieces' group) covering every placement of
    ``group`` (same skeletons and ops), or None when the targets' numbers cannot be expressed through the
    keys' numbers. ``restrict``: number groups match only the values seen, not any number."""
    key_texts = [_pattern_text(p) for p in group]
    key_skel, _ = _split_nums(key_texts[0])
    key_nums = [_split_nums(k)[1] for k in key_texts]
    tgt_nums = [[_split_nums(t)[1] for t in _targets_text(p)] for p in group]
    tgt_skels = [_split_nums(t)[0] for t in _targets_text(group[0])]
    n_key = len(key_nums[0])
    refs: list[list[int | None]] = []
    for ti, _skel in enumerate(tgt_skels):
        row: list[int | None] = []
        for j in range(len(tgt_nums[0][ti])):
            values = [nums[ti][j] for nums in tgt_nums]
            if len(set(values)) == 1:
                row.append(None)  # a constant: written as it is
                continue
            cand = [i for i in range(n_key) if all(key_nums[m][i] == values[m] for m in range(len(group)))]
            if not cand:
                return None
            row.append(cand[0])
        refs.append(row)
    referenced = sorted({i for row in refs for i in row if i is not None})
    # regex: text pieces escaped, numbers as groups, literals or \d+
    group_no: dict[int, int] = {}
    regex = "^"
    next_group = 1
    marker_group: int | None = None
    for i, text in enumerate(key_skel):
        chunks = re.split("[\x00\x01]", text)
        for c_i, chunk in enumerate(chunks):
            regex += re.escape(chunk)
            if c_i < len(chunks) - 1:
                pieces = group[0].pieces
                regex += r"(\d+)" if group[0].stack is not None else \
                    "(" + "|".join(re.escape(x) for x in pieces) + ")"
                marker_group = next_group
                next_group += 1
        if i < n_key:
            values = sorted({nums[i] for nums in key_nums})
            alt = "|".join(str(v) for v in values)
            if i in referenced:
                regex += f"({alt})" if restrict else r"(\d+)"
                group_no[i] = next_group
                next_group += 1
            elif len(values) == 1:
                regex += str(values[0])
            else:
                regex += f"(?:{alt})" if restrict else r"\d+"
    regex += "$"
    to: list[str] = []
    for ti, skel in enumerate(tgt_skels):
        text = ""
        for j, chunk in enumerate(skel):
            text += chunk
            if j < len(refs[ti]):
                ref = refs[ti][j]
                text += str(tgt_nums[0][ti][j]) if ref is None else f"\\{group_no[ref]}"
        to.append(text)
    return regex, to, marker_group


def _signature(p: _Placement) -> tuple[Any, ...]:
    key_skel = _split_nums(_pattern_text(p))[0]
    tgt_skel = tuple(_split_nums(t)[0] for t in p.targets)
    return (key_skel, tgt_skel, repr(p.ops), p.gather, p.pieces, repr(p.split), p.stack)


def _rules(placements: list[_Placement], all_keys: list[str]) -> list[_Rule]:
    groups: dict[tuple[Any, ...], list[_Placement]] = {}
    for p in placements:
        groups.setdefault(_signature(p), []).append(p)
    todo = list(groups.values())
    rules: list[_Rule] = []
    while todo:
        group = todo.pop(0)
        made = None
        for restrict in (False, True):
            g = _generalise(group, restrict)
            if g is None:
                break
            rx = re.compile(g[0])
            mine = {k for p in group for k in p.keys}
            if {k for k in all_keys if rx.search(k)} == mine:
                made = g
                break
        if made is None:
            if len(group) == 1:
                raise AssertionError(f"cannot write a rule for {group[0].keys}")  # literal rules always fit
            todo += [[p] for p in group]
            continue
        notes = sorted({n for p in group for n in p.notes})
        rules.append(_Rule(group, made[0], made[1], _rule_ops(group[0], made[2]), notes))
    rules.sort(key=lambda r: min(_natural(k) for p in r.members for k in p.keys))
    return rules


def _rule_ops(p: _Placement, piece_group: int | None) -> list[dict[str, Any]]:
    ops = list(p.ops)
    if p.gather is not None:
        ops.append({"concat": {"axis": p.gather[1], "by": f"\\{piece_group}", "order": list(p.pieces)}})
    if p.stack is not None:
        ops.append({"stack": {"axis": 0, "by": f"\\{piece_group}", "order": "indices"}})
    if p.split is not None:
        _, axis, sizes = p.split
        if len(set(sizes)) == 1:
            ops.append({"split": {"axis": axis, "parts": len(sizes)}})
        else:
            ops.append({"split": {"axis": axis, "sizes": sizes}})
    return ops


def _natural(text: str) -> tuple[Any, ...]:
    return tuple(int(x) if x.isdigit() else x for x in _NUM.split(text))


def _ignore_patterns(keys: list[str]) -> list[str]:
    """Regexes for buffer keys: numbers generalised, one pattern per shape of key."""
    out: list[str] = []
    for k in keys:
        skel, nums = _split_nums(k)
        regex = "^" + r"\d+".join(re.escape(s) for s in skel) + "$" if nums else f"^{re.escape(k)}$"
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("num_batches_tracked", "inv_freq") and "." in k:
            regex = rf"\.{re.escape(leaf)}$"
        if regex not in out:
            out.append(regex)
    return out


