"""nnxport.sources: hub id / folder / file resolution, index checks, header-only metadata, lazy reads."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub.constants
import ml_dtypes
import numpy as np
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from nnxport.errors import SourceError
from nnxport.sources import hub as hub_mod
from nnxport.sources import safetensors as safetensors_mod
from nnxport.sources.base import Source, TensorInfo
from nnxport.sources.folder import open_source
from nnxport.sources.hub import is_hub_id, snapshot_download
from nnxport.testing.hub import write_hub_cache
from tests.helpers import ROOT, copy_source, hub_response

REV = "0123456789abcdef0123456789abcdef01234567"
RNG = np.random.default_rng(0)

MIXED: dict[str, np.ndarray] = {
    "w.bf16": RNG.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
    "w.f16": RNG.standard_normal((4,)).astype(np.float16),
    "w.f32": RNG.standard_normal((2, 3, 4)).astype(np.float32),
    "w.f64": RNG.standard_normal((2,)),
    "steps.i64": np.array([1, -2, 2**40], dtype=np.int64),
    "mask.bool": np.array([True, False, True]),
    "q.fp8": RNG.standard_normal((4, 6)).astype(ml_dtypes.float8_e4m3fn),
    "q.fp8e5": RNG.standard_normal((2, 2)).astype(ml_dtypes.float8_e5m2),
    "scalar": np.array(1.5, dtype=np.float32),
}
EXPECTED_DTYPES = {
    "w.bf16": "bfloat16", "w.f16": "float16", "w.f32": "float32", "w.f64": "float64", "steps.i64": "int64",
    "mask.bool": "bool", "q.fp8": "float8_e4m3fn", "q.fp8e5": "float8_e5m2", "scalar": "float32",
}


def _folder(path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any] | None = None,
            filename: str = "model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / filename))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny transformers ResNet saved whole and in ≥2 shards, and its state dict as numpy."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic")
    model = ResNetForImageClassification(cfg)
    base = tmp_path_factory.mktemp("resnet")
    model.save_pretrained(base / "single")
    model.save_pretrained(base / "sharded", max_shard_size="20KB")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return {"single": base / "single", "sharded": base / "sharded", "state": state}


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    folder = _folder(tmp_path_factory.mktemp("mixed") / "mixed", MIXED, {"model_type": "toy"})
    return open_source(folder)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, offline hub cache. huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE into constants at
    import; snapshot_download consults the constants at call time, so patching them is reliable."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


# ---------------------------------------------------------------------------------------------- folder / file


def test_folder_metadata_from_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path / "toy-model", MIXED, {"model_type": "toy", "hidden": 3})
    real_open = safetensors_mod.safe_open

    class HeaderOnly:
        """safe_open whose slices only give shape and dtype: any data read fails the test."""

        def __init__(self, path: Path, framework: str) -> None:
            self.f = real_open(path, framework=framework)

        def __enter__(self) -> HeaderOnly:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.__exit__(None, None, None)

        def keys(self) -> list[str]:
            return list(self.f.keys())

        def get_slice(self, key: str) -> Any:
            sl = self.f.get_slice(key)
            methods = {"get_shape": lambda _: sl.get_shape(), "get_dtype": lambda _: sl.get_dtype()}
            return type("View", (), methods)()

    monkeypatch.setattr(safetensors_mod, "safe_open", HeaderOnly)
    src = open_source(str(folder))
    assert (src.kind, src.repo_id, src.revision, src.name) == ("folder", None, None, "toy-model")
    assert src.root == folder and src.spec == str(folder)
    file = folder / "model.safetensors"
    assert [(f.path, f.name, f.size) for f in src.files] == [(file, "model.safetensors", file.stat().st_size)]
    assert list(src.tensors) == sorted(MIXED)
    for key, arr in MIXED.items():
        assert src.tensors[key] == TensorInfo(key, arr.shape, EXPECTED_DTYPES[key], file, arr.nbytes)
    assert src.config == {"model_type": "toy", "hidden": 3}
    assert src.config_path == folder / "config.json"


@pytest.mark.parametrize("key", sorted(MIXED))
def test_read_keeps_stored_dtype_and_values(mixed_source: Source, key: str) -> None:
    got = mixed_source.read(key)
    want = MIXED[key]
    assert got.dtype == want.dtype and got.shape == want.shape  # bf16 stays ml_dtypes.bfloat16, not float32
    assert got.tobytes() == want.tobytes()


INDEXES: list[tuple[Any, ...]] = [
    (),
    (slice(None),),
    (slice(-2, None),),
    (slice(None, -1), slice(-3, -1)),
    (slice(1, 100), slice(-100, 2)),
    (slice(None, None, 2), slice(1, None, 3)),
    (slice(None, None, -1),),
    (slice(-1, 0, -2), slice(None), slice(None, None, -3)),
    (-1, slice(-2, None)),
    (0, 2, -1),
    (slice(2, 1),),
    (slice(None), slice(3, 3)),
]


@pytest.mark.parametrize("index", INDEXES, ids=repr)
def test_read_slice_equals_read_then_index(mixed_source: Source, index: tuple[Any, ...]) -> None:
    want = mixed_source.read("w.f32")[index]
    got = mixed_source.read_slice("w.f32", index)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("key", ["w.bf16", "q.fp8"])
def test_read_slice_bf16_and_fp8(mixed_source: Source, key: str) -> None:
    index = (slice(-2, None), slice(None, -1, 2))
    got = mixed_source.read_slice(key, index)
    assert got.dtype == MIXED[key].dtype
    assert got.tobytes() == np.ascontiguousarray(MIXED[key][index]).tobytes()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_read_slice_property(mixed_source: Source, data: st.DataObject) -> None:
    shape = MIXED["w.f32"].shape
    ndim = data.draw(st.integers(0, len(shape)))
    index = tuple(data.draw(st.slices(n) | st.integers(-n, n - 1)) for n in shape[:ndim])
    np.testing.assert_array_equal(mixed_source.read_slice("w.f32", index), MIXED["w.f32"][index])


def test_read_slice_rejects_out_of_range(mixed_source: Source) -> None:
    with pytest.raises(IndexError, match="out of bounds"):
        mixed_source.read_slice("w.f32", (2,))
    with pytest.raises(IndexError, match="too many indices"):
        mixed_source.read_slice("w.f16", (slice(None), slice(None)))


def test_unknown_key_names_it(mixed_source: Source) -> None:
    with pytest.raises(SourceError, match="no tensor named 'nope'"):
        mixed_source.read("nope")


def test_single_file_with_and_without_config(tmp_path: Path) -> None:
    path = _folder(tmp_path / "d", {"a": np.ones((2, 2), np.float32)}, filename="weights.safetensors")
    path = path / "weights.safetensors"
    src = open_source(path)
    assert (src.kind, src.name, src.root) == ("file", "weights", path.parent)
    assert (src.config, src.config_path) == (None, None)
    assert [f.name for f in src.files] == ["weights.safetensors"]

    other = tmp_path / "elsewhere.json"
    other.write_text('{"model_type": "x"}')
    src = open_source(path, config=other)
    assert (src.config, src.config_path) == ({"model_type": "x"}, other)

    (path.parent / "config.json").write_text('{"model_type": "beside"}')
    assert open_source(path).config == {"model_type": "beside"}


def test_transformers_single_and_sharded_agree(resnet: dict[str, Any]) -> None:
    single, sharded = open_source(resnet["single"]), open_source(resnet["sharded"])
    state: dict[str, np.ndarray] = resnet["state"]
    assert len(sharded.files) >= 2
    index = json.loads((resnet["sharded"] / "model.safetensors.index.json").read_text())
    assert [f.name for f in sharded.files] == sorted(set(index["weight_map"].values()))
    assert list(single.tensors) == list(sharded.tensors) == sorted(state)
    assert single.config == sharded.config and single.config is not None
    assert single.config["model_type"] == "resnet"
    for key, want in state.items():
        info = sharded.tensors[key]
        assert info.file.name == index["weight_map"][key]
        assert (info.shape, info.dtype) == (want.shape, str(want.dtype))
        np.testing.assert_array_equal(sharded.read(key), want)
        np.testing.assert_array_equal(single.read(key), want)
    assert sharded.tensors["resnet.embedder.embedder.normalization.num_batches_tracked"].dtype == "int64"


def test_sharded_missing_shard_is_named(resnet: dict[str, Any], tmp_path: Path) -> None:
    folder = copy_source(resnet["sharded"], tmp_path, "ckpt")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match=r"00002-of-00002\.safetensors named by the index .* incomplete"):
        open_source(folder)


def test_index_naming_the_wrong_shard(resnet: dict[str, Any], tmp_path: Path) -> None:
    folder = copy_source(resnet["sharded"], tmp_path, "ckpt")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k, v in index["weight_map"].items() if v == "model-00001-of-00002.safetensors")
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceError) as err:
        open_source(folder)
    assert f"puts {key} in model-00002-of-00002.safetensors, which does not hold it" in str(err.value)


def test_shard_tensor_missing_from_index(resnet: dict[str, Any], tmp_path: Path) -> None:
    folder = copy_source(resnet["sharded"], tmp_path, "ckpt")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["classifier.1.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"classifier\.1\.bias \(in model-0000\d-of-00002\.\w+\) missing"):
        open_source(folder)


def test_index_files_only_and_extra_safetensors_ignored(resnet: dict[str, Any], tmp_path: Path) -> None:
    folder = copy_source(resnet["sharded"], tmp_path, "ckpt")
    save_file({"stale": np.zeros(1, np.float32)}, str(folder / "old.safetensors"))
    src = open_source(folder)
    assert "old.safetensors" not in [f.name for f in src.files] and "stale" not in src.tensors


def test_duplicate_key_without_index_names_both_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "dup", {"a": np.zeros(1, np.float32)}, filename="one.safetensors")
    save_file({"a": np.zeros(1, np.float32)}, str(folder / "two.safetensors"))
    with pytest.raises(SourceError, match=r"'a' is stored in both one\.safetensors and two\.safetensors"):
        open_source(folder)


def test_several_files_without_index_are_all_used(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "two", {"b": np.zeros(1, np.float32)}, filename="one.safetensors")
    save_file({"a": np.ones(2, np.float16)}, str(folder / "two.safetensors"))
    src = open_source(folder)
    assert [f.name for f in src.files] == ["one.safetensors", "two.safetensors"]
    assert list(src.tensors) == ["a", "b"] and src.tensors["a"].file == folder / "two.safetensors"


# -------------------------------------------------------------------------------------------------- errors


def test_pickle_only_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(SourceError,
                       match=r"only pickle weights \(pytorch_model\.bin\), which can run code"):
        open_source(tmp_path / "m")
    with pytest.raises(SourceError, match="pickle weights"):
        open_source(tmp_path / "m" / "pytorch_model.bin")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tf_model.h5").write_bytes(b"")
    with pytest.raises(SourceError, match=r"only other weight formats \(tf_model\.h5\)"):
        open_source(tmp_path / "m")
    (tmp_path / "m" / "tf_model.h5").unlink()
    with pytest.raises(SourceError, match=r"no \.safetensors files found in"):
        open_source(tmp_path / "m")


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", {"a": np.zeros(1, np.float32)})
    (folder / "config.json").write_text('{\n  "a": 1,,\n}')
    with pytest.raises(SourceError, match=r"config\.json: invalid JSON at line 2 column 10"):
        open_source(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(SourceError, match=r"config\.json: expected a JSON object, found list"):
        open_source(folder)
    (folder / "config.json").unlink()
    assert open_source(folder).config is None
    with pytest.raises(SourceError, match=r"missing\.json: no such config file"):
        open_source(folder, config=tmp_path / "missing.json")
    with pytest.raises(SourceError, match="not a file"):
        open_source(folder, config=tmp_path)


def test_nonexistent_and_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope/x/y: no such file or folder \(and not a hub id\)"):
        open_source("nope/x/y")
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(Path("org/name"))  # a Path is never a hub id
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source("weights.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match=r"notes\.txt: not a folder or a \.safetensors file"):
        open_source(tmp_path / "notes.txt")


def test_revision_refused_for_local_sources(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", {"a": np.zeros(1, np.float32)})
    with pytest.raises(SourceError, match="revision only applies to hub ids"):
        open_source(folder, revision="main")


@pytest.mark.parametrize(("cut", "says"), [
    (5, "not a safetensors file: 5 bytes, too short for the 8-byte header length (truncated?)"),
    (10, "header length 64 runs past the end of the file (10 bytes; truncated?)"),
    (200, "tensor 'a''s data ends at byte 256 of the data section, which has only 128 bytes (truncated?)"),
])
def test_truncated_file_is_named(tmp_path: Path, cut: int, says: str) -> None:
    folder = _folder(tmp_path / "m", {"a": np.arange(64, dtype=np.float32)})
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(SourceError) as err:
        open_source(path)
    assert str(err.value) == f"{path}: {says}"


def _handmade(path: Path, dtype: str, shape: list[int], nbytes: int) -> Path:
    header = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))
    return path


def test_packed_fp4_is_listed_but_not_read(tmp_path: Path) -> None:
    src = open_source(_handmade(tmp_path / "fp4.safetensors", "F4", [2, 4], 4))
    assert (src.tensors["t"].dtype, src.tensors["t"].nbytes) == ("float4_e2m1fn", 4)
    with pytest.raises(SourceError, match=r"fp4\.safetensors: 't' is float4_e2m1fn \(packed sub-byte\)"):
        src.read("t")


# ---------------------------------------------------------------------------------------------- hub ids


@pytest.mark.parametrize(("spec", "ok"), [
    ("microsoft/resnet-50", True), ("gpt2", True), ("org_1/Model.v2-x", True),
    ("a/b/c", False), ("/abs/path", False), ("./rel", False), ("~/x", False), (".hidden", False),
    ("org/", False), ("/org", False), ("org/../x", False), ("model.safetensors", False),
    ("has space/x", False),
])
def test_is_hub_id(spec: str, ok: bool) -> None:
    assert is_hub_id(spec) is ok


def test_hub_offline_cache_resolves(resnet: dict[str, Any], hub_cache: Path) -> None:
    snapshot = write_hub_cache(hub_cache, "org/tiny-resnet", resnet["sharded"])
    assert snapshot == hub_cache / "models--org--tiny-resnet" / "snapshots" / REV
    assert (hub_cache / "models--org--tiny-resnet" / "refs" / "main").read_text() == REV
    for revision in (None, "main", REV):
        src = open_source("org/tiny-resnet", revision=revision)
        assert (src.kind, src.repo_id, src.revision, src.name, src.root) == (
            "hub", "org/tiny-resnet", REV, "tiny-resnet", snapshot)
        assert len(src.files) >= 2 and list(src.tensors) == sorted(resnet["state"])
        assert src.config is not None and src.config_path == snapshot / "config.json"
        np.testing.assert_array_equal(src.read("classifier.1.weight"), resnet["state"]["classifier.1.weight"])


def test_write_hub_cache_replaces_a_snapshot(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", {"x": np.zeros(1, np.float32)}, filename="a.safetensors")
    b = _folder(tmp_path / "b", {"y": np.zeros(1, np.float32)}, filename="b.safetensors")
    write_hub_cache(tmp_path / "hub", "n", a)
    snapshot = write_hub_cache(tmp_path / "hub", "n", b)
    assert sorted(p.name for p in snapshot.iterdir()) == ["b.safetensors"]
    with pytest.raises(ValueError, match="not a hub id"):
        write_hub_cache(tmp_path / "hub", "a/b/c", a)


def test_hub_missing_from_offline_cache(hub_cache: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_source("org/absent")
    assert str(err.value) == (
        f"org/absent is not in the local Hugging Face cache ({hub_cache}) and the hub is offline "
        "(HF_HUB_OFFLINE=1) — download it once with network access or point HF_HUB_CACHE at a cache that "
        "has it"
    )
    with pytest.raises(SourceError, match="no local file or folder named 'gpt2' either"):
        open_source("gpt2")


def test_hub_unknown_revision_offline(tmp_path: Path, hub_cache: Path) -> None:
    write_hub_cache(hub_cache, "org/m", _folder(tmp_path / "m", {"a": np.zeros(1, np.float32)}))
    with pytest.raises(SourceError, match=r"^org/m@v2 is not in the local Hugging Face cache"):
        open_source("org/m", revision="v2")
    with pytest.raises(SourceError, match=r"^org/m@f{40} is not in the local"):
        open_source("org/m", revision="f" * 40)


def test_hub_incomplete_snapshot(resnet: dict[str, Any], hub_cache: Path) -> None:
    snapshot = write_hub_cache(hub_cache, "org/partial", resnet["sharded"])
    (snapshot / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match=r"model-00001-of-00002\.safetensors.*the snapshot is incomplete"):
        open_source("org/partial")


def test_hub_pickle_only_snapshot(tmp_path: Path, hub_cache: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"")
    write_hub_cache(hub_cache, "org/old", tmp_path / "m")
    with pytest.raises(SourceError, match=r"^org/old@0123456789ab: only pickle weights"):
        open_source("org/old")


HUB_ERRORS: dict[str, tuple[Exception, str]] = {
    "gated": (GatedRepoError("403 gated", response=hub_response(403, "org/x")),
              "org/x is a gated repository"),
    "not-found": (RepositoryNotFoundError("401", response=hub_response(401, "org/x")),
                  "org/x: no such repository on the hub"),
    "revision": (RevisionNotFoundError("404", response=hub_response(404, "org/x")),
                 "org/x: revision 'v9' not found on the hub"),
    "http-500": (HfHubHTTPError("500 Server Error\nmore", response=hub_response(500, "org/x")),
                 "org/x@v9: the hub answered with an error: HfHubHTTPError: 500 Server Error"),
    "proxy": (httpx2.ProxyError("proxy refused"),
              "org/x@v9: cannot reach the hub (ProxyError: proxy refused)"),
}


@pytest.mark.parametrize("case", list(HUB_ERRORS))
def test_hub_errors_become_one_line(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    error, message = HUB_ERRORS[case]
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")

    def fail(repo_id: str, *, revision: str | None) -> str:
        assert (repo_id, revision) == ("org/x", "v9")
        raise error

    monkeypatch.setattr(hub_mod, "snapshot_download", fail)
    with pytest.raises(SourceError) as err:
        open_source("org/x", revision="v9")
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text and "hf_secret" not in text
    assert err.value.__cause__ is error


def test_hub_env_vars_in_fresh_interpreter(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE / HF_HUB_CACHE as a user sets them, read by huggingface_hub at import."""
    cache = tmp_path / "cache"
    write_hub_cache(cache, "org/m", _folder(tmp_path / "m", {"a": np.arange(3, dtype=np.int64)}, {"k": 1}))
    code = (
        "import json; from nnxport.sources.folder import open_source\n"
        "s = open_source('org/m')\n"
        "print(json.dumps([s.kind, s.revision, s.name, s.config, s.read('a').tolist()]))\n"
        "try:\n    open_source('org/absent')\nexcept Exception as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert json.loads(first) == ["hub", REV, "m", {"k": 1}, [0, 1, 2]]
    assert second.startswith(f"org/absent is not in the local Hugging Face cache ({cache})")


# ------------------------------------------------------------------------------------------ files, handles


def test_sha256_streams_and_tracks_changes(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", {"a": np.arange(10, dtype=np.float32)})
    path = folder / "model.safetensors"
    (file,) = open_source(folder).files
    assert file.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
    save_file({"a": np.arange(11, dtype=np.float32)}, str(path))
    assert file.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    with pytest.raises(SourceError, match=r"model\.safetensors: cannot read"):
        file.sha256()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_handles_open_lazily_and_close(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "lazy", {"a": np.arange(4, dtype=np.float32)})
    path = str(folder / "model.safetensors")

    def mapped() -> bool:
        return path in Path("/proc/self/maps").read_text()

    def opened() -> bool:
        fds = Path("/proc/self/fd")
        return any(os.path.realpath(fds / fd) == os.path.realpath(path) for fd in os.listdir(fds))

    with open_source(folder) as src:
        assert not mapped() and not opened()  # metadata is read and the file closed again
        first = src.read("a")
        assert opened() and not mapped()  # whole tensors are read with pread, not through a mapping
    assert not mapped() and not opened()
    np.testing.assert_array_equal(first, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(src.read_slice("a", (slice(1, 3),)), [1, 2])  # reopens on demand
    src.close()


def test_cached_commit_skips_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a commit hash the cache is tried first (offline-capable, no ~23 s of retries when the hub is
    unreachable); a branch name always asks the hub."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls: list[tuple[str | None, bool]] = []
    cached = {REV}

    def fake(repo_id: str, *, revision: str | None, allow_patterns: list[str],
             local_files_only: bool = False) -> str:
        assert allow_patterns == [*hub_mod.HUB_PATTERNS] and "tokenizer.model" in allow_patterns
        calls.append((revision, local_files_only))
        if local_files_only and revision not in cached:
            raise LocalEntryNotFoundError("not cached")
        return f"/cache/{repo_id}/{revision}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert snapshot_download("org/x", revision=REV) == f"/cache/org/x/{REV}"
    assert calls == [(REV, True)]
    calls.clear()
    snapshot_download("org/x", revision="f" * 40)
    assert calls == [("f" * 40, True), ("f" * 40, False)]
    calls.clear()
    snapshot_download("org/x", revision="main")
    snapshot_download("org/x", revision=None)
    assert calls == [("main", False), (None, False)]
