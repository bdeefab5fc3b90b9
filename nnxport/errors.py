"""Exceptions whose ``str()`` is the message shown to the user.

Every failure a user can cause is raised as an :class:`NnxportError` subclass. The CLI prints
``error: <message>`` on stderr and exits with :attr:`NnxportError.exit_code`; nothing else is printed
unless ``NNXPORT_DEBUG=1`` is set, in which case the traceback is shown too.

A message that tells the user which parameter to change names it with :func:`option`, never as a
command-line flag: ``f"pass {option('allow_pickle', True)} to load them"``. Formatted into a message, an
:class:`Option` is a marker; ``str(err)`` spells it as the Python API does (``allow_pickle=True``,
``dtype``, ``parity=False``), and the CLI spells it as the flag (``--allow-pickle``, ``--dtype``,
``--no-parity``) through its own table (``nnxport.cli._options.flag``). So the core holds no CLI
wording, and each front end words the fix in its own terms. :meth:`NnxportError.message` takes the
spelling; :attr:`NnxportError.text` keeps the markers, for quoting one error inside another.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

#: An :class:`Option` inside a message: ``\\x1e["name", value]\\x1f`` (JSON escapes every control
#: character, so the marker's own delimiters never occur inside it).
_MARK = re.compile("\x1e(\\[[^\x1e\x1f]*\\])\x1f")


class Option:
    """A parameter named in a message: ``name`` as the Python API spells it, with ``value`` when the
    message asks for a particular one (``Option("parity", False)``: the API's ``parity=False``, the
    CLI's ``--no-parity``).

    ``f"{opt}"`` (formatting into a message) gives a marker that :func:`spell` turns into text;
    ``str(opt)`` is the API spelling (what a log line's ``%s`` shows)."""

    __slots__ = ("given", "name", "value")

    def __init__(self, name: str, *value: Any) -> None:
        self.name, self.given = name, bool(value)
        self.value = value[0] if value else None

    def api(self) -> str:
        """``name`` or ``name=value`` (the value as Python writes it)."""
        return f"{self.name}={self.value!r}" if self.given else self.name

    def __str__(self) -> str:
        return self.api()

    def __format__(self, spec: str) -> str:
        return "\x1e" + json.dumps([self.name, self.value] if self.given else [self.name]) + "\x1f"

    def __repr__(self) -> str:
        return f"Option({self.name!r}{f', {self.value!r}' if self.given else ''})"


def option(name: str, *value: Any) -> Option:
    """The parameter ``name`` (the API's spelling), optionally with the ``value`` to give it, for a
    message: ``f"use {option('parity', False)} to skip parity"``."""
    return Option(name, *value)


#: How a front end spells an :class:`Option`; ``None`` keeps the markers.
Spelling = Callable[[Option], str] | None


def spell(text: str, spelling: Spelling = Option.api) -> str:
    """``text`` with each :class:`Option` marker written by ``spelling`` (``None``: left as markers)."""
    if spelling is None:
        return text

    def one(m: re.Match[str]) -> str:
        try:
            return spelling(Option(*json.loads(m.group(1))))
        except (ValueError, TypeError):  # not one of ours: leave it as it is
            return m.group()

    return _MARK.sub(one, text)


def one_line(err: BaseException, limit: int | None = None) -> str:
    """``Type: first line of the message`` of an exception (that line cut to ``limit`` characters), for
    quoting a library's error inside nnxport's own one-line messages."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__


class NnxportError(Exception):
    """A failure the user can fix. ``str(err)`` is the whole user-facing message, parameters spelled as
    the Python API names them."""

    exit_code = 1

    def message(self, spelling: Spelling = Option.api) -> str:
        """The message with its parameters (:func:`option`) written by ``spelling``."""
        return spell(super().__str__(), spelling)

    @property
    def text(self) -> str:
        """The message with its :class:`Option` markers kept: for quoting this error in another one."""
        return self.message(None)

    def __str__(self) -> str:
        return self.message()


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
        self._problems = list(problems)
        #: Every problem, parameters spelled as the API names them.
        self.problems = [spell(p) for p in self._problems]
        super().__init__("\n".join(self.lines(spelling=None)))

    def lines(self, escape: Callable[[str], str] = str, spelling: Spelling = Option.api) -> list[str]:
        """The message's lines, each piece of text spelled by ``spelling`` (see :func:`spell`) and then
        passed through ``escape`` (the CLI escapes control characters, so that a problem quoting a key with
        a newline stays one line)."""
        def text(piece: str) -> str:
            return escape(spell(piece, spelling))

        if len(self._problems) == 1:
            return [text(f"{self.where}: {self._problems[0]}")]
        lines = [text(f"{self.where}: {len(self._problems)} problems")]
        lines += [f"  - {text(p)}" for p in self._problems[:self.SHOWN]]
        if len(self._problems) > self.SHOWN:
            lines.append(f"  ... and {len(self._problems) - self.SHOWN} more")
        return lines

    def message(self, spelling: Spelling = Option.api) -> str:
        return "\n".join(self.lines(spelling=spelling))


class ValueCheckError(NnxportError):
    """A tensor's values cannot be converted as asked: NaN / Inf in the source, or a cast that overflows."""


class OutputError(NnxportError):
    """The output folder cannot be written (exists, not writable, disk full, ...)."""


class DeviceError(NnxportError):
    """The requested device / mesh is not available."""
