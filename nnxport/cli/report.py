"""Rich rendering of results on the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from nnxport.parity import ParityReport


def parity_table(report: ParityReport) -> Table:
    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    tol = report.tolerance
    table = Table(title=f"Parity vs {report.reference}: {verdict}",
                  caption=f"weights {report.dtype}; tolerance atol={tol['atol']:g} rtol={tol['rtol']:g}")
    for col in ("output", "shape", "max |Δ|", "max rel", "mean |Δ|", "cosine", "top-1", "out of tol", ""):
        table.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for o in report.outputs:
        table.add_row(
            o.name, "x".join(map(str, o.shape)), f"{o.max_abs_diff:.2e}", f"{o.max_rel_diff:.2e}",
            f"{o.mean_abs_diff:.2e}", f"{o.cosine:.7f}",
            "" if o.top1_agreement is None else f"{o.top1_agreement:.3f}", str(o.violations),
            "[green]ok[/]" if o.passed else "[red]FAIL[/]",
        )
    return table
