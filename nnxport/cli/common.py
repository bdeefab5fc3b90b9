"""What every command shares: the stderr console, logging, the error table, output formats."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from nnxport import interrupt
from nnxport.errors import MappingError, NnxportError
from nnxport.interrupt import Terminated

#: Logs, progress, warnings and errors. stdout is reserved for the command's result.
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # piped or redirected: don't squeeze tables into 80 columns
    out.width = 160

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3
EXIT_SIGINT = 130
EXIT_SIGPIPE = 141
EXIT_SIGTERM = 143


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


def error_text(e: BaseException) -> str:
    """An error's message for the terminal: one escaped line; a :class:`MappingError`'s summary and one
    escaped line per problem."""
    if isinstance(e, MappingError):
        return "\n".join(e.lines(safe_text))
    return safe_text(e)


class _EscapeControls(logging.Filter):
    """Log records with their message escaped by :func:`safe_text` (keys and paths reach the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = safe_text(record.getMessage()), None
        return True


class Format(StrEnum):
    human = "human"
    json = "json"


def debug() -> bool:
    return os.environ.get("NNXPORT_DEBUG", "") not in ("", "0")


def setup_logging(quiet: bool, machine: bool) -> None:
    """nnxport's log on stderr: rich when stderr is a terminal, plain lines otherwise; -q keeps errors.

    Chatty third-party loggers (absl/orbax, jax, transformers) are kept to errors.
    """
    level = logging.ERROR if quiet else logging.INFO
    logger = logging.getLogger("nnxport")
    logger.handlers.clear()
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("nnxport: %(levelname)s: %(message)s"))
    handler.addFilter(_EscapeControls())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    for name in ("absl", "jax", "orbax", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if quiet or machine:  # no progress with -q / --format json: nor huggingface_hub's download bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not debug():
        warnings.filterwarnings("ignore")


def check_stdin_mapping(mapping: str | None) -> None:
    """``--mapping -`` with stdin a terminal would wait for input that is not coming: a usage error.

    Call it before :func:`errors_handled` (which would turn the usage error into an internal one)."""
    if mapping != "-":
        return
    if sys.stdin is None or sys.stdin.closed:
        raise typer.BadParameter("'-' reads the mapping from stdin, which is closed",
                                 param_hint="'--mapping'")
    if sys.stdin.isatty():
        raise typer.BadParameter("'-' reads the mapping from stdin, which is a terminal: pipe the YAML in, "
                                 "e.g. `cat my.yaml | nnxport ... --mapping -`", param_hint="'--mapping'")


def print_json(data: Any) -> None:
    """The one JSON document a ``--format json`` command prints on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def errors_handled() -> Iterator[None]:
    """Turn failures into one line on stderr and the contract's exit code (traceback with NNXPORT_DEBUG=1)."""
    interrupt.install()  # SIGINT / SIGTERM end the run wherever they arrive (nnxport.interrupt)
    try:
        yield
    except typer.Exit:
        raise
    except NnxportError as e:
        if debug():
            raise
        err.print(Text.assemble(("error:", "bold red"), " ", error_text(e)), highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except BrokenPipeError:
        # The reader went away (`nnxport inspect-keys ... | head`): stop quietly, like any Unix filter.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_SIGPIPE) from None
    except KeyboardInterrupt:
        err.print("interrupted (SIGINT): nothing was left behind", style="red")
        raise typer.Exit(EXIT_SIGINT) from None
    except Terminated:
        err.print("terminated (SIGTERM): nothing was left behind", style="red")
        raise typer.Exit(EXIT_SIGTERM) from None
    except Exception as e:
        if debug():
            raise
        err.print(Text.assemble(("internal error:", "bold red"), f" {type(e).__name__}: {safe_text(e)} "
                                "(run again with NNXPORT_DEBUG=1 for the traceback, and please report it)"),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None
