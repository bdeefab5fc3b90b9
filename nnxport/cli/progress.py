"""Progress on stderr for convert and verify (the core's :class:`nnxport.progress.Progress`).

A rich display when stderr is a terminal, a few plain lines per phase when it is not (a log file, a
pipe, CI), nothing with ``-q`` or ``--format json``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichDisplay
from rich.text import Text

from nnxport.progress import Progress


def rate(nbytes: float, seconds: float) -> str:
    """Throughput in MB/s (decimal megabytes, as the sizes)."""
    return f"{nbytes / max(seconds, 1e-9) / 1e6:.1f} MB/s"


@dataclass
class _Phase:
    started: float
    total: int | None
    done: int = 0
    last_line: float = 0.0


class PlainProgress:
    """Plain lines on ``stream``, never one per tensor. A phase that counts bytes: one line when it starts
    (with its total), at most one every ``interval`` seconds while it runs, one when it ends, with the bytes
    done and the throughput: ``nnxport: progress: read started (102.4 MB)`` ... ``nnxport: progress: read
    done: 102.4 MB in 0.90 s, 113.8 MB/s``. A phase without bytes: one line when it ends (``nnxport:
    progress: plan done in 0.55 s``), so that a failure in it is the only line it leaves.
    """

    def __init__(self, stream: TextIO, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._phases: dict[str, _Phase] = {}
        self._lock = threading.Lock()  # advance() may come from Orbax's writer thread

    def start(self, phase: str, total: int | None = None) -> None:
        with self._lock:
            now = self._clock()
            self._phases[phase] = _Phase(started=now, total=total, last_line=now)
            if total is not None:
                self._line(phase, f"started ({decimal(total)})")

    def advance(self, phase: str, nbytes: int) -> None:
        with self._lock:
            p = self._phases.get(phase)
            if p is None:
                return
            p.done += nbytes
            now = self._clock()
            if now - p.last_line < self._interval:
                return
            p.last_line = now
            of = "" if not p.total else f" of {decimal(p.total)} ({100 * p.done / p.total:.0f}%)"
            self._line(phase, f"{decimal(p.done)}{of}, {rate(p.done, now - p.started)}")

    def end(self, phase: str) -> None:
        with self._lock:
            p = self._phases.pop(phase, None)
            if p is None:
                return
            took = self._clock() - p.started
            if p.total is None and p.done == 0:
                self._line(phase, f"done in {took:.2f} s")
            else:
                self._line(phase, f"done: {decimal(p.done)} in {took:.2f} s, {rate(p.done, took)}")

    def _line(self, phase: str, text: str) -> None:
        self._stream.write(f"nnxport: progress: {phase} {text}\n")
        self._stream.flush()


class _BytesColumn(ProgressColumn):
    """``51.2 MB/102.4 MB  113.8 MB/s`` (average since the phase started) for phases that count bytes."""

    def render(self, task: Task) -> Text:
        if not task.fields.get("bytes"):
            return Text("")
        done = int(task.completed)
        total = "?" if task.total is None else decimal(int(task.total))
        return Text(f"{decimal(done)}/{total}  {rate(done, task.elapsed or 0.0)}", style="progress.download")


class RichProgress:
    """A rich progress display on ``console`` (stderr), one line per phase; use as a context manager."""

    def __init__(self, console: Console) -> None:
        self._display = RichDisplay(SpinnerColumn(finished_text="[green]✓[/]"),
                                    TextColumn("{task.description:<8}"), BarColumn(), _BytesColumn(),
                                    TimeElapsedColumn(), console=console)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self._display.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._display.stop()

    def start(self, phase: str, total: int | None = None) -> None:
        self._tasks[phase] = self._display.add_task(phase, total=total, bytes=total is not None)

    def advance(self, phase: str, nbytes: int) -> None:
        task = self._tasks.get(phase)
        if task is not None:
            self._display.advance(task, nbytes)

    def end(self, phase: str) -> None:
        task = self._tasks.pop(phase, None)
        if task is None:
            return
        info = next(t for t in self._display.tasks if t.id == task)
        if info.fields.get("bytes"):
            self._display.update(task, total=info.completed)  # an estimated total becomes what was done
        else:
            self._display.update(task, total=1, completed=1)
        self._display.stop_task(task)


@contextlib.contextmanager
def reporter(quiet: bool, machine: bool, console: Console) -> Iterator[Progress | None]:
    """The progress reporter a command uses: none with ``-q`` / ``--format json``, rich on a terminal
    (``console``: stderr's), plain lines otherwise."""
    if quiet or machine:
        yield None
    elif console.is_terminal:
        with RichProgress(console) as display:
            yield display
    else:
        yield PlainProgress(sys.stderr)
