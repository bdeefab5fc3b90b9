"""Per-layer parity: where in the network the NNX model starts to differ from the reference.

Pairs of modules come from the mapping, not from a table per family. Every mapped checkpoint tensor links
a source key (``encoder.layer.1.attention.self.query.weight``, renamed to the reference's parameter name
as ``from_pretrained`` does, :func:`reference_names`) to a target leaf (``layers.1.attn.q.kernel``).
A module's *weights* are the links under its path. A torch module and an NNX module are paired when they
have exactly the same weights (:func:`layer_groups`): dropping the leaf names pairs the modules that own the
tensors (``...query`` with ``layers.1.attn.q``), and comparing whole sets also pairs the blocks built from
them (``encoder.layer.1`` with ``layers.1``, ``...stages.2.layers.1`` with ``stages.2.blocks.1``), while a
torch module that computes more or less than any NNX module (BertAttention holds the LayerNorm that
nnxport's attention leaves to its layer) finds no partner. A weight split over several NNX modules (GPT-2's
``c_attn`` into q, k, v) or gathered from several torch modules (ViT's query, key, value into ``qkv``) pairs
the one module with the others' outputs concatenated on the last axis, in the mapping's order.

Both sides are captured in the one forward pass parity runs anyway: forward hooks on the paired torch modules
(first call, in completion order: a block comes after its sub-layers), and ``nnx.capture`` with
``method_outputs`` on the NNX side (it wraps the model's classes only for that call, so the models' normal
``__call__`` is untouched). Outputs are aligned before they are compared (:func:`align`) and compared like
the model's outputs, at the unpadded positions of text inputs. :func:`first_jump` names the first layer
whose error jumps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nnxport.parity.metrics import difference

#: A layer's error "jumps" when its max_rel_diff exceeds both the tolerance and JUMP_FACTOR times the
#: largest max_rel_diff of every layer before it (see :func:`first_jump`).
JUMP_FACTOR = 10.0

Link = tuple[str, str]
"""(source key, target leaf) of one mapped tensor."""


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _prefixes(module: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a`` (the model itself, ``""``, is never a layer)."""
    while module:
        yield module
        module = _parent(module)


def _depth(path: str) -> int:
    return path.count(".") + 1


