"""Rich rendering of results on the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from nnxport.cli.common import literal, safe_text

if TYPE_CHECKING:
    from nnxport.parity.report import ParityReport


def parity_table(report: ParityReport) -> Table:
    from nnxport.parity.report import tolerance_text  # already imported by the command that made the report

    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    table = Table(title=f"Parity vs {escape(safe_text(report.reference))}: {verdict}",
                  caption=literal(f"weights {report.dtype}; tolerance {tolerance_text(report.tolerance)}"))
    for col in ("output", "shape", "max |Δ|", "max rel", "mean |Δ|", "cosine", "top-1", "out of tol", ""):
        table.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for o in report.outputs:
        table.add_row(
            literal(o.name), "x".join(map(str, o.shape)), f"{o.max_abs_diff:.2e}", f"{o.max_rel_diff:.2e}",
            f"{o.mean_abs_diff:.2e}", f"{o.cosine:.7f}",
            "" if o.top1_agreement is None else f"{o.top1_agreement:.3f}", str(o.violations),
            "[green]ok[/]" if o.passed else "[red]FAIL[/]",
        )
    g = report.generation
    if g is not None:  # greedy tokens: agreement in the top-1 column
        table.add_row(f"generation ({g.new_tokens} greedy tokens)", "x".join(map(str, g.prompt_shape)),
                      "", "", "", "", f"{g.agreement:.3f}", str(len(g.divergences)),
                      "[green]ok[/]" if g.passed else "[red]FAIL[/]")
    return table


def failure_line(report: ParityReport, md: object) -> str:
    """One line naming every failing output and the first layer whose error jumps, e.g. ``parity FAILED:
    logits max |Δ| 3.1e+00 ...; first jump at layer stages.1.blocks.1.bn0 (report: ...)``."""
    bad = [f"{o.name} max |Δ| {o.max_abs_diff:.2e}, {o.violations} values out of tolerance"
           for o in report.outputs if not o.passed]
    g = report.generation
    if g is not None and not g.passed:
        bad.append(f"greedy generation agrees on {g.agreement:.3f} of {g.new_tokens} new tokens per row "
                   "and diverges away from a near tie")
    jump = report.first_jump_json()
    if jump is not None:
        bad.append(f"error first jumps at layer {jump['target']} ({jump['name']})")
    return f"parity FAILED: {'; '.join(bad)} (report: {md})"
