"""SIGINT / SIGTERM that always end a run, wherever they arrive.

Python runs a signal handler in the main thread between two bytecodes of whatever frame runs then, and
an exception raised there can be lost: inside a garbage-collector callback (jax's ``_xla_gc_callback``),
a ``__del__`` or a weakref callback Python prints "Exception ignored in ..." and goes on. So the handlers
installed by :func:`install` both raise (``KeyboardInterrupt`` / :class:`Terminated`) and record the
signal, and :func:`check`, called at safe points of a conversion (after each tensor placed, each group
written, each phase), raises again for a recorded one. Inside :func:`deferred` (cleanup that must not be
cut short: waiting for a background write, removing the staging folder) a signal is only recorded.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staged output is cleaned up on the way out."""


_received: int | None = None  # the first SIGINT / SIGTERM received, until reset()
_deferring = 0


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received is None:
        _received = signum
    if not _deferring:
        raise _exception(_received)


def _quiet_excepthook(original: Any) -> Any:
    def hook(args: threading.ExceptHookArgs) -> None:
        if _received is None:  # a background thread failing on its own: as Python shows it
            original(args)
        # once interrupted, a library's thread failing while the run shuts down is not news

    return hook


class _QuietAfterSignal(logging.Filter):
    """Drops a library's log records once a signal has arrived: asyncio (under Orbax) catches the
    exception raised in its event loop's callback and logs it with a traceback ("Exception in callback");
    the run ends at the next :func:`check` all the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _received is None


_QUIET = _QuietAfterSignal()


def install() -> None:
    """Handle SIGINT and SIGTERM as described above (from the main thread; elsewhere: nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return
    reset()
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    for name in ("asyncio", "absl"):
        logging.getLogger(name).addFilter(_QUIET)  # idempotent: a filter is added once
    if not getattr(threading.excepthook, "_nnxport", False):
        threading.excepthook = _quiet_excepthook(threading.excepthook)
        threading.excepthook._nnxport = True  # type: ignore[attr-defined]


def reset() -> None:
    global _received
    _received = None


def received() -> int | None:
    """The signal received (SIGINT / SIGTERM number), or None."""
    return _received


def check() -> None:
    """Raise for a signal received whose exception was lost (see the module's doc); a no-op otherwise."""
    if _received is not None and not _deferring:
        raise _exception(_received)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals arriving inside are recorded, not raised: for cleanup that must run to its end."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