@dataclass(frozen=True)
class LayerGroup:
    """Torch modules (``sources``, the reference's module names) and NNX modules (``targets``) holding the
    same weights.

    Not ``fused``: the sources (and the targets) wrap one another, outermost first, and differ only in what
    they compute around the same weights (transformers' BertIntermediate adds the activation to its Linear,
    ResNetEmbeddings the max-pool to its conv layer). ``direct_source`` / ``direct_target`` is the module
    that holds weights itself (the innermost, when there is one). The two direct ones are paired with each
    other; the other targets with the other sources, outermost with outermost, skipping sources whose
    output does not align (:func:`align`). ``fused``: one side has one module, the other several whose
    outputs are concatenated on the last axis, in mapping order, before they are compared. ``partial``:
    two modules that hold weights themselves and share some of them but not all, outside a fused group:
    the mapping crosses modules (a query's weight sent to the key, its bias to the query), which a correct
    mapping of the built-in families never does; each such pair is compared.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    direct_source: str | None = None
    direct_target: str | None = None
    fused: bool = False
    partial: bool = False


def layer_groups(assignments: Iterable[Any], names: Mapping[str, str] | None = None) -> list[LayerGroup]:
    """The module pairs of a mapping's assignments (:class:`nnxport.mapping.analysis.Assignment`: ``sources``,
    ``targets``, ``tied_from``). ``names`` renames source keys to the reference's parameter names
    (:func:`reference_names`); keys it lacks pair nothing (without ``names`` keys are taken as they are).
    Tie fills carry no source and pair nothing."""
    links: list[Link] = []
    split_order: dict[str, list[tuple[str, ...]]] = {}   # source module -> target module orders
    gather_order: dict[str, list[tuple[str, ...]]] = {}  # target module -> source module orders
    for a in assignments:
        keys = [k if names is None else names.get(k, "") for k in a.sources]
        if a.tied_from is not None or not all(keys):
            continue
        links += [(k, t) for k in keys for t in a.targets]
        for k in keys:
            split_order.setdefault(_parent(k), []).append(tuple(dict.fromkeys(_parent(t) for t in a.targets)))
        for t in a.targets:
            gather_order.setdefault(_parent(t), []).append(tuple(dict.fromkeys(_parent(k) for k in keys)))
    src_cover: dict[str, set[Link]] = {}
    tgt_cover: dict[str, set[Link]] = {}
    for link in links:
        for p in _prefixes(_parent(link[0])):
            src_cover.setdefault(p, set()).add(link)
        for p in _prefixes(_parent(link[1])):
            tgt_cover.setdefault(p, set()).add(link)
    by_cover: dict[frozenset[Link], tuple[list[str], list[str]]] = {}
    for p, cover in src_cover.items():
        by_cover.setdefault(frozenset(cover), ([], []))[0].append(p)
    for p, cover in tgt_cover.items():
        by_cover.setdefault(frozenset(cover), ([], []))[1].append(p)
    groups = []
    for sources, targets in by_cover.values():
        if sources and targets:
            sources.sort(key=_depth)
            targets.sort(key=_depth)
            groups.append(LayerGroup(tuple(sources), tuple(targets),
                                     next((s for s in sources if s in split_order), None),
                                     next((t for t in targets if t in gather_order), None)))
    fused = (_fused(split_order, src_cover, tgt_cover, one_is_source=True)
             + _fused(gather_order, tgt_cover, src_cover, one_is_source=False))
    in_fused = {m for g in fused for m in (*g.sources, *g.targets)}
    crossed = sorted({(_parent(s), _parent(t)) for s, t in links} - {(g.direct_source, g.direct_target)
                                                                   for g in groups})
    partial = [LayerGroup((s,), (t,), s, t, partial=True) for s, t in crossed
               if s not in in_fused and t not in in_fused and s and t]
    return groups + fused + partial


def _fused(orders: Mapping[str, list[tuple[str, ...]]], one_cover: Mapping[str, set[Link]],
           many_cover: Mapping[str, set[Link]], *, one_is_source: bool) -> list[LayerGroup]:
    """Fused groups: a module whose weights are exactly the union of several other-side modules' weights,
    each of which holds weights of that module only, with one order of the parts throughout."""
    out = []
    for one, seen in orders.items():
        parts = seen[0]
        if len(parts) < 2 or any(o != parts for o in seen) or not one:
            continue
        covers = [many_cover.get(p, set()) for p in parts]
        if all(c <= one_cover[one] for c in covers) and set().union(*covers) == one_cover[one]:
            out.append(LayerGroup((one,), parts, fused=True) if one_is_source
                       else LayerGroup(parts, (one,), fused=True))
    return out


# ------------------------------------------------------------------------------------------------ capture

def reference_names(reference: Any, keys: Iterable[str]) -> dict[str, str]:
    """The reference's parameter (or buffer) name of each checkpoint key, as ``from_pretrained`` renames
    it: transformers 5 renames legacy checkpoint layouts while loading (ViT's
    ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj`` in the model) and adds or
    strips the base-model prefix (``bert.``). Keys without a counterpart are left out. If transformers'
    loading internals are not where this expects them, names are only matched with or without the prefix
    (fewer layers pair; nothing fails)."""
    state = dict.fromkeys(reference.state_dict(), True)
    prefix = str(getattr(reference, "base_model_prefix", "") or "")

    def plain(key: str) -> str:
        if key in state or not prefix:
            return key
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in state:
            return key[len(prefix) + 1:]
        return f"{prefix}.{key}"

    rename: Callable[[str], str] = plain
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(reference)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]

        def renamed(key: str) -> str:
            name = rename_source_key(key, renamings, converters, prefix or None, state)[0]
            return name if name in state else plain(key)

        rename = renamed
    except Exception:  # transformers' internals moved or changed: fall back to plain names, never fail parity
        pass
    out = {}
    for key in keys:
        try:
            name = rename(key)
        except Exception:  # as above: a renaming that fails pairs fewer layers, it does not stop parity
            name = plain(key)
        if name in state:
            out[key] = name
    return out


def _first_tensor(output: Any) -> Any:
    """A module's output tensor: itself, or the first element of a tuple / ModelOutput (attention modules
    return (output, weights), transformers' models a ModelOutput)."""
    import torch

    while not isinstance(output, torch.Tensor):
        if isinstance(output, Mapping):
            output = next(iter(output.values()), None)
        elif isinstance(output, (tuple, list)) and output:
            output = output[0]
        else:
            return None
    return output


