"""The output folder: Orbax checkpoint + manifest + reports, written so that only a complete run
ever shows up under the requested name.

Everything is written into a hidden sibling ``.<name>.nnxport-partial-<pid>`` and renamed into place at
the end. With ``--force`` an existing folder is moved aside only at that moment and deleted after the
rename, so a failed run never destroys the previous result.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import orbax.checkpoint.experimental.v1 as ocp_v1
from flax import nnx

from nnxport import interrupt
from nnxport.errors import ConfigError, NnxportError, OutputError, SourceError, one_line, option
from nnxport.models.base import Family
from nnxport.models.layers import seed_dropout
from nnxport.parity.report import PARITY_PNG, ParityReport
from nnxport.pipeline.lazy import CheckpointBlocks, flatten, lazy_model
from nnxport.pipeline.loading import leaf_shardings, load_mesh, tag_shardings
from nnxport.pipeline.plan import STATE_FILTER, abstract_state
from nnxport.placement import default_sharding, resolve_device


def write_reports(folder: Path, report: ParityReport, title: str) -> None:
    write_json(folder / PARITY_JSON, report.to_json())
    plot = PARITY_PNG if report.write_plot(folder / PARITY_PNG) else None  # with the optional `plot` extra
    write_text(folder / PARITY_MD, report.to_markdown(title, plot=plot))



log = logging.getLogger("nnxport")

CHECKPOINT = "checkpoint"
MANIFEST = "nnxport.json"
PARITY_JSON = "parity.json"
PARITY_MD = "parity.md"
PARTIAL_TAG = ".nnxport-partial-"
ABORT_WAIT_S = 30.0  # how long a failed run keeps removing its staging folder


LOCK_TAG = ".nnxport-lock"
OLD_TAG = ".nnxport-old-"


def unsafe_target(final: Path, protect: Iterable[Path | None] = ()) -> str | None:
    """Why ``final`` must never be replaced by an output folder, or None: it is the root, the home or the
    current folder, contains the current folder, or is (or contains) one of ``protect`` (the source folder,
    its files, a config or mapping file). Symbolic links count both as written and resolved."""
    forms = {Path(os.path.abspath(final)), final.resolve()}
    cwd = Path.cwd()
    try:
        homes = {Path.home(), Path.home().resolve()}
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        homes = set()
    for f in forms:
        if f == Path(f.anchor):
            return "is the root folder"
        if f in homes:
            return "is your home folder"
        if f in {cwd, cwd.resolve()}:
            return "is the current folder"
        if cwd.is_relative_to(f) or cwd.resolve().is_relative_to(f):
            return "contains the current folder"
        for p in (p for p in protect if p is not None):
            for q in {Path(os.path.abspath(p)), p.resolve()}:
                if q == f:
                    return f"is the source ({p})"
                if q.is_relative_to(f):
                    return f"contains the source ({p})"
    return None


def check_target(final: Path, protect: Iterable[Path | None] = ()) -> None:
    """OutputError unless ``final`` is a safe place for an output folder (:func:`unsafe_target`)."""
    why = unsafe_target(final, protect)
    if why is not None:
        raise OutputError(f"{os.path.abspath(final)}: {why}; it is never replaced: choose another output "
                          "folder")


class OutputDir:
    """Stage an output folder next to ``final`` and publish it atomically with :meth:`commit`.

    Refused at once: a target that :func:`unsafe_target` names, a symbolic link, a file, a non-empty
    folder without ``force``. While the run lasts the target is locked (``.NAME.nnxport-lock`` next to
    it, holding the pid): a second conversion into it fails at once. Staging folders of earlier runs
    whose process is dead (killed) are removed first. :meth:`commit` fsyncs everything staged, then checks
    that the target is still exactly what was checked here (absent, or the same folder with the same
    entries) before replacing it.

    In a multi-process run (``process_count > 1``) every process gets the same staging path (Orbax writes
    into it collectively); only process 0 creates, locks, commits or removes it. Callers put a barrier
    between process 0 creating it and the others using it, and before the commit.
    """

    def __init__(self, final: Path, *, force: bool = False, process_index: int = 0,
                 process_count: int = 1, protect: Iterable[Path | None] = ()) -> None:
        check_target(final, protect)
        self.shown = final  # how messages name it: as the caller wrote it
        self.final = final = Path(os.path.abspath(final))
        self._writer: StateWriter | None = None
        self.force = force
        self.primary = process_index == 0
        self._lock_fd: int | None = None
        existing = next((p for p in (final.parent, *final.parent.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise OutputError(f"{final}: cannot create the output folder ({existing} is a file)")
        self._seen = self._check_existing()  # refused before anything is created ...
        try:
            if self.primary:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._lock()
                self._remove_stale()
            self._seen = self._check_existing()  # ... and checked again under the lock
            if process_count > 1:
                self.staging = final.parent / f".{final.name}{PARTIAL_TAG}multiprocess"
                if self.primary:
                    shutil.rmtree(self.staging, ignore_errors=True)  # left by an earlier, killed run
                    self.staging.mkdir()
            else:
                self.staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL_TAG}{os.getpid()}-",
                                                     dir=final.parent))
            if self.primary:  # mkdtemp makes 0700: the output gets the permissions the umask gives
                os.chmod(self.staging, 0o777 & ~_umask())
        except OSError as e:
            self._unlock()
            raise OutputError(f"{final}: cannot create the output folder ({e.strerror or e})") from None
        except BaseException:
            self._unlock()
            raise

    def _check_existing(self) -> tuple[int, int, int, list[str]] | None:
        """What is at the target now: None, or (device, inode, mtime, entries) of a folder that may be
        replaced."""
        final = self.final
        if final.is_symlink():
            raise OutputError(f"{final}: is a symbolic link; name the folder itself")
        if final.exists() and not final.is_dir():
            raise OutputError(f"{final}: exists and is not a folder")
        if not final.is_dir():
            return None
        entries = sorted(os.listdir(final))
        if entries and not self.force:
            raise OutputError(f"{final}: folder exists and is not empty "
                              f"(use {option('force', True)} to replace it)")
        st = final.lstat()
        return st.st_dev, st.st_ino, st.st_mtime_ns, entries

    def _now(self) -> tuple[int, int, int, list[str]] | None:
        """The fingerprint :meth:`_check_existing` recorded, taken again (None if gone or not a folder)."""
        try:
            st = self.final.lstat()
            if not stat.S_ISDIR(st.st_mode):
                return None
            return st.st_dev, st.st_ino, st.st_mtime_ns, sorted(os.listdir(self.final))
        except OSError:
            return None

    def _lock(self) -> None:
        """Hold ``.NAME.nnxport-lock`` next to the target (flock), or OutputError naming the holder."""
        path = self.final.parent / f".{self.final.name}{LOCK_TAG}"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.final}: another nnxport process (pid {holder}) is writing this "
                                  "folder; wait for it to finish") from None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break  # not a lock file its last holder removed after we opened it
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd, self._lock_path = fd, path

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino:
                self._lock_path.unlink()
        os.close(fd)

    def _remove_stale(self) -> None:
        """Remove the staging folders that killed runs into this target left (their pid is dead); a
        previous output moved aside by a run killed while replacing it is put back when nothing took its
        place. Those of a live process are left alone."""
        for entry in sorted(self.final.parent.iterdir()):
            for tag in (PARTIAL_TAG, OLD_TAG):
                prefix = f".{self.final.name}{tag}"
                pid = entry.name[len(prefix):].split("-")[0] if entry.name.startswith(prefix) else ""
                if not pid.isdigit() or entry.is_symlink():
                    continue
                if _alive(int(pid)):
                    log.info("%s: left alone, process %s that staged it is still running", entry, pid)
                elif tag == OLD_TAG and not os.path.lexists(self.final):
                    os.replace(entry, self.final)
                    log.warning("%s: put back as %s (a run killed while replacing it, pid %s)", entry,
                                self.final, pid)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                    log.warning("%s: removed, left by a run that was killed (pid %s)", entry, pid)

    def commit(self) -> None:
        """Flush everything staged to disk, then move it to its final name, replacing the folder checked at
        the start only now, and only if it is still that folder (process 0 only)."""
        if not self.primary:
            return
        sync_tree(self.staging, self.final)
        old = None
        try:
            if self._seen is None and os.path.lexists(self.final):
                raise OutputError(f"{self.final}: created by someone else during the conversion; it was left "
                                  "as it is and the converted result was discarded")
            if self._seen is not None:
                if self._now() != self._seen:
                    raise OutputError(f"{self.final}: changed during the conversion; it was left as it is "
                                      "and the converted result was discarded")
                old = self.final.with_name(f".{self.final.name}{OLD_TAG}{os.getpid()}")
                os.replace(self.final, old)
                if old.lstat().st_ino != self._seen[1]:  # swapped in the instant since the check
                    os.replace(old, self.final)
                    old = None
                    raise OutputError(f"{self.final}: changed during the conversion; it was left as it is "
                                      "and the converted result was discarded")
            os.replace(self.staging, self.final)
            _fsync_path(self.final.parent, self.final)
        except OSError as e:
            if old is not None and not self.final.exists():
                os.replace(old, self.final)
            raise OutputError(f"{self.final}: cannot move the finished output into place ({e})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._unlock()

    def abort(self) -> None:
        """Remove everything staged (process 0 only) and release the target.

        After a failed write (a full disk) Orbax's other serialisation threads may still be creating files
        in the staging folder (the failed group's ``asyncio.gather`` does not cancel them), and tensorstore
        recreates missing parent folders: removal is repeated until the folder has stayed gone for a quiet
        moment, for at most ``ABORT_WAIT_S``."""
        if self.primary:
            deadline = time.monotonic() + ABORT_WAIT_S
            while True:
                shutil.rmtree(self.staging, ignore_errors=True)
                if not os.path.lexists(self.staging):
                    time.sleep(0.25)  # quiet moment: a late writer would recreate it now
                    if not os.path.lexists(self.staging):
                        break
                if time.monotonic() > deadline:
                    log.warning("%s: could not be removed (still being written)", self.staging)
                    break
                time.sleep(0.05)
            self._unlock()

    def state_writer(self, on_written: Callable[[int], None] | None = None, compression: str = "none"
                     ) -> StateWriter:
        """The writer of the staged folder's checkpoint; on the way out of a failed run it is closed (its
        background write finished) before the folder is removed."""
        self._writer = StateWriter(self.staging / CHECKPOINT, shown_as=self.shown, on_written=on_written,
                                   compression=compression)
        return self._writer

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """On any exception (an interrupt included): nothing staged is left behind."""
        if exc_type is None:
            return
        with interrupt.deferred():
            if self._writer is not None:
                self._writer.close()  # the background write stops writing into the staging folder first
            self.abort()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours counts as alive: its staging is in use)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process's umask (from /proc where it says, without changing it; else set and restored)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sync_tree(root: Path, shown_as: Path | None = None) -> None:
    """fsync every file and folder under ``root`` (folders after their contents), so that nothing the
    final rename publishes is still only in the page cache. OutputError naming ``shown_as`` on failure."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                _fsync_path(Path(path), shown_as)
        _fsync_path(Path(folder), shown_as)


