"""Issue 12, classes 6 and 7: text from a checkpoint reaching the terminal, and tensors whose dtype would
silently change their values. Each case asserts the whole contract (exit code, one ``error:`` line naming
the culprit, no traceback, nothing on stdout, no output or staging folder left, bounded time). The
interrupt cases (class 4) are in tests/e2e/test_signals.py."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import nnxport
from examples.convfc import ConvFc
from examples.convfc_torch import save_checkpoint
from nnxport.cli._output import safe_text
from nnxport.sources.base import Source
from tests.helpers import ROOT, copy_source

STEM = "resnet.embedder.embedder.convolution.weight"
STEM_TARGET = "stem.conv.kernel"
CODES: dict[str, Any] = {"I64": np.int64, "U64": np.uint64, "F64": np.float64, "BOOL": np.bool_,
                         "C64": np.complex64, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                         "F8_E5M2": ml_dtypes.float8_e5m2, "F16": np.float16, "F32": np.float32}
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]")  # anything but the newline ending a line


# ------------------------------------------------------------------------------------------------- helpers


def _tensors(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, list[int], bytes]]]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    return meta, {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
                  for k, v in header.items()}


def _write(path: Path, meta: dict[str, Any], tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header: dict[str, Any] = {"__metadata__": meta}
    chunks, off = [], 0
    for k, (code, shape, raw) in tensors.items():
        header[k] = {"dtype": code, "shape": shape, "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def _retype(path: Path, key: str, code: str, values: np.ndarray | None = None) -> np.ndarray:
    """Rewrite tensor ``key`` of ``path`` as dtype ``code`` (its float32 values cast, or ``values``)."""
    meta, tensors = _tensors(path)
    _, shape, raw = tensors[key]
    arr = np.frombuffer(raw, np.float32).reshape(shape) if values is None else values
    arr = np.ascontiguousarray(arr.astype(CODES[code]))
    tensors[key] = (code, list(arr.shape), arr.tobytes())
    _write(path, meta, tensors)
    return arr


def _add(path: Path, names: list[str]) -> None:
    meta, tensors = _tensors(path)
    for name in names:
        tensors[name] = ("F32", [1], np.ones(1, np.float32).tobytes())
    _write(path, meta, tensors)


def _assert_refused(res: Any, tmp: Path, before: list[str], *says: str) -> None:
    """Exit 1, one escaped ``error:`` line saying ``says``, nothing on stdout, nothing left in ``tmp``."""
    assert res.exit_code == 1, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert not CONTROL.search(res.stderr), repr(res.stderr)
    for fragment in says:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert sorted(p.name for p in tmp.iterdir()) == before  # no output, no staging folder


# --------------------------------------------------------------------------- class 7: dtypes, refused

REFUSED = {
    "I64-into-float": ("I64", "keep", "is int64 but the model's parameter is float32"),
    "U64-into-float": ("U64", "float32", "is uint64 but the model's parameter is float32"),
    "BOOL-into-float": ("BOOL", "keep", "is bool but the model's parameter is float32"),
    "BOOL-into-float-f32": ("BOOL", "float32", "is bool but the model's parameter is float32"),
    "C64-into-float": ("C64", "keep", "is complex64 but the model's parameter is float32"),
    "C64-into-float-bf16": ("C64", "bfloat16", "is complex64 but the model's parameter is float32"),
    "F64-keep": ("F64", "keep", "float64, which jax would store as float32 under --dtype keep"),
    "F8_E4M3-keep": ("F8_E4M3", "keep", "float8_e4m3fn (a quantized checkpoint?): it needs a dequantize op"),
    "F8_E5M2-keep": ("F8_E5M2", "keep", "float8_e5m2 (a quantized checkpoint?): it needs a dequantize op"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_dtype_refused_before_anything_is_read(case: str, tiny_resnet_dir: Path, tmp_path: Path, cli,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, dtype, says = REFUSED[case]
    src = copy_source(tiny_resnet_dir, tmp_path)
    _retype(src / "model.safetensors", STEM, code)

    def no_reads(self: Any, key: str) -> Any:
        raise AssertionError("tensor data was read before the dtype was checked")

    monkeypatch.setattr(Source, "read", no_reads)
    before = sorted(p.name for p in tmp_path.iterdir())
    t = time.monotonic()
    res = cli("convert", src, "--out", tmp_path / "out", "--dtype", dtype, "--no-parity", "-q")
    _assert_refused(res, tmp_path, before, says, "model.safetensors", repr(STEM), f"-> {STEM_TARGET}")
    assert time.monotonic() - t < 30


# -------------------------------------------------------------------------- class 7: dtypes, converted

CONVERTED = {  # source dtype, --dtype, dtype stored, values expected from the source array
    "F64-float32": ("F64", "float32", np.float32),
    "F8_E4M3-float32": ("F8_E4M3", "float32", np.float32),
    "F8_E5M2-bfloat16": ("F8_E5M2", "bfloat16", ml_dtypes.bfloat16),
    "F8_E4M3-float16": ("F8_E4M3", "float16", np.float16),
    "F16-keep": ("F16", "keep", np.float16),
    "F16-float32": ("F16", "float32", np.float32),
}


@pytest.mark.parametrize("case", sorted(CONVERTED))
def test_dtype_converted_bit_for_bit(case: str, tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    code, dtype, stored = CONVERTED[case]
    src = copy_source(tiny_resnet_dir, tmp_path)
    source = _retype(src / "model.safetensors", STEM, code)
    res = cli("convert", src, "--out", tmp_path / "out", "--dtype", dtype, "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    kernel = np.asarray(nnxport.load(tmp_path / "out").stem.conv.kernel[...])
    want = source.transpose(2, 3, 1, 0).astype(stored)  # OIHW -> HWIO; float8 -> wider is exact
    assert kernel.dtype == want.dtype
    assert kernel.tobytes() == want.tobytes()


class CountingConvFc(ConvFc):
    """ConvFc with an int32 counter leaf, for integer tensors into an integer parameter."""

    reference = None  # type: ignore[assignment]

    def __init__(self, config: dict[str, Any], *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.count = nnx.BatchStat(jnp.zeros((4,), jnp.int32))


COUNTING = "tests.e2e.test_faults_runtime:CountingConvFc"
COUNT_RULE = "  - from: '^count$'\n    to: 'count'\n"


@pytest.fixture(scope="module")
def convfc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("convfc-count")
    save_checkpoint(folder, seed=3)
    mapping = (ROOT / "examples" / "convfc.yaml").read_text()
    (folder / "m.yaml").write_text(mapping.replace("model: examples.convfc:ConvFc",
                                                   f"model: {COUNTING}")
                                   + COUNT_RULE)
    meta, tensors = _tensors(folder / "model.safetensors")
    tensors["count"] = ("I32", [4], np.zeros(4, np.int32).tobytes())
    _write(folder / "model.safetensors", meta, tensors)
    return folder


INT_CASES = {  # source dtype, values, refusal (None: converted exactly into int32)
    "I64-in-range": ("I64", [0, -5, 2**31 - 1, -(2**31)], None),
    "U64-in-range": ("U64", [0, 7, 2**31 - 1, 12], None),
    "I32": ("F32", None, "is float32 but the model's parameter is int32"),
    "I64-too-big": ("I64", [0, 1, 2**40, -3], "int64 values from -3 to 1099511627776 do not fit the int32"),
    "I64-too-small": ("I64", [-(2**31) - 1, 0, 0, 0], "do not fit the int32 it is stored as"),
    "U64-too-big": ("U64", [2**63, 0, 0, 0], "uint64 values from 0 to 9223372036854775808 do not fit"),
}


@pytest.mark.parametrize("case", sorted(INT_CASES))
def test_integer_tensor_into_integer_parameter(case: str, convfc: Path, tmp_path: Path, cli) -> None:
    code, values, refusal = INT_CASES[case]
    src = Path(shutil.copytree(convfc, tmp_path / "src"))
    arr = None if values is None else np.array(values, dtype=CODES[code])
    if arr is None:
        _retype(src / "model.safetensors", "count", "F32", np.arange(4, dtype=np.float32))
    else:
        _retype(src / "model.safetensors", "count", code, arr)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("convert", src / "model.safetensors", "--config", src / "config.yaml", "--mapping",
              src / "m.yaml", "--out", tmp_path / "out", "--no-parity", "-q")
    if refusal is not None:
        _assert_refused(res, tmp_path, before, refusal, "model.safetensors", "'count'", "-> count")
        return
    assert res.exit_code == 0, res.stderr
    count = np.asarray(nnxport.load(tmp_path / "out", model=COUNTING).count[...])
    assert count.dtype == np.int32 and count.tolist() == values  # exact: no wrap-around


# ------------------------------------------------------------------- class 6: text reaching the terminal

HOSTILE = {
    "close-tag": "a[/]b",
    "markup": "[bold]x[/bold]",
    "csi": "k\x1b[31mred",
    "osc-title": "k\x1b]0;title\x07x",
    "bel-cr": "ding\x07\rover",
    "newline-forged-error": "nl\nerror: forged",
    "tab": "tab\tx",
    "bidi": "bidi\u202exyz",
    "c1-csi": "c1\x9b31m",
}


def test_safe_text_escapes_every_control() -> None:
    assert safe_text("a\tb\nc\rd\x1b[0m\x07\x7f\x9b\u202e\u2028é[/]") == \
        "a\\tb\\nc\\rd\\x1b[0m\\x07\\x7f\\x9b\\u202e\\u2028é[/]"
    assert all(not CONTROL.search(safe_text(chr(i))) for i in range(0x300))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_key_in_a_convert_error(name: str, tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    key = HOSTILE[name]
    src = copy_source(tiny_resnet_dir, tmp_path)
    _add(src / "model.safetensors", [key])
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("convert", src, "--out", tmp_path / "out", "--no-parity", "-q")
    # the key is quoted (repr) in the message, escaped where repr leaves a control: never eaten as markup
    _assert_refused(res, tmp_path, before, "unmatched source key", safe_text(repr(key)))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_key_in_inspect_keys(name: str, tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    key = HOSTILE[name]
    src = copy_source(tiny_resnet_dir, tmp_path)
    _add(src / "model.safetensors", [key])
    table = cli("inspect-keys", src)
    assert table.exit_code == 0, table.stderr
    assert "Traceback" not in table.stderr + table.stdout
    assert not CONTROL.search(table.stdout), repr(table.stdout)
    assert safe_text(key) in table.stdout  # printed literally: '[bold]x[/bold]' stays, '[/]' stays
    tsv = cli("inspect-keys", src, "--format", "tsv")
    assert tsv.exit_code == 0, tsv.stderr
    rows = tsv.stdout.splitlines()
    assert all(len(r.split("\t")) == 7 for r in rows), rows
    assert len(rows) == 1 + 74 + 1  # the header, the tiny ResNet's 74 keys, the hostile one
    assert [r.split("\t")[3] for r in rows if r.split("\t")[0] == safe_text(key)] == ["unmatched"]
    js = cli("inspect-keys", src, "--format", "json")
    assert js.exit_code == 0, js.stderr
    assert key in [k["key"] for k in json.loads(js.stdout)["keys"]]  # JSON stays exact


def test_hostile_folder_name_in_logs_and_result(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path, "evil\x1b]0;pwned\x07[/]\nerror: x")
    res = cli("convert", src, "--out", tmp_path / "out", "--no-parity")
    assert res.exit_code == 0, res.stderr
    assert not CONTROL.search(res.stdout + res.stderr), repr(res.stderr)
    assert "evil\\x1b]0;pwned\\x07[/]\\nerror: x" in res.stderr  # the INFO line naming the source
    assert "evil\\x1b]0;pwned\\x07[/]\\nerror: x" in res.stdout  # the result line
    assert not any(line.startswith("error") for line in res.stderr.splitlines())


def test_revision_with_a_newline_cannot_forge_an_error_line(tmp_path: Path, cli) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("convert", "org/never-downloaded", "--revision", "main\nerror: everything is fine\x1b[2J",
              "--out", tmp_path / "out", "-q")
    _assert_refused(res, tmp_path, before, "org/never-downloaded@main\\nerror: everything is fine\\x1b[2J")


@pytest.mark.parametrize("name", ["[bold]m[/bold].yaml", "m[/].yaml", "m\x1b[31m.yaml"])
def test_mapping_path_with_markup_is_printed_literally(name: str, tiny_resnet_dir: Path, tmp_path: Path,
                                                       cli) -> None:
    mapping = tmp_path / "maps" / name  # a '/' in the name is a folder: 'm[/].yaml' is m[ / ].yaml
    mapping.parent.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    mapping.write_text("version: 1\nmodel: resnet\nrules: [{from: '^x$'}]\n")  # a rule without 'to'
    res = cli("convert", tiny_resnet_dir, "--mapping", mapping, "--out", tmp_path / "out", "-q")
    _assert_refused(res, tmp_path, before, safe_text(mapping))


def test_mapping_error_with_many_hostile_keys_keeps_one_line_each(tiny_resnet_dir: Path, tmp_path: Path,
                                                                   cli) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path)
    _add(src / "model.safetensors", list(HOSTILE.values()))
    res = cli("convert", src, "--out", tmp_path / "out", "--no-parity", "-q")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].endswith(f": {len(HOSTILE)} problems") and len(lines) == 1 + len(HOSTILE), res.stderr
    assert not CONTROL.search(res.stderr)
    assert sum(line.startswith("error") for line in lines) == 1


@pytest.mark.parametrize("value", ["x", "0", "-4", "inf", "nan"])
def test_bad_write_group_size_is_one_line(value: str, tiny_resnet_dir: Path, tmp_path: Path, cli,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNXPORT_WRITE_GROUP_MB", value)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("convert", tiny_resnet_dir, "--out", tmp_path / "out", "--no-parity", "-q")
    _assert_refused(res, tmp_path, before, f"NNXPORT_WRITE_GROUP_MB={value!r}: expected a positive number")
