"""What every command shares: the stderr console, logging, the error table, output formats."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from nnxport.errors import NnxportError

#: Logs, progress, warnings and errors. stdout is reserved for the command's result.
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # piped or redirected: don't squeeze tables into 80 columns
    out.width = 160

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3
EXIT_SIGINT = 130
EXIT_SIGPIPE = 141
EXIT_SIGTERM = 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staged output is cleaned up on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


class Format(StrEnum):
    human = "human"
    json = "json"


def package_version() -> str:
    """nnxport's installed version (without importing the API, which imports jax)."""
    from importlib import metadata

    try:
        return metadata.version("nnxport")
    except metadata.PackageNotFoundError:
        return "0+unknown"


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
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except typer.Exit:
        raise
    except NnxportError as e:
        if debug():
            raise
        err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
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
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} "
                  "(run again with NNXPORT_DEBUG=1 for the traceback, and please report it)",
                  markup=True, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None
