"""nnxport inspect-keys."""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nnxport.cli.common import (
    check_stdin_mapping,
    errors_handled,
    literal,
    out,
    print_json,
    safe_text,
    setup_logging,
)

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
            # A header line, then one key per line; a tab or newline inside a value (a key can hold any
            # character) is written escaped (\\t, \\n), as every control character.
            sys.stdout.write("\t".join(TSV_COLUMNS) + "\n")
            for r in rows:
                fields = [r["key"], _shape(r["shape"]), r["dtype"], r["status"] or "", r["target"] or "",
                          ",".join(r["ops"]), _shape(r["target_shape"])]
                sys.stdout.write("\t".join(map(safe_text, fields)) + "\n")
            if result.analysis is not None:  # what has no row: said on stderr, stdout stays rows only
                for t in result.analysis.unfilled:
                    log.warning("unfilled target: %s", t)
        else:
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
            out.print(table)
            if result.analysis is not None:
                for t in result.analysis.unfilled:
                    out.print(literal("unfilled target: ", "red") + literal(t))
                for p in result.analysis.problems:
                    out.print(literal("problem: ", "red") + literal(p))
        result.source.close()