def _fsync_path(path: Path, shown_as: Path | None = None) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(f"{shown_as or path}: cannot write ({e.strerror or e})") from None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically and durably (temp file, fsync, rename, fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    _fsync_path(path.parent)


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
                 on_written: Callable[[int], None] | None = None, compression: str = "none") -> None:
        self.path = path.absolute()
        self.context = ocp_v1.Context()  # zstd (Orbax's default) or none: the arrays' storage
        self.context.array.saving.use_compression = compression == "zstd"
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
            with interrupt.deferred(), self.context:
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
            with self.context:
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


def checkpoint_targets(path: Path, abstract: Mapping[str, Any],
                       sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding] | None) -> Any:
    """``abstract`` (a nested dict of ShapeDtypeStruct) with the dtypes the checkpoint at ``path`` stores
    and ``sharding`` (one for all, or one per dotted path); SourceError naming a leaf the checkpoint lacks
    or holds in another shape."""
    saved = ocp_v1.metadata(path.absolute()).metadata

    def target(keypath: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        node: Any = saved
        for k in keypath:
            key = getattr(k, "key", k)
            node = node[key] if key in node else node[str(key)]
        dotted = ".".join(str(getattr(k, "key", k)) for k in keypath)
        if tuple(node.shape) != tuple(leaf.shape):
            raise SourceError(f"{path}: '{dotted}' has shape {tuple(node.shape)} in the checkpoint, "
                              f"the model expects {tuple(leaf.shape)}")
        one = sharding is None or isinstance(sharding, jax.sharding.Sharding)
        where = sharding if one else sharding[dotted]  # type: ignore[index]
        return jax.ShapeDtypeStruct(leaf.shape, node.dtype, sharding=where)

    try:
        return jax.tree_util.tree_map_with_path(target, abstract)
    except KeyError as e:
        raise SourceError(f"{path}: the checkpoint lacks {e} that the model needs") from None


def restore_state(path: Path, abstract: Mapping[str, Any],
                  sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]) -> Any:
    """Restore the checkpoint at ``path`` into the layout of ``abstract`` (a nested dict of
    ShapeDtypeStruct); dtypes and shapes come from the checkpoint's own metadata, arrays go to
    ``sharding`` (one for all, or one per dotted path): Orbax reads each device's part onto that device,
    never the whole array onto one first."""
    return ocp_v1.load(path.absolute(), checkpoint_targets(path, abstract, sharding))


