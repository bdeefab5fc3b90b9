"""safetensors headers, validated by nnxport (to name what is wrong), and the dtypes they may hold."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes  # also registers bfloat16 with numpy, which safe_open needs to read bf16
import numpy as np
from safetensors import SafetensorError, safe_open

from nnxport.errors import SourceError
from nnxport.sources.files import DuplicateKey, open_regular, unique_pairs

# safetensors dtype code -> (numpy-style name, bits per element).
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
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
RAW_DTYPES = frozenset(
    {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
)
# Packed sub-byte types: listed, but not readable as numpy arrays.
PACKED_DTYPES = frozenset({"float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn"})


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a numpy-style dtype name (``"bfloat16"`` etc. via ml_dtypes)."""
    return np.dtype(getattr(ml_dtypes, name, name))


def open_safetensors(path: Path) -> Any:
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
        doc = json.loads(text, object_pairs_hook=unique_pairs)
    except DuplicateKey as e:
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


def _header_entry(path: Path, key: str, entry: Any) -> HeaderEntry:
    """One tensor's header entry, validated."""
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: header entry of tensor {key!r} is not an object")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        raise SourceError(f"{path}: header entry of tensor {key!r} lacks {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise SourceError(f"{path}: tensor {key!r} has dtype {code}, which nnxport does not know "
                          f"(known: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SourceError(f"{path}: tensor {key!r} has shape {shape!r}: expected a list of non-negative "
                          "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SourceError(f"{path}: tensor {key!r} has data_offsets {offsets!r}: expected [begin, end] "
                          "with 0 <= begin <= end")
    dtype, bits = SAFETENSORS_DTYPES[code]
    count = math.prod(shape)
    if (count * bits) % 8:
        raise SourceError(f"{path}: tensor {key!r}: {count} {code} values do not fill whole bytes")
    need = count * bits // 8
    if offsets[1] - offsets[0] != need:
        raise SourceError(f"{path}: tensor {key!r} has {offsets[1] - offsets[0]} bytes of data, its "
                          f"shape {tuple(shape)} and dtype {code} need {need}")
    return dtype, tuple(shape), offsets[0], offsets[1]