@contextlib.contextmanager
def torch_outputs(reference: Any, names: Iterable[str]) -> Iterator[dict[str, tuple[int, np.ndarray]]]:
    """Forward hooks on the reference's modules ``names``: the dict fills with name -> (completion order,
    float32 copy of the first call's output) while the block runs. Copies, because transformers adds
    residuals in place (ResNet's ``hidden_state += residual`` changes its last BatchNorm's output)."""
    import torch

    captured: dict[str, tuple[int, np.ndarray]] = {}
    modules = dict(reference.named_modules())

    def hook(name: str) -> Callable[..., None]:
        def record(module: Any, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if name not in captured and tensor is not None:
                captured[name] = (len(captured), tensor.detach().to(torch.float32, copy=True).numpy())
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in dict.fromkeys(names) if n in modules]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def nnx_outputs(run: Callable[[nnx.Module, Any], Any], model: nnx.Module, inputs: Any
                ) -> tuple[Any, dict[str, Any]]:
    """``run(model, inputs)`` with every module's ``__call__`` output captured (first call), as
    module path -> jax array. ``nnx.capture(method_outputs=...)`` instruments the model's classes for the
    duration of the call only; ``run`` may jit (the outputs leave the jitted function as intermediates)."""
    try:
        result, state = nnx.capture(run, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, inputs)
    except BaseException:
        for _, module in nnx.iter_modules(model):  # nnx.capture leaves its containers behind when fn raises
            if hasattr(module, "__captures__"):
                delattr(module, "__captures__")
        raise
    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(state):
        if not path or path[-1] != "__call__":
            continue
        values = var.get_value()
        value = values[0] if isinstance(values, tuple) else values
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            out[".".join(str(p) for p in path[:-1])] = value
    return result, out


# ------------------------------------------------------------------------------------------------ compare

def align(ref: np.ndarray, got: np.ndarray, *, channels_first: bool) -> tuple[np.ndarray, str] | None:
    """``ref`` in ``got``'s layout and a word for what was done, or None when the two do not correspond.

    ``channels_first``: the reference's 4-D activations are NCHW and the NNX model's NHWC (transposed).
    Besides that only reshapes that cannot reorder elements are made: dropping size-1 axes (a position
    embedding of [1, T, D] against [T, D]), and merging or splitting trailing axes after a common prefix
    (heads [B, T, H, D] against [B, T, H*D]).
    """
    layout = "same"
    if channels_first and ref.ndim == 4 and got.ndim == 4:
        ref, layout = ref.transpose(0, 2, 3, 1), "nchw->nhwc"
    if ref.shape == got.shape:
        return ref, layout
    if ref.size != got.size:
        return None
    squeezed = tuple(d for d in ref.shape if d != 1) == tuple(d for d in got.shape if d != 1)
    k = 0
    while k < min(ref.ndim, got.ndim) and ref.shape[k] == got.shape[k]:
        k += 1
    trailing = min(ref.ndim, got.ndim) - k <= 1
    if squeezed or trailing:
        return ref.reshape(got.shape), ("reshape" if layout == "same" else f"{layout}+reshape")
    return None


@dataclass(frozen=True)
class LayerDiff:
    """How the output of one paired module differs: ``name`` the torch module, ``target`` the NNX one
    (names joined by ``+`` for fused groups), ``shape`` what was compared, ``layout`` how the reference
    was brought into the NNX layout. ``max_rel_diff`` is max |Δ| over max |reference| (None when an output
    is not finite); ``within_tolerance``: max_rel_diff <= the report's per-layer threshold. ``partial``:
    the two modules share only some of their weights (the mapping crosses modules, see LayerGroup)."""

    name: str
    target: str
    shape: list[int]
    max_abs_diff: float | None
    max_rel_diff: float | None
    mean_abs_diff: float | None
    max_abs_reference: float | None
    layout: str
    within_tolerance: bool
    partial: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Skipped:
    """A pair the mapping names that was not compared, and why."""

    name: str
    target: str
    reason: str


def _shape(a: np.ndarray) -> str:
    return "x".join(map(str, a.shape)) or "scalar"


def _compare(name: str, target: str, ref: np.ndarray, got: np.ndarray, layout: str, threshold: float,
             mask: np.ndarray | None) -> LayerDiff:
    if mask is not None and got.ndim >= 2 and got.shape[:2] == mask.shape:
        ref, got = ref[mask], got[mask]  # padded positions carry no meaning (as for outputs)
    # float32 where the activations are no wider: layers are many and large, and their threshold is loose
    d = difference(got, ref, np.float32 if got.dtype.itemsize <= 4 else np.float64)
    rel = d.max_rel if d.finite else None
    return LayerDiff(
        name=name, target=target, shape=list(d.a.shape), max_abs_diff=d.max_abs if d.finite else None,
        max_rel_diff=None if rel is None or math.isinf(rel) else rel,
        mean_abs_diff=d.mean_abs if d.finite else None,
        max_abs_reference=d.scale if np.isfinite(d.b).all() else None, layout=layout,
        within_tolerance=rel is not None and rel <= threshold,
    )


def compare_layers(groups: Sequence[LayerGroup], ref_out: Mapping[str, tuple[int, np.ndarray]],
                   nnx_out: Mapping[str, Any], *, threshold: float, channels_first: bool,
                   mask: np.ndarray | None = None) -> tuple[list[LayerDiff], list[Skipped]]:
    """Every group's pairs compared, in the reference's forward order; and the groups that paired nothing
    though one side ran (a module holding weights that the other side never calls, outputs that do not
    correspond). ``ref_out`` and ``nnx_out`` are the captured outputs (:func:`torch_outputs`,
    :func:`nnx_outputs`), ``threshold`` the per-layer tolerance on max_rel_diff, ``mask`` the
    [batch, length] attention mask of text inputs."""
    rows: list[tuple[int, LayerDiff]] = []
    skipped: list[Skipped] = []

    def aligned(s: str, t: str) -> Aligned | None:
        return align(ref_out[s][1], np.asarray(nnx_out[t]), channels_first=channels_first)

    for g in groups:
        if g.fused:
            row = _compare_fused(g, ref_out, nnx_out, threshold, channels_first, mask)
            if isinstance(row, Skipped):
                skipped.append(row)
            elif row is not None:
                rows.append(row)
            continue
        pairs = _pairs(g, ref_out.__contains__, nnx_out.__contains__, aligned)
        rows += [(ref_out[s][0], replace(_compare(s, t, ref, np.asarray(nnx_out[t]), layout, threshold, mask),
                                         partial=g.partial))
                 for s, t, (ref, layout) in pairs]
        why = None if pairs else _unpaired(g, ref_out.__contains__, nnx_out.__contains__)
        if why is not None:
            s, t, reason = why
            if reason == "shapes":
                reason = (f"outputs {_shape(ref_out[s][1])} and {_shape(np.asarray(nnx_out[t]))} do not "
                          "correspond")
            skipped.append(Skipped(s, t, reason))
    rows.sort(key=lambda r: r[0])
    return [r[1] for r in rows], skipped


Aligned = tuple[np.ndarray, str]