def restore_lazily(path: Path, graphdef: Any, abstract: nnx.State, sharding: jax.sharding.Sharding
                   ) -> nnx.Module:
    """The model of ``graphdef`` / ``abstract`` with every leaf read from the checkpoint at ``path`` block
    by block when first used (:mod:`nnxport.pipeline.lazy`; run it under ``jax.disable_jit()``)."""
    leaves = flatten(checkpoint_targets(path, nnx.to_pure_dict(abstract), None))
    return seed_dropout(lazy_model(graphdef, abstract, CheckpointBlocks(path, leaves, sharding)), 0)


def restore_model(folder: Path, manifest: dict[str, Any], family: Family, device: str | None = None,
                  mesh: jax.sharding.Mesh | str | None = None, *, lazy: bool = False) -> nnx.Module:
    """The model recorded in ``folder`` (its ``manifest`` read, ``family`` chosen), rebuilt and restored
    onto ``device`` (default: the recorded one when jax has it), or sharded over ``mesh``
    (:mod:`nnxport.pipeline.loading`: a Mesh, ``AXIS=N,...`` or ``"recorded"``; each leaf's partition spec
    becomes its ``out_sharding`` metadata). ``lazy`` (one device only): every leaf is read from the
    checkpoint block by block when first used (:func:`restore_lazily`, streamed parity). The recorded
    config is untrusted: a config the family cannot build is a SourceError naming the manifest."""
    cfg, options = manifest["model"]["config"], manifest["model"].get("options", {})
    if mesh is not None and device is not None:
        raise NnxportError(f"load {folder}: pass device= or mesh=, not both")
    on_mesh = None if mesh is None else load_mesh(mesh, manifest, folder / MANIFEST)
    try:
        family.check_config(cfg)
        graphdef, abstract = abstract_state(family, cfg, options)
    except ConfigError as e:  # its message names config.json: here the config is the manifest's
        raise SourceError(f"{folder / MANIFEST}: model.config: {str(e).removeprefix('config.json: ')}"
                          ) from None
    except NnxportError:
        raise
    except Exception as e:
        raise SourceError(f"{folder / MANIFEST}: model.config does not build model {family.name} "
                          f"({one_line(e, 200)})") from None
    sharding: jax.sharding.Sharding | dict[str, jax.sharding.NamedSharding]
    if on_mesh is not None:
        sharding = leaf_shardings(manifest, abstract, on_mesh, folder / MANIFEST)
    else:
        if device is None:
            recorded = str(manifest.get("device", "auto")).split(":")[0]
            device = recorded if recorded in {d.platform for d in jax.devices()} else "auto"
        sharding = default_sharding(resolve_device(device), None)
    if lazy and isinstance(sharding, jax.sharding.Sharding):
        return restore_lazily(folder / CHECKPOINT, graphdef, abstract, sharding)
    restored = restore_state(folder / CHECKPOINT, nnx.to_pure_dict(abstract), sharding)
    nnx.replace_by_pure_dict(abstract, restored)
    model = seed_dropout(nnx.merge(graphdef, abstract), 0)  # reseed: nnxport.seed_dropout / nnx.reseed
    if isinstance(sharding, dict):
        tag_shardings(nnx.state(model, STATE_FILTER), sharding)
    return model
