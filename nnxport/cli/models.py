"""nnxport models."""

from __future__ import annotations

from nnxport.cli._errors import errors_handled
from nnxport.cli._options import TableFormat, TableFormatOpt
from nnxport.cli._output import Mode, out
from nnxport.cli.report import models_table


def models(fmt: TableFormatOpt = TableFormat.table) -> None:
    """List the built-in model families and the mappings that target them.

    Example: nnxport models --format json
    """
    out.setup(fmt)
    with errors_handled():
        from nnxport import api

        rows = api.models()
        if out.mode is Mode.json:
            out.json(rows)
        out.result(models_table(rows))
