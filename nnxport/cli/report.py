"""How each command's result looks on the terminal (the rich tables and lines; :mod:`._output` prints
them in the run's mode)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from nnxport.cli._output import literal, safe_text

if TYPE_CHECKING:
    from nnxport.api import ConvertResult, Inspection
    from nnxport.mapping.draft import Draft
    from nnxport.parity.report import ParityReport

STATUS_STYLE = {"mapped": "green", "ignored": "dim", "tied": "dim", None: ""}
TSV_COLUMNS = ("key", "shape", "dtype", "status", "target", "ops", "target_shape")
#: Lines of a draft's left-overs shown on stderr (all of them are in the YAML).
DRAFT_SHOWN = 20


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


def convert_summary(result: ConvertResult) -> str:
    """``SOURCE -> OUT  (N tensors, S MB, FAMILY via mapping NAME)``."""
    m = result.manifest
    return (f"{m['source']['spec']} -> {result.out}  ({m['tensors']} tensors, {m['bytes'] / 1e6:.1f} MB, "
            f"{m['model']['family']} via mapping {m['mapping']['name']})")


def _shape(shape: list[int] | None) -> str:
    return "" if shape is None else "x".join(map(str, shape)) or "scalar"


def key_rows(rows: Sequence[dict[str, Any]]) -> Iterator[list[str]]:
    """inspect-keys' rows as TSV fields (:data:`TSV_COLUMNS`)."""
    for r in rows:
        yield [r["key"], _shape(r["shape"]), r["dtype"], r["status"] or "", r["target"] or "",
               ",".join(r["ops"]), _shape(r["target_shape"])]


def keys_table(result: Inspection, rows: Sequence[dict[str, Any]]) -> list[Table | Text]:
    """inspect-keys' table, then a line per unfilled target and per problem of the mapping."""
    title = f"{result.source.spec}: {len(rows)} tensors"
    if result.mapping is not None:
        title += f", mapping {result.mapping.name}"
    table = Table(title=literal(title))
    for col in ("key", "shape", "dtype", "status", "target", "ops", "target shape"):
        table.add_column(col, overflow="fold")
    for r in rows:
        # Text, not str: rich would read markup in a key ('[/]' raises, '[b]' vanishes).
        cells = (r["key"], _shape(r["shape"]), r["dtype"], r["status"] or "", r["target"] or "",
                 " ".join(r["ops"]), _shape(r["target_shape"]))
        table.add_row(*map(literal, cells), style=STATUS_STYLE.get(r["status"], "red"))
    lines: list[Table | Text] = [table]
    if result.analysis is not None:
        lines += [literal("unfilled target: ", "red") + literal(t) for t in result.analysis.unfilled]
        lines += [literal("problem: ", "red") + literal(p) for p in result.analysis.problems]
    return lines


def models_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="nnxport model families")
    for col in ("family", "description", "mappings (picked when config.json matches)"):
        table.add_column(col)
    for r in rows:
        maps = "\n".join(f"{m['name']}  {m['match']}" for m in r["mappings"])
        table.add_row(r["family"], r["description"], maps)
    return table


def draft_summary(result: Draft) -> str:
    return (f"draft: {result.placed} source keys placed, {len(result.ignored)} ignored, "
            f"{len(result.unplaced)} not placed; {len(result.unfilled)} model leaves not filled")


def draft_left(result: Draft) -> list[str]:
    """The draft's left-overs, one line each: the first :data:`DRAFT_SHOWN`, then ``... and K more``."""
    left = [f"not placed: {k}" for k in result.unplaced] + [f"not filled: {t}" for t in result.unfilled]
    more = [f"... and {len(left) - DRAFT_SHOWN} more (listed in the YAML)"] if len(left) > DRAFT_SHOWN else []
    return left[:DRAFT_SHOWN] + more
