"""Per-expert keys for the drafter (nnxport/mapping/draft.py): MoE checkpoints store one tensor per expert
(``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``) where the model has
one expert-batched leaf ``[E, ...]``. The keys that differ only in the expert index become one *stack
group*, a virtual key of the stacked shape that the drafter matches like any other key and writes as a rule
ending in ``{stack: {axis: 0, by: '\\N', order: indices}}``. What the draft still cannot place gets a reason
(fused expert tensors, whose gate/up halves may be concatenated or interleaved)."""

from __future__ import annotations

import re
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass

from nnxport.mapping.analysis import TensorSpec

__all__ = ["StackGroup", "foreign_parts", "stack_groups", "unplaced_reason"]


@dataclass(frozen=True)
class StackGroup:
    """Keys that differ only in the expert index at component ``pos``, in index order 0..E-1."""

    members: tuple[str, ...]
    pos: int
    piece: TensorSpec

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec((len(self.members), *self.piece.shape), self.piece.dtype)


def _expert_pos(parts: list[str]) -> int | None:
    """The innermost numeric component that follows an ``experts`` component."""
    for i in range(len(parts) - 2, 0, -1):
        if parts[i].isdigit():
            return i if "expert" in parts[i - 1].lower() else None
    return None


def stack_groups(specs: MappingABC[str, TensorSpec]) -> dict[str, StackGroup]:
    """Virtual key (the expert index written ``*``) -> its group, for groups of 2 or more experts numbered
    exactly 0..E-1 whose tensors share one shape and dtype."""
    found: dict[tuple[int, str], dict[int, str]] = {}
    for key in specs:
        parts = key.split(".")
        pos = _expert_pos(parts)
        if pos is None:
            continue
        virtual = ".".join((*parts[:pos], "*", *parts[pos + 1:]))
        found.setdefault((pos, virtual), {})[int(parts[pos])] = key
    out: dict[str, StackGroup] = {}
    for (pos, virtual), by_index in found.items():
        members = tuple(by_index[i] for i in sorted(by_index))
        if len(members) < 2 or sorted(by_index) != list(range(len(members))):
            continue
        if len({(specs[k].shape, specs[k].dtype) for k in members}) != 1:
            continue
        out[virtual] = StackGroup(members, pos, specs[members[0]])
    return out


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[._]", text.lower()) if w and not w.isdigit()} - {"proj", "weight", "bias"}


_FUSED = re.compile(r"(?:^|_)(gate_up|up_gate|w13|w1w3|qkv|kv|gate_up_proj)(?:_|$)")


def unplaced_reason(key: str, spec: TensorSpec, unfilled: MappingABC[str, TensorSpec],
                    groups: MappingABC[str, StackGroup]) -> str | None:
    """Why ``key`` was left: a fused expert tensor that needs a split, or a per-expert key that no stacked
    leaf fits (None: no reason to give beyond its shape)."""
    parts = key.split(".")
    leaf = parts[-1] if parts[-1] not in ("weight", "bias") else parts[-2]
    if _FUSED.search(leaf.lower()) and len(spec.shape) >= 2 and any("expert" in p.lower() for p in parts):
        nums = [c for c in parts if c.isdigit()]
        near = [t for t in unfilled if [c for c in t.split(".") if c.isdigit()] == nums
                and len(unfilled[t].shape) == len(spec.shape) and unfilled[t].shape[:1] == spec.shape[:1]
                and _words(t.rsplit(".", 1)[-1]) & _words(leaf)]
        into = f" into {', '.join(near)}" if near else ""
        return (f"fused tensor of all experts: needs a split{into}; whether its halves are concatenated or "
                "interleaved the shapes cannot show: write that rule by hand, mappings/qwen3_moe.yaml has "
                "halves, mappings/gpt_oss.yaml interleaved")
    for virtual, g in groups.items():
        if key in g.members:
            return (f"per-expert key ({len(g.members)} experts at '{virtual}'): no stacked model leaf "
                    f"[{len(g.members)}, ...] fits it; a rule ending in {{stack: {{axis: 0, by: <the expert "
                    "group>, order: indices}} would gather them")
    return None


def foreign_parts(unplaced: list[str], placed: set[str]) -> dict[str, list[str]]:
    """Top-level parts of the checkpoint that the model does not have (a multimodal checkpoint's
    ``vision_tower.`` for a text model): first components of 2 or more unplaced keys, none of whose keys was
    placed. Only asked when every model leaf is filled."""
    roots: dict[str, list[str]] = {}
    for k in unplaced:
        if "." in k:
            roots.setdefault(k.split(".", 1)[0], []).append(k)
    return {r: ks for r, ks in roots.items()
            if len(ks) >= 2 and not any(p.startswith(r + ".") for p in placed)}
