"""nnxport inspect-keys."""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nnxport.cli.common import check_stdin_mapping, errors_handled, out, print_json, setup_logging

log = logging.getLogger("nnxport")
STATUS_STYLE = {"mapped": "green", "ignored": "dim", "tied": "dim", None: ""}


TSV_COLUMNS = ("key", "shape", "dtype", "status", "target", "ops", "target_shape")


class KeysFormat(StrEnum):
    table = "table"
    json = "json"
    tsv = "tsv"


def _shape(shape: list[int] | None) -> str:
    return "" if shape is None else "x".join(map(str, shape)) or "scalar"


def inspect_keys(
    source: Annotated[str, typer.Argument(help="Hub id (org/name), local folder, or .safetensors file.")],
    mapping: Annotated[str | None, typer.Option("--mapping", "-m",
                                                help="Built-in mapping name, YAML path, or - for stdin "
                                                     "\\[default: picked from config.json if one matches].")]
    = None,
    config: Annotated[Path | None, typer.Option(help="config.json to use (for a bare .safetensors file).")]
    = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision: branch, tag or commit.")] = None,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Accept pickle weights (loaded with torch.load(weights_only=True)).")] = False,
    fmt: Annotated[KeysFormat, typer.Option("--format", help="table, json, or tsv (a header line, then one "
                                                             "key per line).")]
    = KeysFormat.table,
) -> None:
    """List every tensor of a checkpoint and, with a mapping, where it goes.

    Example: nnxport inspect-keys microsoft/resnet-50 --format tsv | cut -f1,4
    """
    setup_logging(False, fmt is not KeysFormat.table)
    check_stdin_mapping(mapping)
    with errors_handled():
        from nnxport import api

        result = api.inspect_keys(source, mapping, config=config, revision=revision,
                                  allow_pickle=allow_pickle)
        rows = result.rows()
        if fmt is KeysFormat.json:
            print_json(result.to_json())
        elif fmt is KeysFormat.tsv:
            # A header line, then one key per line; tabs never occur in these values.
            sys.stdout.write("\t".join(TSV_COLUMNS) + "\n")
            for r in rows:
                sys.stdout.write("\t".join([r["key"], _shape(r["shape"]), r["dtype"], r["status"] or "",
                                            r["target"] or "", ",".join(r["ops"]),
                                            _shape(r["target_shape"])]) + "\n")
            if result.analysis is not None:  # what has no row: said on stderr, stdout stays rows only
                for t in result.analysis.unfilled:
                    log.warning("unfilled target: %s", t)
        else:
            title = f"{result.source.spec}: {len(rows)} tensors"
            if result.mapping is not None:
                title += f", mapping {result.mapping.name}"
            table = Table(title=title)
            for col in ("key", "shape", "dtype", "status", "target", "ops", "target shape"):
                table.add_column(col, overflow="fold")
            for r in rows:
                table.add_row(r["key"], _shape(r["shape"]), r["dtype"], r["status"] or "", r["target"] or "",
                              " ".join(r["ops"]), _shape(r["target_shape"]),
                              style=STATUS_STYLE.get(r["status"], "red"))
            out.print(table)
            if result.analysis is not None:
                for t in result.analysis.unfilled:
                    out.print(f"[red]unfilled target:[/] {t}")
                for p in result.analysis.problems:
                    out.print(f"[red]problem:[/] {p}", markup=True)
        result.source.close()
