"""Progress hooks: how the core tells its caller what it is doing, without knowing how that is shown.

:func:`nnxport.api.convert` and :func:`nnxport.api.verify` take ``progress=``, anything with the three
methods of :class:`Progress`. The CLI passes a rich progress display when stderr is a terminal, a few
plain lines per phase otherwise, and nothing with ``-q`` or ``--format json``. Only phase names and byte
counts cross this interface, never arrays, so a reporter costs a few integer additions per tensor.

Phases, in order, with what their bytes count:

``convert``
    ``resolve`` (no bytes), ``plan`` (no bytes), then ``read`` / ``place`` / ``write`` running together
    as the arrays stream through: bytes read from the safetensors files (source dtype), bytes placed on
    the device(s) and bytes written to the Orbax checkpoint (target dtype; both totals are the
    manifest's ``bytes``), then ``parity`` (no bytes).
``verify``
    ``load`` (the checkpoint's bytes, restored onto the device), ``resolve``, ``parity``.

A phase that fails is left without :meth:`Progress.end`: the exception says what happened.
"""

from __future__ import annotations

from typing import Final, Protocol

RESOLVE: Final = "resolve"
PLAN: Final = "plan"
READ: Final = "read"
PLACE: Final = "place"
WRITE: Final = "write"
LOAD: Final = "load"
PARITY: Final = "parity"
#: The phases convert and verify report, in the order they start (read / place / write run together).
PHASES: Final = (RESOLVE, PLAN, READ, PLACE, WRITE, LOAD, PARITY)


class Progress(Protocol):
    """What the core reports. ``total`` is the phase's byte count when known up front (None: no bytes,
    or not known); ``advance`` adds ``nbytes`` done (it may be called from a background thread)."""

    def start(self, phase: str, total: int | None = None) -> None: ...

    def advance(self, phase: str, nbytes: int) -> None: ...

    def end(self, phase: str) -> None: ...


class NoProgress:
    """The default reporter: does nothing."""

    def start(self, phase: str, total: int | None = None) -> None:
        pass

    def advance(self, phase: str, nbytes: int) -> None:
        pass

    def end(self, phase: str) -> None:
        pass


NO_PROGRESS = NoProgress()
