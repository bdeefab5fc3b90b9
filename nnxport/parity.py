"""Run the transformers reference and the NNX model on the same seeded inputs and compare."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nnxport import layerwise
from nnxport.errors import NnxportError
from nnxport.layerwise import LayerDiff, Skipped
from nnxport.mapping import Assignment
from nnxport.models import Family, ParityInput, Tolerance
from nnxport.source import INDEX_NAME, PICKLE_INDEX_NAME, Source

log = logging.getLogger("nnxport")
SCHEMA_VERSION = 1
#: The plot of error by layer, next to parity.md (with the optional ``plot`` extra).
PARITY_PNG = "parity.png"
#: Rows of the per-layer table in parity.md (parity.json has every layer).
MD_LAYER_ROWS = 40


@dataclass(frozen=True)
class OutputDiff:
    """How one named output of the NNX model differs from the reference's.

    ``max_rel_diff`` is max |Δ| divided by max |reference| (the error relative to the output's scale);
    ``violations`` counts elements outside ``|Δ| <= atol + rtol * |reference|`` (numpy.allclose).
    For logits of a distribution: ``top5_agreement`` is the mean fraction of the reference's 5 most
    likely classes that are also among the NNX model's 5, and ``kl_divergence`` is the mean over rows of
    KL(reference || NNX) of the softmax over the last axis, in nats.
    """

    name: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    cosine: float
    top1_agreement: float | None
    violations: int
    passed: bool
    top5_agreement: float | None = None
    kl_divergence: float | None = None


@dataclass
class ParityReport:
    passed: bool
    reference: str
    inputs: list[dict[str, Any]]
    tolerance: dict[str, float | str]
    outputs: list[OutputDiff]
    dtype: str
    timings_s: dict[str, float] = field(default_factory=dict)
    #: Per-layer divergence in the reference's forward order (see nnxport.layerwise), the pairs the
    #: mapping names that could not be compared, the per-layer threshold (the tolerance's rtol) and the
    #: index of the first layer whose error jumps (layerwise.first_jump).
    layers: list[LayerDiff] = field(default_factory=list)
    layers_skipped: list[Skipped] = field(default_factory=list)
    layer_threshold: float | None = None
    first_jump: int | None = None

    def first_jump_json(self) -> dict[str, Any] | None:
        if self.first_jump is None:
            return None
        d = self.layers[self.first_jump]
        before = [x.max_rel_diff for x in self.layers[:self.first_jump]]
        return {"index": self.first_jump, "name": d.name, "target": d.target, "max_rel_diff": d.max_rel_diff,
                "max_rel_diff_before": max((b for b in before if b is not None), default=0.0)}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "reference": self.reference,
            "inputs": self.inputs,
            "tolerance": self.tolerance,
            "outputs": [asdict(o) for o in self.outputs],
            "dtype": self.dtype,
            "timings_s": self.timings_s,
            "layers": [d.to_json() for d in self.layers],
            "layer_rule": {"metric": "max_rel_diff", "threshold": self.layer_threshold,
                           "jump_factor": layerwise.JUMP_FACTOR},
            "first_jump": self.first_jump_json(),
            "layers_skipped": [asdict(s) for s in self.layers_skipped],
        }

    def write_plot(self, path: Path) -> bool:
        """parity.png (error by layer) at ``path`` when matplotlib is installed and there are layers;
        otherwise no file (an older one is removed). Returns whether it was written."""
        return layerwise.plot_layers(self.layers, self.layer_threshold or 0.0, self.first_jump, path)

    def to_markdown(self, title: str, plot: str | None = None) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"# Parity report: {title}",
            "",
            f"**{verdict}** against `{self.reference}` (weights stored as {self.dtype}; "
            f"tolerance {tolerance_text(self.tolerance)}).",
            "",
            "Inputs: " + ", ".join(f"`{i['name']}` {i['shape']} {i['dtype']} (seed {i['seed']})"
                                  for i in self.inputs),
            "",
            "| output | shape | max abs diff | max rel diff | mean abs diff | cosine | top-1 agreement "
            "| top-5 agreement | KL divergence | out of tolerance | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for o in self.outputs:
            top1 = "" if o.top1_agreement is None else f"{o.top1_agreement:.4f}"
            top5 = "" if o.top5_agreement is None else f"{o.top5_agreement:.4f}"
            kl = "" if o.kl_divergence is None else f"{o.kl_divergence:.3e}"
            lines.append(f"| {o.name} | {o.shape} | {o.max_abs_diff:.3e} | {o.max_rel_diff:.3e} | "
                         f"{o.mean_abs_diff:.3e} | {o.cosine:.7f} | {top1} | {top5} | {kl} | "
                         f"{o.violations} | {'pass' if o.passed else 'FAIL'} |")
        lines += self._layers_markdown(plot)
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings_s.items()), ""]
        return "\n".join(lines)

    def _layers_markdown(self, plot: str | None) -> list[str]:
        if not self.layers and not self.layers_skipped:
            return []
        threshold = self.layer_threshold or 0.0
        factor = f"{layerwise.JUMP_FACTOR:g}×"
        jump = self.first_jump_json()
        if jump is not None:
            verdict = (f"**First jump: `{jump['name']}`** (NNX `{jump['target']}`, layer {jump['index']} of "
                       f"{len(self.layers)}): max rel diff {_num(jump['max_rel_diff'])}, above the threshold "
                       f"{threshold:g} and more than {factor} every layer before it (at most "
                       f"{jump['max_rel_diff_before']:.3e}).")
        else:
            over = sum(not d.within_tolerance for d in self.layers)
            verdict = (f"No jump: no layer's max rel diff is above the threshold {threshold:g} and {factor} "
                       f"every layer before it ({over} of {len(self.layers)} layers above the threshold).")
        lines = ["", "## Per-layer divergence", "", verdict, "",
                 f"{len(self.layers)} module pairs from the mapping, in the reference's forward order; "
                 "max rel diff is max |Δ| over max |reference| of the module's output (docs/parity.md)."]
        if plot:
            lines += ["", f"![max rel diff by layer]({plot})"]
        rows, note = self._layer_rows()
        if rows:
            lines += ["", "| # | layer (reference) | NNX module | shape | max abs diff | max rel diff "
                      "| within tolerance |", "|---|---|---|---|---|---|---|"]
        for i in rows:
            d = self.layers[i]
            within = ("yes" if d.within_tolerance else "no") + (" ← **first jump**" if i == self.first_jump
                                                                 else "")
            lines.append(f"| {i} | `{d.name}` | `{d.target}` | {d.shape} | {_num(d.max_abs_diff)} | "
                         f"{_num(d.max_rel_diff)} | {within} |")
        if note:
            lines += ["", note]
        if self.layers_skipped:
            shown = "; ".join(f"`{s.name}` / `{s.target}`: {s.reason}" for s in self.layers_skipped[:10])
            more = "; ..." if len(self.layers_skipped) > 10 else ""
            lines += ["", f"Not compared ({len(self.layers_skipped)}): {shown}{more}."]
        return lines

    def _layer_rows(self) -> tuple[list[int], str]:
        """Which layers the table shows (and a note when not all): all of them up to MD_LAYER_ROWS; else
        the rows around the first jump, or without one the layers of largest error, in forward order."""
        n = len(self.layers)
        if n <= MD_LAYER_ROWS:
            return list(range(n)), ""
        if self.first_jump is not None:
            start = max(0, min(self.first_jump - MD_LAYER_ROWS // 4, n - MD_LAYER_ROWS))
            end = start + MD_LAYER_ROWS
            return list(range(start, end)), f"Layers {start}-{end - 1} of {n} shown; parity.json has all."

        def error(i: int) -> float:
            e = self.layers[i].max_rel_diff
            return math.inf if e is None else e

        worst = sorted(range(n), key=error, reverse=True)[:MD_LAYER_ROWS]
        return sorted(worst), f"The {MD_LAYER_ROWS} largest errors of {n} layers shown; parity.json has all."


def _num(x: float | None) -> str:
    return "non-finite" if x is None else f"{x:.3e}"


def tolerance_text(tol: dict[str, float | str]) -> str:
    text = f"atol={tol['atol']:g}"
    if "atol_relative_to" in tol:
        text += "·max|ref|"
    return f"{text} rtol={tol['rtol']:g}"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _distribution_metrics(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float]:
    """top-5 agreement (None with fewer than 6 classes) and mean KL(b || a) over the rows of the last
    axis; ``a`` is NNX, ``b`` the reference, both float64 logits."""
    log_p, log_q = _log_softmax(b), _log_softmax(a)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())
    top5 = None
    if a.shape[-1] > 5:
        mine = np.argpartition(-a, 5, axis=-1)[..., :5]
        theirs = np.argpartition(-b, 5, axis=-1)[..., :5]
        shared = (mine[..., :, None] == theirs[..., None, :]).any(-1).sum(-1)
        top5 = float(shared.mean() / 5)
    return top5, max(kl, 0.0)


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance, *,
            distribution: bool = False) -> OutputDiff:
    """Metrics of ``got`` (NNX) against ``ref`` (reference), computed in float64. ``distribution``:
    the last axis holds logits of a distribution (adds top-5 agreement and KL divergence)."""
    if got.shape != ref.shape:
        raise NnxportError(f"parity: output '{name}' has shape {got.shape} in NNX but {ref.shape} in the "
                           "reference")
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    diff = np.abs(a - b)
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    scale = float(np.abs(b).max()) if b.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.dot(a.ravel(), b.ravel()) / denom) if denom > 0 else float(max_abs == 0.0)
    top1 = None
    if a.ndim >= 2 and a.shape[-1] > 1:
        top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    violations = int((~(diff <= tol.effective_atol(scale) + tol.rtol * np.abs(b))).sum())
    top5, kl = None, None
    if distribution and finite and a.ndim >= 1 and a.size:
        top5, kl = _distribution_metrics(a, b)
    return OutputDiff(
        name=name,
        shape=list(a.shape),
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        top1_agreement=top1,
        violations=violations,
        passed=finite and violations == 0,
        top5_agreement=top5,
        kl_divergence=kl,
    )


def load_reference(family: Family, source: Source, config: dict[str, Any],
                   options: dict[str, Any]) -> tuple[Any, str]:
    """The transformers model of ``family`` with the source's weights, in float32, in eval mode.

    The source's files are linked into a scratch folder with its config, so that folders, hub snapshots
    and single files all load through ``from_pretrained`` (which knows about prefixes and tied weights).
    """
    harness = family.parity
    own = harness.load_reference(source, config, options)
    if own is not None:  # a custom model's own torch reference
        return own
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls_name = harness.reference_class(config, options)
    cls = getattr(transformers, cls_name)
    with tempfile.TemporaryDirectory(prefix="nnxport-ref-") as tmp:
        folder = Path(tmp)
        for f in source.files:
            name = f.name
            if source.kind == "file":  # the names from_pretrained looks for
                name = "model.safetensors" if name.endswith(".safetensors") else "pytorch_model.bin"
            dst = folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.path.absolute(), dst)
        index = source.root / (INDEX_NAME if source.files[0].name.endswith(".safetensors")
                               else PICKLE_INDEX_NAME)
        if source.kind != "file" and index.is_file():
            os.symlink(index.absolute(), folder / index.name)
        (folder / "config.json").write_text(json.dumps(config))
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                          local_files_only=True, **harness.reference_kwargs(config, options))
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise NnxportError(f"parity: the reference {cls_name} did not find {len(missing)} of its weights in "
                           f"the source (first: {sorted(missing)[0]}); use --no-parity to skip parity")
    return model.eval(), f"transformers.{cls_name}"


def run_parity(
    family: Family,
    model: nnx.Module,
    source: Source,
    config: dict[str, Any],
    dtype: str,
    *,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    assignments: Sequence[Assignment] | None = None,
) -> ParityReport:
    """Compare ``model`` with the reference built from ``source``; ``passed`` is computed.

    With the mapping's ``assignments`` the outputs of the modules they pair are captured on both sides in
    the same forward passes and compared too (``layers``; see nnxport.layerwise). They do not change
    ``passed``, which is about the model's outputs.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    reference, ref_name = load_reference(family, source, config, options or {})
    timings["load_reference"] = time.perf_counter() - t
    harness = family.parity
    inputs: list[ParityInput] = harness.parity_inputs(config, seed)
    names = layerwise.reference_names(reference, (k for a in assignments or () for k in a.sources))
    groups = layerwise.layer_groups(assignments or (), names)
    t = time.perf_counter()
    with layerwise.torch_outputs(reference, (s for g in groups for s in g.sources)) as ref_layers:
        expected = harness.run_reference(reference, inputs)
    timings["run_reference"] = time.perf_counter() - t
    del reference
    t = time.perf_counter()
    if groups:
        got, nnx_layers = layerwise.nnx_outputs(harness.run_nnx, model, inputs)
    else:
        got, nnx_layers = harness.run_nnx(model, inputs), {}
    timings["run_nnx"] = time.perf_counter() - t
    tol = harness.tolerance(dtype)
    outputs = [compare(name, got[name], expected[name], tol, distribution=name in harness.distributions)
               for name in expected]
    t = time.perf_counter()
    mask = next((np.asarray(i.value).astype(bool) for i in inputs if i.name == "attention_mask"), None)
    layers, skipped = layerwise.compare_layers(groups, ref_layers, nnx_layers, threshold=tol.rtol,
                                               channels_first=harness.channels_first_reference, mask=mask)
    del ref_layers, nnx_layers
    jump = layerwise.first_jump([d.max_rel_diff for d in layers], tol.rtol)
    if groups:
        timings["compare_layers"] = time.perf_counter() - t
    if jump is not None:
        log.info("parity: first layer whose error jumps: %s (NNX %s), max rel diff %s", layers[jump].name,
                 layers[jump].target, _num(layers[jump].max_rel_diff))
    return ParityReport(
        passed=all(o.passed for o in outputs),
        reference=ref_name,
        inputs=[i.describe() for i in inputs],
        tolerance=tol.describe(),
        outputs=outputs,
        dtype=dtype,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        layers=layers,
        layers_skipped=skipped,
        layer_threshold=tol.rtol,
        first_jump=jump,
    )
