"""nnxport verify."""

from __future__ import annotations

import typer

from nnxport.cli._errors import EXIT_PARITY, errors_handled
from nnxport.cli._options import (
    FolderArg,
    HumanFormat,
    HumanFormatOpt,
    QuietOpt,
    RebuildModelOpt,
    RecheckSourceOpt,
)
from nnxport.cli._output import Mode, out
from nnxport.cli.report import failure_line, parity_table


def verify(folder: FolderArg, source: RecheckSourceOpt = None, model: RebuildModelOpt = None,
           fmt: HumanFormatOpt = HumanFormat.human, quiet: QuietOpt = False) -> None:
    """Reload a converted checkpoint and re-run parity against the reference; rewrites the report.

    Example: nnxport verify resnet-50-nnx
    """
    out.setup(fmt, quiet)
    with errors_handled():
        from nnxport import api

        with out.progress() as progress:
            report = api.verify(folder, source=source, model=model, progress=progress)
        if out.mode is Mode.json:
            out.json(report.to_json())
        out.result(parity_table(report))
        if not report.passed:
            out.say(failure_line(report, folder / "parity.md"), style="red")
            raise typer.Exit(EXIT_PARITY)
