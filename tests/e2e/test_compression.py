"""convert --compression: both storages restore to the same arrays, the manifest records which was used,
zstd is smaller on weights with few distinct values, and a bad value is refused before any work (CLI and
API) or, in a manifest, named by verify."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import nnxport
from tests.helpers import tree_state


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "checkpoint").rglob("*") if p.is_file())


def test_both_compressions_restore_the_same_arrays(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    states = {}
    for compression in ("none", "zstd"):
        out = tmp_path / compression
        res = cli("convert", tiny_resnet_dir, "--out", out, "--compression", compression, "--no-parity", "-q")
        assert res.exit_code == 0, res.stderr
        assert json.loads((out / "nnxport.json").read_text())["compression"] == compression
        states[compression] = jax.tree.leaves(nnx.state(nnxport.load(out), nnx.Param))
    for a, b in zip(states["none"], states["zstd"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _size(tmp_path / "zstd") < _size(tmp_path / "none")


def test_default_is_uncompressed(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    nnxport.convert(tiny_resnet_dir, tmp_path / "out", parity=False)
    assert json.loads((tmp_path / "out" / "nnxport.json").read_text())["compression"] == "none"


def test_unknown_compression_is_refused_before_any_work(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    before = tree_state(tmp_path)
    res = cli("convert", tiny_resnet_dir, "--out", tmp_path / "out", "--compression", "lz4")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    with pytest.raises(nnxport.NnxportError, match="unknown compression 'lz4' \\(choose none or zstd\\)"):
        nnxport.convert(tiny_resnet_dir, tmp_path / "out", compression="lz4")
    assert tree_state(tmp_path) == before


def test_manifest_with_an_unknown_compression_is_named(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "out"
    nnxport.convert(tiny_resnet_dir, out, parity=False)
    manifest = json.loads((out / "nnxport.json").read_text())
    manifest["compression"] = "lz4"
    (out / "nnxport.json").write_text(json.dumps(manifest))
    res = cli("verify", out)
    assert res.exit_code == 1
    assert res.stderr.strip() == f"error: {out / 'nnxport.json'}: compression must be one of none, zstd"
