"""nnxport models."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from nnxport.cli.common import errors_handled, out, print_json, setup_logging


class ModelsFormat(StrEnum):
    table = "table"
    json = "json"


def models(
    fmt: Annotated[ModelsFormat, typer.Option("--format", help="table or json.")] = ModelsFormat.table,
) -> None:
    """List the built-in model families and the mappings that target them.

    Example: nnxport models --format json
    """
    setup_logging(False, fmt is ModelsFormat.json)
    with errors_handled():
        from nnxport import api

        rows = api.models()
        if fmt is ModelsFormat.json:
            print_json(rows)
            return
        table = Table(title="nnxport model families")
        for col in ("family", "description", "mappings (picked when config.json matches)"):
            table.add_column(col)
        for r in rows:
            maps = "\n".join(f"{m['name']}  {m['match']}" for m in r["mappings"])
            table.add_row(r["family"], r["description"], maps)
        out.print(table)
