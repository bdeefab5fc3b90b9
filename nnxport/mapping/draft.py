"""Draft a mapping: match a checkpoint's keys to a model's leaves by names, layer indices and shapes.

Pure: source and target *specs* in (shapes and dtypes, no tensor data), YAML text out. What it does, in
order (docs/draft.md has the full story):

1. Every path is parsed into canonical words (``LayerNorm`` -> ``norm``, ``query`` -> ``q``, ...), its numeric
   indices (``layers.3`` and ``conv2`` give 3 and 2) and its leaf kind (``weight``, ``kernel``, ``scale``...).
2. A key and a leaf are *compatible* when their leaves agree (a weight fills a kernel, scale or embedding, a
   running_mean a mean, ...), their indices do not contradict each other, and the key's shape turns into the
   leaf's through the ops a torch -> NNX port needs: a transpose for kernels (Linear [out, in] -> [in, out],
   Conv OIHW -> HWIO, Conv1d OIW -> WIO), a reshape that only adds or drops axes of size 1.
3. Leaves that no single key fits are tried as a concat of sibling keys (ViT's query/key/value into one qkv
   kernel), keys that fit no single leaf as a split into sibling leaves (GPT-2's fused c_attn); a key whose
   name spells a fused set (Phi-3's qkv_proj, gate_up_proj) is split into the leaves it names first.
   Per-expert keys (``experts.N.*``, numbered 0..E-1) count as one key of the stacked shape
   (nnxport/mapping/draft_layouts.py) and are written as a rule ending in a ``stack``.
4. The rest is one assignment problem (scipy's linear_sum_assignment) maximising name similarity (shared
   words weighted by rarity) with a bonus for equal index tuples.
5. Placements are generalised into regex rules: numbers become ``(\\d+)`` groups that the target refers to
   with backreferences, as long as every instance agrees and no rule matches another rule's keys.
6. Buffers (``num_batches_tracked``, ``position_ids``, ``inv_freq``, attention-mask buffers) become ``ignore``
   entries, and so do top-level parts of the checkpoint that the model lacks (a multimodal checkpoint's
   vision tower) when every leaf is filled; whatever could not be placed is listed in YAML comments, with
   the reason where one is known (a fused tensor of all experts needs a split), and in
   :attr:`Draft.unplaced` / :attr:`Draft.unfilled`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxport.errors import NnxportError
from nnxport.mapping.analysis import TensorSpec, analyze
from nnxport.mapping.draft_layouts import foreign_parts, stack_groups, unplaced_reason
from nnxport.mapping.draft_rules import _ignore_patterns, _Placement, _rules
from nnxport.mapping.schema import Mapping, load_mapping_text

__all__ = ["Draft", "draft_mapping"]

# ------------------------------------------------------------------------------------------------- words

#: Component (lower case, underscores removed) or word -> canonical word.
SYNONYMS: dict[str, str] = {
    "convolution": "conv", "conv": "conv", "conv2d": "conv",
    "normalization": "norm", "norm": "norm", "layernorm": "norm", "batchnorm": "norm", "bn": "norm",
    "ln": "norm", "rmsnorm": "norm", "groupnorm": "norm",
    "attention": "attn", "attn": "attn", "selfattn": "attn", "selfattention": "attn",
    "query": "q", "q": "q", "key": "k", "k": "k", "value": "v", "v": "v",
    "output": "o", "out": "o", "o": "o",
    "embeddings": "embed", "embedding": "embed", "embed": "embed", "embedder": "embed", "embeds": "embed",
    "position": "position", "positions": "position", "pos": "position",
    "layers": "layer", "layer": "layer", "blocks": "layer", "block": "layer", "h": "layer",
    "mlp": "mlp", "ffn": "mlp", "feedforward": "mlp",
    "classifier": "classifier", "head": "head",
}
#: Whole components whose digits are part of the name, not an index (Mixtral's and Llama's w1/w3/w2).
WHOLE: dict[str, str] = {"w1": "gate", "w3": "up", "w2": "down"}
#: Words that say nothing about which leaf a key fills.
GENERIC = {"proj", "dense", "model", "module", "self", "weight", "bias"}
BUFFER_LEAVES = ("num_batches_tracked", "position_ids", "inv_freq", "masked_bias")
#: Source leaf -> the target leaves it may fill.
LEAVES: dict[str, tuple[str, ...]] = {
    "weight": ("kernel", "scale", "embedding", "weight"),
    "bias": ("bias",), "beta": ("bias",), "gamma": ("scale",),
    "running_mean": ("mean",), "running_var": ("var",),
}
STANDARD_TARGET_LEAVES = {"kernel", "bias", "scale", "embedding", "mean", "var"}
KERNEL_PERMS = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}
_NUM = re.compile(r"(\d+)")


def _words(component: str) -> set[str]:
    if component.lower() in WHOLE:
        return {WHOLE[component.lower()]}
    c = re.sub(r"_?\d+$", "", component)
    whole = c.lower().replace("_", "")
    if whole in SYNONYMS:
        return {SYNONYMS[whole]}
    pieces = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", c.replace("_", " "))
    out = set()
    for p in pieces:
        w = p.lower()
        if w.isdigit():
            continue
        w = SYNONYMS.get(w, w)
        if w not in GENERIC:
            out.add(w)
    return out


@dataclass(frozen=True)
class _Path:
    text: str
    parts: tuple[str, ...]
    indices: tuple[int, ...]
    words: frozenset[str]
    leaf: str

    @classmethod
    def parse(cls, text: str) -> _Path:
        parts = tuple(text.split("."))
        indices: list[int] = []
        words: set[str] = set()
        for comp in parts[:-1]:
            if comp.isdigit():
                indices.append(int(comp))
                continue
            m = re.search(r"(\d+)$", comp)
            if m and comp.lower() not in WHOLE:
                indices.append(int(m.group(1)))
            words |= _words(comp)
        return cls(text, parts, tuple(indices), frozenset(words), parts[-1])


def _indices_compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _fits(src: _Path, tgt: _Path) -> bool:
    """Leaf kinds and indices allow ``src`` to fill ``tgt`` (shapes aside)."""
    return _leaf_compatible(src, tgt) and _indices_compatible(src.indices, tgt.indices)


def _leaf_compatible(src: _Path, tgt: _Path) -> bool:
    allowed = LEAVES.get(src.leaf)
    if allowed is not None:
        return tgt.leaf in allowed
    # a non-standard leaf (cls_token, position_embeddings): a non-standard target leaf, or the same name
    return tgt.leaf == src.leaf or tgt.leaf not in STANDARD_TARGET_LEAVES


# --------------------------------------------------------------------------------------------------- ops

def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _ops_for(s: tuple[int, ...], t: tuple[int, ...], target_leaf: str, square_direct: bool
             ) -> list[dict[str, Any]] | None:
    """The ops that turn a source of shape ``s`` into a target leaf of shape ``t`` (None: none do)."""
    if target_leaf == "kernel" and len(s) >= 2:
        perm = KERNEL_PERMS.get(len(s))
        if perm is None:
            return None
        ts = tuple(s[p] for p in perm)
        if ts == t and s == t:
            return [] if square_direct else [{"transpose": list(perm)}]
        if ts == t:
            return [{"transpose": list(perm)}]
        if s == t and len(s) == 2:  # GPT-2's Conv1D stores [in, out]
            return []
        if len(s) == 2 and math.prod(s) == math.prod(t) and len(t) > 2 and ts[0] == t[0]:
            return [{"transpose": list(perm)}, {"reshape": list(t)}]  # Linear -> LinearGeneral
        return None
    if target_leaf == "scale" and len(s) != 1:
        return None
    if s == t:
        return []
    if math.prod(s) == math.prod(t) and _squeeze(s) == _squeeze(t):
        return [{"reshape": list(t)}]
    return None


def _apply_shape(shape: tuple[int, ...], ops: list[dict[str, Any]]) -> tuple[int, ...]:
    for op in ops:
        if "transpose" in op:
            shape = tuple(shape[p] for p in op["transpose"])
        elif "reshape" in op:
            shape = tuple(op["reshape"])
    return shape


def _piece_ops(s: tuple[int, ...], target_leaf: str, square_direct: bool) -> list[dict[str, Any]]:
    """Per-piece ops of a concat / the op before a split: the kernel transpose (unless the checkpoint
    stores kernels [in, out])."""
    if target_leaf == "kernel" and len(s) in KERNEL_PERMS and not (square_direct and len(s) == 2):
        return [{"transpose": list(KERNEL_PERMS[len(s)])}]
    return []


# ---------------------------------------------------------------------------------------------- placements

def _order(names: list[str], hint: str) -> tuple[list[str], str | None]:
    """Pieces ordered as ``hint`` (the fused leaf's or key's name) spells them, else q, k, v, else by name;
    the second value is a note when the order is a guess."""
    canon = {n: (sorted(_words(n)) or [n.lower()])[0] for n in names}
    h = hint.lower()
    found = {n: h.find(c) for n, c in canon.items()}
    if all(p >= 0 for p in found.values()) and len(set(found.values())) == len(names):
        return sorted(names, key=found.__getitem__), None
    rank = {"q": 0, "k": 1, "v": 2}
    if all(c in rank for c in canon.values()) and len(set(canon.values())) == len(names):
        return sorted(names, key=lambda n: rank[canon[n]]), None
    ordered = sorted(names)
    return ordered, f"order {', '.join(ordered)} is a guess (by name): check it"


def _sibling_groups(paths: list[_Path]) -> dict[tuple[int, tuple[str, ...]], list[_Path]]:
    """Paths grouped by (position, parts with that non-numeric, non-leaf component wildcarded)."""
    groups: dict[tuple[int, tuple[str, ...]], list[_Path]] = {}
    for p in paths:
        for i, comp in enumerate(p.parts[:-1]):
            if comp.isdigit():
                continue
            groups.setdefault((i, (*p.parts[:i], "*", *p.parts[i + 1:])), []).append(p)
    return {k: v for k, v in groups.items() if len(v) >= 2}


def _name_score(a: _Path, b: _Path, weight: MappingABC[str, float]) -> float:
    return sum(weight.get(w, 0.0) for w in a.words & b.words)


class _Drafter:
    def __init__(self, sources: MappingABC[str, TensorSpec], targets: MappingABC[str, TensorSpec]):
        self.sources = dict(sources)
        # per-expert keys: one virtual key (expert index '*') each group, of the stacked shape
        self.stacks = stack_groups({k: v for k, v in sources.items() if not _is_buffer(k, v)})
        self.sources.update({v: g.spec for v, g in self.stacks.items()})
        self.targets = dict(targets)
        self.spath = {k: _Path.parse(k) for k in self.sources}
        self.tpath = {t: _Path.parse(t) for t in self.targets}
        df: dict[str, int] = {}
        for p in self.tpath.values():
            for w in p.words:
                df[w] = df.get(w, 0) + 1
        n = max(len(self.tpath), 1)
        self.weight = {w: 1.0 + math.log(n / c) for w, c in df.items()}

    def ops(self, key: str, target: str, square_direct: bool) -> list[dict[str, Any]] | None:
        s, t = self.spath[key], self.tpath[target]
        if key in self.stacks:
            return self.stack_ops(key, target, square_direct)
        if not _leaf_compatible(s, t) or not _indices_compatible(s.indices, t.indices):
            return None
        if self.sources[key].dtype in ("bool", "int64", "int32", "uint8") and self.targets[target].dtype \
                .startswith("float"):
            return None
        shape, tshape = self.sources[key].shape, self.targets[target].shape
        ops = _ops_for(shape, tshape, t.leaf, square_direct)
        if ops is None and len(shape) == 3 and t.leaf not in STANDARD_TARGET_LEAVES \
                and (shape[0], shape[2], shape[1]) == tshape:  # fused experts [E, out, in] -> [E, in, out]
            return [{"transpose": [0, 2, 1]}]
        return ops

    def stack_ops(self, key: str, target: str, square_direct: bool) -> list[dict[str, Any]] | None:
        """Per-expert ops for a stack group into an expert-batched leaf [E, ...] (None: it does not fit)."""
        s, t, group = self.spath[key], self.tpath[target], self.stacks[key]
        tspec = self.targets[target]
        weight_like = s.leaf == "weight" and t.leaf not in ("bias", "scale", "embedding", "mean", "var")
        bias_like = s.leaf == "bias" and (t.leaf == "bias" or t.leaf.endswith("_bias"))
        if not (weight_like or bias_like) or not _indices_compatible(s.indices, t.indices) \
                or tspec.shape[:1] != (len(group.members),) or not tspec.dtype.startswith("float"):
            return None
        leaf = "kernel" if weight_like and len(group.piece.shape) == 2 else t.leaf
        return _ops_for(group.piece.shape, tspec.shape[1:], leaf, square_direct)

    def score(self, key: str, target: str) -> float:
        s, t = self.spath[key], self.tpath[target]
        score = _name_score(s, t, self.weight)
        if key in self.stacks:  # an expert-batched leaf is named for what it holds (experts.gate)
            score += 3.0 * len(_words(t.leaf) & s.words)
        if s.indices == t.indices:
            score += 10.0
        if s.leaf == "weight" and t.leaf == "embedding" and "embed" in s.words:
            score += 2.0
        if s.leaf == "weight" and t.leaf == "kernel" and "embed" not in s.words:
            score += 0.5
        if s.leaf not in LEAVES and (s.leaf == t.leaf or _words(s.leaf) & _words(t.leaf)):
            score += 3.0
        return score

    # -------------------------------------------------------------------------------------- groups

    def concat(self, target: str, free: list[str], square_direct: bool) -> _Placement | None:
        """Sibling keys whose per-piece results join along one axis into ``target``."""
        t = self.tpath[target]
        tshape = self.targets[target].shape
        cands = [self.spath[k] for k in free if k not in self.stacks and _fits(self.spath[k], t)
                 and self.spath[k].indices == t.indices]
        best: tuple[float, _Placement] | None = None
        for (pos, _), members in _sibling_groups(cands).items():
            names = [m.parts[pos] for m in members]
            if len(set(names)) != len(names) or len({len(self.sources[m.text].shape) for m in members}) > 1:
                continue
            ops = _piece_ops(self.sources[members[0].text].shape, t.leaf, square_direct)
            shapes = {m.parts[pos]: _apply_shape(self.sources[m.text].shape, ops) for m in members}
            ranks = {len(s) for s in shapes.values()}
            if ranks != {len(tshape)}:
                continue
            for subset, note in _subsets(names, t.parts[-2] if len(t.parts) > 1 else t.text):
                axis = _join_axis([shapes[n] for n in subset], tshape)
                if axis is None:
                    continue
                by_name = {m.parts[pos]: m.text for m in members}
                score = sum(self.score(by_name[n], target) for n in subset) / len(subset)
                placement = _Placement(tuple(by_name[n] for n in subset), (target,), ops, (pos, axis),
                                       tuple(subset), notes=[note] if note else [])
                if best is None or score > best[0]:
                    best = (score, placement)
                break
        return None if best is None else best[1]

    def split(self, key: str, free: list[str], square_direct: bool, spelled: bool = False
              ) -> _Placement | None:
        """Sibling leaves that one key's (transposed) tensor splits into along one axis (``spelled``: only
        into the leaves that the key's fused name spells, Phi-3's qkv_proj and gate_up_proj)."""
        s = self.spath[key]
        cands = [self.tpath[t] for t in free
                 if _fits(s, self.tpath[t]) and s.indices == self.tpath[t].indices]
        best: tuple[float, _Placement] | None = None
        for (pos, _), members in _sibling_groups(cands).items():
            names = [m.parts[pos] for m in members]
            if len(set(names)) != len(names):
                continue
            leaf = members[0].leaf
            ops = _piece_ops(self.sources[key].shape, leaf, square_direct)
            shape = _apply_shape(self.sources[key].shape, ops)
            tshapes = {m.parts[pos]: self.targets[m.text].shape for m in members}
            if {len(x) for x in tshapes.values()} != {len(shape)}:
                continue
            hint = s.parts[-2] if len(s.parts) > 1 else s.text
            for subset, note in _subsets(names, hint) if not spelled else [(_spelled(names, hint), None)]:
                axis = _join_axis([tshapes[n] for n in subset], shape)
                if axis is None:
                    continue
                by_name = {m.parts[pos]: m.text for m in members}
                score = sum(self.score(key, by_name[n]) for n in subset) / len(subset)
                sizes = [tshapes[n][axis] for n in subset]
                placement = _Placement((key,), tuple(by_name[n] for n in subset), ops,
                                       split=(pos, axis, sizes), notes=[note] if note else [])
                if best is None or score > best[0]:
                    best = (score, placement)
                break
        return None if best is None else best[1]

    # ---------------------------------------------------------------------------------- assignment

    def assign(self, keys: list[str], targets: list[str], square_direct: bool) -> list[_Placement]:
        from scipy.optimize import linear_sum_assignment

        if not keys or not targets:
            return []
        neg = -1e9
        scores = np.full((len(keys), len(targets)), neg)
        ops: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for i, k in enumerate(keys):
            for j, t in enumerate(targets):
                o = self.ops(k, t, square_direct)
                if o is not None:
                    ops[i, j] = o
                    scores[i, j] = self.score(k, t) - (0.5 if any("reshape" in x for x in o) else 0.0)
                    if self.tpath[t].leaf == "kernel" and len(self.sources[k].shape) == 2 \
                            and bool(o) == square_direct:
                        scores[i, j] -= 1.0  # against the convention this checkpoint seems to follow
        rows, cols = linear_sum_assignment(scores, maximize=True)
        compatible_per_key = {i: sum(1 for (a, _) in ops if a == i) for i in range(len(keys))}
        compatible_per_target = {j: sum(1 for (_, b) in ops if b == j) for j in range(len(targets))}
        out = []
        for i, j in zip(rows, cols, strict=True):
            if (i, j) not in ops:
                continue
            named = _name_score(self.spath[keys[i]], self.tpath[targets[j]], self.weight) > 0
            unique = compatible_per_key[i] == 1 and compatible_per_target[j] == 1
            if named or unique or self.spath[keys[i]].indices == self.tpath[targets[j]].indices:
                out.append(_Placement((keys[i],), (targets[j],), ops[i, j]))
        return out

    def run(self, square_direct: bool) -> tuple[list[_Placement], list[str], list[str]]:
        """Placements, keys left, targets left."""
        grouped = {k for g in self.stacks.values() for k in g.members}
        keys = [k for k in sorted(self.sources) if k not in grouped and not _is_buffer(k, self.sources[k])]
        targets = list(self.targets)
        placements: list[_Placement] = []
        for k in keys:  # a fused name (qkv_proj, gate_up_proj) splits even where one piece's shape fits
            if _FUSED_NAME.search(self.spath[k].parts[-2] if len(self.spath[k].parts) > 1 else k):
                free = [t for t in targets if not any(t in p.targets for p in placements)]
                if (p := self.split(k, free, square_direct, spelled=True)) is not None:
                    placements.append(p)
        lone_t = [t for t in targets if not any(self.ops(k, t, square_direct) is not None for k in keys)]
        for t in (t for t in lone_t if not any(t in p.targets for p in placements)):
            free = [k for k in keys if not any(k in p.keys for p in placements)]
            if (p := self.concat(t, free, square_direct)) is not None:
                placements.append(p)
        used_k = {k for p in placements for k in p.keys}
        used_t = {t for p in placements for t in p.targets}
        lone_k = [k for k in keys if k not in used_k
                  and not any(self.ops(k, t, square_direct) is not None for t in targets if t not in used_t)]
        for k in (k for k in lone_k if k not in self.stacks):
            free = [t for t in targets if t not in used_t]
            if (p := self.split(k, free, square_direct)) is not None:
                placements.append(p)
                used_k.add(k)
                used_t.update(p.targets)
        rest_k = [k for k in keys if k not in used_k]
        rest_t = [t for t in targets if t not in used_t]
        placements += self.assign(rest_k, rest_t, square_direct)
        for p in placements:  # a stack group's virtual key: its per-expert keys, in index order
            if (group := self.stacks.get(p.keys[0])) is not None:
                p.keys, p.stack = group.members, group.pos
        used_k = {k for p in placements for k in p.keys}
        used_t = {t for p in placements for t in p.targets}
        return placements, [k for k in sorted(self.sources) if k not in used_k and k not in self.stacks], \
            [t for t in targets if t not in used_t]


_FUSED_NAME = re.compile(r"(?:^|_)(?:qkv|gate_?up|up_?gate|w13)(?:_|$)", re.IGNORECASE)


def _spelled(names: list[str], hint: str) -> list[str]:
    """The names whose canonical word the fused ``hint`` spells (``gate_up_proj``: gate, up; ``qkv``: q, k,
    v), in the order it spells them."""
    tokens = hint.lower().split("_")
    canon = {n: (sorted(_words(n)) or [n.lower()])[0] for n in names}

    def at(c: str) -> int | None:
        for i, tok in enumerate(tokens):
            if tok == c:
                return i * 8
            if len(c) == 1 and set(tok) <= set("qkv") and c in tok:
                return i * 8 + tok.index(c)
        return None

    found = {n: at(c) for n, c in canon.items()}
    return sorted((n for n in names if found[n] is not None), key=lambda n: found[n] or 0)


def _subsets(names: list[str], hint: str) -> list[tuple[list[str], str | None]]:
    """Candidate piece lists, each with a note when its order is a guess: all of them, then q/k/v alone
    (a fused qkv next to a separate o)."""
    out = [_order(names, hint)]
    canon = {n: (sorted(_words(n)) or [n])[0] for n in names}
    qkv = [n for n in names if canon[n] in ("q", "k", "v")]
    if len(qkv) == 3 and len(qkv) < len(names):
        out.append(_order(qkv, hint))
    return out


def _join_axis(parts: list[tuple[int, ...]], whole: tuple[int, ...]) -> int | None:
    """The axis along which ``parts`` concatenate into ``whole`` (all other axes equal), or None."""
    if len(parts) < 2:
        return None
    for axis in range(len(whole)):
        if all(len(p) == len(whole) and all(p[d] == whole[d] for d in range(len(whole)) if d != axis)
               for p in parts) and sum(p[axis] for p in parts) == whole[axis]:
            return axis
    return None


def _is_buffer(key: str, spec: TensorSpec) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in BUFFER_LEAVES:
        return True
    # GPT-2-style causal-mask buffers: a 'bias' of shape [1, 1, n, n]
    return leaf == "bias" and len(spec.shape) == 4 and spec.shape[:2] == (1, 1) \
        and spec.shape[2] == spec.shape[3]


# ---------------------------------------------------------------------------------------------- output

def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str):
        return _q(value) if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) or value in (
            "true", "false", "null", "yes", "no", "on", "off", "y", "n") else value
    return str(value)


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join(map(str, spec.shape)) + "]"


@dataclass(frozen=True)
class Draft:
    """A drafted mapping: the YAML ``text`` (always loadable), the :class:`~nnxport.mapping.schema.Mapping` it
    loads to, the source keys it places or ignores, and what it could not place."""

    text: str
    mapping: Mapping
    placed: int
    ignored: tuple[str, ...]
    unplaced: tuple[str, ...]
    unfilled: tuple[str, ...]
    notes: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Every source key is placed or ignored and every model leaf is filled."""
        return not self.unplaced and not self.unfilled and not self.problems


