"""The parity report: parity.json (schema below) and parity.md, built from the compared outputs and layers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnxport.parity import layerwise
from nnxport.parity.layerwise import LayerDiff, Skipped

if TYPE_CHECKING:
    from nnxport.parity.generation import GenerationCheck
    from nnxport.parity.metrics import OutputDiff
SCHEMA_VERSION = 1
#: The plot of error by layer, next to parity.md (with the optional ``plot`` extra).
PARITY_PNG = "parity.png"
#: Rows of the per-layer table in parity.md (parity.json has every layer).
MD_LAYER_ROWS = 40


@dataclass
class ParityReport:
    passed: bool
    reference: str
    inputs: list[dict[str, Any]]
    tolerance: dict[str, float | str]
    outputs: list[OutputDiff]
    dtype: str
    timings_s: dict[str, float] = field(default_factory=dict)
    #: Per-layer divergence in the reference's forward order (see nnxport.parity.layerwise), the pairs the
    #: mapping names that could not be compared, the per-layer threshold (the tolerance's rtol) and the
    #: index of the first layer whose error jumps (layerwise.first_jump).
    layers: list[LayerDiff] = field(default_factory=list)
    layers_skipped: list[Skipped] = field(default_factory=list)
    layer_threshold: float | None = None
    first_jump: int | None = None
    #: Causal LMs: greedy generation against the reference's (None for other families).
    generation: GenerationCheck | None = None

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
            "generation": None if self.generation is None else self.generation.to_json(),
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
        lines += self._generation_markdown()
        lines += self._layers_markdown(plot)
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings_s.items()), ""]
        return "\n".join(lines)

    def _generation_markdown(self) -> list[str]:
        g = self.generation
        if g is None:
            return []
        verdict = "pass" if g.passed else "FAIL"
        lines = ["", "## Greedy generation", "",
                 f"**{verdict}**: {g.new_tokens} new tokens from the prompts {g.prompt_shape} left-padded, "
                 f"`nnxport.generate` against the reference's `generate(do_sample=False)`: agreement "
                 f"{g.agreement:.4f} ({'every' if g.all_match else 'not every'} token matches)."]
        for d in g.divergences:
            kind = "a near tie (within tolerance)" if d["near_tie"] else "not a near tie"
            lines.append(f"- row {d['row']} diverges at new token {d['step']}: reference "
                         f"{d['reference_token']}, NNX {d['nnx_token']}; reference logit margin "
                         f"{d['reference_margin']:.3e}, {kind}.")
        return lines

    def _layers_markdown(self, plot: str | None) -> list[str]:
        if not self.layers and not self.layers_skipped:
            return []
        threshold = self.layer_threshold or 0.0
        factor = f"{layerwise.JUMP_FACTOR:g}×"
        jump = self.first_jump_json()
        if jump is not None:
            verdict = (f"**First jump: `{jump['name']}`** (NNX `{jump['target']}`, layer {jump['index']} of "
                       f"{len(self.layers)}): max rel diff {number_text(jump['max_rel_diff'])}, above the "
                       f"threshold "
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
            lines.append(f"| {i} | `{d.name}` | `{d.target}` | {d.shape} | {number_text(d.max_abs_diff)} | "
                         f"{number_text(d.max_rel_diff)} | {within} |")
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


def number_text(x: float | None) -> str:
    return "non-finite" if x is None else f"{x:.3e}"


def tolerance_text(tol: dict[str, float | str]) -> str:
    text = f"atol={tol['atol']:g}"
    if "atol_relative_to" in tol:
        text += "·max|ref|"
    return f"{text} rtol={tol['rtol']:g}"
