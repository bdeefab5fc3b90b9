"""The one output object every command renders through, and the escaping of text from checkpoints.

stdout carries a command's result, in the mode ``--format`` chose (:class:`Mode`): human (rich tables and
lines), one JSON document, TSV rows, or a YAML document (``mapping draft``); stderr carries the log,
progress, notes and errors. ``-q`` keeps errors only (a JSON / TSV / YAML result is still printed).
Everything that may hold text from a checkpoint or a command line goes through :func:`safe_text`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from enum import StrEnum
from typing import Any

from rich.console import Console, RenderableType
from rich.logging import RichHandler
from rich.text import Text

from nnxport.cli._options import Format, cli_text, flag
from nnxport.cli.progress import reporter
from nnxport.errors import Option
from nnxport.progress import Progress

#: Logs, progress, warnings and errors. stdout is reserved for the command's result.
err = Console(stderr=True, highlight=False)
stdout = Console(highlight=False, soft_wrap=True)
if not stdout.is_terminal:  # piped or redirected: don't squeeze tables into 80 columns
    stdout.width = 160


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 controls, DEL, C1 controls, and the Unicode line separators and bidi controls that reorder what a
# terminal shows (a key could otherwise display as a different key).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def safe_text(text: object) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\t``, ``\\x1b``, ...), for
    printing text that comes from a checkpoint or a command line (keys, paths, messages quoting them): it
    can neither move the cursor, retitle or recolour the terminal, nor forge a line of output."""
    return _CONTROL.sub(_escape, str(text))


def literal(text: object, style: str = "") -> Text:
    """``text`` for rich, printed as it is (no markup: a key ``[bold]x[/bold]`` stays that) and escaped by
    :func:`safe_text`."""
    return Text(safe_text(text), style=style)


class Mode(StrEnum):
    """What stdout carries. ``--format human`` and ``--format table`` are both :attr:`human`."""

    human = "human"
    json = "json"
    tsv = "tsv"
    yaml = "yaml"

    @classmethod
    def of(cls, fmt: Format | Mode) -> Mode:
        if isinstance(fmt, Mode):
            return fmt
        return cls.human if fmt.value in ("human", "table") else cls(fmt.value)


class _CliLog(logging.Filter):
    """Log records for the terminal: parameters (an :class:`~nnxport.errors.Option` argument) spelled as
    flags, the message escaped by :func:`safe_text` (keys and paths reach the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(flag(a) if isinstance(a, Option) else a for a in record.args)
        record.msg, record.args = safe_text(cli_text(record.getMessage())), None
        return True


def debug() -> bool:
    return os.environ.get("NNXPORT_DEBUG", "") not in ("", "0")


class Output:
    """The output of the command being run: its :class:`Mode` and ``-q``, set once by :meth:`setup`."""

    def __init__(self) -> None:
        self.mode, self.quiet = Mode.human, False

    @property
    def human(self) -> bool:
        """Human results are printed (``--format human`` / ``table``, no ``-q``)."""
        return self.mode is Mode.human and not self.quiet

    def setup(self, fmt: Format | Mode, quiet: bool = False) -> None:
        """Set the mode, and nnxport's log on stderr: rich when stderr is a terminal, plain lines otherwise;
        ``-q`` keeps errors. Chatty third-party loggers (absl/orbax, jax, transformers) keep to errors."""
        self.mode, self.quiet = Mode.of(fmt), quiet
        logger = logging.getLogger("nnxport")
        logger.handlers.clear()
        handler: logging.Handler
        if err.is_terminal:
            handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("nnxport: %(levelname)s: %(message)s"))
        handler.addFilter(_CliLog())
        logger.addHandler(handler)
        logger.setLevel(logging.ERROR if quiet else logging.INFO)
        logger.propagate = False
        for name in ("absl", "jax", "orbax", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
        if quiet or self.mode is not Mode.human:  # no progress: nor huggingface_hub's download bars
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if not debug():
            warnings.filterwarnings("ignore")

    def progress(self) -> AbstractContextManager[Progress | None]:
        """The progress display on stderr: none with ``-q`` or a machine-readable mode."""
        return reporter(self.quiet, self.mode is not Mode.human, err)

    def result(self, *items: RenderableType) -> None:
        """Human results on stdout (nothing with ``-q``); a str is printed literally, escaped."""
        if self.human:
            for item in items:
                stdout.print(literal(item) if isinstance(item, str) else item)

    def json(self, data: Any) -> None:
        """The one JSON document a ``--format json`` command prints on stdout."""
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        sys.stdout.flush()

    def tsv(self, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        """A header line, then one line per row; a tab or newline inside a value (a key can hold any
        character) is written escaped (``\\t``, ``\\n``), as every control character."""
        sys.stdout.write("\t".join(columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(map(safe_text, row)) + "\n")

    def document(self, text: str) -> None:
        """A document (YAML) on stdout, as it is."""
        sys.stdout.write(text)
        sys.stdout.flush()

    def say(self, *parts: str | Text, style: str = "") -> None:
        """One line on stderr (notes, summaries, failures): a str part is printed literally, escaped; a
        Text part as it is."""
        line = Text.assemble(*(literal(p, style) if isinstance(p, str) else p for p in parts))
        err.print(line, soft_wrap=True, highlight=False)


#: The output of this run.
out = Output()
