"""The output folder: Orbax checkpoint + manifest + reports, written so that only a complete run
ever shows up under the requested name.

Everything is written into a hidden sibling ``.<name>.nnxport-partial-<pid>`` and renamed into place at
the end. With ``--force`` an existing folder is moved aside only at that moment and deleted after the
rename, so a failed run never destroys the previous result.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1

from nnxport import interrupt
from nnxport.errors import OutputError, SourceError, one_line

CHECKPOINT = "checkpoint"
MANIFEST = "nnxport.json"
PARITY_JSON = "parity.json"
PARITY_MD = "parity.md"
PARTIAL_TAG = ".nnxport-partial-"


class OutputDir:
    """Stage an output folder next to ``final`` and publish it atomically with :meth:`commit`.

    In a multi-process run (``process_count > 1``) every process gets the same staging path (Orbax writes
    into it collectively); only process 0 creates, commits or removes it. Callers put a barrier between
    process 0 creating it and the others using it, and before the commit.
    """

    def __init__(self, final: Path, *, force: bool = False, process_index: int = 0,
                 process_count: int = 1) -> None:
        self.final = final
        self.primary = process_index == 0
        if final.exists() and not final.is_dir():
            raise OutputError(f"{final}: exists and is not a folder")
        if final.is_dir() and any(final.iterdir()) and not force:
            raise OutputError(f"{final}: folder exists and is not empty (use --force to replace it)")
        existing = next((p for p in (final.parent, *final.parent.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise OutputError(f"{final}: cannot create the output folder ({existing} is a file)")
        try:
            if process_count > 1:
                self.staging = final.parent / f".{final.name}{PARTIAL_TAG}multiprocess"
                if self.primary:
                    shutil.rmtree(self.staging, ignore_errors=True)  # left by an earlier, killed run
                    self.staging.mkdir(parents=True)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                self.staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL_TAG}", dir=final.parent))
        except OSError as e:
            raise OutputError(f"{final}: cannot create the output folder ({e.strerror or e})") from None

    def commit(self) -> None:
        """Move the staged folder to its final name, replacing an old one only now (process 0 only)."""
        if not self.primary:
            return
        old = None
        try:
            if self.final.exists():
                old = self.final.with_name(f".{self.final.name}.nnxport-old-{os.getpid()}")
                os.replace(self.final, old)
            os.replace(self.staging, self.final)
        except OSError as e:
            if old is not None and not self.final.exists():
                os.replace(old, self.final)
            raise OutputError(f"{self.final}: cannot move the finished output into place ({e})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove everything staged (process 0 only)."""
        if self.primary:
            shutil.rmtree(self.staging, ignore_errors=True)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None


GROUP_BYTES = 512 * 2**20
"""Arrays are written in groups of about this many bytes: the writer never holds more than one group."""


def _env_group_bytes() -> int:
    """:data:`GROUP_BYTES`, or ``NNXPORT_WRITE_GROUP_MB`` megabytes (MiB) when set: smaller groups mean
    less memory and more, smaller writes (the tests use it to have many writes in flight)."""
    value = os.environ.get("NNXPORT_WRITE_GROUP_MB", "")
    if not value:
        return GROUP_BYTES
    try:
        mb = float(value)
    except ValueError:
        mb = -1
    if not 0 < mb < 2**30:  # NaN and inf included
        raise OutputError(f"NNXPORT_WRITE_GROUP_MB={value!r}: expected a positive number of megabytes")
    return max(1, int(mb * 2**20))


