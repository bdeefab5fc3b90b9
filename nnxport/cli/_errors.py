"""The error table: which exception ends a command with which exit code and which line on stderr, in one
place (:data:`ERRORS`, read by :func:`errors_handled`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import typer
from rich.text import Text

from nnxport import interrupt
from nnxport.cli._options import flag
from nnxport.cli._output import debug, err, safe_text
from nnxport.errors import MappingError, NnxportError
from nnxport.interrupt import Terminated

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3
EXIT_SIGINT = 130
EXIT_SIGPIPE = 141
EXIT_SIGTERM = 143


def error_text(e: NnxportError) -> str:
    """An error's message for the terminal, its parameters spelled as flags: one escaped line; a
    :class:`MappingError`'s summary and one escaped line per problem (the first ``SHOWN``)."""
    if isinstance(e, MappingError):
        return "\n".join(e.lines(safe_text, flag))
    return safe_text(e.message(flag))


def _nnxport_error(e: BaseException) -> Text | None:
    assert isinstance(e, NnxportError)
    return Text.assemble(("error:", "bold red"), " ", error_text(e))


def _broken_pipe(_: BaseException) -> None:
    # The reader went away (`nnxport inspect-keys ... | head`): stop quietly, like any Unix filter.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _internal(e: BaseException) -> Text:
    return Text.assemble(("internal error:", "bold red"), f" {type(e).__name__}: {safe_text(e)} "
                         "(run again with NNXPORT_DEBUG=1 for the traceback, and please report it)")


@dataclass(frozen=True)
class Row:
    """Exceptions of type ``kind`` end the command with ``code`` (or the error's own ``exit_code``) after
    ``say`` (its line on stderr, if any); with ``traced``, NNXPORT_DEBUG=1 shows the traceback instead."""

    kind: type[BaseException]
    code: int | None
    say: Callable[[BaseException], Text | None]
    traced: bool = False


#: The first row whose ``kind`` matches decides; anything else (SystemExit, ...) passes through.
ERRORS = (
    Row(NnxportError, None, _nnxport_error, traced=True),
    Row(BrokenPipeError, EXIT_SIGPIPE, _broken_pipe),
    Row(KeyboardInterrupt, EXIT_SIGINT,
        lambda _: Text("interrupted (SIGINT): nothing was left behind", style="red")),
    Row(Terminated, EXIT_SIGTERM,
        lambda _: Text("terminated (SIGTERM): nothing was left behind", style="red")),
    Row(Exception, EXIT_ERROR, _internal, traced=True),
)


@contextlib.contextmanager
def errors_handled() -> Iterator[None]:
    """Turn failures into their line on stderr and the contract's exit code (:data:`ERRORS`)."""
    interrupt.install()  # SIGINT / SIGTERM end the run wherever they arrive (nnxport.interrupt)
    try:
        yield
    except typer.Exit:
        raise
    except BaseException as e:
        row = next((r for r in ERRORS if isinstance(e, r.kind)), None)
        if row is None or (row.traced and debug()):
            raise
        line = row.say(e)
        if line is not None:
            err.print(line, highlight=False, soft_wrap=True)
        code = e.exit_code if isinstance(e, NnxportError) else row.code
        raise typer.Exit(EXIT_ERROR if code is None else code) from None
