"""Fuzzing the safetensors header handling: nnxport's own errors only, and the same verdict as the library.

nnxport validates headers itself (:func:`nnxport.sources.safetensors.parse_header`) to name what is wrong;
these properties check that it accepts exactly what ``safetensors.safe_open`` accepts (so a file it passes
never fails later inside the library) and that no malformed file makes anything but a SourceError escape
from opening a source and reading every tensor."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from nnxport.errors import SourceError
from nnxport.sources.folder import open_source
from nnxport.sources.safetensors import SAFETENSORS_DTYPES, parse_header

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_DIR = Path(tempfile.mkdtemp(prefix="nnxport-header-fuzz-"))
CODES = [*SAFETENSORS_DTYPES, "F33", "f32", ""]


def _write(name: str, blob: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(blob)
    return path


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A header (mostly plausible, sometimes subtly wrong) and a data section."""
    n = draw(st.integers(0, 4))
    entries: dict[str, Any] = {}
    position = 0
    for i in range(n):
        code = draw(st.sampled_from(["F32", "BF16", "I64", "U8", "BOOL", "F16"] * 4 + CODES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        bits = SAFETENSORS_DTYPES.get(code, ("", 8))[1]
        nbytes = int(np.prod(shape)) * bits // 8
        begin = position + draw(st.sampled_from([0] * 12 + [1, -1]))
        end = begin + nbytes + draw(st.sampled_from([0] * 12 + [1, -2]))
        entry: dict[str, Any] = {"dtype": code, "shape": shape, "data_offsets": [begin, end]}
        if draw(st.integers(0, 19)) == 0:
            junk = st.none() | st.integers(-2, 2) | st.text(max_size=3) | st.lists(st.integers(-1, 3))
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(junk)
        entries[f"t{i}"] = entry
        position = max(position, end)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"format": 1}, [], "x"]))
    text = json.dumps(entries)
    if draw(st.integers(0, 7)) == 0:
        text = draw(st.sampled_from(["[]", "1", "{", "{\"a\": }", " {}", "{}  ", "\"x\"", text[:-1]]))
    data = bytes(max(0, position + draw(st.sampled_from([0] * 8 + [1, -1]))))
    return text.encode(), data


def _library_verdict(path: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    try:
        with safe_open(path, framework="numpy") as f:
            keys: list[str] = f.keys()
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys}
    except SafetensorError:
        return None


@FUZZ
@given(headers(), st.sampled_from([None] * 8 + [0, 10**9, 2**63]))
def test_parse_header_agrees_with_safetensors(header_data: tuple[bytes, bytes], length: int | None) -> None:
    header, data = header_data
    size = len(header) if length is None else length
    path = _write("agree.safetensors", struct.pack("<Q", size) + header + data)
    library = _library_verdict(path)
    try:
        start, entries = parse_header(path)
    except SourceError as e:
        event("refused")
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        assert library is None or any(code not in SAFETENSORS_DTYPES for code, _ in library.values()), \
            f"nnxport refused a file safetensors reads: {e}"
        return
    event("accepted")
    assert library is not None, f"nnxport accepted a file safetensors refuses: {header!r}"
    codes = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}
    assert {k: (codes[e[0]], e[1]) for k, e in entries.items()} == library
    assert start == 8 + size


@FUZZ
@given(st.data())
def test_corrupted_files_raise_only_source_errors(data: st.DataObject) -> None:
    """Byte flips, truncation and insertions in a real file: opening and reading every tensor either
    works or raises a one-line SourceError naming the file."""
    blob = bytearray(_valid_file().read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(blob) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "digit"]))
        if action == "flip":
            blob[where] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del blob[where:]
            if not blob:
                break
        elif action == "insert":
            blob[where:where] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            blob[where] = ord(data.draw(st.sampled_from("0123456789{}[],:\"")))
    path = _write("corrupt.safetensors", bytes(blob))
    try:
        with open_source(path) as src:
            for key in src.tensors:
                src.read(key)
                src.read_slice(key, ())
        event("read")
    except SourceError as e:
        event("refused")
        assert str(e).startswith(f"{path}") and "\n" not in str(e)


_VALID: list[Path] = []


def _valid_file() -> Path:
    if not _VALID:
        rng = np.random.default_rng(0)
        path = _DIR / "valid.safetensors"
        save_file({"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
                   "b.bias": np.arange(5, dtype=np.int64), "c": np.zeros((2, 0), np.float16)}, str(path))
        _VALID.append(path)
    return _VALID[0]


@pytest.mark.parametrize(("header", "data", "says"), [
    (b"[1, 2]", b"", "header is not a JSON object"),
    (b"{nope", b"", "header is not valid JSON at column 2"),
    (b"\xff\xfe{}", b"", "header is not UTF-8 text (byte 0)"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4,
     "header names 'a' twice"),
    (b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
     "tensor 'a' has dtype Q9, which nnxport does not know"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
     b' "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', b"\0" * 12,
     "tensor 'b''s data (bytes 4..12) overlaps 'a''s (corrupt header)"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4,
     "tensor 'a''s data ends at byte 8 of the data section, which has only 4 bytes (truncated?)"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', b"\0" * 12,
     "4 bytes of the data section before tensor 'a' belong to no tensor"),
    (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"\0" * 8,
     "tensor 'a' has 8 bytes of data, its shape (3,) and dtype F32 need 12"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', b"\0" * 4,
     "tensor 'a' has shape [-1]: expected a list of non-negative integers"),
    (b'{"a": {"dtype": "F32", "shape": [1]}}', b"", "header entry of tensor 'a' lacks data_offsets"),
])
def test_each_header_fault_is_named(header: bytes, data: bytes, says: str) -> None:
    path = _write("fault.safetensors", struct.pack("<Q", len(header)) + header + data)
    with pytest.raises(SourceError) as err:
        open_source(path)
    assert str(err.value).startswith(f"{path}: {says}")
    assert _library_verdict(path) is None  # the library refuses these too
