"""nnxport verify."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nnxport.cli.common import (
    EXIT_PARITY,
    Format,
    err,
    errors_handled,
    literal,
    out,
    print_json,
    setup_logging,
)
from nnxport.cli.progress import reporter
from nnxport.cli.report import failure_line, parity_table


def verify(
    folder: Annotated[Path, typer.Argument(help="An output folder written by nnxport convert.")],
    source: Annotated[str | None, typer.Option(help="Re-check against this source instead of the recorded "
                                                    "one.")] = None,
    model: Annotated[str | None, typer.Option(help="Rebuild with this model: needed to import the "
                                                   "package.module:Class that nnxport.json records (a "
                                                   "manifest never imports code by itself).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="human, or one JSON document on stdout.")]
    = Format.human,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Reload a converted checkpoint and re-run parity against the reference; rewrites the report.

    Example: nnxport verify resnet-50-nnx
    """
    setup_logging(quiet, fmt is Format.json)
    with errors_handled():
        from nnxport import api

        with reporter(quiet, fmt is Format.json) as progress:
            report = api.verify(folder, source=source, model=model, progress=progress)
        if fmt is Format.json:
            print_json(report.to_json())
        elif not quiet:
            out.print(parity_table(report))
        if not report.passed:
            err.print(literal(failure_line(report, folder / "parity.md"), "red"), soft_wrap=True)
            raise typer.Exit(EXIT_PARITY)
