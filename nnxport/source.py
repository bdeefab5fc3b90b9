"""Checkpoint sources: a hub id, a folder or a single ``.safetensors`` file -> files, config, lazy tensors.

:func:`open_source` resolves what the user passed, checks that the safetensors files are complete and
consistent (``model.safetensors.index.json`` included) and lists every tensor's shape and dtype from the
file headers alone. Tensor data is only read by :meth:`Source.read` / :meth:`Source.read_slice`, in its
stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), never through torch.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import operator
import os
import re
import shutil
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import ml_dtypes  # also registers bfloat16 with numpy, which safe_open needs to read bf16
import numpy as np
from safetensors import SafetensorError, safe_open

from nnxport.errors import SourceError, one_line
from nnxport.ops import box_slices, show_value

__all__ = [
    "Source",
    "SourceFile",
    "TensorInfo",
    "is_hub_id",
    "open_source",
    "write_hub_cache",
]

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
HUB_PATTERNS = ["*.safetensors", "*.json"]
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_PATTERNS = ["pytorch_model*.bin"]

# safetensors dtype code -> (numpy-style name, bits per element).
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 64),
    "F32": ("float32", 32),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "I64": ("int64", 64),
    "I32": ("int32", 32),
    "I16": ("int16", 16),
    "I8": ("int8", 8),
    "U64": ("uint64", 64),
    "U32": ("uint32", 32),
    "U16": ("uint16", 16),
    "U8": ("uint8", 8),
    "BOOL": ("bool", 8),
    "C64": ("complex64", 64),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F4": ("float4_e2m1fn", 4),
    "F6_E2M3": ("float6_e2m3fn", 6),
    "F6_E3M2": ("float6_e3m2fn", 6),
}
# safetensors 0.8's numpy framework looks these up as ``numpy.<name>``, which does not exist (AttributeError),
# so they are read straight from the file (offsets from the header) and viewed as the ml_dtypes type.
_RAW_DTYPES = frozenset(
    {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
)
# Packed sub-byte types: listed, but not readable as numpy arrays.
_PACKED_DTYPES = frozenset({"float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn"})

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".pdparams")

_HUB_ID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def _numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a numpy-style dtype name (``"bfloat16"`` etc. via ml_dtypes)."""
    return np.dtype(getattr(ml_dtypes, name, name))


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
        arr = np.empty(shape, _numpy_dtype(info.dtype))
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
            return np.empty(out_shape, _numpy_dtype(info.dtype))
        if info.dtype in _RAW_DTYPES:
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
        if info.dtype in _PACKED_DTYPES:
            raise SourceError(
                f"{info.file}: {key!r} is {info.dtype} (packed sub-byte), which nnxport cannot read"
            )
        return info

    def _handle(self, path: Path) -> Any:
        with self._lock:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = _safe_open(path)
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
        dtype = _numpy_dtype(info.dtype)
        if count == 0:
            return np.empty(info.shape, dtype)
        flat = np.memmap(info.file, dtype=dtype, mode="r", offset=data_start + begin, shape=(count,))
        return flat.reshape(info.shape)


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


class PickleSource(Source):
    """A source of pickle weights (``--allow-pickle``): each file loaded with
    ``torch.load(weights_only=True, mmap=True)`` on first read, tensors handed out as numpy arrays."""

    def read(self, key: str) -> np.ndarray:
        info = self._info(key)
        return _to_numpy(_load_pickle(info.file)[key], info.dtype)

    def read_box(self, key: str, box: Sequence[tuple[int, int]]) -> np.ndarray:
        return np.ascontiguousarray(self.read(key)[box_slices(tuple(box))])

    def read_slice(self, key: str, index: tuple[slice | int, ...]) -> np.ndarray:
        return np.ascontiguousarray(self.read(key)[index])


_TORCH_DTYPES = {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
}