class StateWriter:
    """Write a model state into one Orbax checkpoint group by group, so that memory stays at about one
    group however large the model is.

    Uses Orbax's partial-save sessions (``orbax.checkpoint.experimental.v1.partial``): each
    :meth:`add`-ed group is written into the session and dropped; :meth:`finish` finalises the checkpoint
    (``commit_success.txt``). The result is an ordinary Orbax checkpoint of the nested dict
    (``nnx.to_pure_dict`` layout): ``orbax.checkpoint.experimental.v1.load(path, abstract)`` restores it.
    Orbax's one-shot ``save`` would instead hold every array (and up to ~3x their bytes, orbax issue 1640).
    In a multi-process run every process must make the same calls (Orbax saves collectively).
    """

    def __init__(self, path: Path, *, group_bytes: int | None = None, shown_as: Path | None = None,
                 on_written: Callable[[int], None] | None = None) -> None:
        self.path = path.absolute()
        self.shown_as = shown_as or path  # how errors name the checkpoint (the final output folder)
        self.group_bytes = group_bytes if group_bytes is not None else _env_group_bytes()
        self.on_written = on_written  # called with a group's bytes once that group is on disk
        self._group: dict[Any, Any] = {}
        self._bytes = 0
        self._pending: Any = None  # the group being written in the background
        self._pending_bytes = 0
        self.groups_written = 0

    def add(self, dotted: str, array: jax.Array) -> None:
        """Queue ``array`` for target ``dotted`` (``a.b.0.c``; digit parts become int keys); writes the
        group once it reaches ``group_bytes``."""
        set_path(self._group, dotted, array, create=True)
        self._bytes += array.nbytes
        if self._bytes >= self.group_bytes:
            self.flush()

    def flush(self) -> None:
        """Start writing the queued group in the background, after the previous one has finished: reading
        and placing the next group overlaps with writing this one, and at most two groups are alive."""
        if not self._group:
            return
        self.wait()
        try:
            # A signal inside save_async would lose the handle of a save already under way, which
            # close() must wait for: it is recorded and raised just after (nnxport.interrupt).
            with interrupt.deferred():
                self._pending = ocp_v1.partial.save_async(self.path, self._group)
        except (OSError, ValueError, RuntimeError) as e:
            raise self._error("write", e) from None
        self._pending_bytes = self._bytes
        self._group, self._bytes = {}, 0
        self.groups_written += 1
        interrupt.check()

    def wait(self) -> None:
        """Block until the group being written is on disk."""
        pending = self._pending
        if pending is not None:
            try:
                pending.result()
            except (OSError, ValueError, RuntimeError) as e:
                self._pending = None
                raise self._error("write", e) from None
            self._pending = None
            if self.on_written is not None:
                self.on_written(self._pending_bytes)
        interrupt.check()

    def close(self) -> None:
        """Wait for the group being written, ignoring how it ends, so that nothing writes into the
        checkpoint's folder once this returns: call it before removing that folder (an interrupted or
        failed run). Signals arriving meanwhile are recorded, not raised."""
        pending, self._pending = self._pending, None
        self._group, self._bytes = {}, 0
        if pending is not None:
            with interrupt.deferred(), contextlib.suppress(Exception):
                pending.result()

    def finish(self) -> None:
        """Write what is queued and finalise the checkpoint."""
        self.flush()
        self.wait()
        try:
            ocp_v1.partial.finalize(self.path)
        except (OSError, ValueError, RuntimeError) as e:
            raise self._error("finalise", e) from None

    def _error(self, what: str, e: BaseException) -> OutputError:
        """An I/O failure of Orbax (OSError) or of tensorstore under it (ValueError / RuntimeError with
        the OS's message inside, e.g. ``RESOURCE_EXHAUSTED: ... No space left on device``) as one line."""
        return OutputError(f"{self.shown_as}: cannot {what} the checkpoint ({io_reason(e)})")


_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
           errno.EFBIG)


def io_reason(e: BaseException) -> str:
    """The OS's reason for an I/O error, found in an OSError or in the text of a wrapped one."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    for code in _ERRNOS:
        if os.strerror(code) in text:
            return os.strerror(code)
    return one_line(e, 200)


def set_path(tree: dict[Any, Any], dotted: str, value: Any, *, create: bool = False) -> None:
    """``tree[a][b][0][c] = value`` for ``dotted`` ``a.b.0.c`` (digit parts are int keys, as in
    ``nnx.to_pure_dict``); ``create`` makes missing intermediate dicts."""
    keys: list[Any] = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {}) if create else tree[k]
    tree[keys[-1]] = value


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished output folder; SourceError if the folder is not one."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SourceError(f"{folder}: no such folder")
    if not path.is_file():
        raise SourceError(f"{folder}: not an nnxport output folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or "model" not in manifest:
        raise SourceError(f"{path}: not an nnxport manifest")
    ckpt = folder / CHECKPOINT
    if not ckpt.is_dir() or not ocp.utils.is_checkpoint_finalized(ckpt.absolute()):
        raise SourceError(f"{ckpt}: missing or unfinished Orbax checkpoint")
    return manifest


def restore_state(path: Path, abstract: Mapping[str, Any], sharding: jax.sharding.Sharding) -> Any:
    """Restore the checkpoint at ``path`` into the layout of ``abstract`` (a nested dict of
    ShapeDtypeStruct); dtypes and shapes come from the checkpoint's own metadata, arrays go to
    ``sharding``."""
    saved = ocp_v1.metadata(path.absolute()).metadata

    def target(keypath: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        node: Any = saved
        for k in keypath:
            key = getattr(k, "key", k)
            node = node[key] if key in node else node[str(key)]
        if tuple(node.shape) != tuple(leaf.shape):
            dotted = ".".join(str(getattr(k, "key", k)) for k in keypath)
            raise SourceError(f"{path}: '{dotted}' has shape {tuple(node.shape)} in the checkpoint, "
                              f"the model expects {tuple(leaf.shape)}")
        return jax.ShapeDtypeStruct(leaf.shape, node.dtype, sharding=sharding)

    try:
        target_tree = jax.tree_util.tree_map_with_path(target, abstract)
    except KeyError as e:
        raise SourceError(f"{path}: the checkpoint lacks {e} that the model needs") from None
    return ocp_v1.load(path.absolute(), target_tree)