def _compare_fused(g: LayerGroup, ref_out: Mapping[str, tuple[int, np.ndarray]], nnx_out: Mapping[str, Any],
                   threshold: float, channels_first: bool, mask: np.ndarray | None
                   ) -> tuple[int, LayerDiff] | Skipped | None:
    name, target = "+".join(g.sources), "+".join(g.targets)
    ran = [s for s in g.sources if s in ref_out]
    called = [t for t in g.targets if t in nnx_out]
    if not ran and not called:
        return None
    if len(ran) < len(g.sources) or len(called) < len(g.targets):
        return Skipped(name, target, "not every module of the group ran")
    ref = np.concatenate([ref_out[s][1] for s in g.sources], axis=-1)
    got = np.concatenate([np.asarray(nnx_out[t]) for t in g.targets], axis=-1)
    aligned = align(ref, got, channels_first=channels_first)
    if aligned is None:
        return Skipped(name, target, f"outputs {_shape(ref)} and {_shape(got)} do not correspond")
    order = max(ref_out[s][0] for s in g.sources)
    return order, _compare(name, target, aligned[0], got, "concat+" + aligned[1], threshold, mask)


def _pairs(g: LayerGroup, ran: Callable[[str], bool], called: Callable[[str], bool],
           aligned: Callable[[str, str], Aligned | None]) -> list[tuple[str, str, Aligned]]:
    """The (source, target, aligned reference output) pairs of a group that is not fused (see
    :class:`LayerGroup`)."""
    out: list[tuple[str, str, Aligned]] = []
    s, t = g.direct_source, g.direct_target
    if s is not None and t is not None and ran(s) and called(t) and (a := aligned(s, t)) is not None:
        out.append((s, t, a))
    sources = [x for x in g.sources if ran(x) and not (out and x == s)]
    for target in g.targets:
        if target == g.direct_target or not called(target):
            continue
        while sources:
            source = sources.pop(0)
            if (a := aligned(source, target)) is not None:
                out.append((source, target, a))
                break
    return out


def _unpaired(g: LayerGroup, ran: Callable[[str], bool], called: Callable[[str], bool]
              ) -> tuple[str, str, str] | None:
    """Why a group that paired nothing is worth a note: a module holding weights that one side calls and
    the other does not, or outputs that do not correspond; None for containers that neither side calls."""
    s, t = g.direct_source, g.direct_target
    if s is not None and t is not None:
        if ran(s) and not called(t):
            return s, t, "the NNX model does not call this module"
        if called(t) and not ran(s):
            return s, t, "the reference does not call this module"
    ran_s = [x for x in reversed(g.sources) if ran(x)]
    called_t = [x for x in reversed(g.targets) if called(x)]
    if ran_s and called_t:
        return ran_s[0], called_t[0], "shapes"
    return None


def first_jump(errors: Sequence[float | None], threshold: float, factor: float = JUMP_FACTOR) -> int | None:
    """Index of the first layer whose error jumps, or None.

    ``errors`` are max_rel_diff in forward order (None: not finite, counted as infinite). Layer i jumps
    when ``errors[i] > threshold`` and ``errors[i] > factor * max(errors[:i])`` (with max of nothing 0):
    above the tolerance and an order of magnitude above every error before it. An error that grows
    gradually past the tolerance (low-precision rounding accumulating with depth) is not a jump.
    """
    level = 0.0
    for i, e in enumerate(errors):
        err = math.inf if e is None or not math.isfinite(e) else e
        if err > threshold and err > factor * level:
            return i
        level = max(level, err)
    return None


# ------------------------------------------------------------------------------------------------ plot

def plot_layers(layers: Sequence[LayerDiff], threshold: float, jump: int | None, path: Path) -> bool:
    """A small PNG of max_rel_diff by layer at ``path``; False (and no file) when matplotlib is not
    installed (the optional ``plot`` extra) or there is nothing to plot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        path.unlink(missing_ok=True)
        return False
    if not layers:
        path.unlink(missing_ok=True)
        return False
    finite = [d.max_rel_diff for d in layers if d.max_rel_diff is not None and d.max_rel_diff > 0]
    floor = min([*finite, threshold]) / 10
    top = max([*finite, threshold]) * 10
    ys = [top if d.max_rel_diff is None else max(d.max_rel_diff, floor) for d in layers]
    fig = Figure(figsize=(7, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.semilogy(range(len(ys)), ys, marker=".", linewidth=0.8, markersize=3)
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8, label=f"tolerance {threshold:g}")
    if jump is not None:
        ax.axvline(jump, color="red", linewidth=0.8, label=f"first jump: {layers[jump].name}")
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("max rel diff")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return True