def _load_pickle(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` (memory-mapped when the file's format allows), checked to be
    a flat state dict of tensors; errors name the file. Cached per (path, size, mtime)."""
    st = check_regular(path)
    return _load_pickle_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_pickle_cached(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    import pickle

    import torch

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = load(False)  # the legacy (pre-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as e:
        raise SourceError(f"{path}: refused to unpickle (torch.load weights_only=True: "
                          f"{one_line(e, 200)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise SourceError(f"{path}: cannot load these pickle weights ({one_line(e, 200)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SourceError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _pickle_entries(path: Path) -> dict[str, HeaderEntry]:
    """What :func:`parse_header` gives for safetensors, for a pickle file (offsets are placeholders)."""
    entries: dict[str, HeaderEntry] = {}
    for key, t in _load_pickle(path).items():
        name = str(t.dtype).removeprefix("torch.")
        if name not in _TORCH_DTYPES:
            raise SourceError(f"{path}: tensor {key!r} has dtype {name}, which nnxport does not read")
        entries[key] = (_TORCH_DTYPES[name], tuple(t.shape), 0, t.numel() * t.element_size())
    return entries


def _to_numpy(t: Any, dtype: str) -> np.ndarray:
    """A torch tensor as a new numpy array of ``dtype`` (bfloat16 and float8 through their bits)."""
    import torch

    t = t.detach().contiguous()
    if dtype == "bfloat16":  # numpy has no bfloat16: through the bits
        return t.view(torch.int16).numpy().view(_numpy_dtype(dtype)).copy()
    if dtype.startswith("float8"):
        return t.view(torch.uint8).numpy().view(_numpy_dtype(dtype)).copy()
    return t.numpy().copy()


# ------------------------------------------------------------------------------------------------ resolving


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` looks like a hub id: ``org/name`` or ``name`` of ``[A-Za-z0-9._-]``."""
    return (
        _HUB_ID.fullmatch(spec) is not None
        and not spec.startswith(".")
        and ".." not in spec
        and not spec.endswith(".safetensors")
    )


def open_source(
    spec: str | Path, *, revision: str | None = None, config: str | Path | None = None,
    allow_pickle: bool = False,
) -> Source:
    """Resolve ``spec`` (hub id, folder or ``.safetensors`` file; a :class:`~pathlib.Path` is always taken
    as a local path) and read its config and tensor headers.

    Pickle weights (``pytorch_model.bin``, sharded or not, or a ``.bin``/``.pt``/``.pth`` file) are
    refused unless ``allow_pickle``, and then only loaded with ``torch.load(weights_only=True)``, which
    unpickles tensors and plain containers but never runs code from the file."""
    text = str(spec)
    path = Path(text).expanduser()
    if os.path.lexists(path) or isinstance(spec, Path) or not is_hub_id(text):
        if not os.path.lexists(path):
            raise SourceError(f"{text}: no such file or folder (and not a hub id)")
        if not path.is_dir():
            check_regular(path)
        if revision is not None:
            raise SourceError(f"{text}: --revision only applies to hub ids")
        path = Path(os.path.abspath(path))
        if path.is_dir():
            kind: Literal["hub", "folder", "file"] = "folder"
            root = path
            files, tensors = _scan_folder(root, what=text, allow_pickle=allow_pickle)
        elif path.suffix == ".safetensors" or (path.suffix in PICKLE_SUFFIXES and allow_pickle):
            kind, root = "file", path.parent
            files = [SourceFile(path, path.name, check_regular(path).st_size)]
            tensors = _scan_files(files)
        elif path.suffix in PICKLE_SUFFIXES:
            raise SourceError(f"{text}: pickle weights, which can run code when loaded; convert them to "
                              "safetensors, or pass --allow-pickle to load them with "
                              "torch.load(weights_only=True)")
        else:
            raise SourceError(f"{text}: not a folder or a .safetensors file")
        repo_id = resolved = None
    else:
        kind, repo_id = "hub", text
        root = _resolve_hub(text, revision, allow_pickle)
        resolved = root.name
        at = f"{text}@{resolved[:12]}"
        files, tensors = _scan_folder(root, what=at, snapshot=True, allow_pickle=allow_pickle)
    cfg_path = Path(config).expanduser() if config is not None else root / CONFIG_NAME
    if config is not None and not os.path.lexists(cfg_path):
        raise SourceError(f"{config}: no such config file")
    if config is None and os.path.lexists(cfg_path):
        check_inside(cfg_path, source_homes(root, snapshot=kind == "hub"))
    cfg = _read_json_object(cfg_path, unique=True) if os.path.lexists(cfg_path) else None
    cls = PickleSource if files[0].name.endswith(PICKLE_SUFFIXES) else Source
    return cls(
        spec=text,
        kind=kind,
        repo_id=repo_id,
        revision=resolved,
        root=root,
        files=files,
        config=cfg,
        config_path=cfg_path if cfg is not None else None,
        tensors=tensors,
    )


def snapshot_download(repo_id: str, *, revision: str | None, patterns: Sequence[str] = HUB_PATTERNS) -> str:
    """``huggingface_hub.snapshot_download`` of the safetensors and JSON files (imported on first use:
    the download machinery takes ~1 s to import).

    A commit hash already in the cache is used without asking the hub: when the hub is unreachable (and
    HF_HUB_OFFLINE unset) huggingface_hub 2.4 retries the tree listing of a commit for ~23 s before it
    falls back to the cache, whereas a branch name fails over at once."""
    from huggingface_hub import snapshot_download as download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if revision is not None and _COMMIT_HASH.fullmatch(revision):
        try:
            return download(repo_id, revision=revision, allow_patterns=list(patterns), local_files_only=True)
        except LocalEntryNotFoundError:
            pass  # not cached (or known incomplete): ask the hub
    return download(repo_id, revision=revision, allow_patterns=list(patterns))


def _resolve_hub(repo_id: str, revision: str | None, allow_pickle: bool = False) -> Path:
    """Snapshot folder of ``repo_id`` at ``revision``, from the hub or the local cache; hub errors become
    one-line :class:`SourceError`\\ s."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = repo_id if revision is None else f"{repo_id}@{revision}"
    cache = constants.HF_HUB_CACHE
    try:
        if allow_pickle:
            patterns = [*HUB_PATTERNS, *PICKLE_PATTERNS]
            return Path(snapshot_download(repo_id, revision=revision, patterns=patterns))
        return Path(snapshot_download(repo_id, revision=revision))
    except GatedRepoError as e:
        raise SourceError(
            f"{repo_id} is a gated repository: accept its terms on https://huggingface.co/{repo_id} and set "
            "HF_TOKEN (or run `hf auth login`) with an account that has access"
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceError(
            f"{repo_id}: no such repository on the hub (or it is private and HF_TOKEN does not grant access)"
        ) from e
    except RevisionNotFoundError as e:
        raise SourceError(f"{repo_id}: revision {revision!r} not found on the hub") from e
    except IncompleteSnapshotError as e:
        raise SourceError(
            f"{at}: the cached snapshot {e.snapshot_path} is incomplete and the hub cannot be reached — "
            "download it again with network access"
        ) from e
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            why = "the hub is offline (HF_HUB_OFFLINE=1)"
        else:
            cause = e.__cause__
            why = f"the hub cannot be reached ({one_line(cause) if cause else 'connection failed'})"
        also = "" if "/" in repo_id else f"; there is no local file or folder named {repo_id!r} either"
        raise SourceError(
            f"{at} is not in the local Hugging Face cache ({cache}) and {why} — download it once with "
            f"network access or point HF_HUB_CACHE at a cache that has it{also}"
        ) from e
    except HfHubHTTPError as e:
        raise SourceError(f"{at}: the hub answered with an error: {one_line(e)}") from e
    except httpx2.HTTPError as e:
        raise SourceError(f"{at}: cannot reach the hub ({one_line(e)})") from e
    except HFValidationError as e:
        raise SourceError(f"{repo_id}: not a valid hub id and no such file or folder ({one_line(e)})") from e


def _scan_folder(
    root: Path, *, what: str, snapshot: bool = False, allow_pickle: bool = False
) -> tuple[list[SourceFile], dict[str, TensorInfo]]:
    """Files and tensors of a folder (or hub snapshot), through its index when it has one. Pickle weights
    are used only when there are no safetensors and ``allow_pickle``. Every file used must resolve inside
    the folder (:func:`check_inside`) and be a regular file."""
    homes = source_homes(root, snapshot=snapshot)
    index_path = root / INDEX_NAME
    if os.path.lexists(index_path):
        return _scan_index(root, check_inside(index_path, homes), snapshot=snapshot)
    paths = sorted(root.glob("*.safetensors"))
    if not paths and allow_pickle:
        if os.path.lexists(root / PICKLE_INDEX_NAME):
            return _scan_index(root, check_inside(root / PICKLE_INDEX_NAME, homes), snapshot=snapshot)
        paths = sorted(p for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES) and p.is_file())
    if not paths:
        raise SourceError(_no_safetensors_message(root, what))
    files = [SourceFile(p, p.name, check_regular(check_inside(p, homes)).st_size) for p in paths]
    return files, _scan_files(files)


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


def _index_name_problem(name: str) -> str | None:
    """Why ``name`` (a weight_map value) cannot be a file of the source folder, or None."""
    if not name:
        return "is empty"
    if not name.isprintable():
        return "contains a NUL, control or line-break character"
    if os.path.isabs(name) or name.startswith("\\") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "goes up a folder with '..'"
    return None


def _no_safetensors_message(root: Path, what: str) -> str:
    found = sorted(p.name for p in root.iterdir() if p.is_file())
    pickles = [n for n in found if n.endswith(PICKLE_SUFFIXES)]
    others = [n for n in found if n.endswith(_OTHER_WEIGHT_SUFFIXES)]
    if pickles:
        return (f"{what}: only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                "convert them to safetensors, or pass --allow-pickle to load them with "
                "torch.load(weights_only=True)")
    if others:
        return f"{what}: only other weight formats ({', '.join(others)}); nnxport reads safetensors"
    return f"{what}: no .safetensors files found in {root}"


MAX_INDEX_FILES = 10_000
"""The most shard files an index may name (the largest published checkpoints have a few hundred)."""


def _scan_index(
    root: Path, index_path: Path, *, snapshot: bool
) -> tuple[list[SourceFile], dict[str, TensorInfo]]:
    """Files and tensors named by ``model.safetensors.index.json``, checked against the shards."""
    doc = _read_json_object(index_path, unique=True)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SourceError(f"{index_path}: 'weight_map' must be an object mapping tensor names to file names")
    if not weight_map:
        raise SourceError(f"{index_path}: 'weight_map' is empty: the index names no tensor")
    homes = source_homes(root, snapshot=snapshot)
    first_key: dict[str, str] = {}
    for key, name in weight_map.items():
        first_key.setdefault(name, key)
    if len(first_key) > MAX_INDEX_FILES:
        raise SourceError(f"{index_path}: names {len(first_key)} files, more than a checkpoint has "
                          f"(at most {MAX_INDEX_FILES} here)")
    for name, key in sorted(first_key.items()):
        entry = f"{index_path}: weight_map entry {show_value(key)} -> {show_value(name)}"
        if (why := _index_name_problem(name)) is not None:
            raise SourceError(f"{entry}: the file name {why}; an index names files inside its own folder")
        check_inside(root / name, homes, entry)
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not os.path.lexists(root / n)]
    if missing:
        state = "the snapshot is incomplete" if snapshot else "the checkpoint is incomplete"
        raise SourceError(f"{index_path}: {_few(missing)} named by the index not found in {root}; {state}")
    files = [SourceFile(root / n, n, check_regular(root / n).st_size) for n in names]
    tensors = _scan_files(files)
    misplaced: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if key not in tensors or tensors[key].file != root / name:
            misplaced.setdefault(name, []).append(key)
    if misplaced:
        name, keys = min(misplaced.items())
        raise SourceError(
            f"{index_path}: the index puts {_few(sorted(keys))} in {name}, which does not hold it"
        )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        where = sorted({tensors[k].file.name for k in extra})
        raise SourceError(f"{index_path}: {_few(extra)} (in {', '.join(where)}) missing from the index")
    return files, tensors


