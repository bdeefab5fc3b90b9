"""A resolved checkpoint source: its files, config and lazily read tensors."""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from safetensors import SafetensorError

from nnxport.errors import SourceError
from nnxport.mapping.ops import box_slices
from nnxport.sources.files import check_regular, open_regular
from nnxport.sources.safetensors import PACKED_DTYPES, RAW_DTYPES, numpy_dtype, open_safetensors, parse_header

if TYPE_CHECKING:
    from nnxport.sources.safetensors import HeaderEntry


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file header describes it (no data read)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    nbytes: int


@dataclass(frozen=True)
class SourceFile:
    """A safetensors file of a source; ``name`` is its path relative to :attr:`Source.root`."""

    path: Path
    name: str
    size: int

    def sha256(self) -> str:
        """Hex sha256 of the file, streamed; cached per (path, size, mtime)."""
        st = check_regular(self.path)
        try:
            return _sha256(self.path, st.st_size, st.st_mtime_ns)
        except OSError as e:
            raise SourceError(f"{self.path}: cannot read ({e.strerror or e})") from e


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of ``path``; ``size`` and ``mtime_ns`` only key the cache."""
    with os.fdopen(open_regular(path), "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class Source:
    """Resolved checkpoint source. Files are opened lazily, one handle each, until :meth:`close`."""

    def __init__(
        self,
        *,
        spec: str,
        kind: Literal["hub", "folder", "file"],
        repo_id: str | None,
        revision: str | None,
        root: Path,
        files: list[SourceFile],
        config: dict[str, Any] | None,
        config_path: Path | None,
        tensors: dict[str, TensorInfo],
    ) -> None:
        self.spec = spec
        self.kind = kind
        self.repo_id = repo_id
        self.revision = revision
        self.root = root
        self.files = files
        self.config = config
        self.config_path = config_path
        self.tensors = tensors
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict[str, HeaderEntry]]] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Source({self.spec!r}, kind={self.kind!r}, files={len(self.files)}, tensors={len(self.tensors)})"
        )

    @property
    def name(self) -> str:
        """Short name for the default output folder: repo name, folder name or file stem."""
        if self.kind == "hub":
            assert self.repo_id is not None
            return self.repo_id.rsplit("/", 1)[-1]
        if self.kind == "file":
            return self.files[0].path.stem
        return self.root.name

    def read(self, key: str) -> np.ndarray:
        """The whole tensor ``key`` in its stored dtype, read with ``pread`` straight into a new array.

        Not through safetensors' memory map: pages of a mapping stay resident (and count in the process's
        RSS) for as long as the file is open, so reading a checkpoint tensor by tensor through it grows
        memory to the checkpoint's size; a plain read leaves only the page cache, which the kernel
        reclaims.
        """
        info = self._info(key)
        return self._pread(info, 0, info.shape[0] if info.shape else 1)

    def read_box(self, key: str, box: Sequence[tuple[int, int]]) -> np.ndarray:
        """``read(key)`` cut to ``box`` (``(start, stop)`` per dimension), reading only that part: a run of
        whole rows (only the first dimension cut) is one ``pread``; any other part goes through
        safetensors' ``get_slice``."""
        info = self._info(key)
        if all(b == (0, n) for b, n in zip(box[1:], info.shape[1:], strict=True)):
            return self._pread(info, *box[0]) if box else self.read(key)
        return self.read_slice(key, box_slices(tuple(box)))

    def _pread(self, info: TensorInfo, first: int, stop: int) -> np.ndarray:
        """Rows ``first:stop`` of a tensor (all of a scalar), read with ``pread`` into a new array."""
        data_start, header = self._header(info.file)
        begin = header[info.key][2]
        shape = (stop - first, *info.shape[1:]) if info.shape else ()
        arr = aligned_empty(shape, numpy_dtype(info.dtype))
        row = math.prod(info.shape[1:]) * arr.itemsize
        buf = arr.reshape(-1).view(np.uint8)
        offset = data_start + begin + first * row
        fd = self._fd(info.file)
        done = 0
        while done < buf.nbytes:
            try:
                n = os.preadv(fd, [buf[done:].data], offset + done)
            except OSError as e:
                raise SourceError(f"{info.file}: cannot read {info.key!r} ({e.strerror or e})") from e
            if n <= 0:
                raise SourceError(f"{info.file}: file ends inside {info.key!r} (truncated?)")
            done += n
        return arr

    def read_slice(self, key: str, index: tuple[slice | int, ...]) -> np.ndarray:
        """``read(key)[index]`` reading only that part of the file. Bounds may be negative or None, steps
        negative; missing trailing dimensions are taken whole."""
        info = self._info(key)
        norm, flips, out_shape = _normalise_index(index, info.shape)
        if 0 in out_shape:
            return np.empty(out_shape, numpy_dtype(info.dtype))
        if info.dtype in RAW_DTYPES:
            part = np.array(self._raw(info)[norm])
        else:
            try:
                part = np.asarray(self._handle(info.file).get_slice(key)[norm])
            except SafetensorError as e:
                raise SourceError(f"{info.file}: cannot read {key!r}{list(norm)}: {e}") from e
        return np.ascontiguousarray(np.flip(part, axis=flips)) if flips else part

    def unmap(self) -> None:
        """Close safetensors' memory maps: the pages ``read_slice`` touched through them count in the
        process's RSS for as long as they are mapped. A later read maps the file again."""
        with self._lock:
            handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def close(self) -> None:
        """Close the open files and maps (a later read opens them again)."""
        self.unmap()
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _info(self, key: str) -> TensorInfo:
        try:
            info = self.tensors[key]
        except KeyError:
            raise SourceError(f"{self.spec}: no tensor named {key!r}") from None
        if info.dtype in PACKED_DTYPES:
            raise SourceError(
                f"{info.file}: {key!r} is {info.dtype} (packed sub-byte), which nnxport cannot read"
            )
        return info

    def _handle(self, path: Path) -> Any:
        with self._lock:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = open_safetensors(path)
            return handle

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = open_regular(path)
            return fd

    def _header(self, path: Path) -> tuple[int, dict[str, HeaderEntry]]:
        with self._lock:
            if path not in self._headers:
                self._headers[path] = parse_header(path)
            return self._headers[path]

    def _raw(self, info: TensorInfo) -> np.ndarray:
        """A read-only memmap of a tensor the numpy framework cannot produce, via the header's offsets."""
        data_start, header = self._header(info.file)
        begin = header[info.key][2]
        count = int(np.prod(info.shape))
        dtype = numpy_dtype(info.dtype)
        if count == 0:
            return np.empty(info.shape, dtype)
        flat = np.memmap(info.file, dtype=dtype, mode="r", offset=data_start + begin, shape=(count,))
        return flat.reshape(info.shape)