def draft_mapping(sources: MappingABC[str, TensorSpec], targets: MappingABC[str, TensorSpec],
                  config: MappingABC[str, Any] | None, model: str, *, title: str = "draft") -> Draft:
    """Draft a mapping from ``sources`` (checkpoint keys) to ``targets`` (the model's leaves)."""
    drafter = _Drafter(sources, targets)
    placements, left_k, left_t = drafter.run(square_direct=False)
    # Square kernels cannot show whether the checkpoint stores [out, in] (torch Linear) or [in, out]
    # (GPT-2's Conv1D); the non-square ones can: when most of those are stored [in, out], so are these.
    direct = transposed = 0
    for p in placements:
        if p.gather is None and p.split is None and len(sources[p.keys[0]].shape) == 2 \
                and drafter.tpath[p.targets[0]].leaf == "kernel":
            shape = sources[p.keys[0]].shape
            if shape[0] != shape[1]:
                if p.ops:
                    transposed += 1
                else:
                    direct += 1
    square_direct = direct > transposed
    if square_direct:
        placements, left_k, left_t = drafter.run(square_direct=True)
    buffers = [k for k in left_k if _is_buffer(k, sources[k])]
    unplaced = [k for k in left_k if k not in buffers]
    foreign = {} if left_t else foreign_parts(unplaced, {k for p in placements for k in p.keys})
    unplaced = [k for k in unplaced if k.split(".", 1)[0] not in foreign]
    if not placements:
        raise NnxportError(f"{title}: no source key fits any leaf of the model (by leaf kind, indices and "
                           "shape): is it the right model and config?")
    rules = _rules(placements, list(sources))
    ignore = _ignore_patterns(buffers)
    others = {f"^{re.escape(r)}\\.": f"no key under '{r}.' ({len(ks)} keys) fits the model, which has no "
              "such part: ignored" for r, ks in foreign.items()}
    lines = [f"# nnxport mapping draft: {title}",
             f"# {sum(len(p.keys) for p in placements)} of {len(sources)} source keys placed by "
             f"{len(rules)} rules, {len(buffers)} ignored as buffers, "
             + (f"{sum(map(len, foreign.values()))} as parts the model lacks, " if foreign else "")
             + f"{len(unplaced)} not placed; "
             f"{len(targets) - len(left_t)} of {len(targets)} model leaves filled.",
             "# Matched by normalised names, layer indices and shapes: check it, then run",
             "#   nnxport convert SOURCE --mapping THIS_FILE   (parity says whether it is right)",
             "version: 1", f"model: {_q(model) if ':' in model else model}"]
    if ignore or others:
        lines.append("ignore:")
        lines += [f"  - {_q(x)}" for x in ignore]
        for x, note in others.items():
            lines += [f"  # NOTE: {note}", f"  - {_q(x)}"]
    lines.append("rules:")
    for r in rules:
        for n in r.notes:
            lines.append(f"  # NOTE: {n}")
        lines.append(f"  - from: {_q(r.regex)}")
        lines.append(f"    to: {_q(r.to[0]) if len(r.to) == 1 else _flow(r.to)}")
        if r.ops:
            lines.append(f"    ops: {_flow(r.ops)}")
    if unplaced:
        lines.append("# NOT PLACED: source keys that no rule covers (add a rule, or an ignore entry):")
        embedded = {sources[p.keys[0]].shape: p for p in placements
                    if len(p.keys) == 1 and drafter.tpath[p.targets[0]].leaf == "embedding"}
        for k in unplaced:
            line = f"#   {k}  {_shape(sources[k])} {sources[k].dtype}"
            twin = embedded.get(sources[k].shape)
            reason = unplaced_reason(k, sources[k], {t: targets[t] for t in left_t}, drafter.stacks)
            if reason is not None:
                line += f"  ({reason})"
            elif twin is not None:
                line += (f"  (the shape of {twin.keys[0]} -> {twin.targets[0]}: if it is a stored copy of "
                         "tied weights, ignore it)")
            lines.append(line)
    if left_t:
        lines.append("# NOT FILLED: model leaves that no rule fills:")
        lines += [f"#   {t}  {_shape(targets[t])} {targets[t].dtype}" for t in left_t]
    text = "\n".join(lines) + "\n"
    mapping = load_mapping_text(text, name=title)
    analysis = analyze(mapping, sources, targets, config)
    # the analysis repeats what the draft lists as not placed / not filled; anything else is a problem
    listed = {f"target '{t}' is not filled by any rule" for t in left_t}
    listed |= {f"unmatched source key '{k}' (no rule or ignore pattern matches)" for k in unplaced}
    problems = tuple(p for p in analysis.problems if p not in listed)
    notes = tuple(n for r in rules for n in r.notes) + tuple(others.values())
    ignored = tuple(buffers) + tuple(k for ks in foreign.values() for k in ks)
    return Draft(text, mapping, sum(len(p.keys) for p in placements), ignored, tuple(unplaced), tuple(left_t),
                 notes, problems)
