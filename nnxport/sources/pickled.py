"""Pickle weights (--allow-pickle): torch.load(weights_only=True), handed out as numpy arrays."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnxport.errors import SourceError, one_line
from nnxport.mapping.ops import box_slices
from nnxport.sources.base import Source
from nnxport.sources.files import check_regular
from nnxport.sources.safetensors import numpy_dtype

if TYPE_CHECKING:
    from nnxport.sources.safetensors import HeaderEntry
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_PATTERNS = ["pytorch_model*.bin"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def pickle_entries(path: Path) -> dict[str, HeaderEntry]:
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
        return t.view(torch.int16).numpy().view(numpy_dtype(dtype)).copy()
    if dtype.startswith("float8"):
        return t.view(torch.uint8).numpy().view(numpy_dtype(dtype)).copy()
    return t.numpy().copy()