#: Alignment of the arrays tensors are read into: jax's CPU backend takes a 64-byte aligned numpy array
#: without copying it (``jax.device_put`` of 512 MB: 0.4 ms instead of 0.39 s; numpy's own arrays are
#: 16-byte aligned).
ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting on an :data:`ALIGN`-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _normalise_index(
    index: Sequence[slice | int], shape: tuple[int, ...]
) -> tuple[tuple[slice | int, ...], tuple[int, ...], tuple[int, ...]]:
    """Rewrite ``index`` for safetensors, which refuses negative bounds and stop < start: non-negative
    ints, slices with a positive step and a tight stop. Returns (index, output axes to flip afterwards
    for negative steps, output shape)."""
    if len(index) > len(shape):
        raise IndexError(f"too many indices ({len(index)}) for a tensor of shape {shape}")
    full = (*index, *(slice(None),) * (len(shape) - len(index)))
    norm: list[slice | int] = []
    flips: list[int] = []
    out_shape: list[int] = []
    for item, size in zip(full, shape, strict=True):
        if isinstance(item, slice):
            start, stop, step = item.indices(size)
            count = len(range(start, stop, step))
            if step < 0 and count:
                start, step = start + step * (count - 1), -step
                flips.append(len(out_shape))
            norm.append(slice(start, start + step * (count - 1) + 1 if count else start, step))
            out_shape.append(count)
        else:
            i = operator.index(item)
            if not -size <= i < size:
                raise IndexError(f"index {i} is out of bounds for a dimension of size {size}")
            norm.append(i % size)
    return tuple(norm), tuple(flips), tuple(out_shape)
