"""Opening what a source names, safely: regular files only, inside the source's folder; JSON read strictly."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnxport.errors import SourceError

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path | str, mode: int) -> SourceError:
    if stat.S_ISDIR(mode):
        return SourceError(f"{path}: is a folder, not a file")
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return SourceError(f"{path}: is {kind}, not a regular file; nnxport reads only regular files")


def _stat_error(path: Path | str, e: OSError) -> SourceError:
    if e.errno == errno.ELOOP:
        return SourceError(f"{path}: symlink loop (too many levels of symbolic links)")
    if e.errno == errno.ENOENT and os.path.islink(path):
        return SourceError(f"{path}: broken symlink (points to {os.readlink(path)!r}, which does not exist)")
    return SourceError(f"{path}: cannot read ({e.strerror or e})")


def check_regular(path: Path | str) -> os.stat_result:
    """``os.stat(path)``, refusing anything but a regular file (a FIFO or device would block or have
    effects when opened), a symlink loop and a broken symlink: one-line :class:`SourceError`\\ s."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _stat_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def open_regular(path: Path | str) -> int:
    """A read-only descriptor of the regular file ``path`` (:func:`check_regular`, then opened without
    blocking and checked again: a FIFO swapped in between is refused instead of waited on)."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _stat_error(path, e) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    os.set_blocking(fd, True)
    return fd


def source_homes(root: Path, *, snapshot: bool) -> tuple[Path, ...]:
    """Where the files of a source may resolve to: its folder; for a hub snapshot
    (``models--org--name/snapshots/<rev>``) also that cache repo's ``blobs/``, which the hub's snapshot
    files are symlinks into."""
    homes = [Path(os.path.realpath(root))]
    if snapshot:
        homes.append(Path(os.path.realpath(root.parent.parent / "blobs")))
    return tuple(homes)


def check_inside(path: Path, homes: Sequence[Path], what: str | None = None) -> Path:
    """``path``, refused (one line naming ``what``, else the path, and where it points) when it resolves
    (symlinks followed, nothing opened) outside every folder of ``homes``."""
    real = Path(os.path.realpath(path))
    if not any(real == h or real.is_relative_to(h) for h in homes):
        raise SourceError(f"{what or path} points outside {homes[0]} (to {str(real)!r}); "
                          "nnxport reads only files inside the source folder")
    return path


def few(items: Sequence[str], limit: int = 3) -> str:
    """``a, b, c (and 2 more)``."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (and {len(items) - limit} more)"


class DuplicateKey(ValueError):
    def __init__(self, key: str, values: tuple[Any, Any]) -> None:
        super().__init__(key)
        self.key, self.values = key, values


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a name that appears twice in one JSON object."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k, (out[k], v))
        out[k] = v
    return out


MAX_JSON_BYTES = 64_000_000
"""The largest config.json / index.json read (the largest published indexes are a few MB)."""


def read_json_object(path: Path, *, unique: bool = False) -> dict[str, Any]:
    """A JSON file that must hold an object; ``unique``: a name given twice in one object is an error
    (JSON parsers silently keep the last)."""
    try:
        hook = unique_pairs if unique else None
        with os.fdopen(open_regular(path), "rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise SourceError(f"{path}: larger than {MAX_JSON_BYTES // 1_000_000} MB, too large for a JSON "
                              "config or index")
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
    except DuplicateKey as e:
        first, second = (json.dumps(v) if not isinstance(v, str) else v for v in e.values)
        raise SourceError(f"{path}: names {e.key!r} twice ({first} and {second})") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc
