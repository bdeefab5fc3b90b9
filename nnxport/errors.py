"""Exceptions whose ``str()`` is the message shown to the user.

Every failure a user can cause is raised as an :class:`NnxportError` subclass. The CLI prints
``error: <message>`` on stderr and exits with :attr:`NnxportError.exit_code`; nothing else is printed
unless ``NNXPORT_DEBUG=1`` is set, in which case the traceback is shown too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def one_line(err: BaseException, limit: int | None = None) -> str:
    """``Type: first line of the message`` of an exception (that line cut to ``limit`` characters), for
    quoting a library's error inside nnxport's own one-line messages."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__


class NnxportError(Exception):
    """A failure the user can fix. ``str(err)`` is the whole user-facing message."""

    exit_code = 1


class SourceError(NnxportError):
    """The checkpoint source (hub id, folder, file, config.json) is missing, unreadable or invalid."""


class ConfigError(NnxportError):
    """config.json asks for something the target family cannot represent."""


class MappingError(NnxportError):
    """The mapping file is invalid, or does not fit the source checkpoint / target model.

    ``problems`` holds every violation found (they are reported together); the message is a one-line
    summary followed by one line for each of the first :attr:`SHOWN` problems and, past those, a last
    line ``... and K more`` (all of them stay in ``problems``, and in ``--format json`` output).
    """

    #: At most this many problems are spelled out in the message.
    SHOWN = 20

    def __init__(self, where: str, problems: Iterable[str]) -> None:
        self.where = where
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self, escape: Callable[[str], str] = str) -> list[str]:
        """The message's lines, each piece of text passed through ``escape`` (the CLI escapes control
        characters, so that a problem quoting a key with a newline stays one line)."""
        if len(self.problems) == 1:
            return [escape(f"{self.where}: {self.problems[0]}")]
        lines = [escape(f"{self.where}: {len(self.problems)} problems")]
        lines += [f"  - {escape(p)}" for p in self.problems[:self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            lines.append(f"  ... and {len(self.problems) - self.SHOWN} more")
        return lines


class ValueCheckError(NnxportError):
    """A tensor's values cannot be converted as asked: NaN / Inf in the source, or a cast that overflows."""


class OutputError(NnxportError):
    """The output folder cannot be written (exists, not writable, disk full, ...)."""


class DeviceError(NnxportError):
    """The requested device / mesh is not available."""
