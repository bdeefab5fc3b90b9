"""nnxport inspect-keys."""

from __future__ import annotations

import logging

from nnxport.cli._errors import errors_handled
from nnxport.cli._options import (
    AllowPickleOpt,
    ConfigOpt,
    KeysFormat,
    KeysFormatOpt,
    MappingOpt,
    RevisionOpt,
    SourceArg,
    check_stdin_mapping,
)
from nnxport.cli._output import Mode, out
from nnxport.cli.report import TSV_COLUMNS, key_rows, keys_table

log = logging.getLogger("nnxport")


def inspect_keys(source: SourceArg, mapping: MappingOpt = None, config: ConfigOpt = None,
                 revision: RevisionOpt = None, allow_pickle: AllowPickleOpt = False,
                 fmt: KeysFormatOpt = KeysFormat.table) -> None:
    """List every tensor of a checkpoint and, with a mapping, where it goes.

    Example: nnxport inspect-keys microsoft/resnet-50 --format tsv | cut -f1,4
    """
    out.setup(fmt)
    check_stdin_mapping(mapping)
    with errors_handled():
        from nnxport import api

        result = api.inspect_keys(source, mapping, config=config, revision=revision,
                                  allow_pickle=allow_pickle)
        rows = result.rows()
        if out.mode is Mode.json:
            out.json(result.to_json())
        elif out.mode is Mode.tsv:
            out.tsv(TSV_COLUMNS, key_rows(rows))
            if result.analysis is not None:  # what has no row: said on stderr, stdout stays rows only
                for t in result.analysis.unfilled:
                    log.warning("unfilled target: %s", t)
        elif out.human:
            out.result(*keys_table(result, rows))