def _scan_files(files: list[SourceFile]) -> dict[str, TensorInfo]:
    """Every tensor's shape and dtype, from the validated headers (:func:`parse_header`: no data is
    read). A key stored in two files is refused."""
    found: dict[str, TensorInfo] = {}
    for f in files:
        entries = _pickle_entries(f.path) if f.name.endswith(PICKLE_SUFFIXES) else parse_header(f.path)[1]
        for key, (dtype, shape, begin, end) in entries.items():
            if key in found:
                raise SourceError(
                    f"{f.path.parent}: tensor {key!r} is stored in both {found[key].file.name} and {f.name}"
                )
            found[key] = TensorInfo(key, shape, dtype, f.path, end - begin)
    return dict(sorted(found.items()))


def _few(items: Sequence[str], limit: int = 3) -> str:
    """``a, b, c (and 2 more)``."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (and {len(items) - limit} more)"


def _safe_open(path: Path) -> Any:
    """``safe_open(path)`` with errors as one-line :class:`SourceError`\\ s naming the file."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        what = str(e).removeprefix("Error while deserializing header: ")
        raise SourceError(f"{path}: not a valid safetensors file, truncated or corrupt ({what})") from e
    except OSError as e:
        raise SourceError(f"{path}: cannot open ({e.strerror or e})") from e


MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the header's size."""

#: A parsed header entry: (numpy-style dtype name, shape, begin, end) with offsets into the data section.
HeaderEntry = tuple[str, tuple[int, ...], int, int]


def parse_header(path: Path) -> tuple[int, dict[str, HeaderEntry]]:
    """Read and validate the header of the safetensors file ``path``: (offset of the data section,
    {tensor: entry}). Every way a header can be wrong is a one-line :class:`SourceError` naming the file
    and, where there is one, the tensor.

    The rules are safetensors' own (a file this accepts, ``safe_open`` accepts too; the tests check it
    against the library): an 8-byte little-endian header length, a UTF-8 JSON object of at most 100 MB,
    an optional ``__metadata__`` of strings, and per tensor a known dtype, a shape of non-negative ints and
    ``data_offsets`` whose byte count fits the shape and dtype; the tensors' data must tile the data
    section exactly, without overlap or gap. nnxport checks this itself (rather than through
    ``safe_open``) to name what is wrong: the library's messages ("invalid offset", "file not fully
    covered") do not say which tensor, nor by how much."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path}: not a safetensors file: {size} bytes, too short for the "
                                  "8-byte header length (truncated?)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise SourceError(f"{path}: not a safetensors file: header length {length} exceeds "
                                  f"safetensors' limit of {MAX_HEADER_BYTES} bytes")
            if 8 + length > size:
                raise SourceError(f"{path}: header length {length} runs past the end of the file "
                                  f"({size} bytes; truncated?)")
            raw = fh.read(length)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: header is not UTF-8 text (byte {e.start}): not a safetensors "
                          "file, or corrupt") from None
    try:
        doc = json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as e:
        raise SourceError(f"{path}: header names {e.key!r} twice") from None
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" at column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else ""
        raise SourceError(f"{path}: header is not valid JSON{where} (corrupt or truncated)") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: header is not a JSON object: not a safetensors file, or corrupt")
    data_size = size - 8 - length
    entries: dict[str, HeaderEntry] = {}
    for key, entry in doc.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise SourceError(f"{path}: header's __metadata__ must map names to strings")
            continue
        entries[key] = _header_entry(path, key, entry)
    position, previous = 0, ""
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < position:
            raise SourceError(f"{path}: tensor {key!r}'s data (bytes {begin}..{end}) overlaps "
                              f"{previous!r}'s (corrupt header)")
        if begin > position:
            raise SourceError(f"{path}: {begin - position} bytes of the data section before tensor "
                              f"{key!r} belong to no tensor (corrupt header)")
        position, previous = end, key
    if position > data_size:
        raise SourceError(f"{path}: tensor {previous!r}'s data ends at byte {position} of the data "
                          f"section, which has only {data_size} bytes (truncated?)")
    if position < data_size:
        raise SourceError(f"{path}: {data_size - position} bytes after the last tensor's data belong to "
                          "no tensor (corrupt header, or another format)")
    return 8 + length, entries


class _DuplicateKey(ValueError):
    def __init__(self, key: str, values: tuple[Any, Any]) -> None:
        super().__init__(key)
        self.key, self.values = key, values


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a name that appears twice in one JSON object."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k, (out[k], v))
        out[k] = v
    return out


def _header_entry(path: Path, key: str, entry: Any) -> HeaderEntry:
    """One tensor's header entry, validated."""
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: header entry of tensor {key!r} is not an object")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        raise SourceError(f"{path}: header entry of tensor {key!r} lacks {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in _DTYPES:
        raise SourceError(f"{path}: tensor {key!r} has dtype {code}, which nnxport does not know "
                          f"(known: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SourceError(f"{path}: tensor {key!r} has shape {shape!r}: expected a list of non-negative "
                          "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SourceError(f"{path}: tensor {key!r} has data_offsets {offsets!r}: expected [begin, end] "
                          "with 0 <= begin <= end")
    dtype, bits = _DTYPES[code]
    count = math.prod(shape)
    if (count * bits) % 8:
        raise SourceError(f"{path}: tensor {key!r}: {count} {code} values do not fill whole bytes")
    need = count * bits // 8
    if offsets[1] - offsets[0] != need:
        raise SourceError(f"{path}: tensor {key!r} has {offsets[1] - offsets[0]} bytes of data, its "
                          f"shape {tuple(shape)} and dtype {code} need {need}")
    return dtype, tuple(shape), offsets[0], offsets[1]


MAX_JSON_BYTES = 64_000_000
"""The largest config.json / index.json read (the largest published indexes are a few MB)."""


def _read_json_object(path: Path, *, unique: bool = False) -> dict[str, Any]:
    """A JSON file that must hold an object; ``unique``: a name given twice in one object is an error
    (JSON parsers silently keep the last)."""
    try:
        hook = _unique_pairs if unique else None
        with os.fdopen(open_regular(path), "rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise SourceError(f"{path}: larger than {MAX_JSON_BYTES // 1_000_000} MB, too large for a JSON "
                              "config or index")
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
    except _DuplicateKey as e:
        first, second = (json.dumps(v) if not isinstance(v, str) else v for v in e.values)
        raise SourceError(f"{path}: names {e.key!r} twice ({first} and {second})") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


# ----------------------------------------------------------------------------------------- test/demo helper


def write_hub_cache(
    cache_dir: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef0123456789abcdef01234567",
    *, blobs: bool = False,
) -> Path:
    """Copy the files of ``folder`` into a hub-style cache (``models--org--name/snapshots/<revision>/``
    with ``refs/main`` = ``revision``), which ``snapshot_download`` resolves offline. Plain files, or with
    ``blobs`` the layout huggingface_hub writes: each file stored once as ``blobs/<sha256>`` and the
    snapshot's files relative symlinks ``../../blobs/<sha256>``. An existing snapshot of that revision is
    replaced. Returns the snapshot folder."""
    if not is_hub_id(repo_id):
        raise ValueError(f"not a hub id: {repo_id!r}")
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    if blobs:
        store = repo_dir / "blobs"
        store.mkdir(parents=True, exist_ok=True)
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            rel = file.relative_to(folder)
            with file.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if not (store / digest).exists():
                shutil.copyfile(file, store / digest)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(store / digest, link.parent))
    else:
        shutil.copytree(folder, snapshot)
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(revision)  # no newline: huggingface_hub reads the ref without stripping it
    return snapshot
